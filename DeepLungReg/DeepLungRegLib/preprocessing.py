"""Lung mask, lung crop and resampling to the network grid (Eppenhof & Pluim 2018).

All geometry is ITK geometry (LPS mm). The *network grid* is a ``G × G × G`` lattice
with the fixed image's direction cosines whose first and last voxel centres span the
lung bounding box plus a margin; its spacing is generally anisotropic. Resampling onto
it is done by SimpleITK, so the predicted field maps back to millimetres exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage import measure, morphology

from .errors import InputError
from .geometry import Lattice

#: Intensity normalisation shared by training and inference: HU window mapped to [0, 1].
NORMALISATION = {"kind": "hu_window", "hu_min": -1000.0, "hu_max": 200.0}

LUNG_THRESHOLD_HU = -250.0
MASK_SPACING_MM = 3.0
MIN_LUNG_ML = 100.0


def normalise_hu(arr: np.ndarray, norm: dict = NORMALISATION) -> np.ndarray:
    """Map HU linearly so that ``hu_min -> 0`` and ``hu_max -> 1``, clipped to [0, 1]."""
    lo, hi = float(norm["hu_min"]), float(norm["hu_max"])
    return np.clip((arr.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def resample_isotropic(img: sitk.Image, spacing_mm: float, interpolator=sitk.sitkLinear,
                       default: float = -1000.0, pixel_type: int | None = None) -> sitk.Image:
    """Resample onto a grid of the same box and direction with (at least) the given spacing,
    as ``pixel_type`` (default: the input's; ITK interpolates in double either way)."""
    spacing = np.maximum(np.asarray(img.GetSpacing()), spacing_mm)
    size = np.asarray(img.GetSize())
    new_size = np.maximum(np.round(size * np.asarray(img.GetSpacing()) / spacing), 1).astype(int)
    new_spacing = size * np.asarray(img.GetSpacing()) / new_size
    # Keep the box: the new first voxel centre is half a new voxel inside the old box edge.
    m = np.asarray(img.GetDirection()).reshape(3, 3)
    edge = np.asarray(img.GetOrigin()) - m @ (0.5 * np.asarray(img.GetSpacing()))
    origin = edge + m @ (0.5 * new_spacing)
    return sitk.Resample(img, [int(s) for s in new_size], sitk.Transform(), interpolator,
                         origin.tolist(), new_spacing.tolist(), img.GetDirection(), default,
                         img.GetPixelID() if pixel_type is None else pixel_type)


@dataclass
class LungMaskResult:
    mask: sitk.Image          # uint8, on a coarse grid (~3 mm) covering the image
    image: sitk.Image         # the CT resampled onto that coarse grid (used by the affine step)
    volume_ml: float
    fallback: bool            # True when the border-touching rule removed the lungs (cropped scans)


#: A lung mask is accepted only within these volumes (both lungs at full inhale rarely exceed 8 l;
#: a crop holding the lung bases or apices can hold little).
PLAUSIBLE_LUNG_ML = (50.0, 12000.0)
#: Low-density regions whose median (on the ~3 mm copy) is below this are air, not lung
#: parenchyma (measured: lungs -971..-777 HU, air around the body and bowel gas -987..-1034 HU).
AIR_MEDIAN_HU = -980.0
#: ... and above this they are partial-volume rims (skin, fat, bowel walls: -500..-250 HU), not lung.
RIM_MEDIAN_HU = -600.0


def lung_mask(img: sitk.Image, spacing_mm: float = MASK_SPACING_MM, check: bool = True) -> LungMaskResult:
    """Rough lung mask: HU < -250, exterior air removed, large components kept, cleaned.

    The exterior is every low-density component touching the in-plane border (the air
    around the patient). Scans cropped inside the thorax have lungs that touch the
    border too; when the rule leaves less than 100 ml, ``fallback`` is set and the large
    low-density components are kept without it, except air: a component touching all four
    in-plane sides (air around the body) is reduced to its part inside the body (the
    tissue above -500 HU with each axial slice's holes filled), and components whose
    median is not lung-like are dropped: below -980 HU (air, bowel gas) or above -600 HU
    (partial-volume rims of skin, fat and bowel walls).

    With ``check`` (the default), a result that is not a plausible lung is refused with an
    :class:`InputError` saying what was found: a volume outside 50 ml .. 12 l (e.g. an
    abdomen crop, a tiny cube, an image of air).
    """
    small = resample_isotropic(img, spacing_mm, pixel_type=sitk.sitkFloat32)  # int16 in: float32 out, unrounded
    arr = sitk.GetArrayViewFromImage(small)
    low = arr < LUNG_THRESHOLD_HU
    labels = measure.label(low, connectivity=1)
    voxel_ml = float(np.prod(small.GetSpacing())) / 1000.0

    def keep_large(lbl: np.ndarray, exclude: set[int]) -> np.ndarray:
        counts = np.bincount(lbl.ravel())
        counts[0] = 0
        for e in exclude:
            counts[e] = 0
        if counts.max() == 0:
            return np.zeros(lbl.shape, bool)
        keep = np.flatnonzero(counts >= max(0.1 * counts.max(), 1))
        return np.isin(lbl, keep)

    border = set(np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel(),
    ])).tolist()) - {0}
    mask = keep_large(labels, border)
    fallback = mask.sum() * voxel_ml < MIN_LUNG_ML
    notes = []
    if fallback:
        candidates, notes = _fallback_candidates(arr, labels, voxel_ml)
        mask = keep_large(candidates, set())
    if mask.any():
        mask = ndimage.binary_closing(mask, structure=morphology.ball(2), border_value=0)
        mask = ndimage.binary_fill_holes(mask)
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(small)
    volume = float(mask.sum() * voxel_ml)
    if check and not PLAUSIBLE_LUNG_ML[0] <= volume <= PLAUSIBLE_LUNG_ML[1]:
        what = f"{volume:.0f} ml of lung-like tissue" + (f" ({'; '.join(notes)})" if notes else "")
        raise InputError(f"no plausible lung in the image: found {what}; a lung needs "
                         f"{PLAUSIBLE_LUNG_ML[0]:.0f} ml to {PLAUSIBLE_LUNG_ML[1] / 1000:.0f} l below "
                         f"{LUNG_THRESHOLD_HU:.0f} HU inside the body")
    return LungMaskResult(out, small, volume, bool(fallback))


