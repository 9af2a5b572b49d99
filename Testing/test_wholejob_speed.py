"""Issue 14: the fast whole-job paths equal the reference paths they replace.

* warp: :func:`DeepLungRegLib.resampling.warp_image` (torch, slab by slab) against
  ``sitk.Resample`` through the written composite transform, on a real CT crop;
* Jacobian: the compact map (:func:`jacobian_image`, lattice resolution) against
  :func:`metrics.jacobian_determinant` of the full-resolution field of the transform, and the
  report's statistics (:func:`jacobian_stats`, slab by slab) against the full-resolution maps
  the pipeline used to hold.

No timing is asserted here (see Testing/benchmarks/bench_wholejob.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import rotation
from DeepLungRegLib.geometry import Lattice
from DeepLungRegLib.metrics import folding_percent, jacobian_determinant, std_log_jacobian
from DeepLungRegLib.resampling import (
    affine_parts,
    jacobian_image,
    jacobian_stats,
    lattice_jacobian,
    reduced_grid,
    warp_image,
)
from DeepLungRegLib.transforms import OutputField, full_transform, output_field

#: |fast - ITK| (HU, float32 output) allowed at any voxel: the two differ only by float32 rounding of the
#: sampling coordinates (measured: max 0.11 HU on the full-size simulated pair, mean 0.001 HU).
WARP_TOL_HU = 0.5


@pytest.fixture(scope="module")
def ct_crop(sample_ct) -> sitk.Image:
    """A real CT crop (lungs, mediastinum, chest wall) with the bundled CT's geometry."""
    size = sample_ct.GetSize()
    return sample_ct[size[0] // 6: 5 * size[0] // 6, size[1] // 5: 4 * size[1] // 5, 10: size[2] - 10]


def smooth_field(fixed: sitk.Image, amplitude_mm: float, direction=None, seed: int = 0) -> OutputField:
    """A smooth random displacement (network-grid voxels) on a lattice over the middle of ``fixed``,
    made into the stored output field exactly as the pipeline does (padding ring tapered to zero)."""
    n = np.asarray(fixed.GetSize())
    sp = np.asarray(fixed.GetSpacing())
    d = np.asarray(direction if direction is not None else fixed.GetDirection(), float).reshape(3, 3)
    lo = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((n * 0.15).tolist()))
    size = (20, 18, 16)
    spacing = tuple((0.7 * n * sp / (np.asarray(size) - 1)).tolist())
    grid = Lattice(tuple(lo.tolist()), spacing, tuple(d.ravel().tolist()), size)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    u = torch.nn.functional.interpolate(u, size=grid.shape, mode="trilinear", align_corners=True)
    u = u / u.abs().max() * amplitude_mm / min(spacing)  # voxels of the grid
    return output_field(u, grid)


def an_affine(fixed: sitk.Image) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((rotation(3.0, -4.0) @ np.diag([1.03, 0.97, 1.05])).ravel().tolist())
    size = np.asarray(fixed.GetSize())
    tx.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint((size / 2).tolist()))
    tx.SetTranslation((4.0, -3.0, 6.0))
    return tx


