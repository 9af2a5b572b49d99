"""Training recipe of ``eppenhof2018tps``: a CNN regressing the displacements of a 6×6×6 TPS grid.

Eppenhof, Lafarge, Moeskops, Veta & Pluim, "Deformable image registration using convolutional
neural networks", Proc. SPIE Medical Imaging 2018, vol. 10574.

Scans: lung-cropped and resampled onto a ``G³`` lattice as ``register`` does (the paper: 96³).
Pairs (:mod:`..synthesis_eppenhof2018tps`): a small random affine offset on both images and a
random TPS on one of them; the target is the TPS's node displacements (voxels of the lattice).
Loss: the paper's MSE, ``mean over nodes of ||d_k - d̂_k||²`` (voxels²), on all nodes (the lung mask
is not needed by the loss; the validator uses it). Optimiser: SGD without momentum (the paper names
none), batch size 1, learning rate ``η(t) = η0 / (1 + η0 λ t)`` with ``η0 = 0.1`` (``--lr``),
``λ = 1e-4`` and ``t = iteration - 1`` (the first step runs at ``η0``). The final weights are the
last ones (the paper averages nothing). Batch normalisation keeps running statistics.

Flags: ``--width`` (feature maps of the first convolution, doubled per block; default 8: of 8, 16
and 32 the one that plain SGD at η0 = 0.1 trained without loss spikes, see
:mod:`DeepLungRegLib.methods.eppenhof2018tps`),
``--depth`` (number of convolution + pooling blocks, the paper's 4: 96 -> 6 nodes per axis; the
lattice must be a multiple of ``2^depth`` and give at least 2 nodes per axis), ``--norm`` (batch).

Method settings (``--option KEY=VALUE``):

* ``range_x``, ``range_y``, ``range_z`` (``-1,1``, ``-1,1``, ``-1,5``): node displacement intervals
  ``LO,HI`` along the LPS axes, voxels of a 96³ lattice (scaled by ``G/96``);
* ``affine_std`` (0.1): standard deviation of the elements of the offset's ``B``;
* ``translation_std`` (0.1): standard deviation of the offset's ``b``, voxels of a 96³ lattice;
* ``decay`` (1e-4): the schedule's ``λ``;
* ``kernel`` (``r``): TPS kernel, ``r`` or ``r2logr`` (:mod:`DeepLungRegLib.tps`);
* ``hidden`` (1): 1×1×1 convolutions before the regression layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.methods.eppenhof2018tps import GRID, NAME, NODE_PLACEMENT, PAPER, TPSNet, TPSNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan
from DeepLungRegLib.tps import KERNELS, tps_field
from torch.utils.data import Dataset

from ..synthesis_eppenhof2018tps import PRESETS, TPSPreset, make_pair
from .base import Recipe, Validator, pair_generator, typed_options

METHOD = NAME
LEARNING_RATE = 0.1          # η0
DECAY = 1e-4                 # λ
WIDTH = 8
DISPLACEMENT_UNITS = ("voxels of the network grid; channels (i, j, k); maps fixed point p to moving point p + u(p); "
                      "the network outputs the TPS node displacements, predict returns the dense TPS field")

#: ``--option`` names: (default, parser). Ranges are ``LO,HI`` text.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "range_x": (None, str), "range_y": (None, str), "range_z": (None, str),
    "affine_std": (None, float), "translation_std": (None, float),
    "decay": (DECAY, float), "kernel": ("r", str), "hidden": (1, int),
}


def _interval(key: str, text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"{METHOD}: --option {key}={text!r} is not LO,HI (two numbers, voxels of a 96^3 lattice)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and max(abs(lo), abs(hi)) <= 48):
        raise InputError(f"{METHOD}: --option {key}={text!r} needs finite LO <= HI within [-48, 48] voxels")
    return lo, hi


def options(cfg) -> dict[str, Any]:
    """The method settings of ``cfg`` with their defaults, typed and checked (one-line :class:`InputError`)."""
    out = typed_options(METHOD, cfg.options or {}, OPTIONS)
    for key in ("range_x", "range_y", "range_z"):
        if out[key] is not None:
            out[key] = _interval(key, out[key])
    for key in ("affine_std", "translation_std", "decay"):
        if out[key] is not None and not (math.isfinite(out[key]) and out[key] >= 0):
            raise InputError(f"{METHOD}: --option {key}={out[key]} must be a finite number >= 0")
    if out["kernel"] not in KERNELS:
        raise InputError(f"{METHOD}: --option kernel={out['kernel']!r}; use {' or '.join(KERNELS)}")
    if not 0 <= out["hidden"] <= 4:
        raise InputError(f"{METHOD}: --option hidden={out['hidden']} must be 0..4")
    return out


def preset_of(cfg) -> TPSPreset:
    """The preset named by ``cfg.preset`` with the ranges of ``--option`` applied."""
    o, preset = options(cfg), PRESETS[cfg.preset]
    ranges = tuple(o[k] if o[k] is not None else preset.range_xyz[a] for a, k in enumerate(("range_x", "range_y", "range_z")))
    changes: dict[str, Any] = {"range_xyz": ranges}
    for key in ("affine_std", "translation_std"):
        if o[key] is not None:
            changes[key] = o[key]
    return replace(preset, **changes)


def network_config(cfg) -> TPSNetConfig:
    return TPSNetConfig(width=cfg.width, blocks=cfg.depth, hidden=options(cfg)["hidden"], norm=cfg.norm)


def learning_rate(cfg, iteration: int) -> float:
    """``η0 / (1 + η0 λ t)`` with ``t = iteration - 1`` (``iteration`` 1-based, ``η0 = cfg.lr``)."""
    return cfg.lr / (1.0 + cfg.lr * options(cfg)["decay"] * (iteration - 1))


def node_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: mean over pairs and nodes of the squared node displacement error (voxels²);
    ``(B, 3, nk, nj, ni)`` each."""
    return ((pred - target) ** 2).sum(dim=1).mean()


