"""Shared fixtures: tiny models, small real CT crops and synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from DeepLungRegLib.modelfile import save_model
from DeepLungRegLib.networks import UNet3D, UNetConfig
from DeepLungRegLib.preprocessing import NORMALISATION, resample_isotropic

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CT = ROOT / "Resources" / "SampleData" / "chest_ct_cptac_C3N-00247_2mm.nii.gz"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_ct() -> sitk.Image:
    """The bundled real chest CT (2 mm in-plane)."""
    return sitk.Cast(sitk.ReadImage(str(SAMPLE_CT)), sitk.sitkFloat32)


@pytest.fixture(scope="session")
def small_ct(sample_ct) -> sitk.Image:
    """The bundled CT reduced to 4 mm: a fast real input for end-to-end tests."""
    return resample_isotropic(sample_ct, 4.0)


@pytest.fixture(scope="session")
def small_ct_file(small_ct, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ct") / "small_ct.nii.gz"
    sitk.WriteImage(small_ct, str(p))
    return p


@pytest.fixture(scope="session")
def two_scan_files(small_ct, tmp_path_factory) -> list[Path]:
    """``a.nii.gz`` (the small CT) and ``b.nii.gz`` (it mirrored left-right): two training scans."""
    d = tmp_path_factory.mktemp("two_scans")
    sitk.WriteImage(small_ct, str(d / "a.nii.gz"))
    sitk.WriteImage(sitk.Flip(small_ct, [True, False, False]), str(d / "b.nii.gz"))
    return [d / "a.nii.gz", d / "b.nii.gz"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An explicitly untrained 32³ model (random weights, fixed seed)."""
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(width=4, depth=3))
    folder = tmp_path_factory.mktemp("model")
    save_model(folder, net, {"method": "eppenhof2018", "grid_size": 32, "normalisation": NORMALISATION,
                             "untrained": True})
    return folder


def make_image(arr_kji: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(arr_kji, dtype=np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


@pytest.fixture(autouse=True)
def _restore_process_locale():
    """Tests that write DICOM files through SimpleITK/GDCM switch the whole process to the C locale,
    after which text files read without an explicit encoding are ASCII-only; keep later tests unaffected.
    (Reading DICOM, as the library does, leaves the locale alone.)"""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture()
def scene():
    """A fresh MRML scene of the slicer-core wheel, installed as ``slicer.mrmlScene``."""
    slicer = pytest.importorskip("slicer")
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    return s


def drain(watcher, timeout_s: float = 30.0) -> tuple[list, int | None]:
    """Poll a ``ProcessWatcher`` until its process ends: (progress lines seen, exit code)."""
    import time

    seen, rc = [], None
    deadline = time.time() + timeout_s
    while rc is None and time.time() < deadline:
        progress, _, rc = watcher.poll()
        seen += progress
        time.sleep(0.05)
    return seen, rc