def _fallback_candidates(arr: np.ndarray, labels: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, list[str]]:
    """Low-density components of a cropped scan that may be lung (see :func:`lung_mask`), as a
    label image, and notes on what was dropped."""
    notes: list[str] = []
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    out = np.zeros(labels.shape, np.int32)
    body = None
    n = 0
    big = np.flatnonzero(counts * voxel_ml >= 1.0)  # components of 1 ml or more, largest first
    for lbl in big[np.argsort(counts[big])[::-1]][:50]:
        comp = labels == lbl
        sides = (comp[:, 0, :].any(), comp[:, -1, :].any(), comp[:, :, 0].any(), comp[:, :, -1].any())
        if all(sides):
            if body is None:
                body = np.stack([ndimage.binary_fill_holes(sl) for sl in arr > -500.0])
            inner = comp & body
            notes.append(f"{counts[lbl] * voxel_ml:.0f} ml touching all four sides is air around the body")
            parts, n_parts = ndimage.label(inner)  # 6-connectivity, as the components above
            if n_parts:
                index = np.arange(1, n_parts + 1)
                medians = np.asarray(ndimage.median(arr, labels=parts, index=index))
                keep = index[(medians >= AIR_MEDIAN_HU) & (medians <= RIM_MEDIAN_HU)]
                relabel = np.zeros(n_parts + 1, np.int32)
                relabel[keep] = np.arange(n + 1, n + 1 + len(keep), dtype=np.int32)
                kept = relabel[parts]
                out = np.where(kept > 0, kept, out)
                n += len(keep)
            continue
        med = float(np.median(arr[comp]))
        if not AIR_MEDIAN_HU <= med <= RIM_MEDIAN_HU:
            if len(notes) < 3:
                notes.append(f"{counts[lbl] * voxel_ml:.0f} ml of {'air' if med < AIR_MEDIAN_HU else 'tissue rims'} "
                             f"(median {med:.0f} HU)")
            continue
        n += 1
        out[comp] = n
    return out, notes


