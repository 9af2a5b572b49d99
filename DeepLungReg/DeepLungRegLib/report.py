"""The report of one registration (``report.json``) and the writing of every output.

One typed object, filled by :func:`DeepLungRegLib.pipeline.run_register` and written in one
place (:func:`write_outputs`), atomically with the transform and images.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .io import atomic_directory, to_int16_hu, write_image

TRANSFORM_DIRECTION = "fixed physical point (LPS mm) -> moving physical point (LPS mm)"


def versions() -> dict[str, str]:
    import skimage
    import torch

    return {"deeplungreg": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "SimpleITK": sitk.Version_VersionString(), "scikit-image": skimage.__version__}


@dataclass
class ModelInfo:
    path: str
    method: str
    grid_size: object
    untrained: bool
    training: dict


@dataclass
class RegistrationReport:
    """Everything ``report.json`` holds. ``stats`` are the pipeline's measurements (folding,
    Jacobian range, mapping error, lattices, refine levels), merged at the top level."""

    fixed: str
    moving: str
    affine_prealignment: bool
    affine_matrix: list[float]
    affine_translation_mm: list[float]
    affine_center_mm: list[float]
    device: str
    bf16: bool
    refine_level: str
    model: ModelInfo
    stats: dict
    timings_s: dict[str, float] = field(default_factory=dict)
    tre_mm: dict | None = None
    landmark_files: dict | None = None  # {"fixed": path, "moving": path, "format": ...} when landmarks were given
    qa: dict | None = None              # qa.png: {"written": true, "seconds": s} or {"written": false, ...}
    transform_direction: str = TRANSFORM_DIRECTION
    versions: dict = field(default_factory=versions)

    def to_dict(self) -> dict:
        d = asdict(self)
        stats = d.pop("stats")
        for key in ("tre_mm", "landmark_files", "qa"):
            if d[key] is None:
                d.pop(key)
        return {**d, **stats}

    def summary(self, output: str | Path) -> str:
        """One line for the terminal."""
        parts = [f"wrote {output}/transform.h5"]
        if self.tre_mm is not None:
            parts.append(f"TRE {self.tre_mm['before']['mean']:.2f} -> {self.tre_mm['after']['mean']:.2f} mm")
        parts += [f"folding {self.stats['folding_percent']:.4f}%", f"refine {self.refine_level}",
                  f"total {self.timings_s.get('total', 0.0):.2f}s"]
        if self.qa is not None and "error" in self.qa:
            parts.append("qa.png not written (see report.json)")
        return "; ".join(parts)


def write_outputs(output: str | Path, report: RegistrationReport, transform: sitk.Transform,
                  jacobian: sitk.Image, warped: sitk.Image | np.ndarray | None, t_start: float,
                  qa: Callable[[Path], object] | None = None, reference: sitk.Image | None = None) -> None:
    """Write transform.h5, warped.nii.gz (if any: an image, or an int16 (k, j, i) array on
    ``reference``'s grid), jacobian.nii.gz and report.json, all or nothing;
    meanwhile ``qa(path)`` writes qa.png, if given (returning the seconds the drawing took, or None):
    its failure is recorded in the report, never raised.
    ``timings_s`` gets ``write``, ``qa`` (the seconds ``qa`` reports, else the time spent here; the
    command line draws the picture beside the warp and only writes it here) and ``total``."""
    with atomic_directory(output) as tmp:
        t = time.perf_counter()

        def picture() -> tuple[dict, float]:
            t_qa = time.perf_counter()
            try:
                took = qa(tmp / "qa.png")
            except Exception as exc:  # a picture must never fail a registration whose transform is written
                (tmp / "qa.png").unlink(missing_ok=True)
                return {"written": False, "error": f"{type(exc).__name__}: {exc}"}, round(time.perf_counter() - t_qa, 4)
            # ``qa`` may say how long the drawing took (drawn before, beside the warp); else the time here
            seconds = round(float(took) if isinstance(took, (int, float)) else time.perf_counter() - t_qa, 4)
            return {"written": True, "seconds": seconds}, seconds

        # the compressed images take most of the time: write them side by side (ITK releases the GIL),
        # and draw the QA picture meanwhile
        with ThreadPoolExecutor(max_workers=4) as pool:
            qa_job = pool.submit(picture) if qa is not None else None
            jobs = [pool.submit(sitk.WriteTransform, transform, str(tmp / "transform.h5")),
                    pool.submit(write_image, jacobian, tmp / "jacobian.nii.gz")]
            if isinstance(warped, np.ndarray):
                if warped.dtype != np.int16:
                    raise ValueError("a warped array must be int16 HU")
                jobs.append(pool.submit(write_image, warped, tmp / "warped.nii.gz", True, reference))
            elif warped is not None:
                if warped.GetPixelID() != sitk.sitkInt16:
                    warped = to_int16_hu(warped)
                jobs.append(pool.submit(write_image, warped, tmp / "warped.nii.gz"))
            for job in jobs:
                job.result()  # re-raises the first failure inside the atomic folder
            report.timings_s["write"] = round(time.perf_counter() - t, 4)
            if qa_job is not None:
                report.qa, report.timings_s["qa"] = qa_job.result()
        report.timings_s["total"] = round(time.perf_counter() - t_start, 4)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
