"""Training recipe of ``eppenhof2018``: supervised U-Net on synthetic B-spline deformations.

Eppenhof & Pluim, "Pulmonary CT registration through supervised learning with convolutional
neural networks", IEEE Transactions on Medical Imaging 38(5), 2018.

Pairs (``--option sources=bspline:0.6,breathing:0.3,still:0.1``):

* ``bspline`` — the paper's pairs: a lung-cropped scan and its copy deformed by the Table I
  transforms (:mod:`..synthesis`; the ranges are displacements *of the grid points*, interpolated
  by a cubic spline, images interpolated once with third-order B-splines), gamma on each image;
* ``breathing`` — random breathing motion of the same scan (:mod:`..breathing`: cranio-caudal
  motion largest at the bases, anterior-posterior and lateral expansion, sliding at the pleura,
  density change; both directions), so that the shipped model sees realistic inhale/exhale
  motion (not in the paper);
* ``still`` — the same augmented scan twice with independent gamma: zero target, so that two
  identical images give (nearly) zero displacement (not in the paper).

Loss: L1 of the displacement error inside the lung mask (voxels); Adagrad 1e-2; leaky ReLU slope
0.01 (``--option slope``); weights averaged over the last snapshots (paper: the last 200 of ~1930
taken every 50 iterations). Validation reports the synthetic B-spline error (``epe_lung_mm``), the
error on breathing pairs of 8-32 mm (``breathing_epe_mm``) and the mean predicted displacement for
two identical images (``still_mm``).
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

from ..breathing import BreathingRanges, make_breathing_pair
from ..losses import endpoint_error_mm, masked_displacement_loss
from ..synthesis import PRESETS, make_pair, random_gamma
from .base import Recipe, Validator, normalised_weights, pair_generator, source_weights, typed_options

METHOD = "eppenhof2018"
PAPER = "Eppenhof & Pluim, IEEE TMI 2018"
SYNTHESIS_PRESET = "eppenhof2018"
LOSS = "l1"                 # L1 of the displacement error inside the (warped) lung mask
OPTIMIZER = "adagrad"
LEARNING_RATE = 1e-2
SNAPSHOT_EVERY = 50         # iterations between weight snapshots
AVERAGED_FRACTION = 200 / 1900  # final weights = mean of the last ~10.5 % of the snapshots
GRID = 128                  # network input size after lung cropping
SOURCES = ("bspline", "breathing", "still")
#: ``--option`` settings: name -> (default, type)
OPTIONS = {
    "sources": ("bspline:0.6,breathing:0.3,still:0.1", str),
    "slope": (0.01, float),          # leaky ReLU negative slope (the paper: 0.01)
}


def parse_options(raw: dict) -> dict:
    """The recipe's settings: defaults overridden by ``--option`` values (one-line errors)."""
    out = typed_options(METHOD, raw, OPTIONS)
    if not (0 <= out["slope"] < 1):
        raise InputError(f"{METHOD}: --option slope must be in [0, 1), got {out['slope']}")
    out["sources"] = normalised_weights(METHOD, source_weights(METHOD, out["sources"], SOURCES))
    return out


class SyntheticPairDataset(Dataset):
    """Item ``n`` is a (fixed, moving, target, mask) tuple generated from ``(seed, n)`` alone."""

    def __init__(self, scans: Sequence[PreparedScan], preset: str, seed: int, pool: int = 0,
                 sources: dict[str, float] | None = None) -> None:
        self.images = [torch.from_numpy(s.image)[None] for s in scans]
        self.masks = [torch.from_numpy(s.mask.astype(np.float32))[None] for s in scans]
        self.lattices = [s.grid for s in scans]
        self.preset = PRESETS[preset]
        self.seed = seed
        self.pool = pool
        self.sources = list((sources or {"bspline": 1.0}).items())
        self.ranges = BreathingRanges()

    def to(self, device: torch.device) -> SyntheticPairDataset:
        """Keep the scans on ``device`` so that pairs are generated there (CUDA: no worker processes)."""
        self.images = [t.to(device) for t in self.images]
        self.masks = [t.to(device) for t in self.masks]
        return self

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        source = self.sources[0][0]
        if len(self.sources) > 1:
            r, acc = float(torch.rand((), generator=g)), 0.0
            source = self.sources[-1][0]
            for name, w in self.sources:
                acc += w
                if r < acc:
                    source = name
                    break
        k = int(torch.randint(len(self.images), (1,), generator=g))
        image, mask = self.images[k][None], self.masks[k][None]
        if source == "breathing":
            b = make_breathing_pair(image.cpu(), mask.cpu(), self.lattices[k], self.ranges, g, n_points=1)
            fixed = random_gamma(b.fixed.to(image.device), self.preset.gamma_range, g)
            moving = random_gamma(b.moving.to(image.device), self.preset.gamma_range, g)
            return fixed[0], moving[0], b.target[0].to(image.device), (b.fixed_mask[0] > 0.5).float().to(image.device)
        pair = make_pair(image, mask, self.preset, g, still=source == "still")
        return pair.fixed[0], pair.moving[0], pair.target[0], pair.mask[0]


