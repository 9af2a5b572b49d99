"""Training recipe of ``hering2021``: multilevel U-Nets trained progressively with NGF, curvature,
volume-change control, mask alignment and keypoint losses.

Hering et al., "CNN-based lung CT registration with multiple anatomical constraints", Medical
Image Analysis 72, 2021 (sections 3.2-3.4, 4.3).

Loss of level ℓ for the composed field ``y = T_prev ∘ T_ℓ`` on the level grid (eq. 8):
``D + α R + β B + γ V + δ K`` with

* ``D`` NGF distance (eq. 1) between the fixed image and the warped moving image, restricted to the
  fixed lung mask; images scaled back to HU (the [0, 1] window × 1200) so that the edge parameter
  ``ε`` is in HU/mm as in the paper (ε = 1);
* ``R`` curvature of the level's increment (eq. 2), displacements in mm, per mm²;
* ``V`` volume-change control ψ_t (eq. 6) of the composed field's Jacobian determinant over the
  whole lattice, ``t = 0.2`` on the coarsest level, halved on each finer one;
* ``B`` half the squared difference of the warped moving and the fixed lung mask summed over the
  lattice and divided by the fixed lung volume, as ``D`` (eq. 7; the
  automatic lung mask, one label — lobe masks are not available here), masks warped linearly;
* ``K`` mean squared keypoint distance in mm² (off on the coarsest level).

Weights (paper: α = 10, β = 1, γ = 0.01; δ = 0 on the coarsest level, ε = 1) are ``--option``
settings. The paper's δ belongs to its own coordinate scaling; ours, ``δ = 0.01`` per mm², makes a
10 mm keypoint error cost 1, the cost of entirely unrelated edges under NGF.

Pairs (``--option sources=breathing:0.7,bspline:0.3[,pairs:W]``): (b) random breathing pairs of
single scans (:mod:`..breathing`, amplitude 5-35 mm at the bases, both directions, sliding)
with exact keypoint pairs at random lung points; (c) the Eppenhof 2018 random B-spline pairs
(:mod:`..synthesis`) with exact keypoint pairs likewise; (a) real pairs from a CSV manifest
(``--option pairs=manifest.csv``, the ``evaluate`` format), whose keypoints are detected in the
fixed lung (:func:`DeepLungRegLib.simulation.detect_keypoints`: Laplacian-of-Gaussian blobs, i.e.
vessel crossings) and whose partners come from this project's registration with the shipped
default model and full test-time refinement (noisy labels, like the paper's 1-2 mm keypoints).

Training is progressive: the run's iterations are split evenly between the levels, coarsest
first; each finer level starts from the weights of the level above and the coarser networks
stay frozen (:meth:`before_step`). Adam, learning rate 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.fields import compose, resize_field, warp
from DeepLungRegLib.losses import curvature, jacobian_determinant, keypoint_loss, ngf, volume_change_penalty
from DeepLungRegLib.methods.hering2021 import (
    GRID,
    LEVELS,
    NAME,
    PAPER,
    Hering2021Config,
    Hering2021Net,
    downsample,
    level_spacing,
)
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan
from torch.utils.data import Dataset

from ..breathing import BreathingRanges, make_breathing_pair, sample_field, sample_points
from ..synthesis import PRESETS, make_pair
from .base import Recipe, Validator, normalised_weights, pair_generator, source_weights, typed_options

HU_SCALE = NORMALISATION["hu_max"] - NORMALISATION["hu_min"]   # [0, 1] window -> HU differences

#: ``--option`` settings, their defaults and parsers.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "levels": (LEVELS, int),
    "alpha": (10.0, float),          # curvature
    "beta": (1.0, float),            # lung-mask alignment
    "gamma": (0.01, float),          # volume-change control
    "delta": (0.01, float),          # keypoints, per mm² (0 on the coarsest level)
    "eps": (1.0, float),             # NGF edge parameter, HU/mm
    "t": (0.2, float),               # barrier position on the coarsest level (halved per finer level)
    "keypoints": (500, int),         # keypoints per synthetic pair
    "sources": ("breathing:0.7,bspline:0.3", str),
    "pairs": ("", str),              # CSV manifest of real pairs (source "pairs")
    "bspline_preset": ("eppenhof2018_coefficients", str),  # what the shipped model trained with (before grid points)
    "level_iterations": ("", str),   # iterations per level, coarsest first ("1200,600,200"); default: even split
}


def parse_options(raw: dict) -> dict[str, Any]:
    """The recipe's settings: defaults overridden by ``--option`` values (one-line errors)."""
    out = typed_options(NAME, raw, OPTIONS)
    if out["levels"] < 1 or out["levels"] > 4:
        raise InputError(f"{NAME}: --option levels must be 1..4, got {out['levels']}")
    for key in ("alpha", "beta", "gamma", "delta", "eps", "t"):
        if not (math.isfinite(out[key]) and out[key] >= 0):
            raise InputError(f"{NAME}: --option {key} must be a finite number >= 0, got {out[key]}")
    if out["t"] <= 0:
        raise InputError(f"{NAME}: --option t must be > 0")
    out["sources"] = parse_sources(out["sources"], bool(out["pairs"]))
    if out["level_iterations"]:
        try:
            steps = [int(v) for v in out["level_iterations"].replace(";", ",").split(",")]
        except ValueError:
            raise InputError(f"{NAME}: --option level_iterations={out['level_iterations']!r}: whole numbers, "
                             "coarsest level first") from None
        if len(steps) != out["levels"] or min(steps) < 1:
            raise InputError(f"{NAME}: --option level_iterations needs {out['levels']} counts >= 1 (one per level)")
        out["level_iterations"] = steps
    else:
        out["level_iterations"] = None
    if out["bspline_preset"] not in PRESETS:
        raise InputError(f"{NAME}: unknown bspline_preset {out['bspline_preset']!r}; choose from {', '.join(PRESETS)}")
    return out