# --------------------------------------------------------------------------- data
class TPSPairDataset(Dataset):
    """Item ``n``: ``(fixed (1, D, H, W), moving (1, D, H, W), nodes (3, nk, nj, ni), mask (1, D, H, W))``
    generated from ``(seed, n)`` alone (``pool > 0``: from ``(seed, n % pool)``)."""

    def __init__(self, scans: Sequence[PreparedScan], preset: TPSPreset, net: TPSNetConfig, seed: int,
                 kernel: str = "r", pool: int = 0) -> None:
        self.images = [torch.from_numpy(np.ascontiguousarray(s.image, dtype=np.float32))[None, None] for s in scans]
        self.masks = [torch.from_numpy(np.ascontiguousarray(s.mask, dtype=np.float32))[None, None] for s in scans]
        self.directions = [tuple(s.grid.direction) for s in scans]
        self.nodes = [net.nodes(s.image.shape) for s in scans]
        self.preset, self.seed, self.kernel, self.pool = preset, seed, kernel, pool

    def to(self, device: torch.device) -> TPSPairDataset:
        """Keep the scans on ``device`` so that pairs are generated there (CUDA: no worker processes)."""
        self.images = [t.to(device) for t in self.images]
        self.masks = [t.to(device) for t in self.masks]
        return self

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        k = int(torch.randint(len(self.images), (1,), generator=g))
        pair = make_pair(self.images[k], self.masks[k], self.directions[k], self.preset, self.nodes[k], g, self.kernel)
        return pair.fixed[0], pair.moving[0], pair.nodes[0], pair.mask[0]


@dataclass
class ValidationSet(Validator):
    fixed: torch.Tensor        # (P, 1, D, H, W)
    moving: torch.Tensor       # (P, 1, D, H, W)
    nodes: torch.Tensor        # (P, 3, nk, nj, ni) voxels
    mask: torch.Tensor         # (P, 1, D, H, W) lung in the fixed frame
    spacing: torch.Tensor      # (3,) mm of the lattice, (s_i, s_j, s_k)
    kernel: str = "r"

    @classmethod
    def build(cls, scan: PreparedScan, preset: TPSPreset, net: TPSNetConfig, n_pairs: int, seed: int,
              kernel: str = "r") -> ValidationSet:
        ds = TPSPairDataset([scan], preset, net, seed + 7919, kernel)
        fixed, moving, nodes, mask = (torch.stack(x) for x in zip(*(ds[i] for i in range(n_pairs)), strict=True))
        return cls(fixed, moving, nodes, mask, torch.tensor(scan.grid.spacing, dtype=torch.float32), kernel)

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict[str, float]:
        """Mean end-point error (mm) of the dense TPS field in the lung, and the node MSE (voxels², the loss);
        ``net=None`` evaluates the identity."""
        was_training = net.training if net is not None else False
        if net is not None:
            net.eval()
        lung, mse = [], []
        shape = tuple(self.fixed.shape[2:])
        for i in range(len(self.fixed)):
            target = self.nodes[i : i + 1].to(device)
            if net is None:
                pred = torch.zeros_like(target)
            else:
                pred = net(torch.cat((self.fixed[i : i + 1], self.moving[i : i + 1]), dim=1).to(device)).float()
            err = tps_field(pred - target, shape, self.kernel)                 # the TPS is linear in the nodes
            epe = (err * self.spacing.to(device).view(1, 3, 1, 1, 1)).norm(dim=1)[0].cpu()
            m = self.mask[i, 0] > 0
            lung.append(float(epe[m].mean()) if m.any() else float(epe.mean()))
            mse.append(float(node_mse(pred, target)))
        if net is not None and was_training:
            net.train()
        return {"epe_lung_mm": float(np.mean(lung)), "node_mse_vox2": float(np.mean(mse))}


