"""Random breathing-like training pairs on a network lattice, with exact keypoint pairs.

The same motion model as the project's breathing simulator (:mod:`DeepLungRegLib.simulation`,
used for evaluation pairs; one function, :func:`~DeepLungRegLib.simulation.breathing_motion_mm`) — cranio-caudal motion largest at the lung bases, anterior-posterior
and lateral expansion, sliding at the pleura, a mass-preserving density change — but with
randomised parameters and computed in torch on the lattice of a prepared scan, so that a pair
costs milliseconds instead of seconds.

Frames: the scan is ``(1, 1, D, H, W)`` on a :class:`~DeepLungRegLib.geometry.Lattice` whose
direction cosines define LPS (+x left, +y posterior, +z superior); fields are in voxels of that
lattice (channels ``i, j, k``). ``v`` maps the *moving* grid to the fixed one
(``moving(y) = fixed(y + v(y))``, exhale-like moving from an inhale-like fixed); the pair's
fixed -> moving target is the inverse ``u`` (``u(x) = -v(x + u(x))``, fixed-point iteration).
With probability ``swap_probability`` the roles are exchanged (fixed = exhale, moving = inhale,
target ``v``), so that networks see both breathing directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from DeepLungRegLib.fields import physical_to_voxel, voxel_to_physical, warp
from DeepLungRegLib.geometry import Lattice
from DeepLungRegLib.losses import jacobian_determinant
from DeepLungRegLib.refine import gaussian_blur
from DeepLungRegLib.simulation import breathing_motion_mm

from .synthesis import random_voxels


@dataclass(frozen=True)
class BreathingRanges:
    """Uniform ranges of the random breathing parameters (mm unless stated)."""

    amplitude_base: tuple[float, float] = (5.0, 35.0)     # cranio-caudal at the lung bases
    apex_fraction: tuple[float, float] = (0.0, 0.25)      # cranio-caudal at the apices / at the bases
    amplitude_ap: tuple[float, float] = (0.0, 8.0)        # anterior-posterior, at the anterior wall
    amplitude_lateral: tuple[float, float] = (0.0, 5.0)   # outward at the lateral borders
    sigma_inplane_mm: tuple[float, float] = (2.0, 8.0)    # sharpness of sliding at the pleura
    sigma_z_mm: tuple[float, float] = (10.0, 25.0)        # abdominal organs following the diaphragm
    outside_fraction: tuple[float, float] = (0.05, 0.3)   # motion outside the lungs / inside
    swap_probability: float = 0.5
    still_probability: float = 0.1    # pairs without motion (the same scan, independent noise): teaches zero
    inverse_iterations: int = 15

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BreathingPair:
    fixed: torch.Tensor          # (1, 1, D, H, W) intensities as the input scan
    moving: torch.Tensor
    fixed_mask: torch.Tensor     # (1, 1, D, H, W) float in [0, 1]
    moving_mask: torch.Tensor
    target: torch.Tensor         # (1, 3, D, H, W) voxels: fixed x -> moving x + target(x)
    fixed_points: torch.Tensor   # (K, 3) voxel indices (i, j, k) in the fixed lattice
    moving_points: torch.Tensor  # (K, 3) their exact partners in the moving lattice
    params: dict


def _uniform(rng: tuple[float, float], g: torch.Generator) -> float:
    return float(rng[0] + (rng[1] - rng[0]) * torch.rand((), generator=g))


def _index_matrix(lattice: Lattice) -> torch.Tensor:
    return torch.as_tensor(lattice.index_matrix(), dtype=torch.float32)


def breathing_field(mask: torch.Tensor, lattice: Lattice, p: dict) -> torch.Tensor:
    """``v`` (1, 3, D, H, W) in lattice voxels, moving -> fixed, for the parameters ``p`` (see
    :class:`BreathingRanges` for their meaning; ``amplitude_apex`` in mm)."""
    d, h, w = mask.shape[2:]
    m = _index_matrix(lattice)                                         # index (i, j, k) -> LPS offset
    kk, jj, ii = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    idx = torch.stack((ii, jj, kk), 0).float().reshape(3, -1)
    pts = (m @ idx).reshape(3, d, h, w)                                # LPS mm relative to the origin
    inside = mask[0, 0] > 0.5
    if not inside.any():
        inside = torch.ones_like(inside)
    lo = pts[:, inside].amin(1)
    hi = pts[:, inside].amax(1)
    vx, vy, vz = breathing_motion_mm(*pts, lo, hi, p["amplitude_base"], p["amplitude_apex"], p["amplitude_ap"],
                                     p["amplitude_lateral"])
    spacing = lattice.spacing
    weight = gaussian_blur(mask.float(), (p["sigma_inplane_mm"] / spacing[0], p["sigma_inplane_mm"] / spacing[1],
                                          p["sigma_z_mm"] / spacing[2]))[0, 0]
    weight = (weight / weight.max().clamp(min=1e-6)).clamp(0, 1)
    weight = p["outside_fraction"] + (1 - p["outside_fraction"]) * weight
    v_mm = torch.stack((vx, vy, vz), 0)[None] * weight
    return physical_to_voxel(v_mm, lattice.spacing, lattice.direction)


def invert(v: torch.Tensor, iterations: int = 15) -> torch.Tensor:
    """``u`` with ``u(x) = -v(x + u(x))`` (the inverse of ``Id + v``), by fixed-point iteration."""
    u = -v
    for _ in range(iterations):
        u = -warp(v, u)
    return u


def sample_points(mask: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random voxel indices (i, j, k) (float) inside ``mask`` (1, 1, D, H, W) (anywhere if empty)."""
    return random_voxels(mask[0, 0] > 0.5, n, g).flip(1).float()


