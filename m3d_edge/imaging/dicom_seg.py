"""Mask Volume -> DICOM Segmentation (SEG) referencing the source series, with highdicom.

highdicom builds the SEG IOD (frames, per-frame plane positions, referenced series, segment descriptions) and
checks it; we only line our mask up with the source DICOM files: the Volume's slices are sorted along the
normal, the source files (or the frames of one enhanced file) are listed in meta["files"] / meta["frame_numbers"]
in that same z order, so mask slice k belongs to meta["files"][k].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from m3d_edge.imaging.volume import ImagingError, Volume, atomic_output

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")  # default segmented property category
ORGAN = Code("91772007", "SCT", "Organ")  # default segmented property type


def write_dicom_seg(
    mask: Volume,
    path: str | os.PathLike,
    *,
    source: Volume,
    label: str = "M3D-Edge segmentation",
    property_category: Code = ANATOMICAL_STRUCTURE,
    property_type: Code = ORGAN,
    series_number: int = 300,
    software_version: str = "0.1.0",
    series_uid: Optional[str] = None,
) -> Path:
    """Write a binary mask (array [z, y, x] on the source grid, nonzero = inside) as one-segment DICOM SEG.

    `source` must come from `imaging.read` of a DICOM series (its meta lists the files). Empty slices are
    omitted from the SEG (highdicom's default); an all-empty mask is refused because a SEG needs a frame.
    """
    import highdicom as hd  # heavy, only for this writer

    if source.meta.get("format") != "dicom" or not source.meta.get("files"):
        raise ImagingError("a DICOM SEG must reference a DICOM source series; this source was read from "
                           f"{source.meta.get('format', 'memory')!r} — write the mask as NIfTI instead")
    if mask.shape != source.shape or not np.allclose(mask.affine, source.affine, atol=1e-4):
        raise ImagingError(f"mask grid {mask.shape} differs from the source grid {source.shape}; "
                           "map it back with Transform.invert_mask first")
    binary = np.asarray(mask.array) > 0  # [z, y, x]
    if not binary.any():
        raise ImagingError("the mask is empty; a DICOM SEG needs at least one segmented pixel")

    files = source.meta["files"]
    frames = source.meta.get("frame_numbers") or [None] * len(files)
    if len(set(files)) == 1 and frames[0] is not None:  # one enhanced multi-frame file: mask in file frame order
        datasets = [pydicom.dcmread(files[0])]
        pixel_array = np.zeros_like(binary)
        pixel_array[np.asarray(frames)] = binary
    else:
        datasets = [pydicom.dcmread(f) for f in files]  # in z order, one per mask slice
        pixel_array = binary

    algorithm = hd.AlgorithmIdentificationSequence(
        name="M3D-Edge", version=software_version, family=Code("123110", "DCM", "Artificial Intelligence"))
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=property_category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="M3D-Edge",
        manufacturer_model_name="M3D-Edge",
        software_versions=software_version,
        device_serial_number="0",
    )
    path = Path(path)
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return path
