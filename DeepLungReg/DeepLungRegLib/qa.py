"""The QA picture of one registration (``qa.png``): see whether the lungs line up.

Made from images already in memory (no volume is read again). Three planes through the lungs are
resampled, in LPS axes, on a coarse in-plane grid (at most :data:`MAX_PIXELS` pixels across the
fixed image, never finer than its finest spacing) -- a few SimpleITK resamples of 2D slices, so the
figure costs a fraction of a second even for a 512 x 512 x 100 CT.

Slice rule (:func:`lung_centre`): the axial and coronal planes pass through the centroid of the fixed
lung mask; the sagittal plane through the centroid of the larger lung (the side of that centroid
holding more lung voxels), since the midline between the lungs is the mediastinum. A plane that
misses the mask anyway (an odd mask shape) moves to the slice holding the most lung.

Layout: one row per plane (axial, coronal, sagittal), columns :data:`KINDS` (fixed; moving before
registration -- resampled through ``QAInput.before``, the affine pre-alignment or the identity,
as the column title says; warped moving; fixed - moving before and after on one symmetric scale;
det(Jacobian) on a log scale centred at 1 with folding, det <= 0, in :data:`FOLDING_COLOUR`), then a
TRE histogram before/after when landmarks are given. Every panel is drawn with its physical aspect
ratio (``imshow`` extents in mm); radiological display: patient left on the image right.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import image_lattice
from .metrics import target_registration_error

MAX_PIXELS = 256
HU_WINDOW = (-1000.0, 200.0)
JACOBIAN_RANGE = (0.5, 2.0)
FOLDING_COLOUR = "lime"
PLANES = ("axial", "coronal", "sagittal")
KINDS = ("fixed", "before", "warped", "diff_before", "diff_after", "jacobian")
#: (left, right, top, bottom) letters of each plane as drawn
SIDES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
ORIENTATION_NOTE = ("Radiological display: patient left on the image RIGHT (axial, coronal); "
                    "anterior at the top (axial) and on the left (sagittal); superior at the top.")


@dataclass
class QAInput:
    """What the figure shows; every image is in LPS mm, on any grid covering the fixed image."""

    fixed: sitk.Image
    moving: sitk.Image
    transform: sitk.Transform               # the registration, fixed -> moving points
    lung: sitk.Image                        # fixed lung mask
    jacobian: sitk.Image                    # det(Jacobian) of ``transform``
    before: sitk.Transform | None = None    # "before registration" (the affine alone); None: identity
    before_label: str = "identity"
    fixed_points: np.ndarray | None = None  # landmarks (N, 3) LPS mm
    moving_points: np.ndarray | None = None
    fixed_name: str = "fixed"
    moving_name: str = "moving"
    method: str = ""
    refine: str | None = None
    folding_percent: float | None = None
    folding_percent_lung: float | None = None
    seconds: float | None = None
    seconds_label: str = "time"             # "<label> <seconds> s" in the title


@dataclass
class Planes:
    """The three planes, sampled: ``images[plane][kind]`` 2D arrays (plus ``"lung"``), their
    ``imshow`` extents (mm) and origins, the LPS point they pass through and the rule that chose it."""

    point: np.ndarray
    pixel_mm: float
    rule: str
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    extent: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- choosing and sampling planes
def _marginals(mask: np.ndarray, steps: tuple[int, int, int]) -> list[np.ndarray]:
    """Lung voxel counts per index along i, j, k of the strided mask (k, j, i)."""
    sub = mask[::steps[0], ::steps[1], ::steps[2]] > 0
    kj = sub.sum(axis=2, dtype=np.int64)
    return [sub.sum(axis=(0, 1), dtype=np.int64), kj.sum(axis=0), kj.sum(axis=1)]


def lung_centre(lung: sitk.Image) -> tuple[np.ndarray, float, str]:
    """``(centroid, sagittal_x, rule)``: the lung centroid (LPS mm) and the x of the larger lung's centroid."""
    arr = sitk.GetArrayViewFromImage(lung)
    steps = (max(1, math.ceil(arr.shape[0] / 128)), max(1, math.ceil(arr.shape[1] / 128)),
             max(1, math.ceil(arr.shape[2] / 128)))
    counts = _marginals(arr, steps)  # along i, j, k
    lat = image_lattice(lung)
    total = counts[0].sum()
    if total == 0:
        centre = lat.index_to_lps((np.asarray(lat.size, float)[None] - 1) / 2)[0]
        return centre, float(centre[0]), "image centre (empty lung mask)"
    step_ijk = (steps[2], steps[1], steps[0])
    idx = [np.arange(len(c)) * s for c, s in zip(counts, step_ijk, strict=True)]
    c_ijk = np.array([float((i * c).sum() / total) for i, c in zip(idx, counts, strict=True)])
    centre = lat.index_to_lps(c_ijk[None])[0]
    # sagittal: the index axis closest to LPS x, split at the centroid, the side with more lung
    a = int(np.argmax(np.abs(np.asarray(lung.GetDirection()).reshape(3, 3)[0])))
    low = idx[a] < c_ijk[a]
    side = low if counts[a][low].sum() >= counts[a][~low].sum() else ~low
    side_ijk = c_ijk.copy()
    side_ijk[a] = float((idx[a][side] * counts[a][side]).sum() / counts[a][side].sum())
    x = float(lat.index_to_lps(side_ijk[None])[0][0])
    return centre, x, "axial, coronal: lung centroid; sagittal: centroid of the larger lung"


