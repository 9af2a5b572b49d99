"""The QA picture (``qa.png``): panels, slice choice, physical aspect, orientation, CLI and evaluate."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_image
from DeepLungRegLib import qa
from DeepLungRegLib.cli import main
from DeepLungRegLib.io import write_lps_landmarks
from DeepLungRegLib.preprocessing import lung_mask

SHIFT_MM = (0.0, 0.0, 4.0)  # the moving copy's origin shift: fixed point p <-> moving point p + SHIFT_MM


def _ones_like(img: sitk.Image) -> sitk.Image:
    out = sitk.Image(img.GetSize(), sitk.sitkFloat32) + 1.0
    out.CopyInformation(img)
    return out


def _shifted(img: sitk.Image) -> sitk.Image:
    out = sitk.Image(img)
    out.SetOrigin(tuple(np.asarray(img.GetOrigin()) + SHIFT_MM))
    return out


def _panels(fig) -> dict:
    return {ax.get_label(): ax for ax in fig.axes if "/" in ax.get_label() and not ax.get_label().startswith("colorbar")}


@pytest.fixture(scope="module")
def small_input(small_ct):
    moving = _shifted(small_ct)
    lm = lung_mask(small_ct).mask
    lung_pts = np.argwhere(sitk.GetArrayFromImage(lm) > 0)[::50][:, ::-1].astype(float)
    fpts = np.array([lm.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in lung_pts])
    return qa.QAInput(small_ct, moving, sitk.TranslationTransform(3, SHIFT_MM), lm, _ones_like(small_ct),
                      fixed_points=fpts, moving_points=fpts + np.asarray(SHIFT_MM) + 0.5, method="test")


def test_figure_has_every_panel_with_and_without_landmarks(small_input, tmp_path):
    fig = qa.build_figure(small_input)
    panels = _panels(fig)
    assert sorted(panels) == sorted(f"{p}/{k}" for p in qa.PLANES for k in qa.KINDS)
    assert [ax.get_label() for ax in fig.axes].count("tre") == 1
    tre_ax = next(ax for ax in fig.axes if ax.get_label() == "tre")
    assert len(tre_ax.lines) == 2  # the two means marked (no "before" transform here: identity)
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "patient left on the image RIGHT" in texts and "TRE" in texts and "method test" in texts
    with_affine = qa.QAInput(**{**small_input.__dict__, "before": sitk.TranslationTransform(3, (0, 0, 3.0)),
                                "before_label": "affine only"})
    tre_ax = next(ax for ax in qa.build_figure(with_affine).axes if ax.get_label() == "tre")
    assert len(tre_ax.lines) == 3 and "affine only: mean" in " ".join(t.get_text() for t in tre_ax.get_legend().texts)
    no_lm = qa.QAInput(**{**small_input.__dict__, "fixed_points": None, "moving_points": None})
    fig = qa.build_figure(no_lm)
    assert len(_panels(fig)) == 18 and "tre" not in [ax.get_label() for ax in fig.axes]
    assert qa.save_figure(small_input, tmp_path / "qa.png") < 30
    assert (tmp_path / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_after_difference_is_smaller_for_a_correct_transform(small_input):
    planes = qa.sample_planes(small_input)
    for plane in qa.PLANES:
        lung = planes.images[plane]["lung"]
        before = np.abs(planes.images[plane]["diff_before"][lung]).mean()
        after = np.abs(planes.images[plane]["diff_after"][lung]).mean()
        assert after < 0.5 * before, plane


def test_slices_pass_through_the_lungs_not_the_mediastinum():
    """Two lungs of unequal size: the centroid of both lies between them (x = 0 is no lung), so the
    sagittal plane must go through the larger lung; every plane must cut the mask."""
    arr = np.full((40, 60, 80), -1000.0, np.float32)
    mask = np.zeros(arr.shape, np.uint8)
    mask[10:30, 20:45, 10:30] = 1   # patient right (small x): the larger lung
    mask[12:28, 22:40, 52:66] = 1   # patient left
    img = make_image(arr, spacing=(1.5, 1.5, 2.5), origin=(-60.0, -45.0, -50.0))
    lung = make_image(mask, spacing=(1.5, 1.5, 2.5), origin=(-60.0, -45.0, -50.0))
    lung = sitk.Cast(lung, sitk.sitkUInt8)
    data = qa.QAInput(img, img, sitk.Transform(), lung, _ones_like(img))
    planes = qa.sample_planes(data)
    for plane in qa.PLANES:
        assert planes.images[plane]["lung"].any(), plane
    x_lo, x_hi = -60.0 + 10 * 1.5, -60.0 + 29 * 1.5
    assert x_lo <= planes.point[0] <= x_hi  # inside the larger (right) lung


def test_real_ct_slices_cut_the_lung_mask(small_input):
    planes = qa.sample_planes(small_input)
    for plane in qa.PLANES:
        assert planes.images[plane]["lung"].mean() > 0.02, plane


def test_anisotropic_voxels_keep_their_physical_aspect_and_left_is_on_the_right():
    """A 1 x 1 x 5 mm volume of 60 x 50 x 30 voxels is 60 x 50 x 150 mm: the coronal panel is 2.5 times
    as tall as wide, not square. A bright blob at large x (patient left) is drawn on the image's right."""
    arr = np.full((30, 50, 60), -1000.0, np.float32)
    arr[:, 10:40, 45:55] = 100.0  # at large i = large x = patient left
    mask = np.zeros(arr.shape, np.uint8)
    mask[5:25, 10:40, 5:55] = 1
    img = make_image(arr, spacing=(1.0, 1.0, 5.0))
    lung = sitk.Cast(make_image(mask, spacing=(1.0, 1.0, 5.0)), sitk.sitkUInt8)
    fig = qa.build_figure(qa.QAInput(img, img, sitk.Transform(), lung, _ones_like(img)))
    panels = _panels(fig)
    for plane, ratio in (("coronal", 150 / 60), ("sagittal", 150 / 50), ("axial", 50 / 60)):
        ax = panels[f"{plane}/fixed"]
        left, right, bottom, top = ax.images[0].get_extent()
        assert abs(top - bottom) / abs(right - left) == pytest.approx(ratio, rel=0.05), plane
        assert ax.get_aspect() == 1.0  # equal data units: millimetres drawn square
    ax = panels["axial/fixed"]
    left, right, _, _ = ax.images[0].get_extent()
    shown = np.asarray(ax.images[0].get_array())
    cols = np.flatnonzero((shown > 0).any(axis=0))
    x_blob = left + (cols.mean() + 0.5) / shown.shape[1] * (right - left)
    assert left < right and x_blob > (left + right) / 2  # patient left on the image right


