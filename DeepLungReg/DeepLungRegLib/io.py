"""Reading and writing volumes, landmarks and transforms.

Convention: every point returned by this module is a physical point in **LPS
millimetres** (ITK/SimpleITK world coordinates), as an ``(N, 3)`` float64 array. Slicer
files (``.mrk.json``, ``.fcsv``) store RAS unless their header says LPS; they are
converted here (RAS -> LPS negates x and y).
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import image_lattice

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
    raise InputError(f"{Path(path).name}: cannot tell the DIR-Lab case from the file name (it must contain caseN "
                     "or copdN); rename it, or convert the raw file to NRRD/NIfTI with its size and spacing")


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


def read_volume(path: str | os.PathLike, series: str | None = None, keep_int16: bool = False) -> sitk.Image:
    """Read a 3D CT volume as float32 HU (``keep_int16``: as int16 HU when the file stores integers,
    half the memory and the same values; every integer CT passing :func:`check_ct_volume` fits).

    Accepts anything SimpleITK reads (NRRD, NIfTI, MHA, ...), one DICOM series (a folder
    holding just that series, or the path of any one file of the series), or a DIR-Lab raw
    ``.img`` (geometry looked up by case name). Damaged files are refused: see
    :func:`check_nifti_data` (NIfTI byte count, gzip stream, NaN/Inf stored in the file),
    :func:`read_dicom_series` (several series, uneven slice positions) and
    :func:`check_ct_volume` (implausible values). ``series`` (a DICOM series instance UID)
    picks one series of a folder holding several.
    """
    path = Path(path)
    check_utf8_path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir() or _is_dicom_file(path):
            img = read_dicom_series(path, series)
        elif series is not None:
            raise InputError(f"{path}: a DICOM series UID was given but this is not a DICOM folder or file")
        elif path.suffix.lower() == ".img" and not path.with_suffix(".hdr").exists():
            img = read_dirlab_img(path)
        else:
            if path.stat().st_size == 0:
                raise InputError(f"{path}: file is empty")
            if path.name.lower().endswith((".nii", ".nii.gz")):
                img = _read_nifti_checked(path)
            else:
                img = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports unreadable files this way
        raise InputError(f"{path}: cannot read as an image ({_sitk_detail(exc)})") from None
    check_ct_volume(img, str(path))
    integer = img.GetPixelID() in (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32,
                                   sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64)
    target = sitk.sitkInt16 if keep_int16 and integer and not img.HasMetaDataKey(HU_OFFSET_KEY) else sitk.sitkFloat32
    out = img if img.GetPixelID() == target else sitk.Cast(img, target)
    if img.HasMetaDataKey(HU_OFFSET_KEY):
        out.SetMetaData(HU_OFFSET_KEY, img.GetMetaData(HU_OFFSET_KEY))
    return out


class PairReading:
    """Two volumes being read side by side (:func:`read_volume` on two threads: ITK's reading, the
    gzip check and NumPy's reductions release the GIL). :meth:`result` waits for both and raises
    the fixed image's refusal first, as reading them one after the other would."""

    def __init__(self, fixed: str | os.PathLike, moving: str | os.PathLike, fixed_series: str | None = None,
                 moving_series: str | None = None, keep_int16: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="read")
        self._jobs = (pool.submit(read_volume, fixed, fixed_series, keep_int16),
                      pool.submit(read_volume, moving, moving_series, keep_int16))
        pool.shutdown(wait=False)

    def result(self) -> tuple[sitk.Image, sitk.Image]:
        """(fixed, moving) as :func:`read_volume` returns them. On a refusal the other reading is
        waited for first (no read left running behind the error)."""
        from concurrent.futures import wait

        wait(self._jobs)
        return self._jobs[0].result(), self._jobs[1].result()


def _read_nifti_checked(path: Path) -> sitk.Image:
    """SimpleITK's reading of a ``.nii``/``.nii.gz``, refused where the file is damaged.

    A ``.nii.gz`` whose gzip trailer (CRC-32 and length of the whole uncompressed stream) equals
    that of its header followed by the voxels ITK returned is intact, and ITK read it exactly: one
    decompression (ITK's) and a CRC of the voxels in memory. Anything else (a trailer that does not
    match: damage, several gzip members, scaled or byte-swapped voxels; an uncompressed file) falls
    back to :func:`check_nifti_data` and ITK side by side (each decompresses the file, both release
    the GIL): the check's refusal wins over whatever ITK made of a damaged file."""
    from concurrent.futures import ThreadPoolExecutor

    if path.name.lower().endswith(".gz"):
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError:
            check_nifti_data(path)  # a damaged file: the check's one line
            raise
        if _gzip_trailer_matches(path, img):
            return img
        _same_voxels(path, img, check_nifti_data(path))
        return img
    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(check_nifti_data, path)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError:
            check.result()  # a damaged file: the check's one line
            raise
        _same_voxels(path, img, check.result())
    return img


def _voxels_crc(arr: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of ``arr``'s bytes in memory order, continuing ``crc``."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"), crc)


def _same_voxels(path: Path, img: sitk.Image, found: dict | None) -> None:
    """Refuse when ITK's voxels differ from the (intact) file's, where both hold the same bytes
    (unscaled, same byte order): a safety net, so that a reader that misreads a valid file is never
    used silently (none is known: ITK read every flavour the tests write, several gzip members included)."""
    if not found or found["dtype"] is None:
        return
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype != found["dtype"] or arr.nbytes != found["voxel_bytes"]:
        return  # ITK scaled or converted the voxels: nothing byte-for-byte to compare
    if _voxels_crc(arr) != found["crc32"]:
        raise InputError(f"{path.name}: SimpleITK read other voxel values than the file holds; decompress it "
                         "(gunzip) and give the .nii, or re-save it with another program")


def _gzip_trailer_matches(path: Path, img: sitk.Image) -> bool:
    """True when ``path`` (one gzip member) decompresses to exactly its NIfTI header followed by
    ``img``'s voxels as stored in memory: CRC-32 and length (mod 2^32) of that byte string equal
    the gzip trailer's. False for anything else (then the full check decides)."""
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(540)
            hdr = _parse_nifti_header(head) if len(head) >= 348 else None
            if hdr is None:
                return False
            vox_offset, dim, datatype, bitpix = hdr
            if vox_offset > len(head):
                head += fh.read(vox_offset - len(head))
        with open(path, "rb") as fh:
            fh.seek(-8, os.SEEK_END)
            trailer = fh.read(8)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
        return False
    dtype = _NIFTI_DTYPES.get(datatype)
    arr = sitk.GetArrayViewFromImage(img)
    if (dtype is None or len(head) < vox_offset or len(trailer) != 8
            or arr.dtype != np.dtype(dtype).newbyteorder(_nifti_byteorder(head))
            or arr.dtype.itemsize * 8 != bitpix or not arr.flags.c_contiguous):
        return False
    nvox = int(np.prod([max(int(d), 1) for d in dim], dtype=np.int64))
    if arr.size != nvox:
        return False
    crc = _voxels_crc(arr, zlib.crc32(head[:vox_offset]))
    return (int.from_bytes(trailer[:4], "little") == crc
            and int.from_bytes(trailer[4:], "little") == (vox_offset + arr.nbytes) % 2**32)


def check_utf8_path(path: str | os.PathLike) -> None:
    """Refuse a path that is not valid UTF-8 (undecodable bytes): SimpleITK aborts the whole
    process on such a path instead of raising."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{ascii(os.fsdecode(path))}: path is not valid UTF-8 (SimpleITK cannot open it); "
                         "rename the file or folder") from None


def _sitk_detail(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "ERROR" in ln or "[nrrd]" in ln),
                  next((ln for ln in lines if "Exception" in ln), lines[-1] if lines else ""))
    detail = re.sub(r"\(0x[0-9a-fA-F]+\)", "", detail)
    if "cannot be read" in detail:
        detail += " - damaged or truncated file?"
    return detail[:160]


# --------------------------------------------------------------------------- NIfTI payload check
#: NIfTI datatype code -> numpy dtype (codes of the NIfTI-1 standard).
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}


def check_nifti_data(path: str | os.PathLike, chunk: int = 1 << 24) -> dict | None:
    """Refuse a damaged ``.nii``/``.nii.gz`` before SimpleITK reads it.

    ITK reads a truncated file without complaint (the missing voxels become 0) and turns
    NaN/Inf voxels into 0, so the file is checked here first, streaming its bytes once:
    the gzip stream must be complete with a correct checksum, the file must hold at
    least the ``prod(dim) * bitpix / 8`` voxel bytes its header announces after
    ``vox_offset`` (a header-only file holds "no voxel data"), and float voxels must all
    be finite. Other NIfTI flavours (``.hdr``/``.img`` pairs) are left to SimpleITK (``None``).
    Returns the CRC-32 of the announced voxel bytes with their dtype (to compare with what ITK read).
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
            if len(head) < 348:
                raise InputError(f"{path.name}: NIfTI header is cut short ({len(head)} bytes)")
            hdr = _parse_nifti_header(head)
            if hdr is None:
                return  # not a single-file NIfTI-1/2: let SimpleITK decide
            vox_offset, dim, datatype, bitpix = hdr
            nvox = int(np.prod([max(int(d), 1) for d in dim], dtype=np.int64))
            expected = nvox * bitpix // 8
            if vox_offset > len(head):
                fh.read(vox_offset - len(head))  # skip the header extensions
            leftover = head[vox_offset:]
            dtype = _NIFTI_DTYPES.get(datatype)
            check_finite = dtype is not None and dtype[0] == "f"
            if check_finite:
                dtype = np.dtype(dtype).newbyteorder(_nifti_byteorder(head))
            got, bad = 0, 0
            crc, crc_bytes = zlib.crc32(leftover[:expected]), min(len(leftover), expected)  # each byte once
            while True:
                block = fh.read(chunk)
                if not block:
                    break
                if crc_bytes < expected:
                    crc = zlib.crc32(block[:expected - crc_bytes], crc)
                    crc_bytes += min(len(block), expected - crc_bytes)
                data, leftover = leftover + block, b""
                if check_finite:
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    leftover = data[usable:]
                    got += usable
                else:
                    got += len(data)
    except InputError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path.name}: damaged or truncated gzip stream ({exc}); the file is incomplete") from None
    except OSError as exc:
        raise InputError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    if got == 0 and expected > 0:
        raise InputError(f"{path.name}: header only, no voxel data (expected {expected} bytes of voxels)")
    if got < expected:
        raise InputError(f"{path.name}: truncated: {got} of the {expected} voxel bytes its header announces "
                         f"({100.0 * got / expected:.1f} %)")
    if bad:
        raise InputError(f"{path.name}: {bad} voxels are NaN or infinite (damaged file)")
    slope, inter = _nifti_scaling(head)
    plain = (slope in (0.0, 1.0) or not math.isfinite(slope)) and inter == 0.0 and (len(dim) < 5 or dim[4] <= 1)
    # the voxels as stored, comparable byte for byte with ITK's only when ITK neither scales them
    # (scl_slope/scl_inter) nor interleaves components (dim[5] > 1)
    return {"crc32": crc, "dtype": np.dtype(_NIFTI_DTYPES[datatype]).newbyteorder(_nifti_byteorder(head))
            if datatype in _NIFTI_DTYPES and plain else None, "voxel_bytes": expected}


def _nifti_scaling(head: bytes) -> tuple[float, float]:
    """(scl_slope, scl_inter) of a NIfTI-1/2 header."""
    bo = _nifti_byteorder(head)
    if int.from_bytes(head[:4], "little" if bo == "<" else "big") == 348:
        return float(np.frombuffer(head, f"{bo}f4", 1, 112)[0]), float(np.frombuffer(head, f"{bo}f4", 1, 116)[0])
    return float(np.frombuffer(head, f"{bo}f8", 1, 176)[0]), float(np.frombuffer(head, f"{bo}f8", 1, 184)[0])


def _nifti_byteorder(head: bytes) -> str:
    return "<" if int.from_bytes(head[:4], "little") in (348, 540) else ">"


def _parse_nifti_header(head: bytes) -> tuple[int, list[int], int, int] | None:
    """(vox_offset, dims, datatype, bitpix) of a single-file NIfTI-1/2 header, else None."""
    bo = _nifti_byteorder(head)
    size = int.from_bytes(head[:4], "little" if bo == "<" else "big")
    if size == 348 and head[344:347] == b"n+1":
        ndim = int(np.frombuffer(head, f"{bo}i2", 1, 40)[0])
        dims = np.frombuffer(head, f"{bo}i2", 7, 42)[: max(min(ndim, 7), 0)].tolist()
        datatype = int(np.frombuffer(head, f"{bo}i2", 1, 70)[0])
        bitpix = int(np.frombuffer(head, f"{bo}i2", 1, 72)[0])
        vox_offset = int(np.frombuffer(head, f"{bo}f4", 1, 108)[0])
    elif size == 540 and len(head) >= 540 and head[4:7] == b"n+2":
        datatype = int(np.frombuffer(head, f"{bo}i2", 1, 12)[0])
        bitpix = int(np.frombuffer(head, f"{bo}i2", 1, 14)[0])
        ndim = int(np.frombuffer(head, f"{bo}i8", 1, 16)[0])
        dims = np.frombuffer(head, f"{bo}i8", 7, 24)[: max(min(ndim, 7), 0)].tolist()
        vox_offset = int(np.frombuffer(head, f"{bo}i8", 1, 168)[0])
    else:
        return None
    if vox_offset < size or bitpix <= 0 or any(d < 0 for d in dims):
        return None
    return vox_offset, dims, datatype, bitpix


# --------------------------------------------------------------------------- DICOM
def _is_dicom_file(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_tag(reader: sitk.ImageFileReader, tag: str, default: str = "") -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else default


_WARNINGS_LOCK = threading.Lock()
_WARNINGS_OFF = {"depth": 0, "saved": True}


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's global warning display off while the block runs; nested and concurrent blocks (two
    series read on two threads) restore it only when the last one ends."""
    with _WARNINGS_LOCK:
        if _WARNINGS_OFF["depth"] == 0:
            _WARNINGS_OFF["saved"] = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _WARNINGS_OFF["depth"] += 1
    try:
        yield
    finally:
        with _WARNINGS_LOCK:
            _WARNINGS_OFF["depth"] -= 1
            if _WARNINGS_OFF["depth"] == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_WARNINGS_OFF["saved"])


def _dicom_header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return reader


def read_dicom_series(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series: ``path`` is a folder holding exactly one series, or any one file
    of the series (its folder may hold others; the file's series UID picks the series), or a
    folder and ``series_uid``.

    Refused: a folder with several series (the message lists each series' UID,
    description and number of files), and a series whose slice positions, projected on the
    slice normal (ImageOrientationPatient × ImagePositionPatient), are not evenly spaced
    (a missing slice, repeated slices or mixed acquisitions): every gap must be within
    10 % (and 0.05 mm) of the median gap.
    """
    path = Path(path)
    series = sitk.ImageSeriesReader()
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        ids = series.GetGDCMSeriesIDs(str(folder))
        if not ids:
            raise InputError(f"{path}: folder holds no DICOM series")
        if series_uid is not None and series_uid not in ids:
            raise InputError(f"{path}: no DICOM series {series_uid} in the folder (it holds {', '.join(ids)})")
        if series_uid is None and len(ids) > 1:
            listing = []
            for uid in ids:
                files = series.GetGDCMSeriesFileNames(str(folder), uid)
                desc = _dicom_tag(_dicom_header(files[0]), "0008|103e", "no description") if files else ""
                listing.append(f"{uid} ({desc!r}, {len(files)} files)")
            raise InputError(f"{path}: folder holds {len(ids)} DICOM series: {'; '.join(listing)}; "
                             "give the path of one file of the series you want (or a folder holding only it)")
        uid = series_uid or ids[0]
    else:
        uid = _dicom_tag(_dicom_header(str(path)), "0020|000e")
    files = list(series.GetGDCMSeriesFileNames(str(folder), uid)) if uid else []
    if not files:
        files = [str(path)]
    series.SetFileNames(files)
    series.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, read with the pixels
    with _itk_warnings_off():  # uneven spacing is refused below, not warned about
        img = series.Execute()
    if len(files) > 1:
        check_dicom_slice_spacing([(series.GetMetaData(i, "0020|0032") if series.HasMetaDataKey(i, "0020|0032") else "",
                                    series.GetMetaData(i, "0020|0037") if series.HasMetaDataKey(i, "0020|0037") else "")
                                   for i in range(len(files))], str(path))
    return img


def check_dicom_slice_spacing(tags: list[tuple[str, str]], name: str = "series") -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal (see
    :func:`read_dicom_series`); ``tags`` holds each slice's (ImagePositionPatient,
    ImageOrientationPatient) strings."""
    pos, normal = [], None
    for ipp, iop in tags:
        ipp, iop = ipp.strip(), iop.strip()
        if not ipp or not iop:
            return  # no geometry tags (e.g. secondary capture): let ITK decide
        try:
            if normal is None:
                o = np.asarray([float(v) for v in iop.split("\\")[:6]])
                normal = np.cross(o[:3], o[3:])
            pos.append(float(np.dot(normal, [float(v) for v in ipp.split("\\")[:3]])))
        except ValueError:
            return  # malformed geometry tags: let ITK decide
    z = np.sort(np.asarray(pos))
    gaps = np.diff(z)
    med = float(np.median(gaps))
    if med <= 1e-3:
        raise InputError(f"{name}: {len(tags)} DICOM slices share their positions (repeated slices or "
                         "several acquisitions in one series)")
    bad = np.flatnonzero(np.abs(gaps - med) > max(0.1 * med, 0.05))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{name}: DICOM slices are not evenly spaced: gap of {gaps[i]:.3g} mm between "
                         f"slices at {z[i]:.2f} and {z[i + 1]:.2f} mm along the normal (usual gap "
                         f"{med:.3g} mm, {bad.size} uneven gaps); a slice is missing or the series mixes acquisitions")


# --------------------------------------------------------------------------- plausibility
#: CT values must lie in this range (HU; int16, what CT scanners store): bit flips and damaged
#: float files produce values like ±1.7e38.
HU_PLAUSIBLE = (-32768.0, 32767.0)
#: At most this fraction of the voxels may be exactly 0 (~0.1-0.5 % in real CT; even a circular
#: field of view padded with 0 outside it gives ~21 %; a file truncated at two thirds, read by a
#: reader that fills with 0, gives 33 %).
MAX_ZERO_FRACTION = 0.3
#: Consecutive constant slices (every voxel one value) above this value are damage (a run of
#: 2 or more); constant slabs of air or padding (at or below it) are allowed.
CONSTANT_SLAB_MAX_HU = -900.0


def check_ct_volume(img: sitk.Image, name: str = "volume") -> None:
    """Refuse volumes that cannot be (undamaged) lung CT. Rules, in order:

    3D, one component per voxel, at least 8 voxels per axis; every value finite and in
    :data:`HU_PLAUSIBLE` ([-32768, 32767] HU); not constant; air present (minimum below
    -500 HU) and something denser than lung (maximum above -200 HU); at most
    :data:`MAX_ZERO_FRACTION` (30 %) of the voxels exactly 0; no run of two or more
    consecutive constant slices along any axis with a value above -900 HU (air or padding
    slabs are fine; zero-filled slabs are what a truncated file leaves).
    """
    if img.GetDimension() != 3:
        raise InputError(f"{name}: {img.GetDimension()}D image; a 3D CT volume is required")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar CT is required")
    if min(img.GetSize()) < 8:
        raise InputError(f"{name}: size {img.GetSize()} is too small (at least 8 voxels per axis)")
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    slab_min, slab_max = arr.min(axis=(1, 2)), arr.max(axis=(1, 2))  # per k slice; reused below
    lo, hi = float(slab_min.min()), float(slab_max.max())
    if hi - lo < 1.0:
        raise InputError(f"{name}: constant image (all voxels {lo:g})")
    if lo < HU_PLAUSIBLE[0] or hi > HU_PLAUSIBLE[1]:
        raise InputError(f"{name}: values [{lo:.4g}, {hi:.4g}] outside the plausible CT range "
                         f"[{HU_PLAUSIBLE[0]:g}, {HU_PLAUSIBLE[1]:g}] HU (damaged file?)")
    if lo > -500 or hi < -200:
        raise InputError(f"{name}: intensity range [{lo:g}, {hi:g}] does not look like CT in HU (air near -1000)")
    zeros = float(np.count_nonzero(arr == 0)) / arr.size
    if zeros > MAX_ZERO_FRACTION:
        raise InputError(f"{name}: {100 * zeros:.0f} % of the voxels are exactly 0 (at most "
                         f"{100 * MAX_ZERO_FRACTION:.0f} % in a CT): truncated or damaged file")
    for axis, label in ((0, "k"), (1, "j"), (2, "i")):
        other = tuple(a for a in range(3) if a != axis)
        smin, smax = (slab_min, slab_max) if axis == 0 else (arr.min(axis=other), arr.max(axis=other))
        const = (smin == smax) & (smin > CONSTANT_SLAB_MAX_HU)
        run = _longest_run(const)
        if run[1] >= 2:
            raise InputError(f"{name}: slices {label} = {run[0]}..{run[0] + run[1] - 1} are constant "
                             f"({float(smin[run[0]]):g}): truncated or damaged file, or padding: crop it off")


def _longest_run(flags: np.ndarray) -> tuple[int, int]:
    best, start, cur = (0, 0), 0, 0
    for i, f in enumerate(flags.tolist()):
        if f:
            if cur == 0:
                start = i
            cur += 1
            if cur > best[1]:
                best = (start, cur)
        else:
            cur = 0
    return best


#: Images of at least this many bytes are written as ``.nii.gz`` by :func:`gzip_pieces_parallel`.
PARALLEL_GZIP_BYTES = 8 << 20


def write_image(img: sitk.Image | np.ndarray, path: str | os.PathLike, compress: bool = True,
                reference: sitk.Image | None = None) -> None:
    """Write with fast compression (zlib level 1, or ISA-L's equivalent): these outputs are large and read rarely.

    ``img`` may also be a (k, j, i) array on ``reference``'s grid (no SimpleITK copy of it is made).
    A large ``.nii.gz`` is written without any copy of the voxels: the NIfTI header is ITK's for
    the same geometry (:func:`nifti_header`), the voxels follow straight from memory, compressed on
    every core into one ordinary gzip member (:func:`gzip_pieces_parallel`)."""
    check_utf8_path(path)
    path = Path(path)
    arr = img if isinstance(img, np.ndarray) else None
    if arr is not None and reference is None:
        raise ValueError("an array needs the reference image whose grid it is on")
    nbytes = arr.nbytes if arr is not None else (
        img.GetNumberOfPixels() * img.GetNumberOfComponentsPerPixel() * img.GetSizeOfPixelComponent())
    geometry = reference if arr is not None else img
    if (compress and path.name.lower().endswith(".nii.gz") and nbytes >= PARALLEL_GZIP_BYTES
            and geometry.GetDimension() == 3 and geometry.GetNumberOfComponentsPerPixel() == 1):
        if arr is None:
            view = sitk.GetArrayViewFromImage(img)  # a view: img stays alive meanwhile
        else:
            view = np.ascontiguousarray(arr)
        if view.ndim == 3 and 2 <= view.shape[0] <= 32767 and max(view.shape) <= 32767:  # NIfTI-1 dims: int16
            data = memoryview(view.reshape(-1)).cast("B")
            step = 4 << 20
            head = nifti_header(view, geometry, folder=path.parent, metadata=None if arr is not None else img)
            gzip_pieces_parallel([head] + [data[o:o + step] for o in range(0, len(data), step)], path)
            return
    if arr is not None:
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(reference)
    sitk.WriteImage(img, str(path), compress, 1 if compress else -1)


def nifti_header(arr: np.ndarray, reference: sitk.Image, folder: str | os.PathLike | None = None,
                 metadata: sitk.Image | None = None) -> bytes:
    """The NIfTI-1 header (with its 4 extension bytes) ITK writes for ``arr`` (k, j, i) on
    ``reference``'s grid: ITK writes a two-slice image of the same pixel type, spacing, origin and
    direction, and ``dim[3]`` is set to the real slice count (the only field that differs, checked
    by the tests byte for byte against ITK's header of the whole image; checked again here).
    ``metadata``: the image whose metadata dictionary ITK would write (e.g. ``ITK_FileNotes`` ->
    ``descrip``; default none, as for an image made from an array). ITK's two-slice file is written in
    ``folder`` (default: the system's temporary folder)."""
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise ValueError("nifti_header needs a 3D array of at least two slices")
    if tuple(reference.GetSize()) != tuple(arr.shape[::-1]):
        raise ValueError(f"array shape {arr.shape} is not the reference's size {reference.GetSize()[::-1]}")
    two = sitk.GetImageFromArray(np.ascontiguousarray(arr[:2]))
    two.SetSpacing(reference.GetSpacing())
    two.SetOrigin(reference.GetOrigin())
    two.SetDirection(reference.GetDirection())
    if metadata is not None:
        for key in metadata.GetMetaDataKeys():
            two.SetMetaData(key, metadata.GetMetaData(key))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".header-") as tmp:
        sitk.WriteImage(two, str(Path(tmp) / "h.nii"), False)
        head = bytearray((Path(tmp) / "h.nii").read_bytes())
    hdr = _parse_nifti_header(bytes(head))
    if hdr is None or _nifti_byteorder(bytes(head)) != "<" or hdr[1][:3] != [arr.shape[2], arr.shape[1], 2]:
        raise RuntimeError("unexpected NIfTI header from ITK")
    head[46:48] = int(arr.shape[0]).to_bytes(2, "little")
    vox_offset, dims, datatype, bitpix = _parse_nifti_header(bytes(head))
    if (dims[:3] != [arr.shape[2], arr.shape[1], arr.shape[0]]
            or np.dtype(_NIFTI_DTYPES.get(datatype, "V1")) != arr.dtype.newbyteorder("=")
            or len(head) != vox_offset + 2 * arr.shape[1] * arr.shape[2] * arr.itemsize):
        raise RuntimeError("could not build the NIfTI header")
    return bytes(head[:vox_offset])


def _fast_level(module) -> int:
    """The fastest level of a zlib-like ``module`` that compresses CT as well as zlib's level 1
    (ISA-L's levels are 0-3: its 2)."""
    return 2 if module.__name__.endswith("isal_zlib") else 1


def fast_deflate():
    """The raw-deflate module :func:`gzip_pieces_parallel` uses and its level (:func:`_fast_level`):
    Intel ISA-L (``isal``, a requirement of the command line; measured on CT: 5.6× less CPU than zlib
    level 1, same ratio) when importable, else zlib. Either writes ordinary deflate."""
    try:
        from isal import isal_zlib as module
    except ImportError:
        module = zlib
    return module, _fast_level(module)


def gzip_pieces_parallel(pieces, dst: str | os.PathLike, level: int | None = None, threads: int | None = None,
                         deflate_module=None) -> None:
    """Write the concatenation of ``pieces`` (bytes-like, in order) to ``dst`` as one gzip member
    (RFC 1952), as ``pigz`` does: pieces deflated independently on ``threads`` threads (ISA-L and zlib
    release the GIL), each ended on a byte boundary by a sync flush, the last one by the final block;
    CRC-32 and length of the whole input in the trailer. Any gzip reader (ITK, zlib, Python) reads
    it as a plain ``.gz``; at most ~2 × threads compressed pieces are held. ``deflate_module`` and
    ``level``: a zlib-like module and its level (default: :func:`fast_deflate`)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    mod = deflate_module or fast_deflate()[0]
    level = _fast_level(mod) if level is None else level
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                             (os.cpu_count() or 1))
    pieces = list(pieces) or [b""]

    def deflate(piece, last: bool) -> bytes:
        z = mod.compressobj(level, mod.DEFLATED, -15)
        return z.compress(piece) + z.flush(mod.Z_FINISH if last else mod.Z_SYNC_FLUSH)

    crc, total = 0, 0
    with open(dst, "wb") as fout, ThreadPoolExecutor(max_workers=threads) as pool:
        fout.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip, deflate, no name, mtime 0, unknown OS
        pending: deque = deque()
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            crc, total = mod.crc32(piece, crc), total + len(piece)
            pending.append(pool.submit(deflate, piece, last))
            while pending and (len(pending) > 2 * threads or last):
                fout.write(pending.popleft().result())
        fout.write(crc.to_bytes(4, "little") + (total % 2**32).to_bytes(4, "little"))


def to_int16_hu(img: sitk.Image) -> sitk.Image:
    """Round a float CT to int16 HU (clamped to [-32768, 32767]): half the size, faster to write."""
    return sitk.Cast(sitk.Round(sitk.Clamp(img, sitk.sitkFloat32, -32768.0, 32767.0)), sitk.sitkInt16)


# --------------------------------------------------------------------------- landmarks
#: A plain decimal number (no ``1_000``, no ``nan``/``inf``, no hex).
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _read_text(path: Path) -> str:
    """File text as UTF-8 (a byte-order mark is dropped); a binary file is refused without echoing it."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise InputError(f"{path.name}: binary file, not a landmark text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None


def _numeric_rows(path: Path, ncols: int = 3) -> np.ndarray:
    """Rows of exactly ``ncols`` plain decimal numbers separated by blanks, commas or semicolons;
    ``#`` lines and blank lines are skipped. Anything else (a 4th column, ``1_000``, ``nan``) is refused."""
    rows = []
    text = _read_text(path).replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = [q for q in re.split(r"[\s,;]+", s) if q]
        if not all(_NUMBER.fullmatch(q) for q in parts):
            raise InputError(f"{path.name}:{lineno}: malformed landmark line {s[:60]!r} (plain numbers only)")
        if len(parts) != ncols:
            raise InputError(f"{path.name}:{lineno}: expected {ncols} numbers, got {len(parts)} in {s[:60]!r}")
        rows.append([float(q) for q in parts])
    if not rows:
        raise InputError(f"{path.name}: no landmarks found")
    return np.asarray(rows, dtype=np.float64)


def index_to_physical(img: sitk.Image, index: np.ndarray) -> np.ndarray:
    """0-based continuous indices (N, 3) in (i, j, k) order -> LPS mm."""
    return image_lattice(img).index_to_lps(index)


def physical_to_index(img: sitk.Image, points: np.ndarray) -> np.ndarray:
    """LPS mm (N, 3) -> 0-based continuous indices (i, j, k)."""
    return image_lattice(img).lps_to_index(points)


def read_dirlab_landmarks(path: str | os.PathLike, reference: sitk.Image) -> np.ndarray:
    """DIR-Lab ``*_xyz.txt``: 1-based voxel indices (x y z) of ``reference`` -> LPS mm."""
    idx = _numeric_rows(Path(path))
    return index_to_physical(reference, idx - 1.0)


def _ras_or_lps(system: str | int | None, name: str) -> str:
    """Slicer coordinate system: RAS (or 0) or LPS (or 1); anything else is refused."""
    s = str(system).strip().upper() if system is not None else "RAS"
    if s in ("RAS", "0"):
        return "RAS"
    if s in ("LPS", "1"):
        return "LPS"
    raise InputError(f"{name}: coordinate system {system!r} is neither RAS nor LPS")


def read_slicer_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Slicer markups ``.mrk.json`` or legacy ``.fcsv`` -> LPS mm.

    Every control point must have three finite coordinates; the coordinate system must be
    RAS or LPS (``.mrk.json`` without one is LPS, ``.fcsv`` without one is RAS, as Slicer writes them).
    """
    path = Path(path)
    if path.name.lower().endswith(".json"):
        try:
            doc = json.loads(_read_text(path))
            markup = doc["markups"][0]
            system = _ras_or_lps(markup.get("coordinateSystem", "LPS"), path.name)
            positions = [cp["position"] for cp in markup.get("controlPoints", [])]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{path.name}: not a Slicer markups file ({type(exc).__name__})") from None
        rows = []
        for n, pos in enumerate(positions, start=1):
            if (not isinstance(pos, list) or len(pos) != 3
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pos)):
                raise InputError(f"{path.name}: control point {n}: position {str(pos)[:60]} is not 3 numbers")
            rows.append(pos)
        pts = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    else:
        system = "RAS"
        rows = []
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.startswith("#"):
                m = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line)
                if m:
                    system = _ras_or_lps(m.group(1), path.name)
                continue
            if not line.strip():
                continue
            parts = [q.strip() for q in line.split(",")]
            if len(parts) < 4 or not all(_NUMBER.fullmatch(q) for q in parts[1:4]):
                raise InputError(f"{path.name}:{lineno}: malformed .fcsv line {line[:60]!r}")
            rows.append([float(q) for q in parts[1:4]])
        pts = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    if pts.size == 0:
        raise InputError(f"{path.name}: no control points")
    bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
    if bad.size:
        raise InputError(f"{path.name}: control point {bad[0] + 1} has a NaN or infinite coordinate "
                         f"({bad.size} such points)")
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


_FORMAT_NAMES = {"slicer": "Slicer markups (RAS/LPS mm)", "dirlab": "DIR-Lab 1-based voxel indices",
                 "lps": "plain text LPS mm"}
#: Landmarks may lie at most this far outside the box of the image they belong to.
LANDMARK_MARGIN_MM = 30.0


def read_landmarks(path: str | os.PathLike, fmt: str = "auto", reference: sitk.Image | None = None) -> np.ndarray:
    """Read landmarks in any supported format and return LPS mm points ``(N, 3)``.

    ``reference`` (the image the landmarks belong to) is needed for DIR-Lab voxel files;
    when given, every point must lie inside its box or within :data:`LANDMARK_MARGIN_MM`
    (3 cm) of it, else the file is refused, naming the format it was read as.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such landmark file")
    if fmt not in LANDMARK_FORMATS:
        raise InputError(f"unknown landmark format {fmt!r}; use one of {', '.join(LANDMARK_FORMATS)}")
    if fmt == "auto":
        fmt = guess_landmark_format(path)
    if fmt == "slicer":
        pts = read_slicer_landmarks(path)
    elif fmt == "dirlab":
        if reference is None:
            raise InputError(f"{path.name}: DIR-Lab landmarks need their image")
        pts = read_dirlab_landmarks(path, reference)
    else:
        pts = _numeric_rows(path)
    if reference is not None:
        check_landmarks_in_image(pts, reference, path.name, fmt)
    return pts


def check_landmarks_in_image(points: np.ndarray, img: sitk.Image, name: str = "landmarks",
                             fmt: str = "lps", margin_mm: float = LANDMARK_MARGIN_MM) -> None:
    """Refuse points further than ``margin_mm`` outside ``img``'s box (a misread file)."""
    idx = physical_to_index(img, points)
    sp, size = np.asarray(img.GetSpacing()), np.asarray(img.GetSize())
    lo, hi = -0.5 - margin_mm / sp, size - 0.5 + margin_mm / sp
    out = np.flatnonzero(((idx < lo) | (idx > hi)).any(axis=1))
    if out.size:
        p = points[out[0]]
        raise InputError(f"{name}: {out.size} of {len(points)} landmarks lie more than {margin_mm:g} mm outside "
                         f"their image (point {out[0] + 1} at LPS ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm); "
                         f"read as {_FORMAT_NAMES.get(fmt, fmt)}: wrong file or give --landmark-format")


def check_landmark_pair(fixed: np.ndarray, moving: np.ndarray) -> None:
    if fixed.shape != moving.shape:
        raise InputError(f"landmark counts differ: {len(fixed)} fixed vs {len(moving)} moving")


def write_lps_landmarks(path: str | os.PathLike, points: np.ndarray) -> None:
    """Plain text, one ``x y z`` line per point in LPS mm."""
    np.savetxt(str(path), np.asarray(points).reshape(-1, 3), fmt="%.6f",
               header="x y z (physical LPS millimetres)")


# --------------------------------------------------------------------------- atomic output
#: Files each kind of DeepLungReg run writes into its output folder. When a run writes any file
#: of a group, the group's files it did not write (left by an earlier run) are removed, so
#: results of two runs never mix (e.g. an old warped.nii.gz beside a --no-warped run).
OUTPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "report.json", "qa.png"),
    ("fixed.nii.gz", "moving.nii.gz", "lung_mask.nii.gz", "ground_truth_displacement.nii.gz",
     "ground_truth_transform.h5", "fixed_landmarks.txt", "moving_landmarks.txt", "simulation.json"),
)
TMP_PREFIX = ".deeplungreg-tmp-"
#: Write failures reported as one line (full disk, quota, read-only or vanished folder, I/O error).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT}


