"""Thin-plate-spline (TPS) displacement fields defined by the displacements of a regular node lattice.

Used by the ``eppenhof2018tps`` method (Eppenhof et al., SPIE Medical Imaging 2018, Eq. 1) both to
make its synthetic training pairs and to turn its network output into a dense field, so that the
two can never disagree.

Model. Given the displacements ``d_n`` (voxels) of ``N`` nodes ``p_n``, the field is

    u(x) = a_0 + A x + sum_n c_n phi(||x - p_n||)

with ``x``, ``p_n`` in voxel coordinates ``(i, j, k)`` of the dense lattice and, per displacement
channel, ``N`` kernel coefficients ``c`` and 4 affine ones ``(a_0, a_i, a_j, a_k)`` solving the
interpolation system

    [ K   P ] [c]   [d]
    [ P^T 0 ] [a] = [0],     K_mn = phi(||p_m - p_n||),  P_n = (1, p_n).

``u`` therefore interpolates the node displacements exactly (``u(p_n) = d_n``) and reproduces any
affine map exactly (then ``c = 0``). Kernels: ``"r"`` (``phi(r) = r``, the bending-energy
minimiser in 3D, the default) or ``"r2logr"`` (``phi(r) = r² log r``, the 2D TPS kernel often used
in 3D as well). The paper does not name its kernel; the model file records the one used.

Node placement (the ``align_corners`` convention of :mod:`DeepLungRegLib.geometry` and
:mod:`DeepLungRegLib.splines`): along an axis of ``n_vox`` voxels, ``n`` nodes sit at
``0, h, 2h, ..., n_vox - 1`` with ``h = (n_vox - 1) / (n - 1)`` — the first and last node on the
first and last voxel centres, the lattice uniformly covering the image (the paper: a grid that
uniformly covers the image's domain, without saying more).

Tensors follow :mod:`DeepLungRegLib.fields`: node displacements ``(B, 3, nk, nj, ni)`` and dense
fields ``(B, 3, D, H, W)``, channels ``(i, j, k)``, in voxels of the dense lattice (any unit works:
the map from node values to the field is linear). Nodes are flattened in ``(k, j, i)`` order.

Evaluation cost. The dense field is ``Phi @ c + affine`` with ``Phi`` the ``(D·H·W, N)`` kernel
matrix. Because the nodes and the voxels are both placed symmetrically along every axis, the
field at the mirror image of a voxel is the same kernel row applied to the mirrored coefficients;
so only the rows of one octant of the lattice are needed (1/8 of ``Phi``), applied to the 8
mirrored copies of the coefficients in one matrix product. That octant matrix (24 M entries for
96³ voxels and 6³ nodes, about 96 MB in float32) and the inverse of the interpolation system
are cached per shape, node count, kernel, device and dtype; larger octants are rebuilt in slabs.
Everything runs on the device of the input, batched.
"""

from __future__ import annotations

import functools
import itertools

import torch

KERNELS = ("r", "r2logr")
DEFAULT_KERNEL = "r"
#: Octant kernel matrices up to this many entries are cached (one per shape/device/dtype); larger
#: ones are computed slab by slab at every call.
CACHE_ELEMENTS = 2**25
#: Entries of one slab of the kernel matrix when it is not cached.
SLAB_ELEMENTS = 2**23


