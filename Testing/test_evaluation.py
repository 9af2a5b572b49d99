"""Breathing simulator and the evaluation harness (DIR-Lab folders, manifests, oracle, elastix)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib import io
from DeepLungRegLib.cli import main
from DeepLungRegLib.evaluation import evaluate, find_dirlab_cases, make_methods, read_manifest
from DeepLungRegLib.simulation import BreathingParams, simulate_pair
from DeepLungRegLib.transforms import transform_points


@pytest.fixture(scope="module")
def sim(small_ct):
    return simulate_pair(small_ct, BreathingParams(n_landmarks=60, lattice_mm=4.0))


def test_simulated_landmarks_follow_the_field_exactly(sim):
    v = sitk.DisplacementFieldTransform(sitk.Image(sim.v))
    p = np.array([v.TransformPoint(tuple(q)) for q in sim.moving_landmarks])
    np.testing.assert_allclose(p, sim.fixed_landmarks, atol=1e-9)
    u = sitk.DisplacementFieldTransform(sitk.Image(sim.u))  # fixed -> moving ground truth
    q = np.array([u.TransformPoint(tuple(x)) for x in sim.fixed_landmarks])
    assert np.abs(q - sim.moving_landmarks).max() < 0.5
    assert len(sim.fixed_landmarks) == 60 and sim.min_jacobian > 0


def test_lungs_move_more_than_chest_wall_and_get_denser(sim):
    v = sitk.GetArrayFromImage(sim.v)
    mag = np.linalg.norm(v, axis=-1)
    lung = sitk.GetArrayFromImage(sitk.Resample(sim.lung_mask, sim.v, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    body = sitk.GetArrayFromImage(sitk.Resample(sim.fixed, sim.v, sitk.Transform(), sitk.sitkLinear, -1000)) > -300
    assert mag[lung].mean() > 3 * mag[body & ~lung].mean()
    assert v[..., 2][lung].mean() < 0  # inhale position inferior to exhale: v points to -z (LPS z = superior)
    lung_full = sitk.GetArrayFromImage(sitk.Resample(sim.lung_mask, sim.fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    f, m = sitk.GetArrayFromImage(sim.fixed), sitk.GetArrayFromImage(sim.moving)
    assert m[lung_full].mean() > f[lung_full].mean() + 10  # exhaled lung is denser


def _phantom_ct(size):
    """Air, a body ellipse and two lungs with some texture, as DIR-Lab-like int16 (kji)."""
    nx, ny, nz = size
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    arr = np.full((nz, ny, nx), -1000, np.int16)
    body = ((i - nx / 2) / (0.42 * nx)) ** 2 + ((j - ny / 2) / (0.35 * ny)) ** 2 < 1
    arr[body] = 40
    for c in (0.32, 0.68):
        lung = ((i - c * nx) / (0.13 * nx)) ** 2 + ((j - ny / 2) / (0.22 * ny)) ** 2 + ((k - nz / 2) / (0.4 * nz)) ** 2 < 1
        arr[lung] = -850
    rng = np.random.default_rng(0)
    arr = arr + rng.integers(-20, 20, size=arr.shape).astype(np.int16)
    return arr


def test_evaluate_dirlab_folder_reproduces_hand_computed_tre(tmp_path, capsys):
    size, spacing = io.DIRLAB_4DCT[1]
    pack = tmp_path / "dirlab" / "Case1Pack"
    (pack / "Images").mkdir(parents=True)
    (pack / "ExtremePhases").mkdir()
    ct = _phantom_ct(size)
    (ct + 1024).astype("<i2").tofile(pack / "Images" / "case1_T00_s.img")  # stored as HU + 1024
    (ct + 1024).astype("<i2").tofile(pack / "Images" / "case1_T50_s.img")
    a = np.array([[100, 120, 40], [150, 130, 50], [90, 100, 30]])
    b = a + np.array([[0, 0, 2], [1, -2, 3], [0, 3, 0]])
    (pack / "ExtremePhases" / "Case1_300_T00_xyz.txt").write_text("\r\n".join("\t".join(map(str, r)) for r in a))
    (pack / "ExtremePhases" / "Case1_300_T50_xyz.txt").write_text("\n".join(" ".join(map(str, r)) for r in b))
    expected = np.linalg.norm((b - a) * np.asarray(spacing), axis=1).mean()
    out = tmp_path / "eval"
    assert main(["evaluate", "--dirlab", str(tmp_path / "dirlab"), "--methods", "identity", "-o", str(out)]) == 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:8] == ["case", "method", "tre_mean_before", "tre_mean_after", "tre_std_after",
                                 "tre_p95_after", "tre_max_after", "folding_pct"]
    assert rows[0]["case"] == "case1" and float(rows[0]["tre_mean_before"]) == pytest.approx(expected, rel=1e-5)
    assert float(rows[0]["tre_mean_after"]) == pytest.approx(expected, rel=1e-5)
    assert float(rows[0]["folding_pct"]) == 0.0
    assert "HU + 1024" in (out / "results.md").read_text()
    for name in ("tre_scatter.png", "tre_boxplots.png", "jacobian_case1.png"):
        assert (out / name).stat().st_size > 1000
    with pytest.raises(Exception, match="case"):
        find_dirlab_cases(tmp_path / "dirlab", cases=[2])


def _manifest(tmp_path, sim):
    d = tmp_path / "pair"
    d.mkdir()
    sitk.WriteImage(sim.fixed, str(d / "fixed.nii.gz"))
    sitk.WriteImage(sim.moving, str(d / "moving.nii.gz"))
    io.write_lps_landmarks(d / "f.txt", sim.fixed_landmarks)
    io.write_lps_landmarks(d / "m.txt", sim.moving_landmarks)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(sim.u)), str(d / "gt.h5"))
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("case,fixed,moving,fixed_landmarks,moving_landmarks,ground_truth\n"
                        "sim,pair/fixed.nii.gz,pair/moving.nii.gz,pair/f.txt,pair/m.txt,pair/gt.h5\n")
    return manifest


def test_oracle_gives_near_zero_and_identity_the_initial_tre(tmp_path, sim):
    cases = read_manifest(_manifest(tmp_path, sim))
    rows = evaluate(cases, make_methods(["identity", "oracle"]), tmp_path / "out", log=lambda s: None)
    by = {r["method"]: r for r in rows}
    initial = np.linalg.norm(sim.fixed_landmarks - sim.moving_landmarks, axis=1).mean()
    assert by["identity"]["tre_mean_after"] == pytest.approx(initial, rel=1e-6)
    assert by["oracle"]["tre_mean_after"] < 0.1 * initial and by["oracle"]["tre_mean_after"] < 0.3
    assert by["oracle"]["folding_pct_lung"] == 0.0


def test_elastix_baseline_improves_over_identity(tmp_path, sim):
    cases = read_manifest(_manifest(tmp_path, sim))
    methods = make_methods(["identity", "elastix"], elastix_iterations=60, elastix_resolutions=2)
    rows = evaluate(cases, methods, tmp_path / "out", log=lambda s: None)
    by = {r["method"]: r for r in rows}
    assert by["elastix"]["tre_mean_after"] < 0.6 * by["identity"]["tre_mean_after"]
    assert by["elastix"]["seconds"] > 0
    assert not (Path.cwd() / "deformationField.nii").exists()  # transformix output kept out of the cwd


def test_file_finder_handles_release_naming_variants(tmp_path):
    layout = {
        "Case6Pack/Images/case6_T00_s.img", "Case6Pack/Images/case6_T50_s.img", "Case6Pack/Images/case6_T10_s.img",
        "Case6Pack/ExtremePhases/case6_dirLab300_T00_xyz.txt", "Case6Pack/ExtremePhases/case6_dirLab300_T50_xyz.txt",
        "Case6Pack/Sampled4D/case6_4D-75_T00.txt",
        "Case10Pack/Images/case10_T00.img", "Case10Pack/Images/case10_T50.img",
        "Case10Pack/ExtremePhases/Case10_300_T00_xyz.txt", "Case10Pack/ExtremePhases/Case10_300_T50_xyz.txt",
        "copd/copd1/copd1_iBHCT.img", "copd/copd1/copd1_eBHCT.img",
        "copd/copd1/copd1_300_iBH_xyz_r1.txt", "copd/copd1/copd1_300_eBH_xyz_r1.txt",
    }
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    cases = {c.name: c for c in find_dirlab_cases(tmp_path)}
    assert sorted(cases) == ["case10", "case6"]
    assert cases["case6"].fixed.name == "case6_T00_s.img" and cases["case6"].moving.name == "case6_T50_s.img"
    assert cases["case6"].fixed_landmarks.name == "case6_dirLab300_T00_xyz.txt"
    assert cases["case10"].moving_landmarks.name == "Case10_300_T50_xyz.txt"
    assert [c.name for c in find_dirlab_cases(tmp_path, cases=[10])] == ["case10"]
    copd = find_dirlab_cases(tmp_path / "copd", copd=True)
    assert copd[0].fixed.name == "copd1_iBHCT.img" and copd[0].moving_landmarks.name == "copd1_300_eBH_xyz_r1.txt"


def test_demons_baseline_improves_over_identity(tmp_path, sim):
    cases = read_manifest(_manifest(tmp_path, sim))
    rows = evaluate(cases, make_methods(["identity", "demons"]), tmp_path / "out", log=lambda s: None)
    by = {r["method"]: r for r in rows}
    assert by["demons"]["tre_mean_after"] < 0.8 * by["identity"]["tre_mean_after"]


def test_methods_come_from_the_registry_with_refine_levels(tmp_path, tiny_model):
    from DeepLungRegLib.errors import InputError
    from DeepLungRegLib.evaluation import method_choices
    from DeepLungRegLib.methods import method_names

    assert set(method_names()) <= set(method_choices())
    methods = make_methods(["deeplungreg:off", "eppenhof2018:fast"], model=tiny_model)
    assert list(methods) == ["deeplungreg:off", "eppenhof2018:fast"]
    for bad in (["nosuchpaper"], ["deeplungreg:fastest"], ["elastix:full2"]):
        with pytest.raises(InputError, match="unknown method"):
            make_methods(bad)


def test_evaluate_keeps_one_method_per_case_for_the_viewer(tmp_path, sim, capsys):
    """``evaluate -o OUT`` keeps the chosen method's result per case in the form ``deeplungreg view OUT --case
    NAME`` reads: the transform reproduces the TRE the table reports, the landmark files are recorded."""
    from DeepLungRegLib.viewer_data import landmark_paths, resolve_output

    manifest = _manifest(tmp_path, sim)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "identity,oracle,affine", "--qa", "none",
                 "-o", str(out)]) == 0
    assert "affine for 'deeplungreg view" in capsys.readouterr().out   # auto: the first non-identity, non-oracle
    folder = resolve_output(out, "sim")
    assert folder == out / "sim"
    report = json.loads((folder / "report.json").read_text())
    assert report["method"] == "affine"
    with open(out / "results.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["method"] == "affine")
    tx = sitk.ReadTransform(str(folder / "transform.h5"))
    f, m = io.read_landmarks(report["landmark_files"]["fixed"]), io.read_landmarks(report["landmark_files"]["moving"])
    tre = np.linalg.norm(transform_points(tx, f) - m, axis=1).mean()
    assert tre == pytest.approx(float(row["tre_mean_after"]), rel=1e-4)
    assert report["tre_mm"]["after"]["mean"] == pytest.approx(tre, rel=1e-6)
    assert landmark_paths(report, None, None)[2] == "report.json"
    assert sitk.ReadImage(str(folder / "jacobian.nii.gz")).GetDimension() == 3
    out2 = tmp_path / "eval_none"
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "identity", "--view", "none", "--qa", "none",
                 "-o", str(out2)]) == 0
    assert not (out2 / "sim").exists()
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "identity", "--view", "elastix",
                 "-o", str(out2)]) == 2
    assert "--view names a method not evaluated: elastix" in capsys.readouterr().err
