"""eppenhof2018 recipe: pair sources (B-spline, breathing, still), options, validation columns."""

import pytest
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.recipes import get_recipe
from DeepLungRegTrainingLib.recipes.eppenhof2018 import SyntheticPairDataset, parse_options
from DeepLungRegTrainingLib.training import TrainConfig, plot_curves


@pytest.fixture(scope="module")
def scan(small_ct):
    return prepare_scan(small_ct, 32)


def test_defaults_follow_the_paper_and_mix_sources():
    o = parse_options({})
    assert o["slope"] == 0.01
    assert o["sources"] == pytest.approx({"bspline": 0.6, "breathing": 0.3, "still": 0.1})
    cfg = TrainConfig.for_method("eppenhof2018", grid=32, width=4, depth=3)
    assert get_recipe("eppenhof2018").build_network(cfg).config.negative_slope == 0.01
    assert parse_options({"sources": "bspline:3,still:1"})["sources"] == {"bspline": 0.75, "still": 0.25}


@pytest.mark.parametrize("raw,words", [
    ({"colour": "red"}, "unknown --option colour"),
    ({"sources": "bspline,wind:1"}, "unknown pair source 'wind'"),
    ({"sources": "bspline:x"}, "not a number"),
    ({"sources": "bspline:0"}, "no pair source"),
    ({"slope": "1.5"}, "slope must be in [0, 1)"),
    ({"slope": "steep"}, "not a finite number"),
])
def test_bad_options_are_one_line_errors(raw, words):
    with pytest.raises(InputError) as e:
        parse_options(raw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_each_source_gives_its_kind_of_pair(scan):
    def first(source):
        ds = SyntheticPairDataset([scan], "eppenhof2018", seed=3, sources={source: 1.0})
        return ds[0]

    fixed, moving, target, mask = first("still")
    assert target.abs().max() == 0 and fixed.shape == (1, 32, 32, 32) and mask.sum() > 0
    fixed, moving, target, mask = first("breathing")
    # breathing: cranio-caudal (k, channel 2) motion dominates inside the lung
    lung = mask[0] > 0.5
    assert target[2][lung].abs().mean() > target[0][lung].abs().mean()
    assert target.abs().max() > 0.5 and not torch.equal(fixed, moving)
    fixed, moving, target, mask = first("bspline")
    assert target.abs().max() > 0.5 and target.shape == (3, 32, 32, 32)


def test_sources_are_drawn_with_their_weights(scan):
    ds = SyntheticPairDataset([scan], "eppenhof2018", seed=0, sources={"bspline": 0.5, "still": 0.5})
    still = sum(int(ds[n][2].abs().max() == 0) for n in range(40))
    assert 10 <= still <= 30


def test_validation_reports_breathing_and_identical_pairs(scan):
    cfg = TrainConfig.for_method("eppenhof2018", grid=32, width=4, depth=3, validation_pairs=2)
    recipe = get_recipe("eppenhof2018")
    val = recipe.validator(scan, cfg)
    ident = val.evaluate(None, torch.device("cpu"))
    assert ident["still_mm"] == 0 and ident["breathing_epe_mm"] > 1.0 and ident["epe_lung_mm"] > 0.5
    net = recipe.build_network(cfg)
    with torch.no_grad():
        net.head.bias.fill_(1.0)        # a network predicting 1 voxel everywhere
    out = val.evaluate(net, torch.device("cpu"))
    assert out["still_mm"] > 0.5 * min(scan.grid.spacing)


def test_curves_show_the_schedule_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    panels = []
    real = plt.subplots

    def spy(*a, **k):
        fig, ax = real(*a, **k)
        panels.append(len(ax))
        return fig, ax

    monkeypatch.setattr(plt, "subplots", spy)
    log = [{"iteration": i, "loss": 1.0 / i, "alpha_1": max(0.0, 1 - i / 5), "alpha_2": min(1.0, i / 5)}
           for i in range(1, 11)]
    log[-1].update(epe_lung_mm=2.0, breathing_epe_mm=3.0)
    plot_curves(tmp_path, log)
    plot_curves(tmp_path, [{k: v for k, v in r.items() if not k.startswith("alpha")} for r in log])
    assert panels == [3, 2] and (tmp_path / "curves.png").stat().st_size > 1000
