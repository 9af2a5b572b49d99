"""Small-scale reproduction of Hering et al. 2021's level ablation (Table 2: single level vs 2 and 3
levels): the same scans, seed, pairs and number of iterations, only ``--option levels`` differs;
each model is evaluated on breathing pairs of a held-out scan with known dense motion.

Usage (writes the table to stdout and, with --out, to a Markdown file):

    python Testing/benchmarks/bench_hering2021_ablation.py --grid 48 --iterations 600 \
        --out docs/evaluation/hering2021_ablation.md
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from DeepLungRegLib.io import read_volume
from DeepLungRegLib.modelfile import load_model
from DeepLungRegLib.preprocessing import prepare_scan
from DeepLungRegTrainingLib.breathing import BreathingRanges, make_breathing_pair, sample_field
from DeepLungRegTrainingLib.recipes.base import pair_generator
from DeepLungRegTrainingLib.training import TrainConfig, train

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TRAIN = ["cptac_lscc_C3N-00247_chest_ct.nii.gz", "lidc_idri_0002.nii.gz", "lidc_idri_0314.nii.gz",
         "lungpetctdx_A0001_5mm.nii.gz", "lungpetctdx_A0002_8mm_B40f.nii.gz",
         "totalsegmentator_aorta_ct_cropped_1p5mm.nii.gz", "totalsegmentator_example_ct_3mm.nii.gz"]
VALIDATION = "lidc_idri_0001.nii.gz"
TEST = ["elastix_3DCT_lung_baseline_small.mha", "lidc_idri_0001.nii.gz"]


def evaluate(model: Path, grid: tuple[int, int, int], amplitudes, seed: int = 2024) -> dict:
    """Mean and p95 end-point error (mm) in the fixed lung and at keypoints, and % folded voxels
    (negative Jacobian determinant of the predicted field), over the test pairs."""
    from DeepLungRegLib.losses import jacobian_determinant

    net, _ = load_model(model)
    epe, kp, fold, start = [], [], [], []
    for name in TEST:
        scan = prepare_scan(read_volume(DATA / name), grid)
        image = torch.from_numpy(scan.image)[None, None]
        mask = torch.from_numpy(scan.mask.astype(np.float32))[None, None]
        sp = torch.tensor(scan.grid.spacing).view(1, 3, 1, 1, 1)
        for i, amp in enumerate(amplitudes):
            p = make_breathing_pair(image, mask, scan.grid, BreathingRanges(), pair_generator(seed, i),
                                    amplitude=float(amp), swap=bool(i % 2))
            with torch.no_grad():
                u = net(p.fixed, p.moving)
            lung = p.fixed_mask[0, 0] > 0.5
            e = ((u - p.target) * sp).norm(dim=1)[0][lung]
            epe.append(e)
            start.append((p.target * sp).norm(dim=1)[0][lung])
            mapped = p.fixed_points + sample_field(u, p.fixed_points)
            kp.append(((mapped - p.moving_points) * sp.view(1, 3)).norm(dim=1))
            det = jacobian_determinant(u * sp, scan.grid.spacing)
            fold.append(float((det <= 0).float().mean()) * 100)
    e, k, s = torch.cat(epe), torch.cat(kp), torch.cat(start)
    return {"start_mm": float(s.mean()), "epe_mm": float(e.mean()), "epe_p95_mm": float(torch.quantile(e, 0.95)),
            "keypoints_mm": float(k.mean()), "folding_percent": float(np.mean(fold))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=48)
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--runs", default="runs/hering2021_ablation")
    ap.add_argument("--amplitudes", default="10,20,30")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    amplitudes = [float(v) for v in a.amplitudes.split(",")]
    rows = []
    for levels in (int(v) for v in a.levels.split(",")):
        per = [math.ceil(a.iterations / levels)] * levels
        per[-1] = a.iterations - sum(per[:-1])
        cfg = TrainConfig.for_method("hering2021", grid=a.grid, iterations=a.iterations, validate_every=a.iterations,
                                     validation_pairs=2, checkpoint_every=100,
                                     options={"levels": str(levels), "level_iterations": ",".join(map(str, per))})
        out = Path(a.runs) / f"levels{levels}"
        t0 = time.time()
        res = train([DATA / f for f in TRAIN], out, cfg, validation_image=DATA / VALIDATION, resume=True,
                    progress=False)
        seconds = time.time() - t0
        figures = evaluate(res.model_path, (a.grid,) * 3, amplitudes)
        rows.append({"levels": levels, "train_s": seconds, **figures})
        print(rows[-1], flush=True)
    lines = [f"Grid {a.grid}³, {a.iterations} iterations per model (split evenly between the levels), "
             f"{len(TRAIN)} training scans, test pairs: {', '.join(TEST)} × amplitudes {a.amplitudes} mm "
             "(breathing generator, alternating direction).", "",
             "| levels | EPE lung mean (mm) | EPE lung p95 (mm) | keypoints (mm) | folding % | initial (mm) | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['levels']} | {r['epe_mm']:.2f} | {r['epe_p95_mm']:.2f} | {r['keypoints_mm']:.2f} | "
                     f"{r['folding_percent']:.3f} | {r['start_mm']:.2f} | {r['train_s']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("# hering2021: level ablation (small scale)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
