"""DICOM series <-> Volume.

Reading: every file under a folder (or one file) is parsed with pydicom; files that are not DICOM are skipped
and counted. Image files are grouped by SeriesInstanceUID; one series is chosen (the caller's `series_uid`, else
the CT series with the most slices, else the series with the most slices) and the choice is logged and kept in
`meta`. Classic series (one slice per file) and enhanced multi-frame files (Enhanced CT/MR, geometry in the
functional groups) both become a list of frames, which are sorted by their position along the slice normal
(row cosine x column cosine) — never by file name or InstanceNumber, which scanners and anonymisers reorder.
Stored values become Hounsfield units (CT) or the modality's real values with RescaleSlope/Intercept, per frame.
Compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG lossless, RLE) decode through the pylibjpeg plugins.

Geometry checks (all recorded as text in meta["warnings"] and logged):
- gantry tilt (slice step not parallel to the normal): a warning. The affine's z column is the real step vector,
  so it is sheared and voxel -> patient stays exact; the model still sees slices as acquired.
- missing slices (a gap > 1.5x the median spacing): an ImagingError, because the array would silently join
  anatomy that is not adjacent. `allow_gaps=True` reads it anyway (warning; the affine then spans first to last
  slice evenly, and the positional error per slice is stated in the warning).
- uneven spacing (steps differ by more than 1 % of the median, no gap): a warning with the worst deviation.
- duplicate positions (several phases or echoes in one series): an ImagingError; pick one by SeriesInstanceUID.

Writing (`write_series`) makes a valid CT Image Storage series: int16 with RescaleSlope/Intercept, one file per
slice, ImagePositionPatient/ImageOrientationPatient/PixelSpacing from the affine, fresh UIDs. Each file is
written to a temporary name in the same folder and renamed.
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from m3d_edge.imaging.volume import ImagingError, ImagingFileNotFoundError, Volume, atomic_output, axial_affine

log = logging.getLogger(__name__)

GAP_FACTOR = 1.5  # a step larger than this times the median step means at least one slice is missing
UNEVEN_TOLERANCE = 0.01  # relative deviation of a step from the median that counts as uneven spacing
TILT_TOLERANCE_DEG = 0.1  # angle between slice step and slice normal above which we report a gantry tilt


@dataclass(frozen=True)
class _Frame:
    """One 2-D image of a series: where it comes from and where it lies. Positions and cosines in LPS mm."""

    path: Path
    frame: Optional[int]  # index inside a multi-frame file, None for a single-frame file
    position: Optional[np.ndarray]  # [3] ImagePositionPatient: centre of the first transmitted pixel
    orientation: Optional[np.ndarray]  # [6] row cosine (along a row, column index grows), column cosine
    pixel_spacing: Optional[tuple[float, float]]  # (between rows, between columns) mm
    slope: float
    intercept: float
    instance_number: int


# ---------------------------------------------------------------------------------------------------- reading


def read_dicom(path: str | os.PathLike, *, series_uid: Optional[str] = None, allow_gaps: bool = False) -> Volume:
    """Read one DICOM series (a folder, searched recursively, or a single file) into a Volume.

    Returns array [z, y, x] (slices sorted along the normal, rows, columns) in HU for CT (int16 when every
    rescale is integral and fits, else float32) and the affine (z, y, x, 1) -> LPS mm.
    """
    path = Path(path)
    if not path.exists():
        raise ImagingFileNotFoundError(f"{path} does not exist; give a DICOM folder or a .dcm file")
    if path.is_file():
        files = [path]
    else:  # hidden files are editor/OS litter (.DS_Store), never slices
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImagingError(f"folder {path} is empty; point to the folder that holds the DICOM files of the series")

    headers, not_dicom = _read_headers(files)
    if not headers:
        shown = ", ".join(p.name for p in not_dicom[:5]) + (" ..." if len(not_dicom) > 5 else "")
        raise ImagingError(
            f"no DICOM image files in {path}: {len(not_dicom)} file(s) could not be read as DICOM ({shown}); "
            "check the folder, or convert the scan to DICOM or NIfTI"
        )
    series = _group_by_series(headers)
    uid, reason = _choose_series(series, series_uid, path)
    chosen = series[uid]
    log.info("%s: using series %s (%s)", path, uid, reason)

    frames = _frames(chosen)
    warnings: list[str] = []
    frames, affine = _sort_and_place(frames, chosen[0][1], warnings, allow_gaps, path)
    array = _pixels(frames, path)
    for w in warnings:
        log.warning("%s: %s", path, w)

    first = chosen[0][1]
    meta: dict[str, Any] = {
        "format": "dicom",
        "source": str(path),
        "series_uid": uid,
        "series_choice": reason,
        "available_series": [_describe(u, s) for u, s in series.items()],
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "files": [str(f.path) for f in frames],  # in z order; a multi-frame file repeats
        "frame_numbers": [f.frame for f in frames],  # 0-based frame in its file (None: single-frame file)
        "skipped_non_dicom": len(not_dicom),
        "warnings": warnings,
    }
    return Volume(array, affine, str(first.get("Modality", "OT")), meta)


def _read_headers(files: Sequence[Path]) -> tuple[list[tuple[Path, Dataset]], list[Path]]:
    """Parse every file's header; keep image files, count non-DICOM files, raise on damaged DICOM files."""
    headers, not_dicom = [], []
    for f in files:
        if f.name.upper() == "DICOMDIR":
            continue
        try:
            # defer_size: large values (the pixels) are not loaded, but their tags are seen, so a file cut
            # before its pixel data can be told from a complete one
            ds = pydicom.dcmread(f, defer_size=1024)
        except InvalidDicomError:
            not_dicom.append(f)
            continue
        except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise ImagingError(f"{f} is a damaged or truncated DICOM file ({e}); "
                               "copy it again from the scanner or PACS") from e
        sop_class = ds.get("SOPClassUID")
        is_image_class = sop_class is not None and "Image" in getattr(sop_class, "name", "")
        if "PixelData" in ds and "Rows" in ds:
            headers.append((f, ds))
        elif "Rows" in ds or is_image_class or (sop_class is None and _has_dicm_prefix(f)):
            raise ImagingError(f"{f} is a truncated DICOM file (its header or pixel data is cut short); "
                               "copy it again from the scanner or PACS, or remove it from the folder")
        elif sop_class is None:
            not_dicom.append(f)  # parsed as DICOM but holds nothing DICOM-like
        # else: a complete non-image object (structured report, presentation state, ...): not part of a volume
    return headers, not_dicom


