"""Benchmark: ``eppenhof2018tps`` network forward and dense TPS evaluation at 96³, against the
``eppenhof2018`` U-Net forward at the same size, measured in the same run.

The paper (Eppenhof et al., SPIE 2018) reports 55 ± 5 ms per registration on an NVIDIA GTX Titan X,
the fastest method of our literature. Untrained networks (same work as trained ones) in eval mode on
random 2-channel inputs; each figure is the median of ``--repeats`` timed calls after one warm-up call
(the warm-up also builds the cached TPS matrices, timed separately as ``tps_first_call_ms``). CPU always,
CUDA too when available (synchronised around every call). Prints one JSON object; asserts nothing.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python Testing/benchmarks/bench_eppenhof2018tps.py [--grid 96]
[--width 8] [--unet-width 16] [--unet-depth 4] [--repeats 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls), milliseconds."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1e3 * (time.perf_counter() - t)

    first = once()
    return first, statistics.median(once() for _ in range(repeats))


def run(device: torch.device, a: argparse.Namespace) -> dict:
    from DeepLungRegLib.methods.eppenhof2018tps import TPSNet, TPSNetConfig
    from DeepLungRegLib.networks import UNet3D, UNetConfig
    from DeepLungRegLib.tps import tps_field

    torch.manual_seed(0)
    shape = (a.grid,) * 3
    x = torch.rand((1, 2, *shape), device=device)
    tps_net = TPSNet(TPSNetConfig(width=a.width, blocks=a.blocks)).to(device).eval()
    unet = UNet3D(UNetConfig(width=a.unet_width, depth=a.unet_depth, norm="batch")).to(device).eval()
    with torch.inference_mode():
        nodes = tps_net(x)
        _, net_ms = timed(lambda: tps_net(x), device, a.repeats)
        tps_first, tps_ms = timed(lambda: tps_field(nodes, shape), device, a.repeats)
        _, total_ms = timed(lambda: tps_field(tps_net(x), shape), device, a.repeats)
        _, unet_ms = timed(lambda: unet(x), device, a.repeats)
    return {
        "tps_net_forward_ms": round(net_ms, 2),
        "tps_dense_field_ms": round(tps_ms, 2),
        "tps_first_call_ms": round(tps_first, 2),
        "tps_net_plus_field_ms": round(total_ms, 2),
        "unet_eppenhof2018_forward_ms": round(unet_ms, 2),
        "ratio_tps_total_to_unet": round(total_ms / unet_ms, 3),
        "speedup_vs_unet": round(unet_ms / total_ms, 2),
        "nodes": list(nodes.shape[2:]),
        "parameters": {"tps_net": sum(p.numel() for p in tps_net.parameters()),
                       "unet": sum(p.numel() for p in unet.parameters())},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=96)
    ap.add_argument("--width", type=int, default=8, help="TPS network width (the recipe's default)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--unet-width", type=int, default=16, help="eppenhof2018 U-Net width (its recipe's default)")
    ap.add_argument("--unet-depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"grid": a.grid, "tps_width": a.width, "unet": {"width": a.unet_width, "depth": a.unet_depth},
           "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or
           platform.machine(), "paper_gpu_ms": "55 +- 5 (GTX Titan X)", "cpu": run(torch.device("cpu"), a)}
    if torch.cuda.is_available():
        out["cuda"] = {"device": torch.cuda.get_device_name(0), **run(torch.device("cuda"), a)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
