"""Slicer edge on real MRML (slicer-core wheel, no mocks): volumes, markups, grid transforms, logic."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import drain, rotation  # noqa: E402
from DeepLungRegLib import slicer_io  # noqa: E402
from DeepLungRegLib.cli import main  # noqa: E402
from DeepLungRegLib.metrics import target_registration_error  # noqa: E402
from DeepLungRegLib.simulation import BreathingParams, simulate_pair  # noqa: E402
from DeepLungRegLib.slicer_logic import RegistrationLogic, model_summary, summary_lines  # noqa: E402
from DeepLungRegLib.transforms import full_transform, output_field, transform_points  # noqa: E402
from test_transforms import make_case  # noqa: E402

RAS = np.array([-1.0, -1.0, 1.0])


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ras_box(node) -> np.ndarray:
    """RAS corners (first and last voxel's outer edges) of a volume node."""
    dims = np.array(node.GetImageData().GetDimensions(), float)
    m = ijk_to_ras(node)
    return np.array([(m @ np.append(c, 1.0))[:3] for c in (np.full(3, -0.5), dims - 0.5)])


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
    assert main(logic.command_args(inputs, tmp_path / "out", tiny_model, "cpu", refine="off")) == 0
    out = logic.load_results(tmp_path / "out", fixed, moving, fm, mm)
    # nodes exist, on the fixed geometry
    assert out.transform_node.IsA("vtkMRMLGridTransformNode")
    assert out.transform_node.GetNodeReference(out.transform_node.GetMovingNodeReferenceRole()).GetID() == moving.GetID()
    assert out.transform_node.GetNodeReference(out.transform_node.GetFixedNodeReferenceRole()).GetID() == fixed.GetID()
    # the Jacobian map covers the fixed image's box (voxel edges) with its axes, at the lattice's resolution
    np.testing.assert_allclose(ras_box(out.jacobian_node), ras_box(fixed), atol=1e-4)
    jm, fm_ = ijk_to_ras(out.jacobian_node)[:3, :3], ijk_to_ras(fixed)[:3, :3]
    np.testing.assert_allclose(jm / np.linalg.norm(jm, axis=0), fm_ / np.linalg.norm(fm_, axis=0), atol=1e-6)
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
    cmd, env = RegistrationLogic.child_command("/usr/bin/python3", args, {"PYTHONPATH": "/x", "HOME": "/h"})
    assert cmd[:3] == ["/usr/bin/python3", "-m", "DeepLungRegLib.cli"] and "--progress-lines" in cmd
    assert env["PYTHONPATH"].split(":")[0].endswith("DeepLungReg") and env["PYTHONPATH"].endswith(":/x")
    assert env["HOME"] == "/h" and env["PYTHONIOENCODING"] == "utf-8"


def test_command_line_carries_refine_level_and_no_warped(tmp_path):
    """Issue 12, defect 11 (--no-warped was never passed) and the refine selector."""
    from DeepLungRegLib.options import MODULE_DEFAULT_REFINE

    inputs = {"fixed": Path("f.nrrd"), "moving": Path("m.nrrd")}
    args = RegistrationLogic.command_args(inputs, tmp_path, None)
    assert args[args.index("--refine") + 1] == MODULE_DEFAULT_REFINE and "--no-warped" not in args
    args = RegistrationLogic.command_args(inputs, tmp_path, None, refine="full", warped=False)
    assert args[args.index("--refine") + 1] == "full" and "--no-warped" in args
    assert "--refine" not in RegistrationLogic.command_args(inputs, tmp_path, None, refine=None)
    from DeepLungRegLib.cli import build_parser

    parsed = build_parser().parse_args(RegistrationLogic.command_args(inputs, tmp_path, None, "cpu", False, "off", False))
    assert parsed.no_warped and parsed.no_affine and parsed.device == "cpu"
    assert parsed.no_qa  # issue 15: Slicer shows the volumes itself, no qa.png for its runs


def test_process_watcher_reads_progress_and_exit_code():
    import subprocess
    import sys

    from DeepLungRegLib.process import ProcessWatcher, parse_progress

    assert parse_progress("progress: 3/6 network").percent == 50
    assert parse_progress("progress: x/6") is None and parse_progress("hello") is None
    code = "import sys\nfor i in range(1, 4): print(f'progress: {i}/3 step{i}', flush=True)\n" \
           "print('deeplungreg: error: boom', flush=True)\nsys.exit(2)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = ProcessWatcher(proc)
    seen, rc = drain(watcher)
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


# --------------------------------------------------------------------------- issue 12
def test_job_results_land_on_the_volumes_it_was_started_with(scene, small_pair, tiny_model, tmp_path):
    """Defect 8: the user changes the selection while the job runs; finish_job uses the job's nodes
    and options (here: no warped volume, so --no-warped is passed and nothing is warped)."""
    fixed = slicer_io.image_to_volume_node(small_pair.fixed, scene, "inhale")
    moving = slicer_io.image_to_volume_node(small_pair.moving, scene, "exhale")
    other = slicer_io.image_to_volume_node(small_pair.moving, scene, "another exhale")
    logic = RegistrationLogic(scene)
    job = logic.prepare_job(tmp_path, fixed, moving, tiny_model, "cpu", refine="off", load_warped=False,
                            show_jacobian=False)
    assert "--no-warped" in job.command and job.command[1:3] == ["-m", "DeepLungRegLib.cli"]
    assert main(job.command[3:]) == 0  # what the child process runs
    assert not (job.out_dir / "warped.nii.gz").exists()
    out = logic.finish_job(job)
    assert moving.GetTransformNodeID() == out.transform_node.GetID()
    assert other.GetTransformNodeID() is None and fixed.GetTransformNodeID() is None
    ref = out.transform_node.GetNodeReference(out.transform_node.GetMovingNodeReferenceRole())
    assert ref.GetID() == moving.GetID() and out.warped_node is None and job.show_jacobian is False
    # a job whose volume was deleted meanwhile reports it instead of writing into other nodes
    job2 = logic.prepare_job(tmp_path, fixed, other, tiny_model, "cpu", refine="off")
    scene.RemoveNode(other)
    with pytest.raises(ValueError, match="removed"):
        logic.finish_job(job2)
    with pytest.raises(ValueError, match="different"):
        logic.prepare_job(tmp_path, fixed, fixed, tiny_model)


def test_training_inputs_are_sanitised_unique_and_never_stale(scene, tmp_path):
    """Defect 2: no toSlicerSafeFileName in Slicer; two nodes with one name must not overwrite each
    other; a file from an earlier run is rewritten from the node's current content."""
    from DeepLungRegLib.slicer_logic import safe_file_stem, write_training_inputs

    arr = np.zeros((4, 5, 6), np.float32)
    a = slicer_io.image_to_volume_node(sitk.GetImageFromArray(arr), scene, "CT: lung/1 *")
    b = slicer_io.image_to_volume_node(sitk.GetImageFromArray(arr + 1), scene, "CT: lung/1 *")
    c = slicer_io.image_to_volume_node(sitk.GetImageFromArray(arr + 2), scene, "..")
    paths = write_training_inputs([a, b, c], tmp_path / "inputs")
    assert [p.name for p in paths] == ["CT_lung_1.nrrd", "CT_lung_1_2.nrrd", "volume.nrrd"]
    values = [float(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).mean()) for p in paths]
    assert values == [0.0, 1.0, 2.0]
    slicer_io.image_to_volume_node(sitk.GetImageFromArray(arr + 7), scene, "x", node=a)  # the node changes
    again = write_training_inputs([a], tmp_path / "inputs")
    assert again == paths[:1] and float(sitk.GetArrayFromImage(sitk.ReadImage(str(again[0]))).mean()) == 7.0
    assert not list((tmp_path / "inputs").glob(".*"))
    assert safe_file_stem("é ü") == "volume" and safe_file_stem("a" * 100) == "a" * 60


