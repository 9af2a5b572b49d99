"""Slicer edge on real MRML (slicer-core wheel, no mocks): volumes, markups, grid transforms, logic."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import rotation  # noqa: E402
from DeepLungRegLib import slicer_io  # noqa: E402
from DeepLungRegLib.cli import main  # noqa: E402
from DeepLungRegLib.metrics import target_registration_error  # noqa: E402
from DeepLungRegLib.simulation import BreathingParams, simulate_pair  # noqa: E402
from DeepLungRegLib.slicer_logic import RegistrationLogic, model_summary, summary_lines  # noqa: E402
from DeepLungRegLib.transforms import full_transform, output_field, transform_points  # noqa: E402
from test_transforms import make_case  # noqa: E402

RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    return s


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_volume_node_round_trip_keeps_ras_positions_with_oblique_direction(scene):
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.3, 2.5))
    img.SetOrigin((12.0, -40.0, 7.5))
    img.SetDirection(tuple(rotation(20, -35).ravel()))
    node = slicer_io.image_to_volume_node(img, scene, "v")
    m = ijk_to_ras(node)
    rng = np.random.default_rng(1)
    for idx in rng.integers(0, 5, size=(10, 3)):
        lps = np.asarray(img.TransformIndexToPhysicalPoint([int(v) for v in idx]))
        ras = (m @ np.r_[idx, 1.0])[:3]
        np.testing.assert_allclose(ras, lps * RAS, atol=1e-9)
    back = slicer_io.volume_node_to_image(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-12)
    node2 = slicer_io.image_to_volume_node(back, scene, "v2")
    np.testing.assert_allclose(ijk_to_ras(node2), m, atol=1e-12)


def test_markups_round_trip_is_lps(scene):
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, -6.0]])
    node = slicer_io.lps_to_markups(pts, scene, "m", ["a", "b"])
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, p)
    np.testing.assert_allclose(p, [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(slicer_io.markups_to_lps(node), pts)


def test_grid_transform_node_matches_cli_transform_and_survives_saving(scene, tmp_path):
    grid, u_vox, affine, pts, expected = make_case()
    tx = full_transform(affine, output_field(u_vox, grid))
    sitk.WriteTransform(tx, str(tmp_path / "cli_transform.h5"))
    ref = grid.reference()
    field = slicer_io.transform_to_grid(tx, ref, grid)
    node = slicer_io.displacement_to_grid_transform_node(field, scene, "grid")
    assert node.IsA("vtkMRMLGridTransformNode")
    fp = node.GetTransformFromParent()
    for p, q in zip(pts[:30], expected[:30], strict=True):
        np.testing.assert_allclose(fp.TransformPoint(tuple(p * RAS)), q * RAS, atol=0.05)
    # a moving-image landmark under the transform, hardened, lands on the fixed point
    markups = slicer_io.lps_to_markups(expected[:8], scene, "moving points")
    markups.SetAndObserveTransformNodeID(node.GetID())
    slicer.vtkSlicerTransformLogic().hardenTransform(markups)
    np.testing.assert_allclose(slicer_io.markups_to_lps(markups), pts[:8], atol=0.05)
    # Slicer's own writer -> .h5 -> SimpleITK gives the CLI file's mapping
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "saved.h5"))
    assert storage.WriteData(node) == 1
    saved = sitk.ReadTransform(str(tmp_path / "saved.h5"))
    cli = sitk.ReadTransform(str(tmp_path / "cli_transform.h5"))
    np.testing.assert_allclose(transform_points(saved, pts), transform_points(cli, pts), atol=0.05)


@pytest.fixture(scope="module")
def small_pair(small_ct):
    return simulate_pair(small_ct, BreathingParams(n_landmarks=30, lattice_mm=4.0))


def test_logic_end_to_end_with_tiny_model(scene, small_pair, tiny_model, tmp_path):
    fixed = slicer_io.image_to_volume_node(small_pair.fixed, scene, "inhale")
    moving = slicer_io.image_to_volume_node(small_pair.moving, scene, "exhale")
    fm = slicer_io.lps_to_markups(small_pair.fixed_landmarks, scene, "F")
    mm = slicer_io.lps_to_markups(small_pair.moving_landmarks, scene, "M")
    logic = RegistrationLogic(scene)
    inputs = logic.write_inputs(tmp_path, fixed, moving, fm, mm)
    assert main(logic.command_args(inputs, tmp_path / "out", tiny_model, "cpu")) == 0
    out = logic.load_results(tmp_path / "out", fixed, moving, fm, mm)
    # nodes exist, on the fixed geometry
    assert out.transform_node.IsA("vtkMRMLGridTransformNode")
    assert out.transform_node.GetNodeReference(out.transform_node.GetMovingNodeReferenceRole()).GetID() == moving.GetID()
    assert out.transform_node.GetNodeReference(out.transform_node.GetFixedNodeReferenceRole()).GetID() == fixed.GetID()
    np.testing.assert_allclose(ijk_to_ras(out.jacobian_node), ijk_to_ras(fixed), atol=1e-6)
    np.testing.assert_allclose(ijk_to_ras(out.warped_node), ijk_to_ras(fixed), atol=1e-6)
    assert out.jacobian_node.GetDisplayNode().GetColorNode().GetName() == "DeepLungRegJacobianColors"
    # the table holds the metrics module's TRE for the written transform
    tx = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    expected_after = target_registration_error(transform_points(tx, small_pair.fixed_landmarks), small_pair.moving_landmarks)
    table = out.table_node.GetTable()
    col = table.GetColumnByName("TRE after (mm)")
    got = np.array([col.GetValue(i) for i in range(col.GetNumberOfTuples())])
    np.testing.assert_allclose(got, expected_after, rtol=1e-9)
    # the child read the landmarks from 6-decimal text files
    assert out.report["tre_mm"]["after"]["mean"] == pytest.approx(got.mean(), abs=1e-4)
    aff = table.GetColumnByName("TRE affine (mm)")
    aff_values = np.array([aff.GetValue(i) for i in range(aff.GetNumberOfTuples())])
    assert out.report["tre_mm"]["affine"]["mean"] == pytest.approx(aff_values.mean(), abs=1e-4)
    before_col = table.GetColumnByName("TRE before (mm)")
    before_mean = np.mean([before_col.GetValue(i) for i in range(before_col.GetNumberOfTuples())])
    assert aff_values.mean() < 0.6 * before_mean  # the affine column really holds the affine, not the identity
    assert out.plot_node.GetNumberOfPlotSeriesNodes() == 2
    assert out.mapped_markups.GetNumberOfControlPoints() == len(got)
    # the grid transform node reproduces the CLI mapping at the landmarks
    fp = out.transform_node.GetTransformFromParent()
    mapped = np.array([fp.TransformPoint(tuple(p * RAS)) for p in small_pair.fixed_landmarks]) * RAS
    np.testing.assert_allclose(mapped, transform_points(tx, small_pair.fixed_landmarks), atol=0.05)
    assert any("TRE before" in line for line in summary_lines(out))
    assert "UNTRAINED" in model_summary(tiny_model)


def test_child_command_runs_the_cli_module(tmp_path):
    args = RegistrationLogic.command_args({"fixed": Path("f.nrrd"), "moving": Path("m.nrrd")}, tmp_path, None)
    cmd, env = RegistrationLogic.child_command("/usr/bin/python3", args)
    assert cmd[:3] == ["/usr/bin/python3", "-m", "DeepLungRegLib.cli"] and "--progress-lines" in cmd
    assert env["PYTHONPATH"].split(":")[0].endswith("DeepLungReg")


def test_process_watcher_reads_progress_and_exit_code():
    import subprocess
    import sys
    import time

    from DeepLungRegLib.process import ProcessWatcher, parse_progress

    assert parse_progress("progress: 3/6 network").percent == 50
    assert parse_progress("progress: x/6") is None and parse_progress("hello") is None
    code = "import sys\nfor i in range(1, 4): print(f'progress: {i}/3 step{i}', flush=True)\n" \
           "print('deeplungreg: error: boom', flush=True)\nsys.exit(2)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = ProcessWatcher(proc)
    seen, rc = [], None
    deadline = time.time() + 30
    while rc is None and time.time() < deadline:
        progress, _, rc = watcher.poll()
        seen += progress
        time.sleep(0.05)
    assert rc == 2
    assert [p.done for p in seen] == [1, 2, 3] and seen[-1].text == "step3"
    assert watcher.errors() == ["deeplungreg: error: boom"]


def test_process_watcher_kill_stops_a_running_child():
    import subprocess
    import sys

    from DeepLungRegLib.process import ProcessWatcher

    proc = subprocess.Popen([sys.executable, "-c", "import time\nprint('progress: 0/1 x', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = ProcessWatcher(proc)
    watcher.kill()
    assert proc.poll() is not None