def _has_dicm_prefix(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _group_by_series(headers: list[tuple[Path, Dataset]]) -> dict[str, list[tuple[Path, Dataset]]]:
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    return series


def _n_frames(items: list[tuple[Path, Dataset]]) -> int:
    return sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in items)


def _describe(uid: str, items: list[tuple[Path, Dataset]]) -> dict[str, Any]:
    ds = items[0][1]
    return {
        "series_uid": uid,
        "modality": str(ds.get("Modality", "")),
        "slices": _n_frames(items),
        "description": str(ds.get("SeriesDescription", "")),
    }


def _choose_series(series: dict, series_uid: Optional[str], path: Path) -> tuple[str, str]:
    listing = "; ".join(f"{d['series_uid']} ({d['modality']}, {d['slices']} slices, {d['description']!r})"
                        for d in (_describe(u, s) for u, s in series.items()))
    if series_uid is not None:
        if series_uid not in series:
            raise ImagingError(f"series {series_uid} is not in {path}; the folder holds: {listing}")
        return series_uid, "requested by the caller"
    if len(series) == 1:
        return next(iter(series)), "the only series"
    ct = {u: s for u, s in series.items() if str(s[0][1].get("Modality", "")) == "CT"}
    pool = ct or series
    uid = max(pool, key=lambda u: _n_frames(pool[u]))
    kind = "CT series" if ct else "series (no CT series present)"
    return uid, f"the {kind} with most slices ({_n_frames(pool[uid])}) of {len(series)} series: {listing}"


