"""eppenhof2018tps (TPS-grid CNN, Eppenhof et al. SPIE 2018): the TPS evaluation, the network, the
generator, the schedule, training, the model file and the CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from DeepLungRegLib import tps
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.fields import compose, identity_grid, warp
from DeepLungRegLib.geometry import Lattice
from DeepLungRegLib.methods import get_method
from DeepLungRegLib.methods.base import PreparedPair
from DeepLungRegLib.methods.eppenhof2018tps import TPSNet, TPSNetConfig
from DeepLungRegLib.modelfile import load_model, read_metadata, save_model
from DeepLungRegLib.preprocessing import PreparedScan
from DeepLungRegTrainingLib.recipes.eppenhof2018tps import RECIPE, ValidationSet, preset_of
from DeepLungRegTrainingLib.synthesis_eppenhof2018tps import PRESETS, channel_ranges, make_pair
from DeepLungRegTrainingLib.training import TrainConfig

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: a lattice whose nodes fall on voxel centres: node spacing 5 voxels along every axis
SHAPE, NODES = (16, 21, 26), (4, 5, 6)


def dense_points(shape) -> torch.Tensor:
    """Every voxel of ``shape`` as ``(P, 3)`` coordinates ``(i, j, k)``, in ``(k, j, i)`` order."""
    return identity_grid(shape, dtype=torch.float64).flatten(1).T


def node_values(u: torch.Tensor, nodes, shape) -> torch.Tensor:
    """``u`` ``(B, 3, D, H, W)`` at the node voxels (integer node spacing): ``(B, 3, nk, nj, ni)``."""
    idx = [torch.linspace(0, s - 1, n).round().long() for n, s in zip(nodes, shape, strict=True)]
    return u[:, :, idx[0]][:, :, :, idx[1]][..., idx[2]]


def smooth_scan(shape=(32, 32, 32), direction=IDENTITY, seed: int = 0) -> PreparedScan:
    """A textured [0, 1] volume with an ellipsoidal 'lung' mask, on a 3 mm lattice."""
    g = torch.Generator().manual_seed(seed)
    img = F.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    img = ((img - img.min()) / (img.max() - img.min())).numpy().astype(np.float32)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    mask = (z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.6) ** 2 < 1
    return PreparedScan(img, mask, Lattice((0.0, 0.0, 0.0), (3.0, 3.0, 3.0), direction, shape[::-1]), False)


# --------------------------------------------------------------------------- TPS
@pytest.mark.parametrize("kernel", tps.KERNELS)
def test_tps_interpolates_the_node_displacements_exactly(kernel):
    g = torch.Generator().manual_seed(1)
    d = torch.randn((2, 3, *NODES), generator=g, dtype=torch.float64)
    u = tps.tps_field(d, SHAPE, kernel)
    assert u.shape == (2, 3, *SHAPE)
    torch.testing.assert_close(node_values(u, NODES, SHAPE), d, atol=1e-10, rtol=0)
    # nodes between voxel centres (sizes not multiples of the node spacing): the point evaluation
    shape = (17, 20, 23)
    d = torch.randn((1, 3, 3, 4, 5), generator=g, dtype=torch.float64)
    at_nodes = tps.tps_at_points(d, shape, tps.node_positions((3, 4, 5), shape), kernel)
    torch.testing.assert_close(at_nodes, d.flatten(2), atol=1e-10, rtol=0)
    # and the dense evaluation (octant + mirrors) is the point evaluation at every voxel, odd and even sizes
    dense = tps.tps_field(d, shape, kernel)
    torch.testing.assert_close(dense.flatten(2), tps.tps_at_points(d, shape, dense_points(shape), kernel),
                               atol=1e-10, rtol=0)
    assert (dense - F.interpolate(d, size=shape, mode="trilinear", align_corners=True)).abs().max() > 0.05


def test_tps_reproduces_an_affine_map_exactly():
    g = torch.Generator().manual_seed(2)
    a, t = 0.05 * torch.randn((3, 3), generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    shape, nodes = (24, 19, 30), (4, 3, 5)
    p = tps.node_positions(nodes, shape)                                 # (N, 3) i, j, k
    d = (p @ a.T + t).T.reshape(1, 3, *nodes)
    expected = (dense_points(shape) @ a.T + t).T.reshape(1, 3, *shape)
    for kernel in tps.KERNELS:
        torch.testing.assert_close(tps.tps_field(d, shape, kernel), expected, atol=1e-9, rtol=0)
        coef = tps.tps_coefficients(d, shape, kernel)
        assert coef[..., :-4].abs().max() < 1e-10                        # no kernel part: the affine alone
    u32 = tps.tps_field(d.float(), shape)                                # float32 (what training and inference use)
    torch.testing.assert_close(u32.double(), expected, atol=2e-4, rtol=0)


def test_tps_is_linear_batched_differentiable_and_its_uncached_path_agrees(monkeypatch):
    g = torch.Generator().manual_seed(3)
    shape = (9, 12, 7)
    d = torch.randn((3, 3, 2, 3, 2), generator=g, dtype=torch.float64, requires_grad=True)
    u = tps.tps_field(d, shape)
    for b in range(3):
        torch.testing.assert_close(u[b : b + 1], tps.tps_field(d[b : b + 1], shape), atol=1e-12, rtol=0)
    torch.testing.assert_close(tps.tps_field(2 * d[:1] - d[1:2], shape), 2 * u[:1] - u[1:2], atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda x: tps.tps_field(x, shape), (d[:1].detach().clone().requires_grad_(),))
    monkeypatch.setattr(tps, "CACHE_ELEMENTS", 0)
    monkeypatch.setattr(tps, "SLAB_ELEMENTS", 40)                        # slabs of one octant slice
    torch.testing.assert_close(tps.tps_field(d, shape), u, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="kernel"):
        tps.tps_field(d, shape, "gaussian")


# --------------------------------------------------------------------------- network
def test_network_maps_96_cubed_pairs_to_a_6_cubed_grid_of_displacements():
    torch.manual_seed(0)
    net = TPSNet(TPSNetConfig(width=2))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [m.kernel_size for m in convs] == [(3, 3, 3)] * 4 + [(1, 1, 1)] * 2
    assert sum(isinstance(m, torch.nn.MaxPool3d) for m in net.modules()) == 4
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert net(torch.rand((1, 2, 96, 96, 96))).shape == (1, 3, 6, 6, 6)
    small = TPSNet(TPSNetConfig(width=2, blocks=3))
    assert small(torch.rand((2, 2, 32, 48, 16))).shape == (2, 3, 4, 6, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        small(torch.rand((1, 2, 32, 36, 16)))


# --------------------------------------------------------------------------- generator
def test_generator_target_is_the_tps_of_the_sampled_nodes_and_the_pair_follows_it():
    scan = smooth_scan((21, 26, 31))
    nodes = (5, 6, 7)                                                   # node spacing: 5 voxels
    image = torch.from_numpy(scan.image)[None, None]
    mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
    pair = make_pair(image, mask, IDENTITY, PRESETS["eppenhof2018tps"], nodes, torch.Generator().manual_seed(4))
    shape = tuple(image.shape[2:])
    # the dense target at the node voxels is the sampled node displacement
    torch.testing.assert_close(node_values(pair.u_learned, nodes, shape), pair.nodes, atol=2e-5, rtol=0)
    # node displacements within the paper's ranges, scaled from 96: x, y in [-1, 1], z in [-1, 5]
    r = channel_ranges(PRESETS["eppenhof2018tps"], IDENTITY, shape)
    torch.testing.assert_close(r, torch.tensor([[-31 / 96, 31 / 96], [-26 / 96, 26 / 96], [-21 / 96, 105 / 96]],
                                               dtype=torch.float64))
    for c in range(3):
        assert r[c, 0] <= pair.nodes[0, c].min() and pair.nodes[0, c].max() <= r[c, 1]
    # the offset: B (x - centre) + b
    mat, b = pair.offset
    x = identity_grid(shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape[::-1]]).view(3, 1, 1, 1)
    torch.testing.assert_close(pair.u_offset[0], torch.einsum("rc,c...->r...", mat, x - centre) + b.view(3, 1, 1, 1))
    # moving = I(T_off(x)), fixed = I(T_off(T_learned(x))) (the affine composed exactly), mask in the fixed frame
    u_total = compose(pair.u_offset, pair.u_learned)                    # trilinear of an affine field: exact inside
    torch.testing.assert_close(pair.moving, warp(image, pair.u_offset))
    torch.testing.assert_close(pair.fixed[..., 3:-3, 3:-3, 3:-3], warp(image, u_total)[..., 3:-3, 3:-3, 3:-3],
                               atol=1e-4, rtol=0)
    in_fixed = (pair.mask != warp(mask, u_total, mode="nearest")).float().mean()
    in_moving = (pair.mask != warp(mask, pair.u_offset, mode="nearest")).float().mean()
    assert in_fixed < 1e-3 and in_fixed < in_moving / 5


def test_ranges_follow_the_lps_axes_and_items_depend_on_seed_and_index_only():
    flipped = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)           # k runs inferior: z range turns to [-5, 1]
    r = channel_ranges(PRESETS["eppenhof2018tps"], flipped, (96, 96, 96))
    assert r[2].tolist() == [-5.0, 1.0] and r[0].tolist() == [-1.0, 1.0]
    swapped = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)            # i along z, j along x, k along y
    assert channel_ranges(PRESETS["eppenhof2018tps"], swapped, (96, 96, 96))[0].tolist() == [-1.0, 5.0]
    cfg = TrainConfig.for_method("eppenhof2018tps", grid=32, depth=3, width=2, seed=5)
    scan = smooth_scan()
    a, b = RECIPE.dataset([scan], cfg), RECIPE.dataset([scan], cfg)
    for x, y in zip(a[7], b[7], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[7][2], a[8][2])
    assert [t.shape for t in a[7]] == [(1, 32, 32, 32), (1, 32, 32, 32), (3, 4, 4, 4), (1, 32, 32, 32)]
    assert a[7][2][2].mean() > 0                                        # z mostly superior


# --------------------------------------------------------------------------- schedule, options
def test_learning_rate_decays_as_eta0_over_one_plus_eta0_lambda_t():
    cfg = TrainConfig.for_method("eppenhof2018tps")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.grid, cfg.depth, cfg.batch_size) == ("sgd", 0.1, 0.0, 96, 4, 1)
    lr = [RECIPE.learning_rate(it, cfg) for it in (1, 2, 10_001, 100_001)]
    assert lr[0] == 0.1 and lr[1] == pytest.approx(0.1 / (1 + 1e-5)) and lr[2] == pytest.approx(0.1 / 1.1)
    assert lr[3] == pytest.approx(0.05)                                  # η0 λ t = 1
    assert RECIPE.before_step(None, 10_001, cfg)["lr"] == lr[2]
    fast = TrainConfig.for_method("eppenhof2018tps", options={"decay": "1e-3"})
    assert RECIPE.learning_rate(10_001, fast) == pytest.approx(0.1 / 2)


@pytest.mark.parametrize(("given", "message"), [
    ({"options": {"sigma": "1"}}, "unknown --option sigma"),
    ({"options": {"range_z": "5"}}, "range_z='5' is not LO,HI"),
    ({"options": {"range_x": "2,-2"}}, "LO <= HI"),
    ({"options": {"kernel": "gauss"}}, "kernel='gauss'"),
    ({"options": {"hidden": "two"}}, "not a whole number"),
    ({"options": {"affine_std": "-1"}}, "affine_std=-1.0 must be"),
    ({"grid": 40}, "multiple of 16"),
    ({"grid": 32, "depth": 5}, "at least 64"),
    ({"loss": "l1"}, "mean squared node error"),
])
def test_bad_settings_are_refused_in_one_line(given, message):
    with pytest.raises(InputError, match=message) as err:
        RECIPE.validate_config(TrainConfig.for_method("eppenhof2018tps", **given))
    assert "\n" not in str(err.value)


def test_options_reach_the_generator_network_and_metadata():
    cfg = TrainConfig.for_method("eppenhof2018tps", grid=[64, 48, 32], options={
        "range_z": "0,8", "translation_std": "0", "kernel": "r2logr", "hidden": "0"})
    RECIPE.validate_config(cfg)
    assert preset_of(cfg).range_xyz == ((-1.0, 1.0), (-1.0, 1.0), (0.0, 8.0)) and preset_of(cfg).translation_std == 0
    meta = RECIPE.metadata(cfg)
    assert meta["tps"]["nodes"] == [4, 3, 2] and meta["tps"]["kernel"] == "r2logr"
    assert meta["network"] == {"kind": "tps_cnn", "in_channels": 2, "width": 8, "blocks": 4, "hidden": 0, "norm": "batch"}
    assert meta["synthesis"]["range_xyz"][2] == [0.0, 8.0] or meta["synthesis"]["range_xyz"][2] == (0.0, 8.0)
    assert meta["schedule"]["decay"] == 1e-4 and meta["schedule"]["momentum"] == 0.0


# --------------------------------------------------------------------------- training
def test_a_few_sgd_steps_with_the_papers_schedule_lower_the_loss():
    cfg = TrainConfig.for_method("eppenhof2018tps", grid=32, depth=3, width=4, pair_pool=1, seed=1)
    RECIPE.validate_config(cfg)
    batch = [t[None] for t in RECIPE.dataset([smooth_scan()], cfg)[0]]
    torch.manual_seed(0)
    net = RECIPE.build_network(cfg).train()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    losses = []
    for it in range(1, 31):
        loss = RECIPE.loss(net, batch, cfg)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = RECIPE.learning_rate(it, cfg)
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


def test_validation_reports_the_lung_error_of_the_dense_field():
    cfg = TrainConfig.for_method("eppenhof2018tps", grid=32, depth=3, width=2, validation_pairs=2)
    val = RECIPE.validator(smooth_scan(), cfg)
    assert isinstance(val, ValidationSet) and val.nodes.shape == (2, 3, 4, 4, 4)
    identity = val.evaluate(None, torch.device("cpu"))
    expected = np.mean([float((tps.tps_field(val.nodes[i : i + 1], (32, 32, 32)) * 3.0).norm(dim=1)[0][val.mask[i, 0] > 0]
                              .mean()) for i in range(2)])                 # 3 mm lattice
    assert identity["epe_lung_mm"] == pytest.approx(expected, rel=1e-5) and expected > 0.3
    assert identity["node_mse_vox2"] == pytest.approx(float((val.nodes**2).sum(1).mean()), rel=1e-5)
    torch.manual_seed(0)
    trained = val.evaluate(RECIPE.build_network(cfg), torch.device("cpu"))   # near-zero output: close to identity
    assert trained["epe_lung_mm"] == pytest.approx(expected, rel=0.05)


# --------------------------------------------------------------------------- model file, predict, CLI
def test_model_file_round_trips_and_predict_returns_the_dense_tps_on_the_pipeline_lattice(tmp_path):
    cfg = TrainConfig.for_method("eppenhof2018tps", grid=[32, 48, 32], depth=3, width=3)
    torch.manual_seed(3)
    net = RECIPE.build_network(cfg).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    net.head.weight.data.normal_(0, 0.5)
    save_model(tmp_path, net, RECIPE.metadata(cfg))
    loaded, meta = load_model(tmp_path)
    assert type(loaded) is TPSNet and not loaded.training and meta["method"] == "eppenhof2018tps"
    assert read_metadata(tmp_path)["tps"]["nodes"] == [4, 6, 4]
    method = get_method("eppenhof2018tps")
    assert method.grid_size(meta) == (32, 48, 32)
    grid = Lattice((10.0, -5.0, 3.0), (2.5, 2.0, 3.0), IDENTITY, (32, 48, 32))
    g = torch.Generator().manual_seed(9)
    fixed, moving = torch.rand((2, *grid.shape), generator=g).numpy()
    pred = method.predict(loaded, PreparedPair(fixed, moving, grid), meta, torch.device("cpu"))
    assert pred.lattice == grid and pred.u_vox.shape == (1, 3, 32, 48, 32)
    with torch.no_grad():
        nodes = net(torch.from_numpy(np.stack((fixed, moving))[None]))
    assert nodes.abs().max() > 0.1
    torch.testing.assert_close(pred.u_vox, tps.tps_field(nodes, grid.shape), atol=1e-5, rtol=1e-5)
    at_nodes = tps.tps_at_points(nodes.double(), grid.shape, tps.node_positions((4, 6, 4), grid.shape))
    torch.testing.assert_close(at_nodes.float(), nodes.flatten(2), atol=1e-4, rtol=0)
    bad = {**meta, "grid_size": 36}
    with pytest.raises(ValueError, match="multiple of 8"):
        method.build_network(bad)


def test_cli_trains_eppenhof2018tps_and_registers_with_it(two_scan_files, tmp_path, capsys):
    from DeepLungRegLib.cli import main

    a, b = two_scan_files
    out = tmp_path / "model"
    assert main(["train", "--method", "eppenhof2018tps", "--images", str(a), "--validation-image", str(b),
                 "-o", str(out), "--grid", "32", "--depth", "3", "--width", "4", "--iterations", "4",
                 "--validate-every", "2", "--validation-pairs", "1", "--option", "range_z=-1,6", "--workers", "0",
                 "--device", "cpu", "--quiet", "--progress-lines"]) == 0
    printed = capsys.readouterr().out
    assert "progress: 4/4" in printed and '"iterations": 4' in printed
    meta = read_metadata(out)
    assert meta["method"] == "eppenhof2018tps" and meta["tps"]["nodes"] == [4, 4, 4]
    assert meta["synthesis"]["range_xyz"][2] == [-1.0, 6.0] and meta["training"]["validation_scan"]["file"] == "b.nii.gz"
    # the loop applied the schedule: step 4 ran at η0 / (1 + η0 λ 3), plain SGD
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.1 / (1 + 0.1 * 1e-4 * 3)) and group["momentum"] == 0.0
    assert main(["register", str(a), str(b), "-o", str(tmp_path / "reg"), "--model", str(out),
                 "--refine", "off", "--no-qa", "--quiet"]) == 0
    report = json.loads((tmp_path / "reg" / "report.json").read_text())
    assert report["model"]["method"] == "eppenhof2018tps" and (tmp_path / "reg" / "transform.h5").is_file()
