"""Shared cubic B-spline field evaluation."""

import pytest
import torch
from DeepLungRegLib.splines import bspline_basis, bspline_field, cubic_bspline


def test_kernel_values_and_partition_of_unity_inside():
    assert float(cubic_bspline(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(2 / 3)
    assert float(cubic_bspline(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(1 / 6)
    assert float(cubic_bspline(torch.tensor(2.0))) == 0.0
    b = bspline_basis(41, 11, dtype=torch.float64)   # control spacing 4 voxels
    inner = b[4:-4].sum(1)                            # at least one control point beyond on each side
    assert torch.allclose(inner, torch.ones_like(inner))


def test_field_reproduces_linear_control_values_inside_and_is_separable():
    nk, nj, ni = 6, 7, 8
    k = torch.arange(nk, dtype=torch.float64).view(nk, 1, 1).expand(nk, nj, ni)
    coeff = torch.stack((0.5 * k, torch.zeros_like(k), torch.ones_like(k)))[None]  # (1, 3, nk, nj, ni)
    d, h, w = 26, 13, 15
    u = bspline_field(coeff, (d, h, w))
    assert u.shape == (1, 3, d, h, w)
    step = (d - 1) / (nk - 1)                          # voxels between control points along k
    kk = torch.arange(d, dtype=torch.float64)
    inner = (kk >= step) & (kk <= d - 1 - step)
    expected = 0.5 * kk / step                          # linear in the control index
    assert torch.allclose(u[0, 0, inner, 6, 7], expected[inner], atol=1e-12)
    assert torch.allclose(u[0, 1], torch.zeros_like(u[0, 1]))