@pytest.mark.parametrize("direction", ["fixed", "oblique"])
def test_fast_warp_equals_itk_resampling_on_a_real_ct(ct_crop, direction):
    """The lattice along the fixed axes (the pipeline's case, separable interpolation of the field)
    and an oblique lattice (grid_sample on the field) both give ITK's image."""
    fixed = ct_crop
    moving = sitk.Resample(ct_crop, ct_crop, sitk.Euler3DTransform((0, 0, 0), 0.02, -0.01, 0.03), sitk.sitkLinear,
                           -1000.0)  # a moving image that differs from the fixed one
    fld = smooth_field(fixed, 8.0, None if direction == "fixed" else rotation(20.0, 30.0).ravel())
    A = an_affine(fixed)
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, full_transform(A, fld), sitk.sitkLinear, -1000.0,
                                               sitk.sitkFloat32))
    fast = sitk.GetArrayFromImage(warp_image(moving, fixed, A, fld, output="float32", chunk_voxels=50_000))
    body = ref > -500
    assert body.mean() > 0.2 and (ref == -1000.0).mean() > 0.01  # tissue, and voxels mapped outside the moving box
    diff = np.abs(fast - ref)
    assert diff.max() <= WARP_TOL_HU  # everywhere, the moving image's edge included (float64 decision there)
    as_int = warp_image(moving, fixed, A, fld)
    assert as_int.GetPixelID() == sitk.sitkInt16 and as_int.GetSpacing() == fixed.GetSpacing()
    i16 = sitk.GetArrayViewFromImage(as_int).astype(np.float64)
    assert np.abs(i16 - np.floor(ref + 0.5))[body].max() <= 1.0
    # an int16 moving image (as read from a CT file) gives the same result as its float32 copy
    moving_i16 = sitk.Cast(sitk.Round(moving), sitk.sitkInt16)
    a = warp_image(moving_i16, fixed, A, fld, output="float32", chunk_voxels=50_000)
    b = warp_image(sitk.Cast(moving_i16, sitk.sitkFloat32), fixed, A, fld, output="float32", chunk_voxels=50_000)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_fast_warp_splits_steep_mappings_and_still_equals_itk(ct_crop, monkeypatch):
    """A mapping whose fixed slices cross many moving slices (a 60 degree tilt about x, with a field)
    is split into smaller pieces, by slices and then by rows (forced here by a small limit); the
    pieces give ITK's image."""
    from DeepLungRegLib import resampling

    monkeypatch.setattr(resampling, "MAX_MOVING_SLICES", 3)
    fixed = ct_crop
    fld = smooth_field(fixed, 5.0, seed=2)
    tilt = sitk.Euler3DTransform(fixed.TransformContinuousIndexToPhysicalPoint(
        (np.asarray(fixed.GetSize()) / 2).tolist()), np.deg2rad(60.0), 0.0, 0.0)
    A = sitk.AffineTransform(3)
    A.SetMatrix(tilt.GetMatrix())
    A.SetCenter(tilt.GetCenter())
    calls = []
    run_pieces = resampling._sample

    def counting(volume, pts):
        calls.append(pts.shape[0])
        return run_pieces(volume, pts)

    monkeypatch.setattr(resampling, "_sample", counting)
    ref = sitk.GetArrayFromImage(sitk.Resample(ct_crop, fixed, full_transform(A, fld), sitk.sitkLinear, -1000.0,
                                               sitk.sitkFloat32))
    fast = sitk.GetArrayFromImage(warp_image(ct_crop, fixed, A, fld, output="float32", chunk_voxels=50_000))
    assert (ref > -500).mean() > 0.1
    assert min(calls) < fixed.GetSize()[0] * fixed.GetSize()[1]  # pieces smaller than one slice: rows split
    assert np.abs(fast - ref).max() <= WARP_TOL_HU


def test_warp_refuses_a_transform_that_is_not_affine(ct_crop):
    bspline = sitk.BSplineTransformInitializer(ct_crop, [3, 3, 3])
    params = np.asarray(bspline.GetParameters())
    bspline.SetParameters((params + np.random.default_rng(0).normal(0, 3, params.size)).tolist())
    with pytest.raises(ValueError, match="not an affine"):
        affine_parts(bspline)


def _full_resolution_jacobian(tx: sitk.Transform, fixed: sitk.Image) -> np.ndarray:
    disp = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                             fixed.GetSpacing(), fixed.GetDirection())
    return jacobian_determinant(np.moveaxis(sitk.GetArrayFromImage(disp), -1, 0), fixed.GetSpacing(),
                                fixed.GetDirection())


#: The compact map (lattice resolution, linear) vs det of the full-resolution field, inside the lattice
#: interior: they differ by the finite-difference step (two lattice nodes vs two fixed voxels) on a field
#: that is piecewise trilinear between the nodes. Measured on the 6 mm field below (nodes 7-11 mm apart,
#: mean |det - 1| 0.056): max 0.099, mean 0.0068.
JACOBIAN_TOL_MAX = 0.12
JACOBIAN_TOL_MEAN = 0.01