def _bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(img.GetSize(), float) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    pts = image_lattice(img).index_to_lps(corners)
    return pts.min(axis=0), pts.max(axis=0)


def _plane_reference(plane: str, point: np.ndarray, lo: np.ndarray, n: np.ndarray, p: float) -> sitk.Image:
    origin, size = lo.copy(), n.copy()
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    origin[axis], size[axis] = point[axis], 1
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetSpacing((p, p, p))
    return ref


def _slice2d(plane: str, arr: np.ndarray) -> np.ndarray:
    return {"axial": lambda a: a[0], "coronal": lambda a: a[:, 0, :], "sagittal": lambda a: a[:, :, 0]}[plane](arr)


def _extent(plane: str, lo: np.ndarray, n: np.ndarray, p: float) -> tuple[tuple[float, float, float, float], str]:
    def span(axis):
        return lo[axis] - p / 2, lo[axis] + (n[axis] - 0.5) * p

    x, y, z = span(0), span(1), span(2)
    if plane == "axial":  # rows: y (anterior at the top), columns: x (patient left on the right)
        return (x[0], x[1], y[1], y[0]), "upper"
    if plane == "coronal":  # rows: z (superior at the top), columns: x
        return (x[0], x[1], z[0], z[1]), "lower"
    return (y[0], y[1], z[0], z[1]), "lower"  # sagittal: columns y (anterior on the left)


