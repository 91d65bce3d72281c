"""Readers and writers for the official M3D dataset layouts (spec §7): M3D-Cap, M3D-VQA, M3D-Seg, M3D-RefSeg.

All paths inside index files are relative, as in the official data, and all readers check that every file they
name exists (a missing file raises `M3DFileNotFoundError` naming it). Readers return frozen dataclasses; arrays
are loaded separately (`load_image`, `load_mask`) so that an index can be read without touching the images.

    <root>/                                   data_root of the official scripts
      M3D_Cap_npy/M3D_Cap.json                {"train"|"validation"|"test": [{"image": rel .npy, "text": rel .txt}]}
      M3D_Cap_npy/<group>/<case>/<series>.npy [1, 32, 256, 256] float32 in [0, 1]   (+ text.txt beside it)
      M3D-VQA/M3D_VQA_{train,val,test}.csv    Image Path (relative to root), Text, Question Type, Question,
                                              Choice A-D, Answer, Answer Choice
      M3D_Seg_npy/<code>/<code>.json          {"train"|"test": [{"image", "label"}], "dataset_info": [class names]}
      M3D_Seg_npy/<code>/<case>/image.npy     [1, 32, 256, 256] float32; masks/mask_<k>.npy [1, 32, 256, 256] uint8,
                                              or [1, 1, 1, 1] zeros when class k is absent
      M3D_RefSeg/<case>/ct.nii.gz, mask.nii.gz, text.json   (region id -> text)
      M3D_RefSeg/M3D_RefSeg.csv, M3D_RefSeg_test.csv        Image, Mask, Mask_ID, Question_Type, Question, Answer

Seg json entries are one (case, class) pair each, paths relative to `M3D_Seg_npy/`, which is what the official
`load_decathlon_datalist(base_dir=seg_data_path, ...)` expects; `dataset_info` is our addition (the official code
keeps the class lists in `dataset_info.py`; pass them to `read_seg(class_names=...)` for official files).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from m3d_edge.imaging.volume import Volume

IMAGE_SHAPE = (1, 32, 256, 256)  # (C, D, H, W)
EMPTY_MASK_SHAPE = (1, 1, 1, 1)

CAP_DIR = "M3D_Cap_npy"
CAP_INDEX = "M3D_Cap.json"
VQA_DIR = "M3D-VQA"
SEG_DIR = "M3D_Seg_npy"
REFSEG_DIR = "M3D_RefSeg"
CAP_SPLITS = ("train", "validation", "test")
VQA_SPLITS = ("train", "val", "test")
VQA_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")
REFSEG_COLUMNS = ("Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer")
REFSEG_FILES = {"train": "M3D_RefSeg.csv", "test": "M3D_RefSeg_test.csv", "val": "M3D_RefSeg_val.csv"}


class M3DFormatError(ValueError):
    """A file exists but does not follow the layout (wrong columns, shape, dtype, key)."""


class M3DFileNotFoundError(M3DFormatError, FileNotFoundError):
    """A file named by the layout or by an index is missing."""


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise M3DFileNotFoundError(f"{what} {path} does not exist; check the data root or regenerate the split")
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a UTF-8 text file through a temporary name, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------------------------------

def save_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a model-grid image: [1, 32, 256, 256] (a leading batch axis of 1 is dropped) float32 in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (1, *IMAGE_SHAPE):
        image = image[0]
    if image.shape != IMAGE_SHAPE:
        raise M3DFormatError(f"an M3D image has shape {IMAGE_SHAPE} (C, D, H, W); got {image.shape} for {path}")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise M3DFormatError(f"an M3D image holds values in [0, 1]; got [{image.min()}, {image.max()}] for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, image)
    return path


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read a model-grid image [1, 32, 256, 256] float32 and check its shape and range."""
    path = _require(Path(path), "image")
    image = np.load(path)
    if image.shape != IMAGE_SHAPE:
        raise M3DFormatError(f"{path}: expected shape {IMAGE_SHAPE} (C, D, H, W); got {image.shape}")
    return image.astype(np.float32, copy=False)


