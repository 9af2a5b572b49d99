"""The written transform file: direction, units and orientation, checked with SimpleITK and slicer-core."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import rotation
from DeepLungRegLib.fields import physical_to_voxel
from DeepLungRegLib.io import index_to_physical
from DeepLungRegLib.preprocessing import NetworkGrid
from DeepLungRegLib.transforms import full_transform, mapping_error, output_field, transform_points

RAS = np.array([-1.0, -1.0, 1.0])


def analytic_displacement(p: np.ndarray) -> np.ndarray:
    """Translation plus a smooth sinusoid, LPS mm, for points (N, 3)."""
    t = np.array([1.7, -2.3, 4.1])
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    s = np.stack((2.0 * np.sin(2 * np.pi * z / 120.0),
                  1.5 * np.cos(2 * np.pi * x / 150.0),
                  3.0 * np.sin(2 * np.pi * (x + y) / 200.0)), axis=1)
    return t + s


def make_case():
    direction = rotation(10.0, 25.0)
    grid = NetworkGrid(origin=(-37.2, 12.9, -101.3), spacing=(2.1, 1.7, 3.3),
                       direction=tuple(direction.ravel()), size=(32, 32, 32))
    ref = grid.reference()
    kk, jj, ii = np.meshgrid(*(np.arange(32),) * 3, indexing="ij")
    idx = np.stack((ii, jj, kk), -1).reshape(-1, 3).astype(float)
    nodes = index_to_physical(ref, idx)
    d = analytic_displacement(nodes).T.reshape(3, 32, 32, 32)
    u_vox = physical_to_voxel(torch.from_numpy(d)[None], grid.spacing, grid.direction).float()
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.01, 0.0, -0.02, 0.98, 0.03, 0.0, 0.01, 1.05))
    affine.SetTranslation((3.0, -1.0, 2.5))
    affine.SetCenter((-10.0, 30.0, -50.0))
    rng = np.random.default_rng(0)
    inner = index_to_physical(ref, rng.uniform(1, 30, size=(200, 3)))
    expected = transform_points(affine, inner + analytic_displacement(inner))
    return grid, u_vox, affine, inner, expected


def test_transform_file_matches_analytic_mapping(tmp_path):
    grid, u_vox, affine, pts, expected = make_case()
    fld = output_field(u_vox, grid, pad=4, stride=1)
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(full_transform(affine, fld), str(path))
    tx = sitk.ReadTransform(str(path))
    got = transform_points(tx, pts)
    assert np.abs(got - expected).max() < 0.05
    # the mapping is fixed -> moving: not the inverse
    inverse_like = transform_points(affine.GetInverse(), pts - analytic_displacement(pts))
    assert np.abs(got - inverse_like).max() > 1.0


def test_stride_two_lattice_error_is_measured_and_small():
    grid, u_vox, affine, pts, _ = make_case()
    fld = output_field(u_vox, grid, pad=4, stride=2)
    err = mapping_error(full_transform(affine, fld), pts, u_vox, grid, affine)
    exact = mapping_error(full_transform(affine, output_field(u_vox, grid, pad=4, stride=1)), pts, u_vox, grid, affine)
    assert exact["max"] < 1e-6
    assert 0 < err["max"] < 0.1


def test_field_is_continuous_and_zero_outside_lattice():
    grid, u_vox, affine, _, _ = make_case()
    fld = output_field(u_vox, grid, pad=4)
    d = fld.displacement_mm
    assert np.abs(d[:, 0]).max() == 0 and np.abs(d[:, :, :, -1]).max() == 0  # outer ring tapered to zero
    step = np.abs(np.diff(d, axis=1)).max()
    assert step < np.abs(d).max()  # no jump as large as the field itself


def test_slicer_reads_the_same_mapping_and_moves_points_to_fixed(tmp_path):
    slicer = pytest.importorskip("slicer")
    grid, u_vox, affine, pts, expected = make_case()
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(full_transform(affine, output_field(u_vox, grid)), str(path))
    scene = slicer.vtkMRMLScene()
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    node = slicer.vtkMRMLTransformNode()
    scene.AddNode(node)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    from_parent = node.GetTransformFromParent()
    for p, q in zip(pts[:20], expected[:20], strict=True):
        r = np.asarray(from_parent.TransformPoint(tuple(p * RAS)))
        assert np.abs(r - q * RAS).max() < 0.05  # Slicer FromParent == ITK resampling direction, in RAS
    # A moving-image landmark placed under the transform and hardened lands on the fixed point.
    markups = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(markups)
    for q in expected[:10]:
        markups.AddControlPoint(*(q * RAS))
    markups.SetAndObserveTransformNodeID(node.GetID())
    slicer.vtkSlicerTransformLogic().hardenTransform(markups)
    for n, p in enumerate(pts[:10]):
        pos = np.zeros(3)
        markups.GetNthControlPointPosition(n, pos)
        assert np.abs(pos - p * RAS).max() < 0.05
