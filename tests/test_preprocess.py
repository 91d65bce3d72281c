"""m3d_edge.preprocess against the official pipeline done in torch, and its Transform as a geometry round trip.

The reference for spec "m3d" is written here in torch exactly as the official data scripts run it (spec §7.2):
min-max to [0, 1], crop to the bounding box of voxels > 0 (margin 0), F.interpolate(trilinear,
align_corners=False), no antialiasing. torch is allowed in tests only; preprocess itself must not import it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3d_edge import imaging
from m3d_edge.imaging.volume import Volume, axial_affine
from m3d_edge.preprocess import (
    CANONICAL,
    PreprocessError,
    box_from_mask,
    resize_trilinear,
    to_model_input,
)

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
CT = DATA / "totalseg" / "example_ct_sm.nii.gz"
MR = DATA / "totalseg" / "example_mr_sm.nii.gz"
SEG = DATA / "totalseg" / "example_seg.nii.gz"
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}


@pytest.fixture(scope="module")
def ct() -> Volume:
    return imaging.read(CT)


@pytest.fixture(scope="module")
def seg() -> np.ndarray:
    return imaging.read(SEG).array  # [z, y, x] on the CT grid


def official_m3d_reference(canonical: np.ndarray, out_shape=(32, 256, 256)) -> np.ndarray:
    """The official preprocessing in torch: min-max, CropForeground (> 0, margin 0), trilinear resize."""
    t = torch.from_numpy(np.ascontiguousarray(canonical, dtype=np.float32))
    t = (t - t.min()) / (t.max() - t.min())
    nz = torch.nonzero(t > 0)
    lo, hi = nz.min(0).values, nz.max(0).values + 1
    t = t[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return F.interpolate(t[None, None], size=out_shape, mode="trilinear", align_corners=False).numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("path", [CT, MR])
def test_m3d_spec_matches_official_torch_pipeline(path):
    vol = imaging.read(path)
    x, tr = to_model_input(vol, "m3d")
    assert x.shape == (1, 1, 32, 256, 256) and x.dtype == np.float32
    ref = official_m3d_reference(vol.reoriented(CANONICAL).array)
    err = float(np.abs(x - ref).max())
    assert err <= 1e-5, f"max abs error {err} against torch trilinear"
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_m3d_spec_with_real_crop_and_downsampling():
    # a body in a zero background, larger than the model grid in-plane: crop and shrink both happen
    rng = np.random.default_rng(0)
    arr = np.zeros((45, 300, 290), np.float32)
    arr[3:40, 20:280, 11:250] = rng.normal(100.0, 30.0, (37, 260, 239)).clip(1.0)
    vol = Volume(arr, axial_affine((2.0, 0.8, 0.8)))
    x, tr = to_model_input(vol, "m3d")
    assert tr.crop == ((3, 40), (20, 280), (11, 250)), tr.crop
    err = float(np.abs(x - official_m3d_reference(arr)).max())
    assert err <= 1e-5, f"max abs error {err} against torch trilinear"


def test_m3d_spec_matches_monai_if_installed(ct):
    monai = pytest.importorskip("monai")
    from monai.transforms import CropForeground, Resize

    canonical = ct.reoriented(CANONICAL).array.astype(np.float32)
    t = (canonical - canonical.min()) / (canonical.max() - canonical.min())
    cropped = CropForeground(margin=0)(t[None])
    ref = np.asarray(Resize((32, 256, 256), mode="trilinear")(cropped))
    x, _ = to_model_input(ct, "m3d")
    err = float(np.abs(x[0] - ref).max())
    assert err <= 1e-5, f"max abs error {err} against MONAI {monai.__version__}"


def test_ct_spec_windows_hu(ct):
    x, tr = to_model_input(ct, "ct", window=(-200.0, 300.0))
    assert tr.window == (-200.0, 300.0)
    t = torch.from_numpy(ct.reoriented(CANONICAL).array.astype(np.float32)).clamp(-200.0, 300.0)
    t = (t + 200.0) / 500.0
    nz = torch.nonzero(t > 0)
    lo, hi = nz.min(0).values, nz.max(0).values + 1
    assert tr.crop == tuple((int(a), int(b)) for a, b in zip(lo, hi)), tr.crop
    t = t[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    ref = F.interpolate(t[None, None], size=(32, 256, 256), mode="trilinear", align_corners=False).numpy()
    err = float(np.abs(x - ref).max())
    assert err <= 1e-5, f"max abs error {err}"


def test_resize_matches_torch_for_odd_sizes():
    a = np.random.default_rng(2).random((7, 13, 5), dtype=np.float32)
    for shape in [(32, 256, 256), (3, 5, 2), (7, 26, 4)]:
        ref = F.interpolate(torch.from_numpy(a)[None, None], size=shape, mode="trilinear", align_corners=False)
        err = float(np.abs(resize_trilinear(a, shape) - ref.numpy()[0, 0]).max())
        assert err <= 1e-6, f"{shape}: max abs error {err}"


def test_mask_to_model_matches_torch_nearest(ct, seg):
    _, tr = to_model_input(ct, "m3d")
    liver = (seg == 5).astype(np.float32)
    canonical = ct.with_array(liver).reoriented(CANONICAL).array
    crop = canonical[tuple(slice(a, b) for a, b in tr.crop)]
    ref = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop))[None, None], size=(32, 256, 256), mode="nearest")
    ours = tr.mask_to_model(seg == 5)
    assert np.array_equal(ours, ref.numpy()[0, 0].astype(np.uint8)), "differs from the official label resize"


# ------------------------------------------------------------------------------------------------ geometry


def test_canonical_orientation_is_recorded_and_input_independent(ct):
    x, tr = to_model_input(ct, "m3d")
    assert ct.orientation() == "SAR" and tr.source_orientation == "SAR" and tr.orientation == "SPL"
    assert tr.perm == (0, 1, 2) and tr.flips == (False, True, True)
    for codes in ("IAR", "LSA", "PIL"):  # the same scan stored another way gives the same model input
        y, tr2 = to_model_input(ct.reoriented(codes), "m3d")
        assert np.array_equal(x, y), f"model input depends on the stored orientation {codes}"
        assert tr2.orientation == "SPL"


@pytest.mark.parametrize("method", ["linear", "nearest"])
def test_liver_mask_round_trip_dice(ct, seg, method):
    _, tr = to_model_input(ct, "m3d")
    liver = seg == 5
    model_mask = tr.mask_to_model(liver)  # [32, 256, 256] on the model grid
    back = tr.invert_mask(model_mask, method=method)
    assert back.shape == ct.shape and np.array_equal(back.affine, ct.affine) and back.array.dtype == np.uint8
    d = dice(back.array, liver)
    assert d >= 0.9, f"Dice {d:.4f} after model grid and back ({method})"


def test_round_trip_through_a_flipped_and_permuted_source(ct, seg):
    stored = ct.reoriented("LSA")  # x-first storage: every step of the Transform matters
    labels = ct.with_array(seg).reoriented("LSA").array
    _, tr = to_model_input(stored, "m3d")
    assert tr.perm != (0, 1, 2)
    d = dice(tr.invert_mask(tr.mask_to_model(labels == 5)).array, labels == 5)
    assert d >= 0.9, f"Dice {d:.4f} with source orientation LSA"


@pytest.mark.parametrize("name", list(LABELS))
@pytest.mark.parametrize("codes", ["SAR", "LSA"])
def test_label_box_maps_back_within_one_voxel(ct, seg, name, codes):
    stored = ct.reoriented(codes)
    label = ct.with_array(seg).reoriented(codes).array == LABELS[name]
    _, tr = to_model_input(stored, "m3d")
    box6 = box_from_mask(tr.mask_to_model(label))
    idx = np.argwhere(label)
    truth = np.concatenate([idx.min(0), idx.max(0)])
    got = tr.box_to_voxels(box6)
    err_vox = int(np.abs(got - truth).max())
    assert err_vox <= 1, f"{name}: voxel box {got.tolist()} vs label box {truth.tolist()}"
    mm = tr.box_to_patient(box6)
    truth_mm = stored.voxel_to_patient(truth.reshape(2, 3))
    err_mm = float(np.abs(mm - truth_mm).max())
    assert err_mm <= 3.0 + 1e-6, f"{name}: corners off by {err_mm:.2f} mm (voxel size 3 mm)"


def test_box_from_mask_official_format():
    mask = np.zeros((32, 256, 256), np.uint8)
    mask[4:17, 85:180, 26:154] = 1  # indices 4..16, 85..179, 26..153
    assert box_from_mask(mask) == [0.125, 0.332, 0.102, 0.5, 0.699, 0.598]
    assert box_from_mask(np.zeros((32, 256, 256))) is None


def test_npy_input_passes_through_unchanged(tmp_path):
    arr = (np.random.default_rng(3).random((1, 32, 256, 256), dtype=np.float32) * 0.98 + 0.01)
    arr[0, 0, 0, 0], arr[0, 1, 1, 1] = 0.0, 1.0
    np.save(tmp_path / "image.npy", arr)
    x, tr = to_model_input(imaging.read(tmp_path / "image.npy"), "m3d")
    assert tr.perm == (0, 1, 2) and tr.flips == (False, False, False)
    assert np.array_equal(x[0], arr), "an official .npy must reach the model untouched"


# ------------------------------------------------------------------------------------------------ errors, deps


def test_errors_are_clear(ct):
    with pytest.raises(PreprocessError, match="constant"):
        to_model_input(Volume(np.full((4, 8, 8), 7.0), np.eye(4)), "m3d")
    with pytest.raises(PreprocessError, match="no voxel above 3000"):
        to_model_input(ct, "ct", window=(3000.0, 4000.0))
    with pytest.raises(PreprocessError, match="spec 'raw'"):
        to_model_input(ct, "raw")
    _, tr = to_model_input(ct, "m3d")
    with pytest.raises(PreprocessError, match="model grid"):
        tr.invert_mask(np.zeros((16, 128, 128)))
    with pytest.raises(PreprocessError, match="6 finite numbers"):
        tr.box_to_voxels([0.1, 0.2, 0.3])


def test_preprocess_imports_neither_torch_nor_scipy():
    code = "import sys, m3d_edge.preprocess; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"preprocess pulled in {out}"
