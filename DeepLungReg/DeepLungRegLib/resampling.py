"""Full-resolution outputs of a registration in bounded memory: the warped moving image and the
Jacobian statistics, computed slab by slab of the fixed grid.

:func:`warp_image` resamples the moving image through ``T(x) = A(x + d(x))`` (see
:mod:`DeepLungRegLib.transforms`) with torch ``grid_sample`` on the composed mapping instead of
ITK's per-point evaluation of the composite transform. It reproduces ITK's semantics:

* ``d`` is interpolated trilinearly on its lattice, repeated at the border within half a node
  outside the lattice and zero beyond (``itk::DisplacementFieldTransform``);
* the moving image is interpolated trilinearly, repeated at its border within half a voxel
  and ``default`` beyond (``itk::ResampleImageFilter`` with a linear interpolator).

The result is rounded to int16 HU as ``deeplungreg register`` writes it. Only a slab of the
fixed grid (:data:`CHUNK_VOXELS` voxels) and the moving slices it maps into are expanded to
float32 at a time, so an int16 moving image is never copied whole. The work runs on the
device of ``device``; on the CPU slabs go to a pool of threads, each running torch single-threaded
(torch's 3D ``grid_sample`` parallelises over the batch only, and many small multi-threaded ops
stall when another process holds a core).

:func:`jacobian_stats` gives the figures ``report.json`` has always held (folding, range, std of
log det in the lungs), evaluated at every fixed voxel from the lattice determinant interpolated
as before, slab by slab; :func:`jacobian_image` is the compact map written to ``jacobian.nii.gz``:
the same determinant on a grid over the fixed image's box at the lattice's resolution
(:func:`reduced_grid`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import Lattice, image_lattice
from .metrics import jacobian_determinant

#: Fixed voxels per slab (~1 M: about 60 MB of float32 coordinates in flight).
CHUNK_VOXELS = 1 << 20
#: Points this close (voxels, float32) to the moving image's edge are tested again in float64.
EDGE_CHECK = 1e-3
#: A slab whose points reach more moving slices than this is split further (large rotations).
MAX_MOVING_SLICES = 96


def affine_parts(tx: sitk.Transform | None) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` with ``tx(x) = M x + b`` (LPS mm), read off by probing the transform; a
    transform that is not linear (ITK's ``IsLinear``) is refused (``ValueError``), never approximated."""
    if tx is None:
        return np.eye(3), np.zeros(3)
    if not tx.IsLinear():
        raise ValueError(f"{tx.GetName()} is not an affine transform")
    b = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)), float)
    m = np.stack([np.asarray(tx.TransformPoint(tuple(e)), float) - b for e in np.eye(3) * 100.0], axis=1) / 100.0
    for p in ([123.4, -217.9, 311.1], [-350.0, 80.0, -420.0]):
        if np.abs(np.asarray(tx.TransformPoint(tuple(p))) - (m @ np.asarray(p) + b)).max() > 1e-6:
            raise ValueError(f"{tx.GetName()} is not an affine transform")
    return m, b


