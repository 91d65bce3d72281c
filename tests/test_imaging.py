"""Readers and writers of m3d_edge.imaging against real files and against nibabel / pydicom / highdicom.

Real data: the TotalSegmentator example scans in ../shared/data/totalseg (CT stored RAS, MR stored LPS) and
pydicom's own test files. Geometry is checked as numbers (voxel -> patient mm), not as "it runs".
"""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from m3d_edge import imaging
from m3d_edge.imaging.dicom import write_series
from m3d_edge.imaging.nifti import write_nifti
from m3d_edge.imaging.volume import ImagingError, Volume, atomic_output, axis_codes

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
CT = DATA / "totalseg" / "example_ct_sm.nii.gz"
MR = DATA / "totalseg" / "example_mr_sm.nii.gz"
SEG = DATA / "totalseg" / "example_seg.nii.gz"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def ct() -> Volume:
    return imaging.read(CT)


@pytest.fixture(scope="module")
def ct_series(ct, tmp_path_factory) -> tuple[Path, Volume]:
    """The example CT reoriented to SPL (DICOM axial order) and written as a DICOM series."""
    vol = ct.reoriented("SPL")
    folder = tmp_path_factory.mktemp("series")
    write_series(vol, folder, series_description="example ct")
    return folder, vol


# ------------------------------------------------------------------------------------------------ NIfTI


@pytest.mark.parametrize("path, codes", [(CT, "RAS"), (MR, "LPS")])
def test_nifti_voxel_to_patient_agrees_with_nibabel(path, codes):
    img = nib.load(path)
    assert "".join(nib.aff2axcodes(img.affine)) == codes
    vol = imaging.read(path)
    data = np.asanyarray(img.dataobj)
    assert vol.shape == data.shape[::-1]
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, data.shape, size=(50, 3))
    assert np.array_equal(vol.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]], data[ijk[:, 0], ijk[:, 1], ijk[:, 2]])
    ras = nib.affines.apply_affine(img.affine, ijk)
    lps = vol.voxel_to_patient(ijk[:, ::-1])
    err = np.abs(lps - ras @ LPS_FROM_RAS).max()
    assert err < 1e-9, f"voxel->patient differs from nibabel (RAS->LPS) by {err} mm"
    # our axis codes of (z, y, x) are nibabel's codes of (k, j, i)
    assert vol.orientation() == codes[::-1], f"axis codes {vol.orientation()} for a {codes} file"


def test_axis_codes_match_nibabel_for_oblique_grids():
    rng = np.random.default_rng(1)
    for _ in range(100):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine = np.eye(4)
        affine[:3, :3] = q * rng.uniform(0.5, 3.0, 3)
        ours = axis_codes(affine)
        theirs = "".join(nib.aff2axcodes(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine))  # LPS -> RAS frame
        assert ours == theirs, f"{ours} != nibabel {theirs} for\n{affine}"


def test_ct_is_recognised_and_mr_is_not(ct):
    assert ct.modality == "CT", ct.meta["ct_check"]
    mr = imaging.read(MR)
    assert mr.modality != "CT", f"MR taken for CT: {mr.meta['ct_check']}"
    assert imaging.read(CT, require_ct=True).modality == "CT"
    with pytest.raises(ImagingError, match="not a CT scan") as err:
        imaging.read(MR, require_ct=True)
    assert "example_mr_sm.nii.gz" in str(err.value) and "require_ct=False" in str(err.value)


def test_write_mask_uses_source_grid_and_header(ct, tmp_path):
    seg = imaging.read(SEG)
    liver = ct.with_array((seg.array == 5).astype(np.uint8))
    out = imaging.write_mask(liver, tmp_path / "liver.nii.gz", like=ct)
    img, src = nib.load(out), nib.load(CT)
    assert img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, src.affine, atol=1e-5), f"affine {img.affine} != source {src.affine}"
    assert np.array_equal(img.header.get_zooms(), src.header.get_zooms())
    assert int(img.header["sform_code"]) == int(src.header["sform_code"])
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(nib.load(SEG).dataobj) == 5)
    with pytest.raises(ImagingError, match="source grid"):
        imaging.write_mask(Volume(np.zeros((2, 3, 4)), np.eye(4)), tmp_path / "bad.nii.gz", like=ct)


