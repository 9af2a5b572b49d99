"""What a training recipe provides to the generic loop (:func:`DeepLungRegTrainingLib.training.train`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from DeepLungRegLib.preprocessing import PreparedScan
from torch.utils.data import Dataset


def pair_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of pair ``index`` of a run seeded ``seed`` (every recipe's data stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


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
