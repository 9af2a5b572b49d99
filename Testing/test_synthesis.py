"""Synthetic pair generator (Eppenhof & Pluim 2018): direction, ranges, masks, no folding."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from DeepLungRegLib.fields import warp
from DeepLungRegLib.metrics import jacobian_determinant
from DeepLungRegLib.splines import bspline_basis
from DeepLungRegTrainingLib.synthesis import (
    PRESETS,
    BSplineLevel,
    make_pair,
    random_bspline_field,
)


def smooth_volume(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *(s // 4 for s in shape)), generator=g)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=True)


def no_gamma(preset):
    return dataclasses.replace(preset, gamma_range=(1.0, 1.0))


@pytest.mark.parametrize("seed,field_scale", [(0, 1), (1, 1), (2, 2)])
def test_target_maps_fixed_to_moving(seed, field_scale):
    shape = (48, 48, 48)
    img = smooth_volume(shape, seed)
    mask = torch.ones(1, 1, *shape)
    pair = make_pair(img, mask, no_gamma(PRESETS["eppenhof2018"]), torch.Generator().manual_seed(seed), field_scale)
    recon = warp(pair.moving, pair.target)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    err = (recon - pair.fixed)[inner].abs().mean()
    wrong = (warp(pair.moving, -pair.target) - pair.fixed)[inner].abs().mean()
    identity = (pair.moving - pair.fixed)[inner].abs().mean()
    assert err < 0.25 * identity and wrong > err * 2


@pytest.mark.parametrize("preset", ["eppenhof2018", "eppenhof2018_coefficients"])
def test_every_target_component_is_the_images_motion(preset):
    """x and y too (the issue's worry: x/y barely learned): removing, negating or swapping any component
    of the target makes it map fixed to moving clearly worse, so each channel holds that axis' motion."""
    shape = (48, 48, 48)
    img = smooth_volume(shape, 3)
    pair = make_pair(img, torch.ones(1, 1, *shape), no_gamma(PRESETS[preset]), torch.Generator().manual_seed(3))
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))

    def error(target):
        return float((warp(pair.moving, target) - pair.fixed)[inner].abs().mean())

    best = error(pair.target)
    for c in range(3):
        for change in ("zero", "negate"):
            t = pair.target.clone()
            t[:, c] = 0 if change == "zero" else -t[:, c]
            assert error(t) > 2 * best, (c, change)
    assert error(pair.target[:, [1, 0, 2]]) > 2 * best


def test_preset_table_matches_paper():
    p = PRESETS["eppenhof2018"]
    assert p.augmentation == (BSplineLevel(2, (3.2, 6.4, 12.8)),)
    assert p.learned == (BSplineLevel(4, (3.2, 6.4, 12.8)), BSplineLevel(8, (3.2, 3.2, 3.2)))
    assert p.gamma_range == (0.5, 1.5)
    q = PRESETS["eppenhof2019"]
    assert q.augmentation == (BSplineLevel(2, (6.4, 6.4, 6.4)),)
    assert q.learned == (BSplineLevel(4, (3.2, 6.4, 12.8)), BSplineLevel(8, (3.2, 3.2, 3.2)))
    assert q.control == "grid_points" and q.image_order == 1 and q.gamma_range == (1.0, 1.0)


def test_coefficient_fields_stay_in_range_and_axes_are_xyz():
    level = BSplineLevel(4, (3.2, 6.4, 12.8))
    g = torch.Generator().manual_seed(0)
    fields = torch.cat([random_bspline_field(level, 4, (128, 128, 128), g, control="coefficients") for _ in range(4)])
    peak = fields.abs().amax(dim=(0, 2, 3, 4))
    # partition of unity bounds a B-spline field by its coefficients; the z channel is the largest
    assert torch.all(peak <= torch.tensor([3.2, 6.4, 12.8]) + 1e-4)
    assert peak[2] > peak[1] > peak[0]
    half = random_bspline_field(level, 16, (64, 64, 64), torch.Generator().manual_seed(1),
                                control="coefficients").abs().amax()
    assert half <= 6.4 + 1e-4  # ranges scale with the grid (64/128)


@pytest.mark.parametrize("points,size", [(2, 64), (4, 64), (8, 64), (4, 49)])
def test_grid_points_move_by_the_sampled_amounts(points, size):
    """gryds semantics (the paper's "grid point displacement ranges"): the dense field passes through the
    sampled values at the grid points, which sit from the first to the last voxel centre."""
    level = BSplineLevel(points, (3.2, 6.4, 12.8))
    shape = (size, size, size)
    g = torch.Generator().manual_seed(points)
    field = random_bspline_field(level, 2, shape, g, scale=1.0)
    g = torch.Generator().manual_seed(points)
    values = (torch.rand((2, 3, points, points, points), generator=g) * 2.0 - 1.0) * torch.tensor(
        [3.2, 6.4, 12.8]).view(1, 3, 1, 1, 1)
    step = (size - 1) / (points - 1)
    nodes = [round(n * step) for n in range(points)]
    exact = all(abs(n - q * step) < 1e-9 for q, n in enumerate(nodes))
    if exact:
        at_nodes = field[:, :, nodes][:, :, :, nodes][:, :, :, :, nodes]
        torch.testing.assert_close(at_nodes, values, atol=1e-4, rtol=0)
    # the same numbers read as B-spline coefficients give a smaller field, damped at the borders
    coeff = random_bspline_field(level, 2, shape, torch.Generator().manual_seed(points), control="coefficients",
                                 scale=1.0)
    assert field.abs().mean() > 1.5 * coeff.abs().mean()
    # interpolation reaches the sampled values at the corner grid point; coefficients do not
    torch.testing.assert_close(field[:, :, 0, 0, 0], values[:, :, 0, 0, 0], atol=1e-4, rtol=0)
    assert (coeff[:, :, 0, 0, 0] - values[:, :, 0, 0, 0]).abs().max() > 0.1


