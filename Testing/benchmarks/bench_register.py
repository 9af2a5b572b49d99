"""Benchmark: end-to-end ``register`` time by stage and peak memory on the full-size shared CT.

The 512×512×99 CPTAC chest CT is registered against a breathing-like deformed copy of
itself (``deeplungreg simulate`` motion), once with the shipped model. Prints a table; asserts
nothing. Run: ``.venv/bin/python Testing/benchmarks/bench_register.py [CT] [--model PATH]``.

Targets the issue reports against: <= 3 s for everything after loading, peak RSS <= 3 GB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "cptac_lscc_C3N-00247_chest_ct.nii.gz"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> int:
    from DeepLungRegLib.io import read_volume, to_int16_hu, write_image
    from DeepLungRegLib.modelfile import default_model_path, load_model
    from DeepLungRegLib.pipeline import landmark_errors, register_images
    from DeepLungRegLib.simulation import BreathingParams, simulate_pair

    ap = argparse.ArgumentParser()
    ap.add_argument("ct", nargs="?", default=str(DEFAULT_CT))
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    t = time.perf_counter()
    fixed = read_volume(a.ct)
    t_load = time.perf_counter() - t
    sim = simulate_pair(fixed, BreathingParams(n_landmarks=100, lattice_mm=3.0))
    moving = sim.moving
    rss_before = peak_rss_gb()
    net, meta = load_model(a.model)
    for _ in range(2):  # the first run warms up torch and SimpleITK thread pools
        t = time.perf_counter()
        res = register_images(fixed, moving, net, meta, "cpu", affine=True)
        after_load = time.perf_counter() - t
    t = time.perf_counter()
    out = ROOT / "runs" / "bench_register"
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(res.transform, str(out / "transform.h5"))
    write_image(to_int16_hu(res.warped), out / "warped.nii.gz")  # as deeplungreg register writes them
    write_image(res.jacobian, out / "jacobian.nii.gz")
    t_write = time.perf_counter() - t
    tre = landmark_errors(res.transform, sim.fixed_landmarks, sim.moving_landmarks, res.affine)

    print(f"image {fixed.GetSize()} spacing {tuple(round(s, 3) for s in fixed.GetSpacing())}; "
          f"model grid {meta['grid_size']}; torch threads {torch.get_num_threads()}")
    print(f"{'stage':<12}{'seconds':>10}")
    print(f"{'load':<12}{t_load:>10.3f}")
    for k, v in res.timings.items():
        print(f"{k:<12}{v:>10.3f}")
    print(f"{'write':<12}{t_write:>10.3f}")
    print(f"{'after load':<12}{after_load:>10.3f}   (register_images, target <= 3 s; ratio {after_load / 3.0:.2f})")
    print(f"{'+ write':<12}{after_load + t_write:>10.3f}")
    print(f"peak RSS {peak_rss_gb():.2f} GB (before registration, with the simulated pair: {rss_before:.2f} GB; "
          f"target <= 3 GB)")
    size_mb = (out / "transform.h5").stat().st_size / 1e6
    print(f"transform.h5 {size_mb:.1f} MB, lattice {res.stats['transform_lattice']['size']}, "
          f"mapping error vs upsampled field: max {res.stats['transform_mapping_error_mm']['max']:.2e} mm")
    print(f"TRE mean (mm): before {tre['before']['mean']:.2f}, affine {tre['affine']['mean']:.2f}, "
          f"after {tre['after']['mean']:.2f}; folding {res.stats['folding_percent']:.4f}%")
    print(f"lung mask fallback: {res.stats['lung_mask_fallback']}; min Jacobian {np.round(res.stats['jacobian_min'], 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
