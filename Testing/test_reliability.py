"""Issue 13: damaged or ambiguous input is refused with one line, output folders never mix or litter.

Each test builds the bad input it needs (small synthetic volumes, DICOM series written with
SimpleITK, landmark files, model files) so nothing here depends on downloaded data.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib import io
from DeepLungRegLib.errors import InputError


def ct_array(shape=(24, 40, 40)) -> np.ndarray:
    """Air around a soft-tissue box with a low-density 'lung' in it (kji, int16 HU)."""
    arr = np.full(shape, -1000, np.int16)
    arr[:, 4:-4, 4:-4] = 40
    arr[4:-4, 10:-10, 10:-10] = -850
    arr[::3, 12, 12] = 200  # some texture, so no two slices are alike
    arr += (np.arange(shape[0]) % 5).astype(np.int16)[:, None, None]
    return arr


def ct_image(arr=None, spacing=(2.0, 2.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(ct_array() if arr is None else arr)
    img.SetSpacing(spacing)
    return img


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- 1. damaged images
def test_intact_nifti_reads(tmp_path):
    for name in ("ok.nii.gz", "ok.nii"):
        sitk.WriteImage(ct_image(), str(tmp_path / name))
        img = io.read_volume(tmp_path / name)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), ct_array())


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti_is_refused(tmp_path, name):
    """ITK reads a truncated NIfTI without complaint, the missing voxels as 0."""
    full = tmp_path / ("full" + name[3:])
    sitk.WriteImage(ct_image(), str(full))
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated|incomplete") as exc:
        io.read_volume(tmp_path / name)
    one_line(exc)


def test_bit_flipped_gzip_is_refused(tmp_path):
    full = tmp_path / "ok.nii.gz"
    sitk.WriteImage(ct_image(), str(full), True)
    data = bytearray(full.read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "flip.nii.gz").write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged|truncated|cannot read") as exc:
        io.read_volume(tmp_path / "flip.nii.gz")
    one_line(exc)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_nan_voxels_are_refused_even_where_itk_zeroes_them(tmp_path, ext):
    arr = ct_array().astype(np.float32)
    arr[5, 20, 20] = np.nan
    arr[6, 20, 20] = np.inf
    sitk.WriteImage(ct_image(arr), str(tmp_path / f"nan{ext}"))
    with pytest.raises(InputError, match="NaN or infinite") as exc:
        io.read_volume(tmp_path / f"nan{ext}")
    one_line(exc)


def test_values_outside_the_ct_range_are_refused(tmp_path):
    arr = ct_array().astype(np.float32)
    arr[3, 3, 3], arr[4, 4, 4] = 1.7e38, -1.7e38  # bit flips in a float file
    with pytest.raises(InputError, match="plausible CT range"):
        io.check_ct_volume(ct_image(arr))


def test_zero_filled_slab_and_mostly_zero_volumes_are_refused():
    arr = ct_array()
    arr[-3:] = 0  # the end of the file read as zeros
    with pytest.raises(InputError, match="constant") as exc:
        io.check_ct_volume(ct_image(arr), "cut")
    assert "k = 21..23" in one_line(exc)
    arr = ct_array()
    arr[:, 16:36, 4:36] = 0  # 40 % of the voxels
    with pytest.raises(InputError, match="exactly 0"):
        io.check_ct_volume(ct_image(arr))
    arr = ct_array()
    arr[:3] = -1000  # slabs of air or padding are fine
    io.check_ct_volume(ct_image(arr))


def test_header_only_nifti_says_no_voxel_data(tmp_path):
    sitk.WriteImage(ct_image(), str(tmp_path / "full.nii"))
    (tmp_path / "hdr.nii").write_bytes((tmp_path / "full.nii").read_bytes()[:352])
    with pytest.raises(InputError, match="no voxel data"):
        io.read_volume(tmp_path / "hdr.nii")


# --------------------------------------------------------------------------- 2. DICOM series
def write_dicom_series(folder: Path, arr: np.ndarray, uid: str, description: str, spacing=(0.8, 0.8, 2.5),
                       skip: tuple[int, ...] = (), prefix: str = "") -> list[Path]:
    """One file per slice with the tags ITK/GDCM need to sort and place them."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(arr.shape[0]):
        if k in skip:
            continue
        sl = sitk.GetImageFromArray(arr[k:k + 1].astype(np.int16))
        sl.SetSpacing(spacing)
        z = -100.0 + k * spacing[2]
        tags = {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0010|0010": "Test^Patient",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid, "0008|103e": description,
                "0020|0013": str(k + 1), "0020|0032": f"-150\\-150\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
                "0008|0018": f"{uid}.{k + 1}", "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files


UID_A, UID_B = "1.2.826.0.1.3680043.2.1125.11", "1.2.826.0.1.3680043.2.1125.22"


def test_dicom_folder_with_one_series_reads(tmp_path):
    write_dicom_series(tmp_path / "one", ct_array(), UID_A, "inhale")
    img = io.read_volume(tmp_path / "one")
    assert img.GetSize() == (40, 40, 24)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-6)


