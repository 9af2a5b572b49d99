"""Model file format: weights + JSON metadata, loaded without unpickling code.

Preferred file: ``model.safetensors`` whose header metadata holds one key,
``deeplungreg``, a JSON document (method, grid size, network config, normalisation,
displacement units, training provenance). A ``.pt`` file is accepted when it holds
``{"state_dict": ..., "metadata": "<json>"}`` and loads with
``torch.load(..., weights_only=True)``; anything else is refused.

A model *folder* holds ``model.safetensors`` and, optionally, ``README.md`` (the card).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as st_save

from .errors import InputError
from .io import atomic_write_bytes
from .methods import get_method, method_info

# where models and resources are found is decided once, in the torch-free catalog (re-exported here)
from .model_catalog import MODEL_FILENAME, default_model_path, resource_path

__all__ = ["MODEL_FILENAME", "default_model_path", "resource_path", "resolve_model_path", "save_model",
           "read_metadata", "load_model", "resolve_device", "validate_metadata", "check_weights"]

FORMAT_VERSION = 1
DISPLACEMENT_UNITS = "voxels of the network grid; channels (i, j, k); maps fixed point p to moving point p + u(p)"
REQUIRED_KEYS = ("format_version", "method", "grid_size", "network", "normalisation", "displacement_units")


def resolve_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    return path


def save_model(path: str | os.PathLike, net: torch.nn.Module, metadata: dict) -> Path:
    """Write ``net``'s weights and ``metadata`` atomically (a folder gets ``model.safetensors``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / MODEL_FILENAME
    meta = dict(metadata)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("displacement_units", DISPLACEMENT_UNITS)
    if hasattr(net, "config"):
        meta["network"] = net.config.to_dict()
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata={"deeplungreg": json.dumps(meta)}))
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    path = resolve_model_path(path)
    return _load(path, metadata_only=True)[1]


def _load(path: Path, metadata_only: bool = False) -> tuple[dict | None, dict]:
    if path.stat().st_size == 0:
        raise InputError(f"{path}: model file is empty")
    if path.suffix == ".pt":
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state, meta = payload["state_dict"], json.loads(payload["metadata"])
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise TypeError("state_dict is not a dict of tensors")
        except Exception as exc:  # noqa: BLE001 - unpickling refusals come in many types
            raise InputError(f"{path.name}: refused or corrupt model file ({type(exc).__name__})") from None
    else:
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
            meta = json.loads(header["deeplungreg"])
            state = None if metadata_only else load_file(str(path))
        except (SafetensorError, KeyError, ValueError, TypeError, OSError) as exc:
            raise InputError(f"{path.name}: not a DeepLungReg model file ({type(exc).__name__})") from None
    validate_metadata(meta, path.name)
    if state is not None:
        check_weights(state, path.name)
    return state, meta


