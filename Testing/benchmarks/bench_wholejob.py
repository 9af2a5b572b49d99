"""Benchmark (issue 14): the whole ``register`` job per stage, with peak RSS, against elastix.

Two breathing pairs made from the full-size shared CT (``deeplungreg simulate`` motion, written as
int16 HU files as scanners store them): the CT as it is (512×512×99) and the CT resampled to thin
slices (512×512×``--slices``, default 800). Each run is a spawned child process, so its wall time
and peak RSS (``ru_maxrss``) are its own: DeepLungReg runs ``run_register`` (read, register, write
every output and the QA picture) with ``--refine off`` and the default refine; elastix (itk-elastix,
the evaluation harness's lung parameters) registers and warps. Prints TRE, per-stage seconds, peak
RSS, the memory estimate of :func:`DeepLungRegLib.pipeline.estimated_peak_bytes` and the ratios to
elastix; asserts nothing.

Run: ``.venv/bin/python Testing/benchmarks/bench_wholejob.py [CT] [--slices 800] [--no-elastix-big]
[--no-elastix] [--only full|big]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "cptac_lscc_C3N-00247_chest_ct.nii.gz"
LEVELS = ("off", "full")


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ``ru_maxrss`` would report the parent's peak after fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _deeplungreg(folder: str, level: str) -> dict:
    import SimpleITK as sitk
    from DeepLungRegLib.modelfile import default_model_path
    from DeepLungRegLib.pipeline import RegisterOptions, peak_bytes, run_register

    f = Path(folder)
    t = time.perf_counter()
    out = f / f"out_{level}"
    report = run_register(RegisterOptions(
        fixed=str(f / "fixed.nii.gz"), moving=str(f / "moving.nii.gz"), output=str(out),
        model=default_model_path(), device="cpu", refine=level, fixed_landmarks=str(f / "fixed_landmarks.txt"),
        moving_landmarks=str(f / "moving_landmarks.txt"), landmark_format="lps", progress_bar=False))
    seconds = time.perf_counter() - t
    r = sitk.ImageFileReader()
    r.SetFileName(str(f / "fixed.nii.gz"))
    r.ReadImageInformation()
    n, width = int(np.prod(r.GetSize())), 2 if r.GetPixelID() == sitk.sitkInt16 else 4
    est = peak_bytes(n, n, width, width)  # both images have the fixed image's size here
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "estimate_mb": est / 2**20, "tre": report.tre_mm["after"],
            "folding_lung": report.stats["folding_percent_lung"], "stages": report.timings_s, "files": sizes}


def _elastix(folder: str) -> dict:
    import SimpleITK as sitk
    from DeepLungRegLib.baselines import elastix_register
    from DeepLungRegLib.io import read_volume
    from DeepLungRegLib.metrics import summarize, target_registration_error
    from DeepLungRegLib.preprocessing import lung_mask
    from DeepLungRegLib.transforms import transform_points

    f = Path(folder)
    t = time.perf_counter()
    fixed, moving = read_volume(f / "fixed.nii.gz"), read_volume(f / "moving.nii.gz")
    tx = elastix_register(fixed, moving, lung_mask(fixed).mask)
    sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -1000.0)  # the warped image, as ours writes
    seconds = time.perf_counter() - t
    fl, ml = np.loadtxt(f / "fixed_landmarks.txt"), np.loadtxt(f / "moving_landmarks.txt")
    tre = summarize(target_registration_error(transform_points(tx, fl), ml))
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "estimate_mb": float("nan"), "tre": tre,
            "folding_lung": float("nan"), "stages": {}, "files": {}}


def _make_pair(ct, folder: Path, slices: int | None) -> tuple:
    """A simulated pair (int16 files) of ``ct``, resampled first to ``slices`` slices over the same box."""
    import SimpleITK as sitk
    from DeepLungRegLib.io import write_lps_landmarks
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair

    if slices:
        size = list(ct.GetSize())
        sp = list(ct.GetSpacing())
        new_sp = sp[:2] + [sp[2] * size[2] / slices]
        m = np.asarray(ct.GetDirection()).reshape(3, 3)
        origin = np.asarray(ct.GetOrigin()) + m @ np.array([0, 0, (new_sp[2] - sp[2]) / 2])
        ct = sitk.Resample(ct, size[:2] + [slices], sitk.Transform(), sitk.sitkLinear, origin.tolist(), new_sp,
                           ct.GetDirection(), -1000.0, sitk.sitkFloat32)
    sim = simulate_pair(ct, BreathingParams(seed=0))
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in (("fixed", sim.fixed), ("moving", sim.moving)):
        sitk.WriteImage(sitk.Cast(sitk.Round(img), sitk.sitkInt16), str(folder / f"{name}.nii.gz"), True, 1)
    write_lps_landmarks(folder / "fixed_landmarks.txt", sim.fixed_landmarks)
    write_lps_landmarks(folder / "moving_landmarks.txt", sim.moving_landmarks)
    initial = np.linalg.norm(sim.fixed_landmarks - sim.moving_landmarks, axis=1)
    return sim.fixed.GetSize(), initial


def _table(title: str, rows: dict) -> None:
    print(f"\n## {title}")
    el = rows.get("elastix")
    print(f"{'method':<13}{'TRE mean':>9}{'p95':>7}{'time s':>8}{'peak RSS MB':>12}{'estimate MB':>12}"
          f"{'time/elastix':>13}{'elastix/time':>13}")
    for name, r in rows.items():
        ratio = f"{r['seconds'] / el['seconds']:>13.3f}{el['seconds'] / r['seconds']:>13.1f}" if el else ""
        print(f"{name:<13}{r['tre']['mean']:>9.2f}{r['tre']['p95']:>7.2f}{r['seconds']:>8.2f}{r['peak_rss_mb']:>12.0f}"
              f"{r['estimate_mb']:>12.0f}{ratio}")
    for name, r in rows.items():
        if r["stages"]:
            print(f"  {name} stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
            print(f"  {name} files (MB): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(r["files"].items())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", nargs="?", default=str(DEFAULT_CT))
    ap.add_argument("--slices", type=int, default=800)
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--no-elastix-big", action="store_true", help="skip elastix on the thin-slice pair")
    ap.add_argument("--only", choices=("full", "big"))
    a = ap.parse_args()
    import torch
    from DeepLungRegLib.io import read_volume

    ctx = mp.get_context("spawn")
    ct = read_volume(a.image)
    print(f"image {Path(a.image).name} {ct.GetSize()}; torch threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    pairs = [("full", None), ("big", a.slices)]
    for label, slices in pairs:
        if a.only and a.only != label:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            size, initial = _make_pair(ct, Path(tmp), slices)
            rows = {}
            for level in LEVELS:
                with ctx.Pool(1) as pool:
                    rows[f"refine {level}"] = pool.apply(_deeplungreg, (tmp, level))
            if not a.no_elastix and not (label == "big" and a.no_elastix_big):
                with ctx.Pool(1) as pool:
                    rows["elastix"] = pool.apply(_elastix, (tmp,))
        _table(f"{size[0]}x{size[1]}x{size[2]} pair: {len(initial)} landmarks, initial TRE {initial.mean():.2f} mm; "
               f"load average now {os.getloadavg()[0]:.2f}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