def test_dicom_folder_with_two_series_is_refused_and_a_file_picks_one(tmp_path):
    inhale, exhale = ct_array(), ct_array()
    exhale[4:-4, 10:-10, 10:-10] = -700
    write_dicom_series(tmp_path / "pair", inhale, UID_A, "inhale", prefix="a")
    files_b = write_dicom_series(tmp_path / "pair", exhale, UID_B, "exhale", prefix="b")
    with pytest.raises(InputError, match="2 DICOM series") as exc:
        io.read_volume(tmp_path / "pair")
    msg = one_line(exc)
    assert UID_A in msg and UID_B in msg and "'inhale'" in msg and "'exhale'" in msg and "24 files" in msg
    img = io.read_volume(files_b[5])  # one file of the series picks it
    assert img.GetSize() == (40, 40, 24)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), exhale)


def test_dicom_series_uid_picks_one_series_of_a_folder(tmp_path):
    inhale, exhale = ct_array(), ct_array()
    exhale[4:-4, 10:-10, 10:-10] = -700
    write_dicom_series(tmp_path / "pair", inhale, UID_A, "inhale", prefix="a")
    write_dicom_series(tmp_path / "pair", exhale, UID_B, "exhale", prefix="b")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_volume(tmp_path / "pair", series=UID_A)), inhale)
    with pytest.raises(InputError, match="no DICOM series 1.2.3"):
        io.read_volume(tmp_path / "pair", series="1.2.3")


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_truncated_mha_and_nrrd_are_refused(tmp_path, ext):
    sitk.WriteImage(ct_image(), str(tmp_path / f"full{ext}"))
    data = (tmp_path / f"full{ext}").read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="cannot read as an image") as exc:
        io.read_volume(tmp_path / f"cut{ext}")
    msg = one_line(exc)
    assert "0x" not in msg and ".cxx" not in msg


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, capfd):
    write_dicom_series(tmp_path / "gap", ct_array(), UID_A, "inhale", skip=(10,))
    capfd.readouterr()
    with pytest.raises(InputError, match="not evenly spaced") as exc:
        io.read_volume(tmp_path / "gap")
    assert "5 mm" in one_line(exc)
    assert capfd.readouterr().err == ""  # no ITK warning beside the one-line error


# --------------------------------------------------------------------------- 5. landmarks
def markups(tmp_path, positions, system="RAS", name="f.mrk.json"):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": system,
                        "controlPoints": [{"position": p} for p in positions]}]}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_markups_with_unknown_coordinate_system_are_refused(tmp_path):
    with pytest.raises(InputError, match="neither RAS nor LPS"):
        io.read_landmarks(markups(tmp_path, [[1, 2, 3]], system="IJK"))


def test_markups_with_two_element_positions_are_refused(tmp_path):
    with pytest.raises(InputError, match="not 3 numbers"):
        io.read_landmarks(markups(tmp_path, [[1, 2], [3, 4], [5, 6]]))


def test_nan_in_markups_and_fcsv_is_refused(tmp_path):
    with pytest.raises(InputError, match="NaN"):
        io.read_landmarks(markups(tmp_path, [[1, 2, 3], [float("nan"), 2, 3]]))
    fcsv = tmp_path / "f.fcsv"
    fcsv.write_text("# CoordinateSystem = RAS\nid,x,y,z\n1,1,2,3\n2,nan,2,3\n".replace("id,x,y,z\n", ""))
    with pytest.raises(InputError, match="malformed|NaN"):
        io.read_landmarks(fcsv)


