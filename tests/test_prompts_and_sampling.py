"""Box text format, its strict parser, scoring helpers, and the sampling primitive."""

import random

import pytest
import torch

from m3d_edge.data import prompts
from m3d_edge.model.lamed import sample_next, seg_hidden_positions


def test_box_format_matches_official_text():
    # values are rounded to 3 decimals and printed with Python's float repr, ", " separated
    assert prompts.format_box([4 / 32, 85 / 256, 25.6 / 256, 16 / 32, 179.2 / 256, 153.6 / 256]) == \
        "<bx_start>[0.125, 0.332, 0.1, 0.5, 0.7, 0.6]<bx_end>"


def test_parse_boxes_lenient_and_strict():
    text = "Coordinates are <bx_start>[0.125, 0.332, 0.1, 0.5, 0.7, 0.6]<bx_end> and [1, 2]."
    assert prompts.parse_boxes(text) == [(0.125, 0.332, 0.1, 0.5, 0.7, 0.6)]
    with pytest.raises(prompts.BoxParseError, match=r"not a box: '\[1, 2\]'"):
        prompts.parse_boxes(text, strict=True)
    assert prompts.parse_boxes("[0.5, 0.1, 0.1, 0.2, 0.9, 0.9]") == []  # d_min > d_max
    assert prompts.parse_boxes("[0.1,0.2,0.3,0.4,0.5,0.6]") == [(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]


def test_iou_definitions():
    a, b = (0, 0, 0, 0.5, 0.5, 0.5), (0.25, 0, 0, 0.75, 0.5, 0.5)
    assert prompts.box_iou(a, b) == pytest.approx(1 / 3)
    assert prompts.box_iou_official(a, b) == pytest.approx(0.5 * 0.5 * 0.25 / (0.75 * 0.25), rel=1e-5)


def test_closed_vqa_helpers():
    q = prompts.closed_vqa_question("Which organ?", ["liver", "spleen", "kidney", "lung"])
    assert q == "Which organ? Choices: A. liver B. spleen C. kidney D. lung"
    assert prompts.closed_vqa_correct("The answer is B. spleen", "B")
    assert not prompts.closed_vqa_correct("spleen", "B")


def test_closed_vqa_answer_formats_pass_the_official_scoring_for_their_letter_only():
    assert prompts.closed_vqa_answer("B", "Right kidney") == "B. Right kidney"
    content = prompts.closed_vqa_answer("B", "Right kidney", "content")
    assert content == "Right kidney. Choice B."
    for answer in ("B. Right kidney", content):
        assert [l for l in "ABCD" if prompts.closed_vqa_correct(answer, l)] == ["B"]
    with pytest.raises(ValueError, match="letter, content"):
        prompts.closed_vqa_answer("B", "Right kidney", "text")


def test_samples_are_formatted():
    rng = random.Random(0)
    q, a = prompts.rec_sample("liver", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), rng)
    assert "liver" in q and prompts.parse_boxes(a) == [(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    q, a = prompts.seg_sample("spleen", rng)
    assert "[SEG]" in a
    assert "[SEG]" not in prompts.seg_sample("spleen", rng, present=False)[1]


def test_seg_positions_select_the_predicting_state():
    ids = torch.tensor([[5, 9, 7, 9, 3]])
    assert seg_hidden_positions(ids, 9).tolist() == [[True, False, True, False, False]]


def test_top_p_sampling_keeps_the_nucleus_and_is_seeded():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, do_sample=True, top_p=0.7, temperature=1.0,
                             generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are cut
    a = [int(sample_next(logits, do_sample=True, top_p=0.9, temperature=1.0,
                         generator=torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1
    assert int(sample_next(logits, do_sample=False, top_p=None, temperature=1.0, generator=None)) == 0
