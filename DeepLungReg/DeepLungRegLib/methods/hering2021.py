"""Multilevel CNN registration with anatomical constraints.

Hering, Häger, Moltz, Lessmann, Heldmann, van Ginneken, "CNN-based lung CT registration with
multiple anatomical constraints", Medical Image Analysis 72:102139, 2021.

A Gaussian pyramid of ``L`` levels (level 1 = the network lattice, level ``ℓ`` downsampled by
``2^(ℓ-1)``) and one U-Net per level (three resolution levels, 16 feature maps doubled per
level, two 3×3×3 convolutions each followed by instance normalisation and ReLU, transposed
convolutions up, a final convolution to 3 channels). Registration runs coarse to fine: the
fields of the coarser levels are composed functionally, the moving image is warped by the
composed field at the finest resolution and then downsampled to the current level, and that
level's network predicts the next increment ``u_ℓ``; the total is ``T = T_prev ∘ T_ℓ``.

Units and frames: inputs are ``(B, 1, D, H, W)`` on the lattice (HU window mapped to [0, 1],
see :mod:`..preprocessing`); every field is a displacement in voxels of the level-1 lattice
(channels ``i, j, k``), fixed -> affinely pre-aligned moving, like every method's output.
The level grids put their first and last voxel centres on those of the lattice
(``align_corners``), so ``resize_field`` converts between them exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fields import compose, resize_field, warp
from ..networks import UNet3D, UNetConfig
from ..refine import gaussian_blur
from .base import Method, PredictedField, PreparedPair

NAME = "hering2021"
PAPER = "Hering et al., Medical Image Analysis 72, 2021"
LEVELS = 3
#: The paper's network input (i, j, k) after lung cropping.
PAPER_GRID = (192, 160, 192)
#: What the CPU-trained shipped model uses: half the paper's size along each axis.
GRID = (96, 80, 96)


@dataclass(frozen=True)
class Hering2021Config:
    """Architecture stored in the model metadata (``network``)."""

    levels: int = LEVELS
    width: int = 16
    depth: int = 3                 # U-Net resolution levels (depth - 1 poolings)
    norm: str = "instance"
    negative_slope: float = 0.0    # plain ReLU

    def to_dict(self) -> dict:
        return {"architecture": "multilevel_unet", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Hering2021Config:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def unet(self) -> UNetConfig:
        return UNetConfig(in_channels=2, out_channels=3, width=self.width, depth=self.depth, norm=self.norm,
                          negative_slope=self.negative_slope)

    @property
    def divisor(self) -> int:
        """Every lattice size must be a multiple of this: ``2^(levels-1)`` for the pyramid times the U-Net's."""
        return 2 ** (self.levels - 1) * self.unet().divisor


