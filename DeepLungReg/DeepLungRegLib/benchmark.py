"""``deeplungreg benchmark``: DeepLungReg against elastix on one simulated breathing pair.

Each method runs in its own child process (spawned), so its wall time and peak resident
memory are its own; the figures are printed as a table with the ratio to elastix. Also
prints the network forward time alone and the synthetic-pair generation rate. Nothing is
asserted: the numbers describe this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(method: str, folder: str, model: str | None, elastix_iterations: int) -> dict:
    from .io import read_volume
    from .transforms import transform_points

    f = read_volume(Path(folder) / "fixed.nii.gz")
    m = read_volume(Path(folder) / "moving.nii.gz")
    fl = np.loadtxt(Path(folder) / "fixed_landmarks.txt")
    ml = np.loadtxt(Path(folder) / "moving_landmarks.txt")
    t = time.perf_counter()
    if method == "deeplungreg":
        from .modelfile import default_model_path, load_model
        from .pipeline import register_images

        net, meta = load_model(model or default_model_path())
        res = register_images(f, m, net, meta, "cpu")
        tx = res.transform
    else:
        from .baselines import elastix_register
        from .preprocessing import lung_mask

        tx = elastix_register(f, m, lung_mask(f).mask, iterations=elastix_iterations)
        sitk.Resample(m, f, tx, sitk.sitkLinear, -1000.0)  # produce the warped image too, as ours does
    seconds = time.perf_counter() - t
    tre = np.linalg.norm(transform_points(tx, fl) - ml, axis=1)
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "tre_mean": float(tre.mean())}


def run_benchmark(image: str | None, model: str | None, elastix_iterations: int | None) -> int:
    import torch

    from .io import read_volume, write_lps_landmarks
    from .modelfile import default_model_path, load_model, resource_path
    from .simulation import BreathingParams, simulate_pair

    image = image or str(resource_path("SampleData/chest_ct_cptac_C3N-00247_2mm.nii.gz"))
    sim = simulate_pair(read_volume(image), BreathingParams(n_landmarks=100))
    initial = np.linalg.norm(sim.fixed_landmarks - sim.moving_landmarks, axis=1).mean()
    results = {}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(sim.fixed, str(Path(tmp) / "fixed.nii.gz"))
        sitk.WriteImage(sim.moving, str(Path(tmp) / "moving.nii.gz"))
        write_lps_landmarks(Path(tmp) / "fixed_landmarks.txt", sim.fixed_landmarks)
        write_lps_landmarks(Path(tmp) / "moving_landmarks.txt", sim.moving_landmarks)
        methods = ["deeplungreg"] + (["elastix"] if elastix_iterations else [])
        for method in methods:
            with ctx.Pool(1) as pool:
                results[method] = pool.apply(_child, (method, tmp, model, elastix_iterations or 0))
    print(f"pair: {Path(image).name} size {sim.fixed.GetSize()}, initial TRE {initial:.2f} mm; CPU threads "
          f"{torch.get_num_threads()}")
    print(f"{'method':<12}{'seconds':>9}{'peak RSS MB':>13}{'TRE mm':>8}")
    for name, r in results.items():
        print(f"{name:<12}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['tre_mean']:>8.2f}")
    if "elastix" in results:
        ratio = results["elastix"]["seconds"] / results["deeplungreg"]["seconds"]
        print(f"elastix / DeepLungReg time ratio: {ratio:.1f}x")
    net, meta = load_model(model or default_model_path())
    g = int(meta["grid_size"])
    x = torch.rand(1, 2, g, g, g)
    with torch.inference_mode():
        net(x)
        t = time.perf_counter()
        for _ in range(5):
            net(x)
    print(f"network forward alone ({g}³, CPU): {(time.perf_counter() - t) / 5 * 1000:.0f} ms")
    try:
        from DeepLungRegTrainingLib.synthesis import PRESETS, make_pair
    except ImportError:
        return 0
    img = torch.rand(1, 1, g, g, g)
    gen = torch.Generator().manual_seed(0)
    make_pair(img, img, PRESETS["eppenhof2018"], gen)
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < 5.0:
        make_pair(img, img, PRESETS["eppenhof2018"], gen)
        n += 1
    print(f"synthetic pairs at {g}³: {n / (time.perf_counter() - t):.1f} per second")
    return 0
