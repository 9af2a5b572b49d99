"""Evaluation harness: TRE, folding and time of several methods on the same pairs.

Inputs are DIR-Lab 4DCT / COPDGene folders as distributed (raw ``.img`` + 1-based voxel
landmark files, found by case-insensitive patterns searched recursively; inhale = fixed)
or a CSV manifest of generic pairs. Every method produces a transform mapping fixed
points to moving points (LPS mm); the harness maps the fixed landmarks through it and
measures, identically for all methods:

* TRE (mm) before and after: mean, std, p95, max;
* folding: % of voxels with det(Jacobian) <= 0 on a ~2 mm copy of the fixed grid, whole
  image and inside the fixed lung mask; std of log-Jacobian in the lung;
* seconds: wall time of the method's registration call (its own masks, pre-alignment and
  output included; image loading excluded).

With an output folder, each case and method (but identity) also gets the QA picture of
``deeplungreg register`` (:mod:`DeepLungRegLib.qa`, "before" = no registration), made from the
images already loaded, as ``qa/<case>_<method>.png``, linked from ``results.md``.
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import HU_OFFSET_KEY, read_landmarks, read_volume
from .metrics import (
    folding_percent,
    jacobian_determinant,
    std_log_jacobian,
    summarize,
    target_registration_error,
)
from .preprocessing import lung_mask, resample_isotropic
from .transforms import transform_points

JACOBIAN_SPACING_MM = 2.0
METHODS = ("identity", "affine", "deeplungreg", "elastix", "demons", "oracle")
RESULT_COLUMNS = ["case", "method", "tre_mean_before", "tre_mean_after", "tre_std_after", "tre_p95_after",
                  "tre_max_after", "folding_pct", "folding_pct_lung", "std_log_jacobian_lung", "seconds"]


@dataclass
class Case:
    name: str
    fixed: Path
    moving: Path
    fixed_landmarks: Path
    moving_landmarks: Path
    landmark_format: str = "auto"
    ground_truth: Path | None = None      # transform file (fixed -> moving), for the oracle method
    notes: list[str] = field(default_factory=list)
    qa_figures: dict[str, str] = field(default_factory=dict)  # method -> QA picture, relative to the output


# --------------------------------------------------------------------------- finding cases
def _find(files: list[Path], *patterns: str) -> Path | None:
    for pat in patterns:
        rx = re.compile(pat, re.IGNORECASE)
        hits = sorted(f for f in files if rx.search(f.name))
        if hits:
            return hits[0]
    return None


def find_dirlab_cases(root: str | Path, copd: bool = False, cases: Sequence[int] | None = None) -> list[Case]:
    """Cases of a DIR-Lab 4DCT (``case6_T00_s.img``, ``Case6_300_T00_xyz.txt``,
    ``case6_dirLab300_T00_xyz.txt``) or COPDGene (``copd1_iBHCT.img``,
    ``copd1_300_iBH_xyz_r1.txt``) folder, searched recursively."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    files = [p for p in root.rglob("*") if p.is_file()]
    prefix = "copd" if copd else "case"
    numbers = sorted({int(m.group(1)) for f in files
                      for m in [re.match(rf"{prefix}(\d+)", f.name, re.IGNORECASE)] if m})
    if cases:
        missing = sorted(set(cases) - set(numbers))
        if missing:
            raise InputError(f"{root}: no files for {prefix} {missing}")
        numbers = [n for n in numbers if n in set(cases)]
    out = []
    for n in numbers:
        mine = [f for f in files if re.match(rf"{prefix}{n}(?!\d)", f.name, re.IGNORECASE)]
        if copd:
            fi = _find(mine, r"_ibhct\.img$", r"ibh.*\.img$")
            mi = _find(mine, r"_ebhct\.img$", r"ebh.*\.img$")
            fl = _find(mine, r"_ibh_xyz.*\.txt$", r"ibh.*xyz.*\.txt$")
            ml = _find(mine, r"_ebh_xyz.*\.txt$", r"ebh.*xyz.*\.txt$")
        else:
            fi = _find(mine, r"_t00(_s)?\.img$", r"t00.*\.img$")
            mi = _find(mine, r"_t50(_s)?\.img$", r"t50.*\.img$")
            fl = _find(mine, r"t00_xyz.*\.txt$", r"t00.*xyz.*\.txt$")
            ml = _find(mine, r"t50_xyz.*\.txt$", r"t50.*xyz.*\.txt$")
        if not all((fi, mi, fl, ml)):
            raise InputError(f"{prefix}{n}: incomplete (fixed image {fi}, moving image {mi}, landmarks {fl}, {ml})")
        out.append(Case(f"{prefix}{n}", fi, mi, fl, ml, "dirlab"))
    if not out:
        raise InputError(f"{root}: no DIR-Lab {'COPDGene' if copd else '4DCT'} cases found")
    return out


