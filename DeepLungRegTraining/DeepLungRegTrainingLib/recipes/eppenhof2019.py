"""Training recipe of ``eppenhof2019``: a U-Net grown level by level on synthetic B-spline pairs.

Eppenhof, Lafarge, Veta, Pluim, "Progressively trained convolutional neural networks for
deformable image registration", IEEE Transactions on Medical Imaging, 2019 (sections II-B to II-F).

* Pairs: a lung-cropped scan deformed by the paper's Table I transforms (preset ``eppenhof2019``
  of :mod:`..synthesis`: augmentation ``T_1`` on a 2³ grid of ±6.4 voxels along every axis, learned
  ``T_2 = T_{2,1} ∘ T_{2,2}`` on 4³ (±3.2, ±6.4, ±12.8 voxels along x, y, z) and 8³ (±3.2) grids;
  voxels of a 128³ lattice, scaled by G/128; grid point displacements interpolated by cubic
  B-splines; images interpolated linearly, no intensity augmentation). ``--option sources`` can mix
  in the breathing and still pairs of ``eppenhof2018`` (not in the paper).
* Input: Gaussian gradient magnitude (σ = 0.5 voxels) of both images, computed by the network
  itself (:func:`DeepLungRegLib.methods.eppenhof2019.gradient_magnitude`).
* Loss: squared end-point error of the displacement (voxels²) averaged over the lung mask warped
  by ``T_1`` (the paper masks the scanner bore instead; our scans are cropped to the lungs).
* Optimiser: SGD, learning rate 10⁻², momentum 0.5 (constant).
* Growing schedule (eq. 2), a pure function of the iteration (:func:`alphas`): level ``i``
  (1 = coarsest, 8³) starts at ``τ_i = -Δ/2 + (Δ - δ)(i - 1)``, ramps up linearly over ``δ``
  iterations, keeps weight 1 until ``τ_i + Δ - δ`` and ramps down to 0 at ``τ_i + Δ`` while the next
  level ramps up; the finest level keeps weight 1 once reached. At most two weights are non-zero and
  they sum to one. The paper: ``δ = 2000``, ``Δ = 6000`` (``--option delta=…``, ``--option Delta=…``).
  ``--option progressive=0`` trains the same network all at once (the paper's baseline: same
  initial weights, same pairs, same iterations).

The run is refused when the network would not be fully grown before the snapshots that make the
final weights are taken (:func:`grown_iteration`), so every saved model is the fully grown
network, which is what inference runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.methods.eppenhof2019 import NAME, PAPER, Eppenhof2019Config, Eppenhof2019Net, grown
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan

from ..breathing import BreathingRanges
from ..distributed import context_from_env
from ..synthesis import PRESETS
from .base import normalised_weights, source_weights, typed_options
from .eppenhof2018 import Eppenhof2018Recipe

SYNTHESIS_PRESET = "eppenhof2019"
GRID = 128                    # the paper's lattice: 5 levels, 128³ … 8³
DEPTH = 5
DELTA_TRANSITION = 2000       # δ: iterations of a transition between two levels
DELTA_PERIOD = 6000           # Δ: iterations during which a level has a non-zero weight
SOURCES = ("bspline", "breathing", "still")
#: ``--option`` settings: name -> (default, parser)
OPTIONS: dict[str, tuple[Any, Any]] = {
    "progressive": (1, int),             # 0: the baseline, the full network trained from the start
    "delta": (DELTA_TRANSITION, int),    # δ, iterations
    "Delta": (DELTA_PERIOD, int),        # Δ, iterations
    "sources": ("bspline", str),         # pair sources name:weight,... (bspline, breathing, still)
}


def parse_options(raw: dict) -> dict[str, Any]:
    """The recipe's settings: defaults overridden by ``--option`` values (one-line errors)."""
    out = typed_options(NAME, raw, OPTIONS)
    if out["progressive"] not in (0, 1):
        raise InputError(f"{NAME}: --option progressive must be 0 or 1, got {out['progressive']}")
    if out["delta"] < 0 or out["Delta"] < 1 or out["Delta"] < 2 * out["delta"]:
        raise InputError(f"{NAME}: the schedule needs delta >= 0, Delta >= 1 and Delta >= 2*delta "
                         f"(got delta={out['delta']}, Delta={out['Delta']})")
    out["sources"] = normalised_weights(NAME, source_weights(NAME, out["sources"], SOURCES))
    return out


# --------------------------------------------------------------------------- schedule
def level_start(level: int, delta: float, Delta: float) -> float:  # noqa: N803 - the paper's Δ
    """``τ`` of ``level`` (1 = coarsest), in iterations: ``-Δ/2 + (Δ - δ)(level - 1)``."""
    return -Delta / 2 + (Delta - delta) * (level - 1)