def _check(nodes: tuple[int, int, int], shape: tuple[int, int, int], kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown TPS kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if len(nodes) != 3 or len(shape) != 3:
        raise ValueError(f"nodes {nodes} and shape {shape} must have three sizes (k, j, i)")
    if any(n < 2 for n in nodes):
        raise ValueError(f"a TPS lattice needs at least 2 nodes per axis, got {nodes}")
    if any(s < 2 for s in shape):
        raise ValueError(f"a dense lattice needs at least 2 voxels per axis, got {shape}")


def axis_nodes(n_nodes: int, n_voxels: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """``(n_nodes,)`` voxel coordinates of the nodes along one axis: evenly from 0 to ``n_voxels - 1``."""
    return torch.linspace(0.0, float(n_voxels - 1), int(n_nodes), device=device, dtype=dtype)


def node_positions(nodes: tuple[int, int, int], shape: tuple[int, int, int], device=None,
                   dtype=torch.float64) -> torch.Tensor:
    """``(N, 3)`` voxel coordinates ``(i, j, k)`` of the nodes of an ``(nk, nj, ni)`` lattice over a dense
    ``(D, H, W)`` lattice, flattened in ``(k, j, i)`` order (the order of ``node_disp.flatten(2)``)."""
    pk, pj, pi = (axis_nodes(n, s, device, dtype) for n, s in zip(nodes, shape, strict=True))
    kk, jj, ii = torch.meshgrid(pk, pj, pi, indexing="ij")
    return torch.stack((ii, jj, kk), dim=-1).reshape(-1, 3)


def radial_kernel(r2: torch.Tensor, kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """``phi`` as a function of the squared distance ``r2`` (voxels²), elementwise."""
    if kernel == "r":
        return r2.sqrt()
    if kernel == "r2logr":
        return torch.where(r2 > 0, 0.5 * r2 * torch.log(r2.clamp(min=1e-30)), torch.zeros_like(r2))
    raise ValueError(f"unknown TPS kernel {kernel!r}; use one of {', '.join(KERNELS)}")


@functools.lru_cache(maxsize=16)
def _solver(nodes: tuple[int, int, int], shape: tuple[int, int, int], kernel: str, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """``(N, N + 4)`` matrix ``S`` with ``[c; a]ᵀ = dᵀ S`` for node values ``d`` ``(N,)`` (solved in float64)."""
    with torch.inference_mode(False), torch.no_grad():   # cached: must stay usable outside inference mode
        return _solve(nodes, shape, kernel).to(device=device, dtype=dtype)


def _solve(nodes: tuple[int, int, int], shape: tuple[int, int, int], kernel: str) -> torch.Tensor:
    p = node_positions(nodes, shape)                               # (N, 3), float64 on the CPU
    n = p.shape[0]
    k = radial_kernel(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1), kernel)
    pp = torch.cat((torch.ones((n, 1), dtype=p.dtype), p), dim=1)  # (N, 4): 1, i, j, k
    system = torch.zeros((n + 4, n + 4), dtype=p.dtype)
    system[:n, :n], system[:n, n:], system[n:, :n] = k, pp, pp.T
    rhs = torch.zeros((n + 4, n), dtype=p.dtype)
    rhs[:n] = torch.eye(n, dtype=p.dtype)
    solution = torch.linalg.solve(system, rhs)                     # (N + 4, N): columns = unit node values
    return solution.T.contiguous()


def tps_coefficients(node_disp: torch.Tensor, shape: tuple[int, int, int],
                     kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """TPS coefficients ``(B, 3, N + 4)`` of node displacements ``(B, 3, nk, nj, ni)`` on a dense ``shape``
    ``(D, H, W)`` lattice: per channel the ``N`` kernel coefficients (nodes in ``(k, j, i)`` order), then
    the affine part ``(a_0, a_i, a_j, a_k)``; units: those of ``node_disp`` (per voxel for ``a_i..a_k``)."""
    nodes = tuple(int(s) for s in node_disp.shape[2:])
    shape = tuple(int(s) for s in shape)
    _check(nodes, shape, kernel)
    solver = _solver(nodes, shape, kernel, node_disp.device, node_disp.dtype)
    return node_disp.flatten(2) @ solver


def tps_at_points(node_disp: torch.Tensor, shape: tuple[int, int, int], points: torch.Tensor,
                  kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """The TPS field of ``node_disp`` ``(B, 3, nk, nj, ni)`` over a dense ``shape`` lattice at ``points``
    ``(P, 3)`` (voxel coordinates ``(i, j, k)`` of that lattice, any real values): ``(B, 3, P)``."""
    coef = tps_coefficients(node_disp, shape, kernel)
    nodes = tuple(int(s) for s in node_disp.shape[2:])
    p = node_positions(nodes, tuple(shape), node_disp.device, node_disp.dtype)
    x = points.to(device=node_disp.device, dtype=node_disp.dtype)
    phi = radial_kernel(((x[:, None, :] - p[None, :, :]) ** 2).sum(-1), kernel)       # (P, N)
    basis = torch.cat((phi, torch.ones_like(x[:, :1]), x), dim=1)                      # (P, N + 4)
    return coef @ basis.T


def _half(n: int) -> int:
    return (n + 1) // 2


@functools.lru_cache(maxsize=8)
def _plane_distances(nodes: tuple[int, int, int], shape: tuple[int, int, int], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances from the octant voxels to the nodes: along k ``(hz, nk)`` and in the (j, i) plane
    ``(hy·hx, nj·ni)``."""
    with torch.inference_mode(False), torch.no_grad():
        return _distances(nodes, shape, device, dtype)


def _distances(nodes: tuple[int, int, int], shape: tuple[int, int, int], device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    (nk, nj, ni), (d, h, w) = nodes, shape
    dz = (torch.arange(_half(d), dtype=torch.float64)[:, None] - axis_nodes(nk, d)[None, :]) ** 2
    dy = (torch.arange(_half(h), dtype=torch.float64)[:, None] - axis_nodes(nj, h)[None, :]) ** 2
    dx = (torch.arange(_half(w), dtype=torch.float64)[:, None] - axis_nodes(ni, w)[None, :]) ** 2
    plane = (dy[:, None, :, None] + dx[None, :, None, :]).reshape(_half(h) * _half(w), nj * ni)
    return dz.to(device=device, dtype=dtype), plane.to(device=device, dtype=dtype)


def _octant_rows(nodes: tuple[int, int, int], shape: tuple[int, int, int], kernel: str, device: torch.device,
                 dtype: torch.dtype, z0: int, z1: int) -> torch.Tensor:
    """Rows ``(z1 - z0)·hy·hx`` of the octant kernel matrix (octant slices ``z0 .. z1 - 1``), ``(rows, N)``."""
    dz, plane = _plane_distances(nodes, shape, device, dtype)
    r2 = dz[z0:z1, None, :, None] + plane[None, :, None, :]            # (z, hy·hx, nk, nj·ni)
    return radial_kernel(r2, kernel).reshape(-1, nodes[0] * plane.shape[1])


@functools.lru_cache(maxsize=4)
def _octant_matrix(nodes: tuple[int, int, int], shape: tuple[int, int, int], kernel: str, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The whole octant kernel matrix ``(hz·hy·hx, N)`` (cached; only for sizes within :data:`CACHE_ELEMENTS`)."""
    with torch.inference_mode(False), torch.no_grad():
        return _octant_rows(nodes, shape, kernel, device, dtype, 0, _half(shape[0]))


#: The 8 mirror patterns (flip k, flip j, flip i).
_MIRRORS = tuple(itertools.product((False, True), repeat=3))


def tps_field(node_disp: torch.Tensor, shape: tuple[int, int, int], kernel: str = DEFAULT_KERNEL) -> torch.Tensor:
    """Dense TPS displacement ``(B, 3, D, H, W)`` of node displacements ``(B, 3, nk, nj, ni)``.

    Same units and channels as ``node_disp`` (voxels of the dense lattice, ``(i, j, k)``); nodes placed
    as the module says. Differentiable; runs on ``node_disp``'s device and dtype.
    """
    shape = tuple(int(s) for s in shape)
    b = node_disp.shape[0]
    nodes = tuple(int(s) for s in node_disp.shape[2:])
    coef = tps_coefficients(node_disp, shape, kernel)                  # (B, 3, N + 4)
    n = coef.shape[-1] - 4
    c = coef[..., :n].reshape(b, 3, *nodes)
    # the coefficients of the 8 mirror images of the lattice, as columns: (N, 8·B·3)
    mirrored = torch.stack([c.flip([a + 2 for a in range(3) if m[a]]) if any(m) else c for m in _MIRRORS])
    weights = mirrored.reshape(8 * b * 3, n).T
    hz, hy, hx = (_half(s) for s in shape)
    device, dtype = node_disp.device, node_disp.dtype
    if hz * hy * hx * n <= CACHE_ELEMENTS:
        rows = _octant_matrix(nodes, shape, kernel, device, dtype) @ weights
    else:
        step = max(1, SLAB_ELEMENTS // (hy * hx * n))
        rows = torch.cat([_octant_rows(nodes, shape, kernel, device, dtype, z, min(z + step, hz)) @ weights
                          for z in range(0, hz, step)])
    blocks = rows.T.reshape(8, b, 3, hz, hy, hx)
    d, h, w = shape
    out = torch.empty((b, 3, d, h, w), device=device, dtype=dtype)
    for f, m in enumerate(_MIRRORS):
        block = blocks[f].flip([a + 2 for a in range(3) if m[a]]) if any(m) else blocks[f]
        zs = slice(d - hz, d) if m[0] else slice(0, hz)
        ys = slice(h - hy, h) if m[1] else slice(0, hy)
        xs = slice(w - hx, w) if m[2] else slice(0, hx)
        out[:, :, zs, ys, xs] = block
    a = coef[..., n:]                                                  # (B, 3, 4): a_0, a_i, a_j, a_k
    kk = torch.arange(d, device=device, dtype=dtype).view(1, 1, d, 1, 1)
    jj = torch.arange(h, device=device, dtype=dtype).view(1, 1, 1, h, 1)
    ii = torch.arange(w, device=device, dtype=dtype).view(1, 1, 1, 1, w)
    av = a[..., None, None, None]
    return out + av[:, :, 0] + av[:, :, 1] * ii + av[:, :, 2] * jj + av[:, :, 3] * kk
