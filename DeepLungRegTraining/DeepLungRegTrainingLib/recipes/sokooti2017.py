"""Training recipe of ``sokooti2017``: RegNet on patches of synthetic smoothed random deformations.

Sokooti et al., "Nonrigid image registration using multi-scale 3D convolutional neural
networks", MICCAI 2017.

Scans: each is cropped to its lungs as the pipeline does (``network_grid`` with ``--grid``
nodes, lungs + 10 mm) and resampled onto the method's network lattice (``spacing_mm``, the same
path as :meth:`DeepLungRegLib.methods.sokooti2017.Sokooti2017.predict`). Item ``n`` of the
dataset is one synthetic pair (:mod:`..synthesis_sokooti2017`: low/medium/high frequency field,
half of them with a deformed moving image) mirrored along a random subset of the three axes,
and ``patches`` patch pairs centred on random lung voxels of its fixed image, with the
displacement (mm) of each centre as target. Loss: mean absolute error of the displacement
components (mm), the paper's MAE (``--loss l2``: squared error). Optimiser: Adam, learning rate
1e-3 divided by 1.25 after every epoch; an epoch is ``epoch`` iterations (default: a fifteenth
of the run, as the paper's 15 epochs). The final weights are the last ones (no averaging).

Method settings (``--option KEY=VALUE``):

* ``spacing_mm`` (2.0): network lattice spacing (the paper: 1 mm images);
* ``patches`` (32): patch pairs per synthetic pair (the paper: 2100 per image and field);
* ``epoch`` (iterations / 15, rounded up): iterations per learning-rate epoch;
* ``theta_mm`` (8): the θ of every random field (the paper's 8 mm);
* ``scales`` (2): 1 trains the paper's single-scale variant (original-resolution pipeline only);
* ``output_stride`` (2): written to the model; ``register`` computes the network at every second node of
  the lattice (a 4 mm output lattice at 2 mm; 8× fewer centres, about 3× faster on the CPU) and
  interpolates between them; 1 computes every node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.methods.sokooti2017 import (
    CONTEXT_PATCH,
    DEFAULT_SPACING_MM,
    LOW_PATCH,
    ORIG_PATCH,
    PAD_VALUE,
    RegNet,
    RegNetConfig,
    extract_patches,
    network_lattice,
    to_lattice,
)
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan
from torch.utils.data import Dataset

from ..synthesis_sokooti2017 import PRESETS, SokootiPreset, flip_pair, make_pair, sample_centres
from .base import Recipe, Validator, pair_generator, typed_options

METHOD = "sokooti2017"
PAPER = "Sokooti et al., MICCAI 2017"
LEARNING_RATE = 1e-3
DECAY = 1.25                # learning rate divided by this after every epoch
PAPER_EPOCHS = 15
GRID = 192                  # nodes of the lung-box lattice handed over by the pipeline (finer than 2 mm up to 38 cm)
VALIDATION_PATCHES = 16     # patch pairs per validation pair
DISPLACEMENT_UNITS = ("network output: mm along the network lattice axes, channels (i, j, k), of the patch's centre "
                      "voxel; predict returns voxels of the pipeline's network grid, channels (i, j, k); maps fixed "
                      "point p to moving point p + u(p)")

#: ``--option`` names: (default, type) (``epoch``'s and ``theta_mm``'s defaults depend on the settings).
OPTIONS = {"spacing_mm": (DEFAULT_SPACING_MM, float), "patches": (32, int), "epoch": (None, int),
           "theta_mm": (None, float), "output_stride": (2, int), "scales": (2, int)}


def options(cfg) -> dict:
    """The method settings of ``cfg`` with their defaults, typed (an :class:`InputError` for bad ones)."""
    out = typed_options(METHOD, cfg.options, OPTIONS)
    if out["epoch"] is None:
        out["epoch"] = max(1, math.ceil(cfg.iterations / PAPER_EPOCHS))
    return out


def preset_of(cfg) -> SokootiPreset:
    preset = PRESETS[cfg.preset]
    theta = options(cfg)["theta_mm"]
    return preset if theta is None else preset.with_theta(theta)


def learning_rate(cfg, iteration: int) -> float:
    """Learning rate of (1-based) ``iteration``: ``lr / 1.25^epoch``."""
    return cfg.lr / DECAY ** ((iteration - 1) // options(cfg)["epoch"])


# --------------------------------------------------------------------------- data
class PatchPairDataset(Dataset):
    """Item ``n``: ``(orig (K, 2, 29³), low (K, 2, 27³), target (K, 3) mm)`` generated from ``(seed, n)`` alone."""

    def __init__(self, scans: Sequence[PreparedScan], preset: SokootiPreset, patches: int, seed: int,
                 pool: int = 0) -> None:
        self.images = [torch.from_numpy(np.ascontiguousarray(s.image, dtype=np.float32)) for s in scans]
        self.masks = [torch.from_numpy(np.ascontiguousarray(s.mask, dtype=bool)) for s in scans]
        self.spacings = [tuple(float(v) for v in s.grid.spacing) for s in scans]
        self.preset, self.patches, self.seed, self.pool = preset, patches, seed, pool

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        k = int(torch.randint(len(self.images), (1,), generator=g))
        pair = make_pair(self.images[k], self.masks[k], self.spacings[k], self.preset, g)
        axes = tuple(a for a in range(3) if bool(torch.rand((), generator=g) < 0.5))
        fixed, moving, dvf, mask = flip_pair(pair.fixed, pair.moving, pair.dvf_mm, pair.fixed_mask, axes)
        centres = sample_centres(mask, self.patches, g)
        orig, low = extract_patches(fixed, moving, centres)
        target = dvf[:, centres[:, 0], centres[:, 1], centres[:, 2]].T.contiguous()
        return orig, low, target


def regnet_loss(net, orig: torch.Tensor, low: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``, the paper's MAE) or squared (``l2``) error of the displacement components, mm."""
    pred = net(orig.flatten(0, 1), low.flatten(0, 1)).flatten(1)
    err = pred - target.flatten(0, 1)
    return err.abs().mean() if kind == "l1" else (err**2).mean()


