"""The generic training loop: any method's recipe, exact resume, snapshot averaging, validation,
logging, checkpoints and data-parallel workers.

What is trained (pairs, network, loss, defaults) comes from the method's recipe
(:mod:`.recipes`). Pair ``n`` of a run (``n = iteration * batch_size + b``) is generated from
``(seed, n)`` alone, so the data stream does not depend on worker processes, devices, the
number of data-parallel workers or interruptions: a resumed run sees the same pairs as an
uninterrupted one. Checkpoints (network, optimiser, snapshot average, log, iteration, RNG)
are written atomically by rank 0; ``resume=True`` continues from the last one.
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed
from .recipes import eppenhof2018, get_recipe

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img")
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    method: str = eppenhof2018.METHOD
    preset: str = eppenhof2018.SYNTHESIS_PRESET
    grid: int | list[int] = eppenhof2018.GRID     # G (a G³ lattice) or [i, j, k] sizes
    iterations: int = 10000
    batch_size: int = 1
    optimizer: str = eppenhof2018.OPTIMIZER       # adagrad | sgd | adam
    lr: float = eppenhof2018.LEARNING_RATE
    momentum: float = 0.5                         # for sgd
    loss: str = eppenhof2018.LOSS                 # l1 | l2
    snapshot_every: int = eppenhof2018.SNAPSHOT_EVERY
    average_last: int | None = None               # snapshots averaged; None: the paper's last ~10.5 %
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
    options: dict = field(default_factory=dict)   # method-specific settings (``--option KEY=VALUE``), checked by the recipe

    @classmethod
    def for_method(cls, method: str, **given) -> TrainConfig:
        """A configuration with ``method``'s recipe defaults, overridden by the ``given`` values that are not None."""
        recipe = get_recipe(method)
        values = {**recipe.defaults, **{k: v for k, v in given.items() if v is not None}}
        return cls(method=method, **values)

    def grid_size(self) -> tuple[int, int, int]:
        """The lattice size ``(i, j, k)``."""
        g = self.grid
        return (int(g),) * 3 if isinstance(g, int) else tuple(int(v) for v in g)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """One-line :class:`InputError` for settings no run can use."""
        positive = ("iterations", "batch_size", "snapshot_every", "validate_every", "validation_pairs",
                    "checkpoint_every", "width", "depth")
        grid = self.grid if isinstance(self.grid, list | tuple) else [self.grid]
        if len(grid) not in (1, 3) or not all(isinstance(g, int) and not isinstance(g, bool) and 8 <= g <= 256
                                              for g in grid):
            raise InputError(f"--grid must be one whole number or three (i,j,k) in [8, 256], got {self.grid!r}")
        if not isinstance(self.options, dict):
            raise InputError("options must be a mapping of names to values")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.average_last is not None and self.average_last < 1:
            raise InputError(f"--average-last must be >= 1, got {self.average_last}")
        if self.workers < 0 or self.pair_pool < 0:
            raise InputError("--workers and --pair-pool must be >= 0")

    def averaged_snapshots(self) -> int:
        """How many of the last snapshots make the final weights."""
        if self.average_last is not None:
            return max(1, self.average_last)
        return max(1, round(eppenhof2018.AVERAGED_FRACTION * self.iterations / self.snapshot_every))

    def average_start(self) -> int:
        """Snapshots taken after this iteration are averaged."""
        return max(0, self.iterations - self.averaged_snapshots() * self.snapshot_every)


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


class _RangeSampler(torch.utils.data.Sampler):
    """Pair indices ``start, start + step, ... < stop`` (``step`` = number of data-parallel workers)."""

    def __init__(self, start: int, stop: int, step: int = 1) -> None:
        self.range = range(start, stop, step)

    def __iter__(self):
        return iter(self.range)

    def __len__(self) -> int:
        return len(self.range)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


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


def _resumed_average(avg: SnapshotAverage, wanted_start: int, resumed_at: int, every: int,
                     wanted: int) -> SnapshotAverage:
    """The snapshot average to continue with when a run is resumed, possibly with another length or
    ``--average-last`` (another window: the snapshots, taken every ``every`` iterations, after
    ``wanted_start``). Two starts hold the same snapshots when ``start // every`` agrees. A running mean
    cannot drop snapshots, so the checkpoint's average is kept when all of its snapshots lie in the new
    window, else a new one starts at the resume point (or at the window, if that is still ahead). A
    warning says when snapshots of the window are missing (taken before the average began, or dropped
    with an older one): never an older snapshot than asked; the metadata records what was averaged."""
    import warnings

    def q(start: int) -> int:
        return start // every

    if avg.count > 0 and q(avg.start) >= q(wanted_start):
        kept, missing = avg, q(avg.start) - q(wanted_start)
        if missing == 0:
            kept.start = wanted_start
    else:
        missing = max(0, q(resumed_at) - q(wanted_start))
        kept = SnapshotAverage(start=wanted_start if missing == 0 else resumed_at)
    if missing:
        warnings.warn(f"the snapshot-averaging window changed on resume (now after iteration {wanted_start}, was "
                      f"{avg.start}): {missing} of its snapshots are not available, so the final weights average "
                      f"fewer than the {wanted} snapshots asked for", stacklevel=2)
    return kept


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
    for row in log:  # recipe-specific columns (e.g. the level being trained), in order of appearance
        keys += [k for k in row if k not in keys]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for row in log:
        w.writerow(row)
    atomic_write_bytes(out_dir / "log.csv", buf.getvalue().encode())
    atomic_write_bytes(out_dir / "log.json", json.dumps(log, indent=1).encode())


