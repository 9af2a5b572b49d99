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


# --------------------------------------------------------------------------- fast gzip paths (issue 14)
def _ct_like(size=(40, 36, 30), seed=0) -> sitk.Image:
    """A small int16 CT-like volume: air around, tissue, a low-density 'lung' block, noise."""
    rng = np.random.default_rng(seed)
    arr = np.full(size[::-1], -1000, np.int16)
    arr[3:-3, 4:-4, 4:-4] = 40
    arr[8:-8, 10:-10, 8:-8] = -850
    arr += rng.integers(-20, 20, arr.shape).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, -30.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    return img


def test_parallel_gzip_is_one_member_that_every_reader_reads_back(tmp_path, monkeypatch):
    import gzip
    import zlib

    img = _ct_like()
    monkeypatch.setattr(io, "PARALLEL_GZIP_BYTES", 1)  # force the parallel writer on a small image
    out = tmp_path / "w.nii.gz"
    io.write_image(img, out)
    assert not list(tmp_path.glob("*.part.nii")), "the uncompressed file must be removed"
    raw = tmp_path / "r.nii"
    sitk.WriteImage(img, str(raw), False)
    data = out.read_bytes()
    # one member: a raw inflate of the whole deflate stream ends exactly before the 8-byte trailer
    d = zlib.decompressobj(-15)
    plain = d.decompress(data[10:])
    assert d.eof and len(d.unused_data) == 8
    assert plain == raw.read_bytes() == gzip.decompress(data)
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    assert back.GetDirection() == img.GetDirection() and np.allclose(back.GetOrigin(), img.GetOrigin())
    # small pieces: many sync-flushed pieces still make one valid stream; no pieces too
    whole = raw.read_bytes()
    io.gzip_pieces_parallel([whole[o:o + 1000] for o in range(0, len(whole), 1000)], tmp_path / "s.gz", threads=3)
    assert gzip.decompress((tmp_path / "s.gz").read_bytes()) == whole
    # both deflate back-ends (ISA-L when installed, zlib otherwise) write the same content
    for module in {io.fast_deflate()[0], zlib}:
        io.gzip_pieces_parallel([whole[:7777], whole[7777:]], tmp_path / "m.gz", deflate_module=module)
        assert gzip.decompress((tmp_path / "m.gz").read_bytes()) == whole, module.__name__
    io.gzip_pieces_parallel([], tmp_path / "e.gz")
    assert gzip.decompress((tmp_path / "e.gz").read_bytes()) == b""
    # an array on the image's grid is written without a SimpleITK copy, to the same file content
    arr = sitk.GetArrayFromImage(img)
    io.write_image(arr, tmp_path / "a.nii.gz", reference=img)
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes()) == whole


@pytest.mark.parametrize("dtype,slices", [(np.int16, 30), (np.float32, 7), (np.int16, 300)])
def test_nifti_header_equals_itks_header_of_the_whole_image(tmp_path, dtype, slices):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(slices, 6, 5)) * 100).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, -30.0))
    img.SetDirection(sitk.VersorRigid3DTransform((0.1, 0.2, 0.3, 0.9)).GetMatrix())  # oblique
    sitk.WriteImage(img, str(tmp_path / "full.nii"), False)
    head = io.nifti_header(arr, img)
    assert head == (tmp_path / "full.nii").read_bytes()[:len(head)] and len(head) == 352
    with pytest.raises(ValueError, match="reference"):
        io.nifti_header(arr[:, :, :4], img)


def test_gzip_trailer_shortcut_accepts_only_an_exact_stream(tmp_path):
    import gzip

    img = _ct_like()
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(img, str(good), True)
    assert io._gzip_trailer_matches(good, sitk.ReadImage(str(good)))
    # the same bytes as two gzip members: valid, but the trailer covers only the second -> full check
    plain = gzip.decompress(good.read_bytes())
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(plain[:5000]) + gzip.compress(plain[5000:]))
    assert not io._gzip_trailer_matches(two, sitk.ReadImage(str(two)))
    read = io.read_volume(two, keep_int16=True)  # full check, then the voxels compared with ITK's
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(img))
    # the voxels changed but the old trailer kept (CRC no longer matches): refused, never read silently
    changed = bytearray(plain)
    changed[len(plain) // 2] ^= 0x40
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(bytes(changed))[:-8] + good.read_bytes()[-8:])
    with pytest.raises(InputError, match="damaged|truncated|cannot read"):
        io.read_volume(bad)


