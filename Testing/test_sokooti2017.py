"""sokooti2017 (RegNet, Sokooti et al. MICCAI 2017): patches, pipeline alignment, dense inference,
the synthetic generator, training, the model file and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from DeepLungRegLib.methods import get_method, method_names
from DeepLungRegLib.methods.sokooti2017 import (
    PAD_VALUE,
    RegNet,
    RegNetConfig,
    dense_displacement,
    every_second_node,
    extract_patches,
    network_lattice,
    predict_patches,
)
from DeepLungRegLib.modelfile import load_model, read_metadata, save_model
from DeepLungRegTrainingLib.recipes.sokooti2017 import RECIPE, PatchPairDataset, learning_rate, regnet_loss
from DeepLungRegTrainingLib.synthesis_sokooti2017 import (
    PAPER,
    RandomDVF,
    SokootiPreset,
    bspline_warp,
    flip_pair,
    make_pair,
    random_dvf,
)
from DeepLungRegTrainingLib.training import TrainConfig
from scipy import ndimage


def random_net(width: int = 4, seed: int = 0, scale: float = 20.0, scales: int = 2) -> RegNet:
    """An eval-mode RegNet with random weights and batch-norm statistics, outputs of a few mm."""
    torch.manual_seed(seed)
    net = RegNet(RegNetConfig(width=width, scales=scales))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.2)
    net.fc[-1].weight.data *= scale
    return net.eval()


# --------------------------------------------------------------------------- patches
def reference_patch(vol: np.ndarray, c, lo: int, size: int) -> np.ndarray:
    """``vol[c+lo : c+lo+size]`` per axis, PAD_VALUE outside (plain numpy)."""
    out = np.full((size,) * 3, PAD_VALUE, dtype=vol.dtype)
    for a in range(size):
        for b in range(size):
            for d in range(size):
                p = (c[0] + lo + a, c[1] + lo + b, c[2] + lo + d)
                if all(0 <= p[i] < vol.shape[i] for i in range(3)):
                    out[a, b, d] = vol[p]
    return out


def test_patch_extraction_pads_with_air_at_the_borders_and_averages_the_context():
    rng = np.random.default_rng(0)
    fixed, moving = (rng.uniform(0.2, 1.0, (12, 17, 9)).astype(np.float32) for _ in range(2))
    centres = [(0, 0, 0), (11, 16, 8), (5, 0, 8), (6, 9, 4)]
    orig, low = extract_patches(torch.from_numpy(fixed), torch.from_numpy(moving), torch.tensor(centres))
    assert orig.shape == (4, 2, 29, 29, 29) and low.shape == (4, 2, 27, 27, 27)
    for n, c in enumerate(centres):
        for ch, vol in enumerate((fixed, moving)):
            np.testing.assert_array_equal(orig[n, ch].numpy(), reference_patch(vol, c, -14, 29))
            context = reference_patch(vol, c, -27, 54)                      # voxels c-27 .. c+26
            averaged = context.reshape(27, 2, 27, 2, 27, 2).mean(axis=(1, 3, 5))
            np.testing.assert_allclose(low[n, ch].numpy(), averaged, atol=1e-6)
    # the corner centre: its patch is air (PAD_VALUE = normalised -1000 HU) before the volume starts
    assert (orig[0, :, :14].numpy() == PAD_VALUE).all() and (orig[0, :, 26:].numpy() == PAD_VALUE).all()
    assert (orig[0, 0, 14:26, 14:29, 14:23].numpy() > 0).all()
    assert orig[0, 0, 14, 14, 14] == fixed[0, 0, 0]


# --------------------------------------------------------------------------- alignment
def _support(grad: torch.Tensor) -> np.ndarray:
    nz = torch.nonzero(grad.abs().sum(dim=(0, 1)) > 0)
    return np.stack((nz.min(0).values.numpy(), nz.max(0).values.numpy()))      # (2, 3) first/last voxel


def test_the_two_pipelines_receptive_fields_line_up():
    """The centre unit of the pooled original map and of the low-resolution map see boxes centred on the same
    point (c - 0.5 per axis, in original voxels), so fusing them index by index is consistent."""
    net = RegNet(RegNetConfig(width=2)).eval()
    for p in net.parameters():      # positive weights, positive inputs: every path active, exact supports
        p.data = p.data.abs() + 0.01
    c = 14                           # centre of the 29³ patch
    orig = torch.rand(1, 2, 29, 29, 29, requires_grad=True)
    feats = net.orig_features(orig)
    assert F.max_pool3d(feats, 2).shape[2:] == (9, 9, 9)
    feats[..., 8:10, 8:10, 8:10].sum().backward()           # the features pooled into unit (4, 4, 4)
    box = _support(orig.grad)                                # patch voxels
    orig_centre = box.mean(axis=0) - c
    low = torch.rand(1, 2, 27, 27, 27, requires_grad=True)
    lf = net.low_features(low)
    assert lf.shape[2:] == (9, 9, 9)
    lf[..., 4, 4, 4].sum().backward()
    lbox = _support(low.grad)                                # low-resolution voxels r = 2 original voxels c-27+2r, +1
    low_first, low_last = lbox[0] * 2 - 27, lbox[1] * 2 + 1 - 27
    low_centre = (low_first + low_last) / 2
    np.testing.assert_array_equal(orig_centre, [-0.5] * 3)
    np.testing.assert_array_equal(low_centre, [-0.5] * 3)
    assert (box[1] - box[0] + 1 == 12).all() and (low_last - low_first + 1 == 38).all()


def test_a_shifted_input_shifts_the_dense_output():
    """Content inside an air-filled volume (the padding value) moved by s voxels, odd shifts included (all 8
    pooling phases): the dense output moves by s."""
    net = random_net(width=2)
    gen = torch.Generator().manual_seed(1)
    a = torch.full((2, 30, 30, 30), PAD_VALUE)
    a[:, 8:20, 9:21, 7:19] = torch.rand((2, 12, 12, 12), generator=gen)
    s = (1, 2, 3)
    b = torch.roll(a, s, dims=(1, 2, 3))                     # the content stays inside: a true shift
    with torch.no_grad():
        ua, ub = dense_displacement(net, a[0], a[1]), dense_displacement(net, b[0], b[1])
    assert ua.abs().max() > 0.1
    torch.testing.assert_close(ub[:, s[0]:, s[1]:, s[2]:], ua[:, :30 - s[0], :30 - s[1], :30 - s[2]], atol=1e-5, rtol=0)
    assert (ub - ua).abs().max() > 1e-3                       # not shift-invariant by accident


# --------------------------------------------------------------------------- dense inference
@pytest.mark.parametrize(("stride", "scales"), [(1, 2), (2, 2), (1, 1)])
def test_dense_inference_equals_per_patch_inference(stride, scales):
    net = random_net(width=4, scales=scales)
    gen = torch.Generator().manual_seed(2)
    fixed, moving = torch.rand((2, 15, 12, 13), generator=gen)
    with torch.no_grad():
        dense = dense_displacement(net, fixed, moving, stride=stride, slab_voxels=30_000)  # several slabs
        assert dense.shape == ((3, 15, 12, 13) if stride == 1 else (3, 8, 6, 7))
        idx = torch.stack(torch.meshgrid(*(torch.arange(0, n, stride) for n in fixed.shape), indexing="ij"), -1)
        idx = idx.reshape(-1, 3)
        pick = idx[torch.randperm(len(idx), generator=gen)[:60]]
        pick = torch.cat((pick, torch.tensor([[0, 0, 0], [14, 10, 12]])))
        ref = predict_patches(net, fixed, moving, pick)
    got = dense[:, pick[:, 0] // stride, pick[:, 1] // stride, pick[:, 2] // stride].T
    assert ref.abs().mean() > 0.5                                           # mm: a non-trivial output
    assert (got - ref).abs().max() < 1e-4


def test_network_lattice_has_odd_sizes_and_its_stride_two_nodes_span_the_same_box():
    from DeepLungRegLib.geometry import Lattice

    box = Lattice((1.0, 2.0, 3.0), (1.7, 1.6, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1), (100, 120, 80))
    lat = network_lattice(box, 2.0)
    assert all(n % 2 == 1 for n in lat.size)
    np.testing.assert_allclose(lat.extent_mm, box.extent_mm)
    np.testing.assert_allclose(lat.spacing, 2.0, atol=0.03)
    np.testing.assert_allclose(every_second_node(lat).extent_mm, box.extent_mm)


# --------------------------------------------------------------------------- generator
def test_generator_dvf_within_theta_before_smoothing_and_smoothed_with_sigma():
    spec = RandomDVF("high", sigma_mm=20.0, points=100, theta_mm=8.0, noise_hu=5.0)
    spacing = (2.0, 2.5, 3.0)                                  # mm along i, j, k
    s = random_dvf((30, 26, 40), spacing, spec, torch.Generator().manual_seed(3))
    raw = s.raw().double().numpy()
    assert len({tuple(p) for p in s.points.tolist()}) == 100 and np.count_nonzero(np.abs(raw).sum(0)) == 100
    assert np.abs(raw).max() <= 8.0 and np.abs(raw).max() > 7.0
    sigma_kji = [20.0 / spacing[2], 20.0 / spacing[1], 20.0 / spacing[0]]
    expected = np.stack([ndimage.gaussian_filter(raw[c], sigma_kji, mode="constant") for c in range(3)])
    np.testing.assert_allclose(s.smoothed.numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    wrong = np.stack([ndimage.gaussian_filter(raw[c], [x * 1.2 for x in sigma_kji], mode="constant") for c in range(3)])
    assert np.abs(s.smoothed.numpy() - wrong).max() > 0.05 * np.abs(expected).max()
    # scaled back per component to the largest impulse: within [-θ, θ], proportional to the smoothed field
    field = s.field.numpy()
    np.testing.assert_allclose(np.abs(field).reshape(3, -1).max(1), np.abs(raw).reshape(3, -1).max(1), rtol=1e-5)
    assert np.abs(field).max() <= 8.0 + 1e-5
    ratio = field.reshape(3, -1).max(1) / s.smoothed.numpy().reshape(3, -1).max(1)
    np.testing.assert_allclose(field, s.smoothed.numpy() * ratio[:, None, None, None], rtol=1e-4, atol=1e-6)


def test_cubic_bspline_resampling_matches_scipy_and_interpolates():
    gen = torch.Generator().manual_seed(4)
    img = torch.rand((14, 17, 19), generator=gen, dtype=torch.float64)
    assert (bspline_warp(img, torch.zeros((3, 14, 17, 19), dtype=torch.float64)) - img).abs().max() < 1e-7
    u = torch.randn((3, 14, 17, 19), generator=gen, dtype=torch.float64) * 2
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in img.shape), indexing="ij")) + u.flip(0).numpy()
    ref = ndimage.map_coordinates(img.numpy(), grid, order=3, mode="mirror")
    inside = ((grid >= -1) & (grid <= np.asarray(img.shape).reshape(3, 1, 1, 1))).all(0)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(bspline_warp(img, u).numpy()[inside], ref[inside], atol=1e-6)


def _smooth_scan(shape=(40, 44, 48)):
    gen = torch.Generator().manual_seed(5)
    img = torch.from_numpy(ndimage.gaussian_filter(torch.rand(shape, generator=gen).numpy(), 3.0))
    img = (img - img.min()) / (img.max() - img.min())
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[8:-8, 8:-8, 8:-8] = True
    return img.float(), mask


def test_pairs_follow_the_field_and_flips_negate_its_component():
    img, mask = _smooth_scan()
    quiet = SokootiPreset("quiet", tuple(RandomDVF(f.name, f.sigma_mm, f.points, f.theta_mm, 0.0)
                                         for f in PAPER.frequencies),
                          RandomDVF("moving", 35.0, 100, 8.0, 0.0), moving_noise_hu=0.0)
    spacing = (2.0, 2.0, 2.0)
    pair = make_pair(img, mask, spacing, quiet, torch.Generator().manual_seed(6))
    assert pair.dvf_mm.abs().max() <= 8.0 + 1e-5 and pair.dvf_mm.abs().max() > 3.0
    u_vox = pair.dvf_mm / 2.0
    torch.testing.assert_close(pair.fixed, bspline_warp(pair.moving, u_vox).clamp(0, 1))
    from DeepLungRegLib.fields import warp

    for axes in ((0,), (1, 2), (0, 1, 2)):
        f, m, d, _ = flip_pair(pair.fixed, pair.moving, pair.dvf_mm, pair.fixed_mask, axes)
        resampled = warp(m[None, None], d[None] / 2.0)[0, 0]
        inner = (slice(6, -6),) * 3
        err = (resampled - f)[inner].abs().mean()
        wrong = warp(m[None, None], (-d[None]) / 2.0)[0, 0]
        assert err < 0.01 < (wrong - f)[inner].abs().mean()


# --------------------------------------------------------------------------- training
def test_a_few_training_steps_lower_the_loss():
    img, mask = _smooth_scan()
    from DeepLungRegLib.geometry import Lattice
    from DeepLungRegLib.preprocessing import PreparedScan

    scan = PreparedScan(img.numpy(), mask.numpy(), Lattice((0, 0, 0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                           (48, 44, 40)), False)
    orig, low, target = PatchPairDataset([scan], PAPER, patches=8, seed=0)[0]
    assert target.abs().mean() > 1.0                                        # mm: something to learn
    torch.manual_seed(0)
    net = RegNet(RegNetConfig(width=4)).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = regnet_loss(net, orig[None], low[None], target[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def test_dataset_items_depend_on_seed_and_index_only_and_options_are_checked():
    from DeepLungRegLib.errors import InputError
    from DeepLungRegLib.geometry import Lattice
    from DeepLungRegLib.preprocessing import PreparedScan

    img, mask = _smooth_scan()
    scan = PreparedScan(img.numpy(), mask.numpy(), Lattice((0, 0, 0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                           (48, 44, 40)), False)
    a, b = PatchPairDataset([scan], PAPER, 4, seed=3), PatchPairDataset([scan], PAPER, 4, seed=3)
    for x, y in zip(a[5], b[5], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(a[5][2], a[6][2]) and not torch.equal(a[5][2], PatchPairDataset([scan], PAPER, 4, 4)[5][2])
    assert a[5][0].shape == (4, 2, 29, 29, 29) and a[5][1].shape == (4, 2, 27, 27, 27) and a[5][2].shape == (4, 3)
    assert (a[5][2].abs() <= 8.0 + 1e-5).all()
    with pytest.raises(InputError, match="unknown --option"):
        RECIPE.validate_config(TrainConfig.for_method("sokooti2017", options={"sigma": "3"}))
    with pytest.raises(InputError, match="output_stride"):
        RECIPE.validate_config(TrainConfig.for_method("sokooti2017", options={"output_stride": "3"}))
    with pytest.raises(InputError, match="not a whole number"):
        RECIPE.validate_config(TrainConfig.for_method("sokooti2017", options={"patches": "many"}))


def test_learning_rate_is_divided_by_1_25_each_epoch():
    cfg = TrainConfig.for_method("sokooti2017", iterations=30, options={"epoch": "10"})
    RECIPE.validate_config(cfg)
    seen = [RECIPE.learning_rate(it, cfg) for it in range(1, 31)]
    assert [RECIPE.before_step(None, it, cfg)["lr"] for it in range(1, 31)] == seen
    assert seen[0] == seen[9] == 1e-3 and seen[10] == pytest.approx(1e-3 / 1.25) and seen[29] == pytest.approx(1e-3 / 1.5625)
    # default epoch: a fifteenth of the run (the paper's 15 epochs)
    cfg = TrainConfig.for_method("sokooti2017", iterations=150)
    assert learning_rate(cfg, 10) == 1e-3 and learning_rate(cfg, 11) == pytest.approx(1e-3 / 1.25)
    assert learning_rate(cfg, 150) == pytest.approx(1e-3 / 1.25**14)


def test_model_file_round_trips_and_loads_through_the_registry(tmp_path):
    assert "sokooti2017" in method_names()
    cfg = TrainConfig.for_method("sokooti2017", width=3, options={"spacing_mm": "3", "output_stride": "2"})
    net = random_net(width=3, seed=7)
    save_model(tmp_path, net, RECIPE.metadata(cfg))
    loaded, meta = load_model(tmp_path)
    assert meta["method"] == "sokooti2017" and meta["network"] == {"kind": "regnet", "width": 3, "scales": 2}
    assert meta["lattice_spacing_mm"] == 3.0 and meta["output_stride"] == 2 and meta["grid_size"] == 192
    assert read_metadata(tmp_path)["synthesis"]["frequencies"][0]["sigma_mm"] == 35.0
    assert type(loaded) is RegNet and not loaded.training
    gen = torch.Generator().manual_seed(8)
    orig, low = torch.rand((5, 2, 29, 29, 29), generator=gen), torch.rand((5, 2, 27, 27, 27), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(orig, low), net(orig, low), rtol=0, atol=0)
    assert get_method("sokooti2017").grid_size(meta) == (192, 192, 192)
    # the single-scale variant (the paper's comparison) round-trips too, without the low-resolution layers
    single = random_net(width=3, seed=7, scales=1)
    cfg = TrainConfig.for_method("sokooti2017", width=3, options={"scales": "1"})
    assert RECIPE.build_network(cfg).config.scales == 1
    save_model(tmp_path / "single", single, RECIPE.metadata(cfg))
    loaded, meta = load_model(tmp_path / "single")
    assert meta["network"]["scales"] == 1 and not any(k.startswith(("low.", "fixed_low.")) for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(orig), single(orig, low), rtol=0, atol=0)


def test_predict_returns_the_field_on_the_pipelines_lattice():
    from DeepLungRegLib.geometry import Lattice
    from DeepLungRegLib.methods.base import PreparedPair

    method = get_method("sokooti2017")
    net = random_net(width=2)
    grid = Lattice((0.0, 0.0, 0.0), (3.0, 2.5, 4.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (20, 24, 16))
    gen = torch.Generator().manual_seed(9)
    fixed, moving = torch.rand((2, *grid.shape), generator=gen).numpy()
    pair = PreparedPair(fixed, moving, grid)
    meta = {"lattice_spacing_mm": 4.0, "output_stride": 1}
    own = method.network_field(net, pair, meta, torch.device("cpu"))
    assert all(n % 2 for n in own.lattice.size)
    np.testing.assert_allclose(own.lattice.spacing, 4.0, atol=0.3)
    out = method.predict(net, pair, meta, torch.device("cpu"))
    assert out.lattice == grid and out.u_vox.shape == (1, 3, *grid.shape)
    # same physical displacement at the shared corner node (both lattices start there)
    torch.testing.assert_close(out.mm()[0, :, 0, 0, 0], own.mm()[0, :, 0, 0, 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- CLI
def test_cli_trains_sokooti2017_and_registers_with_it(two_scan_files, tmp_path, capsys):
    from DeepLungRegLib.cli import main

    a, b = two_scan_files
    out = tmp_path / "model"
    args = ["train", "--method", "sokooti2017", "--images", str(a), "--validation-image", str(b),
            "-o", str(out), "--grid", "32", "--width", "4", "--iterations", "4", "--validate-every", "2",
            "--validation-pairs", "1", "--option", "spacing_mm=12", "--option", "patches=4", "--workers", "0",
            "--device", "cpu", "--quiet", "--progress-lines"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "progress: 4/4" in printed and '"iterations": 4' in printed
    meta = read_metadata(out)
    assert meta["method"] == "sokooti2017" and meta["lattice_spacing_mm"] == 12.0
    assert meta["schedule"]["epoch_iterations"] == 1 and meta["training"]["validation_scan"]["file"] == "b.nii.gz"
    # the generic loop applied the recipe's schedule to the optimiser: step 4 ran at 1e-3 / 1.25^3
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 1.25**3)
    assert main(["register", str(a), str(b), "-o", str(tmp_path / "reg"), "--model", str(out),
                 "--refine", "off", "--no-qa", "--quiet"]) == 0
    assert (tmp_path / "reg" / "transform.h5").is_file()
    report = json.loads((tmp_path / "reg" / "report.json").read_text())
    assert report["model"]["method"] == "sokooti2017"