@pytest.mark.parametrize("line", ["1 2 3 4", "1_000 2 3", "nan 2 3", "1 2"])
def test_plain_text_rows_must_be_three_plain_numbers(tmp_path, line):
    path = tmp_path / "points.txt"
    path.write_text(f"0 0 0\n{line}\n")
    with pytest.raises(InputError, match=r"points.txt:2:") as exc:
        io.read_landmarks(path, "lps")
    one_line(exc)


def test_utf8_bom_landmark_file_just_works(tmp_path):
    path = tmp_path / "points.txt"
    path.write_bytes(b"\xef\xbb\xbf1 2 3\n4 5 6\n")
    np.testing.assert_allclose(io.read_landmarks(path, "lps"), [[1, 2, 3], [4, 5, 6]])


def test_landmarks_far_outside_their_image_are_refused_naming_the_format(tmp_path):
    img = ct_image()  # origin 0, box 80 x 80 x 72 mm
    inside = tmp_path / "inside.txt"
    inside.write_text("10 10 10\n-20 30 70\n")
    io.read_landmarks(inside, "auto", img)  # within 3 cm of the box: accepted
    far = tmp_path / "far.txt"
    far.write_text("10 10 10\n500 30 30\n")
    with pytest.raises(InputError, match="outside") as exc:
        io.read_landmarks(far, "auto", img)
    assert "plain text LPS" in one_line(exc)
    # an LPS file whose name contains 'xyz' is read as DIR-Lab voxels: caught and named
    lps = tmp_path / "case_xyz_lps.txt"
    lps.write_text("-150.5 -120.0 -300.0\n")
    with pytest.raises(InputError, match="DIR-Lab"):
        io.read_landmarks(lps, "auto", img)


# --------------------------------------------------------------------------- 8/9. output folder
def registration_files(folder: Path, names=("transform.h5", "jacobian.nii.gz", "report.json")) -> None:
    for n in names:
        (folder / n).write_text(n)


def test_stale_outputs_of_an_earlier_run_are_removed(tmp_path):
    out = tmp_path / "out"
    with io.atomic_directory(out) as tmp:
        registration_files(tmp, ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "report.json", "qa.png"))
    (out / "notes.txt").write_text("mine")
    with io.atomic_directory(out) as tmp:  # --no-warped --no-qa
        registration_files(tmp)
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "notes.txt", "report.json", "transform.h5"]


def test_failed_run_leaves_the_old_results_and_no_temporary_folder(tmp_path):
    out = tmp_path / "out"
    with io.atomic_directory(out) as tmp:
        registration_files(tmp)
    with pytest.raises(RuntimeError), io.atomic_directory(out) as tmp:
        registration_files(tmp, ("transform.h5",))
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "report.json", "transform.h5"]
    with pytest.raises(RuntimeError), io.atomic_directory(tmp_path / "new") as tmp:
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_move_failing_midway_restores_the_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with io.atomic_directory(out) as tmp:
        registration_files(tmp, ("transform.h5", "warped.nii.gz", "report.json"))
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out / "report.json" and Path(src).parent.name.startswith(io.TMP_PREFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(InputError, match="left as it was"), io.atomic_directory(out) as tmp:
        for n in ("transform.h5", "jacobian.nii.gz", "report.json"):
            (tmp / n).write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "transform.h5", "warped.nii.gz"]
    assert all((out / n).read_text() == n for n in ("report.json", "transform.h5", "warped.nii.gz"))


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"No space left on device\); nothing was written") as exc:
        with io.atomic_directory(out) as tmp:
            (tmp / "transform.h5").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_temporary_folder_is_on_the_output_filesystem(tmp_path, monkeypatch):
    """OUTDIR a mount point: a rename from its parent into it fails with EXDEV."""
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.replace

    def cross_device(src, dst):
        if out not in Path(src).parents and Path(dst).parent == out:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", cross_device)
    with io.atomic_directory(out) as tmp:
        registration_files(tmp)
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "report.json", "transform.h5"]


