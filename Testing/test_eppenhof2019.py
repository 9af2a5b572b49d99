"""eppenhof2019: the trapezoidal growing schedule, the Gaussian-gradient-magnitude input, the
progressive network at every growth stage, training, the baseline switch, the model file and the
command line end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.geometry import Lattice
from DeepLungRegLib.methods import get_method
from DeepLungRegLib.methods.base import PreparedPair
from DeepLungRegLib.methods.eppenhof2019 import (
    Eppenhof2019Config,
    Eppenhof2019Net,
    gradient_magnitude,
    grown,
)
from DeepLungRegLib.modelfile import load_model, save_model
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION, prepare_scan
from DeepLungRegTrainingLib.recipes import get_recipe
from DeepLungRegTrainingLib.recipes.eppenhof2019 import alphas, grown_iteration, level_start
from DeepLungRegTrainingLib.training import TrainConfig
from torch.utils.data import default_collate


# --------------------------------------------------------------------------- schedule
def test_schedule_matches_hand_computed_values_and_sums_to_one():
    """δ = 2000, Δ = 6000, four levels (64³ … 8³): τ_i = -3000 + 4000 (i - 1)."""
    assert [level_start(i, 2000, 6000) for i in (1, 2, 3, 4)] == [-3000, 1000, 5000, 9000]
    hand = {
        0: (1, 0, 0, 0),            # the paper: training starts with α = [1, 0, ...]
        1000: (1, 0, 0, 0),         # end of level 1's plateau
        1500: (0.75, 0.25, 0, 0),   # (τ_1 + Δ - t) / δ = (3000 - 1500) / 2000; (t - τ_2) / δ = 500 / 2000
        2000: (0.5, 0.5, 0, 0),
        3000: (0, 1, 0, 0),
        5000: (0, 1, 0, 0),
        6500: (0, 0.25, 0.75, 0),
        8000: (0, 0, 1, 0),
        10000: (0, 0, 0.5, 0.5),
        11000: (0, 0, 0, 1),
        50000: (0, 0, 0, 1),        # the finest level stays
    }
    for t, expected in hand.items():
        np.testing.assert_allclose(alphas(t, 4, 2000, 6000), expected, atol=1e-12, err_msg=f"t={t}")
    for levels, delta, big in ((4, 2000, 6000), (5, 2000, 6000), (4, 2000, 4000), (3, 7, 20), (4, 0, 10)):
        for t in range(0, int(level_start(levels, delta, big) + big + 50), max(1, delta // 40)):
            a = np.asarray(alphas(t, levels, delta, big))
            active = np.flatnonzero(a)
            assert abs(a.sum() - 1) < 1e-12 and ((a >= 0) & (a <= 1)).all(), (t, a)
            # one weight, or two neighbouring levels in a transition
            assert len(active) == 1 or (len(active) == 2 and active[1] == active[0] + 1), (t, a)
    # fully grown from the first step with t >= τ_L + δ
    assert grown_iteration(4, 2000, 6000) == 11001 and grown_iteration(5, 2000, 6000) == 15001
    assert alphas(11000, 4, 2000, 6000)[-1] == 1 and alphas(10999, 4, 2000, 6000)[-1] < 1


def test_before_step_sets_the_weights_from_the_iteration_alone():
    recipe = get_recipe("eppenhof2019")
    cfg = TrainConfig.for_method("eppenhof2019", grid=32, depth=3, width=2,
                                 options={"delta": "4", "Delta": "10"})
    net = recipe.build_network(cfg)
    assert net.alpha == (0, 0, 1)                       # built (and loaded) networks are fully grown
    cols = recipe.before_step(net, 1, cfg)
    assert cols == {"alpha_1": 1.0, "alpha_2": 0.0, "alpha_3": 0.0} and net.alpha == (1, 0, 0)
    later = recipe.before_step(net, 12, cfg)            # t = 11 >= τ_3 + δ = 7 + 4: grown
    assert later == {"alpha_1": 0.0, "alpha_2": 0.0, "alpha_3": 1.0}
    mid = recipe.before_step(net, 9, cfg)               # t = 8: α_2 = (τ_2 + Δ - t) / δ = (1 + 10 - 8) / 4
    np.testing.assert_allclose(list(mid.values()), [0, 0.75, 0.25])
    # a resumed run (fresh network, any order of calls) gets the same weights
    fresh = recipe.build_network(cfg)
    assert recipe.before_step(fresh, 9, cfg) == mid and fresh.alpha == net.alpha
    base = TrainConfig.for_method("eppenhof2019", grid=32, depth=3, width=2, options={"progressive": "0"})
    assert recipe.before_step(net, 1, base) == {"alpha_1": 0.0, "alpha_2": 0.0, "alpha_3": 1.0}


def test_options_are_checked():
    recipe = get_recipe("eppenhof2019")
    for options, message in (({"Delta": "3", "delta": "2"}, "Delta >= 2"), ({"progressive": "2"}, "0 or 1"),
                             ({"sigma": "1"}, "unknown --option"), ({"sources": "tps"}, "unknown pair source")):
        with pytest.raises(InputError, match=message):
            recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=32, depth=3, options=options))
    with pytest.raises(InputError, match="multiple of 8"):
        recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=36, depth=4))


def test_data_parallel_workers_are_refused(monkeypatch):
    """Unused parameters in a step (levels outside the schedule, side layers once grown) make
    DistributedDataParallel fail at its second step: refused with one line instead."""
    cfg = TrainConfig.for_method("eppenhof2019", grid=32, depth=3, options={"progressive": "0"})
    get_recipe("eppenhof2019").validate_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="--nproc"):
        get_recipe("eppenhof2019").validate_config(cfg)


def test_a_run_that_would_not_finish_growing_is_refused():
    """A saved model is always the fully grown network: the loop refuses runs whose averaged
    snapshots would be taken before α_L = 1 (paper schedule on 64³: grown at iteration 11001)."""
    recipe = get_recipe("eppenhof2019")
    short = TrainConfig.for_method("eppenhof2019", grid=64, depth=4, iterations=11000)
    with pytest.raises(InputError, match="fully grown from iteration 11001"):
        recipe.validate_config(short)
    # default averaging: the last ~10.5 % of the run must come after full growth
    with pytest.raises(InputError, match="fully grown"):
        recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=64, depth=4, iterations=12000))
    recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=64, depth=4, iterations=12400))
    recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=64, depth=4, iterations=11100,
                                                  average_last=2))
    # the baseline has nothing to grow
    recipe.validate_config(TrainConfig.for_method("eppenhof2019", grid=64, depth=4, iterations=100,
                                                  options={"progressive": "0"}))


# --------------------------------------------------------------------------- input
def test_gradient_magnitude_of_a_ramp_is_its_slope():
    shape = (20, 18, 16)
    k, j, i = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij")
    a, b, c = 0.03, -0.02, 0.05
    ramp = torch.stack((a * i + b * j + c * k, 0.1 * i, -0.2 * k + 1.0))[None]     # (1, 3, D, H, W)
    g = gradient_magnitude(ramp, 0.5)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    expected = torch.tensor([np.sqrt(a * a + b * b + c * c), 0.1, 0.2], dtype=torch.float64).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(g[inner], expected.expand_as(g[inner]), atol=1e-12, rtol=0)
    # a constant image has no gradient, and the magnitude does not depend on an offset
    torch.testing.assert_close(gradient_magnitude(torch.full((1, 1, 8, 8, 8), 0.7)), torch.zeros(1, 1, 8, 8, 8))
    noise = torch.rand(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gradient_magnitude(noise + 0.3), gradient_magnitude(noise), atol=1e-6, rtol=0)
    # separable filtering, axes and borders as an independent SciPy evaluation with the same kernels
    from DeepLungRegLib.methods.eppenhof2019 import _gaussian_kernels
    from scipy import ndimage

    vol = torch.rand(1, 1, 9, 11, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g1, d1 = (k.numpy() for k in _gaussian_kernels(0.5, torch.device("cpu"), torch.float64))
    arr = vol[0, 0].numpy()

    def filt(kernels):
        out = arr
        for axis, k in enumerate(kernels):
            out = ndimage.correlate1d(out, k, axis=axis, mode="nearest")
        return out

    ref = np.sqrt(filt((g1, g1, d1)) ** 2 + filt((g1, d1, g1)) ** 2 + filt((d1, g1, g1)) ** 2)
    np.testing.assert_allclose(gradient_magnitude(vol, 0.5)[0, 0].numpy(), ref, atol=1e-12)
    # σ smooths: the peak response to a unit step is below 1 and wider σ spreads it over more voxels
    step = (torch.arange(16) >= 8).double().view(1, 1, 1, 1, 16).expand(1, 1, 4, 4, 16)
    narrow, wide = gradient_magnitude(step, 0.5)[0, 0, 2, 2], gradient_magnitude(step, 1.5)[0, 0, 2, 2]
    assert float(narrow.max()) < 1 and int((wide > 0.05).sum()) > int((narrow > 0.05).sum())


def test_the_network_sees_gradient_magnitude_not_intensities():
    torch.manual_seed(0)
    net = Eppenhof2019Net(Eppenhof2019Config(width=2, depth=3)).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x + 0.2), net(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- network
def test_output_shape_and_active_layers_at_each_growth_stage():
    """32³ lattice, three levels (8³, 16³, 32³): the output is always the full lattice; only the
    layers of the active levels receive gradients; the side layers never do once grown."""
    torch.manual_seed(0)
    net = Eppenhof2019Net(Eppenhof2019Config(width=2, depth=3))
    x = torch.rand(2, 2, 32, 32, 24)
    stages = [(1, 0, 0), (0.5, 0.5, 0), (0, 1, 0), (0, 0.25, 0.75), (0, 0, 1)]
    for alpha in stages:
        net.zero_grad(set_to_none=True)
        net.set_alpha(alpha)
        u = net(x)
        assert u.shape == (2, 3, 32, 32, 24) and torch.isfinite(u).all()
        u.square().mean().backward()
        has = {name: p.grad is not None for name, p in net.named_parameters()}
        top = max(i for i, a in enumerate(alpha, 1) if a > 0)
        assert has["enc.0.0.weight"]                                   # the bottom level always works
        assert has["enc.2.0.weight"] == (top == 3)                      # the 32³ level only once added
        assert has["side_in.0.0.weight"] == (alpha[0] > 0)              # level 1's input layer
        assert has["side_in.1.0.weight"] == (top >= 2 and alpha[0] + alpha[1] > 0)   # level 2 runs, β_2 > 0
        assert has["side_out.0.weight"] == (alpha[0] > 0) and has["side_out.1.weight"] == (alpha[1] > 0)
        assert has["head.weight"] == (alpha[2] > 0)
    with pytest.raises(ValueError, match="summing to 1"):
        net.set_alpha((0.5, 0, 0))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.rand(1, 2, 32, 32, 30))


def test_the_grown_network_is_the_plain_unet_on_gradient_images():
    """With α = (0, …, 1) the side layers are unused: the output equals a :class:`UNet3D` with the
    same weights applied to the gradient-magnitude images."""
    torch.manual_seed(1)
    cfg = Eppenhof2019Config(width=3, depth=3)
    net = Eppenhof2019Net(cfg).eval()
    unet = UNet3D(UNetConfig(in_channels=2, out_channels=3, width=3, depth=3, norm="batch",
                             negative_slope=cfg.negative_slope)).eval()
    src = net.state_dict()
    mapped = {}
    for key in unet.state_dict():
        part, idx, rest = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
        if part == "down":
            mapped[key] = src[f"enc.{cfg.depth - 1 - int(idx)}.{rest}"]
        elif part in ("up", "dec"):
            mapped[key] = src[f"{part}.{idx}.{rest}"]
        else:
            mapped[key] = src[key]
    unet.load_state_dict(mapped)
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), unet(gradient_magnitude(x)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def scan(small_ct):
    return prepare_scan(small_ct, (32, 32, 32))


@pytest.mark.parametrize("options", [{"delta": "4", "Delta": "40"}, {"progressive": "0"}])
def test_a_few_training_steps_lower_the_loss(scan, options):
    """15 SGD steps on one pair: the coarsest level alone (progressive, t < τ_2 = 16) and the full
    network (baseline) both fit it."""
    recipe = get_recipe("eppenhof2019")
    cfg = TrainConfig.for_method("eppenhof2019", grid=32, depth=3, width=4, iterations=80, pair_pool=1,
                                 snapshot_every=1, options=options)
    recipe.validate_config(cfg)
    torch.manual_seed(0)
    net = recipe.build_network(cfg)
    batch = default_collate([recipe.dataset([scan], cfg)[0]])
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    losses = []
    for it in range(1, 16):
        alpha = recipe.before_step(net, it, cfg)
        assert alpha == ({"alpha_1": 0.0, "alpha_2": 0.0, "alpha_3": 1.0} if "progressive" in options
                         else {"alpha_1": 1.0, "alpha_2": 0.0, "alpha_3": 0.0})
        loss = recipe.loss(net, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.6 * losses[0], losses


def test_progressive_and_baseline_start_from_the_same_weights_and_pairs(scan):
    recipe = get_recipe("eppenhof2019")
    nets, items = [], []
    for progressive in ("1", "0"):
        cfg = TrainConfig.for_method("eppenhof2019", grid=32, depth=3, width=2, seed=5,
                                     options={"progressive": progressive, "delta": "2", "Delta": "4"})
        torch.manual_seed(cfg.seed)              # as the training loop does before building the network
        nets.append(recipe.build_network(cfg))
        items.append(recipe.dataset([scan], cfg)[3])
    a, b = (n.state_dict() for n in nets)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(*items, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- model file and CLI
def test_model_file_round_trip_and_predict(tmp_path):
    torch.manual_seed(2)
    net = Eppenhof2019Net(Eppenhof2019Config(width=2, depth=3))
    meta = {"method": "eppenhof2019", "grid_size": [32, 24, 16], "normalisation": NORMALISATION}
    save_model(tmp_path, net, meta)
    loaded, m = load_model(tmp_path)
    assert isinstance(loaded, Eppenhof2019Net) and m["network"]["architecture"] == "progressive_unet"
    assert m["network"]["depth"] == 3 and m["network"]["sigma"] == 0.5 and loaded.alpha == grown(3)
    method = get_method("eppenhof2019")
    assert method.grid_size(m) == (32, 24, 16)
    rng = np.random.default_rng(0)
    lattice = Lattice(size=(32, 24, 16), spacing=(2.0, 2.5, 3.0), origin=(0.0, 0.0, 0.0),
                      direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    pair = PreparedPair(rng.random((16, 24, 32), dtype=np.float32), rng.random((16, 24, 32), dtype=np.float32),
                        lattice)
    loaded.set_alpha((1, 0, 0))                 # predict always runs the fully grown network
    pred = method.predict(loaded, pair, m, torch.device("cpu"))
    assert pred.u_vox.shape == (1, 3, 16, 24, 32) and pred.u_vox.dtype == torch.float32
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(np.stack((pair.fixed, pair.moving))[None]))
    torch.testing.assert_close(pred.u_vox, ref)
    save_model(tmp_path / "bad", net, dict(meta, grid_size=[34, 24, 16]))
    with pytest.raises(InputError, match="multiple of 4"):
        load_model(tmp_path / "bad")


def test_train_then_register_through_the_cli(tmp_path, small_ct_file):
    from DeepLungRegLib.cli import main

    out = tmp_path / "model"
    common = ["train", "--method", "eppenhof2019", "--images", str(small_ct_file), "-o", str(out), "--grid", "32",
              "--depth", "3", "--width", "2", "--validation-pairs", "1", "--quiet"]
    # the paper's δ, Δ need 11001 iterations for three levels: refused before any work
    assert main([*common, "--iterations", "8"]) == 2 and not (out / "model.safetensors").exists()
    rc = main([*common, "--iterations", "8", "--validate-every", "4", "--snapshot-every", "2", "--average-last", "2",
               "--option", "delta=1", "--option", "Delta=2"])
    assert rc == 0
    net, meta = load_model(out)
    assert meta["method"] == "eppenhof2019" and meta["grid_size"] == 32 and net.alpha == grown(3)
    assert meta["schedule"] == {"progressive": True, "delta": 1, "Delta": 2, "levels": 3, "grown_at_iteration": 3}
    assert meta["synthesis_preset"]["name"] == "eppenhof2019"
    log = json.loads((out / "log.json").read_text())
    assert [r["alpha_1"] for r in log[:3]] == [1.0, 0.0, 0.0]     # τ = -1, 0, 1 with δ = 1, Δ = 2
    assert [r["alpha_2"] for r in log[:3]] == [0.0, 1.0, 0.0] and log[-1]["alpha_3"] == 1.0
    assert "epe_lung_mm" in log[3]
    reg = tmp_path / "reg"
    assert main(["register", str(small_ct_file), str(small_ct_file), "-o", str(reg), "--model", str(out),
                 "--refine", "off", "--no-qa"]) == 0
    assert (reg / "transform.h5").is_file()
