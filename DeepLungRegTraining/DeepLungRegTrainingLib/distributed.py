"""Data-parallel training with ``torch.distributed`` (DistributedDataParallel).

``deeplungreg train --nproc N`` relaunches itself through torch's own launcher (torchrun,
``python -m torch.distributed.run --standalone``) with N workers: gloo on the CPU, nccl on
CUDA (one GPU per worker). Each worker generates its share of every global batch (pair
``n`` from ``(seed, n)``, rank-strided: rank ``r`` of ``W`` takes ``n ≡ r (mod W)``), DDP
averages the gradients, and only rank 0 validates and writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The worker's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    return DistContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))


def init(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (gloo for CPU, nccl for CUDA) if this is a multi-worker job."""
    if ctx.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown(ctx: DistContext) -> None:
    """Leave the process group. Every worker first waits for the others and frees what still refers to
    the group (DistributedDataParallel's reducer and its pending gloo work): gloo work objects left for
    interpreter finalisation abort the process (SIGABRT, "terminate called without an active exception")."""
    if ctx.active and dist.is_initialized():
        import gc

        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def mean_across(ctx: DistContext, value: float) -> float:
    """Mean of a scalar over the workers (for logging the global batch's loss)."""
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / ctx.world


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``deeplungreg`` with ``argv`` in ``nproc`` workers through torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "DeepLungRegLib.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
