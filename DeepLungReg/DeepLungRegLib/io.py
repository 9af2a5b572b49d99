"""Reading and writing volumes, landmarks and transforms.

Convention: every point returned by this module is a physical point in **LPS
millimetres** (ITK/SimpleITK world coordinates), as an ``(N, 3)`` float64 array. Slicer
files (``.mrk.json``, ``.fcsv``) store RAS unless their header says LPS; they are
converted here (RAS -> LPS negates x and y).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

# DIR-Lab geometry (public documentation): size (x, y, z) and spacing (x, y, z) in mm.
DIRLAB_4DCT: dict[int, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    1: ((256, 256, 94), (0.97, 0.97, 2.5)),
    2: ((256, 256, 112), (1.16, 1.16, 2.5)),
    3: ((256, 256, 104), (1.15, 1.15, 2.5)),
    4: ((256, 256, 99), (1.13, 1.13, 2.5)),
    5: ((256, 256, 106), (1.10, 1.10, 2.5)),
    6: ((512, 512, 128), (0.97, 0.97, 2.5)),
    7: ((512, 512, 136), (0.97, 0.97, 2.5)),
    8: ((512, 512, 128), (0.97, 0.97, 2.5)),
    9: ((512, 512, 128), (0.97, 0.97, 2.5)),
    10: ((512, 512, 120), (0.97, 0.97, 2.5)),
}
DIRLAB_COPD: dict[int, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    1: ((512, 512, 121), (0.625, 0.625, 2.5)),
    2: ((512, 512, 102), (0.645, 0.645, 2.5)),
    3: ((512, 512, 126), (0.652, 0.652, 2.5)),
    4: ((512, 512, 126), (0.590, 0.590, 2.5)),
    5: ((512, 512, 131), (0.647, 0.647, 2.5)),
    6: ((512, 512, 119), (0.633, 0.633, 2.5)),
    7: ((512, 512, 112), (0.625, 0.625, 2.5)),
    8: ((512, 512, 115), (0.586, 0.586, 2.5)),
    9: ((512, 512, 116), (0.664, 0.664, 2.5)),
    10: ((512, 512, 135), (0.742, 0.742, 2.5)),
}

LANDMARK_FORMATS = ("auto", "dirlab", "slicer", "lps")
HU_OFFSET_KEY = "deeplungreg_hu_offset"  # metadata set on DIR-Lab images: value subtracted on reading


# --------------------------------------------------------------------------- volumes
def dirlab_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Look up size and spacing of a DIR-Lab case from its file name (``case6_T00_s.img``, ``copd1_iBHCT.img``)."""
    name = Path(path).name.lower()
    m = re.search(r"copd(\d+)", name)
    if m and int(m.group(1)) in DIRLAB_COPD:
        return DIRLAB_COPD[int(m.group(1))]
    m = re.search(r"case(\d+)", name)
    if m and int(m.group(1)) in DIRLAB_4DCT:
        return DIRLAB_4DCT[int(m.group(1))]
    raise InputError(f"{Path(path).name}: cannot tell the DIR-Lab case from the file name; give size and spacing")


