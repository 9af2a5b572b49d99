"""From a network field to ITK transforms that Slicer and SimpleITK open unchanged.

The written transform maps **fixed-image physical points to moving-image physical
points** (LPS mm), the direction ITK uses to resample the moving image onto the fixed
grid (and Slicer's ``FromParent`` direction):

    T(x) = A(x + d(x))

``A`` is the affine pre-alignment and ``d`` the network displacement in mm, stored as a
``DisplacementFieldTransform`` on a lattice that extends the network grid by a few nodes
on every side. Inside the box the lattice nodes coincide with the field's nodes (stride 1),
so ITK's linear interpolation reproduces the trilinear upsampling of the field exactly; in
the padding ring (wide enough not to fold, :func:`taper_nodes`) the field is the border value
tapered linearly to zero, so ``T`` is continuous everywhere (``d = 0`` outside the lattice).
The file is an ITK composite transform (``[A, d]``, ``d`` applied first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .fields import voxel_to_physical
from .preprocessing import NetworkGrid


@dataclass
class OutputField:
    displacement_mm: np.ndarray  # (3, D, H, W) LPS mm on ``lattice``
    lattice: NetworkGrid


#: The padding ring is at least this many nodes wide ...
MIN_PAD_NODES = 4
#: ... and at least this many times the largest displacement on the lattice border (mm / mm), so the
#: taper to zero keeps |∂d/∂x| <= 1/2.5 and cannot fold the transform outside the lattice.
TAPER_PER_MM = 2.5


def taper_nodes(u_vox: torch.Tensor, grid: NetworkGrid, stride: int = 1) -> int:
    """Width (nodes of the output lattice) of the ring in which ``u_vox`` is tapered to zero."""
    d = voxel_to_physical(u_vox.detach().double().cpu(), grid.spacing, grid.direction)[0].norm(dim=0)
    border = max(float(d[[0, -1]].max()), float(d[:, [0, -1]].max()), float(d[:, :, [0, -1]].max()))
    step_mm = float(min(grid.spacing)) * stride
    return max(MIN_PAD_NODES, int(np.ceil(TAPER_PER_MM * border / step_mm)))


def output_field(u_vox: torch.Tensor, grid: NetworkGrid, pad: int | None = None, stride: int = 1) -> OutputField:
    """Resample the field ``u_vox`` (1, 3, D, H, W) on ``grid`` onto the padded output lattice.

    ``pad`` nodes are added on every side, in which the border value tapers linearly to zero
    (default: :func:`taper_nodes`). ``stride`` > 1 makes a coarser lattice spanning the same box
    (smaller file, non-zero interpolation error that :func:`mapping_error` measures).
    """
    if pad is None:
        pad = taper_nodes(u_vox, grid, stride)
    g = np.asarray(grid.size)  # (i, j, k)
    n_in = (g - 1) // stride + 1
    step = (g - 1) / (n_in - 1)                       # lattice step in network voxels
    axes = [torch.arange(-pad, int(n) + pad, dtype=torch.float64) * s for n, s in zip(n_in, step, strict=True)]
    # Network-index coordinates of every lattice node, and the taper outside [0, G-1].
    ii, jj, kk = axes
    def taper(x: torch.Tensor, n: int, s: float) -> torch.Tensor:
        outside = torch.clamp(-x, min=0) + torch.clamp(x - (n - 1), min=0)
        return torch.clamp(1.0 - outside / (pad * s), min=0.0) if pad > 0 else (outside == 0).double()
    wi, wj, wk = taper(ii, g[0], step[0]), taper(jj, g[1], step[1]), taper(kk, g[2], step[2])
    weight = wk[:, None, None] * wj[None, :, None] * wi[None, None, :]
    kk3, jj3, ii3 = torch.meshgrid(kk, jj, ii, indexing="ij")
    pos = torch.stack((ii3, jj3, kk3), dim=-1)        # (D, H, W, 3) in (i, j, k)
    norm = 2.0 * pos / torch.as_tensor(g - 1, dtype=torch.float64) - 1.0
    sampled = F.grid_sample(u_vox.detach().double().cpu(), norm[None], mode="bilinear",
                            padding_mode="border", align_corners=True)
    sampled = sampled * weight[None, None]
    d_mm = voxel_to_physical(sampled, grid.spacing, grid.direction)[0].numpy()
    m = np.asarray(grid.direction).reshape(3, 3)
    spacing = np.asarray(grid.spacing) * step
    origin = np.asarray(grid.origin) - m @ (spacing * pad)
    size = tuple(int(len(a)) for a in axes)
    lattice = NetworkGrid(tuple(origin.tolist()), tuple(spacing.tolist()), grid.direction, size)
    return OutputField(d_mm, lattice)


def displacement_transform(field: OutputField) -> sitk.DisplacementFieldTransform:
    """ITK displacement field transform (float64 vectors, linear interpolation)."""
    arr = np.ascontiguousarray(np.moveaxis(field.displacement_mm, 0, -1), dtype=np.float64)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetOrigin(field.lattice.origin)
    img.SetSpacing(field.lattice.spacing)
    img.SetDirection(field.lattice.direction)
    return sitk.DisplacementFieldTransform(img)


def full_transform(affine: sitk.Transform, field: OutputField | None) -> sitk.CompositeTransform:
    """``T(x) = A(x + d(x))`` as an ITK composite transform (SimpleITK applies the last one first)."""
    parts = [sitk.AffineTransform(affine) if isinstance(affine, sitk.AffineTransform) else affine]
    if field is not None:
        parts.append(displacement_transform(field))
    return sitk.CompositeTransform(parts)


def transform_points(tx: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.asarray([tx.TransformPoint(tuple(float(c) for c in p)) for p in np.asarray(points, float)])


def reference_mapping(points: np.ndarray, u_vox: torch.Tensor, grid: NetworkGrid,
                      affine: sitk.Transform) -> np.ndarray:
    """The mapping the network predicts, evaluated with trilinear upsampling of ``u_vox``
    at arbitrary points (no lattice, no file): ``A(x + u_mm(x))``. Points outside the
    network box get the border value; the written transform tapers there instead, so
    compare the two inside the box (the lung points the report uses are)."""
    pts = np.asarray(points, float)
    idx = grid.lps_to_index(pts)  # (N, 3) i, j, k
    g = np.asarray(grid.size)
    norm = torch.as_tensor(2.0 * idx / (g - 1) - 1.0, dtype=torch.float64).view(1, 1, 1, -1, 3)
    u = F.grid_sample(u_vox.detach().double().cpu(), norm, mode="bilinear", padding_mode="border",
                      align_corners=True)[0, :, 0, 0, :]  # (3, N) voxels
    d = (grid.index_matrix() @ u.numpy()).T
    return transform_points(affine, pts + d)


def mapping_error(tx: sitk.Transform, points: np.ndarray, u_vox: torch.Tensor, grid: NetworkGrid,
                  affine: sitk.Transform) -> dict[str, float]:
    """Distance (mm) between the written transform and the upsampled prediction at ``points``."""
    if len(points) == 0:
        return {"mean": 0.0, "max": 0.0, "n": 0}
    err = np.linalg.norm(transform_points(tx, points) - reference_mapping(points, u_vox, grid, affine), axis=1)
    return {"mean": float(err.mean()), "max": float(err.max()), "n": int(len(err))}