def plot_curves(out_dir: Path, log: list[dict]) -> None:
    """``curves.png``: training loss and validation error, plus, when the recipe logs them, the
    training schedule's ``alpha_*`` weights (e.g. eppenhof2019's level blending) and the other
    validation columns ending in ``_mm`` (e.g. breathing pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in log if r.get("loss") is not None]
    loss = [r["loss"] for r in log if r.get("loss") is not None]
    val = [(r["iteration"], r["epe_lung_mm"]) for r in log if r.get("epe_lung_mm") is not None]
    columns: list[str] = []
    for r in log:
        columns += [k for k in r if k not in columns]
    alphas = [k for k in columns if k.startswith("alpha_")]
    extra_val = [k for k in columns if k.endswith("_mm") and k not in ("epe_lung_mm", "epe_points_mm")]
    fig, ax = plt.subplots(1, 3 if alphas else 2, figsize=(15 if alphas else 10, 4))
    if loss:
        k = max(1, len(loss) // 200)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax[0].plot(its, loss, alpha=0.3, lw=0.5)
        ax[0].plot(its[k - 1 :], smooth)
    ax[0].set(xlabel="iteration", ylabel="masked loss (voxels)", title="training loss", yscale="log")
    if val:
        ax[1].plot(*zip(*val, strict=True), marker="o", label="synthetic pairs (lung)")
    for key in extra_val:
        pts = [(r["iteration"], r[key]) for r in log if r.get(key) is not None]
        if pts:
            ax[1].plot(*zip(*pts, strict=True), marker=".", label=key)
    if extra_val:
        ax[1].legend(fontsize=8)
    ax[1].set(xlabel="iteration", ylabel="mean end-point error in lung (mm)", title="validation")
    if alphas:
        for key in alphas:
            pts = [(r["iteration"], r[key]) for r in log if r.get(key) is not None]
            if pts:
                ax[2].plot(*zip(*pts, strict=True), label=key)
        ax[2].set(xlabel="iteration", ylabel="weight", title="training schedule", ylim=(-0.05, 1.05))
        ax[2].legend(fontsize=8)
    fig.tight_layout()
    tmp = out_dir / ".curves.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_dir / "curves.png")


# --------------------------------------------------------------------------- main entry
def train(images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, cfg: TrainConfig,
          validation_image: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.method`` on pairs from ``images`` and write ``out_dir/model.safetensors``.

    ``validation_image`` is held out for validation; without it the last image is held out
    when there are at least two, else validation uses pairs of the training scan.
    ``callback`` receives each log row (for GUIs). Returns the averaged model's figures.
    Under torchrun (``WORLD_SIZE`` > 1) each worker trains on its share of every global batch.
    """
    from DeepLungRegLib.modelfile import resolve_device

    cfg.validate()
    recipe = get_recipe(cfg.method)
    recipe.validate_config(cfg)
    ctx = distributed.context_from_env()
    if cfg.batch_size % ctx.world:
        raise InputError(f"batch size {cfg.batch_size} must be a multiple of the {ctx.world} workers")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output exists and is not a folder")
    files = list_volumes(images)
    val_file = Path(validation_image) if validation_image else (files.pop() if len(files) >= 2 else None)
    if not files:
        raise InputError("no training images")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ctx.active:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with _OutputLock(out_dir, ctx.is_main):
        return _train_locked(recipe, cfg, ctx, device, out_dir, files, val_file, resume, progress, callback)