def _floats(value: Any, n: int) -> Optional[np.ndarray]:
    if value is None:
        return None
    arr = np.array([float(v) for v in value], dtype=np.float64)
    return arr if arr.shape == (n,) else None


def _frames(items: list[tuple[Path, Dataset]]) -> list[_Frame]:
    multi = [(f, ds) for f, ds in items
             if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(items) > 1:
        raise ImagingError(
            f"series mixes {len(multi)} multi-frame file(s) with {len(items) - len(multi)} other file(s) "
            f"({items[0][0].parent}); pass one multi-frame file directly"
        )
    if multi:
        return _enhanced_frames(*multi[0])
    frames = []
    for f, ds in items:
        spacing = _floats(ds.get("PixelSpacing"), 2)
        frames.append(_Frame(
            path=f, frame=None,
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            instance_number=int(ds.get("InstanceNumber", 0) or 0),
        ))
    return frames


def _group_value(ds: Dataset, per_frame: Optional[Dataset], seq: str, keyword: str) -> Any:
    """A functional-group attribute: the per-frame item wins over the shared item (DICOM PS3.3 C.7.6.16)."""
    for group in (per_frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if group is not None and seq in group and len(group[seq].value) and keyword in group[seq][0]:
            return group[seq][0][keyword].value
    return None


def _enhanced_frames(f: Path, ds: Dataset) -> list[_Frame]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * n
    frames = []
    for i in range(n):
        pf = per_frame[i] if i < len(per_frame) else None
        spacing = _floats(_group_value(ds, pf, "PixelMeasuresSequence", "PixelSpacing"), 2)
        frames.append(_Frame(
            path=f, frame=i,
            position=_floats(_group_value(ds, pf, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_group_value(ds, pf, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
            slope=_rescale(ds, pf, "RescaleSlope", 1.0),
            intercept=_rescale(ds, pf, "RescaleIntercept", 0.0),
            instance_number=i,
        ))
    return frames


def _rescale(ds: Dataset, per_frame: Optional[Dataset], keyword: str, default: float) -> float:
    """Rescale slope or intercept of a frame: the functional groups, else the top-level attribute."""
    value = _group_value(ds, per_frame, "PixelValueTransformationSequence", keyword)
    if value is None:
        value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def _sort_and_place(frames: list[_Frame], ds: Dataset, warnings: list[str], allow_gaps: bool,
                    path: Path) -> tuple[list[_Frame], np.ndarray]:
    """Sort frames along the slice normal and build the (z, y, x, 1) -> LPS affine; fill `warnings`."""
    if any(f.position is None or f.orientation is None for f in frames):
        return _place_without_geometry(frames, ds, warnings)
    orient = frames[0].orientation
    if any(np.abs(f.orientation - orient).max() > 1e-3 for f in frames):
        raise ImagingError(f"slices in {path} have different ImageOrientationPatient (a localizer or a reformat "
                           "mixed in); choose one series with series_uid=...")
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    frames = sorted(frames, key=lambda f: float(f.position @ normal))
    positions = np.stack([f.position for f in frames])  # [N, 3] LPS mm
    row_spacing, col_spacing = frames[0].pixel_spacing or (1.0, 1.0)
    if frames[0].pixel_spacing is None:
        warnings.append("no PixelSpacing: assumed 1 mm x 1 mm in-plane")

    affine = np.eye(4)
    affine[:3, 1] = col_cos * row_spacing  # y = row index: moves down a column
    affine[:3, 2] = row_cos * col_spacing  # x = column index: moves along a row
    affine[:3, 3] = positions[0]
    if len(frames) == 1:
        thickness = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        affine[:3, 0] = normal * thickness
        warnings.append(f"single slice: slice spacing taken as {thickness:g} mm from the header")
        return frames, affine

    steps = np.diff(positions @ normal)  # [N-1] mm along the normal
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise ImagingError(
            f"two slices of {path} share position {positions[k + 1].round(2).tolist()} mm ({frames[k].path.name}, "
            f"{frames[k + 1].path.name}): the series holds several phases or echoes; pick one with series_uid=... "
            "or split the folder"
        )
    median = float(np.median(steps))
    step = (positions[-1] - positions[0]) / (len(frames) - 1)  # the affine's z column: both end slices exact
    affine[:3, 0] = step
    # how far the real slice positions are from the evenly spaced ones the affine implies
    deviation = float(np.abs(positions - (positions[0] + np.arange(len(frames))[:, None] * step)).max())
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        where = [(frames[i].path.name, round(float(steps[i]), 3)) for i in gaps[:5]]
        text = (f"missing slices: {gaps.size} gap(s) larger than {GAP_FACTOR}x the median spacing {median:.3f} mm "
                f"(after file, step mm): {where}")
        if not allow_gaps:
            raise ImagingError(f"{path}: {text}; the array would join anatomy that is not adjacent. Re-export the "
                               "complete series, or pass allow_gaps=True to read it with an approximate z axis")
        warnings.append(f"{text}; slice positions are off the affine by up to {deviation:.3f} mm")
    elif np.abs(steps - median).max() > UNEVEN_TOLERANCE * median:
        warnings.append(f"uneven slice spacing: steps {steps.min():.3f}..{steps.max():.3f} mm, median {median:.3f} mm; "
                        f"slice positions are off the affine by up to {deviation:.3f} mm")
    elif deviation > UNEVEN_TOLERANCE * median:  # even along the normal, but slices shifted in-plane
        warnings.append(f"slice positions are off an even grid by up to {deviation:.3f} mm (in-plane shifts)")
    tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), 0.0, 1.0))))
    if tilt > TILT_TOLERANCE_DEG:
        warnings.append(f"gantry tilt {tilt:.2f} deg: slices are sheared; the affine keeps the exact positions")
    return frames, affine


