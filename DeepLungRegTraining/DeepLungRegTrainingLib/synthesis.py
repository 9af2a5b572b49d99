"""Synthetic training pairs from random cubic B-spline deformations.

Method: Eppenhof & Pluim, "Pulmonary CT registration through supervised learning with
convolutional neural networks", IEEE TMI 2018 (Table I ranges), with the presets of
Eppenhof et al., IEEE TMI 2019 for reuse.

Axes and directions (see :mod:`DeepLungRegLib.fields`): tensors are ``(B, C, D, H, W)``
with ``D`` = k (z, cranio-caudal for axial CT), ``H`` = j (y, anterior-posterior),
``W`` = i (x, left-right); displacement channels are ordered (x, y, z) = (i, j, k), in
voxels of the network grid. Ranges in the presets are stated, as in the paper, in voxels
of a 128³ grid and scaled by ``G / 128`` on a ``G³`` grid, so that a deformation has the
same size relative to the lungs at every grid size.

A pair is ``moving = I(T_aug(x))`` and ``fixed = I(T_aug(T_learned(x)))`` with the
transforms composed first and the image interpolated **once, trilinearly**. Hence
``fixed(x) = moving(T_learned(x))``: the target ``u = T_learned(x) - x`` maps fixed-grid
points to moving-grid points, the direction the network predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from DeepLungRegLib.fields import compose, resize_field, spline_prefilter, warp, warp_cubic
from DeepLungRegLib.splines import bspline_field, grid_point_field

REFERENCE_GRID = 128


@dataclass(frozen=True)
class BSplineLevel:
    """One random B-spline transform: ``points`` control points per axis, uniform
    displacement ranges ``±range_xyz`` (voxels of a 128³ grid) per axis."""

    points: int
    range_xyz: tuple[float, float, float]


@dataclass(frozen=True)
class SynthesisPreset:
    name: str
    augmentation: tuple[BSplineLevel, ...]     # composed into T_aug (applied to both images)
    learned: tuple[BSplineLevel, ...]          # composed into T_learned, outermost first
    gamma_range: tuple[float, float] = (0.5, 1.5)
    noise_std: float = 0.0                     # Gaussian noise added after gamma (intensity units)
    reference: str = ""
    #: what the sampled numbers are: "grid_points" — displacements *at* the grid points, interpolated by
    #: a cubic spline (the papers' meaning, their gryds library); "coefficients" — cubic B-spline
    #: coefficients (2.1-2.8x smaller fields for the same ranges, damped at the borders; DeepLungReg
    #: before 2026-11-24, kept to reproduce the first shipped model)
    control: str = "grid_points"
    image_order: int = 3                       # image interpolation: 3 cubic B-spline (the papers), 1 trilinear

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, SynthesisPreset] = {
    "eppenhof2018": SynthesisPreset(
        name="eppenhof2018",
        augmentation=(BSplineLevel(2, (3.2, 6.4, 12.8)),),
        # T_learned = T_coarse ∘ T_fine
        learned=(BSplineLevel(4, (3.2, 6.4, 12.8)), BSplineLevel(8, (3.2, 3.2, 3.2))),
        reference="Eppenhof & Pluim, IEEE TMI 2018, Table I",
    ),
    "eppenhof2018_coefficients": SynthesisPreset(
        name="eppenhof2018_coefficients",
        augmentation=(BSplineLevel(2, (3.2, 6.4, 12.8)),),
        learned=(BSplineLevel(4, (3.2, 6.4, 12.8)), BSplineLevel(8, (3.2, 3.2, 3.2))),
        reference="Table I ranges read as B-spline coefficients, trilinear images (the first shipped model)",
        control="coefficients", image_order=1,
    ),
    "eppenhof2019": SynthesisPreset(
        name="eppenhof2019",
        # Table I: T_1 on a 2³ grid, ±6.4 voxels along x, y and z (the 2018 paper: 3.2, 6.4, 12.8)
        augmentation=(BSplineLevel(2, (6.4, 6.4, 6.4)),),
        # T_2 = T_{2,1} ∘ T_{2,2}
        learned=(BSplineLevel(4, (3.2, 6.4, 12.8)), BSplineLevel(8, (3.2, 3.2, 3.2))),
        # section II-E: linear image interpolation; no gray-value (gamma) augmentation is described
        gamma_range=(1.0, 1.0), image_order=1,
        reference="Eppenhof et al., IEEE TMI 2019, Table I and section II-E",
    ),
}


def random_bspline_field(level: BSplineLevel, batch: int, shape: tuple[int, int, int],
                         generator: torch.Generator | None = None, device=None,
                         control: str = "grid_points", scale: float | Sequence[float] | None = None
                         ) -> torch.Tensor:
    """Random field of one preset level, in voxels of the ``shape`` (D, H, W) grid: uniform numbers in
    ``±range × scale`` read as grid point displacements or as B-spline coefficients (``control``, see
    :class:`SynthesisPreset`). ``scale``: one factor, or one per component (x, y, z); default
    ``(W, H, D) / 128`` (the ranges are voxels of a 128³ grid spanning the same box, so a component
    scales with the voxel count of its own axis)."""
    n = level.points
    if scale is None:
        scale = [shape[2] / REFERENCE_GRID, shape[1] / REFERENCE_GRID, shape[0] / REFERENCE_GRID]
    factors = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if factors.numel() not in (1, 3):
        raise ValueError("scale: one factor or three (x, y, z)")
    r = torch.tensor(level.range_xyz, dtype=torch.float32).view(1, 3, 1, 1, 1) * factors.view(1, -1, 1, 1, 1)
    u = torch.rand((batch, 3, n, n, n), generator=generator, dtype=torch.float32) * 2.0 - 1.0
    if control == "grid_points":
        return grid_point_field((u * r).to(device), shape)
    if control == "coefficients":
        return bspline_field((u * r).to(device), shape)
    raise ValueError(f"unknown control {control!r}")


def compose_levels(levels: tuple[BSplineLevel, ...], batch: int, shape: tuple[int, int, int],
                   generator: torch.Generator | None, device, control: str = "grid_points",
                   scale: float | Sequence[float] | None = None) -> torch.Tensor:
    """``T_1 ∘ T_2 ∘ ... ∘ T_n`` for the levels in order (outermost first)."""
    u = None
    for level in reversed(levels):
        v = random_bspline_field(level, batch, shape, generator, device, control, scale)
        u = v if u is None else compose(v, u)
    return u


def random_voxels(mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` random array indices (d, h, w) of voxels where ``mask`` (D, H, W) is nonzero, drawn with
    replacement (anywhere when the mask is empty)."""
    idx = torch.nonzero(mask.flatten()).flatten()
    if idx.numel() == 0:
        idx = torch.arange(mask.numel())
    flat = idx[torch.randint(idx.numel(), (n,), generator=generator)]
    h, w = mask.shape[1], mask.shape[2]
    return torch.stack((flat // (h * w), (flat // w) % h, flat % w), dim=1)


def random_gamma(img: torch.Tensor, gamma_range: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """``I ** a`` per batch item with ``a`` uniform in ``gamma_range`` (intensities in [0, 1])."""
    lo, hi = gamma_range
    a = torch.rand((img.shape[0], 1, 1, 1, 1), generator=generator) * (hi - lo) + lo
    return img.clamp(0.0, 1.0) ** a.to(img.device)


@dataclass
class SyntheticPair:
    fixed: torch.Tensor      # (B, 1, D, H, W) in [0, 1]
    moving: torch.Tensor     # (B, 1, D, H, W) in [0, 1]
    target: torch.Tensor     # (B, 3, D, H, W) voxels: fixed x -> moving x + target(x)
    mask: torch.Tensor       # (B, 1, D, H, W) float {0, 1}: lung mask warped by T_aug (nearest)


def make_pair(image: torch.Tensor, mask: torch.Tensor, preset: SynthesisPreset,
              generator: torch.Generator | None = None, field_scale: int | None = None,
              still: bool = False) -> SyntheticPair:
    """Make a batch of training pairs from images ``(B, 1, D, H, W)`` in [0, 1] and lung masks.

    Random numbers are drawn on the CPU from ``generator`` (reproducible on any device);
    all interpolation happens on ``image.device``. The smooth transforms are evaluated and
    composed on a grid ``field_scale`` times coarser (default 2 for grids of 96 and more,
    else 1) and upsampled trilinearly once; the image itself is interpolated once, at full
    resolution, with the upsampled composed field. ``still=True`` makes a pair without motion
    (``T_learned`` = identity, zero target; both images still augmented and independently gamma'd).
    """
    shape = tuple(image.shape[2:])
    b, device = image.shape[0], image.device
    if field_scale is None:
        field_scale = 2 if min(shape) >= 96 else 1
    fshape = tuple(max(s // field_scale, 2) for s in shape)
    # ranges in voxels of fshape, per component (x, y, z) along its own axis (W, H, D)
    scale = [shape[a] / REFERENCE_GRID * (fshape[a] - 1) / max(shape[a] - 1, 1) for a in (2, 1, 0)]
    u_aug = compose_levels(preset.augmentation, b, fshape, generator, device, preset.control, scale)
    u_learned = compose_levels(preset.learned, b, fshape, generator, device, preset.control, scale)
    if still:
        u_learned = torch.zeros_like(u_learned)
    u_total = compose(u_aug, u_learned)                       # T_aug ∘ T_learned
    if fshape != shape:
        u_aug, u_learned, u_total = (resize_field(u, shape) for u in (u_aug, u_learned, u_total))
    if preset.image_order == 3:
        coefficients = spline_prefilter(image)
        both = warp_cubic(torch.cat((coefficients, coefficients), dim=0), torch.cat((u_aug, u_total), dim=0))
    else:
        both = warp(torch.cat((image, image), dim=0), torch.cat((u_aug, u_total), dim=0))
    moving, fixed = both[:b], both[b:]
    moving = random_gamma(moving, preset.gamma_range, generator)
    fixed = random_gamma(fixed, preset.gamma_range, generator)
    if preset.noise_std > 0:
        moving = moving + preset.noise_std * torch.randn(moving.shape, generator=generator).to(device)
        fixed = fixed + preset.noise_std * torch.randn(fixed.shape, generator=generator).to(device)
    mask_w = warp(mask.float(), u_aug, mode="nearest")
    return SyntheticPair(fixed=fixed, moving=moving, target=u_learned, mask=mask_w)
