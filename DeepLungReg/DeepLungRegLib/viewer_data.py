"""What ``deeplungreg view`` shows, as plain images and arrays (no trame, no Slicer).

Finds the registration output to show (``OUTDIR``, or ``OUTDIR/<case>`` of a ``register-batch``
folder), checks that it is one, and loads what ``register`` wrote: ``report.json`` (and the input
paths it names), ``warped.nii.gz``, ``jacobian.nii.gz``, ``transform.h5``. Nothing is registered
again: the fixed image is read from its input path, the moving image is read only when ``warped.nii.gz``
was not written (``--no-warped``; it is then resampled through ``transform.h5``), the lung mask that
limits the Jacobian overlay is the library's :func:`~DeepLungRegLib.preprocessing.lung_mask` of the
fixed image (the mask ``register`` measured folding in), and landmarks are mapped through ``transform.h5``
to give each its TRE.

Everything stays in LPS millimetres (SimpleITK images, ``(N, 3)`` arrays); RAS appears only in the viewer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

#: Files every registration output holds (``register`` writes them atomically, all or none).
REQUIRED_FILES = ("report.json", "transform.h5", "jacobian.nii.gz")
#: The Jacobian overlay is a label volume (Slicer honours a colour table's opacity per entry on its label
#: layer): 0 outside the lung (transparent), 1 folding (det <= 0), and 2 + n for det in log-spaced bins
#: from JACOBIAN_LOG_RANGE[0] to [1] (values beyond them clipped): 0.4 % steps of det.
JACOBIAN_OUTSIDE, JACOBIAN_FOLDING, JACOBIAN_FIRST_BIN = 0, 1, 2
JACOBIAN_BINS = 2000
JACOBIAN_LOG_RANGE = (math.log(0.02), math.log(50.0))
FOLDING_RGB = (0.0, 1.0, 0.0)
#: TRE colour bins (mm): upper edges and one RGB colour per bin (the last bin is open).
#: Chosen apart from the Jacobian map (blue - white - red, lime for folding).
TRE_BIN_EDGES_MM = (1.0, 2.0, 4.0, 8.0)
TRE_BIN_COLORS = ((0.0, 0.85, 1.0), (1.0, 1.0, 0.0), (1.0, 0.55, 0.0), (1.0, 0.0, 0.6), (0.65, 0.0, 1.0))


@dataclass
class Landmarks:
    """Landmark pairs of the run (LPS mm) and their errors (mm)."""

    fixed: np.ndarray          # (N, 3) fixed-image landmarks: where the markers are drawn
    moving: np.ndarray         # (N, 3) moving-image landmarks
    mapped: np.ndarray         # (N, 3) fixed landmarks mapped through transform.h5
    tre_before: np.ndarray     # (N,) |fixed - moving|
    tre_after: np.ndarray      # (N,) |mapped - moving|
    source: str = ""           # where the landmark paths came from

    def bins(self) -> np.ndarray:
        """(N,) index of each landmark's TRE colour bin (0 .. len(TRE_BIN_EDGES_MM))."""
        return np.searchsorted(np.asarray(TRE_BIN_EDGES_MM), self.tre_after, side="right")


@dataclass
class ViewerData:
    outdir: Path
    report: dict
    fixed: sitk.Image            # fixed image (HU)
    warped: sitk.Image           # moving image resampled onto the fixed grid (HU)
    difference: sitk.Image       # fixed - warped (HU, int16, clipped)
    jacobian: sitk.Image         # det(Jacobian) as overlay labels (uint16, see jacobian_labels), lung only
    jacobian_lung_range: tuple[float, float]  # min and max of det in the lung
    landmarks: Landmarks | None
    lung_center: np.ndarray = field(default_factory=lambda: np.zeros(3))        # LPS mm: axial, coronal slices
    sagittal_center: np.ndarray = field(default_factory=lambda: np.zeros(3))    # LPS mm: sagittal slices
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.outdir.name or str(self.outdir)