class _OutputLock:
    """``OUT/.training.lock`` (process id and host) held while a run writes into OUT; a second run is
    refused with who holds it. A lock whose process is gone (same host) is taken over."""

    def __init__(self, out_dir: Path, active: bool) -> None:
        self.path, self.active, self.held = out_dir / ".training.lock", active, False

    def __enter__(self) -> _OutputLock:
        if not self.active:
            return self
        me = f"{os.getpid()} {platform.node()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                pid, _, host = holder.partition(" ")
                if host == platform.node() and pid.isdigit() and not _alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise InputError(f"{self.path.parent}: another training is writing here "
                                 f"(process {pid or '?'} on {host or '?'}); wait for it or choose another -o") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise InputError(f"{self.path}: cannot take the training lock")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint of an earlier run, or a one-line error for an empty or damaged file."""
    if path.stat().st_size == 0:
        raise InputError(f"{path}: checkpoint is empty (interrupted while written?); delete it to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(state["config"])
        for key in ("model", "optimizer", "iteration", "average", "log"):
            state[key]
    except Exception as exc:  # noqa: BLE001 - corruption shows up as many exception types
        raise InputError(f"{path}: checkpoint is damaged ({type(exc).__name__}); delete it to start over") from None
    return state


def _train_locked(recipe, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device, out_dir: Path,
                  files: list[Path], val_file: Path | None, resume: bool, progress: bool,
                  callback: Callable[[dict], None] | None) -> TrainResult:
    ckpt_path = out_dir / CHECKPOINT
    state = None
    if resume and ckpt_path.exists():
        state = _read_checkpoint(ckpt_path)
        saved = {**TrainConfig().to_dict(), **json.loads(state["config"])}
        for k in ("method", "grid", "width", "depth", "norm", "preset", "seed", "batch_size", "optimizer", "loss",
                  "pair_pool", "options"):
            mine = list(cfg.grid) if k == "grid" and isinstance(cfg.grid, tuple) else getattr(cfg, k)
            if saved[k] != mine:
                raise InputError(f"--resume: checkpoint has {k}={saved[k]!r}, this run {getattr(cfg, k)!r}")

    scans = [_prepare(recipe, f, cfg) for f in files]
    val_scan = _prepare(recipe, val_file, cfg) if val_file else scans[-1]
    valset = recipe.validator(val_scan, cfg) if ctx.is_main else None

    distributed.init(ctx, device)
    try:
        return _loop(recipe, cfg, ctx, device, scans, valset, out_dir, files, val_file, state, progress, callback)
    finally:
        distributed.shutdown(ctx)


def _prepare(recipe, path: Path, cfg: TrainConfig):
    """One scan through the recipe's preparation; a refusal names the file."""
    try:
        return recipe.prepare(read_volume(path), cfg)
    except InputError as exc:
        raise InputError(f"{path.name}: {exc}") from None


def _loop(recipe, cfg: TrainConfig, ctx: distributed.DistContext, device: torch.device, scans, valset,
          out_dir: Path, files: list[Path], val_file: Path | None, state: dict | None, progress: bool,
          callback: Callable[[dict], None] | None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    net = recipe.build_network(cfg).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.active else net
    opt = make_optimizer(cfg, net.parameters())
    avg = SnapshotAverage(start=cfg.average_start())
    log: list[dict] = []
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        avg.load_state_dict(state["average"])
        log = json.loads(state["log"])
        start = int(state["iteration"])
        avg = _resumed_average(avg, cfg.average_start(), start, cfg.snapshot_every, cfg.averaged_snapshots())
        if "rng" in state:  # the data stream is seeded per pair; this covers any stochastic layer
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    identity = valset.evaluate(None, device) if valset is not None else {}

    dataset = recipe.dataset(scans, cfg)
    on_cpu = device.type == "cpu"
    if not on_cpu and hasattr(dataset, "to"):
        dataset.to(device)  # on-device generation keeps the GPU busy without CPU workers
    loader = DataLoader(dataset, batch_size=cfg.batch_size // ctx.world,
                        sampler=_RangeSampler(start * cfg.batch_size + ctx.rank, cfg.iterations * cfg.batch_size,
                                              ctx.world),
                        num_workers=cfg.workers if on_cpu else 0, worker_init_fn=_worker_init,
                        persistent_workers=False, prefetch_factor=4 if (on_cpu and cfg.workers) else None)
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=start, unit="it", desc="training", dynamic_ncols=True)
    model.train()
    it = start
    ckpt_path = out_dir / CHECKPOINT
    for batch in loader:
        batch = [t.to(device, non_blocking=True) for t in batch]
        extra = recipe.before_step(net, it + 1, cfg)
        loss = recipe.loss(model, batch, cfg)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"training diverged at iteration {it + 1} (loss {float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = recipe.learning_rate(it + 1, cfg)
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.step()
        it += 1
        row = {"iteration": it, "loss": distributed.mean_across(ctx, loss.item()),
               "seconds": round(time.time() - t0, 3), **extra}
        if it % cfg.snapshot_every == 0 and it > avg.start:
            avg.add(net.state_dict())
        if not ctx.is_main:
            continue
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
    model_path = out_dir / "model.safetensors"
    if not ctx.is_main:
        distributed.barrier(ctx)
        return TrainResult(model_path, it, {}, [])

    final = recipe.build_network(cfg).to(device)
    final.load_state_dict(avg.average(net.state_dict()))
    figures = valset.evaluate(final, device)
    validation = {"identity": identity, "final_averaged": figures, "snapshots_averaged": avg.count,
                  "averaged_from_iteration": avg.start,
                  "pairs": cfg.validation_pairs, "scan": val_file.name if val_file else files[-1].name}
    meta = {
        **recipe.metadata(cfg),
        "training": {
            "config": cfg.to_dict(),
            "iterations": it,
            "workers": ctx.world,
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
    try:
        plot_curves(out_dir, log)
    except Exception as exc:  # noqa: BLE001 - a missing plot never fails a finished training
        import warnings

        warnings.warn(f"training curves not plotted ({type(exc).__name__}: {exc})", stacklevel=1)
    distributed.barrier(ctx)
    return TrainResult(model_path, it, validation, log)
