"""The scanner side: read scans into a Volume, write masks, DICOM SEG, overlays and DICOM series.

    read(path)            DICOM folder | .dcm file | .nii / .nii.gz | .npy  ->  Volume (array z,y,x; affine to LPS mm)
    write_mask            mask Volume -> .nii/.nii.gz (source header), .npy, or a DICOM SEG (.dcm) on the source grid
    write_dicom_seg       mask Volume -> DICOM SEG referencing the source series (highdicom)
    write_overlay         PNG of a few axial slices with the mask contour and boxes
    write_series          Volume -> CT DICOM series (phantoms, tests)
    write_nifti           Volume -> NIfTI

Readers of heavy optional formats (highdicom, matplotlib) are imported only when used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from m3d_edge.imaging.volume import ImagingError, ImagingFileNotFoundError, Volume

__all__ = [
    "ImagingError",
    "ImagingFileNotFoundError",
    "Volume",
    "read",
    "write_dicom_seg",
    "write_mask",
    "write_nifti",
    "write_overlay",
    "write_series",
]

log = logging.getLogger(__name__)


def read(path: str | os.PathLike, *, series_uid: Optional[str] = None, require_ct: bool = False,
         allow_gaps: bool = False) -> Volume:
    """Read a scan, choosing the reader from the path: a folder or .dcm (DICOM), .nii/.nii.gz, .npy.

    series_uid picks one series of a DICOM folder (default: the CT series with most slices). allow_gaps reads
    a DICOM series with missing slices (else an ImagingError). require_ct=True raises an ImagingError for a
    volume known not to be CT: DICOM Modality other than CT, or a NIfTI whose intensities do not look like HU
    (nifti.looks_like_ct). A .npy is already normalised and cannot be judged: it passes, with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise ImagingFileNotFoundError(f"{path} does not exist; give a DICOM folder, a .dcm, .nii(.gz) or .npy file")
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm") or name.endswith(".ima"):
        from m3d_edge.imaging.dicom import read_dicom

        volume = read_dicom(path, series_uid=series_uid, allow_gaps=allow_gaps)
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        from m3d_edge.imaging.nifti import read_nifti

        volume = read_nifti(path)
    elif name.endswith(".npy"):
        from m3d_edge.imaging.npy import read_npy

        volume = read_npy(path)
    else:
        raise ImagingError(f"{path}: unknown format; expected a DICOM folder, .dcm, .nii, .nii.gz or .npy")
    if require_ct:
        _check_ct(volume, path)
    return volume


def _check_ct(volume: Volume, path: Path) -> None:
    fmt = volume.meta.get("format")
    if fmt == "npy":
        volume.meta.setdefault("warnings", []).append("require_ct: a .npy is normalised; CT could not be checked")
        log.warning("%s: .npy input is already normalised; cannot check that it is CT", path)
        return
    if volume.modality != "CT":
        why = (f"DICOM Modality is {volume.modality!r}" if fmt == "dicom"
               else volume.meta.get("ct_check", f"modality {volume.modality!r}"))
        raise ImagingError(f"{path} is not a CT scan ({why}); this model reads CT in Hounsfield units — "
                           "give a CT series, or pass require_ct=False to run on it anyway")


def write_mask(mask: Volume, path: str | os.PathLike, *, like: Volume) -> Path:
    """Write a mask on the grid of `like` (the source scan): .nii/.nii.gz with the source's NIfTI header,
    .npy, or .dcm as a DICOM SEG (needs a DICOM source). A folder gets mask.nii.gz inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "mask.nii.gz"
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        from m3d_edge.imaging.nifti import write_mask as write_nifti_mask

        return write_nifti_mask(mask, path, like=like)
    if name.endswith(".dcm"):
        return write_dicom_seg(mask, path, source=like)
    if name.endswith(".npy"):
        from m3d_edge.imaging.npy import write_npy

        if mask.shape != like.shape:
            raise ImagingError(f"mask shape {mask.shape} differs from the source grid {like.shape}")
        return write_npy(mask, path, channel=False)
    raise ImagingError(f"{path}: write masks as .nii, .nii.gz, .npy or .dcm (DICOM SEG)")


def write_dicom_seg(mask: Volume, path: str | os.PathLike, *, source: Volume, **kwargs: Any) -> Path:
    """Mask on the source grid -> DICOM SEG file referencing the source series; see dicom_seg.write_dicom_seg."""
    from m3d_edge.imaging.dicom_seg import write_dicom_seg as _write

    return _write(mask, path, source=source, **kwargs)


def write_overlay(volume: Volume, path: str | os.PathLike, *, mask: Optional[Volume] = None,
                  boxes: Sequence[Sequence[int]] = (), **kwargs: Any) -> Path:
    """PNG of a few axial slices with the mask contour and voxel boxes; see overlay.write_overlay."""
    from m3d_edge.imaging.overlay import write_overlay as _write

    return _write(volume, path, mask=mask, boxes=boxes, **kwargs)


def write_series(volume: Volume, out_dir: str | os.PathLike, **kwargs: Any) -> list[Path]:
    """Volume (HU) -> CT DICOM series, one file per slice; see dicom.write_series."""
    from m3d_edge.imaging.dicom import write_series as _write

    return _write(volume, out_dir, **kwargs)


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Volume -> NIfTI (.nii/.nii.gz), RAS affine; see nifti.write_nifti."""
    from m3d_edge.imaging.nifti import write_nifti as _write

    return _write(volume, path, header=volume.meta.get("nifti_header"))