def read_dirlab_img(path: str | os.PathLike, size: tuple[int, int, int] | None = None,
                    spacing: tuple[float, float, float] | None = None) -> sitk.Image:
    """Read a DIR-Lab raw image: int16 little-endian, no header, x fastest.

    Geometry: origin (0, 0, 0), identity direction, so a 1-based landmark index ``n``
    lies at ``(n - 1) * spacing``. Images stored as HU + 1024 (all values >= 0) are
    shifted back to HU.
    """
    path = Path(path)
    if size is None or spacing is None:
        size0, spacing0 = dirlab_geometry(path)
        size, spacing = size or size0, spacing or spacing0
    nbytes = path.stat().st_size
    expected = 2 * int(np.prod(size))
    if nbytes != expected:
        raise InputError(f"{path.name}: {nbytes} bytes, expected {expected} for int16 volume of size {tuple(size)}")
    arr = np.fromfile(path, dtype="<i2").reshape(size[2], size[1], size[0]).astype(np.float32)
    offset = 1024.0 if arr.min() >= 0 else 0.0  # some releases store HU + 1024
    arr -= offset
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetMetaData(HU_OFFSET_KEY, f"{offset:g}")
    return img


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D CT volume as float32 HU.

    Accepts anything SimpleITK reads (NRRD, NIfTI, MHA, ...), a folder holding one DICOM
    series, or a DIR-Lab raw ``.img`` (geometry looked up by case name).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise InputError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
            img = reader.Execute()
        elif path.suffix.lower() == ".img" and not path.with_suffix(".hdr").exists():
            img = read_dirlab_img(path)
        else:
            if path.stat().st_size == 0:
                raise InputError(f"{path}: file is empty")
            img = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports unreadable files this way
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Exception" in ln), first[-1] if first else "")
        raise InputError(f"{path}: cannot read as an image ({detail.strip()[:160]})") from None
    check_ct_volume(img, str(path))
    out = sitk.Cast(img, sitk.sitkFloat32)
    if img.HasMetaDataKey(HU_OFFSET_KEY):
        out.SetMetaData(HU_OFFSET_KEY, img.GetMetaData(HU_OFFSET_KEY))
    return out


def check_ct_volume(img: sitk.Image, name: str = "volume") -> None:
    """Refuse volumes that cannot be lung CT: not 3D, scalar-less, too small, NaN, constant."""
    if img.GetDimension() != 3:
        raise InputError(f"{name}: {img.GetDimension()}D image; a 3D CT volume is required")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar CT is required")
    if min(img.GetSize()) < 8:
        raise InputError(f"{name}: size {img.GetSize()} is too small (at least 8 voxels per axis)")
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1.0:
        raise InputError(f"{name}: constant image (all voxels {lo:g})")
    if lo > -500 or hi < -200:
        raise InputError(f"{name}: intensity range [{lo:g}, {hi:g}] does not look like CT in HU (air near -1000)")


