"""3D U-Net for dense displacement regression (Eppenhof & Pluim, IEEE TMI 2018).

Input: 2 channels (fixed, moving) on the network grid. Output: 3 channels, the
displacement in voxels of that grid, channels ordered (i, j, k) as in
:mod:`DeepLungRegLib.fields`, with no final activation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters stored in the model file's metadata."""

    in_channels: int = 2
    out_channels: int = 3
    width: int = 16          # feature maps at the first level; doubled per level
    depth: int = 4           # number of resolution levels (depth - 1 poolings)
    norm: str = "batch"      # "batch", "instance" or "none"
    negative_slope: float = 0.1  # leaky ReLU

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def divisor(self) -> int:
        """The grid size must be a multiple of this number."""
        return 2 ** (self.depth - 1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}")


class ConvBlock(nn.Sequential):
    """Two 3×3×3 convolutions, each followed by normalisation and leaky ReLU."""

    def __init__(self, cin: int, cout: int, norm: str, slope: float) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.LeakyReLU(slope),
            nn.Conv3d(cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.LeakyReLU(slope),
        )


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections; max pooling down, transposed convolution up."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        widths = [config.width * 2**level for level in range(config.depth)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.down.append(ConvBlock(cin, w, config.norm, config.negative_slope))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose3d(cin, w, kernel_size=2, stride=2))
            self.dec.append(ConvBlock(2 * w, w, config.norm, config.negative_slope))
            cin = w
        self.head = nn.Conv3d(cin, config.out_channels, kernel_size=1)
        # Start near the identity transform: small output weights.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.divisor
        if any(s % d for s in x.shape[2:]):
            raise ValueError(f"grid {tuple(x.shape[2:])} must be a multiple of {d} for depth {self.config.depth}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec, strict=True):
            x = up(x)
            x = dec(torch.cat((x, skips.pop()), dim=1))
        return self.head(x)