def check_output_dir(final: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] | list = ()) -> Path:
    """Refuse, before any work, an output folder that cannot receive results: an existing
    file, a folder (or the nearest existing parent) that is not writable, or a folder that
    holds one of ``inputs`` (results would overwrite or mix with an input)."""
    final = Path(final)
    check_utf8_path(final)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final}: output exists and is not a folder")
    existing = final
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{existing}: is not a folder; cannot create {final}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: folder is not writable; cannot write {final}")
    out = final.resolve()
    for inp in inputs:
        if inp is None:
            continue
        r = Path(inp).resolve()
        if r == out or out in r.parents:
            raise InputError(f"{inp}: input lies inside the output folder {final}; choose another output folder")
    return final


class _Terminated(SystemExit):
    pass


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(143) (so ``finally`` blocks clean up) when the
    process had the default handler and this is the main thread; otherwise nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder *inside* ``final`` (so it is on the same filesystem
    even when ``final`` is a mount point); on success its files replace those in ``final``,
    and files of the same :data:`OUTPUT_GROUPS` group that this run did not write are
    removed. If moving in fails midway, ``final`` is restored as it was. On failure, Ctrl-C
    or SIGTERM nothing is left behind (a ``final`` this call created is removed again); a
    full disk or similar write failure inside the block becomes a one-line :class:`InputError`."""
    final = check_output_dir(final)
    created = not final.exists()
    try:
        final.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=final))
    except OSError as exc:
        raise InputError(f"{final}: cannot create the output folder ({exc.strerror or exc})") from None
    ok = False
    try:
        with _sigterm_as_exit():
            try:
                yield tmp
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS:
                    raise
                raise InputError(f"{final}: cannot write the results ({exc.strerror}); nothing was written") from None
            _move_in(tmp, final)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not ok:
            try:
                final.rmdir()
            except OSError:
                pass


def _move_in(tmp: Path, final: Path) -> None:
    new = [item for item in tmp.iterdir() if item.name != ".previous"]
    names = {item.name for item in new}
    stale = {n for group in OUTPUT_GROUPS if names & set(group) for n in group} - names
    backup = tmp / ".previous"
    backup.mkdir()
    saved, moved = [], []
    try:
        for n in sorted(names | stale):
            if (final / n).exists() or (final / n).is_symlink():
                os.replace(final / n, backup / n)
                saved.append(n)
        for item in new:
            os.replace(item, final / item.name)
            moved.append(item.name)
    except OSError as exc:
        for n in moved:  # roll back: the folder must hold one run's results, never a mix
            try:
                os.replace(final / n, tmp / n)
            except OSError:
                pass
        for n in saved:
            try:
                os.replace(backup / n, final / n)
            except OSError:
                pass
        raise InputError(f"{final}: cannot move the results in ({exc.strerror or exc}); folder left as it was") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` all or nothing (temporary file beside it, then rename), with the permissions
    an ordinary file gets under the current umask (mkstemp alone would make it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