@pytest.fixture(scope="module")
def cli_pair(small_ct, tmp_path_factory):
    d = tmp_path_factory.mktemp("qa_pair")
    sitk.WriteImage(small_ct, str(d / "fixed.nii.gz"))
    sitk.WriteImage(_shifted(small_ct), str(d / "moving.nii.gz"))
    pts = np.array([[0.0, 0.0, 0.0], [40.0, -10.0, 20.0], [-50.0, 5.0, -10.0]]) + np.asarray(
        small_ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in small_ct.GetSize()]))
    write_lps_landmarks(d / "f.txt", pts)
    write_lps_landmarks(d / "m.txt", pts + np.asarray(SHIFT_MM))
    return d


def _register(pair, out, model, *extra):
    return main([str(a) for a in ["register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out,
                                  "--model", model, "--refine", "off", "--quiet", *extra]])


def test_register_writes_qa_png_and_reports_it(cli_pair, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(cli_pair, out, tiny_model, "--fixed-landmarks", cli_pair / "f.txt",
                     "--moving-landmarks", cli_pair / "m.txt") == 0
    assert (out / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["qa"]["written"] is True and report["qa"]["seconds"] > 0
    assert "transform_direction" in report and "tre_mm" in report and "qa" in report["timings_s"]


def test_no_qa_writes_none(cli_pair, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert _register(cli_pair, out, tiny_model, "--no-qa") == 0
    assert not (out / "qa.png").exists() and (out / "transform.h5").exists()
    assert json.loads((out / "report.json").read_text())["qa"]["written"] is False


def test_a_failing_figure_does_not_fail_the_registration(cli_pair, tiny_model, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no picture today")

    monkeypatch.setattr(qa, "build_figure", broken)
    out = tmp_path / "out"
    assert _register(cli_pair, out, tiny_model) == 0
    assert (out / "transform.h5").exists() and not (out / "qa.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["qa"] == {"written": False, "error": "RuntimeError: no picture today"}
    assert "qa.png not written" in capsys.readouterr().out


def test_evaluate_writes_a_picture_per_case_and_links_it(cli_pair, tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("case,fixed,moving,fixed_landmarks,moving_landmarks\n"
                        f"shift,{cli_pair / 'fixed.nii.gz'},{cli_pair / 'moving.nii.gz'},"
                        f"{cli_pair / 'f.txt'},{cli_pair / 'm.txt'}\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "identity,affine", "-o", str(out)]) == 0
    assert (out / "qa" / "shift_affine.png").stat().st_size > 10000
    assert not (out / "qa" / "shift_identity.png").exists()  # nothing to see without a registration
    assert "[shift_affine.png](qa/shift_affine.png)" in (out / "results.md").read_text()
    # --qa chooses the methods that get a picture
    out2 = tmp_path / "eval2"
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "identity,affine", "--qa", "none",
                 "-o", str(out2)]) == 0
    assert not (out2 / "qa").exists() and "qa/" not in (out2 / "results.md").read_text()
    assert main(["evaluate", "--pairs", str(manifest), "--methods", "affine", "--qa", "elastix",
                 "-o", str(tmp_path / "eval3")]) == 2