#: The network grid is a :class:`~DeepLungRegLib.geometry.Lattice` (name kept for readers of old code).
NetworkGrid = Lattice


def mask_box_in_frame(masks: list[sitk.Image], frame: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box of the masks' voxels (their full extent) in ``frame``'s axes, mm relative to its origin."""
    m_frame = np.asarray(frame.GetDirection()).reshape(3, 3)
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for mask in masks:
        idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)  # (i, j, k)
        if idx.size == 0:
            continue
        corners = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
        pts_idx = np.concatenate([idx.min(0) + corners, idx.max(0) + corners])
        m = np.asarray(mask.GetDirection()).reshape(3, 3) * np.asarray(mask.GetSpacing())[None, :]
        pts = np.asarray(mask.GetOrigin())[None, :] + pts_idx @ m.T
        q = (pts - np.asarray(frame.GetOrigin())[None, :]) @ m_frame
        lo, hi = np.minimum(lo, q.min(0)), np.maximum(hi, q.max(0))
    if not np.isfinite(lo).all():
        return None
    return lo, hi


def network_grid(fixed: sitk.Image, masks: list[sitk.Image], grid_size: int | tuple[int, int, int] = 128,
                 margin_mm: float = 10.0) -> NetworkGrid:
    """The lattice spanning the masks' bounding box plus ``margin_mm``, clipped to the fixed image."""
    size = (grid_size,) * 3 if isinstance(grid_size, int) else tuple(grid_size)
    sp = np.asarray(fixed.GetSpacing())
    n = np.asarray(fixed.GetSize())
    img_lo, img_hi = np.zeros(3), (n - 1) * sp  # voxel centres of the fixed image, in its own axes
    box = mask_box_in_frame(masks, fixed)
    if box is None:
        lo, hi = img_lo, img_hi
    else:
        lo = np.maximum(box[0] - margin_mm, img_lo)
        hi = np.minimum(box[1] + margin_mm, img_hi)
        if np.any(hi - lo < 10.0):
            raise InputError("lung mask bounding box is degenerate (under 1 cm along an axis)")
    m = np.asarray(fixed.GetDirection()).reshape(3, 3)
    origin = np.asarray(fixed.GetOrigin()) + m @ lo
    spacing = (hi - lo) / (np.asarray(size) - 1)
    return NetworkGrid(tuple(origin.tolist()), tuple(spacing.tolist()), tuple(fixed.GetDirection()),
                       tuple(int(s) for s in size))


def resample_to_grid(img: sitk.Image, grid: NetworkGrid, transform: sitk.Transform | None = None,
                     interpolator=sitk.sitkLinear, default: float = -1000.0) -> np.ndarray:
    """Values of ``img`` at the grid's voxel centres, optionally through ``transform``
    (grid point -> image point). Returns a float32 array ``(D, H, W)``."""
    out = sitk.Resample(img, grid.reference(), transform or sitk.Transform(), interpolator, default,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def resample_mask_to_grid(mask: sitk.Image, grid: NetworkGrid, transform: sitk.Transform | None = None) -> np.ndarray:
    out = sitk.Resample(mask, grid.reference(sitk.sitkUInt8), transform or sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


@dataclass
class PreparedScan:
    """One scan on its network grid, as used for training pairs."""

    image: np.ndarray     # (D, H, W) float32 in [0, 1]
    mask: np.ndarray      # (D, H, W) bool lung mask
    grid: NetworkGrid
    fallback_mask: bool


def prepare_scan(img: sitk.Image, grid_size: int = 128, margin_mm: float = 10.0) -> PreparedScan:
    """Lung crop + resample + normalisation of a single scan (training input)."""
    lm = lung_mask(img)
    if lm.volume_ml == 0:
        raise InputError("no lung found (no region below -250 HU)")
    grid = network_grid(img, [lm.mask], grid_size, margin_mm)
    image = normalise_hu(resample_to_grid(img, grid))
    mask = resample_mask_to_grid(lm.mask, grid)
    return PreparedScan(image, mask, grid, lm.fallback)
