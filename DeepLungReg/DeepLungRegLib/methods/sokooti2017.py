"""RegNet: multi-scale patch CNN regressing the displacement of a patch's centre voxel.

Sokooti, de Vos, Berendsen, Lelieveldt, Išgum & Staring, "Nonrigid image registration using
multi-scale 3D convolutional neural networks", MICCAI 2017, LNCS 10433, pp. 232-239.

Network (:class:`RegNet`): four patch inputs — fixed and moving at original resolution
(29³ voxels) and fixed and moving 54³ context patches downsampled to 27³ (2×2×2 averages).
Late fusion: three 3×3×3 convolutions per input, fixed and moving of each scale concatenated,
then 2 convolutions + 2×2×2 max pooling (original scale) and 6 convolutions (downsampled scale),
which leaves both pipelines at 9³ on the same grid (one low-resolution step = two original
steps); both concatenated, 4 convolutions (down to 1³) and two fully connected layers. All
convolutions are unpadded ("valid"), followed by batch normalisation and ReLU. Channel counts are
not in the paper; ``width=16`` gives those of the authors' public MICCAI code (16 per input;
25, 30 / 25, 25, 25, 30, 30, 30; 60, 70, 75, 150; FC 150), other widths scale them all.
``scales=1`` is the paper's single-scale comparison: the original-resolution pipeline alone.

Geometry of one prediction (per axis, network-lattice voxels): for the centre voxel ``c`` the
original patch is ``c-14 .. c+14`` and the context patch ``c-27 .. c+26`` (54 voxels, averaged in
pairs). Both pipelines' 9³ maps are then centred at ``c - 0.5`` (the max pooling of 19 features
into 9 and the even context patch both shift by half a voxel, the same way, so they line up);
the network is trained to output the displacement *at* ``c``. Outside the lattice the images are
padded with 0, the normalised value of -1000 HU (what the pipeline's resampling puts outside
the scan).

Output: the displacement of ``c`` in **mm along the lattice axes**, channels ``(i, j, k)``,
fixed -> moving (the paper trains and reports in mm on 1 mm images).

Dense inference (:func:`dense_displacement`) is the same computation written convolutionally:
the original-resolution features (everything before the pooling) are computed once for a slab
of the padded lattice; for each of the 8 pooling phases (offsets 0/1 per axis) the features are
max-pooled at that offset, the context image is averaged in 2×2×2 blocks at the matching
offset and run through the low-resolution pipeline, and the fused layers and the FC layers
(1×1×1 convolutions) give the outputs of every centre of that phase at once; the 8 phase
results interleave into the full field. ``stride=2`` computes one phase only (every second
voxel, 8× cheaper). Slabs along ``D`` bound the memory.

Lattices: the pipeline hands over the pair on its lung box lattice (``grid_size`` nodes);
:meth:`Sokooti2017.predict` resamples it onto the **network lattice**, the same box at
``lattice_spacing_mm`` (an odd number of nodes per axis so that the stride-2 nodes span the
box too), runs the dense inference there and returns the field resampled back onto the
pipeline's lattice (see :meth:`Sokooti2017.predict` for why).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import Lattice
from .base import Method, PredictedField, PreparedPair

#: Side of the original-resolution patch (voxels of the network lattice).
ORIG_PATCH = 29
#: Side of the context patch before its 2× downsampling, and after it.
CONTEXT_PATCH = 54
LOW_PATCH = CONTEXT_PATCH // 2
#: Context needed on each side of a centre voxel (the context patch reaches ``c-27 .. c+26``).
PAD = CONTEXT_PATCH // 2
#: Value outside the lattice: normalised -1000 HU (air), as the pipeline's resampling pads.
PAD_VALUE = 0.0
#: Lattice spacing (mm) of shipped models unless their metadata says otherwise.
DEFAULT_SPACING_MM = 2.0
#: Voxels of one dense-inference slab (bounds the peak memory; about 0.5 GB at width 16).
DEFAULT_SLAB_VOXELS = 1_500_000

#: Channel counts at ``width == 16`` (the authors' public MICCAI 2017 code).
_REF_WIDTH = 16
_REF_ORIG = (25, 30)
_REF_LOW = (25, 25, 25, 30, 30, 30)
_REF_FUSED = (60, 70, 75, 150)
_REF_FC = 150


@dataclass(frozen=True)
class RegNetConfig:
    width: int = _REF_WIDTH     # channels of each input's three convolutions; the others scale with it
    scales: int = 2             # 2: the multi-scale RegNet; 1: the paper's single-scale variant (29³ patches only)

    def scaled(self, channels) -> tuple[int, ...]:
        return tuple(max(1, round(c * self.width / _REF_WIDTH)) for c in channels)

    def to_dict(self) -> dict:
        return {"kind": "regnet", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> RegNetConfig:
        if d.get("kind", "regnet") != "regnet":
            raise ValueError(f"network kind {d.get('kind')!r} is not regnet")
        width, scales = d.get("width", _REF_WIDTH), d.get("scales", 2)
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width {width!r} is not a whole number >= 1")
        if scales not in (1, 2) or isinstance(scales, bool):
            raise ValueError(f"scales {scales!r} is not 1 or 2")
        return cls(width=width, scales=scales)


def _convs(channels: tuple[int, ...], c_in: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv3d(c_in, c, 3), nn.BatchNorm3d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


class RegNet(nn.Module):
    """The multi-scale late-fusion RegNet; :meth:`forward` is fully convolutional.

    ``forward(orig, low)`` takes ``orig`` ``(B, 2, 29 + 2(T-1), ...)`` (fixed, moving) and ``low``
    ``(B, 2, 27 + T-1, ...)`` and gives ``(B, 3, T, ...)``: the displacements (mm along the lattice
    axes, channels i, j, k) of ``T`` centres two original voxels apart. Patches give ``T = 1``.
    """

    def __init__(self, config: RegNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or RegNetConfig()
        w = self.config.width
        orig, low = self.config.scaled(_REF_ORIG), self.config.scaled(_REF_LOW)
        fused, (fc,) = self.config.scaled(_REF_FUSED), self.config.scaled((_REF_FC,))
        self.multiscale = self.config.scales == 2
        self.fixed_orig, self.moving_orig = _convs((w, w, w), 1), _convs((w, w, w), 1)
        if self.multiscale:
            self.fixed_low, self.moving_low = _convs((w, w, w), 1), _convs((w, w, w), 1)
        self.orig = _convs(orig, 2 * w)
        if self.multiscale:
            self.low = _convs(low, 2 * w)
        self.fused = _convs(fused, orig[-1] + (low[-1] if self.multiscale else 0))
        self.fc = nn.Sequential(nn.Conv3d(fused[-1], fc, 1), nn.BatchNorm3d(fc), nn.ReLU(inplace=True),
                                nn.Conv3d(fc, 3, 1))

    def orig_features(self, x: torch.Tensor) -> torch.Tensor:
        """Original-resolution pipeline up to (not including) the max pooling: 5 valid convolutions."""
        return self.orig(torch.cat((self.fixed_orig(x[:, :1]), self.moving_orig(x[:, 1:2])), dim=1))

    def low_features(self, x: torch.Tensor) -> torch.Tensor:
        """Downsampled pipeline: 9 valid convolutions on the 2×-averaged context."""
        return self.low(torch.cat((self.fixed_low(x[:, :1]), self.moving_low(x[:, 1:2])), dim=1))

    def head(self, pooled: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        """Fusion of the two aligned 9³(+) maps: 4 convolutions and the FC layers (1×1×1 convolutions);
        ``low`` is None for the single-scale variant."""
        if low is None:
            return self.fc(self.fused(pooled))
        if pooled.shape[2:] != low.shape[2:]:
            raise ValueError(f"pipelines do not line up: {tuple(pooled.shape[2:])} vs {tuple(low.shape[2:])}")
        return self.fc(self.fused(torch.cat((pooled, low), dim=1)))

    def forward(self, orig: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        pooled = F.max_pool3d(self.orig_features(orig), 2)
        return self.head(pooled, self.low_features(low) if self.multiscale else None)


# --------------------------------------------------------------------------- patches
def extract_patches(fixed: torch.Tensor, moving: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network inputs of ``centres`` ``(N, 3)`` (array indices ``d, h, w``) of two ``(D, H, W)`` volumes.

    Returns ``orig`` ``(N, 2, 29, 29, 29)`` (voxels ``c-14 .. c+14``) and ``low`` ``(N, 2, 27, 27, 27)``
    (voxels ``c-27 .. c+26`` averaged in 2×2×2 blocks); voxels outside the volume are :data:`PAD_VALUE`.
    """
    vol = F.pad(torch.stack((fixed, moving))[None], (PAD,) * 6, value=PAD_VALUE)[0]   # (2, D+54, H+54, W+54)
    centres = centres.to(torch.long).to(vol.device)

    def crop(start: torch.Tensor, size: int) -> torch.Tensor:          # start (N, 3) in padded indices
        r = torch.arange(size, device=vol.device)
        d, h, w = (start[:, a, None] + r for a in range(3))
        out = vol[:, d[:, :, None, None], h[:, None, :, None], w[:, None, None, :]]   # (2, N, s, s, s)
        return out.transpose(0, 1)

    orig = crop(centres + (PAD - ORIG_PATCH // 2), ORIG_PATCH)
    low = F.avg_pool3d(crop(centres, CONTEXT_PATCH), 2)
    return orig.contiguous(), low.contiguous()


def predict_patches(net: RegNet, fixed: torch.Tensor, moving: torch.Tensor, centres: torch.Tensor,
                    batch: int = 64) -> torch.Tensor:
    """Per-patch inference: ``(N, 3)`` displacements (mm along the lattice axes, i, j, k) of ``centres``."""
    out = []
    for s in range(0, len(centres), batch):
        orig, low = extract_patches(fixed, moving, centres[s : s + batch])
        out.append(net(orig, low).flatten(1))
    return torch.cat(out) if out else torch.zeros((0, 3), dtype=fixed.dtype)


# --------------------------------------------------------------------------- dense inference
def _slab(net: RegNet, xp: torch.Tensor, n: tuple[int, int, int], phases) -> dict:
    """Outputs of every centre of a padded slab ``xp`` ``(1, 2, n0+54, n1+54, n2+54)``, per phase.

    Centre ``c`` (per axis, ``0 <= c < n``) sits at ``c + 27`` of ``xp``; a phase ``p`` holds the
    centres ``p, p + 2, ...``. Returns ``{phase: (1, 3, T0, T1, T2)}``.
    """
    half = ORIG_PATCH // 2
    lo = PAD - half                                   # first voxel of the first original patch
    feats = net.orig_features(xp[:, :, lo : lo + n[0] + 2 * half, lo : lo + n[1] + 2 * half,
                                 lo : lo + n[2] + 2 * half])            # (1, C, n+18, ...)
    out = {}
    for p in phases:
        t = [(n[a] - p[a] + 1) // 2 for a in range(3)]
        if min(t) <= 0:
            continue
        # centre p + 2u: its original patch starts at feature p + 2u, its context patch at xp index p + 2u
        f = feats[:, :, p[0] : p[0] + 2 * t[0] + 16, p[1] : p[1] + 2 * t[1] + 16, p[2] : p[2] + 2 * t[2] + 16]
        ctx = xp[:, :, p[0] : p[0] + 2 * t[0] + 52, p[1] : p[1] + 2 * t[1] + 52, p[2] : p[2] + 2 * t[2] + 52]
        low = net.low_features(F.avg_pool3d(ctx, 2)) if net.multiscale else None
        out[p] = net.head(F.max_pool3d(f, 2), low)
    return out


def dense_displacement(net: RegNet, fixed: torch.Tensor, moving: torch.Tensor, stride: int = 1,
                       slab_voxels: int = DEFAULT_SLAB_VOXELS) -> torch.Tensor:
    """Displacement of every centre of two ``(D, H, W)`` volumes on the network lattice, fully convolutional.

    Returns ``(3, D, H, W)`` (``stride=1``) or ``(3, (D+1)//2, (H+1)//2, (W+1)//2)`` (``stride=2``: the
    voxels with even indices), mm along the lattice axes, channels ``(i, j, k)`` — the same numbers as
    :func:`predict_patches` at those voxels. ``net`` must be in eval mode.
    """
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    shape = tuple(int(s) for s in fixed.shape)
    xp = F.pad(torch.stack((fixed, moving))[None], (PAD,) * 6, value=PAD_VALUE)
    phases = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)] if stride == 1 else [(0, 0, 0)]
    out_shape = shape if stride == 1 else tuple((s + 1) // 2 for s in shape)
    out = torch.empty((3, *out_shape), dtype=fixed.dtype, device=fixed.device)
    per_row = (shape[1] + 2 * PAD) * (shape[2] + 2 * PAD)
    rows = max(2, (slab_voxels // per_row) // 2 * 2)                  # even: phases stay global
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        res = _slab(net, xp[:, :, a : b + 2 * PAD], (b - a, shape[1], shape[2]), phases)
        for p, u in res.items():
            if stride == 1:
                out[:, a + p[0] : b : 2, p[1] :: 2, p[2] :: 2] = u[0]
            else:
                out[:, a // 2 : a // 2 + u.shape[2]] = u[0]
    return out


# --------------------------------------------------------------------------- lattices
def network_lattice(box: Lattice, spacing_mm: float) -> Lattice:
    """The lattice over ``box``'s box with about ``spacing_mm`` between nodes and an odd number of
    nodes per axis (so that every second node spans the same box)."""
    n = np.maximum(np.round(box.extent_mm / spacing_mm).astype(int) + 1, 3)
    n = n + (n % 2 == 0)
    return Lattice(box.origin, tuple((box.extent_mm / (n - 1)).tolist()), box.direction, tuple(int(v) for v in n))


def every_second_node(lattice: Lattice) -> Lattice:
    """The nodes of ``lattice`` with even indices (same box when its sizes are odd)."""
    n = np.asarray(lattice.size)
    return Lattice(lattice.origin, tuple((2 * np.asarray(lattice.spacing)).tolist()), lattice.direction,
                   tuple(int(v) for v in (n + 1) // 2))


def _gaussian_1d(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """Blur ``x`` ``(D, H, W)`` along ``axis`` (edge values repeated)."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    y = x.movedim(axis, -1)
    flat = y.reshape(-1, 1, y.shape[-1])
    flat = F.conv1d(F.pad(flat, (r, r), mode="replicate"), k)
    return flat.reshape(y.shape).movedim(-1, axis)


def to_lattice(arr: np.ndarray | torch.Tensor, src: Lattice, dst: Lattice, mask: bool = False) -> torch.Tensor:
    """``(D, H, W)`` values on ``src`` resampled onto ``dst`` (the same box): trilinear, Gaussian-blurred
    first along axes that get coarser (σ = (ratio - 1) / 2 source voxels); ``mask``: a boolean mask
    (trilinear weights > 0.5)."""
    x = torch.as_tensor(arr, dtype=torch.float32)
    if mask:
        y = F.interpolate(x[None, None], size=dst.shape, mode="trilinear", align_corners=True)[0, 0]
        return y > 0.5
    ratio = np.asarray(dst.spacing) / np.asarray(src.spacing)          # (i, j, k)
    for axis, r in zip((2, 1, 0), ratio, strict=True):
        x = _gaussian_1d(x, 0.5 * (float(r) - 1.0), axis)
    return F.interpolate(x[None, None], size=dst.shape, mode="trilinear", align_corners=True)[0, 0].contiguous()


# --------------------------------------------------------------------------- the method
class Sokooti2017(Method):
    name = "sokooti2017"
    recipe = "DeepLungRegTrainingLib.recipes.sokooti2017"

    def build_network(self, meta: dict) -> RegNet:
        return RegNet(RegNetConfig.from_dict(meta["network"]))

    def grid_size(self, meta: dict) -> tuple[int, int, int]:
        g = meta["grid_size"]
        return (int(g),) * 3 if isinstance(g, int | float) else tuple(int(v) for v in g)

    @staticmethod
    def lattice_spacing(meta: dict) -> float:
        return float(meta.get("lattice_spacing_mm", DEFAULT_SPACING_MM))

    @staticmethod
    def output_stride(meta: dict) -> int:
        return int(meta.get("output_stride", 1))

    def network_field(self, net: RegNet, pair: PreparedPair, meta: dict, device: torch.device,
                      bf16: bool = False) -> PredictedField:
        """The network's field on its own lattice: ``lattice_spacing_mm`` (``output_stride`` 1) or every
        second node of it (``output_stride`` 2), voxels of that lattice, channels (i, j, k)."""
        lattice = network_lattice(pair.lattice, self.lattice_spacing(meta))
        fixed = to_lattice(pair.fixed, pair.lattice, lattice).to(device)
        moving = to_lattice(pair.moving, pair.lattice, lattice).to(device)
        stride = self.output_stride(meta)
        with torch.inference_mode():
            if bf16:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    u_mm = dense_displacement(net, fixed, moving, stride)
            else:
                u_mm = dense_displacement(net, fixed, moving, stride)
        out = lattice if stride == 1 else every_second_node(lattice)
        spacing = torch.tensor(out.spacing, dtype=torch.float32).view(3, 1, 1, 1)
        return PredictedField((u_mm.float().cpu() / spacing)[None], out)

    def predict(self, net: torch.nn.Module, pair: PreparedPair, meta: dict, device: torch.device,
                bf16: bool = False) -> PredictedField:
        """:meth:`network_field` resampled (trilinear, same box) onto the pipeline's lattice: the pipeline's
        refinement reads the field in voxels of its own lattice, so a field on another lattice cannot be
        handed over as it is."""
        from ..fields import resize_field

        field = self.network_field(net, pair, meta, device, bf16)
        return PredictedField(resize_field(field.u_vox, pair.lattice.shape), pair.lattice)


METHOD = Sokooti2017()
