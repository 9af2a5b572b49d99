"""Spline displacement fields shared by training (synthetic deformations) and inference.

Cubic B-spline fields on a regular control lattice whose first and last control points sit
on the first and last voxel centres of the dense grid (the ``align_corners`` convention of
:mod:`DeepLungRegLib.geometry`). Tensors: control values ``(B, 3, Nk, Nj, Ni)`` and dense
fields ``(B, 3, D, H, W)``, in whatever unit the control values carry (voxels or mm).
"""

from __future__ import annotations

import torch


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