def parse_sources(text: str, have_pairs: bool) -> dict[str, float]:
    """``name:weight,...`` -> normalised weights of the pair sources ``breathing``, ``bspline``, ``pairs``."""
    weights = source_weights(NAME, text, ("breathing", "bspline", "pairs"))
    if weights.get("pairs", 0) > 0 and not have_pairs:
        raise InputError(f"{NAME}: source 'pairs' needs --option pairs=MANIFEST.csv")
    if have_pairs and "pairs" not in weights:
        weights["pairs"] = 0.3
    return normalised_weights(NAME, weights)


def stage_starts(iterations: int, levels: int, schedule: Sequence[int] | None = None) -> list[int]:
    """First iteration (1-based) of each level's stage, coarsest first: ``schedule`` (iterations per
    level, summing to ``iterations``) or an even split."""
    if schedule is None:
        per = math.ceil(iterations / levels)
        schedule = [per] * levels
    return [1 + sum(schedule[:i]) for i in range(levels)]


def level_of(iteration: int, iterations: int, levels: int, schedule: Sequence[int] | None = None) -> int:
    """The pyramid level trained at ``iteration`` (1-based), coarsest first."""
    starts = stage_starts(iterations, levels, schedule)
    stage = max(i for i, s in enumerate(starts) if iteration >= s or i == 0)
    return levels - stage


def barrier(t0: float, level: int, levels: int) -> float:
    """ψ_t's ``t`` on ``level``: ``t0`` on the coarsest, halved on each finer level."""
    return t0 / 2 ** (levels - level)