# --------------------------------------------------------------------------- finding the output
def _is_registration(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _cases(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_registration(p))


def resolve_output(outdir: str | os.PathLike, case: str | None = None) -> Path:
    """The registration output folder to show, or an :class:`InputError` saying why ``outdir`` is not one.

    ``outdir`` is a ``register`` output, or (with ``case``) a folder holding one output per case
    (``register-batch``)."""
    root = Path(outdir)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a registration output folder")
    if case is not None:
        if not case or "/" in case or "\\" in case or case in (".", ".."):
            raise InputError(f"--case {case!r}: give a case name (a sub-folder of {root})")
        target = root / case
        if _is_registration(target):
            return target
        cases = _cases(root)
        if cases:
            raise InputError(f"{root}: no case {case!r}; cases: {', '.join(cases)}")
        if _is_registration(root):
            raise InputError(f"{root} is a single registration output; leave out --case {case}")
        raise InputError(_not_output_message(root))
    if _is_registration(root):
        return root
    cases = _cases(root)
    if cases:
        raise InputError(f"{root} holds {len(cases)} registrations; choose one with --case NAME "
                         f"({', '.join(cases[:10])}{', ...' if len(cases) > 10 else ''})")
    raise InputError(_not_output_message(root))


def _not_output_message(root: Path) -> str:
    if (root / "results.csv").is_file():
        return (f"{root} is an 'evaluate' summary without per-case results (evaluated with --view none); "
                f"evaluate again with --view METHOD, or register the pairs with 'deeplungreg register-batch "
                f"PAIRS.csv -o DIR', and view DIR --case NAME")
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    return (f"{root} is not a registration output (missing {', '.join(missing)}); "
            f"'deeplungreg register FIXED MOVING -o {root}' writes one")


def resolve_input(recorded: str, outdir: Path, what: str) -> Path:
    """An input path as ``report.json`` recorded it (as given on the command line): absolute, or
    relative to the working directory of the run; tried against the current directory, the output
    folder and its parents."""
    p = Path(recorded)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, outdir / p] + [parent / p for parent in outdir.resolve().parents]
    for c in candidates:
        if c.exists():
            return c
    raise InputError(f"the {what} image recorded in {outdir / 'report.json'} ({recorded}) was not found "
                     f"(tried the current folder and {outdir} with its parents); run 'view' from the folder "
                     f"'register' ran in")


# --------------------------------------------------------------------------- loading
def read_report(folder: Path) -> dict:
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'report.json'}: not readable as JSON ({exc})") from None
    if not isinstance(report, dict) or not report.get("fixed") or not report.get("moving"):
        raise InputError(f"{folder / 'report.json'} names no fixed and moving images: not a report of 'register'")
    return report


def _read(path: Path, what: str) -> sitk.Image:
    from .io import read_volume

    return read_volume(path, keep_int16=True) if what in ("fixed", "moving") else sitk.ReadImage(str(path))


def _same_grid(img: sitk.Image, ref: sitk.Image) -> bool:
    return (img.GetSize() == ref.GetSize()
            and np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
            and np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
            and np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6))


def _on_grid(img: sitk.Image, ref: sitk.Image, interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    return img if _same_grid(img, ref) else sitk.Resample(img, ref, sitk.Transform(), interpolator, default,
                                                          img.GetPixelID())


def difference_image(fixed: sitk.Image, warped: sitk.Image) -> sitk.Image:
    """``fixed - warped`` (HU) on the fixed grid, int16 (clipped)."""
    a, b = sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped)
    integers = a.dtype.kind in "iu" and b.dtype.kind in "iu"
    d = np.subtract(a, b, dtype=np.int32 if integers else np.float32)  # one full-size temporary
    np.clip(d, -32768, 32767, out=d)
    if not integers:
        np.rint(d, out=d)
    out = sitk.GetImageFromArray(d.astype(np.int16))
    out.CopyInformation(fixed)
    return out