def sample_field(u: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear values (K, C) of ``u`` (1, C, D, H, W) at voxel indices ``points`` (K, 3) (i, j, k)."""
    d, h, w = u.shape[2:]
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1), 2.0 / max(d - 1, 1)], dtype=u.dtype)
    grid = (points.to(u.dtype) * scale.to(u.device) - 1.0).view(1, 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(u.shape[1], -1).t()


def make_breathing_pair(image: torch.Tensor, mask: torch.Tensor, lattice: Lattice, ranges: BreathingRanges,
                        g: torch.Generator, n_points: int = 500, amplitude: float | None = None,
                        swap: bool | None = None, noise_std: float = 0.01) -> BreathingPair:
    """A random breathing pair from one scan ``image`` (1, 1, D, H, W) in [0, 1] (HU window) and its
    lung ``mask``; ``amplitude``/``swap`` fix those draws (validation pairs; a given amplitude is
    never replaced by a still pair)."""
    base = amplitude if amplitude is not None else _uniform(ranges.amplitude_base, g)
    p = {"amplitude_base": base, "amplitude_apex": base * _uniform(ranges.apex_fraction, g),
         "amplitude_ap": _uniform(ranges.amplitude_ap, g), "amplitude_lateral": _uniform(ranges.amplitude_lateral, g),
         "sigma_inplane_mm": _uniform(ranges.sigma_inplane_mm, g), "sigma_z_mm": _uniform(ranges.sigma_z_mm, g),
         "outside_fraction": _uniform(ranges.outside_fraction, g)}
    still = bool(torch.rand((), generator=g) < ranges.still_probability)
    if amplitude is None and still:
        p.update(amplitude_base=0.0, amplitude_apex=0.0, amplitude_ap=0.0, amplitude_lateral=0.0)
    swapped = bool(torch.rand((), generator=g) < ranges.swap_probability) if swap is None else swap
    p["swapped"] = swapped
    v = breathing_field(mask, lattice, p)
    v_mm = voxel_to_physical(v, lattice.spacing, lattice.direction)
    det = jacobian_determinant(v_mm, lattice.spacing, lattice.direction)
    inhale, mask = image.float(), mask.float()
    lung_ex = warp(mask, v)
    exhale = warp(inhale, v)
    exhale = torch.where(lung_ex > 0.5, (exhale * det).clamp(0, 1), exhale)  # (HU + 1000) scales with det
    u = invert(v, ranges.inverse_iterations)
    pts_in = sample_points(mask, n_points, g)
    pts_ex = pts_in + sample_field(u, pts_in)
    if noise_std > 0:
        inhale = inhale + noise_std * torch.randn(inhale.shape, generator=g)
        exhale = exhale + noise_std * torch.randn(exhale.shape, generator=g)
    if swapped:
        return BreathingPair(exhale, inhale, lung_ex, mask, v, pts_ex, pts_in, p)
    return BreathingPair(inhale, exhale, mask, lung_ex, u, pts_in, pts_ex, p)