def read_manifest(path: str | Path, landmarks_required: bool = True) -> list[Case]:
    """CSV with columns fixed, moving, fixed_landmarks, moving_landmarks (optional with
    ``landmarks_required=False``) and optional case, landmark_format, ground_truth; relative paths
    are relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    required = {"fixed", "moving"} | ({"fixed_landmarks", "moving_landmarks"} if landmarks_required else set())
    if not rows or not required <= set(rows[0]):
        raise InputError(f"{path.name}: manifest needs columns {', '.join(sorted(required))}")

    def resolve(v: str | None) -> Path | None:
        if not v:
            return None
        p = Path(v)
        return p if p.is_absolute() else path.parent / p

    return [Case(r.get("case") or f"pair{i + 1}", resolve(r["fixed"]), resolve(r["moving"]),
                 resolve(r.get("fixed_landmarks")), resolve(r.get("moving_landmarks")), r.get("landmark_format") or "auto",
                 resolve(r.get("ground_truth"))) for i, r in enumerate(rows)]


# --------------------------------------------------------------------------- methods
RegisterFn = Callable[[sitk.Image, sitk.Image, Case], sitk.Transform]


def shipped_model_for(method: str) -> Path:
    """The shipped model of a registry method: ``Resources/Models/<method>/``, else the default model
    when it is that method's."""
    from .methods import method_info
    from .modelfile import default_model_path, read_metadata, resource_path

    method_info(method)
    folder = resource_path(f"Models/{method}")
    if (folder / "model.safetensors").is_file():
        return folder
    if read_metadata(default_model_path()).get("method") == method:
        return default_model_path()
    raise InputError(f"no shipped model for method {method!r}; give one with --model")


def _split_refine(name: str) -> tuple[str, str | None]:
    base, _, level = name.partition(":")
    return base, (level or None)


def method_choices() -> list[str]:
    """What ``--methods`` accepts: the baselines, ``deeplungreg`` (the given or default model) and every
    registry method (its shipped model), each DeepLungReg entry optionally ``:off``/``:fast``/``:full``."""
    from .methods import method_names

    return [*METHODS, *method_names()]