@pytest.mark.parametrize("amplitude", [6.0, 40.0])
def test_compact_jacobian_map_matches_the_full_resolution_reference(ct_crop, amplitude):
    """``amplitude`` 6 mm: within the tolerances above, no folding in either. 40 mm: the field folds;
    the lattice determinant (central differences over two nodes, the definition the pipeline has always
    used, kept so that report figures do not move) smooths the folds and finds about two thirds of the
    reference's folding percentage on this field (0.32 vs 0.48 %), never more than the reference."""
    fixed = ct_crop
    fld = smooth_field(fixed, amplitude, seed=1)
    A = an_affine(fixed)
    T = full_transform(A, fld)
    ref = _full_resolution_jacobian(T, fixed)
    det_lat, det_a = lattice_jacobian(fld, A)
    assert det_a == pytest.approx(np.linalg.det(affine_parts(A)[0]))
    jac = jacobian_image(det_lat, det_a, fixed)
    grid = reduced_grid(fixed, det_lat.GetSpacing())
    assert jac.GetSize() == grid.size and np.prod(jac.GetSize()) < fixed.GetNumberOfPixels() / 4
    up = sitk.GetArrayFromImage(sitk.Resample(jac, fixed, sitk.Transform(), sitk.sitkLinear, det_a))
    # the lattice interior, away from the tapered padding ring
    interior = np.zeros(fld.lattice.shape, np.uint8)
    interior[6:-6, 6:-6, 6:-6] = 1
    inner = sitk.GetImageFromArray(interior)
    inner.CopyInformation(fld.lattice.reference())
    m = sitk.GetArrayFromImage(sitk.Resample(inner, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    assert m.mean() > 0.1
    lung = sitk.GetImageFromArray(m.astype(np.uint8))
    lung.CopyInformation(fixed)
    stats = jacobian_stats(det_lat, det_a, fixed, lung, chunk_voxels=40_000)
    ref_fold = folding_percent(ref, m)
    if amplitude == 6.0:
        err = np.abs(up - ref)[m]
        assert np.abs(ref[m] - det_a).mean() > 0.03  # the field does deform
        assert err.max() <= JACOBIAN_TOL_MAX and err.mean() <= JACOBIAN_TOL_MEAN
        assert ref_fold == 0.0 and stats["folding_percent_lung"] == 0.0
    else:
        assert ref_fold > 0.2  # the reference folds
        assert 0.5 * ref_fold <= stats["folding_percent_lung"] <= 1.05 * ref_fold


def _lung_like_mask(fixed: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.BinaryThreshold(sitk.Resample(fixed, reduced_grid(fixed, (3.0, 3.0, 3.0)).reference()),
                                          -950.0, -500.0), sitk.sitkUInt8)


def _nearest_half_up(lung: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """ITK's nearest neighbour of ``lung`` on ``ref``'s grid with exact ties decided upwards (towards
    higher indices of ``lung``): sampled at points moved 1e-6 voxel that way (far more than ITK's index
    rounding noise, far less than the distance from a tie of any voxel that is not one)."""
    from DeepLungRegLib.resampling import _axis_maps

    maps = _axis_maps(lung, ref)
    assert maps is not None
    shifted = sitk.Image(ref)
    shifted.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint((1e-6 * np.sign(maps[1])).tolist()))
    return sitk.GetArrayFromImage(sitk.Resample(lung, shifted, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)) > 0


def _full_maps(det_lat: sitk.Image, det_a: float, lung: sitk.Image, fixed: sitk.Image,
               half_up: bool = False) -> tuple[np.ndarray, np.ndarray]:
    full = sitk.GetArrayFromImage(sitk.Resample(det_lat, fixed, sitk.Transform(), sitk.sitkLinear, det_a,
                                                sitk.sitkFloat32))
    if half_up:
        return full, _nearest_half_up(lung, fixed)
    mask = sitk.GetArrayFromImage(sitk.Resample(lung, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)) > 0
    return full, mask


@pytest.mark.parametrize("backend", ["numpy", "torch", "itk"])
def test_jacobian_stats_equal_the_full_resolution_maps(ct_crop, backend):
    """Slab by slab, the report's figures are those of the full-resolution maps the pipeline held
    before (the lattice determinant linearly interpolated, the mask by nearest neighbour), whether the
    slabs are interpolated axis by axis (the pipeline's case) or by ``sitk.Resample``. The 3 mm mask
    grid on this 2 mm crop has ties (a spacing ratio of ~1.5): axis by axis they go upwards, so the
    reference mask is ITK's with ties decided upwards; ``sitk.Resample`` is compared with itself."""
    from DeepLungRegLib.resampling import _SeparableSampler

    fixed = ct_crop
    fld = smooth_field(fixed, 40.0, seed=2)
    A = an_affine(fixed)
    det_lat, det_a = lattice_jacobian(fld, A)
    lung = _lung_like_mask(fixed)
    assert _SeparableSampler.create(det_lat, det_a, lung, fixed) is not None  # the grids share the fixed axes
    full, mask = _full_maps(det_lat, det_a, lung, fixed, half_up=backend != "itk")
    assert mask.mean() > 0.05 and (full <= 0).any()
    stats = jacobian_stats(det_lat, det_a, fixed, lung, chunk_voxels=30_000, backend=backend)
    assert stats["folding_percent"] == pytest.approx(folding_percent(full), abs=1e-12)
    assert stats["folding_percent_lung"] == pytest.approx(folding_percent(full, mask), abs=1e-12)
    ulp = np.spacing(np.float32(max(abs(full.min()), abs(full.max()))))
    assert abs(stats["jacobian_min"] - float(full.min())) <= ulp
    assert abs(stats["jacobian_max"] - float(full.max())) <= ulp
    assert stats["std_log_jacobian_lung"] == pytest.approx(std_log_jacobian(full, mask), rel=1e-5)


def _reversed(img: sitk.Image, axes: tuple[int, ...]) -> sitk.Image:
    """The same image stored the other way along ``axes`` (x=0, y=1, z=2): same voxels in space, the
    direction's columns negated, the origin at the former last voxel."""
    arr = sitk.GetArrayFromImage(img)
    last = [0, 0, 0]
    index = [slice(None)] * 3
    for a in axes:
        index[2 - a] = slice(None, None, -1)
        last[a] = img.GetSize()[a] - 1
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr[tuple(index)]))
    out.SetSpacing(img.GetSpacing())
    d = np.asarray(img.GetDirection()).reshape(3, 3).copy()
    d[:, list(axes)] *= -1
    out.SetDirection(d.ravel().tolist())
    out.SetOrigin(img.TransformIndexToPhysicalPoint(last))
    return out