def jacobian_labels(det: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """det(Jacobian) -> overlay labels (uint16): :data:`JACOBIAN_OUTSIDE` where ``inside`` is false or det is
    not finite, :data:`JACOBIAN_FOLDING` where det <= 0, else the log-spaced bin of det (nearest)."""
    lo, hi = JACOBIAN_LOG_RANGE
    det = np.asarray(det, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (np.clip(np.log(np.maximum(det, 1e-300)), lo, hi) - lo) / (hi - lo) * (JACOBIAN_BINS - 1)
    labels = (JACOBIAN_FIRST_BIN + np.rint(np.nan_to_num(pos))).astype(np.uint16)
    labels[det <= 0] = JACOBIAN_FOLDING
    labels[~(np.asarray(inside, bool) & np.isfinite(det))] = JACOBIAN_OUTSIDE
    return labels


def label_det(labels: np.ndarray | int) -> np.ndarray:
    """The det value a bin label stands for (labels >= JACOBIAN_FIRST_BIN)."""
    lo, hi = JACOBIAN_LOG_RANGE
    return np.exp(lo + (np.asarray(labels, np.float64) - JACOBIAN_FIRST_BIN) * (hi - lo) / (JACOBIAN_BINS - 1))


def jacobian_colors(low: float, high: float) -> np.ndarray:
    """RGBA in [0, 1] of every overlay label, ``(JACOBIAN_FIRST_BIN + JACOBIAN_BINS, 4)``.

    Outside the lung transparent; folding opaque lime; otherwise diverging on a log scale from white at
    det 1 to blue at ``low`` (compression) and red at ``high`` (expansion), saturated beyond them, with
    the opacity growing the same way, from transparent at 1 to opaque at either end, so that the anatomy
    stays visible where the volume does not change. ``0 < low < 1 < high``."""
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"Jacobian range must satisfy 0 < low < 1 < high, got {low}, {high}")
    v = label_det(np.arange(JACOBIAN_FIRST_BIN, JACOBIAN_FIRST_BIN + JACOBIAN_BINS))
    t = np.where(v < 1.0, np.log(v) / math.log(low), np.log(v) / math.log(high)).clip(0.0, 1.0)
    rgba = np.ones((JACOBIAN_FIRST_BIN + JACOBIAN_BINS, 4))
    rgba[:JACOBIAN_FIRST_BIN] = ((0, 0, 0, 0), (*FOLDING_RGB, 1.0))
    body = rgba[JACOBIAN_FIRST_BIN:]
    body[v < 1.0, 0] = body[v < 1.0, 1] = 1.0 - t[v < 1.0]
    body[v >= 1.0, 1] = body[v >= 1.0, 2] = 1.0 - t[v >= 1.0]
    body[:, 3] = t
    return rgba


def masked_jacobian(jacobian: sitk.Image, lung: sitk.Image) -> tuple[sitk.Image, tuple[float, float]]:
    """Overlay labels of det(Jacobian) in ``lung`` (resampled onto the Jacobian's grid by nearest
    neighbour), and the det range in the lung."""
    det = sitk.GetArrayViewFromImage(jacobian)
    inside = sitk.GetArrayViewFromImage(_on_grid(sitk.Cast(lung, sitk.sitkUInt8), jacobian,
                                                 sitk.sitkNearestNeighbor)) > 0
    out = sitk.GetImageFromArray(jacobian_labels(det, inside))
    out.CopyInformation(jacobian)
    lung_values = det[inside & np.isfinite(det)]
    rng = (float(lung_values.min()), float(lung_values.max())) if lung_values.size else (1.0, 1.0)
    return out, rng


def lung_centers(lung: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Where the slices start, as in the QA picture (:func:`DeepLungRegLib.qa.lung_centre`): the lung
    centroid (axial, coronal) and that point moved to the larger lung's centroid in x (sagittal); LPS mm."""
    from .qa import lung_centre

    centre, sagittal_x, _ = lung_centre(lung)
    sagittal = np.array(centre, float)
    sagittal[0] = sagittal_x
    return np.asarray(centre, float), sagittal


def landmark_paths(report: dict, fixed_landmarks: str | None, moving_landmarks: str | None
                   ) -> tuple[str | None, str | None, str]:
    """Landmark files: the ones given to ``view``, else the ones a report records (if it does)."""
    if bool(fixed_landmarks) != bool(moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if fixed_landmarks:
        return fixed_landmarks, moving_landmarks, "command line"
    for key in ("landmarks", "landmark_files"):
        rec = report.get(key)
        if isinstance(rec, dict) and rec.get("fixed") and rec.get("moving"):
            return str(rec["fixed"]), str(rec["moving"]), "report.json"
    if report.get("fixed_landmarks") and report.get("moving_landmarks"):
        return str(report["fixed_landmarks"]), str(report["moving_landmarks"]), "report.json"
    return None, None, ""


def load_landmarks(folder: Path, report: dict, fixed: sitk.Image, moving_path: Path | None,
                   fixed_file: str, moving_file: str, fmt: str, source: str,
                   transform: sitk.Transform | None = None, notes: list[str] | None = None) -> Landmarks:
    from .io import check_landmark_pair, read_landmarks
    from .transforms import transform_points

    base = folder if source == "report.json" else Path.cwd()
    fpath = resolve_input(fixed_file, base, "fixed landmark") if source == "report.json" else Path(fixed_file)
    mpath = resolve_input(moving_file, base, "moving landmark") if source == "report.json" else Path(moving_file)
    fpts = read_landmarks(fpath, fmt, fixed)
    moving_ref = None
    if fmt == "dirlab" or (fmt == "auto" and "xyz" in mpath.name.lower() and mpath.suffix.lower() == ".txt"):
        if moving_path is None:
            raise InputError("DIR-Lab landmarks of the moving image need the moving image, which was not found")
        moving_ref = _read(moving_path, "moving")  # voxel indices need its geometry
    mpts = read_landmarks(mpath, fmt, moving_ref)
    check_landmark_pair(fpts, mpts)
    tx = transform if transform is not None else sitk.ReadTransform(str(folder / "transform.h5"))
    mapped = transform_points(tx, fpts)
    lm = Landmarks(fpts, mpts, mapped, np.linalg.norm(fpts - mpts, axis=1), np.linalg.norm(mapped - mpts, axis=1),
                   source)
    recorded = (report.get("tre_mm") or {}).get("after", {}).get("mean")
    if notes is not None and recorded is not None and math.isfinite(recorded):
        if abs(float(lm.tre_after.mean()) - recorded) > 1e-3 * max(1.0, abs(recorded)):
            notes.append(f"the landmarks' mean TRE here ({lm.tre_after.mean():.3f} mm) differs from report.json "
                         f"({recorded:.3f} mm): these are not the landmarks of the run")
    return lm


def load(outdir: str | os.PathLike, case: str | None = None, fixed_landmarks: str | None = None,
         moving_landmarks: str | None = None, landmark_format: str = "auto") -> ViewerData:
    """Everything the viewer shows, from a registration output (see the module docstring)."""
    from .preprocessing import lung_mask

    folder = resolve_output(outdir, case)
    report = read_report(folder)
    notes: list[str] = []
    f_lm, m_lm, lm_source = landmark_paths(report, fixed_landmarks, moving_landmarks)
    fixed_path = resolve_input(report["fixed"], folder, "fixed")
    fixed = _read(fixed_path, "fixed")
    try:
        moving_path = resolve_input(report["moving"], folder, "moving")
    except InputError:
        moving_path = None
    transform = None
    if (folder / "warped.nii.gz").is_file():
        warped = sitk.ReadImage(str(folder / "warped.nii.gz"))
        if not _same_grid(warped, fixed):  # register writes warped on the fixed grid: another image was found
            raise InputError(f"the fixed image found for {folder} ({fixed_path}) is not the one registered: its grid "
                             f"differs from warped.nii.gz; run 'view' from the folder 'register' ran in")
    else:
        if moving_path is None:
            raise InputError(f"{folder} has no warped.nii.gz (registered with --no-warped) and the moving image "
                             f"{report['moving']} was not found to resample it through transform.h5")
        from .io import to_int16_hu

        transform = sitk.ReadTransform(str(folder / "transform.h5"))
        moving = _read(moving_path, "moving")
        warped = to_int16_hu(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
        why = ("evaluate keeps no warped images" if report.get("source") == "deeplungreg evaluate"
               else "warped.nii.gz was not written (--no-warped)")
        notes.append(f"{why}: the moving image is resampled through transform.h5 here")
    jacobian = sitk.ReadImage(str(folder / "jacobian.nii.gz"), sitk.sitkFloat32)
    lung = lung_mask(fixed if fixed.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(fixed, sitk.sitkFloat32),
                     check=False).mask
    jac_shown, jac_range = masked_jacobian(jacobian, lung)
    centre, right = lung_centers(lung)
    landmarks = None
    recorded = report.get("landmark_files") or {}
    if f_lm and lm_source == "report.json" and landmark_format == "auto" and recorded.get("format"):
        landmark_format = str(recorded["format"])  # read them as the run did
    if f_lm:
        landmarks = load_landmarks(folder, report, fixed, moving_path, f_lm, m_lm, landmark_format, lm_source,
                                   transform, notes)
    elif report.get("tre_mm"):
        notes.append("the run had landmarks, but report.json does not name their files: give them with "
                     "--fixed-landmarks and --moving-landmarks to see them")
    return ViewerData(folder, report, fixed, warped, difference_image(fixed, warped), jac_shown, jac_range,
                      landmarks, centre, right, notes)
