"""Volume: the one in-memory image type of the project.

`array` is indexed (z, y, x) — slice, row, column for an axial DICOM series. `affine` maps the homogeneous array
index (z, y, x, 1) to patient coordinates in millimetres in the DICOM LPS convention (+x towards the patient's
left, +y posterior, +z towards the head). CT arrays hold Hounsfield units. `meta` carries what the reader knew
about the source (file paths, SeriesInstanceUID, warnings) and is never needed for the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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

    def voxel_to_patient(self, zyx: np.ndarray) -> np.ndarray:
        """[..., 3] voxel indices (z, y, x) -> [..., 3] LPS mm."""
        zyx = np.asarray(zyx, dtype=np.float64)
        return zyx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """[..., 3] LPS mm -> [..., 3] fractional voxel indices (z, y, x)."""
        inv = np.linalg.inv(self.affine)
        lps = np.asarray(lps, dtype=np.float64)
        return lps @ inv[:3, :3].T + inv[:3, 3]