def _place_without_geometry(frames: list[_Frame], ds: Dataset, warnings: list[str]) -> tuple[list[_Frame], np.ndarray]:
    """No ImagePositionPatient/ImageOrientationPatient (e.g. a stripped enhanced file): keep order, assume axes."""
    frames = sorted(frames, key=lambda f: (f.instance_number, f.frame or 0))
    row_spacing, col_spacing = frames[0].pixel_spacing or (1.0, 1.0)
    dz = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    warnings.append(
        f"no patient geometry in the header: assumed an axial grid (slices feet to head, rows anterior to "
        f"posterior, columns right to left), pixel spacing {row_spacing:g} x {col_spacing:g} mm, "
        f"slice spacing {dz:g} mm, slices in stored order; patient coordinates are not meaningful"
    )
    return frames, axial_affine((dz, row_spacing, col_spacing))


def _pixels(frames: list[_Frame], path: Path) -> np.ndarray:
    """Decode every frame and apply its rescale: [N, rows, cols] in HU (CT) or real-world values."""
    cache: dict[Path, np.ndarray] = {}
    slices = []
    for f in frames:
        if f.path not in cache:
            cache.clear()  # keep one decoded file in memory at a time (multi-frame files repeat)
            cache[f.path] = _decode(f.path)
        data = cache[f.path]
        slices.append(data[f.frame] if f.frame is not None else data)
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise ImagingError(f"slices in {path} have different sizes {sorted(shapes)}; "
                           "choose one series with series_uid=...")
    stored = np.stack(slices)  # [N, rows, cols] stored values
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    # the value range over all slices, whatever the sign of each slope
    ends = np.outer([float(stored.min()), float(stored.max())], slopes) + intercepts
    lo, hi = float(ends.min()), float(ends.max())
    dtype = np.int16 if integral and -32768 <= lo and hi <= 32767 else np.float32
    # the arithmetic runs in float64/int32 and is cast once, so no stored value wraps around
    out = stored.astype(np.float64 if dtype == np.float32 else np.int32)
    out = out * slopes[:, None, None].astype(out.dtype) + intercepts[:, None, None].astype(out.dtype)
    return out.astype(dtype)