def _resample(img: sitk.Image, ref: sitk.Image, tx: sitk.Transform | None, interp, default: float) -> np.ndarray:
    out = sitk.Resample(img, ref, tx if tx is not None else sitk.Transform(), interp, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def sample_planes(data: QAInput, max_pixels: int = MAX_PIXELS) -> Planes:
    """Resample every image of ``data`` on the three planes (LPS axes, square pixels of ``pixel_mm``)."""
    lo, hi = _bounds(data.fixed)
    p = max(float(min(data.fixed.GetSpacing())), float((hi - lo).max()) / max_pixels)
    n = np.floor((hi - lo) / p).astype(int) + 1
    centre, x_side, rule = lung_centre(data.lung)
    point = centre.copy()
    point[0] = x_side
    planes = Planes(point, p, rule)
    lin, nn = sitk.sitkLinear, sitk.sitkNearestNeighbor
    for plane in PLANES:
        ref = _plane_reference(plane, point, lo, n, p)
        lung = _slice2d(plane, _resample(data.lung, ref, None, nn, 0)) > 0
        if not lung.any() and sitk.GetArrayViewFromImage(data.lung).any():
            axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
            point[axis] = _most_lung(data.lung, axis)
            planes.rule += f"; {plane}: the slice with most lung"
            ref = _plane_reference(plane, point, lo, n, p)
            lung = _slice2d(plane, _resample(data.lung, ref, None, nn, 0)) > 0
        fixed = _slice2d(plane, _resample(data.fixed, ref, None, lin, HU_WINDOW[0]))
        before = _slice2d(plane, _resample(data.moving, ref, data.before, lin, HU_WINDOW[0]))
        warped = _slice2d(plane, _resample(data.moving, ref, data.transform, lin, HU_WINDOW[0]))
        jac = _slice2d(plane, _resample(data.jacobian, ref, None, nn, 1.0))
        planes.images[plane] = {"fixed": fixed, "before": before, "warped": warped, "diff_before": fixed - before,
                                "diff_after": fixed - warped, "jacobian": jac, "lung": lung}
        planes.extent[plane], planes.origin[plane] = _extent(plane, lo, n, p)
    return planes


def _most_lung(lung: sitk.Image, lps_axis: int) -> float:
    """LPS coordinate (along ``lps_axis``) of the index slice holding the most lung voxels."""
    a = int(np.argmax(np.abs(np.asarray(lung.GetDirection()).reshape(3, 3)[lps_axis])))
    counts = _marginals(sitk.GetArrayViewFromImage(lung), (1, 1, 1))[a]
    ijk = (np.asarray(lung.GetSize(), float) - 1) / 2
    ijk[a] = float(np.argmax(counts))
    return float(image_lattice(lung).index_to_lps(ijk[None])[0][lps_axis])


# --------------------------------------------------------------------------- the figure
def _title(data: QAInput, tre: tuple[np.ndarray, np.ndarray] | None) -> list[str]:
    parts = [f"method {data.method}" if data.method else None,
             f"refine {data.refine}" if data.refine else None,
             f"TRE {tre[0].mean():.2f} -> {tre[1].mean():.2f} mm (mean, {len(tre[0])} landmarks)" if tre else None,
             (f"folding {data.folding_percent:.4f}%" + (f" (lung {data.folding_percent_lung:.4f}%)"
                                                         if data.folding_percent_lung is not None else ""))
             if data.folding_percent is not None else None,
             f"{data.seconds_label} {data.seconds:.1f} s" if data.seconds is not None else None]
    return [f"fixed: {data.fixed_name}    moving: {data.moving_name}", "  |  ".join(p for p in parts if p)]


def build_figure(data: QAInput, planes: Planes | None = None):
    """The QA figure (a :class:`matplotlib.figure.Figure`, no pyplot): image panels are labelled
    ``"<plane>/<kind>"``, the histogram ``"tre"``."""
    from matplotlib import colormaps, colors
    from matplotlib.figure import Figure

    planes = planes or sample_planes(data)
    tre = tre_before = None
    if data.fixed_points is not None and data.moving_points is not None and len(data.fixed_points):
        def tre_of(tx):
            mapped = np.asarray([tx.TransformPoint([float(v) for v in p]) for p in data.fixed_points])
            return target_registration_error(mapped, data.moving_points)

        tre = (target_registration_error(data.fixed_points, data.moving_points), tre_of(data.transform))
        tre_before = tre_of(data.before) if data.before is not None else None
    ratios = []
    for plane in PLANES:
        e = planes.extent[plane]
        ratios.append(float(np.clip(abs(e[3] - e[2]) / abs(e[1] - e[0]), 0.3, 3.0)))
    col_w = 2.3
    heights = [col_w * r for r in ratios] + [0.12 * col_w] + ([1.9] if tre else [])
    top_in, bottom_in = 0.75, 0.95
    fig_h = sum(heights) + top_in + bottom_in + 0.35 * len(heights)
    fig = Figure(figsize=(6 * col_w + 0.6, fig_h), dpi=100)
    gs = fig.add_gridspec(len(heights), 6, height_ratios=heights, left=0.035, right=0.995, top=1 - top_in / fig_h,
                          bottom=bottom_in / fig_h, wspace=0.04, hspace=0.35 * len(heights) / sum(heights))
    d_all = np.concatenate([planes.images[pl]["diff_before"].ravel() for pl in PLANES])
    dlim = float(max(100.0, np.ceil(np.percentile(np.abs(d_all), 95) / 50.0) * 50.0))  # vessels saturate
    jac_cmap = colormaps["RdBu_r"].with_extremes(bad=FOLDING_COLOUR)
    styles = {"fixed": dict(cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1]),
              "diff": dict(cmap="PuOr_r", vmin=-dlim, vmax=dlim),
              "jacobian": dict(cmap=jac_cmap, norm=colors.LogNorm(*JACOBIAN_RANGE))}
    titles = {"fixed": "fixed", "before": f"moving before ({data.before_label})", "warped": "warped moving",
              "diff_before": "fixed - moving before", "diff_after": "fixed - warped moving",
              "jacobian": "det(Jacobian), lime: folding"}
    shown = {}
    for r, plane in enumerate(PLANES):
        ext, org = planes.extent[plane], planes.origin[plane]
        for c, kind in enumerate(KINDS):
            ax = fig.add_subplot(gs[r, c], label=f"{plane}/{kind}")
            img = planes.images[plane][kind]
            style = styles["diff" if kind.startswith("diff") else "jacobian" if kind == "jacobian" else "fixed"]
            if kind == "jacobian":
                img = np.ma.masked_less_equal(img, 0.0)  # folding -> the "bad" colour
            shown[kind] = ax.imshow(img, extent=ext, origin=org, interpolation="nearest", aspect="equal",
                                    **style)
            if kind == "jacobian" and planes.images[plane]["lung"].any():
                ax.contour(planes.images[plane]["lung"].astype(np.float32), levels=[0.5], colors="k",
                           linewidths=0.4, extent=ext, origin=org)
            ax.set_axis_off()  # (no ticks, no spines: a third of the drawing time)
            if r == 0:
                ax.set_title(titles[kind], fontsize=8.5)
            if c == 0:
                axis = 2 - r  # the LPS axis normal to the plane
                ax.text(-0.04, 0.5, f"{plane} ({'xyz'[axis]} = {planes.point[axis]:.0f} mm)", rotation=90,
                        transform=ax.transAxes, ha="right", va="center", fontsize=8.5)
                left, right, top, bottom = SIDES[plane]
                for x, y, s, ha, va in ((0.02, 0.5, left, "left", "center"), (0.98, 0.5, right, "right", "center"),
                                        (0.5, 0.98, top, "center", "top"), (0.5, 0.02, bottom, "center", "bottom")):
                    ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8,
                            fontweight="bold", bbox=dict(facecolor="black", alpha=0.6, pad=0.8, linewidth=0))
    cb = len(PLANES)
    bar = fig.colorbar(shown["fixed"], cax=fig.add_subplot(gs[cb, 0:3], label="colorbar/hu"),
                       orientation="horizontal")
    bar.set_label("HU", fontsize=8, labelpad=1)
    bar = fig.colorbar(shown["diff_before"], cax=fig.add_subplot(gs[cb, 3:5], label="colorbar/diff"),
                       orientation="horizontal", extend="both")
    bar.set_label("fixed - moving (HU), same scale before and after", fontsize=8, labelpad=1)
    cax = fig.add_subplot(gs[cb, 5], label="colorbar/jacobian")
    bar = fig.colorbar(shown["jacobian"], cax=cax, orientation="horizontal", extend="both")
    bar.minorticks_off()
    bar.set_ticks([0.5, 0.71, 1.0, 1.41, 2.0], labels=["0.5", "0.71", "1", "1.41", "2"])
    bar.set_label("det (log scale); lime: folding", fontsize=8, labelpad=1)
    for b in fig.axes[-3:]:
        b.tick_params(labelsize=7)
    if tre:
        ax = fig.add_subplot(gs[cb + 1, 1:5], label="tre")
        bins = np.linspace(0.0, max(float(tre[0].max()), float(tre[1].max()), 1e-3) * 1.02, 41)
        for values, name, colour in ((tre[0], "before (no registration)", "tab:gray"),
                                     (tre[1], "after registration", "tab:blue")):
            ax.hist(values, bins=bins, color=colour, alpha=0.55, label=f"{name}: mean {values.mean():.2f} mm")
            ax.axvline(values.mean(), color=colour, lw=1.5, ls="--")
        if tre_before is not None:  # the "moving before" column's transform, as an outline
            ax.hist(tre_before, bins=bins, histtype="step", color="tab:orange", lw=1.2,
                    label=f"{data.before_label}: mean {tre_before.mean():.2f} mm")
            ax.axvline(tre_before.mean(), color="tab:orange", lw=1.2, ls=":")
        ax.set_xlabel("target registration error (mm); vertical lines: means", fontsize=8)
        ax.set_ylabel("landmarks", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7.5, frameon=False)
    title = _title(data, tre)
    fig.text(0.5, 1 - 0.12 / fig_h, title[0], ha="center", va="top", fontsize=10, fontweight="bold")
    fig.text(0.5, 1 - 0.38 / fig_h, title[1], ha="center", va="top", fontsize=9)
    fig.text(0.01, 0.30 / fig_h, f"{ORIENTATION_NOTE} Planes in LPS axes through x, y, z = "
             f"{', '.join(f'{v:.0f}' for v in planes.point)} mm ({planes.rule}); {planes.pixel_mm:.2f} mm pixels.",
             fontsize=7, va="bottom")
    fig.text(0.01, 0.08 / fig_h, f"Moving before = the moving image resampled through {data.before_label}. "
             f"det(Jacobian): blue compression, red expansion, {FOLDING_COLOUR} folding (det \u2264 0); "
             "black line: fixed lung mask.", fontsize=7, va="bottom")
    return fig


def render_png(data: QAInput) -> bytes:
    """The figure as PNG bytes (nothing written). Raises on any failure."""
    import io

    buf = io.BytesIO()
    build_figure(data).savefig(buf, format="png", dpi=100,
                               pil_kwargs={"compress_level": 1})  # level 6 costs 0.2 s for 2 % smaller
    return buf.getvalue()


def save_figure(data: QAInput, path: str | Path) -> float:
    """Build and write the figure as PNG; returns the seconds it took. Raises on any failure."""
    t = time.perf_counter()
    Path(path).write_bytes(render_png(data))
    return time.perf_counter() - t
