"""Volume and landmark readers: DIR-Lab raw files, Slicer markups, plain LPS text."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from DeepLungRegLib import io
from DeepLungRegLib.errors import InputError


def _write_dirlab(tmp_path, name, arr_kji):
    path = tmp_path / name
    arr_kji.astype("<i2").tofile(path)
    return path


def test_dirlab_img_and_landmarks_reproduce_hand_made_files(tmp_path):
    size, spacing = (6, 5, 4), (1.1, 1.1, 2.5)
    arr = np.arange(np.prod(size), dtype=np.int16).reshape(size[2], size[1], size[0]) - 1000
    img_path = _write_dirlab(tmp_path, "case1_T00_s.img", arr)
    img = io.read_dirlab_img(img_path, size=size, spacing=spacing)
    assert img.GetSize() == size and np.allclose(img.GetSpacing(), spacing)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr.astype(np.float32))
    lm = tmp_path / "Case1_300_T00_xyz.txt"
    lm.write_bytes(b"1\t1\t1\r\n6 5 4\r\n3\t2  2\r\n")
    pts = io.read_landmarks(lm, "auto", img)
    expected = np.array([[0, 0, 0], [5 * 1.1, 4 * 1.1, 3 * 2.5], [2 * 1.1, 1 * 1.1, 1 * 2.5]])
    np.testing.assert_allclose(pts, expected)


def test_dirlab_geometry_lookup_and_hu_offset(tmp_path):
    size, spacing = io.DIRLAB_4DCT[1]
    assert io.dirlab_geometry("case1_T50_s.img") == (size, spacing)
    assert io.dirlab_geometry("copd3_eBHCT.img") == io.DIRLAB_COPD[3]
    arr = np.full((size[2], size[1], size[0]), 24, dtype=np.int16)  # HU + 1024 storage
    arr[0, 0, 0] = 0
    arr[:, 100:150, 100:150] = 1064  # soft tissue, 40 HU
    p = _write_dirlab(tmp_path, "case1_T00_s.img", arr)
    img = io.read_volume(p)
    a = sitk.GetArrayViewFromImage(img)
    assert a[0, 0, 0] == -1024 and a[1, 1, 1] == -1000
    assert np.allclose(img.GetSpacing(), spacing)


def test_dirlab_wrong_size_is_refused(tmp_path):
    p = _write_dirlab(tmp_path, "case2_T00_s.img", np.zeros((3, 3, 3)))
    with pytest.raises(InputError, match="bytes"):
        io.read_volume(p)


def test_slicer_json_and_fcsv_are_converted_from_ras(tmp_path):
    doc = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                        "controlPoints": [{"position": [10.0, 20.0, 30.0]}, {"position": [-1.0, 2.0, -3.0]}]}]}
    pj = tmp_path / "f.mrk.json"
    pj.write_text(json.dumps(doc))
    np.testing.assert_allclose(io.read_landmarks(pj), [[-10, -20, 30], [1, -2, -3]])
    doc["markups"][0]["coordinateSystem"] = "LPS"
    pj.write_text(json.dumps(doc))
    np.testing.assert_allclose(io.read_landmarks(pj), [[10, 20, 30], [-1, 2, -3]])
    pf = tmp_path / "f.fcsv"
    pf.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
                  "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                  "vtkMRMLMarkupsFiducialNode_0,1.5,-2.5,3.5,0,0,0,1,1,1,0,F-1,,\n")
    np.testing.assert_allclose(io.read_landmarks(pf), [[-1.5, 2.5, 3.5]])


def test_plain_lps_text_and_malformed_line(tmp_path):
    p = tmp_path / "points.txt"
    p.write_text("# x y z\n1 2 3\n4,5,6\n")
    np.testing.assert_allclose(io.read_landmarks(p), [[1, 2, 3], [4, 5, 6]])
    p.write_text("1 2 3\n4 five 6\n")
    with pytest.raises(InputError, match=":2: malformed"):
        io.read_landmarks(p)


def test_volume_checks(tmp_path):
    img2d = sitk.Image([16, 16], sitk.sitkInt16)
    p = tmp_path / "a.nrrd"
    sitk.WriteImage(img2d, str(p))
    with pytest.raises(InputError, match="2D image"):
        io.read_volume(p)
    nan = sitk.GetImageFromArray(np.full((10, 10, 10), np.nan, np.float32))
    sitk.WriteImage(nan, str(p))
    with pytest.raises(InputError, match="NaN"):
        io.read_volume(p)
    flat = sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32))
    sitk.WriteImage(flat, str(p))
    with pytest.raises(InputError, match="constant"):
        io.read_volume(p)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_directory(out) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