# --------------------------------------------------------------------------- data
@dataclass
class RealPair:
    """A real pair on its lattice (moving affinely pre-aligned) with keypoint pairs (voxel indices)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_mask: torch.Tensor
    fixed_points: torch.Tensor
    moving_points: torch.Tensor
    spacing: torch.Tensor


def prepare_real_pair(fixed_path, moving_path, grid, n_points: int = 500) -> RealPair:
    """Register a real pair with the shipped default model and full refinement, then express it on a
    ``grid`` lattice: fixed and pre-aligned moving image, both lung masks, detected fixed keypoints
    and their partners through the registration."""
    import SimpleITK as sitk
    from DeepLungRegLib.io import read_volume
    from DeepLungRegLib.modelfile import default_model_path, load_model
    from DeepLungRegLib.pipeline import register_images
    from DeepLungRegLib.preprocessing import (
        lung_mask,
        network_grid,
        normalise_hu,
        resample_mask_to_grid,
        resample_to_grid,
    )
    from DeepLungRegLib.simulation import detect_keypoints

    fixed, moving = read_volume(fixed_path), read_volume(moving_path)
    net, meta = load_model(default_model_path())
    res = register_images(fixed, moving, net, meta, refine="full", warp_moving=False)
    lm_f, lm_m = lung_mask(fixed), lung_mask(moving)
    moving_mask_in_fixed = sitk.Resample(lm_m.mask, lm_f.mask, res.affine, sitk.sitkNearestNeighbor, 0)
    lattice = network_grid(fixed, [lm_f.mask, moving_mask_in_fixed], grid)
    kp_f = detect_keypoints(fixed, lm_f.mask, n_points)
    if len(kp_f) == 0:
        raise InputError(f"{fixed_path}: no keypoints found in the lung")
    # moving partner in the pre-aligned moving frame: A^-1(T(p)), T the full fixed -> moving transform
    a_inv = res.affine.GetInverse()
    kp_m = np.asarray([a_inv.TransformPoint(res.transform.TransformPoint(tuple(map(float, p)))) for p in kp_f])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
    return RealPair(
        fixed=t(normalise_hu(resample_to_grid(fixed, lattice), NORMALISATION)),
        moving=t(normalise_hu(resample_to_grid(moving, lattice, res.affine), NORMALISATION)),
        fixed_mask=t(resample_mask_to_grid(lm_f.mask, lattice)),
        moving_mask=t(resample_mask_to_grid(lm_m.mask, lattice, res.affine)),
        fixed_points=torch.from_numpy(lattice.lps_to_index(kp_f)).float(),
        moving_points=torch.from_numpy(lattice.lps_to_index(kp_m)).float(),
        spacing=torch.tensor(lattice.spacing, dtype=torch.float32))


class Hering2021Dataset(Dataset):
    """Item ``n`` (from ``(seed, n)`` alone): fixed, moving (1, D, H, W), fixed and moving lung masks,
    fixed and moving keypoints (K, 3) voxel indices, lattice spacing (3,) mm."""

    def __init__(self, scans: Sequence[PreparedScan], opts: dict, seed: int,
                 real: Sequence[RealPair] = (), pool: int = 0) -> None:
        self.scans = [(torch.from_numpy(s.image)[None, None], torch.from_numpy(s.mask.astype(np.float32))[None, None],
                       s.grid) for s in scans]
        self.real = list(real)
        self.opts, self.seed, self.pool = opts, seed, pool
        self.ranges = BreathingRanges()
        self.sources = list(opts["sources"].items())

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        r = float(torch.rand((), generator=g))
        acc, source = 0.0, self.sources[-1][0]
        for name, w in self.sources:
            acc += w
            if r < acc:
                source = name
                break
        k = self.opts["keypoints"]
        if source == "pairs" and self.real:
            return _real_item(self.real[int(torch.randint(len(self.real), (1,), generator=g))], k, g)
        image, mask, lattice = self.scans[int(torch.randint(len(self.scans), (1,), generator=g))]
        spacing = torch.tensor(lattice.spacing, dtype=torch.float32)
        if source == "breathing":
            b = make_breathing_pair(image, mask, lattice, self.ranges, g, n_points=k)
            return (b.fixed[0], b.moving[0], b.fixed_mask[0], b.moving_mask[0], b.fixed_points, b.moving_points,
                    spacing)
        s = make_pair(image, mask, PRESETS[self.opts["bspline_preset"]], g)
        fixed_mask = warp(s.mask, s.target)
        pts = sample_points(fixed_mask, k, g)
        return (s.fixed[0], s.moving[0], fixed_mask[0], s.mask[0], pts, pts + sample_field(s.target, pts), spacing)


def _paired(a: torch.Tensor, b: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random rows of the paired arrays (with repetition: every item of a batch has ``n``)."""
    pick = torch.randint(len(a), (n,), generator=g)
    return a[pick], b[pick]


def _real_item(p: RealPair, k: int, g: torch.Generator):
    fp, mp = _paired(p.fixed_points, p.moving_points, k, g)
    return p.fixed[0], p.moving[0], p.fixed_mask[0], p.moving_mask[0], fp, mp, p.spacing


# --------------------------------------------------------------------------- loss
def _core(net: torch.nn.Module) -> Hering2021Net:
    return net.module if hasattr(net, "module") else net