def test_output_that_is_a_file_or_unwritable_or_holds_an_input_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder") as exc:
        with io.atomic_directory(f):
            pass
    one_line(exc)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fixed.nii.gz").write_text("x")
    with pytest.raises(InputError, match="inside the output folder"):
        io.check_output_dir(out, [tmp_path / "other.nii.gz", out / "fixed.nii.gz"])
    io.check_output_dir(tmp_path / "new" / "deeper", [out / "fixed.nii.gz"])
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match="not writable"):
                io.check_output_dir(ro)
            with pytest.raises(InputError, match="not writable"):
                io.check_output_dir(ro / "sub")
        finally:
            ro.chmod(0o700)


def test_sigterm_while_writing_leaves_no_temporary_folder(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from DeepLungRegLib import io\n"
        "with io.atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'transform.h5').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    import time; time.sleep(5)\n"
    )
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(io.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, timeout=60)
    assert r.returncode in (143, -signal.SIGTERM)
    assert r.returncode == 143, "SIGTERM killed the process without cleaning up"
    leftovers = list(tmp_path.rglob("*"))
    assert leftovers == [], leftovers


# --------------------------------------------------------------------------- 4/10. model files
def tiny_net_and_meta():
    import torch
    from DeepLungRegLib.networks import UNet3D, UNetConfig
    from DeepLungRegLib.preprocessing import NORMALISATION

    torch.manual_seed(0)
    net = UNet3D(UNetConfig(width=2, depth=2))
    return net, {"method": "eppenhof2018", "grid_size": 16, "normalisation": dict(NORMALISATION)}


def test_valid_tiny_model_loads(tmp_path):
    from DeepLungRegLib.modelfile import load_model, save_model

    net, meta = tiny_net_and_meta()
    loaded, meta2 = load_model(save_model(tmp_path / "m", net, meta))
    assert meta2["grid_size"] == 16


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_model_with_non_finite_weights_is_refused(tmp_path, value):
    import torch
    from DeepLungRegLib.modelfile import load_model, save_model

    net, meta = tiny_net_and_meta()
    with torch.no_grad():
        next(net.parameters()).view(-1)[3] = value
    path = save_model(tmp_path / "m", net, meta)
    with pytest.raises(InputError, match="NaN or infinite") as exc:
        load_model(path)
    one_line(exc)


@pytest.mark.parametrize("change, match", [
    ({"normalisation": {"kind": "hu_window", "hu_min": 100.0, "hu_max": 100.0}}, "degenerate normalisation"),
    ({"normalisation": {"kind": "hu_window", "hu_min": float("nan"), "hu_max": 200.0}}, "not finite"),
    ({"normalisation": {"kind": "zscore", "mean": 0, "std": 1}}, "unknown normalisation"),
    ({"grid_size": "abc"}, "grid_size"),
    ({"grid_size": 0}, "grid_size"),
    ({"grid_size": -64}, "grid_size"),
    ({"grid_size": 4096}, "grid_size"),
    ({"grid_size": 17}, "multiple of 2"),
    ({"network": {"width": 100000, "depth": 2}}, "width"),
    ({"network": {"width": 2, "depth": 0}}, "depth"),
    ({"network": "unet"}, "network"),
    ({"format_version": 99}, "format_version"),
    ({"method": 7}, "method"),
])
def test_model_metadata_is_validated_on_load(tmp_path, change, match):
    from DeepLungRegLib.modelfile import load_model, read_metadata, save_model
    from safetensors.torch import save_file

    net, meta = tiny_net_and_meta()
    path = save_model(tmp_path / "m", net, meta)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        doc = json.loads(fh.metadata()["deeplungreg"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    doc.update(change)
    save_file(tensors, str(path), metadata={"deeplungreg": json.dumps(doc)})
    for reader in (read_metadata, load_model):
        with pytest.raises(InputError, match=match) as exc:
            reader(path)
        one_line(exc)


def test_model_metadata_missing_keys_are_named(tmp_path):
    from DeepLungRegLib.modelfile import load_model
    from safetensors.torch import save_file

    net, _ = tiny_net_and_meta()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"deeplungreg": json.dumps({"method": "eppenhof2018"})})
    with pytest.raises(InputError, match="lacks format_version, grid_size"):
        load_model(path)


