"""Lung mask and network grid: anatomy found, geometry kept through crop + resample + upsample."""

import numpy as np
import SimpleITK as sitk
from conftest import make_image, rotation
from DeepLungRegLib import preprocessing as pp
from DeepLungRegLib.io import index_to_physical


def phantom(direction=None, spacing=(3.0, 2.5, 4.0), origin=(-40.0, 25.0, -70.0), shape=(48, 64, 64)):
    """Air around a soft-tissue cylinder holding two low-density 'lungs' (kji array)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    arr = np.full(shape, -1000.0, np.float32)
    body = ((i - 32) / 28.0) ** 2 + ((j - 32) / 24.0) ** 2 < 1
    arr[body] = 40.0
    for ci in (20, 44):
        lung = ((i - ci) / 9.0) ** 2 + ((j - 32) / 14.0) ** 2 + ((k - 24) / 16.0) ** 2 < 1
        arr[lung] = -850.0
    return make_image(arr, spacing, origin, direction), shape


def test_lung_mask_finds_lungs_not_exterior_air():
    img, _ = phantom()
    res = pp.lung_mask(img)
    assert not res.fallback
    expected_ml = 2 * (4 / 3) * np.pi * (9 * 3.0) * (14 * 2.5) * (16 * 4.0) / 1000
    assert abs(res.volume_ml - expected_ml) / expected_ml < 0.25
    # exterior air corner is not lung
    small = sitk.GetArrayViewFromImage(res.mask)
    assert small[:, 0, 0].sum() == 0


def test_lung_mask_on_real_ct_is_plausible(sample_ct):
    res = pp.lung_mask(sample_ct)
    assert 2000 < res.volume_ml < 8000 and not res.fallback


def test_point_survives_crop_resample_and_upsample():
    rot = rotation(12, -20)
    img, shape = phantom(direction=rot.ravel())
    # a bright Gaussian dot at a known continuous index inside the left lung
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = np.array([20.3, 29.6, 23.2])  # (i, j, k)
    sp = np.asarray(img.GetSpacing())
    r2 = ((i - c[0]) * sp[0]) ** 2 + ((j - c[1]) * sp[1]) ** 2 + ((k - c[2]) * sp[2]) ** 2
    dot = (1000 * np.exp(-r2 / (2 * 6.0**2))).astype(np.float32)
    img2 = sitk.GetImageFromArray(sitk.GetArrayFromImage(img) + dot)
    img2.CopyInformation(img)
    dot_img = sitk.GetImageFromArray(dot)
    dot_img.CopyInformation(img)
    p_true = index_to_physical(img2, c[None])[0]
    mask = pp.lung_mask(img2).mask
    grid = pp.network_grid(img2, [mask], 32, margin_mm=5.0)
    # Resampling is linear in the image: follow the dot alone through crop + resample.
    on_grid = pp.resample_to_grid(dot_img, grid, default=0.0)
    p_grid = index_to_physical(grid.reference(), centroid(on_grid)[None])[0]
    voxel = min(img2.GetSpacing())
    assert np.linalg.norm(p_grid - p_true) < 0.5 * voxel
    # back to the original grid (upsampling)
    back_img = sitk.GetImageFromArray(on_grid)
    back_img.CopyInformation(grid.reference())
    up = sitk.GetArrayFromImage(sitk.Resample(back_img, img2, sitk.Transform(), sitk.sitkLinear, 0.0))
    p_up = index_to_physical(img2, centroid(up)[None])[0]
    assert np.linalg.norm(p_up - p_true) < 0.5 * voxel


def centroid(arr_kji: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid as a continuous (i, j, k) index."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in arr_kji.shape), indexing="ij")
    w = arr_kji / arr_kji.sum()
    return np.array([(w * i).sum(), (w * j).sum(), (w * k).sum()])


def test_network_grid_covers_lungs_with_fixed_direction(sample_ct):
    res = pp.lung_mask(sample_ct)
    grid = pp.network_grid(sample_ct, [res.mask], 64)
    assert grid.size == (64, 64, 64) and grid.direction == sample_ct.GetDirection()
    on = pp.resample_mask_to_grid(res.mask, grid)
    assert 0.15 < on.mean() < 0.6          # lungs fill a good part of the crop
    assert not on[0].any() or on[0].mean() < 0.2


def test_normalisation_window():
    v = pp.normalise_hu(np.array([-2000.0, -1000.0, -400.0, 200.0, 3000.0]))
    np.testing.assert_allclose(v, [0.0, 0.0, 0.5, 1.0, 1.0])