def _slabs(depth: int, plane: int, chunk: int) -> Iterator[tuple[int, int]]:
    k = max(1, chunk // max(plane, 1))
    for k0 in range(0, depth, k):
        yield k0, min(depth, k0 + k)


def _sample(volume: torch.Tensor, pts_norm: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` (1, C, D, H, W) at normalised points (P, 3) -> (C, P), border repeated."""
    out = F.grid_sample(volume, pts_norm.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                        align_corners=True)  # (1, C, 1, 1, P)
    return out.view(volume.shape[1], -1)


def _parallel(work, items: list, device: torch.device) -> None:
    """``work(item)`` for every item. On the CPU: one slab per thread of a pool as wide as torch's
    thread count, each running torch single-threaded. Many small multi-threaded ops stall at their
    OpenMP barriers whenever another process holds a core (a 2-core machine running anything
    else), whole slabs per thread do not."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or len(items) <= 1:
        for item in items:
            work(item)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(work, items):
                pass
    finally:
        torch.set_num_threads(threads)


def _axis_weights(pos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITK's linear interpolation along one axis at continuous indices ``pos``: node indices and
    weights, the border node repeated within half a node outside, weights 0 beyond."""
    base = torch.floor(pos)
    frac = pos - base
    inside = (pos >= -0.5) & (pos < n - 0.5)
    i0 = base.clamp(0, n - 1).long()
    i1 = (base + 1).clamp(0, n - 1).long()
    return i0, i1, torch.where(inside, 1.0 - frac, 0.0), torch.where(inside, frac, 0.0)


def _lerp_axis(vol: torch.Tensor, dim: int, pos: torch.Tensor, n: int) -> torch.Tensor:
    i0, i1, w0, w1 = _axis_weights(pos, n)
    shape = [1] * vol.dim()
    shape[dim] = -1
    return vol.index_select(dim, i0).mul_(w0.view(shape)).addcmul_(vol.index_select(dim, i1), w1.view(shape))


def _axis_coords(mat: np.ndarray, vec: np.ndarray, shape_khw: tuple[int, int, int], k0: int, f32: dict
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each output component c, the three 1D terms of ``mat[c] @ (i, j, k) + vec[c]``
    along i (W,), j (H, 1) and k (K, 1, 1) for slices ``k0 .. k0 + K``."""
    k, h, w = shape_khw
    ii, jj, kk = (torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                  torch.arange(k0, k0 + k, dtype=torch.float64))
    out = []
    for c in range(3):
        out.append(((ii * mat[c, 0]).to(**f32), (jj * mat[c, 1]).view(h, 1).to(**f32),
                    (kk * mat[c, 2] + vec[c]).view(k, 1, 1).to(**f32)))
    return out


def _is_diagonal(mat: np.ndarray) -> bool:
    return bool(np.abs(mat - np.diag(np.diag(mat))).max() <= 1e-9 * max(np.abs(mat).max(), 1.0))


def _moving_read_order(g_mat: np.ndarray, fixed_size) -> list[int]:
    """Moving index components in the order the warp reads them (last = read in slices): the stored
    order ``[0, 1, 2]`` unless another component spans less than half as many voxels across a fixed slice
    and the stored one spans more than :data:`MAX_MOVING_SLICES` / 2 (only then does it matter)."""
    w, h = fixed_size[0], fixed_size[1]
    spread = np.abs(g_mat[:, 0]) * max(w - 1, 0) + np.abs(g_mat[:, 1]) * max(h - 1, 0)
    best = int(np.argmin(spread))
    if best == 2 or spread[2] <= MAX_MOVING_SLICES / 2 or spread[best] * 2 > spread[2]:
        return [0, 1, 2]
    return [a for a in range(3) if a != best] + [best]


def warp_image(moving: sitk.Image, fixed: sitk.Image, affine: sitk.Transform | None,
               field=None, default: float = -1000.0, device: torch.device | str = "cpu",
               chunk_voxels: int = CHUNK_VOXELS, output: str = "int16", as_array: bool = False,
               moving_voxels: np.ndarray | None = None) -> sitk.Image | np.ndarray:
    """``moving`` resampled on ``fixed``'s grid through ``T(x) = A(x + d(x))``.

    ``field`` is an :class:`~DeepLungRegLib.transforms.OutputField` (``None``: the affine alone).
    ``output``: ``"int16"`` (rounded half up and clamped, as ``deeplungreg register`` writes) or
    ``"float32"`` (for comparisons). ``as_array``: return the (k, j, i) array on ``fixed``'s grid
    instead of an image (no second copy of the voxels; :func:`~DeepLungRegLib.io.write_image` writes it). Equals ``sitk.Resample(moving, fixed, full_transform(A, field),
    sitkLinear, default)`` up to float32 rounding of the coordinates (see Testing/test_wholejob_speed.py).
    ``moving_voxels``: ``sitk.GetArrayViewFromImage(moving)`` taken by the caller beforehand (that call
    may copy an image another thread is reading — SimpleITK's ``MakeUnique`` — so the pipeline takes
    it before it starts the QA picture's thread).
    """
    if output not in ("int16", "float32"):
        raise ValueError(f"output must be int16 or float32, not {output!r}")
    device = torch.device(device)
    f32 = dict(dtype=torch.float32, device=device)
    fl, ml = image_lattice(fixed), image_lattice(moving)
    m_f = fl.index_matrix()
    a_m, a_b = affine_parts(affine)
    m_inv = np.linalg.inv(ml.index_matrix())
    # moving index v = G (i, j, k) + g + Q d   (d: displacement in mm at x = o_f + M_f (i, j, k))
    q = m_inv @ a_m
    g_mat, g_vec = q @ m_f, m_inv @ (a_m @ np.asarray(fl.origin) + a_b - np.asarray(ml.origin))
    # The moving voxels are read in runs of their slowest array axis. When another moving axis changes
    # far less across a fixed slice (a moving image stored sagittally or coronally against an axial
    # fixed one), every fixed row would need most of the volume: read along that axis instead (the
    # moving index components reordered, the array transposed; the arithmetic is otherwise the same).
    perm = _moving_read_order(g_mat, fl.size)
    g_mat, g_vec, q = g_mat[perm], g_vec[perm], q[perm]
    m_size = tuple(int(ml.size[p]) for p in perm)  # moving index components i', j', k' in the read order
    if field is not None:
        lat: Lattice = field.lattice
        l_inv = np.linalg.inv(lat.index_matrix())
        gl_mat, gl_vec = l_inv @ m_f, l_inv @ (np.asarray(fl.origin) - np.asarray(lat.origin))
        separable = _is_diagonal(gl_mat)  # lattice axes along the fixed axes (always so in the pipeline)
        # Q d on the lattice (interpolation is linear, so it commutes with Q): one add per component below
        d_vol = torch.as_tensor(np.einsum("ce,e...->c...", q, field.displacement_mm), **f32)  # (3, Dl, Hl, Wl)
    src = sitk.GetArrayViewFromImage(moving) if moving_voxels is None else moving_voxels
    if src.shape != tuple(ml.shape):
        raise ValueError(f"moving_voxels shape {src.shape} is not the moving image's {tuple(ml.shape)}")
    src = src.transpose(2 - perm[2], 2 - perm[1], 2 - perm[0])  # array axes (k', j', i'); a view
    out = np.empty(fl.shape, np.int16 if output == "int16" else np.float32)
    d_, h_, w_ = fl.shape

    def displacement(k0: int, k1: int) -> torch.Tensor:
        """``Q d`` (3, K, H, W), moving voxels, at the fixed voxels of slices k0..k1."""
        if separable:
            pos = [torch.arange(n, dtype=torch.float64) * gl_mat[a, a] + gl_vec[a]
                   for a, n in enumerate((w_, h_))] + [torch.arange(k0, k1, dtype=torch.float64) * gl_mat[2, 2]
                                                      + gl_vec[2]]
            sz = lat.size
            # k first, then i while the rows are still the lattice's few (a gather along the last axis
            # is the slow one), then j (whole rows)
            v = _lerp_axis(d_vol, 1, pos[2].to(**f32), sz[2])   # (3, K, Hl, Wl)
            v = _lerp_axis(v, 3, pos[0].to(**f32), sz[0])       # (3, K, Hl, W)
            return _lerp_axis(v, 2, pos[1].to(**f32), sz[1])    # (3, K, H, W)
        terms = _axis_coords(gl_mat, gl_vec, (k1 - k0, h_, w_), k0, f32)
        li = torch.stack([(kt + jt) + it for it, jt, kt in terms], dim=-1).view(-1, 3)
        lat_size = torch.as_tensor([float(s) for s in lat.size], **f32)
        inside = ((li >= -0.5) & (li < lat_size - 0.5)).all(dim=1)
        d = _sample(d_vol[None], li * (2.0 / (lat_size - 1).clamp(min=1)) - 1.0) * inside
        return d.view(3, k1 - k0, h_, w_)

    def run(k0: int, k1: int, j0: int, j1: int, d: torch.Tensor | None) -> None:
        """Slices k0..k1, rows j0..j1; ``d``: ``Q d`` (3, k1 - k0, H, W) of these slices, all rows."""
        kk, hh = k1 - k0, j1 - j0
        # the moving index of every point, one component per plane of ``buf`` (the grid handed to
        # grid_sample is its (K, H, W, 3) view: no interleaved copy)
        buf = torch.empty((3, kk, hh, w_), **f32)
        inside = near = None
        for c, (it, jt, kt) in enumerate(_axis_coords(g_mat, g_vec, (kk, h_, w_), k0, f32)):
            vc = torch.add(kt + jt[j0:j1], it, out=buf[c])
            if d is not None:
                vc += d[c, :, j0:j1]
            # ITK's IsInsideBuffer is -0.5 <= v < n - 0.5, i.e. |v - (n - 1)/2| < n/2 away from the edges;
            # float32 positions are ~1e-5 voxel off: points within EDGE_CHECK of an edge are decided
            # again in float64 below
            half = m_size[c] / 2.0
            t = (vc - (m_size[c] - 1) / 2.0).abs_()
            ok = t < half
            nc = t.sub_(half).abs_() < EDGE_CHECK
            inside = ok if inside is None else inside.logical_and_(ok)
            near = nc if near is None else near.logical_or_(nc)
        del t
        idx = near.nonzero()
        if len(idx):
            ijk = torch.stack([idx[:, 2], idx[:, 1] + j0, idx[:, 0] + k0], dim=1).to(torch.float64)
            v64 = ijk @ torch.as_tensor(g_mat.T, dtype=torch.float64, device=device) + torch.as_tensor(
                g_vec, dtype=torch.float64, device=device)
            if d is not None:
                v64 += d[:, idx[:, 0], idx[:, 1] + j0, idx[:, 2]].T.to(torch.float64)
            hi64 = torch.as_tensor([s - 0.5 for s in m_size], dtype=torch.float64, device=device)
            inside[idx[:, 0], idx[:, 1], idx[:, 2]] = ((v64 >= -0.5) & (v64 < hi64)).all(dim=1)
        vals = torch.full((kk, hh, w_), float(default), **f32)
        if bool(inside.any()):
            kv = buf[2]
            lo = int(torch.where(inside, kv, math.inf).min().clamp(0, m_size[2] - 1).floor())
            hi = int(torch.where(inside, kv, -math.inf).max().clamp(0, m_size[2] - 1).ceil())
            if hi - lo + 1 > MAX_MOVING_SLICES and (kk > 1 or hh > 1):  # a steep mapping: smaller pieces
                if kk > 1:
                    mid = (k0 + k1) // 2
                    run(k0, mid, j0, j1, None if d is None else d[:, :mid - k0])
                    run(mid, k1, j0, j1, None if d is None else d[:, mid - k0:])
                else:  # ``d`` holds whole rows: it is indexed with the absolute row j
                    mid = (j0 + j1) // 2
                    run(k0, k1, j0, mid, d)
                    run(k0, k1, mid, j1, d)
                return
            n_k = hi - lo + 1
            buf[0].mul_(2.0 / max(m_size[0] - 1, 1)).sub_(1.0)  # normalised in place
            buf[1].mul_(2.0 / max(m_size[1] - 1, 1)).sub_(1.0)
            kv.sub_(lo).mul_(2.0 / max(n_k - 1, 1)).sub_(1.0)
            grid = buf.permute(1, 2, 3, 0)  # (K, H, W, 3), strided: grid_sample reads it as it is
            with warnings.catch_warnings():  # a read-only view of a float32 image: grid_sample only reads it
                warnings.simplefilter("ignore", UserWarning)
                slab = torch.as_tensor(np.asarray(src[lo:hi + 1], np.float32), device=device)[None, None]
            sampled = _sample(slab, grid.view(-1, 3))[0].view(kk, hh, w_)
            vals = torch.where(inside, sampled, vals)
        if output == "int16":
            vals = torch.floor(vals.clamp_(-32768.0, 32767.0).add_(0.5)).to(torch.int16)
        out[k0:k1, j0:j1] = vals.cpu().numpy()

    def slab(k: tuple[int, int]) -> None:
        with torch.inference_mode():
            # the slab's displacement, passed down so that a split slab does not recompute it
            run(k[0], k[1], 0, h_, displacement(*k) if field is not None else None)

    _parallel(slab, list(_slabs(d_, h_ * w_, chunk_voxels)), device)
    if as_array:
        arr, out = out, None  # the nested functions hold ``out`` in a reference cycle: hand the array over
        return arr
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(fixed)
    out = None  # the nested functions hold ``out`` in a reference cycle: release the array now, not at the next GC
    return img


# --------------------------------------------------------------------------- Jacobian
def lattice_jacobian(field, affine: sitk.Transform | None) -> tuple[sitk.Image, float]:
    """``det(∇T)`` on the displacement lattice (central differences, as the pipeline always
    computed it) as a float32 image, and ``det(A)`` (the value outside the lattice)."""
    m = np.asarray(affine.GetMatrix()).reshape(3, 3) if hasattr(affine, "GetMatrix") else affine_parts(affine)[0]
    det_a = float(np.linalg.det(m))
    det = jacobian_determinant(field.displacement_mm, field.lattice.spacing, field.lattice.direction)
    img = sitk.GetImageFromArray((det * det_a).astype(np.float32))
    img.CopyInformation(field.lattice.reference())
    return img, det_a


def reduced_grid(fixed: sitk.Image, spacing: tuple[float, float, float]) -> Lattice:
    """A lattice over ``fixed``'s box (voxel edges) and direction whose spacing is at least
    ``spacing`` (and never finer than the fixed image's) along each index axis."""
    sp_f, n_f = np.asarray(fixed.GetSpacing()), np.asarray(fixed.GetSize())
    target = np.maximum(sp_f, np.asarray(spacing, float))
    n = np.maximum(np.round(n_f * sp_f / target), 1).astype(int)
    sp = n_f * sp_f / n
    m = np.asarray(fixed.GetDirection()).reshape(3, 3)
    origin = np.asarray(fixed.GetOrigin()) - m @ (0.5 * sp_f) + m @ (0.5 * sp)
    return Lattice(tuple(origin.tolist()), tuple(sp.tolist()), tuple(fixed.GetDirection()), tuple(int(v) for v in n))


def jacobian_image(det_lattice: sitk.Image, det_affine: float, fixed: sitk.Image) -> sitk.Image:
    """The determinant map written to ``jacobian.nii.gz``: over the fixed image's box, at the
    resolution of the displacement lattice (linear interpolation; ``det(A)`` outside the lattice)."""
    grid = reduced_grid(fixed, det_lattice.GetSpacing())
    return sitk.Resample(det_lattice, grid.reference(), sitk.Transform(), sitk.sitkLinear, det_affine,
                         sitk.sitkFloat32)


def _slab_reference(fixed: sitk.Image, k0: int, k1: int, pixel) -> sitk.Image:
    size = list(fixed.GetSize())
    size[2] = k1 - k0
    ref = sitk.Image(size, pixel)
    ref.SetSpacing(fixed.GetSpacing())
    ref.SetDirection(fixed.GetDirection())
    ref.SetOrigin(fixed.TransformIndexToPhysicalPoint((0, 0, int(k0))))
    return ref


class _Moments:
    """Count, mean and sum of squared deviations, merged slab by slab (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, v: np.ndarray | torch.Tensor) -> None:
        on_torch = isinstance(v, torch.Tensor)
        n = int(v.numel() if on_torch else v.size)
        if n == 0:
            return
        v = v.double() if on_torch else v.astype(np.float64)
        mean = float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def merge(self, other: "_Moments") -> None:
        if other.n == 0:
            return
        delta, total = other.mean - self.mean, self.n + other.n
        self.mean += delta * other.n / total
        self.m2 += other.m2 + delta * delta * self.n * other.n / total
        self.n = total

    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


def _axis_maps(src: sitk.Image, ref: sitk.Image, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray] | None:
    """``(offset, slope)`` per index axis (x, y, z) such that ``ref``'s voxel ``i`` along an axis sits
    at continuous index ``offset + slope * i`` of ``src`` along the same axis (a negative slope: the
    axes run opposite ways) — or ``None`` when the grids do not share their axes: across the whole of
    ``ref`` an index axis would drift by more than ``tol`` voxel along another axis of ``src``
    (permuted or turned grids)."""
    o = np.asarray(src.TransformPhysicalPointToContinuousIndex(ref.TransformIndexToPhysicalPoint((0, 0, 0))))
    cols = []
    for a in range(3):
        e = [0.0, 0.0, 0.0]
        e[a] = 1.0
        cols.append(np.asarray(src.TransformPhysicalPointToContinuousIndex(
            ref.TransformContinuousIndexToPhysicalPoint(e))) - o)
    jac = np.stack(cols, 1)  # column a: one index step of ``ref`` along a, in ``src`` indices
    drift = np.abs(jac - np.diag(np.diag(jac))) * (np.asarray(ref.GetSize(), float) - 1.0)[None, :]
    if drift.max() > tol:
        return None
    return o, np.diag(jac).copy()


#: Continuous indices this close to a half-integer are ties (nearest neighbour and the buffer's edges),
#: decided upwards as ITK's rules intend; ITK itself decides them by the rounding noise of its
#: index arithmetic (~1e-13), which differs between slabs, scan lines and versions.
TIE = 1e-9


def _inside(n_in: int, c: np.ndarray) -> np.ndarray:
    """ITK's buffer test, ``-0.5 <= c < n - 0.5``, with ties counted upwards."""
    return (c >= -0.5 - TIE) & (c < n_in - 0.5 - TIE)


def _linear_axis(n_in: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ITK's linear interpolation along one axis at continuous indices ``c``: lower and upper
    neighbours, weight of the upper one, and whether ``c`` is inside the buffer ([-0.5, n - 0.5);
    within half a voxel of the edge the edge value is repeated, as ``LinearInterpolateImageFunction``)."""
    inside = _inside(n_in, c)
    cc = np.clip(c, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(cc).astype(np.intp), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), cc - i0, inside


def _nearest_axis(n_in: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITK's nearest neighbour along one axis (halves rounded up, :data:`TIE`) and the inside test."""
    return np.clip(np.floor(c + 0.5 + TIE).astype(np.intp), 0, n_in - 1), _inside(n_in, c)


class _SeparableSampler:
    """The lattice determinant (linear) and the lung mask (nearest) on slabs of ``fixed``'s grid when
    both grids share ``fixed``'s axes, which they do on the pipeline's path (the lattice and the mask
    grid take the fixed image's direction): axis by axis, z then y then x (ITK: x, y, z), in float64
    like ITK's interpolator, cast to float32. The determinant equals ``sitk.Resample``'s to the last float32 bit on
    all but a few voxels in ten million (1 ulp there, from the order of the additions); the mask equals
    ITK's nearest neighbour except at exact ties (a fixed voxel centre on a mask voxel boundary, which
    grids with spacing ratios such as 1.5 or 2.5 have every few voxels), decided upwards here
    (:data:`TIE`) and by rounding noise in ITK (Testing/test_wholejob_speed.py).

    ``device`` ``None``: NumPy arrays; a torch device (the GPU path of the Jacobian stage): tensors there,
    the same arithmetic in the same order, so on torch's CPU the slabs equal NumPy's bit for bit."""

    def __init__(self, det_lattice: sitk.Image, det_affine: float, lung: sitk.Image, fixed: sitk.Image,
                 det_maps: tuple, lung_maps: tuple, device: torch.device | None = None) -> None:
        self.device = device
        self.det = self._array(sitk.GetArrayViewFromImage(det_lattice).astype(np.float64))  # (z, y, x), a copy
        self.lung = self._array(sitk.GetArrayFromImage(lung))
        self.det_affine = float(np.float32(det_affine))
        size = fixed.GetSize()
        self.det_xy = [self._arrays(_linear_axis(det_lattice.GetSize()[a],
                                                 det_maps[0][a] + det_maps[1][a] * np.arange(size[a])))
                       for a in (0, 1)]
        self.lung_xy = [self._arrays(_nearest_axis(lung.GetSize()[a],
                                                   lung_maps[0][a] + lung_maps[1][a] * np.arange(size[a])))
                        for a in (0, 1)]
        self.det_maps, self.lung_maps = det_maps, lung_maps
        self.nz_det, self.nz_lung = det_lattice.GetSize()[2], lung.GetSize()[2]

    @classmethod
    def create(cls, det_lattice: sitk.Image, det_affine: float, lung: sitk.Image, fixed: sitk.Image,
               device: torch.device | str | None = None) -> "_SeparableSampler | None":
        det_maps, lung_maps = _axis_maps(det_lattice, fixed), _axis_maps(lung, fixed)
        if det_maps is None or lung_maps is None:
            return None
        return cls(det_lattice, det_affine, lung, fixed, det_maps, lung_maps,
                   None if device is None else torch.device(device))

    def _array(self, a: np.ndarray) -> np.ndarray | torch.Tensor:
        return a if self.device is None else torch.as_tensor(np.ascontiguousarray(a), device=self.device)

    def _arrays(self, arrays: tuple) -> tuple:
        return tuple(self._array(a) for a in arrays)

    def _take(self, a, index, axis: int):
        # np.take is ~2x faster than a[:, index]
        return np.take(a, index, axis=axis) if self.device is None else torch.index_select(a, axis, index)

    def det_slab(self, k0: int, k1: int) -> np.ndarray | torch.Tensor:
        (x0, x1, wx, ix), (y0, y1, wy, iy) = self.det_xy
        z0, z1, wz, iz = self._arrays(_linear_axis(self.nz_det, self.det_maps[0][2] + self.det_maps[1][2]
                                                   * np.arange(k0, k1)))
        a = self.det[z0] + (self.det[z1] - self.det[z0]) * wz[:, None, None]
        for axis, i0, i1, w in ((1, y0, y1, wy[:, None]), (2, x0, x1, wx)):
            # a0 + (a1 - a0) * w, ITK's formula per step (ITK goes x, y, z)
            step = self._take(a, i1, axis)
            base = self._take(a, i0, axis)
            step -= base
            step *= w
            step += base
            a = step
        out = a.astype(np.float32) if self.device is None else a.float()
        out[~iz], out[:, ~iy], out[:, :, ~ix] = self.det_affine, self.det_affine, self.det_affine
        return out

    def lung_slab(self, k0: int, k1: int) -> np.ndarray | torch.Tensor:
        (xi, ix), (yi, iy) = self.lung_xy
        zi, iz = self._arrays(_nearest_axis(self.nz_lung, self.lung_maps[0][2] + self.lung_maps[1][2]
                                            * np.arange(k0, k1)))
        m = self.lung[zi][:, yi][:, :, xi] > 0
        m[~iz], m[:, ~iy], m[:, :, ~ix] = False, False, False
        return m


def jacobian_stats(det_lattice: sitk.Image, det_affine: float, fixed: sitk.Image, lung: sitk.Image,
                   chunk_voxels: int = 4 * CHUNK_VOXELS, eps: float = 1e-6,
                   device: torch.device | str = "cpu", backend: str = "auto") -> dict[str, float]:
    """Folding (% of voxels with det <= 0, everywhere and in the lung), det range and std of
    ``log(max(det, eps))`` in the lung, at every voxel of ``fixed``: the lattice determinant
    interpolated linearly (``det(A)`` outside the lattice) and the lung mask by nearest neighbour,
    as the full-resolution maps the pipeline used to hold, one slab at a time. When the grids share
    the fixed image's axes (the pipeline's case) the slabs are interpolated axis by axis
    (:class:`_SeparableSampler`, ~4× less CPU than ``sitk.Resample``); otherwise by ``sitk.Resample``.
    ``backend``: ``auto`` interpolates axis by axis in torch on ``device`` when it is a GPU, with NumPy
    on the CPU; ``numpy``, ``torch`` (on ``device``) or ``itk`` (``sitk.Resample`` always) force one (tests)."""
    n = n_fold = n_lung = n_fold_lung = 0
    lo, hi = math.inf, -math.inf
    logs = _Moments()
    size = fixed.GetSize()
    device = torch.device(device)
    if backend == "auto":
        backend = "numpy" if device.type == "cpu" else "torch"
    sampler = None if backend == "itk" else _SeparableSampler.create(det_lattice, det_affine, lung, fixed,
                                                                     device if backend == "torch" else None)

    def maps(k: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if sampler is not None:
            return sampler.det_slab(*k), sampler.lung_slab(*k)
        ref = _slab_reference(fixed, k[0], k[1], sitk.sitkFloat32)
        det = sitk.GetArrayFromImage(sitk.Resample(det_lattice, ref, sitk.Transform(), sitk.sitkLinear, det_affine,
                                                   sitk.sitkFloat32))
        mask = sitk.GetArrayFromImage(sitk.Resample(lung, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                    sitk.sitkUInt8)) > 0
        return det, mask

    def slab(k: tuple[int, int]) -> tuple:
        det, mask = maps(k)
        v = det[mask]
        part = _Moments()
        if isinstance(det, torch.Tensor):
            part.add(torch.log(torch.clamp_min(v, eps)))
            return (det.numel(), int((det <= 0).sum()), float(det.min()), float(det.max()), v.numel(),
                    int((v <= 0).sum()), part)
        part.add(np.log(np.maximum(v, np.float32(eps))))
        return (det.size, int(np.count_nonzero(det <= 0)), float(det.min()), float(det.max()), v.size,
                int(np.count_nonzero(v <= 0)), part)

    # slabs on two threads (ITK's resampling and NumPy release the GIL), merged in slab order
    # (axis by axis a slab holds float64 intermediates: half the slab keeps the memory of sitk.Resample's slabs)
    slabs = list(_slabs(size[2], size[0] * size[1], chunk_voxels // 2 if sampler is not None else chunk_voxels))
    on_torch = sampler is not None and sampler.device is not None  # one stream of work for the device
    with ThreadPoolExecutor(max_workers=1 if on_torch else min(2, len(slabs))) as pool:
        for d_n, d_fold, d_lo, d_hi, d_lung, d_fold_lung, part in pool.map(slab, slabs):
            n, n_fold, n_lung, n_fold_lung = n + d_n, n_fold + d_fold, n_lung + d_lung, n_fold_lung + d_fold_lung
            lo, hi = min(lo, d_lo), max(hi, d_hi)
            logs.merge(part)
    return {"folding_percent": 100.0 * n_fold / n if n else 0.0,
            "folding_percent_lung": 100.0 * n_fold_lung / n_lung if n_lung else 0.0,
            "jacobian_min": lo, "jacobian_max": hi, "std_log_jacobian_lung": logs.std()}


__all__ = ["affine_parts", "warp_image", "lattice_jacobian", "reduced_grid", "jacobian_image", "jacobian_stats"]
