"""Volume: the one in-memory image type of the project.

`array` is indexed (z, y, x) — slice, row, column for an axial DICOM series. `affine` maps the homogeneous array
index (z, y, x, 1) to patient coordinates in millimetres in the DICOM LPS convention (+x towards the patient's
left, +y posterior, +z towards the head). CT arrays hold Hounsfield units. `meta` carries what the reader knew
about the source (file paths, SeriesInstanceUID, warnings) and is never needed for the numbers.

Beside the type live the few things every reader and writer shares: `ImagingError` (bad input, with the fix in
the message), `atomic_output` (write to a temporary file, then rename) and the orientation helpers (`axis_codes`,
`reorientation`, `reorient_array`, ...), which are numpy only so that preprocess can use them without nibabel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Direction each LPS axis points to when positive / negative (x, y, z of the patient frame).
_POSITIVE = "LPS"
_NEGATIVE = "RAI"


class ImagingError(ValueError):
    """Bad or unsupported image input or output. The message names the file, what was expected and the fix."""


class ImagingFileNotFoundError(ImagingError, FileNotFoundError):
    """The path given to a reader does not exist."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is an atomic rename on one file
    system: a reader never sees a half-written file, and a failing writer leaves nothing behind.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ImagingFileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    # keep the real suffix (.nii.gz, .png) at the end: some writers pick the format from it
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".part{suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def axis_codes(affine: np.ndarray) -> str:
    """Three letters: the patient direction each array axis (z, y, x) increases towards, e.g. "SPL".

    Letters are those of nibabel.orientations.aff2axcodes (L/R, P/A, S/I). We compute them here rather than
    call nibabel because preprocess.py (numpy only) needs them too. For an oblique grid each array axis gets
    the patient axis its direction cosine is closest to, assigned greedily by largest |cosine| so that no
    patient axis is used twice (nibabel's io_orientation gives the same answer for non-degenerate grids).
    """
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    cos = rot / np.linalg.norm(rot, axis=0)  # [patient axis, array axis]
    free = np.abs(cos).copy()
    codes = [""] * 3
    for _ in range(3):
        k, j = np.unravel_index(np.argmax(free), free.shape)
        codes[j] = _POSITIVE[k] if cos[k, j] > 0 else _NEGATIVE[k]
        free[k, :] = -1.0
        free[:, j] = -1.0
    return "".join(codes)


def axial_affine(spacing_zyx: tuple[float, float, float],
                 origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine of an axial grid with codes "SPL": z -> +S, y (rows) -> +P, x (columns) -> +L; spacing in mm."""
    dz, dy, dx = spacing_zyx
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = dz, dy, dx  # LPS rows (x, y, z) of the patient frame
    affine[:3, 3] = origin_lps
    affine[3, 3] = 1.0
    return affine


def reorientation(affine: np.ndarray, target: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(perm, flips) that bring an array with this affine to the axis codes `target` (e.g. "SPL").

    The reoriented array is `np.transpose(a, perm)` then flipped along every axis i with flips[i].
    """
    target = target.upper()
    patient_axis = {letter: k for k, pair in enumerate(zip(_POSITIVE, _NEGATIVE)) for letter in pair}
    opposite = {a: b for a, b in zip(_POSITIVE + _NEGATIVE, _NEGATIVE + _POSITIVE)}
    if len(target) != 3 or sorted(patient_axis.get(t, -1) for t in target) != [0, 1, 2]:
        raise ValueError(f"orientation {target!r} must name each patient axis once, e.g. 'SPL' or 'LPS'")
    codes = axis_codes(affine)
    perm = tuple(codes.index(t) if t in codes else codes.index(opposite[t]) for t in target)
    flips = tuple(codes[j] != t for j, t in zip(perm, target))
    return perm, flips  # type: ignore[return-value]


def reorient_array(array: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """Apply (perm, flips) from `reorientation` to an array (a view, no copy)."""
    out = np.transpose(array, perm)
    for i, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=i)
    return out


def unreorient_array(array: np.ndarray, perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """Inverse of `reorient_array`: undo the flips, then the transpose."""
    out = array
    for i, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=i)
    return np.transpose(out, np.argsort(perm))


def reorient_index_matrix(shape: tuple[int, ...], perm: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """4x4 M with source index (z, y, x, 1) = M @ reoriented index (c0, c1, c2, 1); `shape` is the source shape."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for i, (j, f) in enumerate(zip(perm, flips)):
        m[j, i] = -1.0 if f else 1.0
        m[j, 3] = shape[j] - 1 if f else 0.0
    return m


@dataclass(frozen=True, eq=False)
class Volume:
    array: np.ndarray  # [Z, Y, X]
    affine: np.ndarray  # [4, 4], (z, y, x, 1) -> LPS mm
    modality: str = "CT"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"a Volume needs a 3-D array (z, y, x); got shape {arr.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"a Volume affine must be 4x4; got {aff.shape}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError("a Volume affine must be invertible (zero voxel spacing?)")
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "affine", aff)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (z, y, x)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """Same grid and modality, another array (a mask, a filtered image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume grid {self.array.shape}")
        return Volume(array, self.affine.copy(), self.modality, {**self.meta, **meta})

    def orientation(self) -> str:
        """Axis codes of (z, y, x), e.g. "SPL" for an axial series sorted feet to head (see `axis_codes`)."""
        return axis_codes(self.affine)

    def reoriented(self, target: str) -> "Volume":
        """The same image with its array axes brought to `target` codes (a permutation and flips, no resampling)."""
        perm, flips = reorientation(self.affine, target)
        array = np.ascontiguousarray(reorient_array(self.array, perm, flips))
        affine = self.affine @ reorient_index_matrix(self.shape, perm, flips)
        return Volume(array, affine, self.modality, dict(self.meta))

    def voxel_to_patient(self, zyx: np.ndarray) -> np.ndarray:
        """[..., 3] voxel indices (z, y, x) -> [..., 3] LPS mm."""
        zyx = np.asarray(zyx, dtype=np.float64)
        return zyx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """[..., 3] LPS mm -> [..., 3] fractional voxel indices (z, y, x)."""
        inv = np.linalg.inv(self.affine)
        lps = np.asarray(lps, dtype=np.float64)
        return lps @ inv[:3, :3].T + inv[:3, 3]
