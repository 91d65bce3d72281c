"""The held-out evaluation behind the model cards: how it sums rows up (hand-computed answers), and the `eval`
command on the committed default model and phantoms of a seed it was never trained on."""

import json

import pytest
from click.testing import CliRunner

from m3d_edge.bench.evaluate import summarise
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


def test_eval_command_scores_the_default_model_on_unseen_phantoms(tmp_path):
    """`m3d-edge eval --task seg`: one mask of each key organ and one other, scored and summed up as the rows say;
    the default model's liver on a phantom of an unseen seed is a real mask (its held-out mean is 0.89)."""
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
