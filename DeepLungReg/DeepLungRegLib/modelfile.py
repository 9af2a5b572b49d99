"""Model file format: weights + JSON metadata, loaded without unpickling code.

Preferred file: ``model.safetensors`` whose header metadata holds one key,
``deeplungreg``, a JSON document (method, grid size, network config, normalisation,
displacement units, training provenance). A ``.pt`` file is accepted when it holds
``{"state_dict": ..., "metadata": "<json>"}`` and loads with
``torch.load(..., weights_only=True)``; anything else is refused.

A model *folder* holds ``model.safetensors`` and, optionally, ``README.md`` (the card).
"""

from __future__ import annotations

import json
import os
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
           "read_metadata", "load_model", "resolve_device"]

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
        except Exception as exc:  # noqa: BLE001 - unpickling refusals come in many types
            raise InputError(f"{path.name}: refused or corrupt model file ({type(exc).__name__})") from None
    else:
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
            meta = json.loads(header["deeplungreg"])
            state = None if metadata_only else load_file(str(path))
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            raise InputError(f"{path.name}: not a DeepLungReg model file ({type(exc).__name__})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path.name}: model metadata lacks {', '.join(missing)}")
    return state, meta


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
    net = get_method(meta["method"]).build_network(meta)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{path.name}: weights do not match the network in its metadata "
                         f"({str(exc).splitlines()[0][:120]})") from None
    return net.to(device).eval(), meta


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
