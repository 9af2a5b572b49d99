"""The conventions every module follows, stated once.

* **Physical space** is ITK's: LPS millimetres (x to the patient's left, y posterior, z
  superior). Slicer's RAS appears only at the Slicer edge (``slicer_io``) and in Slicer
  landmark files (``io``).
* **Image index** ``(i, j, k)`` as in ITK; a point is ``origin + M @ (i, j, k)`` with
  ``M = direction @ diag(spacing)`` (:meth:`Lattice.index_matrix`).
* **Arrays and tensors** are ordered ``(k, j, i)`` (SimpleITK's ``GetArrayFromImage``):
  a volume tensor is ``(B, C, D, H, W)`` with ``D`` along ``k``.
* **Vector channels** are ordered ``(i, j, k)`` for fields in voxel units and ``(x, y, z)``
  for fields in LPS mm: ``d_mm = M @ u_vox``.
* **Fields map fixed to moving**: ``p -> p + u(p)``, the resampling direction (an ITK
  transform), so warping the moving image with ``u`` lands it on the fixed grid.
* **Lattices** put their first and last node *centres* on the corners of their box
  (``align_corners=True`` in torch): two lattices over the same box at different sizes
  are related by :func:`torch.nn.functional.interpolate` with ``align_corners=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Lattice:
    """A ``size`` lattice (i, j, k order) with ITK geometry: the network grid, the refine
    lattices and the stored displacement lattice are all of this type."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(D, H, W)`` = size in ``(k, j, i)`` order."""
        return (int(self.size[2]), int(self.size[1]), int(self.size[0]))

    @property
    def extent_mm(self) -> np.ndarray:
        """Distance (mm) between the first and last node along each index axis (i, j, k)."""
        return (np.asarray(self.size) - 1) * np.asarray(self.spacing)

    def index_matrix(self) -> np.ndarray:
        """``M = direction @ diag(spacing)``: index steps (columns i, j, k) in LPS mm."""
        return index_matrix(self.direction, self.spacing)

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) continuous indices (i, j, k) -> (N, 3) LPS mm."""
        return np.asarray(self.origin)[None, :] + np.asarray(index, float) @ self.index_matrix().T

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous indices (i, j, k)."""
        return (np.asarray(points, float) - np.asarray(self.origin)[None, :]) @ np.linalg.inv(self.index_matrix()).T

    def resized(self, spacing_mm: float, min_nodes: int = 4) -> Lattice:
        """A lattice over the same box with about ``spacing_mm`` between nodes."""
        n = np.maximum(np.round(self.extent_mm / spacing_mm).astype(int) + 1, min_nodes)
        return Lattice(self.origin, tuple((self.extent_mm / (n - 1)).tolist()), self.direction,
                       tuple(int(v) for v in n))

    def reference(self, pixel=sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for ``sitk.Resample``)."""
        img = sitk.Image([int(s) for s in self.size], pixel)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        return img

    def to_dict(self) -> dict:
        return {"origin": list(self.origin), "spacing": list(self.spacing),
                "direction": list(self.direction), "size": list(self.size)}


def index_matrix(direction, spacing) -> np.ndarray:
    """``direction @ diag(spacing)`` from ITK's 9 row-major direction entries and (s_i, s_j, s_k)."""
    return np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)[None, :]


def image_lattice(img: sitk.Image) -> Lattice:
    """The lattice of a SimpleITK image's voxel centres."""
    return Lattice(tuple(img.GetOrigin()), tuple(img.GetSpacing()), tuple(img.GetDirection()),
                   tuple(int(s) for s in img.GetSize()))
