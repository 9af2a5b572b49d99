"""Progressively grown U-Net regressing the displacement from Gaussian gradient magnitude images.

Eppenhof, Lafarge, Veta, Pluim, "Progressively trained convolutional neural networks for
deformable image registration", IEEE Transactions on Medical Imaging, published online
15 November 2019, doi:10.1109/TMI.2019.2953788.

Network input: the Gaussian gradient magnitude (Gaussian derivatives, σ = 0.5 voxels; see
:func:`gradient_magnitude`) of the fixed and of the affinely pre-aligned moving image — the
intensities themselves are not given to the network, as in the paper. The gradient images are
computed inside :meth:`Eppenhof2019Net.forward` from the two normalised intensity images
``(B, 2, D, H, W)`` (HU window mapped to [0, 1]), so training, validation and registration all go
through the same function.

Architecture (:class:`Eppenhof2019Net`): a 3D U-Net of ``L = depth`` resolution levels, numbered
here ``1 .. L`` from the coarsest (``G / 2^(L-1)`` voxels per axis, 8³ for the paper's 128³ and
our 64³ with ``L = 5`` and ``4``) to the full lattice ``G``; ``width · 2^(L-ℓ)`` feature maps at
level ``ℓ``; two 3×3×3 convolutions + batch normalisation + leaky ReLU (slope 0.01) per level and
side of the U, max pooling down, transposed convolution up, a 1×1×1 convolution to the three
displacement channels. For progressive training every level ``ℓ < L`` has two extra *side
layers*, used only while the network grows:

* an input layer: 3×3×3 convolution (+ leaky ReLU) from the two gradient images, average-pooled
  to the level's grid, to the feature maps that enter the level from the pooling layer above;
  the level's encoder input is ``β_ℓ · side_in_ℓ + γ_ℓ · pool(encoder_{ℓ+1})`` with
  ``β_ℓ = α_1 + … + α_ℓ`` and ``γ_ℓ = 1 - β_ℓ`` (the paper's eq. 3);
* an output layer: 1×1×1 convolution of the level's decoder features to a displacement ``u_ℓ``.

The predicted field is ``u = Σ_ℓ α_ℓ · upsample(u_ℓ)`` (the paper's eq. 1) where every ``u_ℓ``
is expressed in voxels of the full lattice and upsampled trilinearly onto it (cell-centred, the
geometry of the pooling). The weights ``α`` (:meth:`Eppenhof2019Net.set_alpha`) are set by the
training schedule; a freshly built or loaded network is *fully grown*, ``α = (0, …, 0, 1)``:
then ``β_ℓ = 0`` for every ``ℓ < L`` and the forward pass is exactly the plain U-Net (the side
layers are stored in the model file but not evaluated). Levels whose weight is zero are not
computed at all (training the coarse levels is cheap).

Output: ``(B, 3, D, H, W)`` displacement in voxels of the network lattice, channels ``(i, j, k)``,
mapping a fixed point ``p`` to the moving point ``p + u(p)``, as every method of the registry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..networks import ConvBlock
from .base import Method, PredictedField, PreparedPair, predict_concatenated

NAME = "eppenhof2019"
PAPER = "Eppenhof, Lafarge, Veta & Pluim, IEEE TMI 2019"
#: Standard deviation of the Gaussian derivatives of the network input, in voxels of the lattice.
GGM_SIGMA = 0.5
#: Gaussian kernels are truncated at this many standard deviations (σ = 0.5 → 5 taps).
GGM_TRUNCATE = 4.0


# --------------------------------------------------------------------------- input
def _gaussian_kernels(sigma: float, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled 1D Gaussian ``g`` (sum 1) and Gaussian-derivative ``d`` kernels of ``sigma`` voxels.

    ``d`` is normalised on its first moment (``Σ_k k·d[k] = 1``), so that correlating it with a
    linear ramp of slope ``s`` returns exactly ``s`` — a sampled σ = 0.5 derivative normalised as
    the continuous one would return 0.86·s.
    """
    radius = max(1, int(math.ceil(GGM_TRUNCATE * sigma)))
    k = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    d = k * g / (k * k * g).sum()
    return (g / g.sum()).to(dtype), d.to(dtype)