def test_training_command_and_outcome(tmp_path):
    """Defect 4: a child that fails after writing the model (no matplotlib for the curves) is a
    finished training with a warning, not a failure."""
    import time

    from DeepLungRegLib.cli import build_parser
    from DeepLungRegLib.slicer_logic import training_command_args, training_outcome

    args = training_command_args([tmp_path / "a.nrrd", tmp_path], tmp_path / "m", "eppenhof2018", 32, 100, "cpu",
                                 True, tmp_path / "v.nrrd")
    parsed = build_parser().parse_args(args)
    assert parsed.resume and parsed.grid == 32 and parsed.validation_image.endswith("v.nrrd")
    start = time.time()
    assert training_outcome(0, tmp_path, start) == "done"
    assert training_outcome(1, tmp_path, start) == "failed"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert training_outcome(1, tmp_path, start) == "model-written"
    assert training_outcome(1, tmp_path, start + 3600) == "failed"  # a model from an earlier run


def test_python_for_child_finds_pythonslicer_or_says_what_is_missing(tmp_path):
    """Defect 11: inside Slicer, a missing PythonSlicer is a clear error, not the GUI executable."""
    from DeepLungRegLib.slicer_logic import python_for_child

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gui = bin_dir / "SlicerApp-real"
    gui.write_text("")
    with pytest.raises(RuntimeError, match="PythonSlicer"):
        python_for_child(str(gui), inside_slicer=True)
    assert python_for_child(str(gui), inside_slicer=False) == str(gui)  # tests and scripts: this Python
    (bin_dir / "PythonSlicer").write_text("")
    assert python_for_child(str(gui), inside_slicer=True) == str(bin_dir / "PythonSlicer")
    assert python_for_child(str(bin_dir / "PythonSlicer"), inside_slicer=True) == str(bin_dir / "PythonSlicer")