def alphas(t: float, levels: int, delta: float, Delta: float) -> tuple[float, ...]:  # noqa: N803
    """The paper's trapezoidal weights ``(α_1, …, α_levels)``, coarsest first, after ``t`` training
    steps (``t = iteration - 1``; ``t = 0`` before the first update).

    ``α_i`` is 0 before ``τ_i``, rises linearly to 1 over ``δ`` iterations, stays 1 until
    ``τ_i + Δ - δ`` and falls linearly to 0 at ``τ_i + Δ``; the finest level stays 1 from
    ``τ_levels + δ`` on. Needs ``Δ ≥ 2δ``; then one or two weights are non-zero and they sum to 1
    (the falling weight is computed as one minus the rising one). ``δ = 0`` gives the square
    schedule (a level's period is half-open, ``[τ_i, τ_i + Δ)``).
    """
    out = [0.0] * levels
    rising = [False] * levels
    for i in range(1, levels + 1):
        tau = level_start(i, delta, Delta)
        last = i == levels
        if t < tau or (not last and t >= tau + Delta):
            continue
        if delta > 0 and t < tau + delta:
            out[i - 1], rising[i - 1] = (t - tau) / delta, True
        elif last or t <= tau + Delta - delta:
            out[i - 1] = 1.0
        else:
            out[i - 1] = (tau + Delta - t) / delta
    for i in range(levels - 1):           # a transition: the falling weight is one minus the rising one
        if rising[i + 1] and 0 < out[i] < 1:
            out[i] = 1.0 - out[i + 1]
    if levels and sum(out) == 0:          # before τ_1 (cannot happen for Δ ≥ 2δ and t ≥ 0)
        out[0] = 1.0
    return tuple(out)


def grown_iteration(levels: int, delta: float, Delta: float) -> int:  # noqa: N803
    """The first training iteration (1-based) at which the network is fully grown (``α_levels = 1``)."""
    return max(1, math.ceil(level_start(levels, delta, Delta) + delta) + 1)


def _core(net: torch.nn.Module) -> Eppenhof2019Net:
    return net.module if hasattr(net, "module") else net


# --------------------------------------------------------------------------- recipe
class Eppenhof2019Recipe(Eppenhof2018Recipe):
    """The ``eppenhof2018`` recipe (its pair dataset, masked L2 loss and validation: held-out synthetic
    pairs of the preset, the breathing pairs and the identical-image check, evaluated with the
    network's current weights ``α`` — mid-growth during training, grown for the final model) with
    the growing network, its schedule and this paper's options, generator and optimiser."""

    method = NAME
    paper = PAPER
    defaults: ClassVar[dict] = {"preset": SYNTHESIS_PRESET, "grid": GRID, "depth": DEPTH, "width": 16,
                                "norm": "batch", "optimizer": "sgd", "lr": 1e-2, "momentum": 0.5, "loss": "l2",
                                "snapshot_every": 50, "iterations": 20000}

    def options(self, cfg) -> dict[str, Any]:
        return parse_options(cfg.options)

    def schedule(self, iteration: int, cfg) -> tuple[float, ...]:
        """``α`` of training step ``iteration`` (1-based) for ``cfg``; the baseline's is always grown."""
        opts = parse_options(cfg.options)
        if not opts["progressive"]:
            return grown(cfg.depth)
        return alphas(iteration - 1, cfg.depth, opts["delta"], opts["Delta"])

    def validate_config(self, cfg) -> None:
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
        divisor = Eppenhof2019Config(width=cfg.width, depth=cfg.depth).divisor
        if any(g % divisor for g in cfg.grid_size()):
            raise InputError(f"{NAME}: grid {cfg.grid} must be a multiple of {divisor} for depth {cfg.depth}")
        opts = parse_options(cfg.options)
        if context_from_env().active:
            # the levels outside the schedule's window (and the side layers once grown) get no gradient,
            # which DistributedDataParallel refuses unless built with find_unused_parameters=True
            raise InputError(f"{NAME}: data-parallel training (--nproc > 1) is not supported: the growing "
                             "network leaves parameters unused in a step")
        if opts["progressive"]:
            first = grown_iteration(cfg.depth, opts["delta"], opts["Delta"])
            if cfg.average_start() + 1 < first:
                raise InputError(
                    f"{NAME}: the network is fully grown from iteration {first} on ({cfg.depth} levels, "
                    f"delta={opts['delta']}, Delta={opts['Delta']}), but the final weights would average "
                    f"snapshots from iteration {cfg.average_start() + 1} of {cfg.iterations}: use more "
                    "--iterations, a smaller --average-last, or smaller --option delta/Delta")

    def build_network(self, cfg) -> Eppenhof2019Net:
        return Eppenhof2019Net(Eppenhof2019Config(width=cfg.width, depth=cfg.depth, norm=cfg.norm))

    def before_step(self, net, iteration: int, cfg) -> dict[str, Any]:
        """Set the blending weights of step ``iteration`` on the network; log them as ``alpha_<level>``."""
        alpha = self.schedule(iteration, cfg)
        _core(net).set_alpha(alpha)
        return {f"alpha_{level}": round(a, 6) for level, a in enumerate(alpha, start=1)}

    def prepare(self, image, cfg) -> PreparedScan:
        return prepare_scan(image, cfg.grid_size())

    def metadata(self, cfg) -> dict[str, Any]:
        opts = self.options(cfg)
        schedule = {"progressive": bool(opts["progressive"]), "delta": opts["delta"], "Delta": opts["Delta"],
                    "levels": cfg.depth}
        if opts["progressive"]:
            schedule["grown_at_iteration"] = grown_iteration(cfg.depth, opts["delta"], opts["Delta"])
        meta = {"method": NAME, "paper": PAPER, "grid_size": cfg.grid, "normalisation": NORMALISATION,
                "synthesis_preset": PRESETS[cfg.preset].to_dict(), "sources": opts["sources"],
                "schedule": schedule}
        if "breathing" in opts["sources"]:
            meta["breathing_ranges"] = BreathingRanges().to_dict()
        return meta


RECIPE = Eppenhof2019Recipe()
