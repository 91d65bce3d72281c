"""Answer: what the runtime gives back for one question about one volume (the one answer type of the project)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from m3d_edge.imaging.volume import Volume


@dataclass(frozen=True)
class Box:
    """One box (one the model wrote, or the one around a [SEG] mask), in three frames.

    normalized: the official text values [d0, h0, w0, d1, h1, w1] on the 32x256x256 model grid (spec §7.3)
    voxels:     inclusive (z0, y0, x0, z1, y1, x1) indices in the source volume
    patient_mm: [[x, y, z], [x, y, z]] LPS mm of the two corner voxel centres
    """

    normalized: tuple[float, ...]
    voxels: tuple[int, ...]
    patient_mm: tuple[tuple[float, float, float], tuple[float, float, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"normalized": list(self.normalized), "voxels": list(self.voxels),
                "patient_mm": [list(c) for c in self.patient_mm]}


@dataclass(frozen=True)
class Answer:
    question: str
    text: str  # decoded without the box markers, [SEG] kept (as the official decode)
    token_ids: tuple[int, ...]
    boxes: tuple[Box, ...] = ()
    mask: Optional[Volume] = None  # uint8 on the source grid, present only when [SEG] was generated
    # the box around the mask, taken on the model grid (None: no mask, or an empty one); the model did not write
    # it, so it is kept apart from `boxes` (docs/runtime.md "Boxes")
    mask_box: Optional[Box] = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (0.0: reused from the scan cache)
    stop_reason: str = "stop"  # "stop" (an end token) or "length" (max_new_tokens or the context ran out)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the mask itself is written as a file, here only its size)."""
        out: dict[str, Any] = {"question": self.question, "text": self.text, "boxes": [b.to_dict() for b in self.boxes],
                               "new_tokens": len(self.token_ids), "stop_reason": self.stop_reason,
                               "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}
        if self.mask is not None:
            voxels = int(np.count_nonzero(self.mask.array))
            out["mask"] = {"voxels": voxels, "volume_ml": round(voxels * float(np.prod(self.mask.spacing)) / 1000, 2),
                           "box": self.mask_box.to_dict() if self.mask_box is not None else None}
        return out


def write_answer(answer: Answer, out_dir: str | Path, *, source: Volume, stem: str) -> dict[str, str]:
    """Write what an answer holds next to each other in `out_dir` (which must exist); returns {kind: path}.

    `{stem}.json` always (Answer.to_dict plus the paths below); with a mask `{stem}-mask.nii.gz` on the source grid
    (and its NIfTI header when the source was NIfTI), `{stem}-seg.dcm` (DICOM SEG referencing the series) when the
    source was read from DICOM; `{stem}-overlay.png` when there is a mask or a box to show. Every file is written
    atomically by the imaging writers.
    """
    from m3d_edge import imaging  # matplotlib / highdicom are only loaded when something is written

    out = Path(out_dir)
    files: dict[str, str] = {}
    if answer.mask is not None:
        files["mask"] = str(imaging.write_mask(answer.mask, out / f"{stem}-mask.nii.gz", like=source))
        if source.meta.get("format") == "dicom":
            files["dicom_seg"] = str(imaging.write_dicom_seg(answer.mask, out / f"{stem}-seg.dcm", source=source))
    if answer.mask is not None or answer.boxes:
        files["overlay"] = str(imaging.write_overlay(source, out / f"{stem}-overlay.png", mask=answer.mask,
                                                     boxes=[b.voxels for b in answer.boxes], title=answer.question))
    record = {**answer.to_dict(), "files": files}
    json_path = out / f"{stem}.json"
    tmp = json_path.with_name(f".{json_path.name}.part")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(json_path)
    files["json"] = str(json_path)
    return files