def test_nifti_write_read_roundtrip_any_orientation(ct, tmp_path):
    for codes in ("SPL", "IAR", "LSA"):
        vol = ct.reoriented(codes)
        back = imaging.read(write_nifti(vol, tmp_path / f"{codes}.nii.gz"))
        assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-4), codes


# ------------------------------------------------------------------------------------------------ DICOM


def test_dicom_series_roundtrip(ct_series):
    folder, vol = ct_series
    back = imaging.read(folder)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, vol.array)
    err = np.abs(back.affine - vol.affine).max()
    assert err < 1e-4, f"affine differs by {err} (DS strings keep 6 decimals)"
    assert back.modality == "CT" and back.meta["warnings"] == []


def test_dicom_series_order_ignores_file_names_and_instance_numbers(ct_series, tmp_path):
    folder, vol = ct_series
    files = sorted(folder.glob("*.dcm"))
    names = [f"x{n:03d}.dcm" for n in random.Random(0).sample(range(1000), len(files))]
    numbers = random.Random(1).sample(range(1, len(files) + 1), len(files))
    for f, name, number in zip(files, names, numbers):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = number
        ds.save_as(tmp_path / name)
    back = imaging.read(tmp_path)
    assert np.array_equal(back.array, vol.array), "slice order follows names or InstanceNumber, not position"
    assert np.abs(back.affine - vol.affine).max() < 1e-4


def test_several_series_pick_ct_with_most_slices_or_by_uid(ct_series, tmp_path):
    _, vol = ct_series
    big_mr = vol.with_array(vol.array)
    write_series(vol, tmp_path / "a", series_uid="1.2.3.1")  # 30 slices
    write_series(Volume(vol.array[:10], vol.affine), tmp_path / "b", series_uid="1.2.3.2")  # 10 slices
    write_series(Volume(np.concatenate([big_mr.array, big_mr.array[:10]]), vol.affine), tmp_path / "c",
                 series_uid="1.2.3.3")  # 40 slices, relabelled MR below: must not win
    for f in (tmp_path / "c").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    chosen = imaging.read(tmp_path)
    assert chosen.meta["series_uid"] == "1.2.3.1", chosen.meta["series_choice"]
    assert "most slices (30)" in chosen.meta["series_choice"]
    assert len(chosen.meta["available_series"]) == 3
    assert imaging.read(tmp_path, series_uid="1.2.3.2").shape[0] == 10
    with pytest.raises(ImagingError, match="1.2.3.9 is not in") as err:
        imaging.read(tmp_path, series_uid="1.2.3.9")
    assert "1.2.3.1 (CT, 30 slices" in str(err.value)


def test_missing_slice_is_an_error_unless_allowed(ct_series, tmp_path):
    folder, vol = ct_series
    for f in sorted(folder.glob("*.dcm")):
        if f.name != "IM0012.dcm":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ImagingError, match="missing slices") as err:
        imaging.read(tmp_path)
    assert "allow_gaps=True" in str(err.value) and "IM0011.dcm" in str(err.value)
    back = imaging.read(tmp_path, allow_gaps=True)
    assert back.shape[0] == vol.shape[0] - 1
    assert any(w.startswith("missing slices") for w in back.meta["warnings"]), back.meta["warnings"]


