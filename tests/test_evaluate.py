"""The held-out evaluation behind the model cards: how it sums rows up (hand-computed answers), and the `eval`
command on the committed default model and phantoms of a seed it was never trained on."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from m3d_edge.bench.evaluate import mask_box_scores, summarise
from m3d_edge.cli import main
from m3d_edge.data import phantom as P
from m3d_edge.data.phantom import KEY_ORGANS

from conftest import ROOT, TOTALSEG


def test_summarise_scores_rows_with_hand_computed_answers():
    rows = [
        {"task": "vqa_closed", "output": "Liver. Choice B.", "target": "B", "answer": "B. Liver"},
        {"task": "vqa_closed", "output": "Spleen. Choice A.", "target": "B", "answer": "B. Liver"},
        {"task": "vqa_closed", "output": "Liver. Choice C.", "target": "C", "answer": "C. Liver"},
        {"task": "seg", "target": "liver", "dice": 0.9, "soft_dice": 0.8},
        {"task": "seg", "target": "liver", "dice": 0.7, "soft_dice": 0.6},
        {"task": "seg", "target": "spleen", "dice": 0.2, "soft_dice": 0.4},
        {"task": "rec", "iou": 0.5, "true_iou": 0.25},
        {"task": "rec", "iou": -1.0, "true_iou": 0.0},  # no box parsed: -1, as the official script
        {"task": "rec"},  # no box to find ("there is no urinary bladder here"): not scored
    ]
    s = summarise(rows)
    assert s["vqa_closed"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "majority_baseline": pytest.approx(2 / 3)}
    assert s["seg"]["dice"] == pytest.approx(0.6) and s["seg"]["soft_dice"] == pytest.approx(0.6)
    assert s["seg"]["dice_per_organ"] == {"liver": pytest.approx(0.8), "spleen": pytest.approx(0.2)}
    assert s["rec"] == {"n": 3, "mean_iou_official": 0.25, "mean_iou": 0.125, "parse_rate": 0.5}


def test_mask_box_scores_against_hand_computed_boxes():
    """The box around a predicted mask against the target's: on an 8x32x32 grid the target spans z 0-4, y and x
    4-12 (box [0, .125, .125, .5, .375, .375]), the prediction y and x 8-16: overlap .125 x .125 x .5 of two boxes
    of .25 x .25 x .5, true IoU 1/7; the official score divides by the enclosing box (.375 x .375 x .5): 1/9."""
    target = np.zeros((8, 32, 32), np.uint8)
    target[0:5, 4:13, 4:13] = 1
    logits = np.full(target.shape, -10.0, np.float32)
    logits[0:5, 8:17, 8:17] = 10.0
    got = mask_box_scores(logits, target)
    assert got["mask_box"] == [0.0, 0.25, 0.25, 0.5, 0.5, 0.5]
    assert got["mask_box_iou"] == pytest.approx(1 / 7)
    assert got["mask_box_iou_official"] == pytest.approx(1 / 9, rel=1e-4)  # the official score adds 1e-6 below
    assert mask_box_scores(np.full(target.shape, -10.0), target) == {"mask_box": None, "mask_box_iou": 0.0,
                                                                     "mask_box_iou_official": 0.0}
    assert mask_box_scores(None, target)["mask_box_iou"] == 0.0  # no [SEG], no mask
    assert mask_box_scores(logits, np.zeros_like(target)) == {}  # no target box: not scored
    rows = [{"task": "seg", "target": "liver", "dice": 0.5, "soft_dice": 0.5, **got},
            {"task": "seg", "target": "liver", "dice": 0.0, "soft_dice": 0.0, **mask_box_scores(None, target)},
            {"task": "seg", "target": "spleen", "dice": 1.0, "soft_dice": 1.0}]  # absent organ: Dice 1, no box
    s = summarise(rows)["seg"]
    assert s["mask_box_iou"] == pytest.approx(1 / 14) and s["mask_box_iou_official"] == pytest.approx(1 / 18, rel=1e-4)
    assert s["mask_box_iou_per_organ"] == {"liver": pytest.approx(1 / 14)}


def test_eval_command_scores_the_default_model_on_unseen_phantoms(tmp_path):
    """`m3d-edge eval --task seg`: one mask of each key organ and one other, scored and summed up as the rows say;
    the default model's liver on a phantom of an unseen seed is a real mask (its held-out mean is 0.90)."""
    data = P.synthesize(tmp_path / "data", 1, 12345, splits=(("test", 1.0),), progress=False,
                        template_dir=TOTALSEG, n_scan_copies=0)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(ROOT / "models" / "phantom-small"), "--data", str(data),
                                       "--out", str(out), "--task", "seg", "--per-task", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["test"]) == {"seg"} and "real_ct" not in report and "clip_retrieval" not in report
    rows = report["rows"]
    targets = [r["target"] for r in rows]
    assert all(r["task"] == "seg" for r in rows)
    assert len(targets) == len(set(targets)) == report["test"]["seg"]["n"]
    assert [t for t in targets if t in KEY_ORGANS] == [o for o in KEY_ORGANS if o in targets]
    assert sum(t not in KEY_ORGANS for t in targets) == 1
    per_organ = report["test"]["seg"]["dice_per_organ"]
    assert per_organ == {r["target"]: pytest.approx(r["dice"]) for r in rows}
    liver = next(r for r in rows if r["target"] == "liver")
    assert liver["dice"] > 0.7 and abs(liver["centre"][0] - liver["target_centre"][0]) < 2, liver
    boxes = report["test"]["seg"]["mask_box_iou_per_organ"]
    assert boxes == {r["target"]: pytest.approx(r["mask_box_iou"]) for r in rows if "mask_box_iou" in r}
    assert liver["mask_box_iou"] > 0.6, liver  # the box around the liver mask against the liver's box
