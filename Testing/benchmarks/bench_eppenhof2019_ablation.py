"""Progressive growing against training all at once (Eppenhof et al., IEEE TMI 2019, the paper's
central comparison): the same network, the same initial weights, the same synthetic pairs and the
same number of iterations; only ``--option progressive`` differs. Both models are then evaluated on
held-out synthetic pairs whose learned transform is the paper's Table I ``T_2`` scaled up (large
displacements), with the end-point error reported per bin of true displacement magnitude.

Usage (prints a Markdown table; ``--out`` also writes it to a file; runs continue with ``--resume``
semantics, so an interrupted benchmark picks up where it stopped):

    OMP_NUM_THREADS=1 python Testing/benchmarks/bench_eppenhof2019_ablation.py --grid 64 --depth 4 \\
        --iterations 3000 --delta 200 --Delta 600 --out docs/evaluation/eppenhof2019_ablation.md

Units: end-point errors and displacement magnitudes in mm on the test scan's network lattice;
folding = % of lattice voxels with a non-positive Jacobian determinant of the predicted field.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from DeepLungRegLib.fields import warp
from DeepLungRegLib.io import read_volume
from DeepLungRegLib.losses import jacobian_determinant
from DeepLungRegLib.modelfile import load_model
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.recipes import get_recipe
from DeepLungRegTrainingLib.recipes.base import pair_generator
from DeepLungRegTrainingLib.recipes.eppenhof2019 import grown_iteration
from DeepLungRegTrainingLib.synthesis import PRESETS, BSplineLevel, make_pair
from DeepLungRegTrainingLib.training import TrainConfig, train

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TRAIN = ["cptac_lscc_C3N-00247_chest_ct.nii.gz", "lidc_idri_0002.nii.gz", "lidc_idri_0314.nii.gz",
         "lungpetctdx_A0001_5mm.nii.gz", "lungpetctdx_A0002_8mm_B40f.nii.gz",
         "totalsegmentator_aorta_ct_cropped_1p5mm.nii.gz", "totalsegmentator_example_ct_3mm.nii.gz"]
VALIDATION = "lidc_idri_0001.nii.gz"
TEST = ["lidc_idri_0001.nii.gz", "elastix_3DCT_lung_baseline_small.mha"]
VARIANTS = (("progressive", "1"), ("baseline", "0"))


def scaled_preset(scale: float):
    """The ``eppenhof2019`` preset with the learned transform's ranges multiplied by ``scale``."""
    base = PRESETS["eppenhof2019"]
    learned = tuple(BSplineLevel(lv.points, tuple(r * scale for r in lv.range_xyz)) for lv in base.learned)
    return dataclasses.replace(base, name=f"eppenhof2019_x{scale:g}", learned=learned)


def test_pairs(paths: list[Path], grid: int, scales: list[float], per_scale: int, seed: int) -> list[dict]:
    """Held-out pairs: for every test scan and scale, ``per_scale`` pairs of the scaled preset (CPU)."""
    pairs = []
    for path in paths:
        scan = prepare_scan(read_volume(path), (grid,) * 3)
        image = torch.from_numpy(scan.image)[None, None]
        mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
        spacing = torch.tensor(scan.grid.spacing, dtype=torch.float32).view(1, 3, 1, 1, 1)
        for s_i, scale in enumerate(scales):
            for n in range(per_scale):
                p = make_pair(image, mask, scaled_preset(scale), pair_generator(seed + 1000 * s_i, n))
                lung = warp(p.mask, p.target, mode="nearest")[0, 0] > 0.5   # fixed-frame lung mask
                pairs.append({"scan": path.name, "scale": scale, "fixed": p.fixed, "moving": p.moving,
                              "target": p.target, "lung": lung, "spacing": spacing})
    return pairs