def write_image(img: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write with fast (level 1) compression: these outputs are large and read rarely."""
    sitk.WriteImage(img, str(path), compress, 1 if compress else -1)


def to_int16_hu(img: sitk.Image) -> sitk.Image:
    """Round a float CT to int16 HU (clamped to [-32768, 32767]): half the size, faster to write."""
    return sitk.Cast(sitk.Round(sitk.Clamp(img, sitk.sitkFloat32, -32768.0, 32767.0)), sitk.sitkInt16)


# --------------------------------------------------------------------------- landmarks
def _numeric_rows(path: Path, min_cols: int = 3) -> np.ndarray:
    rows = []
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = re.split(r"[\s,;]+", s)
        try:
            values = [float(p) for p in parts[:min_cols]]
        except ValueError:
            raise InputError(f"{path.name}:{lineno}: malformed landmark line {s[:60]!r}") from None
        if len(values) < min_cols or not np.isfinite(values).all():
            raise InputError(f"{path.name}:{lineno}: expected {min_cols} numbers, got {s[:60]!r}")
        rows.append(values)
    if not rows:
        raise InputError(f"{path.name}: no landmarks found")
    return np.asarray(rows, dtype=np.float64)


def index_to_physical(img: sitk.Image, index: np.ndarray) -> np.ndarray:
    """0-based continuous indices (N, 3) in (i, j, k) order -> LPS mm."""
    origin = np.asarray(img.GetOrigin())
    m = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())[None, :]
    return origin[None, :] + np.asarray(index, dtype=np.float64) @ m.T


def physical_to_index(img: sitk.Image, points: np.ndarray) -> np.ndarray:
    """LPS mm (N, 3) -> 0-based continuous indices (i, j, k)."""
    origin = np.asarray(img.GetOrigin())
    m = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())[None, :]
    return (np.asarray(points, dtype=np.float64) - origin[None, :]) @ np.linalg.inv(m).T


def read_dirlab_landmarks(path: str | os.PathLike, reference: sitk.Image) -> np.ndarray:
    """DIR-Lab ``*_xyz.txt``: 1-based voxel indices (x y z) of ``reference`` -> LPS mm."""
    idx = _numeric_rows(Path(path))
    return index_to_physical(reference, idx - 1.0)


def _ras_or_lps(system: str | int | None) -> str:
    s = str(system).strip().upper() if system is not None else "RAS"
    return "LPS" if s in ("LPS", "1") else "RAS"


def read_slicer_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Slicer markups ``.mrk.json`` or legacy ``.fcsv`` -> LPS mm."""
    path = Path(path)
    if path.name.lower().endswith(".json"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            markup = doc["markups"][0]
            system = _ras_or_lps(markup.get("coordinateSystem", "LPS"))
            pts = np.asarray([cp["position"] for cp in markup.get("controlPoints", [])], dtype=np.float64)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InputError(f"{path.name}: not a Slicer markups file ({type(exc).__name__})") from None
    else:
        system = "RAS"
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.startswith("#"):
                m = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line)
                if m:
                    system = _ras_or_lps(m.group(1))
                continue
            if not line.strip():
                continue
            parts = line.split(",")
            try:
                rows.append([float(parts[1]), float(parts[2]), float(parts[3])])
            except (IndexError, ValueError):
                raise InputError(f"{path.name}:{lineno}: malformed .fcsv line {line[:60]!r}") from None
        pts = np.asarray(rows, dtype=np.float64)
    if pts.size == 0:
        raise InputError(f"{path.name}: no control points")
    pts = pts.reshape(-1, 3)
    if system == "RAS":
        pts = pts * np.array([-1.0, -1.0, 1.0])
    return pts


def guess_landmark_format(path: str | os.PathLike) -> str:
    """``auto`` rule: ``.json``/``.fcsv`` -> slicer; a ``.txt`` whose name contains ``xyz`` -> dirlab; else lps."""
    name = Path(path).name.lower()
    if name.endswith(".json") or name.endswith(".fcsv"):
        return "slicer"
    if "xyz" in name:
        return "dirlab"
    return "lps"


def read_landmarks(path: str | os.PathLike, fmt: str = "auto", reference: sitk.Image | None = None) -> np.ndarray:
    """Read landmarks in any supported format and return LPS mm points ``(N, 3)``.

    ``reference`` (the image the landmarks belong to) is needed for DIR-Lab voxel files.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such landmark file")
    if fmt not in LANDMARK_FORMATS:
        raise InputError(f"unknown landmark format {fmt!r}; use one of {', '.join(LANDMARK_FORMATS)}")
    if fmt == "auto":
        fmt = guess_landmark_format(path)
    if fmt == "slicer":
        return read_slicer_landmarks(path)
    if fmt == "dirlab":
        if reference is None:
            raise InputError(f"{path.name}: DIR-Lab landmarks need their image")
        return read_dirlab_landmarks(path, reference)
    return _numeric_rows(path)


def check_landmark_pair(fixed: np.ndarray, moving: np.ndarray) -> None:
    if fixed.shape != moving.shape:
        raise InputError(f"landmark counts differ: {len(fixed)} fixed vs {len(moving)} moving")


def write_lps_landmarks(path: str | os.PathLike, points: np.ndarray) -> None:
    """Plain text, one ``x y z`` line per point in LPS mm."""
    np.savetxt(str(path), np.asarray(points).reshape(-1, 3), fmt="%.6f",
               header="x y z (physical LPS millimetres)")


# --------------------------------------------------------------------------- atomic output
@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success its files are moved into
    ``final`` (created if needed); on failure nothing is left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        final.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, final / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