def make_methods(names: Sequence[str], model: str | Path | None = None, device: str = "cpu",
                 elastix_iterations: int = 500, elastix_resolutions: int = 4) -> dict[str, RegisterFn]:
    """Registration functions by name, each returning a fixed -> moving transform.

    ``deeplungreg`` and registry method names may carry a refine level (``deeplungreg:off``); without
    one the command line's default level is used.
    """
    from .refine_levels import DEFAULT_REFINE, REFINE_CHOICES

    choices = method_choices()
    parsed = {n: _split_refine(n) for n in names}
    unknown = [n for n, (base, level) in parsed.items()
               if base not in choices or (level is not None and level not in REFINE_CHOICES)]
    if unknown:
        raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(choices)} "
                         f"(DeepLungReg ones optionally with :{'/:'.join(REFINE_CHOICES)})")
    out: dict[str, RegisterFn] = {}
    for name, (base, level) in parsed.items():
        if base == "identity":
            out[name] = lambda f, m, c: sitk.Transform(3, sitk.sitkIdentity)
        elif base == "affine":
            def affine(f, m, c):
                from .affine import affine_prealign

                lf, lm = lung_mask(f), lung_mask(m)
                return affine_prealign(lf.image, lm.image, lf.mask, lm.mask)
            out[name] = affine
        elif base == "deeplungreg" or base not in METHODS:  # deeplungreg (given/default model) or a registry method
            from .modelfile import default_model_path, load_model, resolve_device
            from .pipeline import register_images

            path = (model or default_model_path()) if base == "deeplungreg" else shipped_model_for(base)
            net, meta = load_model(path, resolve_device(device))
            out[name] = lambda f, m, c, net=net, meta=meta, level=level or DEFAULT_REFINE: register_images(
                f, m, net, meta, resolve_device(device), warp_moving=False, refine=level).transform
        elif base == "elastix":
            from .baselines import elastix_register

            out[name] = lambda f, m, c: elastix_register(f, m, lung_mask(f).mask, elastix_iterations,
                                                         elastix_resolutions)
        elif base == "demons":
            from .baselines import demons_register

            out[name] = lambda f, m, c: demons_register(f, m)
        elif base == "oracle":
            def oracle(f, m, c):
                if c.ground_truth is None:
                    raise InputError(f"{c.name}: the oracle method needs a ground_truth column in the manifest")
                return sitk.ReadTransform(str(c.ground_truth))
            out[name] = oracle
    return out


# --------------------------------------------------------------------------- measuring
def jacobian_on_grid(tx: sitk.Transform, ref: sitk.Image) -> np.ndarray:
    """det(Jacobian) of ``tx`` on the grid of ``ref`` (the same grid for every method)."""
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
    d = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
    return jacobian_determinant(d, ref.GetSpacing(), ref.GetDirection())


def write_view_case(folder: Path, case: Case, method: str, tx: sitk.Transform, det: np.ndarray, ref: sitk.Image,
                    before: np.ndarray, after: np.ndarray) -> None:
    """What ``deeplungreg view EVALDIR --case NAME`` shows for one case: ``folder`` gets the files a
    ``register`` output has (``report.json`` with the input and landmark paths, ``transform.h5``
    fixed -> moving, ``jacobian.nii.gz`` on the harness's Jacobian grid); no warped image (the viewer
    resamples the moving image through the transform)."""
    from .io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(tx, str(folder / "transform.h5"))
    jac = sitk.GetImageFromArray(det.astype(np.float32))
    jac.CopyInformation(ref)
    write_image(jac, folder / "jacobian.nii.gz")
    report = {"fixed": str(Path(case.fixed).resolve()), "moving": str(Path(case.moving).resolve()),
              "landmark_files": {"fixed": str(Path(case.fixed_landmarks).resolve()),
                                 "moving": str(Path(case.moving_landmarks).resolve()), "format": case.landmark_format},
              "method": method, "source": "deeplungreg evaluate", "transform_direction": "fixed -> moving (LPS mm)",
              "tre_mm": {"before": summarize(before), "after": summarize(after)}}
    (folder / "report.json").write_text(json.dumps(report, indent=1))


