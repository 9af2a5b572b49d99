"""Trainer: loss decreases, snapshot averaging, exact kill-and-resume, model file safety."""

import json
import pickle

import pytest
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.modelfile import load_model, read_metadata, save_model
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION
from DeepLungRegTrainingLib.training import SnapshotAverage, TrainConfig, train


@pytest.fixture(scope="module")
def scans(small_ct, tmp_path_factory):
    import SimpleITK as sitk

    d = tmp_path_factory.mktemp("scans")
    sitk.WriteImage(small_ct, str(d / "a.nii.gz"))
    flipped = sitk.Flip(small_ct, [True, False, False])
    sitk.WriteImage(flipped, str(d / "b.nii.gz"))
    return [d / "a.nii.gz", d / "b.nii.gz"]


def tiny_config(**kw):
    base = dict(grid=32, width=4, depth=3, iterations=40, validate_every=20, validation_pairs=2,
                snapshot_every=5, average_last=4, checkpoint_every=10, workers=0, lr=2e-2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_and_writes_model(scans, tmp_path):
    # One fixed pair repeated: the optimiser must fit it within a few dozen steps (the smaller fields of
    # the coefficient preset: the paper's grid point fields are too large for a 4-feature network in 40 steps).
    res = train(scans, tmp_path / "m", tiny_config(iterations=40, pair_pool=1, preset="eppenhof2018_coefficients",
                                                   options={"sources": "bspline"}), progress=False)
    losses = [r["loss"] for r in res.log]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    for name in ("model.safetensors", "checkpoint.pt", "log.csv", "log.json", "curves.png"):
        assert (tmp_path / "m" / name).is_file()
    meta = read_metadata(tmp_path / "m")
    assert meta["grid_size"] == 32 and meta["synthesis_preset"]["name"] == "eppenhof2018_coefficients"
    assert [s["file"] for s in meta["training"]["scans"]] == ["a.nii.gz"]
    assert meta["training"]["validation_scan"]["file"] == "b.nii.gz"
    assert len(meta["training"]["scans"][0]["sha256"]) == 64


class Stop(Exception):
    pass


def test_kill_and_resume_gives_identical_weights(scans, tmp_path):
    cfg = tiny_config(iterations=30)
    full = train(scans, tmp_path / "full", cfg, progress=False)

    def killer(row):
        if row["iteration"] == 17:
            raise Stop

    with pytest.raises(Stop):
        train(scans, tmp_path / "killed", cfg, progress=False, callback=killer)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 10
    resumed = train(scans, tmp_path / "killed", cfg, resume=True, progress=False)
    a, _ = load_model(full.model_path)
    b, _ = load_model(resumed.model_path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert [r["iteration"] for r in resumed.log] == list(range(1, 31))


def test_resuming_with_another_length_averages_only_the_new_window(scans, tmp_path):
    """Averaging (the last 4 snapshots, every 5 iterations) has begun at the checkpoint of iteration 20 of a
    30-iteration run; the run is resumed longer (its window moves ahead: a new average, exactly 4
    snapshots), a little longer (the window after 12 holds the same snapshots as the one after 10: kept,
    4 snapshots) or so that the window begins at 17 (the checkpoint's snapshot at 15 is too old: a new
    average from the resume point, 3 snapshots, warned) — never a snapshot older than the window."""
    import warnings

    def killer(row):
        if row["iteration"] == 22:
            raise Stop

    for iterations, expected_start, expected_count, warned in ((60, 40, 4, False), (32, 12, 4, False),
                                                               (37, 20, 3, True)):
        folder = tmp_path / f"run{iterations}"
        with pytest.raises(Stop):
            train(scans, folder, tiny_config(iterations=30), progress=False, callback=killer)
        ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert ckpt["iteration"] == 20 and ckpt["average"]["count"] == 2 and ckpt["average"]["start"] == 10
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = train(scans, folder, tiny_config(iterations=iterations, validate_every=100), resume=True,
                        progress=False)
        assert res.validation["averaged_from_iteration"] == expected_start
        assert res.validation["snapshots_averaged"] == expected_count
        assert any("fewer than the 4 snapshots" in str(w.message) for w in caught) == warned


def test_resumed_average_keeps_exactly_the_window_s_snapshots():
    """Every small case: the snapshots finally averaged are the new window's, all of them unless some were
    never kept (then warned), and none older."""
    import warnings

    from DeepLungRegTrainingLib.training import SnapshotAverage, _resumed_average

    every = 5
    for total_old in range(5, 41, 5):
        for last_old in (1, 2, 4):
            old_start = max(0, total_old - last_old * every)
            for resumed in range(every, total_old + 1, every):  # checkpoints at snapshot iterations
                taken = [i for i in range(every, resumed + 1, every) if i > old_start]
                for total_new in range(resumed, 61, 3):
                    for last_new in (1, 2, 4, 9):
                        wanted_start = max(0, total_new - last_new * every)
                        window = [i for i in range(every, total_new + 1, every) if i > wanted_start]
                        avg = SnapshotAverage(old_start)
                        avg.count, avg.sum = len(taken), ({"w": torch.zeros(1)} if taken else None)
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            kept = _resumed_average(avg, wanted_start, resumed, every, last_new)
                        final = (taken if kept is avg else []) + [i for i in range(resumed + every, total_new + 1, every)
                                                                  if i > kept.start]
                        case = (total_old, last_old, resumed, total_new, last_new)
                        assert set(final) <= set(window), case
                        assert bool(caught) == (len(final) < len(window)), case
                        assert kept.count == (len(taken) if kept is avg else 0), case


def test_resume_refuses_a_different_setup(scans, tmp_path):
    train(scans, tmp_path / "r", tiny_config(iterations=10), progress=False)
    with pytest.raises(InputError, match="width"):
        train(scans, tmp_path / "r", tiny_config(iterations=20, width=8), resume=True, progress=False)


def test_default_averaging_covers_the_last_part_of_training_only():
    # paper: the last 200 of ~1900 snapshots; ours by default the same fraction of the run
    cfg = TrainConfig(iterations=10000, snapshot_every=50)
    assert cfg.average_last is None
    assert cfg.averaged_snapshots() == round(200 / 1900 * 200)
    assert cfg.average_start() == 10000 - 21 * 50
    assert 0.85 * cfg.iterations < cfg.average_start() < 0.95 * cfg.iterations
    explicit = TrainConfig(iterations=10000, snapshot_every=50, average_last=200)
    assert explicit.average_start() == 0  # an explicit request is honoured
    assert TrainConfig(iterations=100, snapshot_every=50).averaged_snapshots() == 1


def test_training_rejects_unknown_methods(scans, tmp_path):
    with pytest.raises(InputError, match="unknown registration method"):
        train(scans, tmp_path / "u", tiny_config(method="nosuchpaper"), progress=False)


def test_snapshot_average_is_the_mean():
    avg = SnapshotAverage(start=0)
    for v in (1.0, 2.0, 6.0):
        avg.add({"w": torch.tensor([v]), "n": torch.tensor(int(v))})
    out = avg.average({"w": torch.tensor([0.0]), "n": torch.tensor(0)})
    assert out["w"].item() == pytest.approx(3.0) and out["n"].item() == 6


def test_model_file_round_trip_and_pickle_refused(tmp_path):
    torch.manual_seed(1)
    net = UNet3D(UNetConfig(width=4, depth=2, norm="instance"))
    meta = {"method": "eppenhof2018", "grid_size": 16, "normalisation": NORMALISATION, "extra": {"a": [1, 2]}}
    path = save_model(tmp_path / "m", net, meta)
    net2, meta2 = load_model(path)
    assert meta2["extra"] == {"a": [1, 2]} and meta2["network"]["norm"] == "instance"
    for va, vb in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": {}, "metadata": json.dumps(meta), "f": print}))
    with pytest.raises(InputError, match="refused"):
        load_model(evil)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(wrong), metadata={"deeplungreg": json.dumps({**meta, "format_version": 1,
              "displacement_units": "v", "network": UNetConfig().to_dict()})})
    with pytest.raises(InputError, match="do not match"):
        load_model(wrong)


def test_model_naming_an_unknown_method_fails_cleanly(tmp_path, small_ct_file, capsys):
    from DeepLungRegLib.cli import main

    net = UNet3D(UNetConfig(width=4, depth=2))
    path = save_model(tmp_path / "m", net, {"method": "smith2031", "grid_size": 16, "normalisation": NORMALISATION})
    with pytest.raises(InputError, match="unknown registration method 'smith2031'; known: eppenhof2018"):
        load_model(path)
    assert read_metadata(path)["method"] == "smith2031"  # the metadata itself still reads (model lists)
    rc = main(["register", str(small_ct_file), str(small_ct_file), "-o", str(tmp_path / "out"),
               "--model", str(path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "smith2031" in err[0] and err[0].startswith("deeplungreg: error:")
    assert not (tmp_path / "out").exists()


def test_cli_train_then_register_with_the_new_model(scans, tmp_path, capsys):
    from DeepLungRegLib.cli import main

    out = tmp_path / "model"
    args = ["train", "--images", str(scans[0]), str(scans[1]), "-o", str(out), "--grid", "32", "--width", "4",
            "--depth", "3", "--iterations", "6", "--validate-every", "3", "--validation-pairs", "1",
            "--snapshot-every", "2", "--average-last", "2", "--workers", "0", "--device", "cpu", "--quiet",
            "--progress-lines"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "progress: 6/6" in printed and '"iterations": 6' in printed
    assert main(["register", str(scans[0]), str(scans[1]), "-o", str(tmp_path / "reg"), "--model", str(out),
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "reg" / "report.json").read_text())
    assert report["model"]["grid_size"] == 32 and report["model"]["training"]["iterations"] == 6


def test_typed_options_accept_whole_numbers_from_text_and_python_and_refuse_the_rest():
    from DeepLungRegTrainingLib.recipes.base import typed_options

    spec = {"n": (2, int), "x": (0.5, float), "name": (None, str)}
    assert typed_options("m", {}, spec) == {"n": 2, "x": 0.5, "name": None}
    assert typed_options("m", {"n": "7", "x": "1e-3"}, spec)["n"] == 7
    assert typed_options("m", {"n": 3.0}, spec)["n"] == 3
    for bad in ({"n": "2.5"}, {"n": 2.5}, {"n": True}):
        with pytest.raises(InputError, match="whole number"):
            typed_options("m", bad, spec)
    for bad in ({"x": "nan"}, {"x": "inf"}, {"x": "steep"}):
        with pytest.raises(InputError, match="finite number"):
            typed_options("m", bad, spec)
    with pytest.raises(InputError, match="unknown --option y"):
        typed_options("m", {"y": 1}, spec)
