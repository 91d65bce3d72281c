"""NIfTI <-> Volume (nibabel).

nibabel gives the data in its stored voxel order (i, j, k) and an affine (i, j, k, 1) -> RAS+ mm. Our Volume is
indexed (z, y, x) = (k, j, i) with an affine to LPS mm, so reading is a transpose (no flips, no resampling) and
two affine changes:

    affine_lps_zyx = diag(-1, -1, 1, 1) @ affine_ras_ijk @ SWAP,   SWAP = (z, y, x, 1) -> (i, j, k, 1) = (x, y, z, 1)

Any stored orientation (RAS, LPS, LAS, oblique) reads correctly; bringing it to one orientation is the job of
preprocess. The source header is kept in meta["nifti_header"] so a mask can be written on the same grid with the
same header (`write_mask`).

NIfTI has no modality. `looks_like_ct` decides from the intensities; see its docstring.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np

from m3d_edge.imaging.volume import ImagingError, ImagingFileNotFoundError, Volume, atomic_output

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
SWAP_ZYX_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)  # its own inverse

# CT recognition thresholds (HU); see looks_like_ct
AIR_HU = (-1100.0, -900.0)
MIN_AIR_FRACTION = 0.005
CT_MEDIAN_HU = (-1100.0, 3071.0)
CT_P99_MAX_HU = 4095.0


def lps_zyx_from_ras_ijk(affine_ras: np.ndarray) -> np.ndarray:
    """nibabel affine (i, j, k, 1) -> RAS mm  ==>  our affine (z, y, x, 1) -> LPS mm."""
    return RAS_FROM_LPS @ np.asarray(affine_ras, dtype=np.float64) @ SWAP_ZYX_XYZ


def ras_ijk_from_lps_zyx(affine_lps: np.ndarray) -> np.ndarray:
    """Our affine (z, y, x, 1) -> LPS mm  ==>  nibabel affine (i, j, k, 1) -> RAS mm."""
    return RAS_FROM_LPS @ np.asarray(affine_lps, dtype=np.float64) @ SWAP_ZYX_XYZ


def looks_like_ct(array: np.ndarray) -> bool:
    """Whether intensities look like CT in Hounsfield units.

    NIfTI carries no modality, so we decide from statistics. A CT of a body has air around and inside it at
    about -1000 HU, and CT values live in roughly [-1024, 3071]. So: at least 0.5 % of voxels in
    [-1100, -900] HU, the median in [-1100, 3071] and the 99th percentile <= 4095 (a little metal is allowed).
    MR magnitudes are >= 0 (or small negative values after filtering) and have no mode near -1000, so they
    fail the first test; so does any [0, 1]-normalised array. Limit: a CT stored without its rescale (raw
    unsigned values 0..4095) is not recognised — convert it to HU first.
    """
    a = np.asarray(array)
    if a.size > 4_000_000:  # statistics on a strided sample keep this cheap for big scans
        a = a.reshape(-1)[:: a.size // 2_000_000]
    air = np.mean((a >= AIR_HU[0]) & (a <= AIR_HU[1]))
    median, p99 = np.percentile(a, [50, 99])
    return bool(air >= MIN_AIR_FRACTION and CT_MEDIAN_HU[0] <= median <= CT_MEDIAN_HU[1] and p99 <= CT_P99_MAX_HU)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a .nii/.nii.gz into a Volume: array [z, y, x] = nibabel's [i, j, k] transposed, LPS affine.

    Integer data without scaling keeps its dtype (int16 HU stays int16); scaled data becomes float32.
    modality is "CT" when `looks_like_ct`, else "OT" (other); meta["ct_check"] says why.
    """
    path = Path(path)
    if not path.exists():
        raise ImagingFileNotFoundError(f"{path} does not exist; give a .nii or .nii.gz file")
    try:
        img = nib.load(path)
        raw = img.dataobj
        scaled = getattr(raw, "slope", 1.0) not in (None, 1.0) or getattr(raw, "inter", 0.0) not in (None, 0.0)
        data = img.get_fdata(dtype=np.float32) if scaled or img.get_data_dtype().kind == "f" else np.asanyarray(raw)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError, zlib.error) as e:
        # a truncated .nii.gz fails inside gzip/zlib (EOFError, zlib.error), a bad header inside nibabel
        raise ImagingError(f"cannot read {path} as NIfTI ({type(e).__name__}: {e}); the file is damaged or "
                           "truncated — export it again") from e
    data = _as_3d(data, path)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ImagingError(f"{path} holds {n} NaN or infinite voxel(s); fix or fill them before inference")
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) -> (z, y, x)
    is_ct = looks_like_ct(array)
    meta: dict[str, Any] = {
        "format": "nifti",
        "source": str(path),
        "nifti_header": img.header.copy(),
        "nifti_affine": np.asarray(img.affine, dtype=np.float64).copy(),
        "ct_check": "intensities look like CT (air near -1000 HU)" if is_ct else
                    "intensities do not look like CT HU (no air near -1000 HU or values out of range)",
        "warnings": [],
    }
    return Volume(array, lps_zyx_from_ras_ijk(img.affine), "CT" if is_ct else "OT", meta)


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        raise ImagingError(f"{path} is a 2-D image (shape {data.shape}); the model needs a 3-D scan")
    if data.ndim != 3:
        raise ImagingError(f"{path} has shape {data.shape}; expected a 3-D volume (split 4-D series into volumes)")
    return data


def write_nifti(volume: Volume, path: str | os.PathLike, *, header: Optional[nib.Nifti1Header] = None) -> Path:
    """Write a Volume as NIfTI-1 (.nii or .nii.gz): data [i, j, k] = array [z, y, x] transposed, RAS affine.

    `header` (e.g. the source's meta["nifti_header"]) is copied for its extra fields; the affine, shape, dtype
    and scaling always come from `volume`. sform and qform both get code 1 (scanner) unless the header has one.
    """
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ImagingError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    data = np.asarray(volume.array).transpose(2, 1, 0)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, ras_ijk_from_lps_zyx(volume.affine), header=hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    sform_code = int(hdr["sform_code"]) if hdr is not None and int(hdr["sform_code"]) > 0 else 1
    qform_code = int(hdr["qform_code"]) if hdr is not None and int(hdr["qform_code"]) > 0 else 1
    img.set_sform(img.affine, code=sform_code)
    img.set_qform(img.affine, code=qform_code)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)
    return path


def write_mask(mask: Volume, path: str | os.PathLike, *, like: Volume) -> Path:
    """Write a mask Volume as uint8 NIfTI on the grid of `like` (the source scan), with the source header.

    The mask must have the source's shape and affine (as `preprocess.Transform.invert_mask` returns); a mask
    on another grid is refused, never resampled silently.
    """
    if mask.shape != like.shape:
        raise ImagingError(f"mask shape {mask.shape} differs from the source grid {like.shape}; "
                           "map it back with Transform.invert_mask first")
    if not np.allclose(mask.affine, like.affine, atol=1e-4):
        raise ImagingError("mask affine differs from the source affine; map it back with Transform.invert_mask first")
    out = like.with_array(np.asarray(mask.array).astype(np.uint8))
    return write_nifti(out, path, header=like.meta.get("nifti_header"))