def test_uneven_spacing_and_tilt_are_reported(ct_series, tmp_path):
    folder, vol = ct_series
    (tmp_path / "uneven").mkdir()
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if f.name == "IM0010.dcm":  # move one slice 0.6 mm up: steps 3.6 and 2.4 mm around it
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.6
        ds.save_as(tmp_path / "uneven" / f.name)
    warnings = imaging.read(tmp_path / "uneven").meta["warnings"]
    assert any("uneven slice spacing: steps 2.400..3.600 mm" in w for w in warnings), warnings

    tilted = vol.affine.copy()
    tilted[:3, 0] += [0.0, 3.0 * np.tan(np.radians(15.0)), 0.0]  # each slice shifts posteriorly: 15 deg gantry tilt
    write_series(Volume(vol.array, tilted), tmp_path / "tilt")
    back = imaging.read(tmp_path / "tilt")
    assert any("gantry tilt 15.00 deg" in w for w in back.meta["warnings"]), back.meta["warnings"]
    assert np.abs(back.affine - tilted).max() < 1e-4, "the sheared affine must keep every slice position"


def test_single_ct_slice_rescaled_to_hu():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = imaging.read(path, require_ct=True)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert vol.shape == (1, 128, 128) and np.array_equal(vol.array[0], expected)
    assert np.allclose(vol.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    assert np.allclose(vol.spacing[1:], [float(v) for v in ds.PixelSpacing])
    assert any("single slice" in w for w in vol.meta["warnings"])


def test_enhanced_ct_frames_sorted_along_normal():
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    vol = imaging.read(path, require_ct=True)
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert positions == [-159.0, -149.0]
    # orientation rows -x, columns +y: the normal row x column is -z, so the frame at -149 mm comes first
    assert vol.shape == (2, 512, 512) and vol.orientation() == "IPR"
    assert np.allclose(vol.voxel_to_patient([[0, 0, 0], [1, 0, 0]])[:, 2], [-149.0, -159.0])
    assert np.allclose(vol.spacing, [10.0, 0.388672, 0.388672])
    expected = ds.pixel_array[::-1].astype(np.int32) - 1024  # RescaleIntercept -1024 in the functional groups
    assert np.array_equal(vol.array, expected), f"HU range {vol.array.min()}..{vol.array.max()}"


def test_enhanced_mr_without_geometry():
    path = get_testdata_file("emri_small.dcm")
    vol = imaging.read(path)
    assert vol.shape == (10, 64, 64) and vol.modality == "MR"
    assert np.array_equal(vol.array, pydicom.dcmread(path).pixel_array)
    assert any("no patient geometry" in w for w in vol.meta["warnings"]), vol.meta["warnings"]
    assert vol.orientation() == "SPL" and np.allclose(vol.spacing, [1.2, 1.0, 1.0])  # SpacingBetweenSlices 1.2
    with pytest.raises(ImagingError, match="Modality is 'MR'"):
        imaging.read(path, require_ct=True)


@pytest.mark.parametrize("compressed, plain", [("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless CT
                                               ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm")])  # JPEG-LS
def test_compressed_transfer_syntax_decodes(compressed, plain):
    ds = pydicom.dcmread(get_testdata_file(compressed), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    a, b = imaging.read(get_testdata_file(compressed)), imaging.read(get_testdata_file(plain))
    assert np.array_equal(a.array, b.array), f"max difference {np.abs(a.array.astype(int) - b.array).max()}"
    assert np.allclose(a.affine, b.affine)


def test_dicom_seg_references_source_series(ct_series, tmp_path):
    import highdicom as hd

    folder, vol = ct_series
    source = imaging.read(folder)
    liver = (imaging.read(SEG).reoriented("SPL").array == 5).astype(np.uint8)
    out = imaging.write_dicom_seg(source.with_array(liver), tmp_path / "liver_seg.dcm", source=source)
    seg = hd.seg.segread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    slices_with_liver = int(liver.any(axis=(1, 2)).sum())
    assert int(seg.NumberOfFrames) == slices_with_liver, f"{seg.NumberOfFrames} frames for {slices_with_liver} slices"
    assert int(seg.pixel_array.sum()) == int(liver.sum())
    # each SEG frame sits at the position of the source slice it was drawn on and holds that slice's mask
    for k, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        lps = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        z = source.patient_to_voxel(lps)
        assert np.allclose(z[1:], 0, atol=1e-3) and abs(z[0] - round(z[0])) < 1e-3, f"frame {k} at voxel {z}"
        assert np.array_equal(seg.pixel_array[k], liver[int(round(z[0]))]), f"frame {k} != mask slice {z[0]}"
    with pytest.raises(ImagingError, match="DICOM source"):
        imaging.write_dicom_seg(imaging.read(CT).with_array(np.ones((30, 101, 122))), tmp_path / "x.dcm",
                                source=imaging.read(CT))


def test_overlay_png(ct, tmp_path):
    liver = ct.with_array((imaging.read(SEG).array == 5).astype(np.uint8))
    out = imaging.write_overlay(ct, tmp_path / "overlay.png", mask=liver, boxes=[[5, 20, 20, 15, 60, 80]])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"]


def test_npy_official_layout(tmp_path):
    arr = np.random.default_rng(0).random((1, 32, 256, 256), dtype=np.float32)
    np.save(tmp_path / "image.npy", arr)
    vol = imaging.read(tmp_path / "image.npy")
    assert vol.shape == (32, 256, 256) and np.array_equal(vol.array, arr[0])
    assert np.allclose(vol.spacing, [5.0, 1.0, 1.0]) and vol.orientation() == "SPL"
    np.save(tmp_path / "plain.npy", arr[0])
    assert imaging.read(tmp_path / "plain.npy").shape == (32, 256, 256)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImagingError, match="is empty"):
        imaging.read(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imaging.read(tmp_path / "nowhere")

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    (tmp_path / "junk" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    with pytest.raises(ImagingError, match=r"no DICOM image files .* 2 file\(s\) could not be read as DICOM"):
        imaging.read(tmp_path / "junk")

    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for name, cut in (("header", 1000), ("pixels", len(raw) - 6000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "slice.dcm").write_bytes(raw[:cut])
        with pytest.raises(ImagingError, match="truncated") as err:
            imaging.read(tmp_path / name)
        assert "slice.dcm" in str(err.value), str(err.value)

    np.save(tmp_path / "flat.npy", np.zeros((256, 256), np.float32))
    with pytest.raises(ImagingError, match="2-D image"):
        imaging.read(tmp_path / "flat.npy")
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ImagingError, match="flat.nii.gz is a 2-D image"):
        imaging.read(tmp_path / "flat.nii.gz")

    nan = np.ones((4, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ImagingError, match="nan.npy holds 1 NaN"):
        imaging.read(tmp_path / "nan.npy")
    nib.save(nib.Nifti1Image(nan.transpose(2, 1, 0), np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ImagingError, match="holds 1 NaN"):
        imaging.read(tmp_path / "nan.nii.gz")

    gz = CT.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ImagingError, match="cut.nii.gz as NIfTI"):
        imaging.read(tmp_path / "cut.nii.gz")
    assert issubclass(ImagingError, ValueError)


def test_failing_writer_leaves_no_file(ct, tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"

    def half_then_fail(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(ct, target)
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"

    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ImagingError, match="NaN"):
        write_series(Volume(np.full((2, 4, 4), np.nan), np.eye(4)), tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []


def test_dicom_seg_on_an_enhanced_multiframe_source(tmp_path):
    import highdicom as hd

    source = imaging.read(get_testdata_file("eCT_Supplemental.dcm"))
    mask = np.zeros(source.shape, np.uint8)
    mask[0, 100:200, 100:150] = 1  # z 0 is file frame 1 (frames are sorted along the normal)
    seg = hd.seg.segread(imaging.write_dicom_seg(source.with_array(mask), tmp_path / "s.dcm", source=source))
    assert int(seg.NumberOfFrames) == 1 and int(seg.pixel_array.sum()) == 5000
    pos = [float(v) for v in seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    assert np.allclose(pos, source.voxel_to_patient([0, 0, 0])), f"SEG frame at {pos}"