def evaluate_case(case: Case, methods: dict[str, RegisterFn], figure_dir: Path | None = None,
                  log: Callable[[str], None] = print,
                  qa_methods: Sequence[str] | None = None, view_method: str | None = None) -> tuple[list[dict], dict]:
    """TRE, folding and time of every method on one case; plots into ``figure_dir``. QA pictures for
    ``qa_methods`` (None: every method but identity); ``figure_dir/<case>/`` gets ``view_method``'s
    result in the form ``deeplungreg view`` reads (:func:`write_view_case`)."""
    fixed, moving = read_volume(case.fixed), read_volume(case.moving)
    for img, label in ((fixed, "fixed"), (moving, "moving")):
        if img.HasMetaDataKey(HU_OFFSET_KEY) and float(img.GetMetaData(HU_OFFSET_KEY)) != 0:
            case.notes.append(f"{label} image stored as HU + {img.GetMetaData(HU_OFFSET_KEY)}; shifted to HU")
    fpts = read_landmarks(case.fixed_landmarks, case.landmark_format, fixed)
    mpts = read_landmarks(case.moving_landmarks, case.landmark_format, moving)
    if fpts.shape != mpts.shape:
        raise InputError(f"{case.name}: {len(fpts)} fixed vs {len(mpts)} moving landmarks")
    before = target_registration_error(fpts, mpts)
    ref = resample_isotropic(fixed, JACOBIAN_SPACING_MM)  # folding is measured on this grid for every method
    lung = lung_mask(fixed).mask
    lung_ref = sitk.GetArrayFromImage(sitk.Resample(lung, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    rows, per_landmark, dets = [], {"before": before}, {}
    for name, fn in methods.items():
        t = time.perf_counter()
        tx = fn(fixed, moving, case)
        seconds = time.perf_counter() - t
        after = target_registration_error(transform_points(tx, fpts), mpts)
        det = jacobian_on_grid(tx, ref)
        s = summarize(after)
        rows.append({"case": case.name, "method": name, "tre_mean_before": float(before.mean()),
                     "tre_mean_after": s["mean"], "tre_std_after": s["std"], "tre_p95_after": s["p95"],
                     "tre_max_after": s["max"], "folding_pct": folding_percent(det),
                     "folding_pct_lung": folding_percent(det, lung_ref),
                     "std_log_jacobian_lung": std_log_jacobian(det, lung_ref), "seconds": seconds})
        per_landmark[name] = after
        dets[name] = det
        log(f"{case.name} {name:>12}: TRE {before.mean():6.2f} -> {s['mean']:6.2f} mm, "
            f"folding {rows[-1]['folding_pct']:.3f}%, {seconds:.1f} s")
        if figure_dir is not None and name != "identity" and (qa_methods is None or name in qa_methods):
            qa_figure(case, name, fixed, moving, tx, lung, det, ref, fpts, mpts, rows[-1], figure_dir)
        if figure_dir is not None and name == view_method:
            write_view_case(figure_dir / case.name, case, name, tx, det, ref, before, after)
    if figure_dir is not None:
        jacobian_figure(case.name, ref, dets, figure_dir / f"jacobian_{case.name}.png")
    return rows, per_landmark


def qa_figure(case: Case, method: str, fixed: sitk.Image, moving: sitk.Image, tx: sitk.Transform,
              lung: sitk.Image, det: np.ndarray, ref: sitk.Image, fpts: np.ndarray, mpts: np.ndarray, row: dict,
              out_dir: Path) -> None:
    """The QA picture of one case and method (see :mod:`DeepLungRegLib.qa`), from what the harness holds;
    a failure becomes a note of the case, never an error."""
    from .qa import QAInput, save_figure

    rel = f"qa/{re.sub(r'[^A-Za-z0-9_.-]+', '-', f'{case.name}_{method}')}.png"
    try:
        jac = sitk.GetImageFromArray(det.astype(np.float32))
        jac.CopyInformation(ref)
        (out_dir / "qa").mkdir(parents=True, exist_ok=True)
        save_figure(QAInput(fixed, moving, tx, lung, jac, before=None, before_label="identity, no registration",
                            fixed_points=fpts, moving_points=mpts, fixed_name=case.fixed.name,
                            moving_name=case.moving.name, method=method, folding_percent=row["folding_pct"],
                            folding_percent_lung=row["folding_pct_lung"], seconds=row["seconds"]), out_dir / rel)
        case.qa_figures[method] = rel
    except Exception as exc:  # the numbers matter more than the picture
        case.notes.append(f"QA picture for {method} not written: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- outputs
def write_results(rows: list[dict], per_landmark: dict[str, dict], out_dir: Path, notes: list[str],
                  figures: dict[str, dict[str, str]] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    (out_dir / "results.md").write_text(markdown_table(rows, notes, figures))
    (out_dir / "landmark_errors.json").write_text(json.dumps(
        {case: {m: np.asarray(v).tolist() for m, v in d.items()} for case, d in per_landmark.items()}))
    plot_tre(rows, per_landmark, out_dir)


def markdown_table(rows: list[dict], notes: list[str] | None = None,
                   figures: dict[str, dict[str, str]] | None = None) -> str:
    """Per-case and mean tables, then the notes and links to the QA pictures (``figures[case][method]``)."""
    lines = ["| case | method | TRE before (mm) | TRE after (mm) | p95 (mm) | folding % | folding % lung | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {r['tre_mean_before']:.2f} | {r['tre_mean_after']:.2f} ± "
                     f"{r['tre_std_after']:.2f} | {r['tre_p95_after']:.2f} | {r['folding_pct']:.3f} | "
                     f"{r['folding_pct_lung']:.3f} | {r['seconds']:.1f} |")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines += ["", "Mean over cases:", "", "| method | TRE after (mm) | folding % | time (s) |", "|---|---|---|---|"]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        lines.append(f"| {m} | {np.mean([r['tre_mean_after'] for r in sel]):.2f} | "
                     f"{np.mean([r['folding_pct'] for r in sel]):.3f} | {np.mean([r['seconds'] for r in sel]):.1f} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if figures and any(figures.values()):
        lines += ["", "QA pictures (fixed, moving before, warped, differences, Jacobian, TRE histogram):", ""]
        lines += [f"- {case}, {m}: [{Path(rel).name}]({rel})" for case, d in figures.items() for m, rel in d.items()]
    return "\n".join(lines) + "\n"


def plot_tre(rows: list[dict], per_landmark: dict[str, dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases = list(per_landmark)
    fig, ax = plt.subplots(figsize=(5, 5))
    for m in methods:
        b = np.concatenate([per_landmark[c]["before"] for c in cases])
        a = np.concatenate([per_landmark[c][m] for c in cases])
        ax.scatter(b, a, s=6, alpha=0.5, label=m)
    lim = max(1.0, max(float(np.max(per_landmark[c]["before"])) for c in cases))
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set(xlabel="TRE before (mm)", ylabel="TRE after (mm)", title="Landmark errors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "tre_scatter.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(cases) * len(methods) / 2), 4))
    data, labels = [], []
    for c in cases:
        for m in ["before", *methods]:
            data.append(per_landmark[c][m])
            labels.append(f"{c}\n{m}")
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=90, fontsize=7)
    ax.set(ylabel="TRE (mm)", title="TRE per case and method")
    fig.tight_layout()
    fig.savefig(out_dir / "tre_boxplots.png", dpi=100)
    plt.close(fig)


def jacobian_figure(case: str, ref: sitk.Image, dets: dict[str, np.ndarray], path: Path) -> None:
    """Coronal slice of each method's det(Jacobian) on the shared grid ``ref``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dets)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        det = dets[name]
        j = det.shape[1] // 2  # coronal slice through the middle
        im = ax.imshow(det[:, j, :], origin="lower", cmap="RdBu_r", vmin=0, vmax=2, aspect=ref.GetSpacing()[2] / ref.GetSpacing()[0])
        ax.set_title(f"{name}", fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="det(Jacobian)")
    fig.suptitle(f"{case}: coronal Jacobian determinant")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate(cases: list[Case], methods: dict[str, RegisterFn], out_dir: Path,
             log: Callable[[str], None] = print, qa_methods: Sequence[str] | None = None,
             view_method: str | None = None) -> list[dict]:
    """Run every method on every case and write results.csv, results.md, the PNG plots, the QA pictures
    (of ``qa_methods``; None: every method but identity) and, for ``view_method``, one folder per case
    that ``deeplungreg view OUT --case NAME`` shows."""
    rows, per_landmark, notes, figures = [], {}, [], {}
    for case in cases:
        r, pl = evaluate_case(case, methods, out_dir, log, qa_methods, view_method)
        rows += r
        per_landmark[case.name] = pl
        notes += [f"{case.name}: {n}" for n in case.notes]
        figures[case.name] = case.qa_figures
    write_results(rows, per_landmark, out_dir, notes, figures)
    return rows
