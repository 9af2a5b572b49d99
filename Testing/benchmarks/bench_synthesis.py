"""Benchmark: synthetic-pair generation rate and training speed on this machine.

Prints pairs per second at 64³ and 128³ (target: >= 3 pairs/s at 128³ on a 2-core CPU), with
the half-resolution field evaluation (default at 128³) and the full-resolution one as the
baseline measured in the same run, then training iterations per second for the U-Net
configurations of the shipped model. Asserts nothing.
Run: ``.venv/bin/python Testing/benchmarks/bench_synthesis.py``.
"""

from __future__ import annotations

import sys
import time

import torch
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegTrainingLib.losses import masked_displacement_loss
from DeepLungRegTrainingLib.synthesis import PRESETS, make_pair


def rate(fn, seconds: float = 6.0) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> int:
    g = torch.Generator().manual_seed(0)
    preset = PRESETS["eppenhof2018"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'grid':>6} {'field grid':>10} {'pairs/s':>8}")
    results = {}
    for grid, scales in ((64, (1,)), (128, (1, 2))):
        img = torch.rand(1, 1, grid, grid, grid)
        mask = (img > 0.5).float()
        for scale in scales:
            r = rate(lambda img=img, mask=mask, scale=scale: make_pair(img, mask, preset, g, scale))
            results[(grid, scale)] = r
            print(f"{grid:>6} {grid // scale:>10} {r:>8.2f}")
    print(f"128³ half-resolution fields vs full: x{results[(128, 2)] / results[(128, 1)]:.2f}; "
          f"target 3 pairs/s: ratio {results[(128, 2)] / 3.0:.2f}")
    print(f"{'grid':>6} {'width':>6} {'depth':>6} {'train it/s':>10}")
    for grid, width, depth in ((64, 16, 4), (128, 16, 4)):
        net = UNet3D(UNetConfig(width=width, depth=depth))
        opt = torch.optim.Adagrad(net.parameters(), lr=1e-2)
        img = torch.rand(1, 1, grid, grid, grid)
        pair = make_pair(img, torch.ones_like(img), preset, g)

        def step(net=net, opt=opt, pair=pair):
            pred = net(torch.cat((pair.fixed, pair.moving), dim=1))
            loss = masked_displacement_loss(pred, pair.target, pair.mask)
            opt.zero_grad()
            loss.backward()
            opt.step()

        print(f"{grid:>6} {width:>6} {depth:>6} {rate(step, 10.0):>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
