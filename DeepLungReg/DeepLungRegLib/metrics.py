"""Registration quality measures: TRE, Jacobian determinant, folding.

Units: points and displacements in LPS millimetres; fields as arrays ``(3, D, H, W)``
with components (x, y, z) in mm and axes ordered (k, j, i) as SimpleITK arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """Euclidean distance per landmark (mm) between mapped fixed points and moving points."""
    a, b = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise InputError(f"landmark arrays must both be (N, 3); got {a.shape} and {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, 95th percentile and maximum."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std()), "p95": float(np.percentile(v, 95)),
            "max": float(v.max()), "n": int(v.size)}


def jacobian_determinant(displacement_mm: np.ndarray, spacing: Sequence[float],
                         direction: Sequence[float] | None = None) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + d(x)``, central finite differences.

    ``displacement_mm`` is ``(3, D, H, W)`` (LPS mm, components x, y, z) sampled on a grid
    with ``spacing`` (sx, sy, sz) mm and ITK ``direction`` (row-major 3×3). One-sided
    differences at the borders.
    """
    d = np.asarray(displacement_mm, dtype=np.float64)
    if d.ndim != 4 or d.shape[0] != 3:
        raise InputError(f"displacement must be (3, D, H, W), got {d.shape}")
    # grads[c][a]: derivative of component c along array axis a (k, j, i), per voxel step.
    j_index = np.empty((3, 3) + d.shape[1:], dtype=np.float64)
    for c in range(3):
        gk, gj, gi = np.gradient(d[c], axis=(0, 1, 2))
        j_index[c, 0], j_index[c, 1], j_index[c, 2] = gi, gj, gk  # columns in (i, j, k) order
    m = np.asarray(direction if direction is not None else np.eye(3).ravel(), float).reshape(3, 3)
    m = m * np.asarray(spacing, float)[None, :]
    minv = np.linalg.inv(m)  # physical -> index
    # J = I + (d/d index) · minv, element by element (3×3 per voxel; cofactor expansion, vectorised)
    j = [[sum(j_index[c, n] * minv[n, p] for n in range(3) if minv[n, p] != 0.0) + (1.0 if c == p else 0.0)
          for p in range(3)] for c in range(3)]
    j = [[np.broadcast_to(v, d.shape[1:]) for v in row] for row in j]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def folding_percent(det: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Percentage of voxels (inside ``mask`` if given) with a non-positive Jacobian determinant."""
    v = det[mask.astype(bool)] if mask is not None else det.ravel()
    return float(100.0 * np.mean(v <= 0)) if v.size else 0.0


def std_log_jacobian(det: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> float:
    """Standard deviation of ``log(max(det, eps))`` (a smoothness measure; folding clipped)."""
    v = det[mask.astype(bool)] if mask is not None else det.ravel()
    return float(np.std(np.log(np.maximum(v, eps)))) if v.size else 0.0
