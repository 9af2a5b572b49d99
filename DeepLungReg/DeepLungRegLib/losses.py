"""Image dissimilarities, regularisers and penalties shared by inference (refine) and training.

Conventions (see :mod:`DeepLungRegLib.fields`): volumes are ``(B, C, D, H, W)`` tensors with
``D`` along the image index ``k``, ``H`` along ``j`` and ``W`` along ``i``; displacement
fields are ``(B, 3, D, H, W)`` with channels in ``(i, j, k)`` order. Spacings are given as
``(s_i, s_j, s_k)`` in mm. Every dissimilarity returns a scalar to *minimise*; masks are
``(B, 1, D, H, W)`` (bool or float weights) and an empty mask falls back to the whole volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# helpers


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` (B, C, D, H, W) over channels and the voxels where ``mask`` > 0.

    ``mask`` (B, 1, D, H, W) acts as voxel weights; an empty or missing mask gives the plain mean.
    """
    if mask is None:
        return values.mean()
    w = mask.to(values.dtype).expand_as(values)
    total = w.sum()
    if total <= 0:
        return values.mean()
    return (values * w).sum() / total


def _spacing_dhw(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Spacing ``(s_i, s_j, s_k)`` reordered to the tensor axes ``(D, H, W) = (k, j, i)``."""
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (s_i, s_j, s_k), got {spacing}")
    return float(spacing[2]), float(spacing[1]), float(spacing[0])


def _central_difference_values(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if n < 2:
        return torch.zeros_like(x)
    first, second = x.narrow(dim, 0, 1), x.narrow(dim, 1, 1)
    last, before = x.narrow(dim, n - 1, 1), x.narrow(dim, n - 2, 1)
    padded = torch.cat((2 * first - second, x, 2 * last - before), dim=dim)
    return (padded.narrow(dim, 2, n) - padded.narrow(dim, 0, n)) * 0.5


class _CentralDifference(torch.autograd.Function):
    """Central difference with its adjoint written out: autograd through the slices and the
    concatenation would zero-fill a full-size buffer per slice in the backward pass, the largest
    cost of the regularisers in the refinement's inner loop."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim
        return _central_difference_values(x, dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dim = ctx.dim
        n = g.shape[dim]
        if n < 2:
            return torch.zeros_like(g), None
        # rows 0 and n-1 of the operator are one-sided (weights -1, +1), the others (-1/2, +1/2):
        # (D^T g)_j = (h_{j-1} - h_{j+1}) / 2 with h = g doubled at both ends (h_{-1} = h_n = 0),
        # plus the diagonal entries of the end rows: -g_0 at j = 0 and +g_{n-1} at j = n-1.
        h = g.clone()
        h.narrow(dim, 0, 1).mul_(2.0)
        h.narrow(dim, n - 1, 1).mul_(2.0)
        out = torch.zeros_like(g)
        out.narrow(dim, 1, n - 1).add_(h.narrow(dim, 0, n - 1))
        out.narrow(dim, 0, n - 1).sub_(h.narrow(dim, 1, n - 1))
        out.mul_(0.5)
        out.narrow(dim, 0, 1).sub_(g.narrow(dim, 0, 1))
        out.narrow(dim, n - 1, 1).add_(g.narrow(dim, n - 1, 1))
        return out, None


def _central_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-voxel-step central difference along ``dim``, one-sided at both ends (as :func:`numpy.gradient`).

    The ends are linearly extrapolated by one voxel, which turns the central difference there
    into the one-sided one: ``(x1 - (2 x0 - x1)) / 2 = x1 - x0``.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _CentralDifference.apply(x, dim)
    return _central_difference_values(x, dim)


def spatial_gradient(x: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Central differences (one-sided at the borders) of ``x`` (B, C, D, H, W) per mm.

    Returns ``(B, C, 3, D, H, W)``; the gradient axis is in ``(i, j, k)`` order (same as
    displacement channels). Identical to :func:`numpy.gradient` along each axis.
    """
    si, sj, sk = (float(s) for s in spacing)
    return torch.stack((_central_difference(x, 4) / si, _central_difference(x, 3) / sj,
                        _central_difference(x, 2) / sk), dim=2)


# ---------------------------------------------------------------------------------------------
# dissimilarities


def masked_ssd(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of ``a`` and ``b`` (B, C, D, H, W) inside ``mask``."""
    return masked_mean((a - b) ** 2, mask)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, mask: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared, voxelmorph style) in ``window``³ boxes.

    Returns ``-mean(cc)`` with ``cc = cov² / (var_a var_b)`` per voxel, so identical images
    give -1 wherever they have local contrast. ``a``, ``b``: (B, 1, D, H, W).
    """
    if window % 2 != 1:
        raise ValueError("window must be odd")
    pad = window // 2

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, window, stride=1, padding=pad, count_include_pad=False)

    mu_a, mu_b = box(a), box(b)
    var_a = (box(a * a) - mu_a**2).clamp(min=0)
    var_b = (box(b * b) - mu_b**2).clamp(min=0)
    cov = box(a * b) - mu_a * mu_b
    cc = cov * cov / (var_a * var_b + eps)
    return -masked_mean(cc, mask)


def ngf(a: torch.Tensor, b: torch.Tensor, eps: float, spacing: Sequence[float] = (1.0, 1.0, 1.0),
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised gradient field distance (Haber & Modersitzki 2006; Hering et al. 2021, eq. 1).

    Per voxel ``1 - <∇a, ∇b>_ε² / (‖∇a‖_ε² ‖∇b‖_ε²)`` with ``<f, g>_ε = Σ_j (f_j g_j + ε²)``
    (so ``ε²`` enters three times) and gradients in intensity units per mm. ``ε`` is the
    edge parameter in the same units: gradients much smaller than ``ε`` count as noise.
    0 for images whose edges are parallel, whatever their contrast; invariant to scaling
    the intensities of both images when ``ε`` is scaled too. ``a``, ``b``: (B, 1, D, H, W).
    """
    ga = spatial_gradient(a, spacing)[:, 0]  # (B, 3, D, H, W)
    gb = spatial_gradient(b, spacing)[:, 0]
    e2 = 3.0 * eps * eps
    dot = (ga * gb).sum(1, keepdim=True) + e2
    na = (ga * ga).sum(1, keepdim=True) + e2
    nb = (gb * gb).sum(1, keepdim=True) + e2
    return masked_mean(1.0 - dot * dot / (na * nb), mask)


def ngf_epsilon(image: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0), noise: float = 1.0) -> float:
    """Haber & Modersitzki's automatic edge parameter ``ε = ν / V ∫ ‖∇I‖``: ``noise`` times the mean
    gradient magnitude (per mm) of ``image`` (B, 1, D, H, W)."""
    g = spatial_gradient(image, spacing)[:, 0]
    return float(noise * g.norm(dim=1).mean())


#: Neighbour offsets (k, j, i) of the six-neighbourhood used by :func:`mind_features`.
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def mind_features(image: torch.Tensor, dilation: int = 2, patch: int = 3) -> torch.Tensor:
    """Modality-independent self-similarity features (a MIND-type descriptor, Heinrich et al. 2012).

    For each of the six neighbours ``r`` at ``dilation`` voxels, the patch distance
    ``D_r = box_patch((I - I(· + r))²)`` is turned into ``exp(-D_r / V)``, ``V`` being the
    mean of ``D_r`` over the six neighbours (clamped to a robust range), then each voxel's
    descriptor is divided by its maximum. ``image``: (B, 1, D, H, W) -> (B, 6, D, H, W) in
    [0, 1]; unchanged by adding a constant to the image, or by scaling it.
    """
    pad = dilation
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    d, h, w = image.shape[2:]
    # one (B, 6, D, H, W) buffer filled in place: the full-resolution refine level of a large scan holds
    # millions of voxels, and every extra 6-channel temporary costs hundreds of MB
    shifts = [padded[:, :, pad + dk * dilation:pad + dk * dilation + d, pad + dj * dilation:pad + dj * dilation + h,
                     pad + di * dilation:pad + di * dilation + w] for dk, dj, di in _SIX]
    if image.requires_grad:
        dist = torch.cat([image - s for s in shifts], dim=1)
    else:
        dist = image.new_empty((image.shape[0], 6, d, h, w))
        for n, s in enumerate(shifts):
            torch.sub(image, s, out=dist[:, n : n + 1])
    del padded, shifts
    dist = dist.square_() if not dist.requires_grad else dist.square()
    dist = F.avg_pool3d(F.pad(dist, (patch // 2,) * 6, mode="replicate"), patch, stride=1)
    var = dist.mean(1, keepdim=True)
    mean_var = var.mean()
    var = var.clamp(min=mean_var * 1e-3, max=mean_var * 1e3) + 1e-12
    if dist.requires_grad:
        feat = torch.exp(-dist / var)
        return feat / feat.amax(1, keepdim=True).clamp(min=1e-12)
    feat = dist.div_(var).neg_().exp_()
    return feat.div_(feat.amax(1, keepdim=True).clamp_(min=1e-12))


# ---------------------------------------------------------------------------------------------
# regularisers and penalties on displacement fields


def diffusion(u: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0),
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion regulariser ``Σ_axes mean((∂u/∂axis)²)`` summed over components (forward differences, per mm).

    ``u`` (B, 3, D, H, W) in mm; zero for a translation, ``a²`` for ``u_x = a·x``. Forward
    differences live between voxels: ``mask`` (B, 1, D, H, W) weights each difference by the
    voxel it starts from.
    """
    if mask is None and u.requires_grad and torch.is_grad_enabled():
        return _Diffusion.apply(u, _spacing_dhw(spacing))
    total = u.new_zeros(())
    for dim, s in zip((2, 3, 4), _spacing_dhw(spacing), strict=True):
        if u.shape[dim] < 2:  # no differences along a single-voxel axis (as the custom-gradient path)
            continue
        d = torch.diff(u, dim=dim) / s
        m = None if mask is None else mask.narrow(dim, 0, u.shape[dim] - 1)
        total = total + masked_mean((d * d).sum(1, keepdim=True), m)
    return total


class _Diffusion(torch.autograd.Function):
    """Unmasked :func:`diffusion` with its gradient written out (``2 (d_{j-1} - d_j) / (N s²)`` per axis,
    ``d`` the forward differences): no full-size zero-filled slice buffers in the backward pass."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, spacing_dhw: tuple[float, float, float]) -> torch.Tensor:
        total = u.new_zeros(())
        diffs = []
        for dim, s in zip((2, 3, 4), spacing_dhw, strict=True):
            d = torch.diff(u, dim=dim)
            count = d.numel() // d.shape[1]
            total = total + (d * d).sum() / (count * s * s) if count else total
            diffs.append((dim, d, count, s))
        ctx.diffs = diffs
        ctx.shape = u.shape
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out = None
        for dim, d, count, s in ctx.diffs:
            if not count:
                continue
            w = d * (2.0 / (count * s * s))
            n = ctx.shape[dim]
            if out is None:
                out = torch.zeros(ctx.shape, dtype=d.dtype, device=d.device)
            out.narrow(dim, 1, n - 1).add_(w)
            out.narrow(dim, 0, n - 1).sub_(w)
        if out is None:
            out = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        return out * g, None


def curvature(u: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0),
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Curvature regulariser (Fischer & Modersitzki 2003): mean of ``Σ_c (Δu_c)²`` per mm².

    Second differences on the interior voxels; zero for any affine field. ``u`` (B, 3, D, H, W) mm.
    """
    sk, sj, si = _spacing_dhw(spacing)
    c = u[:, :, 1:-1, 1:-1, 1:-1]
    lap = ((u[:, :, 2:, 1:-1, 1:-1] + u[:, :, :-2, 1:-1, 1:-1] - 2 * c) / sk**2
           + (u[:, :, 1:-1, 2:, 1:-1] + u[:, :, 1:-1, :-2, 1:-1] - 2 * c) / sj**2
           + (u[:, :, 1:-1, 1:-1, 2:] + u[:, :, 1:-1, 1:-1, :-2] - 2 * c) / si**2)
    return masked_mean((lap**2).sum(1, keepdim=True), None if mask is None else mask[:, :, 1:-1, 1:-1, 1:-1])


def jacobian_determinant(u_mm: torch.Tensor, spacing: Sequence[float],
                         direction: Sequence[float] | None = None) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + d(x)`` for a field in LPS mm.

    ``u_mm`` is ``(B, 3, D, H, W)`` with components (x, y, z) in LPS mm on a grid with
    ``spacing`` (s_i, s_j, s_k) mm and ITK ``direction`` (9 row-major entries; identity if
    None). Central differences, one-sided at the borders — the same numbers as
    :func:`DeepLungRegLib.metrics.jacobian_determinant`. Returns ``(B, 1, D, H, W)``;
    differentiable.
    """
    m = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    minv = np.linalg.inv(m * np.asarray(spacing, float)[None, :])           # physical -> index
    # per-voxel-step derivatives of all components along the index axes i, j, k: each (B, 3, D, H, W)
    # (unbind, not indexing: the backward of ``g[:, c]`` zero-fills a full-size buffer per entry)
    grads = [_central_difference(u_mm, dim).unbind(1) for dim in (4, 3, 2)]
    jac = [[sum(grads[n][c] * float(minv[n, p]) for n in range(3) if minv[n, p] != 0.0)
            + (1.0 if c == p else 0.0) for p in range(3)] for c in range(3)]
    return det3_entries(jac).unsqueeze(1)


def det3_entries(m) -> torch.Tensor:
    """Determinant from the nine entries ``m[r][c]`` (tensors of one shape), rule of Sarrus."""
    (a, b, c), (d, e, f), (g, h, i) = m
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def volume_change_penalty(det: torch.Tensor, t: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Volume-change control with a linear barrier (Hering et al. 2021, eq. 6), mean over ``mask``.

    ``ψ_t(z) = (z - 1)² / z`` for ``z ≥ t`` (0 at ``z = 1``, symmetric: ``ψ(z) = ψ(1/z)``) and the
    tangent line ``(1 - 1/t²) z + 2(1 - t)/t`` below ``t``, so folded voxels (``z ≤ 0``) get a
    finite, steep penalty with a useful gradient. ``det`` (B, 1, D, H, W); ``t`` > 0.
    """
    if t <= 0:
        raise ValueError("barrier position t must be > 0")
    safe = det.clamp(min=t)
    inner = (safe - 1.0) ** 2 / safe
    linear = (1.0 - 1.0 / t**2) * det + 2.0 * (1.0 - t) / t
    return masked_mean(torch.where(det >= t, inner, linear), mask)


def keypoint_loss(mapped_fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm²) between mapped fixed keypoints and their moving partners.

    Both ``(N, 3)`` or ``(B, N, 3)`` in mm (Hering et al. 2021, eq. 8).
    """
    if mapped_fixed.shape != moving.shape:
        raise ValueError(f"keypoint arrays differ: {tuple(mapped_fixed.shape)} vs {tuple(moving.shape)}")
    if mapped_fixed.numel() == 0:
        return mapped_fixed.sum()
    return ((mapped_fixed - moving) ** 2).sum(-1).mean()
