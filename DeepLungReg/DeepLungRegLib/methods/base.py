"""What a registration method provides (the registry's interface).

A method turns a *prepared pair* — fixed and affinely pre-aligned moving image resampled
onto the network lattice and normalised as its model file says — into a displacement on a
lattice (fixed -> moving). Everything before (lung masks, affine) and after (refine,
transform file, warp, Jacobian) is shared by all methods (:mod:`DeepLungRegLib.pipeline`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Lattice


@dataclass
class PreparedPair:
    """The network's inputs for one pair.

    ``fixed``/``moving`` are ``(D, H, W)`` float32 arrays on ``lattice`` (the moving image
    already resampled through the affine pre-alignment), normalised with the model's
    normalisation.
    """

    fixed: np.ndarray
    moving: np.ndarray
    lattice: Lattice


@dataclass
class PredictedField:
    """A displacement ``(1, 3, D, H, W)`` in voxels of ``lattice`` (channels ``i, j, k``),
    mapping a fixed point ``p`` to the (affinely pre-aligned) moving point ``p + u(p)``;
    :meth:`mm` gives the same field in LPS mm."""

    u_vox: torch.Tensor
    lattice: Lattice

    def mm(self) -> torch.Tensor:
        """``(1, 3, D, H, W)`` LPS mm (components x, y, z)."""
        from ..fields import voxel_to_physical

        return voxel_to_physical(self.u_vox, self.lattice.spacing, self.lattice.direction)


class Method(ABC):
    """One registration method of our literature (subclass per paper, one module each)."""

    #: registry key, also stored as ``method`` in the model metadata
    name: str = ""
    #: where its training recipe lives (imported only by the trainer)
    recipe: str = ""

    @abstractmethod
    def build_network(self, meta: dict) -> torch.nn.Module:
        """The untrained network described by a model file's metadata."""

    @abstractmethod
    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        """Network lattice size (i, j, k) for a model."""

    @abstractmethod
    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        """Displacement for a prepared pair, on the CPU."""


def predict_concatenated(net: torch.nn.Module, pair: PreparedPair, device: torch.device,
                         bf16: bool = False) -> PredictedField:
    """Run a network that takes the pair as two channels ``(1, 2, D, H, W)`` (fixed, moving) and returns
    the displacement ``(1, 3, D, H, W)`` in voxels of ``pair.lattice``; bf16 autocast when asked."""
    import numpy as np

    x = torch.from_numpy(np.stack((pair.fixed, pair.moving))[None]).to(device)
    with torch.inference_mode():
        if bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                u = net(x)
        else:
            u = net(x)
    return PredictedField(u.float().cpu(), pair.lattice)