# --------------------------------------------------------------------------- 3. images without lungs
def torso(lungs: bool = True, gas: bool = False, channel: bool = False, shape=(40, 64, 64)) -> sitk.Image:
    """Air around a soft-tissue cylinder (3 mm voxels), optionally with two lungs, bowel gas
    pockets, or thin channels joining each lung to the air around the body."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    arr = np.full(shape, -1000.0, np.float32)
    arr[((i - 32) / 28.0) ** 2 + ((j - 32) / 22.0) ** 2 < 1] = 40.0
    arr += 5.0 * np.sin(i + 2 * j + 3 * k)
    if lungs:
        for ci in (20, 44):
            arr[((i - ci) / 8.0) ** 2 + ((j - 32) / 12.0) ** 2 + ((k - 20) / 15.0) ** 2 < 1] = -850.0
    if gas:
        for ci, cj, ck in ((22, 30, 10), (40, 36, 25), (30, 20, 30)):
            arr[((i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) < 9] = -1000.0
    if channel:
        arr[18:22, 31:34, 1:20] = -850.0  # from each lung to the air through the body wall
        arr[18:22, 31:34, 44:63] = -850.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    return img


LUNG_ML = 2 * (4 / 3) * np.pi * (8 * 3) * (12 * 3) * (15 * 3) / 1000


def test_lungs_are_found_in_a_torso():
    from DeepLungRegLib.preprocessing import lung_mask

    res = lung_mask(torso())
    assert abs(res.volume_ml - LUNG_ML) / LUNG_ML < 0.25 and not res.fallback


@pytest.mark.parametrize("case", ["abdomen", "air", "tiny cube"])
def test_images_without_lungs_are_refused_saying_what_was_found(case):
    from DeepLungRegLib.preprocessing import lung_mask

    if case == "abdomen":
        img = torso(lungs=False, gas=True)
    elif case == "air":
        img = torso(lungs=False)
        img = sitk.Image(img) * 0 - 1000 + sitk.Cast(sitk.AdditiveGaussianNoise(img * 0, 10.0, 0.0, 1), sitk.sitkFloat32)
    else:
        img = sitk.GetImageFromArray(np.full((10, 10, 10), -850.0, np.float32))
        img.SetSpacing((2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="no plausible lung") as exc:
        lung_mask(img)
    assert " ml " in one_line(exc)


def test_lungs_joined_to_the_outside_air_are_kept_without_the_outside_air():
    from DeepLungRegLib.preprocessing import lung_mask

    res = lung_mask(torso(channel=True))
    assert res.fallback
    assert abs(res.volume_ml - LUNG_ML) / LUNG_ML < 0.25, res.volume_ml
    corner = sitk.GetArrayViewFromImage(res.mask)[:, 0, 0]
    assert corner.sum() == 0


def test_a_crop_through_both_lungs_is_accepted():
    from DeepLungRegLib.preprocessing import lung_mask

    img = torso()[14:50, 14:50, 6:34]  # mediastinum crop: each lung cut by a side of the field
    res = lung_mask(img)
    assert res.fallback and res.volume_ml > 0.3 * LUNG_ML


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("name, lo, hi", [
    ("totalsegmentator_example_ct_3mm.nii.gz", 300, 800),            # abdomen crop with the lung bases
    ("totalsegmentator_aorta_ct_cropped_1p5mm.nii.gz", 1500, 4000),  # mediastinum crop, parts of both lungs
    ("elastix_3DCT_lung_baseline_small.mha", 2500, 3800),            # the 905 ml of air beside it is not lung
])
def test_real_partial_lung_crops_keep_their_lungs(name, lo, hi):
    from DeepLungRegLib.preprocessing import lung_mask

    if not (SHARED / name).is_file():
        pytest.skip(f"shared scan {name} not present")
    res = lung_mask(sitk.Cast(sitk.ReadImage(str(SHARED / name)), sitk.sitkFloat32))
    assert lo < res.volume_ml < hi, res.volume_ml


# --------------------------------------------------------------------------- end to end through the CLI
@pytest.fixture(scope="module")
def good_ct(tmp_path_factory):
    from conftest import SAMPLE_CT
    from DeepLungRegLib.preprocessing import resample_isotropic

    d = tmp_path_factory.mktemp("good")
    img = resample_isotropic(sitk.ReadImage(str(SAMPLE_CT)), 6.0)
    sitk.WriteImage(img, str(d / "ct.nii.gz"))
    return d / "ct.nii.gz"


def _cli_case(case: str, tmp_path: Path, good: Path, tiny_model: Path) -> tuple[list, str]:
    if case == "truncated":
        data = good.read_bytes()
        bad = tmp_path / "cut.nii.gz"
        bad.write_bytes(data[: len(data) // 2])
        return [bad, good], "truncated"
    if case == "nan-nifti":
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(good))).astype(np.float32)
        arr[arr.shape[0] // 2] = np.nan
        bad = tmp_path / "nan.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(bad))
        return [good, bad], "NaN"
    if case == "two-series":
        write_dicom_series(tmp_path / "dcm", ct_array(), UID_A, "inhale", prefix="a")
        write_dicom_series(tmp_path / "dcm", ct_array(), UID_B, "exhale", prefix="b")
        return [tmp_path / "dcm", good], "2 DICOM series"
    if case == "no-lung":
        bad = tmp_path / "abdomen.nii.gz"
        sitk.WriteImage(torso(lungs=False, gas=True), str(bad))
        return [good, bad], "no plausible lung"
    if case == "far-landmarks":
        lm = tmp_path / "lm.txt"
        lm.write_text("0 0 0\n900 900 900\n")
        return [good, good, "--fixed-landmarks", lm, "--moving-landmarks", lm], "outside their image"
    if case == "nan-model":
        import torch
        from DeepLungRegLib.modelfile import load_model, save_model

        net, meta = load_model(tiny_model)
        with torch.no_grad():
            next(net.parameters()).view(-1)[0] = float("nan")
        return [good, good, "--model", save_model(tmp_path / "nanmodel", net, meta)], "NaN or infinite"
    if case == "outdir-is-file":
        return [good, good], "not a folder"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "nan-nifti", "two-series", "no-lung", "far-landmarks", "nan-model",
                                  "outdir-is-file"])
def test_cli_refuses_damaged_input_with_one_line(case, good_ct, tiny_model, tmp_path, capsys):
    from DeepLungRegLib.cli import main

    args, message = _cli_case(case, tmp_path, good_ct, tiny_model)
    out = tmp_path / "out"
    if case == "outdir-is-file":
        out.write_text("not a folder")
    argv = ["register", *args, "-o", out, "--quiet", "--refine", "off", "--no-qa"]
    if "--model" not in argv:
        argv += ["--model", tiny_model]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("deeplungreg: error:") and message in lines[0], err
    assert out.is_file() if case == "outdir-is-file" else not out.exists()


def test_binary_landmark_file_is_not_echoed(tmp_path):
    path = tmp_path / "lm.txt"
    path.write_bytes(b"\x00\x01\x02\xffELF" * 50)
    with pytest.raises(InputError, match="binary file") as exc:
        io.read_landmarks(path, "lps")
    assert "ELF" not in one_line(exc)


def test_non_utf8_paths_are_refused_instead_of_aborting(tmp_path):
    """SimpleITK aborts the process (exit 134) on a path with undecodable bytes."""
    name = os.fsdecode(bytes(tmp_path) + b"/ct\xff.nii.gz")
    sitk.WriteImage(ct_image(), str(tmp_path / "ok.nii.gz"))
    Path(name).write_bytes((tmp_path / "ok.nii.gz").read_bytes())
    code = ("import sys, os\nfrom DeepLungRegLib import io\nfrom DeepLungRegLib.errors import InputError\n"
            "p = os.fsdecode(sys.argv[1].encode() + b'/ct\\xff.nii.gz')\n"
            "for f in (io.read_volume, io.check_output_dir):\n"
            "    try:\n        f(p)\n    except InputError as e:\n        print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(io.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-300:]
    assert r.stdout.count("not valid UTF-8") == 2, r.stdout


def test_real_abdomen_below_the_lungs_is_refused():
    from DeepLungRegLib.preprocessing import lung_mask

    name = "totalsegmentator_example_ct_3mm.nii.gz"
    if not (SHARED / name).is_file():
        pytest.skip(f"shared scan {name} not present")
    img = sitk.Cast(sitk.ReadImage(str(SHARED / name)), sitk.sitkFloat32)[:, :, :40]  # lungs start at slice 51
    with pytest.raises(InputError, match="no plausible lung") as exc:
        lung_mask(img)
    assert "air around the body" in one_line(exc)