# --------------------------------------------------------------------------- recipe
class Eppenhof2018TPSRecipe(Recipe):
    method = METHOD
    paper = PAPER
    defaults: ClassVar[dict] = {"preset": "eppenhof2018tps", "grid": GRID, "optimizer": "sgd", "lr": LEARNING_RATE,
                                "momentum": 0.0, "loss": "l2", "width": WIDTH, "depth": 4, "norm": "batch",
                                "snapshot_every": 1, "average_last": 1}

    def before_step(self, net, iteration: int, cfg) -> dict:
        return {"lr": learning_rate(cfg, iteration)}

    def learning_rate(self, iteration: int, cfg) -> float:
        return learning_rate(cfg, iteration)

    def validate_config(self, cfg) -> None:
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r} for {METHOD}; choose from {', '.join(PRESETS)}")
        if cfg.loss != "l2":
            raise InputError(f"--loss {cfg.loss}: {METHOD} trains with the paper's mean squared node error (l2)")
        if not 1 <= cfg.width <= 128:
            raise InputError(f"--width {cfg.width} must be 1..128")
        if not 1 <= cfg.depth <= 6:
            raise InputError(f"--depth {cfg.depth}: {METHOD} takes 1..6 convolution + pooling blocks (the paper: 4)")
        options(cfg)
        try:
            network_config(cfg).nodes(cfg.grid_size()[::-1])
        except ValueError as exc:
            raise InputError(f"--grid {cfg.grid}: {exc}") from None

    def build_network(self, cfg) -> TPSNet:
        return TPSNet(network_config(cfg))

    def prepare(self, image, cfg) -> PreparedScan:
        g = cfg.grid_size()
        return prepare_scan(image, g[0] if len(set(g)) == 1 else g)

    def dataset(self, scans, cfg) -> TPSPairDataset:
        return TPSPairDataset(scans, preset_of(cfg), network_config(cfg), cfg.seed, options(cfg)["kernel"],
                              cfg.pair_pool)

    def loss(self, net, batch, cfg) -> torch.Tensor:
        fixed, moving, nodes, _mask = batch
        return node_mse(net(torch.cat((fixed, moving), dim=1)), nodes)

    def validator(self, scan, cfg) -> ValidationSet:
        return ValidationSet.build(scan, preset_of(cfg), network_config(cfg), cfg.validation_pairs, cfg.seed,
                                   options(cfg)["kernel"])

    def metadata(self, cfg) -> dict:
        o, net = options(cfg), network_config(cfg)
        nk, nj, ni = net.nodes(cfg.grid_size()[::-1])
        return {"method": METHOD, "paper": PAPER, "grid_size": cfg.grid, "normalisation": NORMALISATION,
                "network": net.to_dict(), "displacement_units": DISPLACEMENT_UNITS,
                "tps": {"nodes": [ni, nj, nk], "kernel": o["kernel"], "placement": NODE_PLACEMENT,
                        "coordinates": "voxel indices (i, j, k) of the network lattice"},
                "synthesis": preset_of(cfg).to_dict(),
                "loss": "mean over nodes of the squared node displacement error (voxels^2)",
                "schedule": {"optimizer": cfg.optimizer, "momentum": cfg.momentum, "lr0": cfg.lr, "decay": o["decay"],
                             "rule": "lr = lr0 / (1 + lr0 * decay * (iteration - 1))", "batch_size": cfg.batch_size}}


RECIPE = Eppenhof2018TPSRecipe()
