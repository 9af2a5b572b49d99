"""hering2021: multilevel network, its composition, losses, progressive training, the generator of
breathing pairs, the model file and the shipped model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.fields import warp
from DeepLungRegLib.losses import volume_change_penalty
from DeepLungRegLib.methods import get_method
from DeepLungRegLib.methods.hering2021 import (
    Hering2021Config,
    Hering2021Net,
    downsample,
    level_shape,
    level_spacing,
)
from DeepLungRegLib.modelfile import load_model, save_model
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.breathing import BreathingRanges, invert, make_breathing_pair, sample_field
from DeepLungRegTrainingLib.recipes import get_recipe
from DeepLungRegTrainingLib.recipes.hering2021 import (
    level_of,
    level_terms,
    parse_options,
    stage_starts,
    total_loss,
)
from DeepLungRegTrainingLib.training import TrainConfig
from torch.utils.data import default_collate


def _smooth_field(shape, amp, phase):
    """A smooth voxel displacement (1, 3, D, H, W) built from sines (channels i, j, k)."""
    d, h, w = shape
    kk, jj, ii = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    comps = [amp[c] * torch.sin(math.pi * (0.5 * ii / w + 0.3 * jj / h + 0.4 * kk / d) + phase[c]) for c in range(3)]
    return torch.stack(comps, 0)[None].double()


def _analytic(amp, phase, shape):
    d, h, w = shape

    def f(p):  # p (N, 3) i, j, k -> displacement (N, 3)
        arg = math.pi * (0.5 * p[:, 0] / w + 0.3 * p[:, 1] / h + 0.4 * p[:, 2] / d)
        return torch.stack([amp[c] * torch.sin(arg + phase[c]) for c in range(3)], 1)
    return f


# --------------------------------------------------------------------------- composition
def test_composed_level_fields_equal_applying_them_in_sequence(monkeypatch):
    """forward() composes the level fields as T_coarse ∘ T_fine; at random points the result equals
    applying the fine field first and then the coarse one, analytically (< 0.05 mm at 1.5 mm spacing)."""
    shape = (32, 32, 32)
    net = Hering2021Net(Hering2021Config(levels=2, width=2, depth=2)).double()
    coarse_amp, fine_amp = (2.0, -1.5, 3.0), (0.8, 0.6, -0.7)
    phases = (0.1, 0.7, 1.3)
    coarse = _analytic(coarse_amp, phases, shape)   # the coarse level's field in lattice voxels, analytically
    # sampled on the level-2 grid: node n sits at lattice index n·r and its displacement is in level voxels
    ls = level_shape(shape, 2)
    r = torch.tensor([(shape[2 - a] - 1) / (ls[2 - a] - 1) for a in range(3)], dtype=torch.float64)  # i, j, k
    kk, jj, ii = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in ls), indexing="ij")
    nodes = torch.stack((ii, jj, kk), -1).reshape(-1, 3) * r
    coarse_level = (coarse(nodes) / r).t().reshape(1, 3, *ls)
    calls = []

    def fake_level_field(level, fixed, moving, u_prev):
        calls.append((level, u_prev is None))
        if level == 2:
            return coarse_level.to(fixed.dtype)
        return _smooth_field(shape, fine_amp, phases[::-1]).to(fixed.dtype)

    monkeypatch.setattr(net, "level_field", fake_level_field)
    x = torch.zeros((1, 1) + shape, dtype=torch.float64)
    u = net(x, x)
    assert calls == [(2, True), (1, False)]
    g = torch.Generator().manual_seed(0)
    pts = 4 + 23 * torch.rand((200, 3), generator=g, dtype=torch.float64)
    fine = _analytic(fine_amp, phases[::-1], shape)
    after_fine = pts + fine(pts)
    expected = after_fine + coarse(after_fine)
    got = pts + sample_field(u, pts)
    err_mm = ((got - expected) * 1.5).norm(dim=1)
    assert err_mm.max() < 0.05, float(err_mm.max())
    # and not the other order (the test can tell them apart)
    after_coarse = pts + coarse(pts)
    wrong = after_coarse + fine(after_coarse)
    assert ((got - wrong) * 1.5).norm(dim=1).mean() > 2 * err_mm.max()


def test_pyramid_shapes_and_spacing():
    assert level_shape((96, 80, 96), 3) == (24, 20, 24)
    x = torch.rand(1, 1, 32, 16, 24)
    assert downsample(x, 2).shape[2:] == (16, 8, 12)
    assert torch.equal(downsample(x, 1), x)
    sp = level_spacing(torch.tensor([1.0, 2.0, 3.0]), (32, 16, 24), 2)  # (s_i, s_j, s_k); shape (D, H, W)
    assert torch.allclose(sp, torch.tensor([23 / 11, 2 * 15 / 7, 3 * 31 / 15]))
    net = Hering2021Net(Hering2021Config(levels=3, width=2, depth=3))
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.zeros(1, 1, 24, 32, 32), torch.zeros(1, 1, 24, 32, 32))


# --------------------------------------------------------------------------- volume change
@pytest.mark.parametrize("t", [0.2, 0.1, 0.05])
def test_volume_change_barrier_value_and_gradient_at_above_below_t(t):
    z = torch.tensor([t - 0.5, t - 1e-6, t, t + 1e-6, 0.7, 1.0, 1.6, -0.3], dtype=torch.float64, requires_grad=True)
    vals = torch.stack([volume_change_penalty(zi.view(1, 1, 1, 1, 1), t) for zi in z])
    vals.sum().backward()
    above = lambda v: (v - 1) ** 2 / v  # noqa: E731
    # above t: the paper's ψ; symmetric (ψ(z) = ψ(1/z)); zero with zero gradient at 1
    assert vals[4].item() == pytest.approx(above(0.7)) and vals[6].item() == pytest.approx(above(1.6))
    assert above(1.6) == pytest.approx(above(1 / 1.6))
    assert vals[5].item() == 0 and z.grad[5].item() == pytest.approx(0.0)
    assert z.grad[4].item() == pytest.approx(1 - 1 / 0.7**2) and z.grad[6].item() == pytest.approx(1 - 1 / 1.6**2)
    # continuous and continuously differentiable at t
    assert vals[1].item() == pytest.approx(vals[3].item(), abs=3e-6 * abs(1 - 1 / t**2))
    assert vals[2].item() == pytest.approx(above(t))
    assert z.grad[1].item() == pytest.approx(z.grad[3].item(), rel=1e-3)
    # below t: the tangent line with slope 1 - 1/t² (finite for folded z <= 0)
    slope = 1 - 1 / t**2
    assert z.grad[0].item() == pytest.approx(slope) and z.grad[7].item() == pytest.approx(slope)
    assert vals[7].item() == pytest.approx(above(t) + slope * (-0.3 - t))


# --------------------------------------------------------------------------- options and schedule
def test_options_and_level_schedule():
    opts = parse_options({})
    assert (opts["alpha"], opts["beta"], opts["gamma"], opts["eps"], opts["t"]) == (10.0, 1.0, 0.01, 1.0, 0.2)
    assert opts["sources"] == pytest.approx({"breathing": 0.7, "bspline": 0.3})
    with pytest.raises(InputError, match="unknown --option"):
        parse_options({"lamda": "1"})
    with pytest.raises(InputError, match="needs --option pairs"):
        parse_options({"sources": "pairs:1"})
    with pytest.raises(InputError, match="3 counts"):
        parse_options({"level_iterations": "5,5"})
    assert stage_starts(9, 3) == [1, 4, 7]
    assert [level_of(i, 9, 3) for i in range(1, 10)] == [3, 3, 3, 2, 2, 2, 1, 1, 1]
    assert [level_of(i, 6, 3, [3, 2, 1]) for i in range(1, 7)] == [3, 3, 3, 2, 2, 1]
    cfg = TrainConfig.for_method("hering2021", iterations=10, options={"level_iterations": "5,3,1"})
    with pytest.raises(InputError, match="sums to 9"):
        get_recipe("hering2021").validate_config(cfg)
    cfg = TrainConfig.for_method("hering2021", grid=[40, 32, 32], iterations=9)
    with pytest.raises(InputError, match="multiple of 16"):
        get_recipe("hering2021").validate_config(cfg)


def test_progressive_training_freezes_coarser_levels_and_starts_from_their_weights():
    recipe = get_recipe("hering2021")
    cfg = TrainConfig.for_method("hering2021", grid=32, width=2, iterations=6)
    net = recipe.build_network(cfg)
    assert recipe.before_step(net, 1, cfg) == {"level": 3} and int(net.levels_trained) == 1
    assert [p.requires_grad for p in (net.nets[0].head.weight, net.nets[1].head.weight, net.nets[2].head.weight)] \
        == [False, False, True]
    with torch.no_grad():
        net.nets[2].head.weight.add_(0.5)
    recipe.before_step(net, 2, cfg)
    assert not torch.equal(net.nets[1].head.weight, net.nets[2].head.weight)
    assert recipe.before_step(net, 3, cfg) == {"level": 2} and int(net.levels_trained) == 2
    assert torch.equal(net.nets[1].head.weight, net.nets[2].head.weight)          # initialised from level 3
    assert [p.requires_grad for p in (net.nets[1].head.weight, net.nets[2].head.weight)] == [True, False]
    with torch.no_grad():
        net.nets[1].head.weight.add_(1.0)
    recipe.before_step(net, 4, cfg)                                                # not copied again
    assert not torch.equal(net.nets[1].head.weight, net.nets[2].head.weight)


# --------------------------------------------------------------------------- breathing pairs
@pytest.fixture(scope="module")
def scan(small_ct):
    return prepare_scan(small_ct, (32, 32, 32))


def test_breathing_pair_target_keypoints_and_inverse(scan):
    image = torch.from_numpy(scan.image)[None, None]
    mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
    g = torch.Generator().manual_seed(3)
    p = make_breathing_pair(image, mask, scan.grid, BreathingRanges(), g, n_points=50, amplitude=25.0, swap=False,
                            noise_std=0.0)
    sp = torch.tensor(scan.grid.spacing)
    target_mm = (p.target * sp.view(1, 3, 1, 1, 1)).norm(dim=1)
    assert 5.0 < float(target_mm.max()) < 30.0
    # keypoints: moving = fixed + target, exactly
    assert torch.allclose(p.moving_points, p.fixed_points + sample_field(p.target, p.fixed_points), atol=1e-5)
    # the swapped pair has the inverse motion: composing both gives the identity inside the lattice
    q = make_breathing_pair(image, mask, scan.grid, BreathingRanges(), torch.Generator().manual_seed(3),
                            n_points=50, amplitude=25.0, swap=True, noise_std=0.0)
    v, u = q.target, p.target
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    resid = ((u + warp(v, u)) * sp.view(1, 3, 1, 1, 1)).norm(dim=1, keepdim=True)[inner]
    assert float(resid.mean()) < 0.1, float(resid.mean())
    # the exhale image is the inhale one seen through the motion (outside the lung no density change)
    assert torch.allclose(q.fixed, p.moving) and torch.allclose(q.moving, p.fixed)
    assert torch.equal(invert(torch.zeros_like(v)), torch.zeros_like(v))


# --------------------------------------------------------------------------- training
def test_a_level_trained_a_few_steps_on_one_pair_lowers_its_loss(scan):
    recipe = get_recipe("hering2021")
    cfg = TrainConfig.for_method("hering2021", grid=32, width=4, iterations=30, pair_pool=1,
                                 options={"level_iterations": "1,28,1"})
    recipe.validate_config(cfg)
    torch.manual_seed(0)
    net = recipe.build_network(cfg)
    ds = recipe.dataset([scan], cfg)
    batch = default_collate([ds[0]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opts = parse_options(cfg.options)
    losses = []
    for it in range(2, 22):   # level 2 (keypoints on)
        assert recipe.before_step(net, it, cfg) == {"level": 2}
        loss = total_loss(level_terms(net, batch, 2, opts), 2, opts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_cli_writes_a_model_that_registers(tmp_path, small_ct_file):
    from DeepLungRegLib.cli import main

    out = tmp_path / "model"
    rc = main(["train", "--method", "hering2021", "--images", str(small_ct_file), "-o", str(out), "--grid", "32",
               "--width", "2", "--iterations", "6", "--validate-every", "3", "--validation-pairs", "1", "--quiet",
               "--option", "keypoints=20"])
    assert rc == 0
    net, meta = load_model(out)
    assert meta["method"] == "hering2021" and meta["grid_size"] == [32, 32, 32]
    assert meta["network"]["levels"] == 3 and int(net.levels_trained) == 3
    assert meta["training"]["config"]["options"] == {"keypoints": "20"}
    reg = tmp_path / "reg"
    assert main(["register", str(small_ct_file), str(small_ct_file), "-o", str(reg), "--model", str(out),
                 "--refine", "off", "--no-qa"]) == 0
    assert (reg / "transform.h5").is_file()


def test_model_file_round_trips_through_the_registry(tmp_path):
    net = Hering2021Net(Hering2021Config(levels=2, width=2, depth=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    meta = {"method": "hering2021", "grid_size": [32, 24, 16], "normalisation": {"kind": "hu_window",
            "hu_min": -1000.0, "hu_max": 200.0}}
    path = save_model(tmp_path, net, meta)
    loaded, m = load_model(path)
    assert isinstance(loaded, Hering2021Net) and m["network"]["levels"] == 2
    assert get_method("hering2021").grid_size(m) == (32, 24, 16)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, x.flip(2)), loaded(x, x.flip(2)))
    bad = dict(meta, grid_size=[36, 24, 16])
    save_model(tmp_path / "bad", net, bad)
    with pytest.raises(InputError, match="multiple of 8"):
        load_model(tmp_path / "bad")


def test_real_pair_source_keypoints_correspond(tmp_path, small_ct):
    """A manifest pair: keypoints detected in the fixed lung and their partners through the project's
    registration land on the same anatomy (fixed and pre-aligned moving intensities agree there far
    better than at unrelated points)."""
    import SimpleITK as sitk
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair
    from DeepLungRegTrainingLib.recipes.hering2021 import prepare_real_pair

    sim = simulate_pair(small_ct, BreathingParams(amplitude_base=10.0, n_landmarks=20))
    sitk.WriteImage(sim.fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(sim.moving, str(tmp_path / "m.nii.gz"))
    p = prepare_real_pair(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", (32, 32, 32), n_points=100)
    assert p.fixed.shape == (1, 32, 32, 32) and len(p.fixed_points) == len(p.moving_points) > 20
    f = sample_field(p.fixed[None], p.fixed_points)[:, 0]
    m = sample_field(p.moving[None], p.moving_points)[:, 0]
    shuffled = m[torch.randperm(len(m), generator=torch.Generator().manual_seed(0))]
    assert (f - m).abs().mean() < 0.5 * (f - shuffled).abs().mean()
    assert float(((p.moving_points - p.fixed_points) * p.spacing).norm(dim=1).mean()) > 0.5  # it did move


def test_one_breathing_motion_model_for_simulator_and_training_pairs():
    """The evaluation simulator (NumPy) and the training generator (torch) share
    ``simulation.breathing_motion_mm``: hand-computed values at the box's apex, base, walls and
    sides, the same from arrays and tensors, and the torch generator's field equals it where the
    lung weight is 1 (``outside_fraction`` = 1)."""
    from DeepLungRegLib.geometry import Lattice
    from DeepLungRegLib.simulation import breathing_motion_mm
    from DeepLungRegTrainingLib.breathing import breathing_field

    lo, hi = np.array([0.0, 0.0, 0.0]), np.array([200.0, 100.0, 160.0])
    # apex (z = hi) at the anterior wall (y = lo), left side; base (z = lo) at the posterior wall, middle
    x, y, z = np.array([200.0, 100.0, 50.0]), np.array([0.0, 100.0, 50.0]), np.array([160.0, 0.0, 80.0])
    vx, vy, vz = breathing_motion_mm(x, y, z, lo, hi, 20.0, 2.0, 4.0, 3.0)
    s = 0.5  # z = 80 is half-way: vz = -(2 + 18 * 0.5^1.5), vy = -4 * 0.5 * 0.75, vx = 3 * (50 - 100) / 100
    np.testing.assert_allclose(vz, [-2.0, -20.0, -(2.0 + 18.0 * s**1.5)])
    np.testing.assert_allclose(vy, [-4.0 * 0.5, 0.0, -4.0 * 0.5 * (0.5 + 0.5 * s)])
    np.testing.assert_allclose(vx, [3.0, 0.0, -1.5])
    tv = breathing_motion_mm(*(torch.as_tensor(a) for a in (x, y, z)), torch.as_tensor(lo), torch.as_tensor(hi),
                             20.0, 2.0, 4.0, 3.0)
    for a, b in zip((vx, vy, vz), tv, strict=True):
        np.testing.assert_allclose(b.numpy(), a)
    # the torch generator on a lattice: weight 1 everywhere -> exactly the model (lattice voxels -> mm)
    lat = Lattice((0.0, 0.0, 0.0), (2.0, 2.5, 4.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (20, 16, 12))
    mask = torch.zeros(1, 1, 12, 16, 20)
    mask[..., 2:10, 3:13, 4:16] = 1
    p = dict(amplitude_base=20.0, amplitude_apex=2.0, amplitude_ap=4.0, amplitude_lateral=3.0,
             sigma_inplane_mm=3.0, sigma_z_mm=10.0, outside_fraction=1.0)
    v_mm = breathing_field(mask, lat, p)[0] * torch.tensor(lat.spacing).view(3, 1, 1, 1)
    kk, jj, ii = np.meshgrid(np.arange(12), np.arange(16), np.arange(20), indexing="ij")
    pts = [ii * 2.0, jj * 2.5, kk * 4.0]
    box_lo, box_hi = [4 * 2.0, 3 * 2.5, 2 * 4.0], [15 * 2.0, 12 * 2.5, 9 * 4.0]  # lung nodes' extent
    ref = breathing_motion_mm(*pts, box_lo, box_hi, 20.0, 2.0, 4.0, 3.0)
    np.testing.assert_allclose(v_mm.numpy(), np.stack(ref), atol=1e-4)
