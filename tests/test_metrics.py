"""M3D-Bench metrics against hand-computed answers."""

import math

import numpy as np
import pytest

from m3d_edge.bench import metrics


def test_bleu1_is_clipped_unigram_precision_with_brevity_penalty():
    # 3 of 4 unigrams match, same length: BLEU-1 = 0.75
    assert metrics.bleu1(["the liver is normal"], ["the liver is enlarged"]) == pytest.approx(0.75)
    # prediction shorter (2 vs 4 tokens), both match: precision 1, BP = exp(1 - 4/2)
    assert metrics.bleu1(["the liver"], ["the liver is enlarged"]) == pytest.approx(math.exp(-1))


def test_rouge1_is_mean_f1():
    got = metrics.rouge1(["the liver is normal", "spleen"], ["the liver is enlarged", "kidney"])
    assert got == pytest.approx((0.75 + 0.0) / 2)


def test_closed_vqa_and_baseline():
    assert metrics.closed_vqa_accuracy(["B. spleen", "A", "It is C. kidney"], ["B", "A", "C"]) == pytest.approx(2 / 3)
    assert metrics.majority_baseline(["A", "B", "A", "C"]) == 0.5


def test_rec_iou_official_and_parse_failure():
    a, b = (0, 0, 0, 0.5, 0.5, 0.5), (0.25, 0.25, 0, 0.75, 0.75, 0.5)
    inter = 0.25 * 0.25 * 0.5
    assert metrics.rec_iou(a, b) == pytest.approx(inter / (0.75 * 0.75 * 0.5), rel=1e-4)  # over the enclosing box
    assert metrics.rec_iou(a, b, official=False) == pytest.approx(inter / (2 * 0.125 - inter))
    assert metrics.rec_iou(None, b) == -1.0


def test_soft_and_hard_dice():
    t = np.zeros((4, 4, 4)); t[:2] = 1
    logits = np.where(t > 0, 50.0, -50.0)
    assert metrics.soft_dice(logits, t) == pytest.approx(2 * 32 / (32 + 32 + 1))
    assert metrics.soft_dice(np.full_like(t, -np.inf), t) == 0.0
    assert metrics.dice(t, t) == 1.0 and metrics.dice(t, 1 - t) == 0.0


def test_mask_centre():
    m = np.zeros((4, 6, 8))
    m[1:3, 2, 5] = 1  # voxels (1, 2, 5) and (2, 2, 5)
    m[3, 5, 0] = 1
    assert metrics.mask_centre(m) == pytest.approx([2.0, 3.0, 10 / 3])
    assert metrics.mask_centre(np.zeros((2, 2, 2))) is None