def test_voxels_itk_read_differently_from_an_intact_file_are_refused(tmp_path, monkeypatch):
    """The safety net behind the full check: ITK's voxels are compared with the file's (CRC)."""
    img = _ct_like()
    p = tmp_path / "a.nii.gz"
    sitk.WriteImage(img, str(p), True)
    other = sitk.Cast(sitk.GetImageFromArray(sitk.GetArrayFromImage(img) + np.int16(1)), sitk.sitkInt16)
    other.CopyInformation(img)
    monkeypatch.setattr(io.sitk, "ReadImage", lambda *a, **k: other)  # an ITK that misreads
    with pytest.raises(InputError, match="other voxel values"):
        io.read_volume(p)


def test_pair_reading_reads_both_and_reports_the_fixed_image_first(tmp_path):
    img = _ct_like()
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    sitk.WriteImage(img, str(a), True)
    sitk.WriteImage(_ct_like(seed=1), str(b), True)
    fixed, moving = io.PairReading(a, b).result()
    assert fixed.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(img))
    assert not np.array_equal(sitk.GetArrayViewFromImage(moving), sitk.GetArrayViewFromImage(img))
    with pytest.raises(InputError, match="missing-fixed"):
        io.PairReading(tmp_path / "missing-fixed.nii.gz", tmp_path / "missing-moving.nii.gz").result()


def test_int16_image_is_resampled_unrounded_as_float32():
    from DeepLungRegLib.preprocessing import resample_isotropic

    img = _ct_like()
    direct = resample_isotropic(img, 3.0, pixel_type=sitk.sitkFloat32)
    via_cast = resample_isotropic(sitk.Cast(img, sitk.sitkFloat32), 3.0)
    assert direct.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(direct), sitk.GetArrayViewFromImage(via_cast))
    assert not np.array_equal(np.round(sitk.GetArrayViewFromImage(direct)), sitk.GetArrayViewFromImage(direct))


def test_voxel_crc_counts_every_byte_once_in_any_chunking(tmp_path):
    """float64 voxels straddle the check's chunks (vox_offset 352): the CRC must still be that of the voxels."""
    import zlib

    arr = np.random.default_rng(2).normal(-500.0, 300.0, (20, 30, 40))
    img = sitk.GetImageFromArray(arr)
    p = tmp_path / "f64.nii"
    sitk.WriteImage(img, str(p), False)
    for chunk in (4096, 8192, 1000, 1 << 24):
        found = io.check_nifti_data(p, chunk=chunk)
        assert found["crc32"] == zlib.crc32(arr.astype("<f8").tobytes()), chunk
    io.read_volume(p)  # not refused


def test_scaled_float_voxels_are_read_not_refused(tmp_path):
    """ITK applies scl_slope/scl_inter: its voxels differ from the stored bytes, legitimately."""
    import gzip

    arr = np.random.default_rng(3).uniform(-500.0, 100.0, (12, 16, 20)).astype(np.float32)
    raw = tmp_path / "a.nii"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(raw), False)
    data = bytearray(raw.read_bytes())
    data[112:116] = np.float32(2.0).tobytes()  # scl_slope
    p = tmp_path / "scaled.nii.gz"
    p.write_bytes(gzip.compress(bytes(data)))
    img = io.read_volume(p)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img), 2.0 * arr, rtol=1e-6)


def test_nifti_header_keeps_the_images_metadata_as_itk_writes_it(tmp_path):
    arr = (np.random.default_rng(4).normal(size=(9, 6, 5)) * 100).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetMetaData("ITK_FileNotes", "made by a test")
    sitk.WriteImage(img, str(tmp_path / "full.nii"), False)
    head = io.nifti_header(arr, img, folder=tmp_path, metadata=img)
    assert head == (tmp_path / "full.nii").read_bytes()[:len(head)] and b"made by a test" in head
    assert [p.name for p in tmp_path.iterdir()] == ["full.nii"]  # its two-slice file is gone


def test_fast_deflate_is_isal_where_installed_and_as_small_as_zlib_level_1():
    """The requirement ``isal`` is used when importable; on CT its output is no larger than
    zlib level 1's by more than 3 % (measured: 0.6 % larger on a breathing CT, 0.4 % smaller on LIDC-IDRI)."""
    import importlib.util
    import zlib

    module, level = io.fast_deflate()
    if importlib.util.find_spec("isal") is None:
        assert module is zlib and level == 1
        pytest.skip("isal not installed: zlib is the fallback")
    assert module.__name__.endswith("isal_zlib")
    data = sitk.GetArrayFromImage(_ct_like()).tobytes()
    fast = module.compressobj(level, module.DEFLATED, -15)
    ref = zlib.compressobj(1, zlib.DEFLATED, -15)
    n_fast = len(fast.compress(data) + fast.flush())
    n_ref = len(ref.compress(data) + ref.flush())
    assert n_fast <= 1.03 * n_ref, (n_fast, n_ref)
