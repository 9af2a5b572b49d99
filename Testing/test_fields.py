"""Tensor field operations: warp direction, composition, unit conversion."""

import numpy as np
import torch
from DeepLungRegLib.fields import (
    compose,
    identity_grid,
    physical_to_voxel,
    resize_field,
    voxel_to_physical,
    warp,
)


def test_warp_samples_at_p_plus_u():
    img = identity_grid((6, 7, 8))[0:1].unsqueeze(0)  # value = i index
    u = torch.zeros(1, 3, 6, 7, 8)
    u[:, 0] = 1.5  # along i
    out = warp(img, u)
    # interior voxels read the i index 1.5 further on
    assert torch.allclose(out[0, 0, :, :, :5], img[0, 0, :, :, :5] + 1.5, atol=1e-5)


def test_warp_along_k_axis_uses_channel_2():
    img = identity_grid((9, 5, 5))[2:3].unsqueeze(0)  # value = k index
    u = torch.zeros(1, 3, 9, 5, 5)
    u[:, 2] = -2.0
    out = warp(img, u)
    assert torch.allclose(out[0, 0, 3:], img[0, 0, 3:] - 2.0, atol=1e-5)


def test_compose_of_translations_adds_and_order_matters_for_nonlinear():
    shape = (8, 8, 8)
    a = torch.zeros(1, 3, *shape)
    a[:, 0] = 1.0
    b = torch.zeros(1, 3, *shape)
    b[:, 1] = 2.0
    c = compose(a, b)
    assert torch.allclose(c[:, 0], torch.ones(1, *shape)) and torch.allclose(c[:, 1], 2 * torch.ones(1, *shape))
    # outer field varying along j: value read at x + inner(x)
    outer = torch.zeros(1, 3, *shape)
    outer[:, 0] = identity_grid(shape)[1] * 0.1  # u_i = 0.1 * j
    inner = torch.zeros(1, 3, *shape)
    inner[:, 1] = 1.0  # shift along j
    comp = compose(outer, inner)
    expected = 0.1 * (identity_grid(shape)[1] + 1.0)
    assert torch.allclose(comp[0, 0, :, :6], expected[:, :6], atol=1e-5)


def test_voxel_physical_round_trip_with_oblique_direction():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    u = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    spacing = (0.7, 1.3, 2.5)
    d = voxel_to_physical(u, spacing, q.ravel())
    # one voxel step along i with spacing 0.7 is 0.7 mm along the first direction column
    e = torch.zeros(1, 3, 1, 1, 1, dtype=torch.float64)
    e[0, 0] = 1.0
    np.testing.assert_allclose(voxel_to_physical(e, spacing, q.ravel())[0, :, 0, 0, 0].numpy(), 0.7 * q[:, 0])
    assert torch.allclose(physical_to_voxel(d, spacing, q.ravel()), u)


def test_resize_field_keeps_physical_displacement():
    u = torch.zeros(1, 3, 9, 9, 9)
    u[:, 0] = 2.0  # 2 voxels of a 9-voxel grid span 2/8 of the box = 1 voxel of a 5-voxel grid
    v = resize_field(u, (5, 5, 5))
    assert torch.allclose(v[:, 0], torch.full((1, 5, 5, 5), 1.0))