@pytest.mark.parametrize("direction", ["axial", "oblique", "reversed"])
def test_separable_slabs_equal_itk_resampling(ct_crop, direction):
    """The axis-by-axis interpolation reproduces ``sitk.Resample``: the determinant to the float32 bit on
    all but a few voxels in a hundred thousand (1 ulp there), the mask exactly where ITK's nearest
    neighbour has no tie and upwards at ties (which this grid has: ITK's own choice there differs
    between whole images and slabs), on slabs that start inside the image and on grids with an
    oblique direction shared by all three images; the lattice stops inside the image on every side
    (``det(A)`` outside)."""
    from DeepLungRegLib.resampling import _SeparableSampler, _slab_reference

    base = sitk.Image(ct_crop)
    if direction == "oblique":
        base.SetDirection(rotation(25.0, -35.0).ravel().tolist())
    fld = smooth_field(base, 10.0, seed=3)
    fixed = sitk.ConstantPad(base, (12, 9, 7), (8, 11, 6), -1000.0)  # beyond the lattice on every side
    det_lat, det_a = lattice_jacobian(fld, an_affine(fixed))
    lung = _lung_like_mask(fixed)
    if direction == "reversed":  # lattice and mask grids running against the fixed image along y and z
        det_lat, lung = _reversed(det_lat, (1, 2)), _reversed(lung, (1, 2))
    sampler = _SeparableSampler.create(det_lat, det_a, lung, fixed)
    assert sampler is not None
    depth = fixed.GetSize()[2]
    for k0, k1 in ((0, depth), (7, 19), (depth - 5, depth)):
        ref = _slab_reference(fixed, k0, k1, sitk.sitkFloat32)
        det_itk = sitk.GetArrayFromImage(sitk.Resample(det_lat, ref, sitk.Transform(), sitk.sitkLinear, det_a,
                                                       sitk.sitkFloat32))
        mask_itk = sitk.GetArrayFromImage(sitk.Resample(lung, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                        sitk.sitkUInt8)) > 0
        det, mask = sampler.det_slab(k0, k1), sampler.lung_slab(k0, k1)
        assert det.shape == det_itk.shape and det.dtype == np.float32
        np.testing.assert_array_equal(mask, _nearest_half_up(lung, ref))
        assert (mask != mask_itk).mean() < 0.02  # ties only
        differ = det != det_itk
        assert differ.mean() <= 1e-5, differ.sum()
        np.testing.assert_array_max_ulp(det, det_itk, maxulp=1)
    whole = sampler.det_slab(0, depth)
    assert (whole == np.float32(det_a)).mean() > 0.03 and (whole != np.float32(det_a)).mean() > 0.5  # both parts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_torch_sampler_equals_the_numpy_one(ct_crop, device):
    """The Jacobian stage's GPU path, run here on torch's CPU: the same slabs, bit for bit (on a GPU the
    same float64 arithmetic; checked there when one exists)."""
    from DeepLungRegLib.resampling import _SeparableSampler

    fixed = sitk.ConstantPad(ct_crop, (5, 4, 3), (2, 6, 4), -1000.0)
    det_lat, det_a = lattice_jacobian(smooth_field(ct_crop, 30.0, seed=5), an_affine(fixed))
    lung = _lung_like_mask(fixed)
    ref = _SeparableSampler.create(det_lat, det_a, lung, fixed)
    dev = _SeparableSampler.create(det_lat, det_a, lung, fixed, device)
    depth = fixed.GetSize()[2]
    for k0, k1 in ((0, depth), (3, 11)):
        det, mask = dev.det_slab(k0, k1), dev.lung_slab(k0, k1)
        assert det.device.type == device and det.dtype == torch.float32 and mask.dtype == torch.bool
        np.testing.assert_array_equal(det.cpu().numpy(), ref.det_slab(k0, k1))
        np.testing.assert_array_equal(mask.cpu().numpy(), ref.lung_slab(k0, k1))
    a = jacobian_stats(det_lat, det_a, fixed, lung, chunk_voxels=20_000, backend="numpy")
    b = jacobian_stats(det_lat, det_a, fixed, lung, chunk_voxels=20_000, device=device, backend="torch")
    for key in ("folding_percent", "folding_percent_lung", "jacobian_min", "jacobian_max"):
        assert a[key] == b[key], key
    assert a["std_log_jacobian_lung"] == pytest.approx(b["std_log_jacobian_lung"], rel=1e-6)
    assert a["folding_percent_lung"] > 0  # the field folds: the counts are exercised


