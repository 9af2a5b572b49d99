"""The registration pipeline: files -> masks -> affine -> network -> transform -> outputs.

Every geometric quantity is in LPS millimetres. The result transform maps fixed-image
points to moving-image points (see :mod:`DeepLungRegLib.transforms`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .affine import affine_prealign, identity_affine
from .errors import InputError
from .io import atomic_directory, check_landmark_pair, read_landmarks, read_volume, to_int16_hu, write_image
from .metrics import (
    folding_percent,
    jacobian_determinant,
    std_log_jacobian,
    summarize,
    target_registration_error,
)
from .modelfile import load_model, resolve_device
from .networks import UNet3D
from .preprocessing import (
    NetworkGrid,
    lung_mask,
    network_grid,
    normalise_hu,
    resample_mask_to_grid,
    resample_to_grid,
)
from .transforms import OutputField, full_transform, mapping_error, output_field, transform_points

#: Largest difference (mm) between bf16 and float32 predictions accepted before bf16 is refused.
BF16_TOLERANCE_MM = 0.5
#: Stages of :func:`register_images`, in order (progress reports count them).
STAGES = ("mask", "affine", "network", "transform", "warp", "jacobian")


@dataclass
class RegistrationResult:
    transform: sitk.CompositeTransform      # fixed -> moving, LPS mm
    affine: sitk.Transform
    field: OutputField
    grid: NetworkGrid
    u_vox: torch.Tensor                     # (1, 3, G, G, G) network output
    jacobian: sitk.Image                    # on the fixed grid
    fixed_lung: sitk.Image                  # lung mask on the fixed grid (uint8)
    warped: sitk.Image | None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class _Stages:
    """Times named stages and reports them to an optional progress callback."""

    def __init__(self, callback: Callable[[str, int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.done, self.timings = callback, total, 0, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.callback:
            self.callback(name, self.done, self.total)
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 4)
        self.done += 1
        if self.callback:
            self.callback(name, self.done, self.total)


def predict(net: UNet3D, fixed: np.ndarray, moving: np.ndarray, device: torch.device,
            bf16: bool = False) -> torch.Tensor:
    """Network forward pass on normalised (D, H, W) arrays; returns (1, 3, D, H, W) voxels on the CPU."""
    x = torch.from_numpy(np.stack((fixed, moving))[None]).to(device)
    with torch.inference_mode():
        if bf16:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                u = net(x)
        else:
            u = net(x)
    return u.float().cpu()


def register_images(fixed: sitk.Image, moving: sitk.Image, net: UNet3D, meta: dict,
                    device: torch.device | str = "cpu", affine: bool = True, bf16: bool = False,
                    warp_moving: bool = True, transform_stride: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (both float32 HU images)."""
    device = torch.device(device)
    stage = _Stages(progress, len(STAGES))
    grid_size = int(meta["grid_size"])
    with stage("mask"):
        lm_f, lm_m = lung_mask(fixed), lung_mask(moving)
        for name, lm in (("fixed", lm_f), ("moving", lm_m)):
            if lm.volume_ml == 0:
                raise InputError(f"{name} image: no lung found (no region below -250 HU)")
    with stage("affine"):
        if affine:
            A = affine_prealign(lm_f.image, lm_m.image, lm_f.mask, lm_m.mask)
        else:
            A = identity_affine()
        moving_mask_in_fixed = sitk.Resample(lm_m.mask, lm_f.mask, A, sitk.sitkNearestNeighbor, 0)
    with stage("network"):
        grid = network_grid(fixed, [lm_f.mask, moving_mask_in_fixed], grid_size)
        f_arr = normalise_hu(resample_to_grid(fixed, grid), meta["normalisation"])
        m_arr = normalise_hu(resample_to_grid(moving, grid, A), meta["normalisation"])
        u = predict(net, f_arr, m_arr, device, bf16=bf16)
    with stage("transform"):
        stride = transform_stride or (1 if grid_size <= 96 else 2)
        fld = output_field(u, grid, pad=4, stride=stride)
        T = full_transform(A, fld)
        lung_net = resample_mask_to_grid(lm_f.mask, grid)
        idx = np.argwhere(lung_net)
        rng = np.random.default_rng(0)
        sample = idx[rng.choice(len(idx), size=min(2000, len(idx)), replace=False)] if len(idx) else idx
        ref = grid.reference()
        pts = np.asarray([ref.TransformIndexToPhysicalPoint([int(c) for c in p[::-1]]) for p in sample])
        map_err = mapping_error(T, pts, u, grid, A)
    warped = None
    with stage("warp"):
        if warp_moving:
            warped = sitk.Resample(moving, fixed, T, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    with stage("jacobian"):
        det_lattice = jacobian_determinant(fld.displacement_mm, fld.lattice.spacing, fld.lattice.direction)
        det_affine = float(np.linalg.det(np.asarray(A.GetMatrix()).reshape(3, 3)))
        det_img = sitk.GetImageFromArray((det_lattice * det_affine).astype(np.float32))
        det_img.SetOrigin(fld.lattice.origin)
        det_img.SetSpacing(fld.lattice.spacing)
        det_img.SetDirection(fld.lattice.direction)
        jac = sitk.Resample(det_img, fixed, sitk.Transform(), sitk.sitkLinear, det_affine, sitk.sitkFloat32)
        fixed_lung = sitk.Resample(lm_f.mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        jac_arr = sitk.GetArrayViewFromImage(jac)
        lung_arr = sitk.GetArrayViewFromImage(fixed_lung) > 0
        stats = {
            "folding_percent": folding_percent(jac_arr),
            "folding_percent_lung": folding_percent(jac_arr, lung_arr),
            "jacobian_min": float(jac_arr.min()), "jacobian_max": float(jac_arr.max()),
            "std_log_jacobian_lung": std_log_jacobian(jac_arr, lung_arr),
            "affine_determinant": det_affine,
            "lung_volume_ml": {"fixed": lm_f.volume_ml, "moving": lm_m.volume_ml},
            "lung_mask_fallback": {"fixed": lm_f.fallback, "moving": lm_m.fallback},
            "transform_mapping_error_mm": map_err,
            "transform_lattice": {"size": list(fld.lattice.size), "spacing_mm": list(fld.lattice.spacing),
                                  "stride": stride},
            "network_grid": grid.to_dict(),
        }
    return RegistrationResult(T, A, fld, grid, u, jac, fixed_lung, warped, stage.timings, stats)


def landmark_errors(tx: sitk.Transform, fixed_pts: np.ndarray, moving_pts: np.ndarray,
                    affine: sitk.Transform | None = None) -> dict:
    """TRE before (identity), after the affine alone (if given) and after ``tx``."""
    check_landmark_pair(fixed_pts, moving_pts)
    out = {"before": summarize(target_registration_error(fixed_pts, moving_pts)),
           "after": summarize(target_registration_error(transform_points(tx, fixed_pts), moving_pts))}
    if affine is not None:
        out["affine"] = summarize(target_registration_error(transform_points(affine, fixed_pts), moving_pts))
    return out


def _versions() -> dict:
    import skimage

    return {"deeplungreg": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "SimpleITK": sitk.Version_VersionString(), "scikit-image": skimage.__version__}


def run_register_cli(a: argparse.Namespace, default_model: Path) -> int:
    """``deeplungreg register``: validate everything, run, write all outputs atomically."""
    t_start = time.perf_counter()
    if bool(a.fixed_landmarks) != bool(a.moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    t = time.perf_counter()
    fixed = read_volume(a.fixed)
    moving = read_volume(a.moving)
    fixed_pts = moving_pts = None
    if a.fixed_landmarks:
        fixed_pts = read_landmarks(a.fixed_landmarks, a.landmark_format, fixed)
        moving_pts = read_landmarks(a.moving_landmarks, a.landmark_format, moving)
        check_landmark_pair(fixed_pts, moving_pts)
    t_load = time.perf_counter() - t
    model_path = Path(a.model) if a.model else default_model
    device = resolve_device(a.device)
    net, meta = load_model(model_path, device)

    bar = None
    if not a.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(STAGES), desc="register", unit="stage", dynamic_ncols=True)

    def progress(name: str, done: int, total: int) -> None:
        if getattr(a, "progress_lines", False):
            print(f"progress: {done}/{total} {name}", flush=True)
        if bar is not None:
            bar.set_postfix_str(name)
            bar.n = done
            bar.refresh()

    bf16 = bool(a.bf16)
    res = register_images(fixed, moving, net, meta, device, affine=not a.no_affine, bf16=bf16,
                          warp_moving=not a.no_warped, progress=progress)
    if bar is not None:
        bar.close()
    timings = {"load": round(t_load, 4), **res.timings}
    report = {
        "fixed": str(a.fixed), "moving": str(a.moving),
        "transform_direction": "fixed physical point (LPS mm) -> moving physical point (LPS mm)",
        "affine_prealignment": not a.no_affine,
        "affine_matrix": list(res.affine.GetMatrix()), "affine_translation_mm": list(res.affine.GetTranslation()),
        "affine_center_mm": list(res.affine.GetCenter()),
        "device": str(device), "bf16": bf16,
        "model": {"path": str(model_path), "method": meta.get("method"), "grid_size": meta.get("grid_size"),
                  "untrained": bool(meta.get("untrained", False)),
                  "training": {k: v for k, v in meta.get("training", {}).items() if k != "config"}},
        **res.stats,
        "versions": _versions(),
    }
    if fixed_pts is not None:
        extra = _Stages(None, 1)
        with extra("landmarks"):
            report["tre_mm"] = landmark_errors(res.transform, fixed_pts, moving_pts, res.affine)
        timings.update(extra.timings)
    with atomic_directory(a.output) as tmp:
        t = time.perf_counter()
        sitk.WriteTransform(res.transform, str(tmp / "transform.h5"))
        if res.warped is not None:
            write_image(to_int16_hu(res.warped), tmp / "warped.nii.gz")
        write_image(res.jacobian, tmp / "jacobian.nii.gz")
        timings["write"] = round(time.perf_counter() - t, 4)
        timings["total"] = round(time.perf_counter() - t_start, 4)
        report["timings_s"] = timings
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
    summary = [f"wrote {a.output}/transform.h5", f"folding {report['folding_percent']:.4f}%",
               f"total {timings['total']:.2f}s"]
    if "tre_mm" in report:
        summary.insert(1, f"TRE {report['tre_mm']['before']['mean']:.2f} -> {report['tre_mm']['after']['mean']:.2f} mm")
    print("; ".join(summary))
    return 0