def test_ranges_scale_per_axis_on_a_non_cubic_grid():
    """Table I ranges are voxels of a 128³ grid over the same box: on a (D, H, W) = (33, 65, 129)
    grid each component scales with its own axis (x by 1, y by 1/2, z by 1/4), at the corner node exactly."""
    level = BSplineLevel(4, (8.0, 8.0, 8.0))
    shape = (33, 65, 129)
    field = random_bspline_field(level, 3, shape, torch.Generator().manual_seed(5))
    values = (torch.rand((3, 3, 4, 4, 4), generator=torch.Generator().manual_seed(5)) * 2.0 - 1.0) * 8.0
    factors = torch.tensor([129 / 128, 65 / 128, 33 / 128])
    torch.testing.assert_close(field[:, :, 0, 0, 0], values[:, :, 0, 0, 0] * factors, atol=1e-4, rtol=0)
    peak = field.abs().amax(dim=(0, 2, 3, 4))
    assert 3.0 < float(peak[0] / peak[2]) < 5.0 and 1.5 < float(peak[0] / peak[1]) < 2.5
    with pytest.raises(ValueError, match="three"):
        random_bspline_field(level, 1, shape, torch.Generator(), scale=(1.0, 2.0))


def test_cubic_image_interpolation_reproduces_smooth_images():
    """Third-order B-spline interpolation (the paper's) of a quadratic image is exact away from the
    borders; trilinear interpolation is not."""
    from DeepLungRegLib.fields import spline_prefilter, warp_cubic

    shape = (40, 36, 32)
    k, j, i = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij")
    def f(i, j, k):
        return 0.002 * i**2 - 0.003 * j**2 + 0.001 * i * k + 0.05 * j

    img = f(i, j, k)[None, None]
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[:, 0], u[:, 1], u[:, 2] = 0.37, -0.61, 0.25
    ref = f(i + 0.37, j - 0.61, k + 0.25)[None, None]
    inner = (slice(None), slice(None), slice(12, -12), slice(12, -12), slice(12, -12))
    cubic = warp_cubic(spline_prefilter(img), u)
    cubic_err = (cubic - ref)[inner].abs().max()
    linear_err = (warp(img, u) - ref)[inner].abs().max()
    assert cubic_err < 1e-5 and linear_err > 1e-4 and linear_err > 20 * cubic_err
    # and it interpolates: zero displacement returns the image
    noise = torch.rand(1, 2, 12, 10, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(warp_cubic(spline_prefilter(noise), torch.zeros(1, 3, 12, 10, 9)), noise,
                               atol=1e-5, rtol=0)


def test_still_pairs_have_zero_target_and_differ_only_in_gamma():
    shape = (32, 32, 32)
    img = smooth_volume(shape, 5)
    pair = make_pair(img, torch.ones(1, 1, *shape), no_gamma(PRESETS["eppenhof2018"]),
                     torch.Generator().manual_seed(5), still=True)
    assert pair.target.abs().max() == 0
    torch.testing.assert_close(pair.fixed, pair.moving)
    assert not torch.equal(pair.moving, img)  # still augmented


def test_basis_is_cubic_bspline():
    b = bspline_basis(9, 3)
    np.testing.assert_allclose(b[0].numpy(), [2 / 3, 1 / 6, 0.0], atol=1e-6)
    np.testing.assert_allclose(b[4].numpy(), [1 / 6, 2 / 3, 1 / 6], atol=1e-6)


def test_mask_warps_with_the_image():
    shape = (40, 40, 40)
    k, j, i = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    blob = (((i - 20) / 10) ** 2 + ((j - 18) / 8) ** 2 + ((k - 21) / 12) ** 2 < 1).float()[None, None]
    pair = make_pair(blob, blob, no_gamma(PRESETS["eppenhof2018"]), torch.Generator().manual_seed(3))
    moving_mask = pair.moving > 0.5
    agree = (moving_mask == (pair.mask > 0.5)).float().mean()
    assert agree > 0.99
    assert not torch.equal(pair.mask, blob)  # it did move


def test_gamma_changes_intensities_within_range():
    img = torch.full((1, 1, 16, 16, 16), 0.5)
    pair = make_pair(img, torch.ones_like(img), PRESETS["eppenhof2018"], torch.Generator().manual_seed(0))
    for v in (pair.fixed, pair.moving):
        assert 0.5**1.5 - 1e-6 <= float(v.mean()) <= 0.5**0.5 + 1e-6


def test_generated_transforms_do_not_fold():
    g = torch.Generator().manual_seed(0)
    worst = np.inf
    for _ in range(5):
        pair = make_pair(torch.zeros(2, 1, 64, 64, 64), torch.ones(2, 1, 64, 64, 64), PRESETS["eppenhof2018"], g)
        for t in pair.target:
            worst = min(worst, jacobian_determinant(t.numpy(), (1, 1, 1)).min())
    # grid point displacements (2.3x the coefficient fields) compress locally to ~5 % but never fold
    assert worst > 0.02
