"""CNN regressing the displacements of a thin-plate-spline grid.

Eppenhof, Lafarge, Moeskops, Veta & Pluim, "Deformable image registration using convolutional
neural networks", Proc. SPIE Medical Imaging 2018: Image Processing, vol. 10574, 105740S.

Network (:class:`TPSNet`, the paper's "smaller VGG"): the fixed and the affinely pre-aligned moving
image as two channels on a ``G³`` lattice (the paper: 96³), then ``blocks`` times
[3×3×3 convolution, zero padding → batch normalisation → ReLU → 2×2×2 max pooling], so that a
96³ input leaves a 6³ map with 4 blocks; then ``hidden`` 1×1×1 convolutions (batch norm + ReLU)
and a last 1×1×1 convolution without activation giving three maps: the ``(i, j, k)`` components of
the displacements of the 6×6×6 TPS nodes, in voxels of the input lattice. Batch normalisation
keeps running (exponential moving average) statistics for inference, as the paper's.
Feature maps: ``width`` in the first block, doubled per block (VGG's progression); default 8
(8, 16, 32, 64). The paper's Fig. 1 (not in our text copy) gives the exact counts; the text fixes the
kernel sizes, the padding, a pooling after every 3×3×3 convolution, the activations and the 1×1×1
regression layer. The width matters for the paper's optimiser: with plain SGD at η0 = 0.1 on the
squared node error in voxels², the step of the unnormalised regression layer grows with the number
of its input features; in our checks on a real 96³ scan, width 32 (256 features) diverged within 3
steps and width 16 (128) jumped to a loss of ~360 before recovering, width 8 (64) trained smoothly.

Nodes per axis = lattice size / 2^blocks; they sit on the lattice as :mod:`DeepLungRegLib.tps` says
(first and last node on the first and last voxel centres). The dense field is the TPS of the node
displacements (:func:`DeepLungRegLib.tps.tps_field`: kernel + affine part, Eq. 1 of the paper),
the same function the training generator uses.

Output of :meth:`Eppenhof2018TPS.predict`: the dense displacement on the pipeline's lattice, in
voxels of that lattice, channels ``(i, j, k)``, fixed -> moving (like ``eppenhof2018``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..tps import DEFAULT_KERNEL, KERNELS, tps_field
from .base import Method, PredictedField, PreparedPair

NAME = "eppenhof2018tps"
PAPER = "Eppenhof et al., SPIE Medical Imaging 2018"
#: The paper's input lattice and TPS grid.
GRID = 96
BLOCKS = 4
NODE_PLACEMENT = "align_corners: first and last node on the first and last voxel centres of the lattice"


@dataclass(frozen=True)
class TPSNetConfig:
    """Architecture stored in the model metadata (``network``)."""

    in_channels: int = 2
    width: int = 8           # feature maps of the first 3×3×3 convolution, doubled per block
    blocks: int = BLOCKS     # 3×3×3 convolution + 2×2×2 max pooling blocks (nodes = lattice / 2^blocks)
    hidden: int = 1          # 1×1×1 convolutions (norm + ReLU) before the regression layer
    norm: str = "batch"      # "batch" (the paper's), "instance" or "none"

    def to_dict(self) -> dict:
        return {"kind": "tps_cnn", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TPSNetConfig:
        if d.get("kind", "tps_cnn") != "tps_cnn":
            raise ValueError(f"network kind {d.get('kind')!r} is not tps_cnn")
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        for key, lo, hi in (("in_channels", 1, 8), ("width", 1, 128), ("blocks", 1, 6), ("hidden", 0, 4)):
            v = getattr(cfg, key)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{key} {v!r} is not a whole number in [{lo}, {hi}]")
        if cfg.norm not in ("batch", "instance", "none"):
            raise ValueError(f"unknown normalisation {cfg.norm!r}")
        return cfg

    @property
    def divisor(self) -> int:
        """Every lattice size must be a multiple of this (and at least twice it: 2 nodes per axis)."""
        return 2**self.blocks

    def nodes(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """TPS nodes ``(nk, nj, ni)`` of a ``(D, H, W)`` lattice; a ValueError for unusable sizes."""
        d = self.divisor
        if any(int(s) % d or int(s) < 2 * d for s in shape[-3:]):
            raise ValueError(f"lattice {tuple(int(s) for s in shape[-3:])} must be a multiple of {d} and at least "
                             f"{2 * d} per axis ({self.blocks} pooling blocks, >= 2 TPS nodes per axis)")
        return tuple(int(s) // d for s in shape[-3:])


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)       # momentum 0.1: exponential moving averages of the statistics
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class TPSNet(nn.Module):
    """``forward(x)``: ``x`` ``(B, 2, D, H, W)`` (fixed, moving) -> ``(B, 3, D/2^b, H/2^b, W/2^b)``, the node
    displacements in voxels of the input lattice, channels ``(i, j, k)``."""

    def __init__(self, config: TPSNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TPSNetConfig()
        layers: list[nn.Module] = []
        cin = config.in_channels
        for b in range(config.blocks):
            cout = config.width * 2**b
            layers += [nn.Conv3d(cin, cout, 3, padding=1, bias=config.norm == "none"), _norm(config.norm, cout),
                       nn.ReLU(inplace=True), nn.MaxPool3d(2)]
            cin = cout
        for _ in range(config.hidden):
            layers += [nn.Conv3d(cin, cin, 1, bias=config.norm == "none"), _norm(config.norm, cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv3d(cin, 3, 1)
        nn.init.normal_(self.head.weight, std=1e-3)   # start near the identity transform
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.config.nodes(x.shape)
        return self.head(self.features(x))


def tps_kernel(meta: dict) -> str:
    """The TPS kernel a model was trained with (``meta['tps']['kernel']``; default ``r``)."""
    kernel = (meta.get("tps") or {}).get("kernel", DEFAULT_KERNEL)
    if kernel not in KERNELS:
        raise ValueError(f"unknown TPS kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return kernel


class Eppenhof2018TPS(Method):
    name = NAME
    recipe = "DeepLungRegTrainingLib.recipes.eppenhof2018tps"

    def build_network(self, meta: dict) -> TPSNet:
        cfg = TPSNetConfig.from_dict(meta["network"])
        cfg.nodes(self.grid_size(meta)[::-1])
        tps_kernel(meta)
        return TPSNet(cfg)

    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        g = meta["grid_size"]
        return (int(g),) * 3 if isinstance(g, int | float) else tuple(int(v) for v in g)

    def node_displacements(self, net: torch.nn.Module, pair: PreparedPair, device: torch.device,
                           bf16: bool = False) -> torch.Tensor:
        """The network's output ``(1, 3, nk, nj, ni)``: node displacements, voxels of ``pair.lattice``, (i, j, k)."""
        x = torch.from_numpy(np.stack((pair.fixed, pair.moving))[None]).to(device)
        with torch.inference_mode():
            if bf16:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    nodes = net(x)
            else:
                nodes = net(x)
        return nodes.float()

    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        nodes = self.node_displacements(net, pair, device, bf16)
        with torch.inference_mode():
            u = tps_field(nodes, pair.lattice.shape, tps_kernel(meta))
        return PredictedField(u.cpu(), pair.lattice)


METHOD = Eppenhof2018TPS()
