"""What a training recipe provides to the generic loop (:func:`DeepLungRegTrainingLib.training.train`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.preprocessing import PreparedScan
from torch.utils.data import Dataset


def pair_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of pair ``index`` of a run seeded ``seed`` (every recipe's data stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def typed_options(method: str, raw: dict, options: dict[str, tuple[Any, type]]) -> dict[str, Any]:
    """``--option`` values of ``method``: ``options`` maps each key to ``(default, type)`` (a ``None``
    default stays ``None`` when the option is not given: the recipe derives it). Unknown keys and values
    the type rejects (``int``: whole numbers only) are one-line InputErrors."""
    unknown = sorted(set(raw) - set(options))
    if unknown:
        raise InputError(f"{method}: unknown --option {', '.join(unknown)}; known: {', '.join(options)}")
    out: dict[str, Any] = {}
    for key, (default, kind) in options.items():
        value = raw.get(key, default)
        if value is None:
            out[key] = None
            continue
        try:
            out[key] = _whole(value) if kind is int else kind(value)
            if kind is float and not math.isfinite(out[key]):
                raise ValueError(value)
        except (TypeError, ValueError):
            what = {int: "a whole number", float: "a finite number"}.get(kind, f"a valid {kind.__name__}")
            raise InputError(f"{method}: --option {key}={value!r} is not {what}") from None
    return out


def _whole(value: Any) -> int:
    """A whole number from text ("3") or from Python (3, 3.0); not from True/False or 2.5."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value) if isinstance(value, int) else int(str(value))


def source_weights(method: str, text: str, allowed: Sequence[str]) -> dict[str, float]:
    """``name:weight,...`` (a missing weight is 1) -> the checked, not yet normalised, weights."""
    weights: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, w = item.partition(":")
        if name not in allowed:
            raise InputError(f"{method}: unknown pair source {name!r}; use {', '.join(allowed)}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise InputError(f"{method}: source weight {w!r} is not a number") from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise InputError(f"{method}: source weight of {name} must be >= 0")
    return weights


def normalised_weights(method: str, weights: dict[str, float]) -> dict[str, float]:
    """The positive weights scaled to sum to 1 (an :class:`InputError` when none is positive)."""
    total = sum(weights.values())
    if total <= 0:
        raise InputError(f"{method}: no pair source has a positive weight")
    return {k: v / total for k, v in weights.items() if v > 0}


class Validator(ABC):
    """Held-out pairs made once; ``evaluate`` gives mean end-point errors (mm)."""

    @abstractmethod
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict[str, float]:
        """``net=None`` evaluates the identity transform (the starting error)."""


class Recipe(ABC):
    """One method's training: its pairs, network, loss and defaults."""

    method: str = ""
    paper: str = ""
    #: :class:`~DeepLungRegTrainingLib.training.TrainConfig` values this method trains with unless told otherwise
    defaults: ClassVar[dict[str, Any]] = {}

    def before_step(self, net: torch.nn.Module, iteration: int, cfg) -> dict[str, Any]:
        """Called before training step ``iteration`` (1-based) — a function of the iteration only, so
        that resumed runs behave as uninterrupted ones (e.g. which level of a pyramid trains).
        Returns extra log columns."""
        return {}

    def learning_rate(self, iteration: int, cfg) -> float | None:
        """The learning rate of step ``iteration`` (1-based), or None to leave the optimiser's as it is."""
        return None

    @abstractmethod
    def validate_config(self, cfg) -> None:
        """Raise :class:`InputError` for settings this method cannot train with."""

    @abstractmethod
    def build_network(self, cfg) -> torch.nn.Module:
        """The untrained network for a :class:`~DeepLungRegTrainingLib.training.TrainConfig`."""

    @abstractmethod
    def prepare(self, image, cfg) -> PreparedScan:
        """One training scan on the method's grid."""

    @abstractmethod
    def dataset(self, scans: Sequence[PreparedScan], cfg) -> Dataset:
        """Infinite dataset whose item ``n`` depends on ``(cfg.seed, n)`` only (exact resume and DDP sharding)."""

    @abstractmethod
    def loss(self, net: torch.nn.Module, batch: Sequence[torch.Tensor], cfg) -> torch.Tensor:
        """Scalar loss of a batch; the mean of per-pair losses, so that data-parallel workers
        averaging their gradients give the single-process gradient of the same global batch."""

    @abstractmethod
    def validator(self, scan: PreparedScan, cfg) -> Validator:
        """Held-out pairs from ``scan``."""

    @abstractmethod
    def metadata(self, cfg) -> dict[str, Any]:
        """Model-file metadata describing the trained network (method, grid, normalisation, ...)."""
