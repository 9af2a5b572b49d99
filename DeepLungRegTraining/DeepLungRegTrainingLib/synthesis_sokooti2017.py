"""Synthetic training pairs of RegNet (``sokooti2017``; Sokooti et al., MICCAI 2017, Sect. 2.2).

A random displacement field (:func:`random_dvf`): a zero field on the scan's lattice, ``P``
voxels drawn at random (without repetition) given displacements uniform in ``[-θ, θ]`` per
component, then every component smoothed with a Gaussian of standard deviation ``σ``. The
paper states σ, θ on 1 mm isotropic images; here they are **millimetres** (σ converted to voxels
of the lattice per axis, θ and the field in mm along the lattice axes, channels ``(i, j, k)``).
Smoothing ``P`` isolated impulses with a σ of 20-35 voxels leaves about 1e-5 of their height,
so (as the authors' public code does) each component is then scaled back to the largest
impulse of that component: the field stays within ``[-θ, θ]`` and reaches the largest drawn
value. The Gaussian is the discrete kernel of ``scipy.ndimage.gaussian_filter`` (truncated at
4σ, normalised, zero outside the lattice), evaluated as a sum of separable bumps at the
``P`` points (a few small matrix products instead of three long convolutions).

Pairs (:func:`make_pair`): the scan is the moving image and the fixed image is the moving
image resampled through the field with **cubic B-spline interpolation**
(``fixed(x) = moving(x + u(x))``, so ``u`` maps fixed to moving as every DeepLungReg field),
plus Gaussian noise of 5 HU. Frequencies: low σ 35 mm, P 80; medium σ 25 mm, P 100; high
σ 20 mm, P 100; θ 8 mm. Half of the pairs use a deformed moving image instead (the scan
resampled through a low-frequency field σ 35 mm, P 100, θ 8 mm, plus 3 HU noise). The
undeformed moving image gets the paper's 5 HU augmentation noise. Noise is converted to the
normalised intensities with the HU window and the result clipped to [0, 1] as real inputs are.

Cubic B-spline interpolation: the samples are turned into B-spline coefficients by the exact
inverse filter (truncated where the pole's powers fall below 1e-9, mirror boundaries) and the
spline is evaluated with 8 trilinear look-ups per point (Sigg & Hadwiger, GPU Gems 2, ch. 20),
which gives the 64-term cubic B-spline sum exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .synthesis import random_voxels

#: Width of the HU window of the normalisation (-1000 .. 200 HU): noise in HU is divided by it.
HU_WINDOW = 1200.0
#: Gaussian truncation (standard deviations), as scipy.ndimage.gaussian_filter's default.
TRUNCATE = 4.0


@dataclass(frozen=True)
class RandomDVF:
    """One kind of random field: ``points`` impulses in ``[-theta_mm, theta_mm]`` smoothed with ``sigma_mm``;
    ``noise_hu``: Gaussian noise added to the image resampled through it."""

    name: str
    sigma_mm: float
    points: int
    theta_mm: float
    noise_hu: float


@dataclass(frozen=True)
class SokootiPreset:
    name: str
    frequencies: tuple[RandomDVF, ...]           # the fixed image's field: one of these, uniformly
    moving: RandomDVF                            # the field of a deformed moving image
    deformed_moving_fraction: float = 0.5        # pairs whose moving image is deformed first
    moving_noise_hu: float = 5.0                 # augmentation noise of an undeformed moving image
    reference: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_theta(self, theta_mm: float) -> SokootiPreset:
        """The same preset with every θ replaced (the capture-range experiments of the issue)."""
        from dataclasses import replace

        return replace(self, frequencies=tuple(replace(f, theta_mm=theta_mm) for f in self.frequencies),
                       moving=replace(self.moving, theta_mm=theta_mm), extra={**self.extra, "theta_mm": theta_mm})


PAPER = SokootiPreset(
    name="sokooti2017",
    frequencies=(RandomDVF("low", 35.0, 80, 8.0, 5.0), RandomDVF("medium", 25.0, 100, 8.0, 5.0),
                 RandomDVF("high", 20.0, 100, 8.0, 5.0)),
    moving=RandomDVF("moving", 35.0, 100, 8.0, 3.0),
    reference="Sokooti et al., MICCAI 2017, Sect. 2.2 (sigma, theta in mm; the paper's images are 1 mm isotropic)",
)
PRESETS = {PAPER.name: PAPER}


# --------------------------------------------------------------------------- random fields
def gaussian_weights(n: int, positions: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """``(n, P)``: weight of an impulse at ``positions`` (P,) on each of ``n`` voxels — the
    ``scipy.ndimage.gaussian_filter`` kernel (radius ``int(4σ + 0.5)``, normalised, zero beyond)."""
    radius = int(TRUNCATE * sigma_vox + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    norm = torch.exp(-0.5 * (taps / sigma_vox) ** 2).sum()
    dist = torch.arange(n, dtype=torch.float64)[:, None] - positions.to(torch.float64)[None, :]
    w = torch.exp(-0.5 * (dist / sigma_vox) ** 2) / norm
    return torch.where(dist.abs() <= radius, w, torch.zeros_like(w))


@dataclass
class DVFSample:
    points: torch.Tensor      # (P, 3) array indices (d, h, w) of the impulses
    values: torch.Tensor      # (P, 3) their displacements, mm, channels (i, j, k), within [-θ, θ]
    smoothed: torch.Tensor    # (3, D, H, W) the impulses smoothed with σ (before the rescaling)
    field: torch.Tensor       # (3, D, H, W) the training field, mm along the lattice axes (i, j, k)

    def raw(self) -> torch.Tensor:
        """The impulse field before smoothing ``(3, D, H, W)``."""
        shape = self.smoothed.shape[1:]
        out = torch.zeros((3, *shape), dtype=self.values.dtype)
        d, h, w = self.points.T
        out[:, d, h, w] = self.values.T
        return out


def random_dvf(shape: tuple[int, int, int], spacing_ijk, spec: RandomDVF, generator: torch.Generator) -> DVFSample:
    """A random field of kind ``spec`` on a ``(D, H, W)`` lattice with ``spacing_ijk`` mm (see the module text)."""
    d, h, w = (int(s) for s in shape)
    n = d * h * w
    count = min(int(spec.points), n)
    flat = torch.randperm(n, generator=generator)[:count]
    points = torch.stack((flat // (h * w), (flat // w) % h, flat % w), dim=1)
    values = (2.0 * torch.rand((count, 3), generator=generator, dtype=torch.float64) - 1.0) * spec.theta_mm
    sigma = [spec.sigma_mm / float(s) for s in spacing_ijk]                       # voxels along i, j, k
    gd = gaussian_weights(d, points[:, 0], sigma[2])
    gh = gaussian_weights(h, points[:, 1], sigma[1])
    gw = gaussian_weights(w, points[:, 2], sigma[0])
    # sum_p v[p, c] gd[x, p] gh[y, p] gw[z, p]: (3, D*H, P) @ (P, W)
    a = torch.einsum("xp,yp,pc->cxyp", gd, gh, values).reshape(3, d * h, count)
    smoothed = (a @ gw.T).reshape(3, d, h, w)
    peak_raw = values.abs().amax(dim=0)                                            # (3,)
    peak_smooth = smoothed.abs().flatten(1).amax(dim=1)
    scale = torch.where(peak_smooth > 0, peak_raw / peak_smooth.clamp(min=1e-300), torch.zeros_like(peak_raw))
    dvf = smoothed * scale.view(3, 1, 1, 1)
    return DVFSample(points, values.float(), smoothed.float(), dvf.float())


# --------------------------------------------------------------------------- cubic B-spline resampling
_POLE = math.sqrt(3.0) - 2.0
_TAPS = 16          # |pole|^16 < 1e-9


def _prefilter_kernel(dtype, device) -> torch.Tensor:
    k = torch.arange(-_TAPS, _TAPS + 1, dtype=torch.float64)
    h = (-6.0 * _POLE / (1.0 - _POLE**2)) * _POLE ** k.abs()
    return h.to(dtype=dtype, device=device).view(1, 1, -1)


def bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients ``(D, H, W)`` interpolating ``image`` ``(D, H, W)`` (mirror boundaries)."""
    kernel = _prefilter_kernel(image.dtype, image.device)
    x = image
    for axis in range(3):
        y = x.movedim(axis, -1)
        flat = y.reshape(-1, 1, y.shape[-1])
        n = flat.shape[-1]
        while flat.shape[-1] < n + 2 * _TAPS:                  # mirror as often as the kernel needs
            pad = min(_TAPS, flat.shape[-1] - 1, (n + 2 * _TAPS - flat.shape[-1] + 1) // 2)
            flat = F.pad(flat, (pad, pad), mode="reflect") if pad > 0 else F.pad(flat, (1, 1), mode="replicate")
        extra = (flat.shape[-1] - n) // 2
        flat = flat[..., extra - _TAPS : extra + n + _TAPS]
        x = F.conv1d(flat, kernel).reshape(y.shape).movedim(-1, axis)
    return x


def bspline_warp(image: torch.Tensor, u_vox: torch.Tensor) -> torch.Tensor:
    """``image`` ``(D, H, W)`` at ``x + u(x)`` with cubic B-spline interpolation; ``u_vox`` ``(3, D, H, W)``
    voxels, channels (i, j, k). Mirror boundaries (as ``scipy.ndimage.map_coordinates(mode="mirror")``) up to
    a voxel beyond the lattice; farther points take the border coefficients."""
    shape = image.shape
    m = 2                                                  # coefficients mirrored this far beyond the lattice
    coeff = F.pad(bspline_coefficients(image)[None, None], (m,) * 6, mode="reflect" if min(shape) > m else "replicate")
    axes = [torch.arange(s, dtype=image.dtype, device=image.device) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)                   # (3, D, H, W) d, h, w
    pos = grid + u_vox.flip(0)                                                         # channels d, h, w
    base = pos.floor()
    t = pos - base
    w0, w1 = (1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6
    w2, w3 = (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6
    g = (w0 + w1, w2 + w3)                                                             # weights of the 2 look-ups
    at = (base - 1 + m + w1 / g[0], base + 1 + m + w3 / g[1])                          # their positions
    size = torch.tensor(shape, dtype=image.dtype, device=image.device).view(3, 1, 1, 1) + 2 * m
    norm = [2.0 * a / (size - 1).clamp(min=1) - 1.0 for a in at]                       # align_corners=True
    out = torch.zeros(shape, dtype=image.dtype, device=image.device)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                xyz = torch.stack((norm[c][2], norm[b][1], norm[a][0]), dim=-1)[None]   # (1, D, H, W, 3) x=w
                look = F.grid_sample(coeff, xyz, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
                out += g[a][0] * g[b][1] * g[c][2] * look
    return out


def linear_warp(volume: torch.Tensor, u_vox: torch.Tensor) -> torch.Tensor:
    """Trilinear resampling of ``volume`` ``(D, H, W)`` at ``x + u(x)`` (masks)."""
    from DeepLungRegLib.fields import warp

    return warp(volume[None, None], u_vox[None], padding_mode="zeros")[0, 0]


# --------------------------------------------------------------------------- pairs
@dataclass
class SokootiPair:
    fixed: torch.Tensor       # (D, H, W) normalised intensities
    moving: torch.Tensor      # (D, H, W)
    dvf_mm: torch.Tensor      # (3, D, H, W) fixed -> moving, mm along the lattice axes (i, j, k)
    fixed_mask: torch.Tensor  # (D, H, W) bool, the lung mask carried onto the fixed image
    kind: str                 # e.g. "medium" or "medium+deformed moving"


def _noisy(x: torch.Tensor, noise_hu: float, generator: torch.Generator) -> torch.Tensor:
    if noise_hu <= 0:
        return x
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * (noise_hu / HU_WINDOW)
    return (x + noise).clamp(0.0, 1.0)


def make_pair(image: torch.Tensor, mask: torch.Tensor, spacing_ijk, preset: SokootiPreset,
              generator: torch.Generator) -> SokootiPair:
    """One training pair from a scan ``image`` ``(D, H, W)`` (normalised) with its lung ``mask``."""
    spacing = torch.tensor([float(s) for s in spacing_ijk], dtype=image.dtype).view(3, 1, 1, 1)
    moving, moving_mask = image, mask.to(image.dtype)
    deformed = bool(torch.rand((), generator=generator) < preset.deformed_moving_fraction)
    if deformed:
        pre = random_dvf(image.shape, spacing_ijk, preset.moving, generator).field / spacing
        moving = _noisy(bspline_warp(image, pre), preset.moving.noise_hu, generator)
        moving_mask = linear_warp(moving_mask, pre)
    else:
        moving = _noisy(image, preset.moving_noise_hu, generator)
    spec = preset.frequencies[int(torch.randint(len(preset.frequencies), (), generator=generator))]
    dvf = random_dvf(image.shape, spacing_ijk, spec, generator).field
    fixed = _noisy(bspline_warp(moving, dvf / spacing), spec.noise_hu, generator)
    fixed_mask = linear_warp(moving_mask, dvf / spacing) > 0.5
    return SokootiPair(fixed, moving, dvf, fixed_mask, spec.name + ("+deformed moving" if deformed else ""))


def flip_pair(fixed: torch.Tensor, moving: torch.Tensor, dvf: torch.Tensor, mask: torch.Tensor,
              axes: tuple[int, ...]):
    """Mirror a pair along array ``axes`` (0 = k, 1 = j, 2 = i); the field's component along a mirrored
    axis changes sign."""
    if not axes:
        return fixed, moving, dvf, mask
    dims = list(axes)
    dvf = dvf.flip([a + 1 for a in dims]).clone()
    for a in dims:
        dvf[2 - a] = -dvf[2 - a]
    return fixed.flip(dims), moving.flip(dims), dvf, mask.flip(dims)


def sample_centres(mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` random array indices (d, h, w) inside ``mask`` (anywhere when it is empty)."""
    return random_voxels(mask, n, generator)
