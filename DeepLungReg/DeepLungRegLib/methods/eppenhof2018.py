"""Supervised 3D U-Net trained on synthetic B-spline deformations.

Eppenhof & Pluim, "Pulmonary CT registration through supervised learning with convolutional
neural networks", IEEE Transactions on Medical Imaging 38(5):1097-1105, 2018.

The network sees the fixed and the affinely pre-aligned moving image (two channels, HU window
mapped to [0, 1]) on a ``G³`` lattice spanning the lungs and predicts a displacement in voxels of
that lattice, channels ``(i, j, k)``, fixed -> moving.
"""

from __future__ import annotations

import torch

from ..networks import UNet3D, UNetConfig
from .base import Method, PredictedField, PreparedPair, predict_concatenated


class Eppenhof2018(Method):
    name = "eppenhof2018"
    recipe = "DeepLungRegTrainingLib.recipes.eppenhof2018"

    def build_network(self, meta: dict) -> UNet3D:
        return UNet3D(UNetConfig.from_dict(meta["network"]))

    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        g = meta["grid_size"]
        return (int(g),) * 3 if isinstance(g, int | float) else tuple(int(v) for v in g)

    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        return predict_concatenated(net, pair, device, bf16)


METHOD = Eppenhof2018()
