"""Benchmark: ``register --refine off|fast|full`` against elastix on full-size breathing pairs.

The full-size shared CT (512×512×99 CPTAC chest CT) is paired with breathing-like exhale copies of
itself (``deeplungreg simulate`` motion; a typical and a larger amplitude at the lung bases). Each
run is a child process (spawned), so its wall time and peak RSS are its own: DeepLungReg runs the
whole ``register`` job (read, register, write every output), elastix (itk-elastix, lung parameters
of the evaluation harness) registers and warps. Prints TRE, folding, time per stage, peak RSS and
the ratios to elastix; asserts nothing.

Run: ``.venv/bin/python Testing/benchmarks/bench_refine.py [CT] [--amplitudes 20 35] [--no-elastix]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "cptac_lscc_C3N-00247_chest_ct.nii.gz"
LEVELS = ("off", "fast", "full")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _deeplungreg(folder: str, level: str) -> dict:
    from DeepLungRegLib.modelfile import default_model_path
    from DeepLungRegLib.pipeline import RegisterOptions, run_register

    f = Path(folder)
    t = time.perf_counter()
    report = run_register(RegisterOptions(
        fixed=str(f / "fixed.nii.gz"), moving=str(f / "moving.nii.gz"), output=str(f / f"out_{level}"),
        model=default_model_path(), device="cpu", refine=level, fixed_landmarks=str(f / "fixed_landmarks.txt"),
        moving_landmarks=str(f / "moving_landmarks.txt"), landmark_format="lps", progress_bar=False))
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb(), "tre": report.tre_mm["after"],
            "folding_lung": report.stats["folding_percent_lung"], "folding": report.stats["folding_percent"],
            "stages": report.timings_s}


def _elastix(folder: str) -> dict:
    import SimpleITK as sitk
    from DeepLungRegLib.baselines import elastix_register
    from DeepLungRegLib.io import read_volume
    from DeepLungRegLib.metrics import (
        folding_percent,
        jacobian_determinant,
        summarize,
        target_registration_error,
    )
    from DeepLungRegLib.preprocessing import lung_mask
    from DeepLungRegLib.transforms import transform_points

    f = Path(folder)
    t = time.perf_counter()
    fixed, moving = read_volume(f / "fixed.nii.gz"), read_volume(f / "moving.nii.gz")
    lm = lung_mask(fixed)
    tx = elastix_register(fixed, moving, lm.mask)
    sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -1000.0)  # the warped image, as ours writes
    seconds = time.perf_counter() - t
    fl, ml = np.loadtxt(f / "fixed_landmarks.txt"), np.loadtxt(f / "moving_landmarks.txt")
    tre = summarize(target_registration_error(transform_points(tx, fl), ml))
    # folding on a 2 mm grid over the fixed lung box (as the evaluation harness)
    ref = sitk.Resample(lm.mask, lm.mask, sitk.Transform(), sitk.sitkNearestNeighbor)
    disp = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                             ref.GetSpacing(), ref.GetDirection())
    arr = np.moveaxis(sitk.GetArrayFromImage(disp), -1, 0)
    det = jacobian_determinant(arr, ref.GetSpacing(), ref.GetDirection())
    lung = sitk.GetArrayFromImage(ref) > 0
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "tre": tre,
            "folding_lung": folding_percent(det, lung), "folding": folding_percent(det), "stages": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", nargs="?", default=str(DEFAULT_CT))
    ap.add_argument("--amplitudes", type=float, nargs="+", default=[20.0, 35.0])
    ap.add_argument("--no-elastix", action="store_true")
    a = ap.parse_args()
    import SimpleITK as sitk
    import torch
    from DeepLungRegLib.io import read_volume, write_lps_landmarks
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair

    ctx = mp.get_context("spawn")
    ct = read_volume(a.image)
    print(f"image {Path(a.image).name} {ct.GetSize()} spacing {tuple(round(s, 3) for s in ct.GetSpacing())}; "
          f"torch threads {torch.get_num_threads()}")
    for amp in a.amplitudes:
        sim = simulate_pair(ct, BreathingParams(amplitude_base=amp, seed=int(amp)))
        initial = np.linalg.norm(sim.fixed_landmarks - sim.moving_landmarks, axis=1)
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            sitk.WriteImage(sim.fixed, str(Path(tmp) / "fixed.nii.gz"))
            sitk.WriteImage(sim.moving, str(Path(tmp) / "moving.nii.gz"))
            write_lps_landmarks(Path(tmp) / "fixed_landmarks.txt", sim.fixed_landmarks)
            write_lps_landmarks(Path(tmp) / "moving_landmarks.txt", sim.moving_landmarks)
            for level in LEVELS:
                with ctx.Pool(1) as pool:
                    rows[f"refine {level}"] = pool.apply(_deeplungreg, (tmp, level))
            if not a.no_elastix:
                with ctx.Pool(1) as pool:
                    rows["elastix"] = pool.apply(_elastix, (tmp,))
        print(f"\n## amplitude {amp:.0f} mm at the bases: {len(initial)} landmarks, initial TRE "
              f"{initial.mean():.2f} ± {initial.std():.2f} mm (max {initial.max():.1f})")
        print(f"{'method':<13}{'TRE mean':>9}{'p95':>7}{'max':>7}{'fold lung %':>12}{'fold %':>9}{'time s':>8}"
              f"{'peak RSS MB':>12}{'time/elastix':>13}{'TRE/elastix':>12}")
        el = rows.get("elastix")
        for name, r in rows.items():
            ratio_t = f"{r['seconds'] / el['seconds']:>13.3f}" if el else ""
            ratio_e = f"{r['tre']['mean'] / el['tre']['mean']:>12.2f}" if el else ""
            print(f"{name:<13}{r['tre']['mean']:>9.2f}{r['tre']['p95']:>7.2f}{r['tre']['max']:>7.2f}"
                  f"{r['folding_lung']:>12.4f}{r['folding']:>9.4f}{r['seconds']:>8.2f}{r['peak_rss_mb']:>12.0f}"
                  f"{ratio_t}{ratio_e}")
        for name, r in rows.items():
            if r["stages"]:
                print(f"  {name} stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
