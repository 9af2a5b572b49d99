"""Finding and describing model folders without torch, safetensors or any other install.

The Slicer module lists the available models as soon as it opens, before its Python
dependencies are installed, so nothing here imports more than the standard library and
the (torch-free) method registry. A ``.safetensors`` file starts with an 8-byte
little-endian header length followed by that many bytes of JSON; the JSON's
``"__metadata__"`` maps ``"deeplungreg"`` to the model's metadata, itself a JSON string
(see :mod:`.modelfile`, which writes it).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import InputError

MODEL_FILENAME = "model.safetensors"
CARD_FILENAME = "README.md"
METADATA_KEY = "deeplungreg"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_LIB_DIR = Path(__file__).resolve().parent
#: Where extension resources live: the source tree (``<repo>/Resources``), then the layout of an
#: installed Slicer extension (``qt-scripted-modules/Resources``, see DeepLungReg/CMakeLists.txt).
RESOURCE_ROOTS = (_LIB_DIR.parents[1] / "Resources", _LIB_DIR.parent / "Resources")


def resource_path(relative: str) -> Path:
    """First existing ``RESOURCE_ROOTS / relative`` (the source-tree path if none exists)."""
    for root in RESOURCE_ROOTS:
        if (root / relative).exists():
            return root / relative
    return RESOURCE_ROOTS[0] / relative


def default_model_path() -> Path:
    """The shipped default model folder."""
    return resource_path("Models/default")


def model_file(path: str | os.PathLike) -> Path:
    """``path`` itself or ``path/model.safetensors`` for a folder."""
    path = Path(path)
    return path / MODEL_FILENAME if path.is_dir() else path


def read_header_metadata(path: str | os.PathLike) -> dict:
    """The ``deeplungreg`` metadata of a model file or folder, read from the safetensors header
    alone (no weights, no torch). Anything unreadable is an :class:`InputError`."""
    file = model_file(path)
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise InputError(f"{file.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise InputError(f"{file.name}: not a safetensors file (header of {n} bytes)")
            header_bytes = fh.read(n)
    except OSError as exc:
        raise InputError(f"{file}: cannot read the model file ({exc.strerror or exc})") from None
    if len(header_bytes) != n:
        raise InputError(f"{file.name}: truncated safetensors header")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise InputError(f"{file.name}: not a DeepLungReg model file (no '{METADATA_KEY}' metadata)") from None
    if not isinstance(meta, dict):
        raise InputError(f"{file.name}: malformed DeepLungReg metadata")
    return meta


def shipped_model_folders() -> list[Path]:
    """The default model first, then the other shipped models (``Resources/Models/<method>/``), by name."""
    default = default_model_path()
    found = [default] if (default / MODEL_FILENAME).exists() else []
    return found + sorted(p.parent for p in default.parent.glob(f"*/{MODEL_FILENAME}") if p.parent != default)


def model_folders(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """The shipped models plus every folder holding a ``model.safetensors`` in ``extra`` or one level below."""
    found = shipped_model_folders()
    for base in map(Path, extra or []):
        if (base / MODEL_FILENAME).exists():
            candidates = [base]
        elif base.is_dir():
            candidates = sorted(p.parent for p in base.glob(f"*/{MODEL_FILENAME}"))
        else:
            candidates = []
        found.extend(c for c in candidates if c not in found)
    return found


def card_title(folder: str | os.PathLike) -> str | None:
    """First heading of the model card (``README.md`` next to the model), if any."""
    card = Path(folder) / CARD_FILENAME
    try:
        lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("#"):
            return line.lstrip("#").strip().replace("`", "") or None
    return None


def method_description(name: str | None) -> str:
    """``title (paper)`` from the method registry; unknown names are said to be unknown."""
    from .methods import method_info

    try:
        info = method_info(str(name))
    except InputError:
        return f"unknown method {name!r} (made by a newer DeepLungReg?)"
    return f"{info.title} ({info.paper})"


def model_label(folder: str | os.PathLike, meta: dict | None = None, default: Path | None = None) -> str:
    """Menu text: the folder's name (``default (shipped)`` for the shipped model) and its method."""
    folder, default = Path(folder), default or default_model_path()
    if folder == default:
        name = "default (shipped)"
    else:
        name = f"{folder.name} (shipped)" if folder.parent == default.parent else folder.name
    if meta is None:
        try:
            meta = read_header_metadata(folder)
        except InputError:
            return f"{name} (unreadable)"
    return f"{name}: {meta.get('method')}, {grid_text(meta.get('grid_size'))}"


def grid_text(grid) -> str:
    """``64³`` for a cubic lattice, ``64×48×64`` (i×j×k) otherwise."""
    if isinstance(grid, list | tuple):
        if len(set(grid)) == 1:
            return f"{grid[0]}³"
        return "×".join(str(g) for g in grid)
    return f"{grid}³"


def model_summary(path: str | os.PathLike) -> str:
    """A few lines from the metadata and the card: method, grid, training data, validation error."""
    meta = read_header_metadata(path)
    tr = meta.get("training") or {}
    val = tr.get("validation") or {}
    lines = [f"Method: {meta.get('method')}: {method_description(meta.get('method'))}",
             f"Network grid {grid_text(meta.get('grid_size'))}"]
    if meta.get("untrained"):
        lines.append("UNTRAINED (random weights): for tests only")
    if tr.get("iterations"):
        lines.append(f"Trained {tr['iterations']} iterations on {len(tr.get('scans') or [])} scan(s)")
    final, identity = val.get("final_averaged") or {}, val.get("identity") or {}
    if "epe_lung_mm" in final and "epe_lung_mm" in identity:
        lines.append(f"Validation end-point error {final['epe_lung_mm']:.2f} mm "
                     f"(identity {identity['epe_lung_mm']:.2f} mm)")
    folder = model_file(path).parent
    title = card_title(folder)
    if title:
        lines.append(f"Card: {title} ({folder / CARD_FILENAME})")
    return "\n".join(lines)
