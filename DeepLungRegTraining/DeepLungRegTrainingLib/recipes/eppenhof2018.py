"""Training recipe of ``eppenhof2018``: supervised U-Net on synthetic B-spline deformations.

Eppenhof & Pluim, "Pulmonary CT registration through supervised learning with convolutional
neural networks", IEEE Transactions on Medical Imaging 38(5), 2018.

Pairs: a lung-cropped scan and its copy deformed by the Table I transforms
(:mod:`..synthesis`); loss: L1 of the displacement error inside the (warped) lung mask;
Adagrad 1e-2; weights averaged over the last snapshots (paper: the last 200 of ~1900 taken
every 50 iterations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan
from torch.utils.data import Dataset

from ..losses import endpoint_error_mm, masked_displacement_loss
from ..synthesis import PRESETS, make_pair
from .base import Recipe, Validator, pair_generator

METHOD = "eppenhof2018"
PAPER = "Eppenhof & Pluim, IEEE TMI 2018"
SYNTHESIS_PRESET = "eppenhof2018"
LOSS = "l1"                 # L1 of the displacement error inside the (warped) lung mask
OPTIMIZER = "adagrad"
LEARNING_RATE = 1e-2
SNAPSHOT_EVERY = 50         # iterations between weight snapshots
AVERAGED_FRACTION = 200 / 1900  # final weights = mean of the last ~10.5 % of the snapshots
GRID = 128                  # network input size after lung cropping


class SyntheticPairDataset(Dataset):
    """Item ``n`` is a (fixed, moving, target, mask) tuple generated from ``(seed, n)`` alone."""

    def __init__(self, scans: Sequence[PreparedScan], preset: str, seed: int, pool: int = 0) -> None:
        self.images = [torch.from_numpy(s.image)[None] for s in scans]
        self.masks = [torch.from_numpy(s.mask.astype(np.float32))[None] for s in scans]
        self.preset = PRESETS[preset]
        self.seed = seed
        self.pool = pool

    def to(self, device: torch.device) -> SyntheticPairDataset:
        """Keep the scans on ``device`` so that pairs are generated there (CUDA: no worker processes)."""
        self.images = [t.to(device) for t in self.images]
        self.masks = [t.to(device) for t in self.masks]
        return self

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        k = int(torch.randint(len(self.images), (1,), generator=g))
        pair = make_pair(self.images[k][None], self.masks[k][None], self.preset, g)
        return pair.fixed[0], pair.moving[0], pair.target[0], pair.mask[0]


@dataclass
class ValidationSet(Validator):
    fixed: torch.Tensor
    moving: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    points: list[torch.Tensor]     # per pair: (P,) flat indices of random lung voxels
    spacing: torch.Tensor          # (3,) mm of the held-out scan's network grid

    @classmethod
    def build(cls, scan: PreparedScan, preset: str, n_pairs: int, seed: int, n_points: int = 300) -> ValidationSet:
        ds = SyntheticPairDataset([scan], preset, seed + 7919)
        items = [ds[i] for i in range(n_pairs)]
        fixed, moving, target, mask = (torch.stack(x) for x in zip(*items, strict=True))
        g = torch.Generator().manual_seed(seed + 104729)
        points = []
        for m in mask:
            idx = torch.nonzero(m.flatten() > 0).flatten()
            if idx.numel() == 0:
                idx = torch.arange(m.numel())
            points.append(idx[torch.randint(idx.numel(), (n_points,), generator=g)])
        return cls(fixed, moving, target, mask, points, torch.tensor(scan.grid.spacing, dtype=torch.float32))

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict:
        """Mean end-point error (mm) inside the lung and at random lung points; ``net=None`` = identity."""
        lung, pts = [], []
        was_training = net.training if net is not None else False
        if net is not None:
            net.eval()
        for i in range(len(self.fixed)):
            target = self.target[i : i + 1].to(device)
            if net is None:
                pred = torch.zeros_like(target)
            else:
                pred = net(torch.cat((self.fixed[i : i + 1], self.moving[i : i + 1]), dim=1).to(device))
            epe = endpoint_error_mm(pred, target, self.spacing.to(device))[0].cpu()
            m = self.mask[i, 0] > 0
            lung.append(float(epe[m].mean()) if m.any() else float(epe.mean()))
            pts.append(float(epe.flatten()[self.points[i]].mean()))
        if net is not None and was_training:
            net.train()
        return {"epe_lung_mm": float(np.mean(lung)), "epe_points_mm": float(np.mean(pts))}


class Eppenhof2018Recipe(Recipe):
    method = METHOD
    paper = PAPER
    defaults: ClassVar[dict] = {"preset": SYNTHESIS_PRESET, "grid": GRID, "optimizer": OPTIMIZER,
                                "lr": LEARNING_RATE, "loss": LOSS, "snapshot_every": SNAPSHOT_EVERY,
                                "width": 16, "depth": 4, "norm": "batch"}

    def validate_config(self, cfg) -> None:
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
        divisor = UNetConfig(width=cfg.width, depth=cfg.depth).divisor
        if any(g % divisor for g in cfg.grid_size()):
            raise InputError(f"grid {cfg.grid} must be a multiple of {divisor} for depth {cfg.depth}")
        if cfg.options:
            raise InputError(f"{METHOD} takes no --option (given: {', '.join(cfg.options)})")

    def build_network(self, cfg) -> UNet3D:
        return UNet3D(UNetConfig(width=cfg.width, depth=cfg.depth, norm=cfg.norm))

    def prepare(self, image, cfg) -> PreparedScan:
        return prepare_scan(image, cfg.grid)

    def dataset(self, scans, cfg) -> SyntheticPairDataset:
        return SyntheticPairDataset(scans, cfg.preset, cfg.seed, cfg.pair_pool)

    def loss(self, net, batch, cfg) -> torch.Tensor:
        fixed, moving, target, mask = batch
        pred = net(torch.cat((fixed, moving), dim=1))
        return masked_displacement_loss(pred, target, mask, cfg.loss)

    def validator(self, scan, cfg) -> ValidationSet:
        return ValidationSet.build(scan, cfg.preset, cfg.validation_pairs, cfg.seed)

    def metadata(self, cfg) -> dict:
        return {"method": METHOD, "paper": PAPER, "grid_size": cfg.grid, "normalisation": NORMALISATION,
                "synthesis_preset": PRESETS[cfg.preset].to_dict()}


RECIPE = Eppenhof2018Recipe()
