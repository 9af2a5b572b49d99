"""Test-time instance optimisation: refine the affine + network mapping of one pair.

The mapping keeps the form of every DeepLungReg result, ``T(x) = A(x + d(x))`` (fixed ->
moving, LPS mm, :mod:`DeepLungRegLib.transforms`), and ``d`` is optimised directly:

* ``d`` lives on a *control lattice* (a :class:`~DeepLungRegLib.preprocessing.Lattice`
  spanning the network box with the fixed image's direction) and is interpolated
  trilinearly between its nodes — exactly what ITK's displacement field transform does
  with the written file, so the refined lattice *is* the transform lattice;
* the images are resampled once onto a fine box grid (fixed as is, moving through ``A``),
  coarser levels are Gaussian-smoothed and downsampled copies;
* the dissimilarity is the squared difference of MIND-type self-similarity features
  (:func:`~DeepLungRegLib.losses.mind_features`) at lung voxels of the fixed image (mask
  dilated to include the pleura), sampled randomly each iteration (stochastic Adam);
* regularisers: diffusion of ``d`` on the control lattice and the volume-change penalty with
  a linear barrier (Hering et al. 2021) on the lattice's Jacobian determinant;
* coarse -> fine levels; each level starts from the previous one (or from the network field).

Inside this module displacements are expressed in mm along the lattice axes (the columns of
the fixed image's direction matrix) with channels ``(i, j, k)``; the returned field is in
voxels of the returned lattice (the unit :func:`~DeepLungRegLib.transforms.output_field` takes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from .geometry import Lattice
from .losses import diffusion, jacobian_determinant, mind_features, volume_change_penalty
from .preprocessing import resample_mask_to_grid, resample_to_grid
from .refine_levels import DEFAULT_REFINE, REFINE_CHOICES


@dataclass(frozen=True)
class RefineLevel:
    """One level of the coarse-to-fine optimisation."""

    image_spacing_mm: float      # spacing of the images the similarity is evaluated on
    control_spacing_mm: float    # spacing of the displacement lattice optimised on this level
    iterations: int
    step: float | None = None    # Adam step as a fraction of the control spacing (None: the config's)


@dataclass(frozen=True)
class RefineConfig:
    levels: tuple[RefineLevel, ...]
    name: str = "custom"
    smoothness: float = 0.3          # weight of the diffusion regulariser (unitless: (mm/mm)²)
    volume_change: float = 0.05      # weight of the volume-change penalty
    barrier_t: float = 0.2           # position of the linear barrier (halved on every finer level)
    learning_rate_mm: float = 0.05   # Adam step, as a fraction of the level's control spacing
    samples: int = 50_000            # lung voxels drawn per iteration
    check_samples: int = 200_000     # fixed lung voxels on which each level must lower the objective
    mask_dilation_mm: float = 6.0    # the fixed lung mask grown by this much (pleura, sliding edge)
    mind_dilation: int = 2           # neighbour distance of the features, in level voxels
    mind_patch: int = 3              # side of the box the feature distances are averaged over (voxels)
    hu_range: tuple[float, float] = (-1000.0, 300.0)
    seed: int = 0


PRESETS: dict[str, RefineConfig] = {
    "fast": RefineConfig(levels=(RefineLevel(6.0, 6.0, 50), RefineLevel(3.0, 6.0, 50)),
                         name="fast", samples=20_000),
    # 30 iterations on the finest level, 15 000 samples per iteration and 100 000 checked voxels: the same mean
    # TRE on the held-out pairs as 40 / 20 000 / 200 000 (0.530 mm both) in 20 % less time (3.61 vs 4.49 s)
    "full": RefineConfig(levels=(RefineLevel(6.0, 6.0, 50), RefineLevel(3.0, 6.0, 50),
                                 RefineLevel(1.5, 3.0, 30)), name="full", samples=15_000, check_samples=100_000),
}


def refine_config(level: str | RefineConfig) -> RefineConfig | None:
    """The configuration of a refine level name (``off`` -> None)."""
    if isinstance(level, RefineConfig):
        return level
    if level == "off":
        return None
    try:
        return PRESETS[level]
    except KeyError:
        raise ValueError(f"unknown refine level {level!r}; use one of {', '.join(REFINE_CHOICES)}") from None


@dataclass
class RefineResult:
    u_vox: torch.Tensor          # (1, 3, D, H, W) displacement in voxels of ``lattice`` (channels i, j, k)
    lattice: Lattice
    stats: dict = field(default_factory=dict)


Sequence3 = tuple[float, float, float]


def _resize(x: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """Trilinear resampling of ``x`` (B, C, ...) onto ``lattice`` (same box, align_corners)."""
    return F.interpolate(x, size=tuple(lattice.size[::-1]), mode="trilinear", align_corners=True)


#: Kernels of at most this many taps are applied as shifted sums, longer ones by a grouped conv3d
#: (measured on a 120×110×100 volume: 5 taps 6 vs 40 ms, 39 taps 712 vs 279 ms).
SHIFT_TAPS = 9


def gaussian_blur(x: torch.Tensor, sigma_vox: Sequence3) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W) with per-axis ``sigma_vox`` = (s_i, s_j, s_k)."""
    out = x
    for axis, s in zip((4, 3, 2), sigma_vox, strict=True):
        if s < 0.3:
            continue
        r = max(1, int(math.ceil(2.5 * s)))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        pad = [0] * 6
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = r
        padded = F.pad(out, pad, mode="replicate")
        if 2 * r + 1 <= SHIFT_TAPS:
            # a few taps: a weighted sum of shifted views (2-7x faster than a grouped conv3d on the CPU)
            n, weights = out.shape[axis], k.tolist()
            out = padded.narrow(axis, 0, n) * weights[0]
            for t in range(1, 2 * r + 1):
                out = out.add_(padded.narrow(axis, t, n), alpha=weights[t])
        else:
            shape = [1, 1, 1, 1, 1]
            shape[axis] = 2 * r + 1
            c = out.shape[1]
            out = F.conv3d(padded, k.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out



def _dilate(mask: sitk.Image, mm: float) -> sitk.Image:
    """``mask`` grown by about ``mm`` along every axis, on its own (coarse) grid."""
    grow = np.maximum(np.round(mm / np.asarray(mask.GetSpacing())[::-1]).astype(int), 0)
    arr = sitk.GetArrayViewFromImage(mask) > 0
    if not grow.any() or not arr.any():
        return mask
    out = sitk.GetImageFromArray(ndimage.binary_dilation(arr, np.ones(tuple(2 * g + 1 for g in grow), bool))
                                 .astype(np.uint8))
    out.CopyInformation(mask)
    return out


class Adam:
    """Adam (Kingma & Ba) on one tensor, the same arithmetic as ``torch.optim.Adam`` with its defaults.

    Written out because creating any ``torch.optim`` optimiser imports ``torch._dynamo`` (about a
    second on a 2-core CPU, paid by every ``register`` process); the refinement needs one plain Adam.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))
        self.param.grad = None


class _LevelProblem:
    """The objective of one level: feature dissimilarity at lung voxels + regularisers on the lattice."""

    def __init__(self, feat_f: torch.Tensor, feat_m: torch.Tensor, mask: torch.Tensor, extent_mm: torch.Tensor,
                 control_spacing: tuple[float, float, float], cfg: RefineConfig, barrier_t: float) -> None:
        lat = mask[0, 0]
        idx = torch.nonzero(lat).flip(1).to(feat_f.dtype)                        # (N, 3) (i, j, k)
        n = torch.tensor(lat.shape[::-1], dtype=feat_f.dtype, device=feat_f.device)
        self.points = 2.0 * idx / (n - 1) - 1.0                                  # normalised, (x, y, z) = (i, j, k)
        self.target = feat_f[0].permute(1, 2, 3, 0)[lat]                         # (N, C) fixed features
        # channels-last makes sampling the C feature channels at scattered points ~3x faster on CPUs
        self.feat_m = feat_m.contiguous(memory_format=torch.channels_last_3d)
        self.extent_mm = extent_mm
        self.control_spacing, self.cfg, self.barrier_t = control_spacing, cfg, barrier_t

    def __call__(self, p: torch.Tensor, sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity, regularisation) for the lattice displacement ``p`` (1, 3, D, H, W) mm along the axes."""
        q = self.points if sample is None else self.points[sample]
        d = F.grid_sample(p, q.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                          align_corners=True).view(3, -1).t()                    # (n, 3) mm
        moved = (q + 2.0 * d / self.extent_mm).view(1, 1, 1, -1, 3)
        fm = F.grid_sample(self.feat_m, moved, mode="bilinear", padding_mode="border",
                           align_corners=True).view(self.feat_m.shape[1], -1).t()
        target = self.target if sample is None else self.target[sample]
        sim = ((fm - target) ** 2).mean()
        reg = self.cfg.smoothness * diffusion(p, self.control_spacing)
        det = jacobian_determinant(p, self.control_spacing)
        reg = reg + self.cfg.volume_change * volume_change_penalty(det, self.barrier_t)
        return sim, reg


def refine(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, fixed_lung: sitk.Image,
           box: Lattice, init_u_vox: torch.Tensor | None, config: str | RefineConfig = DEFAULT_REFINE,
           device: torch.device | str = "cpu",
           progress: Callable[[int, int], None] | None = None) -> RefineResult:
    """Optimise ``d`` of ``T(x) = A(x + d(x))`` for one pair.

    Parameters
    ----------
    fixed, moving : HU images (any geometry).
    affine : the pre-alignment ``A`` (fixed -> moving).
    fixed_lung : fixed lung mask (uint8, any grid).
    box : the lattice whose box is optimised (the network grid: lungs + margin).
    init_u_vox : starting displacement (1, 3, *box.shape) in voxels of ``box``, or None (zero).
    progress : called with (iterations done, total iterations).

    Each level keeps its result only if it lowered its whole objective evaluated at every lung voxel
    (at most ``check_samples`` of them, drawn once per level and kept fixed;
    ``stats["levels"][n]["accepted"]``), so refinement never makes its own objective worse.
    """
    cfg = refine_config(config)
    if cfg is None:
        raise ValueError("refine level 'off' has nothing to optimise")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    finest = box.resized(min(lv.image_spacing_mm for lv in cfg.levels))
    lo, hi = cfg.hu_range

    def prep(img: sitk.Image, tx: sitk.Transform | None) -> torch.Tensor:
        arr = resample_to_grid(img, finest, tx, default=lo)
        arr = (np.clip(arr, lo, hi) - lo) / (hi - lo)
        return torch.from_numpy(arr)[None, None].to(device)

    f_fine, m_fine = prep(fixed, None), prep(moving, affine)
    mask_fine = resample_mask_to_grid(_dilate(fixed_lung, cfg.mask_dilation_mm), finest)
    if not mask_fine.any():
        mask_fine[:] = True
    mask_fine_t = torch.from_numpy(mask_fine.astype(np.float32))[None, None].to(device)
    extent = torch.tensor(box.extent_mm, dtype=torch.float32, device=device)   # (i, j, k) mm

    # current displacement: mm along the lattice axes, (1, 3, D, H, W) on the current lattice
    if init_u_vox is not None:
        lattice = box
        u = init_u_vox.detach().float().to(device) * torch.tensor(
            box.spacing, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    else:
        lattice = box.resized(cfg.levels[0].control_spacing_mm)
        u = torch.zeros((1, 3, *lattice.shape), device=device)

    # image pyramid, each level smoothed and downsampled from the next finer one
    pyramid: dict[float, tuple[Lattice, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    prev_lat, prev = finest, (f_fine, m_fine, mask_fine_t)
    for sp in sorted({lv.image_spacing_mm for lv in cfg.levels}):
        lat = box.resized(sp)
        if lat.size != prev_lat.size:
            ratio = np.asarray(lat.spacing) / np.asarray(prev_lat.spacing)          # >= 1: coarser
            sigma = tuple(float(max(0.0, 0.5 * (r - 1.0))) for r in ratio)
            prev = (_resize(gaussian_blur(prev[0], sigma), lat), _resize(gaussian_blur(prev[1], sigma), lat),
                    _resize(prev[2], lat))
            prev_lat = lat
        pyramid[sp] = (lat, prev)

    total_its, done, level_stats = sum(lv.iterations for lv in cfg.levels), 0, []
    t0 = time.perf_counter()
    for li, lv in enumerate(cfg.levels):
        t_level = time.perf_counter()
        img_lat, (f_img, m_img, mask_w) = pyramid[lv.image_spacing_mm]
        mask = mask_w > 0.5
        ctrl = box.resized(lv.control_spacing_mm)
        if ctrl.size != lattice.size:
            u = _resize(u, ctrl).contiguous()
        lattice = ctrl
        problem = _LevelProblem(mind_features(f_img, cfg.mind_dilation, cfg.mind_patch),
                                mind_features(m_img, cfg.mind_dilation, cfg.mind_patch),
                                mask, extent, lattice.spacing, cfg, cfg.barrier_t / (2 ** li))
        param = torch.nn.Parameter(u.clone())
        step = cfg.learning_rate_mm if lv.step is None else lv.step
        opt = Adam(param, lr=step * float(np.mean(lattice.spacing)))
        n_pts = problem.points.shape[0]
        check = (torch.randperm(n_pts, generator=gen)[:cfg.check_samples].to(device)
                 if n_pts > cfg.check_samples else None)
        with torch.no_grad():
            sim0, reg0 = problem(param, check)
        for _ in range(lv.iterations):
            sample = (torch.randint(0, n_pts, (cfg.samples,), generator=gen).to(device)
                      if n_pts > cfg.samples else None)
            sim, reg = problem(param, sample)
            (sim + reg).backward()
            opt.step()
            done += 1
            if progress:
                progress(done, total_its)
        with torch.no_grad():
            sim1, reg1 = problem(param, check)
        accepted = float(sim1 + reg1) <= float(sim0 + reg0)
        if accepted:
            u = param.detach()
        level_stats.append({
            "image_spacing_mm": [round(s, 4) for s in img_lat.spacing],
            "control_spacing_mm": [round(s, 4) for s in lattice.spacing], "control_size": list(lattice.size),
            "iterations": lv.iterations, "lung_voxels": int(n_pts),
            "checked_voxels": int(n_pts if check is None else check.numel()),
            "similarity_before": float(sim0), "similarity_after": float(sim1),
            "objective_before": float(sim0 + reg0), "objective_after": float(sim1 + reg1),
            "accepted": accepted, "seconds": round(time.perf_counter() - t_level, 3),
        })
    spacing = torch.tensor(lattice.spacing, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    stats = {"level": cfg.name, "levels": level_stats, "seconds": round(time.perf_counter() - t0, 3),
             "lattice_spacing_mm": list(lattice.spacing), "lattice_size": list(lattice.size)}
    return RefineResult((u / spacing).cpu(), lattice, stats)
