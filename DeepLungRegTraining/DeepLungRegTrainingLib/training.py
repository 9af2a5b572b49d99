"""Training a registration U-Net on synthetic pairs, with exact resume and snapshot averaging.

Pair ``n`` of a run (``n = iteration * batch_size + b``) is generated from a random
generator seeded with ``(seed, n)`` alone, so the data stream does not depend on worker
processes, devices or interruptions: a resumed run sees the same pairs as an
uninterrupted one. Checkpoints (network, optimiser, snapshot average, log, iteration)
are written atomically; ``resume=True`` continues from the last one.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io as _io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import DeepLungRegLib
import numpy as np
import torch
from DeepLungRegLib.errors import InputError
from DeepLungRegLib.io import atomic_write_bytes, read_volume
from DeepLungRegLib.modelfile import save_model
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION, PreparedScan, prepare_scan
from torch.utils.data import DataLoader, Dataset

from . import eppenhof2018
from .losses import endpoint_error_mm, masked_displacement_loss
from .synthesis import PRESETS, make_pair

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    method: str = eppenhof2018.METHOD
    preset: str = eppenhof2018.SYNTHESIS_PRESET
    grid: int = eppenhof2018.GRID
    iterations: int = 10000
    batch_size: int = 1
    optimizer: str = eppenhof2018.OPTIMIZER       # adagrad | sgd | adam
    lr: float = eppenhof2018.LEARNING_RATE
    momentum: float = 0.5                         # for sgd
    loss: str = eppenhof2018.LOSS                 # l1 | l2
    snapshot_every: int = eppenhof2018.SNAPSHOT_EVERY
    average_last: int = eppenhof2018.AVERAGE_LAST
    validate_every: int = 500
    validation_pairs: int = 8
    checkpoint_every: int = 100
    width: int = 16
    depth: int = 4
    norm: str = "batch"
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    pair_pool: int = 0        # 0: a new pair every step; n > 0: cycle through n fixed pairs (overfitting checks)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model_path: Path
    iterations: int
    validation: dict
    log: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- data
def list_volumes(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders into the volume files they hold (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES))
            if not found:
                raise InputError(f"{p}: folder holds no volume files ({', '.join(VOLUME_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pair_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


class SyntheticPairDataset(Dataset):
    """Item ``n`` is a (fixed, moving, target, mask) tuple generated on the CPU from ``(seed, n)``."""

    def __init__(self, scans: Sequence[PreparedScan], preset: str, seed: int, pool: int = 0) -> None:
        self.images = [torch.from_numpy(s.image)[None] for s in scans]
        self.masks = [torch.from_numpy(s.mask.astype(np.float32))[None] for s in scans]
        self.preset = PRESETS[preset]
        self.seed = seed
        self.pool = pool

    def to(self, device: torch.device) -> SyntheticPairDataset:
        """Keep the scans on ``device`` so that pairs are generated there (CUDA: no worker processes)."""
        self.images = [t.to(device) for t in self.images]
        self.masks = [t.to(device) for t in self.masks]
        return self

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, n: int):
        g = pair_generator(self.seed, n % self.pool if self.pool > 0 else n)
        k = int(torch.randint(len(self.images), (1,), generator=g))
        pair = make_pair(self.images[k][None], self.masks[k][None], self.preset, g)
        return pair.fixed[0], pair.moving[0], pair.target[0], pair.mask[0]


class _RangeSampler(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- validation
@dataclass
class ValidationSet:
    fixed: torch.Tensor
    moving: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    points: list[torch.Tensor]     # per pair: (P,) flat indices of random lung voxels
    spacing: torch.Tensor          # (3,) mm of the held-out scan's network grid

    @classmethod
    def build(cls, scan: PreparedScan, preset: str, n_pairs: int, seed: int, n_points: int = 300) -> ValidationSet:
        ds = SyntheticPairDataset([scan], preset, seed + 7919)
        items = [ds[i] for i in range(n_pairs)]
        fixed, moving, target, mask = (torch.stack(x) for x in zip(*items, strict=True))
        g = torch.Generator().manual_seed(seed + 104729)
        points = []
        for m in mask:
            idx = torch.nonzero(m.flatten() > 0).flatten()
            if idx.numel() == 0:
                idx = torch.arange(m.numel())
            points.append(idx[torch.randint(idx.numel(), (n_points,), generator=g)])
        return cls(fixed, moving, target, mask, points, torch.tensor(scan.grid.spacing, dtype=torch.float32))

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None, device: torch.device) -> dict:
        """Mean end-point error (mm) inside the lung and at random lung points; ``net=None`` = identity."""
        lung, pts = [], []
        was_training = net.training if net is not None else False
        if net is not None:
            net.eval()
        for i in range(len(self.fixed)):
            target = self.target[i : i + 1].to(device)
            if net is None:
                pred = torch.zeros_like(target)
            else:
                x = torch.cat((self.fixed[i : i + 1], self.moving[i : i + 1]), dim=1).to(device)
                pred = net(x)
            epe = endpoint_error_mm(pred, target, self.spacing.to(device))[0].cpu()
            m = self.mask[i, 0] > 0
            lung.append(float(epe[m].mean()) if m.any() else float(epe.mean()))
            pts.append(float(epe.flatten()[self.points[i]].mean()))
        if net is not None and was_training:
            net.train()
        return {"epe_lung_mm": float(np.mean(lung)), "epe_points_mm": float(np.mean(pts))}


# --------------------------------------------------------------------------- optimisation
def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    raise InputError(f"unknown optimizer {cfg.optimizer!r}; use adagrad, sgd or adam")


class SnapshotAverage:
    """Running mean of the weight snapshots taken after ``start`` (floating tensors averaged,
    integer buffers such as BatchNorm counters taken from the last snapshot)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.sum: dict[str, torch.Tensor] | None = None
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        if self.sum is None:
            self.sum = {k: v.detach().clone().double() if v.is_floating_point() else v.detach().clone()
                        for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    self.sum[k] += v.detach().double()
                else:
                    self.sum[k] = v.detach().clone()
        self.count += 1

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.sum is None:
            return {k: v.detach().clone() for k, v in like.items()}
        return {k: (v / self.count).to(like[k].dtype) if v.is_floating_point() else v.clone()
                for k, v in self.sum.items()}

    def state_dict(self) -> dict:
        return {"start": self.start, "count": self.count, "sum": self.sum or {}}

    def load_state_dict(self, d: dict) -> None:
        self.start, self.count = int(d["start"]), int(d["count"])
        self.sum = {k: v for k, v in d["sum"].items()} or None


def _save_checkpoint(path: Path, net, opt, it: int, avg: SnapshotAverage, log: list[dict], cfg: TrainConfig) -> None:
    buf = _io.BytesIO()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                "average": avg.state_dict(), "log": json.dumps(log), "config": json.dumps(cfg.to_dict()),
                "rng": rng}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _write_log(out_dir: Path, log: list[dict]) -> None:
    keys = ["iteration", "loss", "epe_lung_mm", "epe_points_mm", "seconds"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for row in log:
        w.writerow(row)
    atomic_write_bytes(out_dir / "log.csv", buf.getvalue().encode())
    atomic_write_bytes(out_dir / "log.json", json.dumps(log, indent=1).encode())


def plot_curves(out_dir: Path, log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in log if r.get("loss") is not None]
    loss = [r["loss"] for r in log if r.get("loss") is not None]
    val = [(r["iteration"], r["epe_lung_mm"]) for r in log if r.get("epe_lung_mm") is not None]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        k = max(1, len(loss) // 200)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax[0].plot(its, loss, alpha=0.3, lw=0.5)
        ax[0].plot(its[k - 1 :], smooth)
    ax[0].set(xlabel="iteration", ylabel="masked loss (voxels)", title="training loss", yscale="log")
    if val:
        ax[1].plot(*zip(*val, strict=True), marker="o")
    ax[1].set(xlabel="iteration", ylabel="mean end-point error in lung (mm)", title="validation")
    fig.tight_layout()
    tmp = out_dir / ".curves.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / "curves.png")


# --------------------------------------------------------------------------- main entry
def train(images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, cfg: TrainConfig,
          validation_image: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train on synthetic pairs from ``images`` and write ``out_dir/model.safetensors``.

    ``validation_image`` is held out for validation; without it the last image is held out
    when there are at least two, else validation uses pairs of the training scan.
    ``callback`` receives each log row (for GUIs). Returns the averaged model's figures.
    """
    from DeepLungRegLib.modelfile import resolve_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_volumes(images)
    val_file = Path(validation_image) if validation_image else (files.pop() if len(files) >= 2 else None)
    if not files:
        raise InputError("no training images")
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    net_cfg = UNetConfig(width=cfg.width, depth=cfg.depth, norm=cfg.norm)
    if cfg.grid % net_cfg.divisor:
        raise InputError(f"grid {cfg.grid} must be a multiple of {net_cfg.divisor} for depth {cfg.depth}")
    device = resolve_device(cfg.device)

    ckpt_path = out_dir / CHECKPOINT
    state = None
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = {**TrainConfig().to_dict(), **json.loads(state["config"])}
        for k in ("grid", "width", "depth", "norm", "preset", "seed", "batch_size", "optimizer", "loss", "pair_pool"):
            if saved[k] != getattr(cfg, k):
                raise InputError(f"--resume: checkpoint has {k}={saved[k]!r}, this run {getattr(cfg, k)!r}")

    scans = [prepare_scan(read_volume(f), cfg.grid) for f in files]
    val_scan = prepare_scan(read_volume(val_file), cfg.grid) if val_file else scans[-1]
    valset = ValidationSet.build(val_scan, cfg.preset, cfg.validation_pairs, cfg.seed)

    torch.manual_seed(cfg.seed)
    net = UNet3D(net_cfg).to(device)
    opt = make_optimizer(cfg, net.parameters())
    avg = SnapshotAverage(start=cfg.iterations - cfg.average_last * cfg.snapshot_every)
    log: list[dict] = []
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        avg.load_state_dict(state["average"])
        if avg.count == 0:  # averaging not begun: the run may be lengthened or shortened
            avg.start = cfg.iterations - cfg.average_last * cfg.snapshot_every
        log = json.loads(state["log"])
        start = int(state["iteration"])
        if "rng" in state:  # the data stream is seeded per pair; this covers any stochastic layer
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    identity = valset.evaluate(None, device)

    dataset = SyntheticPairDataset(scans, cfg.preset, cfg.seed, cfg.pair_pool)
    on_cpu = device.type == "cpu"
    if not on_cpu:
        dataset.to(device)  # on-device generation keeps the GPU busy without CPU workers
    loader = DataLoader(dataset, batch_size=cfg.batch_size,
                        sampler=_RangeSampler(start * cfg.batch_size, cfg.iterations * cfg.batch_size),
                        num_workers=cfg.workers if on_cpu else 0, worker_init_fn=_worker_init,
                        persistent_workers=False, prefetch_factor=4 if (on_cpu and cfg.workers) else None)
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, unit="it", desc="training", dynamic_ncols=True)
    net.train()
    it = start
    for fixed, moving, target, mask in loader:
        fixed, moving, target, mask = (t.to(device, non_blocking=True) for t in (fixed, moving, target, mask))
        pred = net(torch.cat((fixed, moving), dim=1))
        loss = masked_displacement_loss(pred, target, mask, cfg.loss)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"training diverged at iteration {it + 1} (loss {float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        row = {"iteration": it, "loss": loss.item(), "seconds": round(time.time() - t0, 3)}
        if it % cfg.snapshot_every == 0 and it > avg.start:
            avg.add(net.state_dict())
        if it % cfg.validate_every == 0 or it == cfg.iterations:
            row.update(valset.evaluate(net, device))
        log.append(row)
        if callback:
            callback(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", **({"val_mm": f"{row['epe_lung_mm']:.2f}"} if "epe_lung_mm" in row else {}))
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            _save_checkpoint(ckpt_path, net, opt, it, avg, log, cfg)
            _write_log(out_dir, log)
    if bar is not None:
        bar.close()

    final = UNet3D(net_cfg).to(device)
    final.load_state_dict(avg.average(net.state_dict()))
    figures = valset.evaluate(final, device)
    validation = {"identity": identity, "final_averaged": figures, "snapshots_averaged": avg.count,
                  "pairs": cfg.validation_pairs, "scan": val_file.name if val_file else files[-1].name}
    meta = {
        "method": cfg.method,
        "paper": eppenhof2018.PAPER if cfg.method == eppenhof2018.METHOD else "",
        "grid_size": cfg.grid,
        "normalisation": NORMALISATION,
        "synthesis_preset": PRESETS[cfg.preset].to_dict(),
        "training": {
            "config": cfg.to_dict(),
            "iterations": it,
            "scans": [{"file": f.name, "sha256": sha256(f)} for f in files],
            "validation_scan": ({"file": val_file.name, "sha256": sha256(val_file)} if val_file else None),
            "validation": validation,
            "seconds": log[-1]["seconds"] if log else 0.0,
            "device": str(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"deeplungreg": DeepLungRegLib.__version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
        },
    }
    model_path = save_model(out_dir, final.cpu(), meta)
    _write_log(out_dir, log)
    plot_curves(out_dir, log)
    return TrainResult(model_path, it, validation, log)
