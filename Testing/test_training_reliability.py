"""Issue 13 item 11: training refuses bad settings, locks its output folder, reads damaged
checkpoints with a clear error and writes files other users can read; simulate checks its numbers."""

import math
import os
import stat
import subprocess
import sys

import pytest
from DeepLungRegLib.cli import main
from DeepLungRegLib.errors import InputError
from DeepLungRegTrainingLib.training import TrainConfig, train

TINY = dict(grid=16, width=4, depth=2, iterations=2, validate_every=2, validation_pairs=1, snapshot_every=1,
            checkpoint_every=1, workers=0, device="cpu")


@pytest.fixture(scope="module")
def scan(small_ct_file):
    return [small_ct_file]


@pytest.mark.parametrize("bad", [dict(iterations=0), dict(grid=0), dict(batch_size=0), dict(lr=math.nan),
                                 dict(lr=-1.0), dict(checkpoint_every=0), dict(average_last=0)])
def test_bad_numbers_are_one_line_errors(scan, tmp_path, bad):
    with pytest.raises(InputError, match="must be"):
        train(scan, tmp_path / "m", TrainConfig(**{**TINY, **bad}), progress=False)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_cli_reports_bad_numbers_in_one_line(scan, tmp_path, capsys):
    rc = main(["train", "--images", str(scan[0]), "-o", str(tmp_path / "m"), "--iterations", "0", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--iterations must be" in err[0]


def test_output_that_is_a_file_is_refused(scan, tmp_path):
    f = tmp_path / "model"
    f.write_text("not a folder")
    with pytest.raises(InputError, match="not a folder"):
        train(scan, f, TrainConfig(**TINY), progress=False)


def test_a_second_training_into_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(scan, tmp_path):
    import platform

    out = tmp_path / "m"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".training.lock").write_text(f"{sleeper.pid} {platform.node()}")
        with pytest.raises(InputError, match=f"another training is writing here \\(process {sleeper.pid}"):
            train(scan, out, TrainConfig(**TINY), progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: the lock is stale, the run goes ahead and releases it
    res = train(scan, out, TrainConfig(**TINY), progress=False)
    assert res.model_path.is_file() and not (out / ".training.lock").exists()


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint"])
def test_damaged_checkpoint_on_resume_is_a_clear_error(scan, tmp_path, content):
    out = tmp_path / "m"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(content)
    with pytest.raises(InputError, match="checkpoint is (empty|damaged)"):
        train(scan, out, TrainConfig(**TINY), resume=True, progress=False)
    assert not (out / ".training.lock").exists()


def test_model_and_log_files_follow_the_umask(scan, tmp_path):
    old = os.umask(0o022)
    try:
        res = train(scan, tmp_path / "m", TrainConfig(**TINY), progress=False)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "log.csv", "log.json", "checkpoint.pt"):
        mode = stat.S_IMODE((res.model_path.parent / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


@pytest.mark.parametrize("args, message", [(["--landmarks", "0"], "--landmarks must be"),
                                           (["--amplitude", "nan"], "--amplitude must be")])
def test_simulate_checks_its_numbers(small_ct_file, tmp_path, capsys, args, message):
    rc = main(["simulate", str(small_ct_file), "-o", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()
