"""Spline displacement fields shared by training (synthetic deformations) and inference.

Cubic B-spline fields on a regular control lattice whose first and last control points sit
on the first and last voxel centres of the dense grid (the ``align_corners`` convention of
:mod:`DeepLungRegLib.geometry`). Tensors: control values ``(B, 3, Nk, Nj, Ni)`` and dense
fields ``(B, 3, D, H, W)``, in whatever unit the control values carry (voxels or mm).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import ndimage


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel β³(t), support |t| < 2."""
    a = t.abs()
    return torch.where(a < 1, 2.0 / 3.0 - a**2 + a**3 / 2.0,
                       torch.where(a < 2, (2.0 - a) ** 3 / 6.0, torch.zeros_like(a)))


def bspline_basis(n_voxels: int, n_points: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n_voxels, n_points)`` weights of control points evenly spread from the first
    to the last voxel centre (spacing ``(n_voxels - 1) / (n_points - 1)``)."""
    x = torch.arange(n_voxels, device=device, dtype=dtype)[:, None]
    h = (n_voxels - 1) / max(n_points - 1, 1)
    c = torch.arange(n_points, device=device, dtype=dtype)[None, :] * h
    return cubic_bspline((x - c) / h)


def bspline_field(coefficients: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense field ``(B, 3, D, H, W)`` from control displacements ``(B, 3, Nk, Nj, Ni)``.

    Separable evaluation: one small contraction per axis (no dense intermediate).
    """
    _, _, nk, nj, ni = coefficients.shape
    d, h, w = shape
    bk = bspline_basis(d, nk, coefficients.device, coefficients.dtype)
    bj = bspline_basis(h, nj, coefficients.device, coefficients.dtype)
    bi = bspline_basis(w, ni, coefficients.device, coefficients.dtype)
    x = torch.einsum("bcpqr,wr->bcpqw", coefficients, bi)
    x = torch.einsum("bcpqw,hq->bcphw", x, bj)
    return torch.einsum("bcphw,dp->bcdhw", x, bk)


@functools.lru_cache(maxsize=64)
def _interpolating_basis_np(n_voxels: int, n_points: int) -> np.ndarray:
    """``(n_voxels, n_points)``: column ``p`` is the cubic interpolating spline (mirror boundary) through
    the unit vector ``e_p`` of the grid values, sampled at the voxel centres."""
    x = np.arange(n_voxels, dtype=np.float64) * (n_points - 1) / max(n_voxels - 1, 1)
    eye = np.eye(n_points)
    return np.stack([ndimage.map_coordinates(eye[p], x[None], order=3, mode="mirror") for p in range(n_points)], 1)


def interpolating_basis(n_voxels: int, n_points: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n_voxels, n_points)`` weights that give the dense values of a cubic spline *interpolating* the
    values of ``n_points`` grid points evenly spread from the first to the last voxel centre.

    This is the meaning of "grid point displacements" in Eppenhof & Pluim (IEEE TMI 2018) and their
    ``gryds`` library: the sampled values are the displacements *at* the grid points (third-order
    spline interpolation with mirrored borders), not B-spline coefficients. The field therefore passes
    through the sampled values (it is not damped at the borders) and is about twice as large as a
    B-spline field with the same numbers as coefficients.
    """
    if n_points == 1:
        return torch.ones((n_voxels, 1), device=device, dtype=dtype)
    # a copy: as_tensor would share the cached array's memory for float64 on the CPU
    return torch.tensor(_interpolating_basis_np(n_voxels, n_points), device=device, dtype=dtype)


def grid_point_field(values: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense field ``(B, 3, D, H, W)`` interpolating grid point displacements ``(B, 3, Nk, Nj, Ni)``
    (see :func:`interpolating_basis`); unit as the values."""
    _, _, nk, nj, ni = values.shape
    d, h, w = shape
    bk = interpolating_basis(d, nk, values.device, values.dtype)
    bj = interpolating_basis(h, nj, values.device, values.dtype)
    bi = interpolating_basis(w, ni, values.device, values.dtype)
    x = torch.einsum("bcpqr,wr->bcpqw", values, bi)
    x = torch.einsum("bcpqw,hq->bcphw", x, bj)
    return torch.einsum("bcphw,dp->bcdhw", x, bk)
