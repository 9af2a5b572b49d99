"""Dense displacement fields as torch tensors: warping, composition, unit conversion.

Conventions (used by every module of the libraries):

* A volume tensor has shape ``(B, C, D, H, W)``; ``D`` runs over the slowest image
  index ``k`` (ITK/SimpleITK ``z`` index), ``H`` over ``j`` and ``W`` over ``i``. This is
  the order of ``SimpleITK.GetArrayFromImage``.
* A displacement field in **voxel units** has shape ``(B, 3, D, H, W)``; channel 0 is
  the displacement along ``i`` (x index), channel 1 along ``j`` (y), channel 2 along
  ``k`` (z, cranio-caudal for axial CT).
* A field ``u`` maps a point ``p`` of the *fixed* grid to the point ``p + u(p)`` of the
  *moving* grid (the resampling direction, as an ITK transform): ``warp(moving, u)``
  resamples the moving image onto the fixed grid.
* Physical fields are in LPS millimetres, ``d = Direction @ diag(spacing) @ u``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def identity_grid(shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel index coordinates ``(3, D, H, W)`` with channels ordered ``(i, j, k)``."""
    d, h, w = (int(s) for s in shape)
    kk, jj, ii = torch.meshgrid(
        torch.arange(d, device=device, dtype=dtype),
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((ii, jj, kk), dim=0)


@functools.lru_cache(maxsize=8)
def _normalised_identity(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Identity ``grid_sample`` grid ``(1, D, H, W, 3)`` (cached: it is rebuilt for every warp otherwise)."""
    d, h, w = shape
    sizes = torch.tensor([w, h, d], device=device, dtype=dtype).view(3, 1, 1, 1)
    norm = 2.0 * identity_grid(shape, device=device, dtype=dtype) / (sizes - 1).clamp(min=1) - 1.0
    return norm.permute(1, 2, 3, 0).unsqueeze(0).contiguous()


def _normalised_sampling_grid(u: torch.Tensor) -> torch.Tensor:
    """Turn a voxel displacement ``(B, 3, D, H, W)`` into a ``grid_sample`` grid.

    ``align_corners=True`` convention: index 0 maps to -1 and index ``N-1`` to +1.
    """
    _, _, d, h, w = u.shape
    scale = 2.0 / torch.tensor([w, h, d], device=u.device, dtype=u.dtype).sub(1).clamp(min=1)
    return _normalised_identity((d, h, w), u.device, u.dtype) + u.permute(0, 2, 3, 4, 1) * scale


def warp(image: torch.Tensor, u: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``image`` (B, C, D, H, W) at ``p + u(p)`` for every voxel ``p``.

    ``mode`` is ``"bilinear"`` (trilinear in 3D) or ``"nearest"``. ``image`` and ``u``
    must share the spatial shape (the moving image lives on the same grid).
    """
    if image.shape[2:] != u.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} != field grid {tuple(u.shape[2:])}")
    grid = _normalised_sampling_grid(u)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def spline_prefilter(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients ``(B, C, D, H, W)`` of an image (mirrored borders, computed with
    SciPy on the CPU, returned on the image's device and dtype): :func:`warp_cubic` of them
    interpolates the image. Compute once per image and reuse for every warp."""
    import numpy as np
    from scipy import ndimage

    arr = image.detach().cpu().double().numpy()
    vols = arr.reshape(-1, *arr.shape[2:])
    out = np.stack([ndimage.spline_filter(v, order=3, mode="mirror") for v in vols]).reshape(arr.shape)
    return torch.from_numpy(out).to(image.device, image.dtype)


def warp_cubic(coefficients: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Third-order B-spline interpolation of an image at ``p + u(p)`` for every voxel ``p``.

    ``coefficients`` (B, C, D, H, W) come from :func:`spline_prefilter`; ``u`` is a voxel displacement
    (B, 3, D, H, W) on the same grid. Evaluated as eight trilinear look-ups (the cubic weights of each
    axis folded into two linear samples at shifted positions), borders mirrored about the edge voxel
    centres as the prefilter assumes.
    """
    if coefficients.shape[2:] != u.shape[2:]:
        raise ValueError(f"image grid {tuple(coefficients.shape[2:])} != field grid {tuple(u.shape[2:])}")
    pos = identity_grid(u.shape[2:], u.device, u.dtype)[None] + u          # (B, 3, D, H, W) voxel (i, j, k)
    base = torch.floor(pos)
    a = pos - base
    w0 = (1 - a) ** 3 / 6
    w1 = (4 - 6 * a**2 + 3 * a**3) / 6
    w3 = a**3 / 6
    g0 = w0 + w1
    g1 = 1 - g0
    h = (base - 1 + w1 / g0.clamp(min=1e-12), base + 1 + w3 / g1.clamp(min=1e-12))
    g = (g0, g1)
    d, hh, w = u.shape[2:]
    scale = 2.0 / torch.tensor([w, hh, d], device=u.device, dtype=u.dtype).sub(1).clamp(min=1)
    out = 0
    for si in (0, 1):
        for sj in (0, 1):
            for sk in (0, 1):
                p = torch.stack((h[si][:, 0], h[sj][:, 1], h[sk][:, 2]), dim=-1) * scale - 1.0
                weight = (g[si][:, 0] * g[sj][:, 1] * g[sk][:, 2])[:, None]
                out = out + weight * F.grid_sample(coefficients, p, mode="bilinear", padding_mode="reflection",
                                                   align_corners=True)
    return out


def compose(u_outer: torch.Tensor, u_inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``T_outer ∘ T_inner``: ``x -> T_outer(T_inner(x))``.

    ``u(x) = u_inner(x) + u_outer(x + u_inner(x))``, with ``u_outer`` interpolated
    trilinearly (border values are repeated outside the grid).
    """
    return u_inner + warp(u_outer, u_inner, mode="bilinear", padding_mode="border")


def voxel_to_physical(u: torch.Tensor, spacing: Sequence[float], direction: Sequence[float]) -> torch.Tensor:
    """Convert a voxel displacement ``(B, 3, ...)`` to LPS millimetres.

    ``spacing`` is ``(sx, sy, sz)`` in mm, ``direction`` the 9 row-major entries of the
    ITK direction cosine matrix (columns are the index axes in LPS).
    """
    m = torch.as_tensor(direction, dtype=u.dtype, device=u.device).reshape(3, 3)
    m = m * torch.as_tensor(spacing, dtype=u.dtype, device=u.device).reshape(1, 3)
    return torch.einsum("rc,bc...->br...", m, u)


def physical_to_voxel(d: torch.Tensor, spacing: Sequence[float], direction: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`voxel_to_physical`: LPS millimetres to voxel units."""
    m = torch.as_tensor(direction, dtype=d.dtype, device=d.device).reshape(3, 3)
    m = m * torch.as_tensor(spacing, dtype=d.dtype, device=d.device).reshape(1, 3)
    return torch.einsum("rc,bc...->br...", torch.linalg.inv(m), d)


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a voxel displacement to another grid covering the same box.

    Both grids put their first and last voxel centres on the same physical points
    (``align_corners=True``), so each displacement component is rescaled by
    ``(N_new - 1) / (N_old - 1)`` along its own axis.
    """
    old = u.shape[2:]
    out = F.interpolate(u, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
    scale = [(n - 1) / max(o - 1, 1) for n, o in zip(shape, old, strict=True)]  # (k, j, i)
    factors = torch.tensor([scale[2], scale[1], scale[0]], dtype=u.dtype, device=u.device)
    return out * factors.view(1, 3, 1, 1, 1)
