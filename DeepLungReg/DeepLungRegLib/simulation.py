"""Breathing-like test pairs from one inhale CT (for the demo and for evaluation).

Distinct from the training generator (random B-splines): the motion here is shaped like
breathing. The field is built on the *moving* (exhale) grid as ``v``: a moving point ``y``
shows the tissue that sits at ``y + v(y)`` in the fixed (inhale) image, so

* ``moving(y) = fixed(y + v(y))`` with a mass-preserving density change inside the lungs:
  ``HU + 1000`` is multiplied by ``det(I + ∇v)(y)`` (an exhaled lung is denser);
* a landmark ``q`` found in the moving image corresponds exactly to ``p = q + v(q)`` in the
  fixed image;
* the ground-truth fixed -> moving mapping ``T(x) = x + u(x)`` is the inverse of
  ``Id + v``; ``u`` is computed by fixed-point iteration.

Motion (LPS mm; +z is superior): cranio-caudal largest at the lung bases (the inhale
position is ``amplitude_base`` mm inferior to the exhale one) and ``amplitude_apex`` at the
apices, anterior-posterior expansion and lateral expansion of a few mm, all weighted by the
lung mask smoothed sharply in-plane (sliding at the lateral pleura) and smoothly along z
(abdominal organs follow the diaphragm); tissue outside moves ``outside_fraction`` as much.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.feature import peak_local_max

from .io import index_to_physical
from .metrics import jacobian_determinant
from .preprocessing import lung_mask, mask_box_in_frame, resample_isotropic


@dataclass
class BreathingParams:
    amplitude_base: float = 15.0     # mm, cranio-caudal at the lung bases
    amplitude_apex: float = 2.0      # mm, cranio-caudal at the apices
    amplitude_ap: float = 4.0        # mm, anterior-posterior (inhale is anterior)
    amplitude_lateral: float = 2.5   # mm, outward at the lateral lung borders at inhale
    outside_fraction: float = 0.15
    sigma_inplane_mm: float = 3.0
    sigma_z_mm: float = 15.0
    lattice_mm: float = 2.0
    n_landmarks: int = 300
    seed: int = 0


@dataclass
class SimulatedPair:
    fixed: sitk.Image
    moving: sitk.Image
    v: sitk.Image                  # moving -> fixed displacement (vector, LPS mm) on a lattice
    u: sitk.Image                  # fixed -> moving ground truth (vector, LPS mm) on the same lattice
    lung_mask: sitk.Image          # fixed lung mask (coarse grid)
    fixed_landmarks: np.ndarray    # (N, 3) LPS mm
    moving_landmarks: np.ndarray   # (N, 3) LPS mm
    min_jacobian: float


def _vector_image(arr_xyz: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr_xyz, 0, -1), dtype=np.float64), isVector=True)
    img.CopyInformation(ref)
    return img


def breathing_motion_mm(x, y, z, lo, hi, amplitude_base: float, amplitude_apex: float, amplitude_ap: float,
                        amplitude_lateral: float) -> tuple:
    """The breathing motion model, shared by this simulator (NumPy) and the training generator
    (:mod:`DeepLungRegTrainingLib.breathing`, torch): ``(vx, vy, vz)`` in LPS mm at the points
    ``x, y, z`` (arrays or tensors of one shape, LPS mm), moving (exhale) -> fixed (inhale), before
    the lung weighting. ``lo``, ``hi``: the lung box's corners (x, y, z; same frame as the points).

    Cranio-caudal: ``-amplitude_apex`` at the top of the box growing as ``s^1.5`` to ``-amplitude_base``
    at its bottom (``s`` 0 at the apex, 1 at the base: the inhale position is inferior); anterior-
    posterior: ``-amplitude_ap`` at the anterior wall to 0 at the posterior wall, halved at the apex
    (inhale is anterior); lateral: ``±amplitude_lateral`` at the box's left/right sides, 0 at its middle."""
    s = ((hi[2] - z) / max(hi[2] - lo[2], 1.0)).clip(0, 1)          # 0 apex, 1 base
    t_ap = ((hi[1] - y) / max(hi[1] - lo[1], 1.0)).clip(0, 1)       # 1 anterior wall, 0 posterior
    half = max(0.5 * (hi[0] - lo[0]), 1.0)
    vz = -(amplitude_apex + (amplitude_base - amplitude_apex) * s**1.5)
    vy = -amplitude_ap * t_ap * (0.5 + 0.5 * s)
    vx = amplitude_lateral * ((x - 0.5 * (lo[0] + hi[0])) / half).clip(-1, 1)
    return vx, vy, vz


