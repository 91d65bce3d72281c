"""The official M3D .npy layout <-> Volume.

M3D-Cap / M3D-VQA / M3D-Seg images are `.npy` float arrays [1, 32, 256, 256] (C, D, H, W) min-max normalised to
[0, 1] (spec §7.1); [32, 256, 256] without the channel is accepted too, as is any other 3-D size. The file keeps
no geometry, so we assume one and say so:

    ASSUMED_SPACING_MM = (5.0, 1.0, 1.0) along (z, y, x); array axes increase towards S, P, L

i.e. z -> +S 5 mm, y -> +P 1 mm, x -> +L 1 mm with the origin at 0. The orientation is the one preprocess uses
as canonical, so an official .npy goes to the model untouched (no flips); the spacing gives a rough real-world
size (32 slices x 5 mm = 16 cm, a 256 mm field of view) so that millimetre boxes are plausible, not true.
meta["geometry"] = "assumed". modality is "OT": values are already normalised, so they cannot say whether this was CT.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from m3d_edge.imaging.volume import ImagingError, ImagingFileNotFoundError, Volume, atomic_output, axial_affine

ASSUMED_SPACING_MM = (5.0, 1.0, 1.0)  # (z, y, x)


def read_npy(path: str | os.PathLike) -> Volume:
    """Read an M3D .npy ([1, D, H, W] or [D, H, W]) into a Volume with the assumed geometry above."""
    path = Path(path)
    if not path.exists():
        raise ImagingFileNotFoundError(f"{path} does not exist; give an M3D .npy file")
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle: a .npy from elsewhere could run code
    except (ValueError, OSError, EOFError) as e:
        raise ImagingError(f"cannot read {path} as .npy ({e}); the file is truncated or not a numeric array") from e
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        raise ImagingError(f"{path} is a 2-D image (shape {data.shape}); the model needs a 3-D scan [D, H, W]")
    if data.ndim != 3:
        raise ImagingError(f"{path} has shape {data.shape}; expected [1, D, H, W] or [D, H, W] (the M3D layout)")
    if data.dtype.kind not in "biuf":
        raise ImagingError(f"{path} holds {data.dtype} values; expected a numeric image")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise ImagingError(f"{path} holds {n} NaN or infinite voxel(s); fix or fill them before inference")
    affine = axial_affine(ASSUMED_SPACING_MM)
    meta = {
        "format": "npy",
        "source": str(path),
        "geometry": "assumed",
        "warnings": [f".npy has no geometry: assumed spacing {ASSUMED_SPACING_MM} mm (z, y, x), axes towards S, P, L"],
    }
    return Volume(data, affine, "OT", meta)


def write_npy(volume: Volume, path: str | os.PathLike, *, channel: bool = True) -> Path:
    """Write the array as .npy, [1, D, H, W] (the official layout) or [D, H, W] with channel=False."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ImagingError(f"{path}: an .npy file name must end in .npy")
    arr = np.asarray(volume.array)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:  # np.save on a name would append .npy to the temporary path
            np.save(fh, arr[None] if channel else arr)
    return path