def _correlate_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate ``x`` (N, C, D, H, W) with a 1D ``kernel`` (odd length) along spatial ``axis``
    (0 = D, 1 = H, 2 = W), replicating the border voxels: ``out[p] = Σ_k kernel[k] · x[p + k - r]``.

    A sum of shifted slices (a few taps: much faster on the CPU than a 3D convolution with a 1D kernel).
    """
    r = kernel.numel() // 2
    dim = 2 + axis
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    padded = torch.cat([first] * r + [x] + [last] * r, dim=dim)
    out = None
    for k, w in enumerate(kernel.tolist()):
        if w == 0.0:
            continue
        term = padded.narrow(dim, k, n) * w
        out = term if out is None else out + term
    return out if out is not None else torch.zeros_like(x)


def gradient_magnitude(x: torch.Tensor, sigma: float = GGM_SIGMA) -> torch.Tensor:
    """Gaussian gradient magnitude of every channel of ``x`` (B, C, D, H, W).

    ``|∇(G_σ * x)|`` with the derivatives taken by separable Gaussian-derivative filters of
    ``sigma`` voxels (the same σ along the three axes of the lattice, as the paper's σ = 0.5
    voxels on its 128³ grid), borders replicated. Units: intensity units of ``x`` per voxel.
    Returns ``(B, C, D, H, W)`` on ``x``'s device and dtype. Used by the network for training,
    validation and registration alike.
    """
    g, dk = _gaussian_kernels(float(sigma), x.device, x.dtype)
    v = x
    smooth_d = _correlate_axis(v, g, 0)
    smooth_dh = _correlate_axis(smooth_d, g, 1)
    di = _correlate_axis(smooth_dh, dk, 2)                                       # ∂/∂i (along W)
    dj = _correlate_axis(_correlate_axis(smooth_d, dk, 1), g, 2)                 # ∂/∂j (along H)
    dz = _correlate_axis(_correlate_axis(_correlate_axis(v, dk, 0), g, 1), g, 2)  # ∂/∂k (along D)
    return torch.sqrt(di * di + dj * dj + dz * dz)


# --------------------------------------------------------------------------- network
@dataclass(frozen=True)
class Eppenhof2019Config:
    """Architecture stored in the model metadata (``network``)."""

    width: int = 16                # feature maps of the full-resolution level, doubled per coarser level
    depth: int = 5                 # resolution levels L (the paper: 128³ … 8³)
    norm: str = "batch"
    negative_slope: float = 0.01   # leaky ReLU (the paper: 10^-2)
    sigma: float = GGM_SIGMA       # input Gaussian gradient magnitude, voxels

    def to_dict(self) -> dict:
        return {"architecture": "progressive_unet", "input": "gaussian_gradient_magnitude", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Eppenhof2019Config:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def divisor(self) -> int:
        """Every lattice size must be a multiple of this number, ``2^(depth-1)``."""
        return 2 ** (self.depth - 1)

    def channels(self, level: int) -> int:
        """Feature maps of ``level`` (1 = coarsest … depth = full lattice)."""
        return self.width * 2 ** (self.depth - level)


def grown(levels: int) -> tuple[float, ...]:
    """The weights ``α`` of a fully grown network of ``levels`` levels: ``(0, …, 0, 1)``."""
    return (0.0,) * (levels - 1) + (1.0,)


class Eppenhof2019Net(nn.Module):
    """U-Net with per-level side layers for progressive growing (see the module docstring).

    Modules are indexed by level ``ℓ`` (1 = coarsest): ``enc[ℓ-1]`` for every level,
    ``up[ℓ-2]``/``dec[ℓ-2]`` for ``ℓ ≥ 2``, ``side_in[ℓ-1]``/``side_out[ℓ-1]`` for ``ℓ < L`` and
    ``head`` (the output layer of level ``L``). :attr:`alpha` holds the blending weights (not
    part of the state dict: a loaded network is fully grown).
    """

    def __init__(self, config: Eppenhof2019Config | None = None) -> None:
        super().__init__()
        self.config = config = config or Eppenhof2019Config()
        if config.depth < 1:
            raise ValueError("the network needs at least one level")
        levels, act = config.depth, config.negative_slope
        ch = config.channels
        self.enc = nn.ModuleList(
            ConvBlock(2 if level == levels else ch(level + 1), ch(level), config.norm, act)
            for level in range(1, levels + 1))
        self.up = nn.ModuleList(nn.ConvTranspose3d(ch(level - 1), ch(level), kernel_size=2, stride=2)
                                for level in range(2, levels + 1))
        self.dec = nn.ModuleList(ConvBlock(2 * ch(level), ch(level), config.norm, act)
                                 for level in range(2, levels + 1))
        self.side_in = nn.ModuleList(
            nn.Sequential(nn.Conv3d(2, ch(level + 1), 3, padding=1), nn.LeakyReLU(act))
            for level in range(1, levels))
        self.side_out = nn.ModuleList(nn.Conv3d(ch(level), 3, kernel_size=1) for level in range(1, levels))
        self.head = nn.Conv3d(ch(levels), 3, kernel_size=1)
        self.pool = nn.MaxPool3d(2)
        for m in self.modules():   # the paper: Glorot (Xavier) normal initialisation
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.alpha: tuple[float, ...] = grown(levels)

    @property
    def levels(self) -> int:
        return self.config.depth

    def set_alpha(self, alpha: Sequence[float]) -> None:
        """Blending weights ``α_1 … α_L`` (coarsest first), each in [0, 1], summing to 1."""
        a = tuple(float(v) for v in alpha)
        if len(a) != self.levels or min(a) < 0 or max(a) > 1 or abs(sum(a) - 1) > 1e-6:
            raise ValueError(f"alpha {a} must be {self.levels} weights in [0, 1] summing to 1")
        self.alpha = a

    @property
    def finest_active(self) -> int:
        """The finest level with a non-zero weight (the network is grown up to this level)."""
        return max(level for level, a in enumerate(self.alpha, start=1) if a > 0)

    def check_shape(self, shape: Sequence[int]) -> None:
        d = self.config.divisor
        if any(int(s) % d for s in shape[-3:]):
            raise ValueError(f"grid {tuple(shape[-3:])} must be a multiple of {d} for depth {self.config.depth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 2, D, H, W): fixed and moving intensities in [0, 1] on the lattice ->
        displacement (B, 3, D, H, W) in lattice voxels, channels (i, j, k), fixed -> moving."""
        self.check_shape(x.shape)
        levels, alpha = self.levels, self.alpha
        top = self.finest_active
        beta = np.cumsum(alpha)
        ggm = gradient_magnitude(x, self.config.sigma)
        feats: dict[int, torch.Tensor] = {}
        h = None
        for level in range(top, 0, -1):                      # encoder, from the finest active level down
            factor = 2 ** (levels - level)
            if level == levels:
                inp = ggm
            else:
                b = float(beta[level - 1])
                b = 1.0 if b > 1.0 - 1e-9 else b                # β_ℓ; γ_ℓ = 1 - β_ℓ
                parts = []
                if b > 0:
                    side = self.side_in[level - 1](F.avg_pool3d(ggm, factor))
                    parts.append(side if b == 1.0 else b * side)
                if b < 1.0:
                    pooled = self.pool(h)
                    parts.append(pooled if b == 0.0 else (1.0 - b) * pooled)
                inp = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            h = self.enc[level - 1](inp)
            feats[level] = h
        y = feats[1]
        u = None
        for level in range(1, top + 1):                      # decoder, up to the finest active level
            if level > 1:
                y = self.dec[level - 2](torch.cat((self.up[level - 2](y), feats[level]), dim=1))
            a = alpha[level - 1]
            if a > 0:
                out = self.head(y) if level == levels else self.side_out[level - 1](y)
                if out.shape[2:] != x.shape[2:]:
                    out = F.interpolate(out, size=x.shape[2:], mode="trilinear", align_corners=False)
                term = out if a == 1 else a * out
                u = term if u is None else u + term
        return u


class Eppenhof2019(Method):
    name = NAME
    recipe = "DeepLungRegTrainingLib.recipes.eppenhof2019"

    def build_network(self, meta: dict) -> Eppenhof2019Net:
        net = Eppenhof2019Net(Eppenhof2019Config.from_dict(meta["network"]))
        net.check_shape(self.grid_size(meta)[::-1])
        return net

    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        g = meta["grid_size"]
        return (int(g),) * 3 if isinstance(g, int | float) else tuple(int(v) for v in g)

    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        """The fully grown network's displacement for a prepared pair (inputs: the normalised
        intensities; the network takes their gradient magnitude itself)."""
        net.set_alpha(grown(net.levels))
        return predict_concatenated(net, pair, device, bf16)


METHOD = Eppenhof2019()