#: Limits of the metadata fields (:func:`validate_metadata`). A 256³ grid already needs
#: several GB for a 16-wide U-Net; larger grids are refused rather than run out of memory.
GRID_LIMITS = (8, 256)
WIDTH_LIMITS = (1, 128)
DEPTH_LIMITS = (1, 7)
NORMALISATION_KINDS = ("hu_window",)


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def validate_metadata(meta: object, name: str = "model") -> dict:
    """Check a model file's metadata against its schema; one-line :class:`InputError` otherwise.

    Required keys: ``format_version`` (an integer, at most this version's), ``method`` (a
    name), ``grid_size`` (an integer or three integers in [8, 256], multiples of
    2^(depth-1) when the network has a depth), ``network`` (an object; ``width`` in
    [1, 128] and ``depth`` in [1, 7] when present), ``normalisation`` (``kind``
    ``hu_window`` with finite ``hu_min`` < ``hu_max``) and ``displacement_units``.
    """
    if not isinstance(meta, dict):
        raise InputError(f"{name}: model metadata is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise InputError(f"{name}: model metadata lacks {', '.join(missing)}")
    version = meta["format_version"]
    if not _int_in(version, 1, FORMAT_VERSION):
        raise InputError(f"{name}: model format_version {version!r} is not supported (this program reads "
                         f"1..{FORMAT_VERSION})")
    if not isinstance(meta["method"], str) or not meta["method"]:
        raise InputError(f"{name}: model method {meta['method']!r} is not a name")
    net = meta["network"]
    if not isinstance(net, dict):
        raise InputError(f"{name}: model network {str(net)[:40]!r} is not an object")
    for key, (lo, hi) in (("width", WIDTH_LIMITS), ("depth", DEPTH_LIMITS)):
        if key in net and not _int_in(net[key], lo, hi):
            raise InputError(f"{name}: network {key} {net[key]!r} is not an integer in [{lo}, {hi}]")
    grid = meta["grid_size"]
    sizes = grid if isinstance(grid, list | tuple) else [grid]
    if len(sizes) not in (1, 3) or not all(_int_in(g, *GRID_LIMITS) for g in sizes):
        raise InputError(f"{name}: model grid_size {str(grid)[:40]!r} is not an integer (or three) in "
                         f"[{GRID_LIMITS[0]}, {GRID_LIMITS[1]}]")
    divisor = 2 ** (net["depth"] - 1) if "depth" in net else 1
    if any(g % divisor for g in sizes):
        raise InputError(f"{name}: model grid_size {grid!r} is not a multiple of {divisor} (network depth {net['depth']})")
    norm = meta["normalisation"]
    if not isinstance(norm, dict) or norm.get("kind") not in NORMALISATION_KINDS:
        kind = norm.get("kind") if isinstance(norm, dict) else norm
        raise InputError(f"{name}: unknown normalisation {str(kind)[:40]!r}; known: {', '.join(NORMALISATION_KINDS)}")
    lo, hi = norm.get("hu_min"), norm.get("hu_max")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        raise InputError(f"{name}: normalisation hu_min/hu_max {lo!r}/{hi!r} are not finite numbers")
    if not hi > lo:
        raise InputError(f"{name}: degenerate normalisation: hu_min {lo:g} is not below hu_max {hi:g}")
    return meta


def check_weights(state: dict, name: str = "model") -> None:
    """Refuse weights holding NaN or infinite values (they give NaN transforms)."""
    bad = []
    for key, tensor in state.items():
        if torch.is_floating_point(tensor):
            n = int(tensor.numel() - torch.isfinite(tensor).sum())
            if n:
                bad.append((key, n))
    if bad:
        total = sum(n for _, n in bad)
        raise InputError(f"{name}: {total} weights are NaN or infinite (first in {bad[0][0]}, "
                         f"{len(bad)} tensors): damaged model file")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the network of the method the metadata names and load the weights.

    Returns (network in eval mode on ``device``, metadata). A method missing from the
    registry, or weights that do not fit its network, is an :class:`InputError`.
    """
    path = resolve_model_path(path)
    state, meta = _load(path)
    try:
        method_info(str(meta["method"]))
    except InputError as exc:
        raise InputError(f"{path.name}: {exc}") from None
    try:
        net = get_method(meta["method"]).build_network(meta)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{path.name}: cannot build the network its metadata describes "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{path.name}: weights do not match the network in its metadata "
                         f"({str(exc).splitlines()[0][:120]})") from None
    return net.to(device).eval(), meta


@contextlib.contextmanager
def ieee_float32(device: torch.device | str) -> Iterator[None]:
    """Full float32 convolutions on a CUDA device inside the block, the previous setting restored after.

    cuDNN convolutions default to TF32 on Ampere and later GPUs (a 10-bit mantissa, ~1e-3 relative):
    the networks' predictions would then differ from the CPU's by far more than float32 rounding.
    Inference (``register``, ``evaluate``) runs its network and refinement inside this block; training
    keeps torch's default. Nothing changes for the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-backend API
        owner, name, value = conv, "fp32_precision", "ieee"
    else:  # older torch (mixing the two APIs is an error in the newer one)
        owner, name, value = torch.backends.cudnn, "allow_tf32", False
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def check_bf16(device: torch.device | str, bf16: bool) -> None:
    """Refuse ``--bf16`` on a CUDA GPU without native bfloat16 (compute capability below 8.0, i.e. before
    Ampere) with one line, not a traceback (``torch.cuda.is_bf16_supported()`` also says yes for emulation)."""
    device = torch.device(device)
    if bf16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise InputError(f"--bf16 needs a GPU with bfloat16 (compute capability 8.0 or later); "
                         f"{torch.cuda.get_device_name(device)} has none: run without --bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
