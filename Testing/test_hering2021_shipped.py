"""The shipped hering2021 model: identical pairs, the pyramid against its coarsest level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from DeepLungRegLib.methods import get_method
from DeepLungRegLib.model_catalog import resource_path
from DeepLungRegLib.modelfile import load_model
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.breathing import BreathingRanges, make_breathing_pair

SHIPPED = resource_path("Models") / "hering2021"


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.fail(f"the shipped hering2021 model is missing: {SHIPPED}")
    return load_model(SHIPPED)


def _pair_on_grid(sample_ct, grid, amplitude, seed):
    scan = prepare_scan(sample_ct, grid)
    image = torch.from_numpy(scan.image)[None, None]
    mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
    p = make_breathing_pair(image, mask, scan.grid, BreathingRanges(), torch.Generator().manual_seed(seed),
                            amplitude=amplitude, swap=False, noise_std=0.0)
    return scan, p


def test_shipped_model_identical_pair_gives_near_zero_displacement(shipped, sample_ct):
    """Measured on the bundled sample: the network alone moves lung voxels of an identical pair by
    0.78 mm on average (p95 1.6 mm; its lattice spacing is ~5 mm); with test-time refinement the
    pipeline brings it to ~0.03 mm."""
    import SimpleITK as sitk
    from DeepLungRegLib.pipeline import register_images
    from DeepLungRegLib.preprocessing import lung_mask

    net, meta = shipped
    scan = prepare_scan(sample_ct, get_method("hering2021").grid_size(meta))
    x = torch.from_numpy(scan.image)[None, None]
    with torch.no_grad():
        u = net(x, x)
    mm = (u * torch.tensor(scan.grid.spacing).view(1, 3, 1, 1, 1)).norm(dim=1)[0]
    lung = torch.from_numpy(scan.mask)
    assert float(mm[lung].mean()) < 1.0 and float(torch.quantile(mm[lung], 0.95)) < 2.0, \
        (float(mm[lung].mean()), float(mm[lung].max()))
    res = register_images(sample_ct, sample_ct, net, meta, refine="fast", warp_moving=False)
    lm = lung_mask(sample_ct)
    idx = np.argwhere(sitk.GetArrayFromImage(lm.mask) > 0)[::50, ::-1].astype(float)
    pts = np.array([lm.mask.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    moved = np.linalg.norm(np.array([res.transform.TransformPoint(p.tolist()) for p in pts]) - pts, axis=1)
    assert moved.mean() < 0.1 and np.percentile(moved, 95) < 0.3, (moved.mean(), moved.max())


def test_shipped_pyramid_recovers_a_known_deformation_better_than_its_coarsest_level(shipped, sample_ct):
    net, meta = shipped
    scan, p = _pair_on_grid(sample_ct, get_method("hering2021").grid_size(meta), 20.0, 11)
    sp = torch.tensor(scan.grid.spacing).view(1, 3, 1, 1, 1)
    lung = p.fixed_mask[0, 0] > 0.5
    errors = {}
    with torch.no_grad():
        for finest in (3, 1):
            u = net(p.fixed, p.moving, finest=finest)
            errors[finest] = float(((u - p.target) * sp).norm(dim=1)[0][lung].mean())
    start = float((p.target * sp).norm(dim=1)[0][lung].mean())
    assert errors[1] < errors[3] < start, (start, errors)
