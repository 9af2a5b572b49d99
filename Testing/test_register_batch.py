"""``deeplungreg register-batch`` (issue 14 item 4): the model is loaded once, a failing pair is
reported and the batch goes on, and a second run skips the finished pairs."""

import json

from DeepLungRegLib import pipeline
from DeepLungRegLib.cli import main


def test_batch_loads_once_goes_past_failures_and_resumes(small_ct_file, tiny_model, tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("case,fixed,moving\n"
                        f"a,{small_ct_file},{small_ct_file}\n"
                        f"broken,{small_ct_file},{tmp_path / 'missing.nii.gz'}\n"
                        f"b,{small_ct_file},{small_ct_file}\n")
    loads = []
    real = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "out"
    args = ["register-batch", str(manifest), "-o", str(out), "--model", str(tiny_model), "--refine", "off",
            "--no-qa", "--no-warped", "--quiet"]
    assert main(args) == 1                       # one pair failed
    captured = capsys.readouterr()
    assert len(loads) == 1                       # the model was loaded once for the whole batch
    assert "deeplungreg: error: broken:" in captured.err and "missing.nii.gz" in captured.err
    assert "2 registered, 0 already done, 1 failed (broken)" in captured.out
    for case in ("a", "b"):
        assert (out / case / "transform.h5").is_file() and (out / case / "report.json").is_file()
    assert not (out / "broken").exists()
    batch = json.loads((out / "batch.json").read_text())
    assert batch["done"] == ["a", "b"] and list(batch["failed"]) == ["broken"]
    # resume: finished pairs are skipped, the failing one is tried again
    mtime = (out / "a" / "report.json").stat().st_mtime_ns
    assert main(args) == 1
    assert "0 registered, 2 already done, 1 failed" in capsys.readouterr().out
    assert (out / "a" / "report.json").stat().st_mtime_ns == mtime


def test_batch_needs_unique_case_names(small_ct_file, tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"case,fixed,moving\nx,{small_ct_file},{small_ct_file}\nx,{small_ct_file},{small_ct_file}\n")
    assert main(["register-batch", str(manifest), "-o", str(tmp_path / "o")]) == 2
    assert "case names must be unique" in capsys.readouterr().err