def save_mask(path: str | os.PathLike, mask: np.ndarray | None) -> Path:
    """Write a model-grid mask [1, 32, 256, 256] as uint8; an empty or None mask is stored as [1, 1, 1, 1] zeros
    (the official convention for an absent class)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask is None or not np.any(mask):
        np.save(path, np.zeros(EMPTY_MASK_SHAPE, np.uint8))
        return path
    mask = np.asarray(mask)
    if mask.shape == IMAGE_SHAPE[1:]:
        mask = mask[None]
    if mask.shape != IMAGE_SHAPE:
        raise M3DFormatError(f"an M3D mask is {IMAGE_SHAPE} or empty {EMPTY_MASK_SHAPE}; got {mask.shape} for {path}")
    np.save(path, (mask > 0).astype(np.uint8))
    return path


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a model-grid mask; an absent-class mask [1, 1, 1, 1] comes back as zeros [1, 32, 256, 256]."""
    path = _require(Path(path), "mask")
    mask = np.load(path)
    if mask.shape == EMPTY_MASK_SHAPE:
        return np.zeros(IMAGE_SHAPE, np.uint8)
    if mask.shape != IMAGE_SHAPE:
        raise M3DFormatError(f"{path}: expected a mask of shape {IMAGE_SHAPE} or {EMPTY_MASK_SHAPE}; got {mask.shape}")
    return (mask > 0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------------------
# M3D-Cap
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CapRecord:
    """One image-report pair; `image` and `text` are paths relative to the data root."""

    image: str
    text: str


@dataclass(frozen=True)
class CapItem:
    """A CapRecord resolved against the root, with the report text read."""

    record: CapRecord
    image_path: Path
    text_path: Path
    report: str


def cap_index_path(root: str | os.PathLike) -> Path:
    return Path(root) / CAP_DIR / CAP_INDEX


def write_cap_index(root: str | os.PathLike, splits: Mapping[str, Sequence[CapRecord]]) -> Path:
    """Write `M3D_Cap_npy/M3D_Cap.json` with one list of {"image", "text"} per split."""
    data = {name: [{"image": r.image, "text": r.text} for r in records] for name, records in splits.items()}
    return write_text(cap_index_path(root), json.dumps(data, indent=1))


def read_cap(root: str | os.PathLike, split: str) -> list[CapItem]:
    """Read one split of M3D_Cap.json; every image and text file must exist."""
    root = Path(root)
    index = _require(cap_index_path(root), "M3D-Cap index")
    data = json.loads(index.read_text(encoding="utf-8"))
    if split not in data:
        raise M3DFormatError(f"{index} has no split {split!r}; it has {sorted(data)}")
    items = []
    for row in data[split]:
        if set(row) < {"image", "text"}:
            raise M3DFormatError(f"{index}: entry {row!r} needs keys 'image' and 'text'")
        rec = CapRecord(row["image"], row["text"])
        image_path = _require(root / rec.image, "M3D-Cap image")
        text_path = _require(root / rec.text, "M3D-Cap report")
        items.append(CapItem(rec, image_path, text_path, text_path.read_text(encoding="utf-8")))
    return items


# ------------------------------------------------------------------------------------------------------------------
# M3D-VQA
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VQARecord:
    """One row of M3D_VQA_<split>.csv. image_path is relative to the data root; question_type 1-5 = plane,
    phase/window, organ, abnormality, location; answer_choice is the letter of `answer` among the choices."""

    image_path: str
    text: str
    question_type: int
    question: str
    choice_a: str
    choice_b: str
    choice_c: str
    choice_d: str
    answer: str
    answer_choice: str

    def row(self) -> list[str]:
        return [self.image_path, self.text, str(self.question_type), self.question, self.choice_a, self.choice_b,
                self.choice_c, self.choice_d, self.answer, self.answer_choice]


def vqa_path(root: str | os.PathLike, split: str) -> Path:
    if split not in VQA_SPLITS:
        raise M3DFormatError(f"VQA split must be one of {VQA_SPLITS}; got {split!r}")
    return Path(root) / VQA_DIR / f"M3D_VQA_{split}.csv"


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV table as text (built in memory, so a bad row fails before any file is touched)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def write_vqa(root: str | os.PathLike, split: str, records: Iterable[VQARecord]) -> Path:
    """Write M3D-VQA/M3D_VQA_<split>.csv with the official header."""
    def rows():
        for r in records:
            if r.answer_choice not in "ABCD" or len(r.answer_choice) != 1:
                raise M3DFormatError(f"answer choice {r.answer_choice!r} must be one letter A-D")
            yield r.row()

    return write_text(vqa_path(root, split), _csv_text(VQA_COLUMNS, rows()))


def _read_table(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """Rows of a CSV as (line number, {column: value}); the official columns must all be present, in any order
    (a pandas index column or other extra columns are ignored)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise M3DFormatError(f"{path}: columns {missing} are missing; the official columns are {list(columns)}")
        for n, row in enumerate(reader, start=2):
            if any(row.get(c) is None for c in columns):
                raise M3DFormatError(f"{path}:{n}: the row has fewer fields than the header")
            yield n, row


def _int(value: str, path: Path, n: int, column: str) -> int:
    try:
        return int(float(value))  # pandas may have written 1 as 1.0
    except ValueError as e:
        raise M3DFormatError(f"{path}:{n}: {column} must be an integer; got {value!r}") from e


def read_vqa(root: str | os.PathLike, split: str, *, check_images: bool = True, strict: bool = True
             ) -> list[VQARecord]:
    """Read M3D_VQA_<split>.csv; check the columns, (strict) that the answer is the text of its letter, and (by
    default) that every image exists."""
    root = Path(root)
    path = _require(vqa_path(root, split), "M3D-VQA table")
    out = []
    for n, row in _read_table(path, VQA_COLUMNS):
        rec = VQARecord(row["Image Path"], row["Text"], _int(row["Question Type"], path, n, "Question Type"),
                        row["Question"], row["Choice A"], row["Choice B"], row["Choice C"], row["Choice D"],
                        row["Answer"], row["Answer Choice"].strip())
        choices = {"A": rec.choice_a, "B": rec.choice_b, "C": rec.choice_c, "D": rec.choice_d}
        if strict and choices.get(rec.answer_choice, "").strip() != rec.answer.strip():
            raise M3DFormatError(f"{path}:{n}: answer {rec.answer!r} is not choice {rec.answer_choice!r} "
                                 "(pass strict=False to read such rows as they are)")
        if check_images:
            _require(root / rec.image_path, "M3D-VQA image")
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------------------------
# M3D-Seg (prepared layout)
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegItem:
    """One (case, class) entry of <code>.json: paths relative to M3D_Seg_npy, the class index k and its name."""

    code: str
    image: str
    label: str
    class_index: int
    class_name: str


def seg_index_path(root: str | os.PathLike, code: str) -> Path:
    return Path(root) / SEG_DIR / code / f"{code}.json"


def write_seg_case(root: str | os.PathLike, code: str, case: str, image: np.ndarray,
                   masks: Sequence[np.ndarray | None]) -> tuple[str, list[str]]:
    """Write <code>/<case>/image.npy and masks/mask_<k>.npy (k = class index); returns the relative paths."""
    base = Path(root) / SEG_DIR / code / case
    save_image(base / "image.npy", image)
    labels = []
    for k, m in enumerate(masks):
        save_mask(base / "masks" / f"mask_{k}.npy", m)
        labels.append(f"{code}/{case}/masks/mask_{k}.npy")
    return f"{code}/{case}/image.npy", labels


def write_seg_index(root: str | os.PathLike, code: str, class_names: Sequence[str],
                    splits: Mapping[str, Sequence[str]]) -> Path:
    """Write <code>/<code>.json: per split (e.g. "train", "test") one entry per case and class."""
    data: dict[str, object] = {"name": code, "dataset_info": list(class_names)}
    for split, cases in splits.items():
        data[split] = [{"image": f"{code}/{c}/image.npy", "label": f"{code}/{c}/masks/mask_{k}.npy"}
                       for c in cases for k in range(len(class_names))]
    return write_text(seg_index_path(root, code), json.dumps(data, indent=1))


def read_seg(root: str | os.PathLike, code: str, split: str, *, class_names: Sequence[str] | None = None
             ) -> list[SegItem]:
    """Read one split of <code>.json; every image and mask file must exist. Class names come from the json's
    `dataset_info` (ours) or from `class_names` (the official files keep them in dataset_info.py)."""
    base = Path(root) / SEG_DIR
    index = _require(seg_index_path(root, code), "M3D-Seg index")
    data = json.loads(index.read_text(encoding="utf-8"))
    if split not in data:
        raise M3DFormatError(f"{index} has no split {split!r}")
    names = list(class_names) if class_names is not None else data.get("dataset_info")
    if not isinstance(names, list):
        raise M3DFormatError(f"{index} has no 'dataset_info' class list (index k = mask_<k>.npy); pass "
                             "class_names= (for official data: dataset_info[code] from the official dataset_info.py)")
    out = []
    for row in data[split]:
        _require(base / row["image"], "M3D-Seg image")
        _require(base / row["label"], "M3D-Seg mask")
        k = int(Path(row["label"]).stem.split("_")[1])
        if not 0 <= k < len(names):
            raise M3DFormatError(f"{index}: mask index {k} of {row['label']} has no class name")
        out.append(SegItem(code, row["image"], row["label"], k, names[k]))
    return out


# ------------------------------------------------------------------------------------------------------------------
# M3D-RefSeg
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefSegRecord:
    """One row of M3D_RefSeg*.csv. image and mask are relative to M3D_RefSeg/; the target is mask == mask_id;
    question_type 0 = description, 1 = reasoning."""

    image: str
    mask: str
    mask_id: int
    question_type: int
    question: str
    answer: str


def write_refseg_case(root: str | os.PathLike, case: str, volume: Volume, regions: np.ndarray,
                      texts: Mapping[int, str]) -> tuple[str, str]:
    """Write <case>/ct.nii.gz (HU), mask.nii.gz (uint8 region ids on the same grid) and text.json."""
    from m3d_edge.imaging import write_nifti

    base = Path(root) / REFSEG_DIR / case
    base.mkdir(parents=True, exist_ok=True)
    write_nifti(volume, base / "ct.nii.gz")
    write_nifti(volume.with_array(np.asarray(regions, dtype=np.uint8)), base / "mask.nii.gz")
    write_text(base / "text.json", json.dumps({str(k): v for k, v in texts.items()}, indent=1))
    return f"{case}/ct.nii.gz", f"{case}/mask.nii.gz"


def refseg_path(root: str | os.PathLike, split: str) -> Path:
    if split not in REFSEG_FILES:
        raise M3DFormatError(f"RefSeg split must be one of {sorted(REFSEG_FILES)}; got {split!r}")
    return Path(root) / REFSEG_DIR / REFSEG_FILES[split]


def write_refseg(root: str | os.PathLike, split: str, records: Iterable[RefSegRecord]) -> Path:
    """Write M3D_RefSeg.csv (train), M3D_RefSeg_test.csv (test) or M3D_RefSeg_val.csv (ours)."""
    rows = ([r.image, r.mask, r.mask_id, r.question_type, r.question, r.answer] for r in records)
    return write_text(refseg_path(root, split), _csv_text(REFSEG_COLUMNS, rows))


def read_refseg(root: str | os.PathLike, split: str) -> list[RefSegRecord]:
    """Read a RefSeg CSV; image, mask and text.json of every row must exist."""
    base = Path(root) / REFSEG_DIR
    path = _require(refseg_path(root, split), "M3D-RefSeg table")
    out = []
    for n, row in _read_table(path, REFSEG_COLUMNS):
        rec = RefSegRecord(row["Image"], row["Mask"], _int(row["Mask_ID"], path, n, "Mask_ID"),
                           _int(row["Question_Type"], path, n, "Question_Type"), row["Question"], row["Answer"])
        _require(base / rec.image, "M3D-RefSeg scan")
        _require(base / rec.mask, "M3D-RefSeg mask")
        _require(base / Path(rec.image).parent / "text.json", "M3D-RefSeg text")
        out.append(rec)
    return out


def read_refseg_texts(root: str | os.PathLike, case: str) -> dict[int, str]:
    """text.json of a RefSeg case: region id -> text."""
    path = _require(Path(root) / REFSEG_DIR / case / "text.json", "M3D-RefSeg text")
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def load_refseg_volume(root: str | os.PathLike, rel: str) -> Volume:
    """Read a RefSeg ct.nii.gz or mask.nii.gz into a Volume (array z, y, x; LPS affine)."""
    from m3d_edge.imaging import read

    return read(_require(Path(root) / REFSEG_DIR / rel, "M3D-RefSeg NIfTI"))