def level_terms(net: Hering2021Net, batch: Sequence[torch.Tensor], level: int, opts: dict) -> dict[str, torch.Tensor]:
    """The loss terms (each a batch mean) of ``level`` for the composed field; coarser levels frozen."""
    fixed, moving, fmask, mmask, kp_f, kp_m, spacing = batch
    levels = net.config.levels
    u_prev = None
    if level < levels:
        with torch.no_grad():
            u_prev = net(fixed, moving, finest=level + 1)
    u_l = net.level_field(level, fixed, moving, u_prev)                 # (B, 3, level grid), level voxels
    lshape = tuple(u_l.shape[2:])
    u_tot = u_l if u_prev is None else compose(resize_field(u_prev, lshape), u_l)
    f_l, m_l = downsample(fixed, level), downsample(moving, level)
    fm_l, mm_l = downsample(fmask, level), downsample(mmask, level)
    warped = warp(m_l, u_tot)
    warped_mask = warp(mm_l, u_tot)
    ratio = torch.tensor([(s_l - 1) / max(s - 1, 1) for s_l, s in zip(lshape[::-1], fixed.shape[2:][::-1], strict=True)])
    t = barrier(opts["t"], level, levels)
    terms: dict[str, list[torch.Tensor]] = {k: [] for k in ("ngf", "curvature", "volume", "mask", "keypoints")}
    for b in range(fixed.shape[0]):
        sp = level_spacing(spacing[b].cpu(), tuple(fixed.shape), level)
        sp_list = [float(v) for v in sp]
        scale = sp.to(u_l.device, u_l.dtype).view(1, 3, 1, 1, 1)
        lung = fm_l[b : b + 1] > 0.5
        terms["ngf"].append(ngf(HU_SCALE * f_l[b : b + 1], HU_SCALE * warped[b : b + 1], opts["eps"], sp_list, lung))
        terms["curvature"].append(curvature(u_l[b : b + 1] * scale, sp_list))
        det = jacobian_determinant(u_tot[b : b + 1] * scale, sp_list)
        terms["volume"].append(volume_change_penalty(det, t))
        # eq. 7 integrated over the lattice and, like D, divided by the fixed lung volume
        terms["mask"].append(0.5 * ((warped_mask[b : b + 1] - fm_l[b : b + 1]) ** 2).sum() / lung.sum().clamp(min=1))
        pts_f = kp_f[b] * ratio.to(kp_f.device)
        mapped = (pts_f + sample_field(u_tot[b : b + 1], pts_f)) * scale.view(1, 3)
        terms["keypoints"].append(keypoint_loss(mapped, kp_m[b] * ratio.to(kp_m.device) * scale.view(1, 3)))
    return {k: torch.stack(v).mean() for k, v in terms.items()}


def total_loss(terms: dict[str, torch.Tensor], level: int, opts: dict) -> torch.Tensor:
    """Eq. 8 with the recipe's weights (keypoints off on the coarsest level)."""
    delta = 0.0 if level == opts["levels"] else opts["delta"]
    return (terms["ngf"] + opts["alpha"] * terms["curvature"] + opts["beta"] * terms["mask"]
            + opts["gamma"] * terms["volume"] + delta * terms["keypoints"])


# --------------------------------------------------------------------------- validation
@dataclass
class BreathingValidation(Validator):
    """Breathing pairs of the held-out scan with known dense motion; amplitudes spread over 8-32 mm."""

    pairs: list
    spacing: torch.Tensor
    direction: tuple

    @classmethod
    def build(cls, scan: PreparedScan, n_pairs: int, seed: int) -> BreathingValidation:
        image = torch.from_numpy(scan.image)[None, None]
        mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
        g = pair_generator(seed + 7919, 0)
        amps = np.linspace(8.0, 32.0, n_pairs) if n_pairs > 1 else [20.0]
        pairs = [make_breathing_pair(image, mask, scan.grid, BreathingRanges(), g, n_points=300, amplitude=float(a),
                                     swap=bool(i % 2)) for i, a in enumerate(amps)]
        return cls(pairs, torch.tensor(scan.grid.spacing, dtype=torch.float32), scan.grid.direction)

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict:
        lung, pts = [], []
        core = _core(net) if net is not None else None
        was_training = core.training if core is not None else False
        if core is not None:
            core.eval()
        scale = self.spacing.view(1, 3, 1, 1, 1)
        for p in self.pairs:
            if core is None:
                pred = torch.zeros_like(p.target)
            else:
                pred = core(p.fixed.to(device), p.moving.to(device)).cpu()
            epe = ((pred - p.target) * scale).norm(dim=1)[0]
            m = p.fixed_mask[0, 0] > 0.5
            lung.append(float(epe[m].mean()) if m.any() else float(epe.mean()))
            mapped = p.fixed_points + sample_field(pred, p.fixed_points)
            pts.append(float(((mapped - p.moving_points) * self.spacing).norm(dim=1).mean()))
        if core is not None and was_training:
            core.train()
        return {"epe_lung_mm": float(np.mean(lung)), "epe_points_mm": float(np.mean(pts))}


