"""The official M3D layouts: write then read gives the same records and arrays; missing files and wrong headers
raise errors that name the file; a phantom dataset reads back through the same readers."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from m3d_edge.data import m3d_formats as fmt
from m3d_edge.data import phantom as P
from m3d_edge.imaging.volume import Volume

from conftest import TOTALSEG as TEMPLATE


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(fmt.IMAGE_SHAPE, dtype=np.float32)


def _mask(seed: int) -> np.ndarray:
    m = np.zeros(fmt.IMAGE_SHAPE, np.uint8)
    m[0, 4 + seed:10 + seed, 30:60, 100:140] = 1
    return m


def test_image_and_mask_round_trip(tmp_path):
    img = _image(0)
    fmt.save_image(tmp_path / "a.npy", img[None])  # a leading batch axis of 1 is accepted
    assert np.array_equal(fmt.load_image(tmp_path / "a.npy"), img)
    fmt.save_mask(tmp_path / "m.npy", _mask(1))
    assert np.array_equal(fmt.load_mask(tmp_path / "m.npy"), _mask(1))
    fmt.save_mask(tmp_path / "e.npy", None)
    assert np.load(tmp_path / "e.npy").shape == fmt.EMPTY_MASK_SHAPE  # the official absent-class form
    assert not fmt.load_mask(tmp_path / "e.npy").any()
    with pytest.raises(fmt.M3DFormatError, match=r"\[0, 1\]"):
        fmt.save_image(tmp_path / "b.npy", img * 3)
    with pytest.raises(fmt.M3DFormatError, match="shape"):
        fmt.save_image(tmp_path / "c.npy", np.zeros((1, 16, 256, 256), np.float32))


def test_cap_round_trip_and_missing_file(tmp_path):
    recs = []
    for i in range(3):
        rel = f"{fmt.CAP_DIR}/ct_case/{i:04d}"
        fmt.save_image(tmp_path / rel / "axial.npy", _image(i))
        (tmp_path / rel / "text.txt").write_text(f"report {i}")
        recs.append(fmt.CapRecord(f"{rel}/axial.npy", f"{rel}/text.txt"))
    fmt.write_cap_index(tmp_path, {"train": recs[:2], "test": recs[2:]})
    items = fmt.read_cap(tmp_path, "train")
    assert [it.record for it in items] == recs[:2]
    assert [it.report for it in items] == ["report 0", "report 1"]
    assert np.array_equal(fmt.load_image(items[1].image_path), _image(1))
    with pytest.raises(fmt.M3DFormatError, match="no split 'validation'"):
        fmt.read_cap(tmp_path, "validation")
    (tmp_path / recs[2].image).unlink()
    with pytest.raises(FileNotFoundError, match="0002/axial.npy"):
        fmt.read_cap(tmp_path, "test")
    with pytest.raises(fmt.M3DFileNotFoundError, match="M3D_Cap.json"):
        fmt.read_cap(tmp_path / "nowhere", "train")


def test_vqa_round_trip_header_and_answer_check(tmp_path):
    fmt.save_image(tmp_path / "img.npy", _image(0))
    recs = [fmt.VQARecord("img.npy", "A report, with a comma.", t, f"Question {t}?", "a", "b", "c", "d",
                          "abcd"[t % 4], "ABCD"[t % 4]) for t in range(1, 6)]
    path = fmt.write_vqa(tmp_path, "val", recs)
    assert path.name == "M3D_VQA_val.csv"
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == fmt.VQA_COLUMNS
    assert fmt.read_vqa(tmp_path, "val") == recs
    bad = [fmt.VQARecord("img.npy", "r", 1, "q", "a", "b", "c", "d", "b", "A")]
    fmt.write_vqa(tmp_path, "test", bad)
    with pytest.raises(fmt.M3DFormatError, match="is not choice 'A'"):
        fmt.read_vqa(tmp_path, "test")
    path.write_text("Image,Text\nimg.npy,x\n")
    with pytest.raises(fmt.M3DFormatError, match="official columns"):
        fmt.read_vqa(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="M3D_VQA_train.csv"):
        fmt.read_vqa(tmp_path, "train")


def test_seg_round_trip_and_missing_mask(tmp_path):
    names = ["liver", "spleen", "lesion"]
    for i, case in enumerate(["c0", "c1"]):
        fmt.write_seg_case(tmp_path, "9000", case, _image(i), [_mask(i), None, _mask(i + 2)])
    fmt.write_seg_index(tmp_path, "9000", names, {"train": ["c0"], "test": ["c1"]})
    items = fmt.read_seg(tmp_path, "9000", "train")
    assert [(it.class_index, it.class_name) for it in items] == [(0, "liver"), (1, "spleen"), (2, "lesion")]
    base = tmp_path / fmt.SEG_DIR
    assert items[0].image == "9000/c0/image.npy" and items[2].label == "9000/c0/masks/mask_2.npy"
    assert np.array_equal(fmt.load_mask(base / items[0].label), _mask(0))
    assert not fmt.load_mask(base / items[1].label).any()
    assert np.array_equal(fmt.load_image(base / items[0].image), _image(0))
    (base / "9000/c1/masks/mask_1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="c1/masks/mask_1.npy"):
        fmt.read_seg(tmp_path, "9000", "test")


def test_refseg_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(12, 20, 24)).astype(np.int16)
    aff = np.array([[0, 0, 0.8, -100], [0, 0.8, 0, -80], [3, 0, 0, -300], [0, 0, 0, 1]], float)
    vol = Volume(arr, aff, "CT")
    regions = np.zeros(arr.shape, np.uint8)
    regions[3:6, 5:9, 5:9] = 1
    regions[7:9, 10:14, 2:6] = 2
    ct, mask = fmt.write_refseg_case(tmp_path, "s0001", vol, regions, {1: "a cyst", 2: "the spleen"})
    recs = [fmt.RefSegRecord(ct, mask, 1, 0, "Please segment the cyst.", "It is [SEG]."),
            fmt.RefSegRecord(ct, mask, 2, 1, "Which organ, with a comma?", "The spleen [SEG].")]
    fmt.write_refseg(tmp_path, "test", recs)
    assert fmt.read_refseg(tmp_path, "test") == recs
    assert fmt.read_refseg_texts(tmp_path, "s0001") == {1: "a cyst", 2: "the spleen"}
    back = fmt.load_refseg_volume(tmp_path, ct)
    assert np.array_equal(back.array, arr) and np.allclose(back.affine, aff, atol=1e-4)
    back_mask = fmt.load_refseg_volume(tmp_path, mask)
    assert np.array_equal(back_mask.array, regions)
    (tmp_path / fmt.REFSEG_DIR / "s0001" / "mask.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="s0001/mask.nii.gz"):
        fmt.read_refseg(tmp_path, "test")


def test_phantom_dataset_reads_back(tmp_path):
    out = P.synthesize(tmp_path / "ds", 3, 9, splits=(("train", 2), ("test", 1)), progress=False,
                       template_dir=TEMPLATE, n_scan_copies=0)
    train = fmt.read_cap(out, "train")
    assert len(train) == 2 and len(fmt.read_cap(out, "test")) == 1
    assert train[0].report == P.write_report(P.generate_case(9, 0, template_dir=TEMPLATE),
                                             np.random.default_rng([9, 0, 1]))
    x = fmt.load_image(train[0].image_path)
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
    vqa = fmt.read_vqa(out, "train")
    assert len(vqa) == 10 and {r.question_type for r in vqa} == {1, 2, 3, 4, 5}
    seg = fmt.read_seg(out, P.SEG_CODE, "train")
    assert len(seg) == 2 * len(P.SEG_CLASSES)
    liver = [it for it in seg if it.class_name == "liver"]
    case = P.generate_case(9, 0, template_dir=TEMPLATE)
    from m3d_edge.preprocess import to_model_input

    _, tf = to_model_input(case.volume, "ct")
    assert np.array_equal(fmt.load_mask(out / fmt.SEG_DIR / liver[0].label)[0], tf.mask_to_model(case.mask("liver")))
    refs = fmt.read_refseg(out, "train")
    assert refs and all("[SEG]" in r.answer for r in refs)
    regions = fmt.load_refseg_volume(out, refs[0].mask).array
    assert (regions == refs[0].mask_id).any()


def test_tables_as_pandas_writes_them(tmp_path):
    """An index column, another column order and 1.0 for 1 (pandas habits) still read; strict=False reads an
    answer that is not the text of its letter."""
    fmt.save_image(tmp_path / "img.npy", _image(0))
    path = fmt.vqa_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    cols = ["", *reversed(fmt.VQA_COLUMNS)]
    row = {"": "0", "Image Path": "img.npy", "Text": "t", "Question Type": "3.0", "Question": "q?",
           "Choice A": "a", "Choice B": "b", "Choice C": "c", "Choice D": "d", "Answer": "c ", "Answer Choice": "C"}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerow(row)
    (rec,) = fmt.read_vqa(tmp_path, "train")
    assert rec.question_type == 3 and rec.answer_choice == "C"
    row["Answer"] = "something else"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerow(row)
    with pytest.raises(fmt.M3DFormatError, match="strict=False"):
        fmt.read_vqa(tmp_path, "train")
    assert fmt.read_vqa(tmp_path, "train", strict=False)[0].answer == "something else"


def test_seg_index_without_class_list_needs_names(tmp_path):
    fmt.write_seg_case(tmp_path, "0003", "c0", _image(0), [_mask(0), None])
    index = fmt.seg_index_path(tmp_path, "0003")
    index.write_text('{"train": [{"image": "0003/c0/image.npy", "label": "0003/c0/masks/mask_1.npy"}]}')
    with pytest.raises(fmt.M3DFormatError, match="class_names="):
        fmt.read_seg(tmp_path, "0003", "train")
    (item,) = fmt.read_seg(tmp_path, "0003", "train", class_names=["liver", "kidney"])
    assert item.class_index == 1 and item.class_name == "kidney"
