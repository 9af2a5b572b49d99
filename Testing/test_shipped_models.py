"""Every shipped model: two identical images must give (nearly) zero displacement with the network alone.

Figures measured on the bundled sample CT at 4 mm (lung voxels, every 20th; ``--refine off``), mean / max mm:
hering2021 (= default) 0.84 / 7.1, eppenhof2018 0.51 / 2.2 (the first model: 0.75 / 2.7), sokooti2017 0.26 / 1.2; the bounds below
leave a margin over them. The default refinement brings every one of them below 0.05 mm mean
(Testing/test_refine.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib.model_catalog import shipped_model_folders
from DeepLungRegLib.modelfile import load_model, read_metadata
from DeepLungRegLib.pipeline import register_images
from DeepLungRegLib.preprocessing import lung_mask
from DeepLungRegLib.transforms import transform_points

#: mean and p95 (mm) of the network-alone displacement of lung points for an identical pair
IDENTICAL_PAIR_BOUNDS_MM = {
    "hering2021": (1.0, 2.5),
    "eppenhof2018": (1.0, 2.0),
    "sokooti2017": (0.5, 1.0),
    "eppenhof2019": (1.0, 2.5),
    "eppenhof2018tps": (1.0, 2.5),
}


@pytest.fixture(scope="module")
def lung_points(small_ct):
    lm = lung_mask(small_ct)
    idx = np.argwhere(sitk.GetArrayFromImage(lm.mask) > 0)[::20][:, ::-1]
    return np.array([lm.mask.TransformIndexToPhysicalPoint([int(c) for c in p]) for p in idx])


def test_every_registry_method_has_a_shipped_model_or_is_listed_as_pending():
    shipped = {read_metadata(f)["method"] for f in shipped_model_folders()}
    assert {"hering2021", "eppenhof2018", "sokooti2017"} <= shipped
    assert shipped <= set(IDENTICAL_PAIR_BOUNDS_MM), "a shipped method without an identical-pair bound"


@pytest.mark.parametrize("folder", shipped_model_folders(), ids=lambda p: p.name)
def test_identical_pair_gives_near_zero_displacement(folder, small_ct, lung_points):
    net, meta = load_model(folder)
    res = register_images(small_ct, small_ct, net, meta, warp_moving=False, refine="off")
    moved = np.linalg.norm(transform_points(res.transform, lung_points) - lung_points, axis=1)
    mean_bound, p95_bound = IDENTICAL_PAIR_BOUNDS_MM[meta["method"]]
    assert moved.mean() < mean_bound and np.percentile(moved, 95) < p95_bound, \
        (meta["method"], float(moved.mean()), float(np.percentile(moved, 95)), float(moved.max()))