@dataclass
class ValidationSet(Validator):
    orig: torch.Tensor      # (N, 2, 29³)
    low: torch.Tensor       # (N, 2, 27³)
    target: torch.Tensor    # (N, 3) mm

    @classmethod
    def build(cls, scan: PreparedScan, preset: SokootiPreset, n_pairs: int, seed: int) -> ValidationSet:
        ds = PatchPairDataset([scan], preset, VALIDATION_PATCHES, seed + 7919)
        orig, low, target = (torch.cat(x) for x in zip(*(ds[i] for i in range(n_pairs)), strict=True))
        return cls(orig, low, target)

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict:
        """Mean end-point error and mean absolute component error (mm) at the validation patches'
        centres (lung voxels); ``net=None`` = identity."""
        if net is None:
            pred = torch.zeros_like(self.target)
        else:
            was_training = net.training
            net.eval()
            pred = torch.cat([net(self.orig[s : s + 32].to(device), self.low[s : s + 32].to(device)).flatten(1).cpu()
                              for s in range(0, len(self.target), 32)])
            if was_training:
                net.train()
        err = pred - self.target
        return {"epe_lung_mm": float(err.norm(dim=1).mean()), "mae_mm": float(err.abs().mean())}


class Sokooti2017Recipe(Recipe):
    method = METHOD
    paper = PAPER
    defaults: ClassVar[dict] = {"preset": "sokooti2017", "grid": GRID, "optimizer": "adam", "lr": LEARNING_RATE,
                                "loss": "l1", "width": 16, "norm": "batch", "snapshot_every": 1, "average_last": 1}

    def before_step(self, net, iteration, cfg) -> dict:
        return {"lr": learning_rate(cfg, iteration)}

    def learning_rate(self, iteration: int, cfg) -> float:
        return learning_rate(cfg, iteration)

    def validate_config(self, cfg) -> None:
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r} for {METHOD}; choose from {', '.join(PRESETS)}")
        if cfg.norm != "batch":
            raise InputError(f"{METHOD} uses batch normalisation (the paper's); --norm {cfg.norm} is not available")
        if cfg.loss not in ("l1", "l2"):
            raise InputError(f"--loss {cfg.loss!r}: use l1 (the paper's MAE) or l2")
        if cfg.width > 128:
            raise InputError(f"--width {cfg.width} is above 128")
        o = options(cfg)
        if not (0.25 <= o["spacing_mm"] <= 20.0):
            raise InputError(f"--option spacing_mm={o['spacing_mm']} is outside [0.25, 20] mm")
        if o["patches"] < 1 or o["epoch"] < 1:
            raise InputError("--option patches and epoch must be >= 1")
        if o["theta_mm"] is not None and not (0 < o["theta_mm"] < 1000):
            raise InputError(f"--option theta_mm={o['theta_mm']} must be a positive length in mm")
        if o["scales"] not in (1, 2):
            raise InputError(f"--option scales={o['scales']}: use 2 (RegNet) or 1 (single-scale variant)")
        if o["output_stride"] not in (1, 2):
            raise InputError(f"--option output_stride={o['output_stride']}: use 1 or 2")

    def build_network(self, cfg) -> RegNet:
        return RegNet(RegNetConfig(width=cfg.width, scales=options(cfg)["scales"]))

    def prepare(self, image, cfg) -> PreparedScan:
        scan = prepare_scan(image, cfg.grid)
        lattice = network_lattice(scan.grid, options(cfg)["spacing_mm"])
        return PreparedScan(to_lattice(scan.image, scan.grid, lattice).numpy(),
                            to_lattice(scan.mask, scan.grid, lattice, mask=True).numpy(), lattice, scan.fallback_mask)

    def dataset(self, scans, cfg) -> PatchPairDataset:
        return PatchPairDataset(scans, preset_of(cfg), options(cfg)["patches"], cfg.seed, cfg.pair_pool)

    def loss(self, net, batch, cfg) -> torch.Tensor:
        orig, low, target = batch
        return regnet_loss(net, orig, low, target, cfg.loss)

    def validator(self, scan, cfg) -> ValidationSet:
        return ValidationSet.build(scan, preset_of(cfg), cfg.validation_pairs, cfg.seed)

    def metadata(self, cfg) -> dict:
        o = options(cfg)
        return {"method": METHOD, "paper": PAPER, "grid_size": cfg.grid, "normalisation": NORMALISATION,
                "lattice_spacing_mm": o["spacing_mm"], "output_stride": o["output_stride"],
                "displacement_units": DISPLACEMENT_UNITS,
                "patches": {"original": ORIG_PATCH, "context": CONTEXT_PATCH, "context_downsampled": LOW_PATCH,
                            "padding_value": PAD_VALUE, "padding": "normalised -1000 HU outside the lattice"},
                "synthesis": preset_of(cfg).to_dict(),
                "schedule": {"optimizer": cfg.optimizer, "lr": cfg.lr, "decay_per_epoch": DECAY,
                             "epoch_iterations": o["epoch"], "patches_per_pair": o["patches"]}}


RECIPE = Sokooti2017Recipe()
