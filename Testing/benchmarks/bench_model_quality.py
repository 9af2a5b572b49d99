"""Benchmark: an ``eppenhof2018``-style model's end-point error on held-out synthetic pairs.

Pairs are generated (the model's own preset: a stored preset without ``control`` predates grid point
fields and is read as ``eppenhof2018_coefficients``) from the scan held out of training, with a seed
different from the one used for validation during training, and the mean end-point error
inside the lung (mm) is printed for the identity and for the model. Asserts nothing.
Run: ``.venv/bin/python Testing/benchmarks/bench_model_quality.py [--scan PATH] [--pairs 16]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from DeepLungRegLib.io import read_volume
from DeepLungRegLib.model_catalog import resource_path
from DeepLungRegLib.modelfile import load_model
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.recipes.eppenhof2018 import ValidationSet

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(resource_path("Models/eppenhof2018")))
    ap.add_argument("--scan", default=str(ROOT.parent / "shared" / "data" / "elastix_3DCT_lung_baseline_small.mha"))
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2024)
    a = ap.parse_args()
    net, meta = load_model(a.model)
    if meta.get("method") not in ("eppenhof2018", "eppenhof2019"):
        ap.error(f"{a.model}: a {meta.get('method')} model; this benchmark takes eppenhof2018/2019 models "
                 "(one network on the concatenated pair)")
    scan = prepare_scan(read_volume(a.scan), int(meta["grid_size"]))
    stored = meta.get("synthesis_preset", {})
    preset = stored.get("name", "eppenhof2018")
    if "control" not in stored and preset == "eppenhof2018":
        preset = "eppenhof2018_coefficients"
    val = ValidationSet.build(scan, preset, a.pairs, a.seed)
    cpu = torch.device("cpu")
    ident, model = val.evaluate(None, cpu), val.evaluate(net, cpu)
    print(f"scan {Path(a.scan).name}, {a.pairs} pairs ({preset}, seed {a.seed}), grid {meta['grid_size']}")
    print(f"{'':<10}{'EPE lung mm':>12}{'EPE at 300 points mm':>22}")
    print(f"{'identity':<10}{ident['epe_lung_mm']:>12.2f}{ident['epe_points_mm']:>22.2f}")
    print(f"{'model':<10}{model['epe_lung_mm']:>12.2f}{model['epe_points_mm']:>22.2f}")
    print(f"reduction: {100 * (1 - model['epe_lung_mm'] / ident['epe_lung_mm']):.0f}%")
    # is each motion component learned? mean |target| and mean |error| per grid axis, in the lung
    print("per component in the lung (grid axes i, j, k = the fixed image's x, y, z), mm:")
    print(f"{'pairs':<12}{'|target| x / y / z':>24}{'|error| x / y / z':>24}{'error/target':>20}")
    for name, pairs in (("B-spline", [(val.fixed[i:i + 1], val.moving[i:i + 1], val.target[i:i + 1],
                                       val.mask[i:i + 1] > 0) for i in range(len(val.fixed))]),
                        ("breathing", [(b.fixed, b.moving, b.target, b.fixed_mask > 0.5) for b in val.breathing])):
        tgt, err = torch.zeros(3), torch.zeros(3)
        n = 0
        with torch.no_grad():
            for f, m, t, mask in pairs:
                pred = net.eval()(torch.cat((f, m), 1))
                sel = mask[0, 0]
                mm = val.spacing.view(3, 1, 1, 1)
                tgt += (t[0] * mm).abs()[:, sel].sum(1)
                err += ((pred[0] - t[0]) * mm).abs()[:, sel].sum(1)
                n += int(sel.sum())
        tgt, err = tgt / max(n, 1), err / max(n, 1)
        fmt = lambda v: " / ".join(f"{float(x):.2f}" for x in v)  # noqa: E731
        print(f"{name:<12}{fmt(tgt):>24}{fmt(err):>24}{fmt(err / tgt):>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