def test_separable_sampler_refuses_grids_that_do_not_share_axes(ct_crop):
    """A lattice turned against the fixed image's axes is not separable: the statistics fall back to
    ``sitk.Resample`` (and still equal the full-resolution maps)."""
    from DeepLungRegLib.resampling import _SeparableSampler

    fixed = ct_crop
    fld = smooth_field(fixed, 10.0, rotation(20.0, 30.0).ravel(), seed=4)
    det_lat, det_a = lattice_jacobian(fld, an_affine(fixed))
    lung = _lung_like_mask(fixed)
    assert _SeparableSampler.create(det_lat, det_a, lung, fixed) is None
    full, mask = _full_maps(det_lat, det_a, lung, fixed)
    stats = jacobian_stats(det_lat, det_a, fixed, lung, chunk_voxels=30_000)
    assert stats["jacobian_min"] == float(full.min()) and stats["jacobian_max"] == float(full.max())
    assert stats["folding_percent_lung"] == pytest.approx(folding_percent(full, mask), abs=1e-12)


def test_int16_images_register_exactly_as_their_float32_copies(small_ct, tiny_model):
    """``register`` keeps integer CT files as int16 (half the memory): same field, same figures."""
    from DeepLungRegLib.modelfile import load_model
    from DeepLungRegLib.pipeline import register_images
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair

    sim = simulate_pair(small_ct, BreathingParams(n_landmarks=20))
    f16, m16 = (sitk.Cast(sitk.Round(img), sitk.sitkInt16) for img in (sim.fixed, sim.moving))
    net, meta = load_model(tiny_model)
    a = register_images(f16, m16, net, meta, refine="off")
    b = register_images(sitk.Cast(f16, sitk.sitkFloat32), sitk.Cast(m16, sitk.sitkFloat32), net, meta, refine="off")
    np.testing.assert_array_equal(a.field.displacement_mm, b.field.displacement_mm)
    assert a.affine.GetParameters() == b.affine.GetParameters()
    for key in ("folding_percent", "jacobian_min", "jacobian_max", "std_log_jacobian_lung", "lung_volume_ml"):
        assert a.stats[key] == b.stats[key]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a.warped), sitk.GetArrayViewFromImage(b.warped))