def _decode(f: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
    except (EOFError, OSError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise ImagingError(
            f"cannot decode the pixels of {f} ({type(e).__name__}: {e}); the file is truncated or damaged, or its "
            "compression needs a plugin: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"
        ) from e
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImagingError(f"{f} is a colour image ({ds.get('PhotometricInterpretation')}); "
                           "a CT or MR series is greyscale")
    return arr  # [rows, cols] or [frames, rows, cols]


# ---------------------------------------------------------------------------------------------------- writing


def write_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    frame_of_reference_uid: Optional[str] = None,
    patient_id: str = "M3D-EDGE-PHANTOM",
    patient_name: str = "Phantom^M3D",
    series_description: str = "M3D-Edge",
    series_number: int = 1,
    prefix: str = "IM",
) -> list[Path]:
    """Write `volume` (array [z, y, x] in HU, LPS affine) as a CT Image Storage series, one file per slice.

    Pixels are int16: exact (slope 1, intercept 0) when every value is an integer in int16 range, else scaled
    linearly over the value range (lossy, at most half a step). Files are named `<prefix>NNNN.dcm` in z order.
    Reading the folder back gives the same array and affine when the z step points along row x column
    cosine (true for volumes read from DICOM or reoriented to LPS-like codes); otherwise the slice order comes
    back reversed, with an affine that still maps every voxel to the same place. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(volume.array)
    if not np.all(np.isfinite(arr)):
        raise ImagingError("volume holds NaN or infinite values; DICOM stores integers — fill them first")
    aff = volume.affine
    col_spacing, row_spacing = np.linalg.norm(aff[:3, 2]), np.linalg.norm(aff[:3, 1])
    row_cos, col_cos = aff[:3, 2] / col_spacing, aff[:3, 1] / row_spacing
    if abs(row_cos @ col_cos) > 1e-4:
        raise ImagingError("the volume's y and x axes are not orthogonal; DICOM cannot store a sheared slice plane")

    slope, intercept, stored = _to_int16(arr)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime.now()
    paths = []
    normal = np.cross(row_cos, col_cos)
    for k in range(arr.shape[0]):
        position = aff[:3, :3] @ np.array([k, 0.0, 0.0]) + aff[:3, 3]
        ds = _ct_slice_dataset(stored[k], position, row_cos, col_cos, (row_spacing, col_spacing),
                               float(np.linalg.norm(aff[:3, 0])), slope, intercept)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, series_number, k + 1
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.SliceLocation = float(position @ normal)
        path = out_dir / f"{prefix}{k + 1:04d}.dcm"
        with atomic_output(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _to_int16(arr: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(slope, intercept, int16 stored values) with value = stored * slope + intercept."""
    lo, hi = float(arr.min()), float(arr.max())
    if np.all(arr == np.round(arr)) and lo >= -32768 and hi <= 32767:
        return 1.0, 0.0, arr.astype(np.int16)
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    intercept = lo + 32768.0 * slope
    stored = np.clip(np.round((arr - intercept) / slope), -32768, 32767).astype(np.int16)
    return slope, intercept, stored


def _ct_slice_dataset(pixels: np.ndarray, position: np.ndarray, row_cos: np.ndarray, col_cos: np.ndarray,
                      spacing: tuple[float, float], thickness: float, slope: float, intercept: float) -> Dataset:
    """The CT Image Storage attributes of one slice (type 1 and 2 of the CT Image IOD, PS3.3 A.3)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "M3D-Edge"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.ReferringPhysicianName, ds.AccessionNumber, ds.StudyID = "", "", "1"
    ds.PositionReferenceIndicator, ds.KVP, ds.AcquisitionNumber, ds.PatientOrientation = "", "", 1, ""
    fmt = lambda v: [f"{x:.6f}" for x in v]  # DS values are at most 16 characters
    ds.ImagePositionPatient = fmt(position)
    ds.ImageOrientationPatient = fmt(np.concatenate([row_cos, col_cos]))
    ds.PixelSpacing = fmt(spacing)
    ds.SliceThickness = f"{thickness:.6f}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:.10g}", f"{slope:.10g}", "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
