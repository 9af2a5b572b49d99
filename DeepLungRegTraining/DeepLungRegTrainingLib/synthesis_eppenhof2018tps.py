"""Synthetic training pairs of ``eppenhof2018tps`` (Eppenhof et al., SPIE Medical Imaging 2018, Sect. 2.4).

Every pair is made from one lung-cropped scan ``I`` on its network lattice by two random transforms:

* the *offset* ``T_off(x) = (1 + B) x + b``, a small random affine map applied to both images (data
  augmentation). The elements of ``B`` (dimensionless) and ``b`` (voxels) are drawn from a normal
  distribution of standard deviation 0.1 (the paper's N(0, 0.1), in voxel units). ``x`` are voxel
  coordinates ``(i, j, k)`` taken relative to the lattice centre (the paper does not say where the
  origin is; about the centre, ``B`` scales and shears the image without also shifting it by up to
  ``0.1 × 95`` voxels). ``b`` is stated for a 96³ lattice and scaled by ``G / 96`` per axis.
* the *learned* transform ``T_learned``: a thin-plate spline (:func:`DeepLungRegLib.tps.tps_field`) whose
  node displacements are uniform per component: x (right -> left) in ``[-1, 1]``, y (anterior <->
  posterior) in ``[-1, 1]``, z (inferior -> superior) in ``[-1, 5]`` voxels of a 96³ lattice (the
  paper's lung ranges: breathing moves the lungs mostly along z). On a lattice of ``G_a`` voxels
  along an axis the range is scaled by ``G_a / 96``, so the deformation has the same size relative to
  the lungs at every lattice size. The ranges are given along the LPS axes and turned into the
  lattice's channels ``(i, j, k)`` through the scan's direction matrix (for a scan whose ``k`` axis
  runs inferior, the k-range becomes ``[-5, 1]``).

Images: ``moving = I(T_off(x))`` and ``fixed = I(T_off(T_learned(x)))``, the two transforms composed
analytically (the offset is affine) and the image interpolated once, trilinearly, border values
repeated. Hence ``fixed(x) = moving(T_learned(x))``: the target, the node displacements of
``T_learned``, maps fixed points to moving points, as every DeepLungReg field. (The paper writes the
second image as ``I((T_learned ∘ T_offset)(x))``; with the offset applied last instead, the target is
exactly ``T_learned`` rather than ``T_learned`` up to its interaction with a small affine map.) No
intensity augmentation (the paper names none).

The loss needs no lung mask (the paper's MSE is over all grid nodes); the pair carries the scan's
lung mask in the fixed image's frame (``M(T_off(T_learned(x)))``, nearest neighbour) for validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from DeepLungRegLib.fields import identity_grid, warp
from DeepLungRegLib.tps import DEFAULT_KERNEL, tps_field

#: Lattice size (voxels per axis) the paper's ranges are stated for.
REFERENCE_GRID = 96


@dataclass(frozen=True)
class TPSPreset:
    """Ranges of the random transforms. ``range_xyz``: per LPS axis (x, y, z) the interval ``(lo, hi)`` of
    the node displacements, voxels of a 96³ lattice; ``affine_std``: standard deviation of the elements of
    ``B`` (dimensionless); ``translation_std``: of ``b`` (voxels of a 96³ lattice)."""

    name: str
    range_xyz: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    affine_std: float = 0.1
    translation_std: float = 0.1
    reference: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "units": "voxels of a 96^3 lattice, scaled by G/96 per axis; LPS axes x, y, z",
                "reference_grid": REFERENCE_GRID}


PRESETS: dict[str, TPSPreset] = {
    "eppenhof2018tps": TPSPreset(
        name="eppenhof2018tps",
        range_xyz=((-1.0, 1.0), (-1.0, 1.0), (-1.0, 5.0)),
        reference="Eppenhof et al., SPIE Medical Imaging 2018, Sect. 2.4-2.5",
    ),
}


def lattice_axes(direction: Sequence[float]) -> list[tuple[int, float]]:
    """For each lattice axis ``(i, j, k)``: the LPS axis (0, 1, 2 = x, y, z) it runs closest to and the
    sign of its direction along it (ITK's 9 row-major direction entries; columns are the index axes)."""
    m = np.asarray(direction, float).reshape(3, 3)
    out = []
    for c in range(3):
        a = int(np.argmax(np.abs(m[:, c])))
        out.append((a, 1.0 if m[a, c] >= 0 else -1.0))
    return out


def channel_ranges(preset: TPSPreset, direction: Sequence[float], shape: tuple[int, int, int]) -> torch.Tensor:
    """``(3, 2)`` node-displacement intervals ``(lo, hi)`` per channel ``(i, j, k)``, in voxels of a ``(D, H, W)``
    lattice with the given direction."""
    sizes = (shape[2], shape[1], shape[0])                               # voxels along i, j, k
    out = torch.zeros((3, 2), dtype=torch.float64)
    for c, (axis, sign) in enumerate(lattice_axes(direction)):
        lo, hi = preset.range_xyz[axis]
        lo, hi = (lo, hi) if sign > 0 else (-hi, -lo)
        scale = sizes[c] / REFERENCE_GRID
        out[c] = torch.tensor((lo * scale, hi * scale), dtype=torch.float64)
    return out


def random_nodes(preset: TPSPreset, nodes: tuple[int, int, int], shape: tuple[int, int, int],
                 direction: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """Node displacements ``(1, 3, nk, nj, ni)`` (voxels of the ``shape`` lattice, channels ``i, j, k``), each
    component uniform in its :func:`channel_ranges` interval (drawn on the CPU)."""
    r = channel_ranges(preset, direction, shape).float()
    u = torch.rand((1, 3, *nodes), generator=generator, dtype=torch.float32)
    lo, hi = r[:, 0].view(1, 3, 1, 1, 1), r[:, 1].view(1, 3, 1, 1, 1)
    return lo + u * (hi - lo)


def random_offset(preset: TPSPreset, shape: tuple[int, int, int],
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` ``(3, 3)`` and ``b`` ``(3,)`` of the offset ``x -> x + B (x - centre) + b`` (voxel coordinates
    ``(i, j, k)``; ``b`` in voxels of the ``shape`` lattice), drawn on the CPU."""
    mat = torch.randn((3, 3), generator=generator, dtype=torch.float32) * preset.affine_std
    sizes = torch.tensor((shape[2], shape[1], shape[0]), dtype=torch.float32)
    b = torch.randn((3,), generator=generator, dtype=torch.float32) * preset.translation_std * sizes / REFERENCE_GRID
    return mat, b


def affine_displacement(mat: torch.Tensor, b: torch.Tensor, shape: tuple[int, int, int], device=None) -> torch.Tensor:
    """``(1, 3, D, H, W)`` displacement ``B (x - centre) + b`` of the affine map (voxels, channels ``i, j, k``)."""
    x = identity_grid(shape, device=device)
    centre = torch.tensor(((shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2), device=x.device)
    return (torch.einsum("rc,c...->r...", mat.to(x.device), x - centre.view(3, 1, 1, 1)) +
            b.to(x.device).view(3, 1, 1, 1))[None]


@dataclass
class TPSPair:
    fixed: torch.Tensor        # (1, 1, D, H, W) in [0, 1]: I(T_off(T_learned(x)))
    moving: torch.Tensor       # (1, 1, D, H, W) in [0, 1]: I(T_off(x))
    nodes: torch.Tensor        # (1, 3, nk, nj, ni) the target: node displacements of T_learned (voxels, i, j, k)
    u_learned: torch.Tensor    # (1, 3, D, H, W) dense T_learned(x) - x: fixed -> moving
    u_offset: torch.Tensor     # (1, 3, D, H, W) dense T_off(x) - x
    mask: torch.Tensor         # (1, 1, D, H, W) float {0, 1}: lung mask in the fixed image's frame
    offset: tuple[torch.Tensor, torch.Tensor]   # (B, b) of T_off


def make_pair(image: torch.Tensor, mask: torch.Tensor, direction: Sequence[float], preset: TPSPreset,
              nodes: tuple[int, int, int], generator: torch.Generator | None = None,
              kernel: str = DEFAULT_KERNEL) -> TPSPair:
    """One training pair from a scan ``image`` ``(1, 1, D, H, W)`` in [0, 1] and its lung ``mask`` (same shape)
    on a lattice with ITK ``direction``, with an ``(nk, nj, ni)`` TPS node lattice.

    Random numbers come from ``generator`` on the CPU (the same pair on any device); the fields and the
    interpolation are computed on ``image.device``.
    """
    shape = tuple(int(s) for s in image.shape[2:])
    device = image.device
    target = random_nodes(preset, nodes, shape, direction, generator)
    mat, b = random_offset(preset, shape, generator)
    u_learned = tps_field(target.to(device), shape, kernel)
    u_offset = affine_displacement(mat, b, shape, device)
    # T_off(T_learned(x)) - x = u_learned + B (x + u_learned - centre) + b
    u_total = u_learned + u_offset + torch.einsum("rc,bc...->br...", mat.to(device), u_learned)
    both = warp(torch.cat((image, image)), torch.cat((u_offset, u_total)))
    mask_fixed = warp(mask.float(), u_total, mode="nearest")
    return TPSPair(fixed=both[1:], moving=both[:1], nodes=target.to(device), u_learned=u_learned,
                   u_offset=u_offset, mask=mask_fixed, offset=(mat, b))