def breathing_field(fixed: sitk.Image, params: BreathingParams) -> tuple[sitk.Image, sitk.Image]:
    """Return ``(v, lung_mask)``: ``v`` (moving -> fixed, mm) on a lattice covering the image."""
    lm = lung_mask(fixed)
    lattice = resample_isotropic(fixed, params.lattice_mm)
    mask = sitk.GetArrayFromImage(sitk.Resample(lm.mask, lattice, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    sp = np.asarray(lattice.GetSpacing())
    weight = ndimage.gaussian_filter(mask.astype(np.float64),
                                     sigma=(params.sigma_z_mm / sp[2], params.sigma_inplane_mm / sp[1],
                                            params.sigma_inplane_mm / sp[0]))
    weight = params.outside_fraction + (1 - params.outside_fraction) * np.clip(weight / max(weight.max(), 1e-6), 0, 1)
    # Physical coordinates of lattice nodes (LPS) and the lung box.
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in mask.shape), indexing="ij")
    idx = np.stack((ii, jj, kk), -1).reshape(-1, 3)
    pts = index_to_physical(lattice, idx).reshape(mask.shape + (3,))
    lo, hi = mask_box_in_frame([lm.mask], lattice) or (np.zeros(3), np.ones(3))
    org = np.asarray(lattice.GetOrigin())
    box_lo, box_hi = org + lo, org + hi  # direction assumed close to axial; only used for profiles
    vx, vy, vz = breathing_motion_mm(pts[..., 0], pts[..., 1], pts[..., 2], box_lo, box_hi, params.amplitude_base,
                                     params.amplitude_apex, params.amplitude_ap, params.amplitude_lateral)
    v = np.stack((vx, vy, vz), 0) * weight[None]
    return _vector_image(v, lattice), lm.mask


def invert_field(v: sitk.Image, iterations: int = 30) -> sitk.Image:
    """``u`` with ``x + u(x) = T(x)`` where ``T`` inverts ``y -> y + v(y)``: ``u(x) = -v(x + u(x))``."""
    inv = sitk.InvertDisplacementField(v, maximumNumberOfIterations=iterations, maxErrorToleranceThreshold=1e-3,
                                       meanErrorToleranceThreshold=1e-4, enforceBoundaryCondition=False)
    return sitk.Cast(inv, sitk.sitkVectorFloat64)


def detect_keypoints(img: sitk.Image, mask: sitk.Image, n: int, seed: int = 0) -> np.ndarray:
    """Distinctive lung points (vessel crossings/bifurcations): local maxima of the
    negative Laplacian-of-Gaussian (bright blobs, σ = 1.5 mm) inside the eroded lung mask."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    sp = np.asarray(img.GetSpacing())[::-1]
    resp = -ndimage.gaussian_laplace(arr, sigma=1.5 / sp)
    m = sitk.GetArrayFromImage(sitk.Resample(mask, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    m = ndimage.binary_erosion(m, iterations=2)
    resp[~m] = resp.min()
    # peaks at least ~6 mm apart along every axis: the neighbourhood is a box of ±6 mm in voxels of each
    # axis (a min_distance in voxels of the finest axis would be ~33 mm along 3 mm slices and leave
    # too few peaks in anisotropic scans)
    half = np.maximum(1, np.round(6.0 / sp).astype(int))
    footprint = np.ones(tuple(2 * h + 1 for h in half), bool)
    peaks = peak_local_max(resp, footprint=footprint, labels=m.astype(np.int32), num_peaks=4 * n,
                           exclude_border=False)
    if len(peaks) == 0:
        return np.zeros((0, 3))
    rng = np.random.default_rng(seed)
    if len(peaks) > n:  # keep the strongest half, then spread a random choice through the lungs
        strongest = peaks[: max(n, len(peaks) // 2)]
        peaks = strongest[rng.choice(len(strongest), size=n, replace=False)]
    return index_to_physical(img, peaks[:, ::-1].astype(np.float64))


def simulate_pair(fixed: sitk.Image, params: BreathingParams | None = None) -> SimulatedPair:
    """Make an exhale-like moving image, ground truth and landmark pairs from ``fixed``."""
    params = params or BreathingParams()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    v, mask = breathing_field(fixed, params)
    det = jacobian_determinant(np.moveaxis(sitk.GetArrayFromImage(v), -1, 0), v.GetSpacing(), v.GetDirection())
    det_img = sitk.GetImageFromArray(det.astype(np.float32))
    det_img.CopyInformation(v)
    tx = sitk.DisplacementFieldTransform(sitk.Image(v))
    warped = sitk.Resample(fixed, fixed, tx, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    det_full = sitk.Resample(det_img, fixed, sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32)
    lung_full = sitk.Resample(mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkFloat32)
    w = sitk.GetArrayFromImage(warped)
    jac = sitk.GetArrayFromImage(det_full)
    lung = sitk.GetArrayFromImage(lung_full) > 0
    dense = np.where(lung, np.clip((w + 1000.0) * jac - 1000.0, -1024.0, 3000.0), w)
    moving = sitk.GetImageFromArray(dense.astype(np.float32))
    moving.CopyInformation(fixed)
    q = detect_keypoints(moving, mask, params.n_landmarks, params.seed)
    p = np.asarray([tx.TransformPoint(tuple(float(c) for c in pt)) for pt in q]).reshape(-1, 3)  # q + v(q)
    u = invert_field(v)
    return SimulatedPair(fixed, moving, v, u, mask, p, q, float(det.min()))