@torch.no_grad()
def evaluate(model: Path | None, pairs: list[dict], edges: list[float]) -> dict:
    """Per-bin mean EPE (mm) over lung voxels of all pairs; ``model=None`` is the identity (zero field)."""
    net = load_model(model)[0] if model is not None else None
    errs, mags, folds = [], [], []
    for p in pairs:
        u = torch.zeros_like(p["target"]) if net is None else net(torch.cat((p["fixed"], p["moving"]), 1))
        sp = p["spacing"]
        errs.append(((u - p["target"]) * sp).norm(dim=1)[0][p["lung"]])
        mags.append((p["target"] * sp).norm(dim=1)[0][p["lung"]])
        if net is not None:
            det = jacobian_determinant(u * sp, [float(v) for v in sp.flatten()])
            folds.append(float((det <= 0).float().mean()) * 100)
    e, m = torch.cat(errs), torch.cat(mags)
    bins = []
    for lo, hi in zip(edges, [*edges[1:], float("inf")], strict=True):
        sel = (m >= lo) & (m < hi)
        bins.append((float(e[sel].mean()) if sel.any() else float("nan"), int(sel.sum())))
    return {"bins": bins, "mean": float(e.mean()), "p95": float(torch.quantile(e, 0.95)),
            "folding": float(np.mean(folds)) if folds else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", type=Path, default=[DATA / f for f in TRAIN], help="training scans")
    ap.add_argument("--validation-image", type=Path, default=DATA / VALIDATION)
    ap.add_argument("--test-images", nargs="+", type=Path, default=[DATA / f for f in TEST])
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3, help="levels; the coarsest is grid / 2^(depth-1) (8 as the paper)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--delta", type=int, default=50, help="δ, transition length (iterations)")
    ap.add_argument("--Delta", type=int, default=150, help="Δ, a level's period (iterations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scales", default="1,1.5,2", help="multipliers of Table I's learned ranges for the test pairs")
    ap.add_argument("--pairs-per-scale", type=int, default=3)
    ap.add_argument("--bins", default="0,5,10,15,20,30", help="bin edges of the true displacement (mm)")
    ap.add_argument("--runs", type=Path, default=Path("runs/eppenhof2019_ablation"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    scales = [float(v) for v in a.scales.split(",")]
    edges = [float(v) for v in a.bins.split(",")]
    recipe = get_recipe("eppenhof2019")

    configs = {}
    for name, flag in VARIANTS:
        configs[name] = TrainConfig.for_method(
            "eppenhof2019", grid=a.grid, depth=a.depth, width=a.width, iterations=a.iterations, seed=a.seed,
            validate_every=max(1, a.iterations // 4), validation_pairs=2, checkpoint_every=50,
            snapshot_every=min(50, max(1, a.iterations // 40)),
            options={"progressive": flag, "delta": str(a.delta), "Delta": str(a.Delta)})
    inits = []
    for cfg in configs.values():           # the loop seeds torch with cfg.seed right before building
        torch.manual_seed(cfg.seed)
        inits.append(recipe.build_network(cfg).state_dict())
    same_init = all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])

    results = {}
    for name, cfg in configs.items():
        t0 = time.time()
        res = train(a.images, a.runs / name, cfg, validation_image=a.validation_image, resume=True, progress=False)
        log = res.log or []  # the training loop's own clock over every session (a resumed run included)
        results[name] = {"model": res.model_path,
                         "seconds": float(log[-1]["seconds"]) if log else time.time() - t0,
                         "val": res.validation["final_averaged"]["epe_lung_mm"]}
        print(f"{name}: trained in {results[name]['seconds']:.0f} s, validation EPE "
              f"{results[name]['val']:.2f} mm", flush=True)

    pairs = test_pairs(a.test_images, a.grid, scales, a.pairs_per_scale, a.seed + 2024)
    rows = {"identity": evaluate(None, pairs, edges)}
    for name in configs:
        rows[name] = evaluate(results[name]["model"], pairs, edges)

    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:], strict=False)] + [f"≥{edges[-1]:g}"]
    counts = rows["identity"]["bins"]
    lines = [
        f"Grid {a.grid}³, {a.depth} levels, width {a.width}, {a.iterations} iterations each, δ = {a.delta}, "
        f"Δ = {a.Delta} (fully grown from iteration {grown_iteration(a.depth, a.delta, a.Delta)}), seed {a.seed}; "
        f"identical initial weights: {same_init}; {len(a.images)} training scans; test pairs: "
        f"{', '.join(p.name for p in a.test_images)} × Table I T_2 scaled by {a.scales} × {a.pairs_per_scale}.",
        "",
        "Mean end-point error in the lung (mm) per bin of true displacement (mm; lung voxels per bin "
        "in the header):",
        "",
        "| model | " + " | ".join(f"{lab} ({n})" for lab, (_, n) in zip(labels, counts, strict=True))
        + " | all | p95 | folding % | train s | val EPE |",
        "|---" * (len(labels) + 6) + "|",
    ]
    for name, r in rows.items():
        cells = " | ".join(f"{v:.2f}" if n else "—" for v, n in r["bins"])
        extra = (f"{results[name]['seconds']:.0f} | {results[name]['val']:.2f}" if name in results else "— | —")
        lines.append(f"| {name} | {cells} | {r['mean']:.2f} | {r['p95']:.2f} | {r['folding']:.3f} | {extra} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(f"# eppenhof2019: progressive against all-at-once training ({a.grid}³)\n\n" + text
                         + "\n\n`train s`: the training loop's own clock (log.csv), summed over resumed sessions.\n")


if __name__ == "__main__":
    main()