def test_register_reads_integer_files_as_int16(tmp_path):
    from DeepLungRegLib.io import read_volume
    from test_reliability import ct_array, ct_image

    sitk.WriteImage(ct_image(), str(tmp_path / "ct.nii.gz"))
    img = read_volume(tmp_path / "ct.nii.gz", keep_int16=True)
    assert img.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), ct_array())
    assert read_volume(tmp_path / "ct.nii.gz").GetPixelID() == sitk.sitkFloat32
    sitk.WriteImage(ct_image(ct_array().astype(np.float32) + 0.25), str(tmp_path / "f.nii.gz"))
    assert read_volume(tmp_path / "f.nii.gz", keep_int16=True).GetPixelID() == sitk.sitkFloat32  # never rounded


@pytest.mark.parametrize("fails", [False, True])
def test_register_job_freezes_older_objects_only_while_it_runs(small_ct_file, tiny_model, tmp_path, monkeypatch,
                                                               fails):
    """The collector skips the objects from before the job during it (speed) and gets them back after,
    also when the job fails; a caller's own freeze is left alone."""
    import gc

    from DeepLungRegLib import pipeline
    from DeepLungRegLib.pipeline import RegisterOptions, run_register

    seen = []
    real = pipeline.register_images

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        if fails:
            raise RuntimeError("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "register_images", spy)
    gc.unfreeze()
    options = RegisterOptions(fixed=str(small_ct_file), moving=str(small_ct_file), output=str(tmp_path / "out"),
                              model=str(tiny_model), refine="off", progress_bar=False, warped=False, qa=False)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="stop"):
                run_register(options)
        else:
            run_register(options)
        assert seen[0] > 10_000 and gc.get_freeze_count() == 0
        gc.freeze()
        frozen = gc.get_freeze_count()
        options.output = str(tmp_path / "out2")
        if fails:
            with pytest.raises(RuntimeError, match="stop"):
                run_register(options)
        else:
            run_register(options)
        # the caller's freeze untouched (a few frozen objects may be freed meanwhile by reference counting)
        assert frozen - 100 <= seen[1] <= frozen and frozen - 100 <= gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("storage", [[2, 1, 0], [0, 2, 1], [1, 2, 0]])
def test_warp_of_a_moving_image_stored_along_another_axis(ct_crop, monkeypatch, storage):
    """A moving image whose slices run along x or y (sagittal / coronal storage) against an axial fixed
    one: ITK's image, read in as few pieces as an axially stored one (before, every fixed row needed
    most of the moving volume: 44x the time on the bundled CT)."""
    import DeepLungRegLib.resampling as rs

    fixed = ct_crop
    fld = smooth_field(fixed, 8.0)
    A = an_affine(fixed)
    calls = []
    real = rs._sample
    monkeypatch.setattr(rs, "_sample", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(rs, "MAX_MOVING_SLICES", 16)  # this crop's scale of a full-size scan's 96
    counts = {}
    for name, moving in (("axial", sitk.Image(ct_crop)), ("other", sitk.PermuteAxes(ct_crop, storage))):
        calls.clear()
        warped = warp_image(moving, fixed, A, fld, -1000.0, "cpu", output="float32", as_array=True)
        counts[name] = len(calls)
        ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, full_transform(A, fld), sitk.sitkLinear, -1000.0,
                                                   sitk.sitkFloat32))
        assert np.abs(warped - ref).max() <= WARP_TOL_HU, name
    assert counts["other"] <= 2 * counts["axial"] + 2, counts
