"""``deeplungreg`` end to end: outputs, report, and clear failures that leave nothing behind."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib.cli import main
from DeepLungRegLib.io import write_lps_landmarks
from DeepLungRegLib.simulation import BreathingParams, simulate_pair
from DeepLungRegLib.transforms import transform_points


@pytest.fixture(scope="module")
def pair(small_ct, tmp_path_factory):
    """A real CT crop (4 mm) and a breathing-like deformed copy, with landmark pairs."""
    d = tmp_path_factory.mktemp("pair")
    sim = simulate_pair(small_ct, BreathingParams(n_landmarks=40, lattice_mm=4.0))
    sitk.WriteImage(sim.fixed, str(d / "fixed.nii.gz"))
    sitk.WriteImage(sim.moving, str(d / "moving.nii.gz"))
    write_lps_landmarks(d / "fixed_lm.txt", sim.fixed_landmarks)
    write_lps_landmarks(d / "moving_lm.txt", sim.moving_landmarks)
    return d


def run(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_register_writes_all_outputs(pair, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = run(["register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out, "--model", tiny_model,
                         "--fixed-landmarks", pair / "fixed_lm.txt", "--moving-landmarks", pair / "moving_lm.txt",
                         "--quiet"], capsys)
    assert rc == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "qa.png", "report.json", "transform.h5",
                                                     "warped.nii.gz"]
    report = json.loads((out / "report.json").read_text())
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    for name in ("warped.nii.gz", "jacobian.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    assert set(report["timings_s"]) >= {"load", "mask", "affine", "network", "transform", "warp", "jacobian",
                                        "write", "total"}
    assert report["model"]["untrained"] is True
    # TRE in the report equals TRE recomputed from the written file
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    f = np.loadtxt(pair / "fixed_lm.txt")
    m = np.loadtxt(pair / "moving_lm.txt")
    tre = np.linalg.norm(transform_points(tx, f) - m, axis=1)
    assert report["tre_mm"]["after"]["mean"] == pytest.approx(tre.mean(), rel=1e-6)
    assert report["tre_mm"]["before"]["mean"] == pytest.approx(np.linalg.norm(f - m, axis=1).mean(), rel=1e-9)
    # the affine pre-alignment alone already helps on a breathing-like pair
    assert report["tre_mm"]["affine"]["mean"] < report["tre_mm"]["before"]["mean"]
    assert 0.0 <= report["folding_percent"] <= 100.0
    assert report["transform_mapping_error_mm"]["max"] < 0.1


def _bad_inputs(tmp_path, pair, tiny_model):
    cases = {}
    img2d = tmp_path / "flat2d.nrrd"
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16) - 1000, str(img2d))
    cases["2D"] = ([img2d, pair / "moving.nii.gz"], [], "2D image")
    img4d = tmp_path / "vol4d.nrrd"
    vol = sitk.GetImageFromArray(np.full((8, 8, 8), -1000, np.int16))
    sitk.WriteImage(sitk.JoinSeries([vol, vol, vol]), str(img4d))
    cases["4D"] = ([img4d, pair / "moving.nii.gz"], [], "4D image")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    cases["empty"] = ([empty, pair / "moving.nii.gz"], [], "empty")
    nan = tmp_path / "nan.mha"  # (ITK's NIfTI writer stores NaN as 0)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((10, 10, 10), np.nan, np.float32)), str(nan))
    cases["nan"] = ([nan, pair / "moving.nii.gz"], [], "NaN")
    short = tmp_path / "short.txt"
    short.write_text("\n".join((pair / "moving_lm.txt").read_text().splitlines()[:-3]))
    cases["count"] = ([pair / "fixed.nii.gz", pair / "moving.nii.gz"],
                      ["--fixed-landmarks", pair / "fixed_lm.txt", "--moving-landmarks", short], "counts differ")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n4 x 6\n")
    cases["malformed"] = ([pair / "fixed.nii.gz", pair / "moving.nii.gz"],
                          ["--fixed-landmarks", bad, "--moving-landmarks", bad], "malformed")
    cases["missing"] = ([tmp_path / "nope.nii.gz", pair / "moving.nii.gz"], [], "no such file")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    cases["corrupt-model"] = ([pair / "fixed.nii.gz", pair / "moving.nii.gz"], ["--model", corrupt], "model")
    pk = tmp_path / "evil.pt"
    pk.write_bytes(pickle.dumps({"state_dict": {}, "metadata": "{}", "x": print}))
    cases["pickle-model"] = ([pair / "fixed.nii.gz", pair / "moving.nii.gz"], ["--model", pk], "refused")
    return cases


@pytest.mark.parametrize("case", ["2D", "4D", "empty", "nan", "count", "malformed", "missing", "corrupt-model",
                                  "pickle-model"])
def test_bad_input_fails_cleanly(case, pair, tiny_model, tmp_path, capsys):
    positional, extra, message = _bad_inputs(tmp_path, pair, tiny_model)[case]
    out = tmp_path / "out"
    args = ["register", *positional, "-o", out, "--quiet", *extra]
    if "--model" not in extra:
        args += ["--model", tiny_model]
    rc, _, err = run(args, capsys)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("deeplungreg: error:") and message in lines[0], err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_console_script_reports_error_and_exit_code(tmp_path):
    exe = [sys.executable, "-m", "DeepLungRegLib.cli", "register", str(tmp_path / "a.nii"), str(tmp_path / "b.nii"),
           "-o", str(tmp_path / "o")]
    proc = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such file" in proc.stderr