def level_shape(shape: tuple[int, ...], level: int) -> tuple[int, int, int]:
    """Grid ``(D, H, W)`` of pyramid ``level`` (1 = the lattice itself) for a lattice ``shape``."""
    f = 2 ** (level - 1)
    return tuple(int(s) // f for s in shape[-3:])


def downsample(x: torch.Tensor, level: int) -> torch.Tensor:
    """Gaussian-pyramid level of ``x`` (B, C, D, H, W): blur with σ = 2^(ℓ-1)/2 voxels of the lattice,
    then trilinear resampling onto :func:`level_shape` (same box). Level 1 returns ``x``."""
    if level == 1:
        return x
    sigma = 0.5 * 2 ** (level - 1)
    blurred = gaussian_blur(x, (sigma, sigma, sigma))
    return F.interpolate(blurred, size=level_shape(x.shape, level), mode="trilinear", align_corners=True)


def level_spacing(spacing: torch.Tensor, shape: tuple[int, ...], level: int) -> torch.Tensor:
    """Spacing (..., 3) in mm, ``(s_i, s_j, s_k)``, of pyramid ``level`` for a lattice of ``spacing`` and ``shape``."""
    d, h, w = shape[-3:]
    ld, lh, lw = level_shape(shape, level)
    ratio = torch.tensor([(w - 1) / max(lw - 1, 1), (h - 1) / max(lh - 1, 1), (d - 1) / max(ld - 1, 1)],
                         dtype=spacing.dtype, device=spacing.device)
    return spacing * ratio


class Hering2021Net(nn.Module):
    """``levels`` U-Nets, ``nets[ℓ-1]`` for pyramid level ``ℓ``; :attr:`levels_trained` counts the
    levels (from the coarsest) that inference uses — all of them in a finished model."""

    #: dtype of the level networks' convolutions (None: float32); set by ``predict(..., bf16=True)``
    compute_dtype: torch.dtype | None = None

    def __init__(self, config: Hering2021Config | None = None) -> None:
        super().__init__()
        self.config = config = config or Hering2021Config()
        if config.levels < 1:
            raise ValueError("a pyramid needs at least one level")
        self.nets = nn.ModuleList(UNet3D(config.unet()) for _ in range(config.levels))
        for net in self.nets:  # the paper initialises with Xavier uniform
            for m in net.modules():
                if isinstance(m, nn.Conv3d | nn.ConvTranspose3d) and m is not net.head:
                    nn.init.xavier_uniform_(m.weight)
        self.register_buffer("levels_trained", torch.tensor(config.levels, dtype=torch.int64))

    @property
    def finest_level(self) -> int:
        """The finest level inference runs (1 in a finished model)."""
        return self.config.levels - int(self.levels_trained) + 1

    def check_shape(self, shape: tuple[int, ...]) -> None:
        d = self.config.divisor
        if any(int(s) % d for s in shape[-3:]):
            raise ValueError(f"lattice {tuple(shape[-3:])} must be a multiple of {d} "
                             f"({self.config.levels} pyramid levels, U-Net depth {self.config.depth})")

    def level_field(self, level: int, fixed: torch.Tensor, moving: torch.Tensor,
                    u_prev: torch.Tensor | None) -> torch.Tensor:
        """Increment ``u_ℓ`` (B, 3, level grid) in voxels of the *level* grid: the moving image warped
        by ``u_prev`` (lattice voxels; None = identity) at full resolution, both images downsampled."""
        warped = moving if u_prev is None else warp(moving, u_prev)
        x = torch.cat((downsample(fixed, level), downsample(warped, level)), dim=1)
        dtype = self.compute_dtype
        if dtype is not None:  # reduced precision for the convolutions only: warping, resizing and
            # composing the fields stay in float32 (bf16 there moved points by > 1 mm after composition)
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return self.nets[level - 1](x).float()
        return self.nets[level - 1](x)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, finest: int | None = None) -> torch.Tensor:
        """Composed field (B, 3, D, H, W), lattice voxels, from the coarsest level down to ``finest``
        (default :attr:`finest_level`)."""
        self.check_shape(fixed.shape)
        finest = self.finest_level if finest is None else finest
        u = None
        for level in range(self.config.levels, finest - 1, -1):
            inc = resize_field(self.level_field(level, fixed, moving, u), fixed.shape[2:])
            u = inc if u is None else compose(u, inc)
        return u


class Hering2021(Method):
    name = NAME
    recipe = "DeepLungRegTrainingLib.recipes.hering2021"

    def build_network(self, meta: dict) -> Hering2021Net:
        cfg = Hering2021Config.from_dict(meta["network"])
        net = Hering2021Net(cfg)
        grid = self.grid_size(meta)
        net.check_shape(grid[::-1])
        return net

    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        g = meta["grid_size"]
        return (int(g),) * 3 if isinstance(g, int | float) else tuple(int(v) for v in g)

    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        fixed = torch.from_numpy(np.ascontiguousarray(pair.fixed))[None, None].to(device)
        moving = torch.from_numpy(np.ascontiguousarray(pair.moving))[None, None].to(device)
        net.compute_dtype = torch.bfloat16 if bf16 else None
        try:
            with torch.inference_mode():
                u = net(fixed, moving)
        finally:
            net.compute_dtype = None
        return PredictedField(u.float().cpu(), pair.lattice)


METHOD = Hering2021()