@dataclass
class ValidationSet(Validator):
    fixed: torch.Tensor
    moving: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    points: list[torch.Tensor]     # per pair: (P,) flat indices of random lung voxels
    spacing: torch.Tensor          # (3,) mm of the held-out scan's network grid
    breathing: list = None         # BreathingPair list (8-32 mm at the bases), or empty
    still: tuple | None = None     # (fixed, moving, mask): the same augmented scan twice

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
        image = torch.from_numpy(scan.image)[None, None]
        lung = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
        gb = pair_generator(seed + 7919, 10**6)  # streams apart from the B-spline pairs' 0..n-1
        amps = np.linspace(8.0, 32.0, n_pairs) if n_pairs > 1 else [20.0]
        breathing = [make_breathing_pair(image, lung, scan.grid, BreathingRanges(), gb, n_points=1, amplitude=float(a),
                                         swap=bool(i % 2), noise_std=0.0) for i, a in enumerate(amps)]
        same = make_pair(image, lung, PRESETS[preset], pair_generator(seed + 7919, 10**6 + 1), still=True)
        still = (same.fixed, same.fixed.clone(), same.mask)
        return cls(fixed, moving, target, mask, points, torch.tensor(scan.grid.spacing, dtype=torch.float32),
                   breathing, still)

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
        out = {"epe_lung_mm": float(np.mean(lung)), "epe_points_mm": float(np.mean(pts))}
        spacing = self.spacing.to(device)
        if self.breathing:
            errs = []
            for b in self.breathing:
                target = b.target.to(device)
                pred = torch.zeros_like(target) if net is None else net(torch.cat((b.fixed, b.moving), 1).to(device))
                epe = endpoint_error_mm(pred, target, spacing)[0].cpu()
                m = b.fixed_mask[0, 0] > 0.5
                errs.append(float(epe[m].mean()) if m.any() else float(epe.mean()))
            out["breathing_epe_mm"] = float(np.mean(errs))
        if self.still is not None:
            fixed, moving, mask = self.still
            x = torch.cat((fixed, moving), 1).to(device)
            pred = torch.zeros((1, 3, *fixed.shape[2:]), device=device) if net is None else net(x)
            size = endpoint_error_mm(pred, torch.zeros_like(pred), spacing)[0].cpu()
            m = mask[0, 0] > 0.5
            out["still_mm"] = float(size[m].mean()) if m.any() else float(size.mean())
        if net is not None and was_training:
            net.train()
        return out


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
        self.options(cfg)

    def options(self, cfg) -> dict:
        """The checked ``--option`` settings of this method (a subclass with other options overrides it)."""
        return parse_options(cfg.options)

    def build_network(self, cfg) -> UNet3D:
        return UNet3D(UNetConfig(width=cfg.width, depth=cfg.depth, norm=cfg.norm,
                                 negative_slope=self.options(cfg)["slope"]))

    def prepare(self, image, cfg) -> PreparedScan:
        return prepare_scan(image, cfg.grid)

    def dataset(self, scans, cfg) -> SyntheticPairDataset:
        return SyntheticPairDataset(scans, cfg.preset, cfg.seed, cfg.pair_pool, self.options(cfg)["sources"])

    def loss(self, net, batch, cfg) -> torch.Tensor:
        fixed, moving, target, mask = batch
        pred = net(torch.cat((fixed, moving), dim=1))
        return masked_displacement_loss(pred, target, mask, cfg.loss)

    def validator(self, scan, cfg) -> ValidationSet:
        return ValidationSet.build(scan, cfg.preset, cfg.validation_pairs, cfg.seed)

    def metadata(self, cfg) -> dict:
        opts = self.options(cfg)
        return {"method": METHOD, "paper": PAPER, "grid_size": cfg.grid, "normalisation": NORMALISATION,
                "synthesis_preset": PRESETS[cfg.preset].to_dict(), "sources": opts["sources"],
                "breathing_ranges": BreathingRanges().to_dict()}


RECIPE = Eppenhof2018Recipe()