# --------------------------------------------------------------------------- recipe
class Hering2021Recipe(Recipe):
    method = NAME
    paper = PAPER
    defaults: ClassVar[dict] = {"preset": "breathing", "grid": list(GRID), "optimizer": "adam", "lr": 1e-3,
                                "loss": "l2", "snapshot_every": 50, "width": 16, "depth": 3, "norm": "instance"}

    def validate_config(self, cfg) -> None:
        opts = parse_options(cfg.options)
        if opts["level_iterations"] is not None and sum(opts["level_iterations"]) != cfg.iterations:
            raise InputError(f"{NAME}: --option level_iterations sums to {sum(opts['level_iterations'])}, "
                             f"not --iterations {cfg.iterations}")
        divisor = Hering2021Config(levels=opts["levels"], width=cfg.width, depth=cfg.depth).divisor
        if any(g % divisor for g in cfg.grid_size()):
            raise InputError(f"{NAME}: grid {cfg.grid} must be a multiple of {divisor} for {opts['levels']} levels "
                             f"and U-Net depth {cfg.depth}")
        if cfg.norm == "batch":
            raise InputError(f"{NAME}: use --norm instance or none (the paper's instance normalisation)")

    def _opts(self, cfg) -> dict:
        return parse_options(cfg.options)

    def build_network(self, cfg) -> Hering2021Net:
        opts = self._opts(cfg)
        return Hering2021Net(Hering2021Config(levels=opts["levels"], width=cfg.width, depth=cfg.depth, norm=cfg.norm))

    def prepare(self, image, cfg) -> PreparedScan:
        return prepare_scan(image, cfg.grid_size())

    def dataset(self, scans, cfg) -> Hering2021Dataset:
        opts = self._opts(cfg)
        real = []
        if opts["pairs"]:
            from DeepLungRegLib.evaluation import read_manifest

            for case in read_manifest(opts["pairs"], landmarks_required=False):
                try:
                    real.append(prepare_real_pair(case.fixed, case.moving, cfg.grid_size(), opts["keypoints"]))
                except InputError as exc:
                    raise InputError(f"{opts['pairs']}: pair {case.name}: {exc}") from None
        return Hering2021Dataset(scans, opts, cfg.seed, real, cfg.pair_pool)

    def before_step(self, net, iteration: int, cfg) -> dict:
        core = _core(net)
        levels = core.config.levels
        schedule = self._opts(cfg)["level_iterations"]
        level = level_of(iteration, cfg.iterations, levels, schedule)
        stage = levels - level
        if stage > 0 and iteration == stage_starts(cfg.iterations, levels, schedule)[stage] \
                and int(core.levels_trained) == stage:
            with torch.no_grad():  # a new level starts from the weights of the level above it
                core.nets[level - 1].load_state_dict(core.nets[level].state_dict())
        core.levels_trained.fill_(stage + 1)
        for i, sub in enumerate(core.nets):
            sub.requires_grad_(i == level - 1)
        return {"level": level}

    def loss(self, net, batch, cfg) -> torch.Tensor:
        core = _core(net)
        opts = self._opts(cfg)
        level = core.finest_level
        return total_loss(level_terms(core, batch, level, opts), level, opts)

    def validator(self, scan, cfg) -> BreathingValidation:
        return BreathingValidation.build(scan, cfg.validation_pairs, cfg.seed)

    def metadata(self, cfg) -> dict:
        opts = self._opts(cfg)
        return {"method": NAME, "paper": PAPER, "grid_size": list(cfg.grid_size()), "normalisation": NORMALISATION,
                "loss": {k: opts[k] for k in ("alpha", "beta", "gamma", "delta", "eps", "t")},
                "sources": opts["sources"], "breathing_ranges": BreathingRanges().to_dict(),
                "bspline_preset": PRESETS[opts["bspline_preset"]].to_dict()}


RECIPE = Hering2021Recipe()
