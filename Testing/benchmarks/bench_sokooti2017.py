"""Benchmark: ``sokooti2017`` dense inference (time, peak RSS) on the full-size shared CT.

The 512×512×99 CPTAC chest CT is prepared as ``register`` prepares a pair (lung mask, the
lung-box lattice of ``grid_size`` nodes, HU window) with the CT as both fixed and moving
image (the network's work does not depend on the content), then the method runs:
resampling onto the network lattice, the fully convolutional pass, the field back onto the
pipeline lattice. Without ``--model`` an untrained RegNet of the shipped width is used (same
work as a trained one). Prints one JSON object; asserts nothing.

Run: ``.venv/bin/python Testing/benchmarks/bench_sokooti2017.py [CT] [--model DIR] [--spacing MM]
[--stride 1|2] [--width W] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "cptac_lscc_C3N-00247_chest_ct.nii.gz"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> int:
    from DeepLungRegLib.io import read_volume
    from DeepLungRegLib.methods.base import PreparedPair
    from DeepLungRegLib.methods.sokooti2017 import METHOD, RegNet, RegNetConfig, network_lattice
    from DeepLungRegLib.modelfile import load_model
    from DeepLungRegLib.preprocessing import (
        NORMALISATION,
        lung_mask,
        network_grid,
        normalise_hu,
        resample_to_grid,
    )
    from DeepLungRegTrainingLib.recipes.sokooti2017 import GRID

    ap = argparse.ArgumentParser()
    ap.add_argument("ct", nargs="?", default=str(DEFAULT_CT))
    ap.add_argument("--model", default=None, help="a sokooti2017 model folder (default: untrained, --width)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--spacing", type=float, default=None, help="network lattice mm (default: the model's or 2.0)")
    ap.add_argument("--stride", type=int, default=None, help="1 or 2 (default: the model's or 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    if a.model:
        net, meta = load_model(a.model)
    else:
        torch.manual_seed(0)
        net = RegNet(RegNetConfig(width=a.width)).eval()
        meta = {"method": "sokooti2017", "grid_size": GRID, "normalisation": NORMALISATION}
    meta = {**meta, **({"lattice_spacing_mm": a.spacing} if a.spacing else {}),
            **({"output_stride": a.stride} if a.stride else {})}

    ct = read_volume(a.ct)
    mask = lung_mask(ct).mask
    grid = network_grid(ct, [mask], METHOD.grid_size(meta))
    arr = normalise_hu(resample_to_grid(ct, grid), meta["normalisation"])
    pair = PreparedPair(arr, arr.copy(), grid)
    lattice = network_lattice(grid, METHOD.lattice_spacing(meta))
    rss_before = peak_rss_gb()
    t = time.perf_counter()
    own = METHOD.network_field(net, pair, meta, torch.device("cpu"))
    t_net = time.perf_counter() - t
    rss_net = peak_rss_gb()
    t = time.perf_counter()
    out = METHOD.predict(net, pair, meta, torch.device("cpu"))
    t_predict = time.perf_counter() - t
    print(json.dumps({
        "ct": Path(a.ct).name, "ct_size": list(ct.GetSize()), "pipeline_grid": list(grid.size),
        "pipeline_spacing_mm": [round(s, 3) for s in grid.spacing],
        "network_lattice": list(lattice.size), "network_spacing_mm": [round(s, 3) for s in lattice.spacing],
        "output_stride": METHOD.output_stride(meta), "output_lattice": list(own.lattice.size),
        "output_spacing_mm": [round(s, 3) for s in own.lattice.spacing],
        "centres_computed": int(own.u_vox[0, 0].numel()), "width": net.config.width,
        "seconds_network_field": round(t_net, 2), "seconds_predict": round(t_predict, 2),
        "peak_rss_gb_before": round(rss_before, 2), "peak_rss_gb_after_network_field": round(rss_net, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2), "field_on": list(out.lattice.size),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
