"""M3D-Bench metrics (spec §8), computed offline.

The official scripts call Hugging Face `evaluate`, which fetches its metric scripts from the hub at run time; we
compute the same quantities with the libraries those scripts wrap: sacrebleu for BLEU (corpus BLEU with max n-gram
order 1 = BLEU-1 with brevity penalty, 13a tokenisation) and Google's rouge-score for ROUGE-1 (mean F1 over rows).
Closed-VQA accuracy, REC IoU and soft Dice follow the official definitions exactly, including their quirks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from m3d_edge.data.phantom.dataset import majority_fraction
from m3d_edge.data.phantom.dataset import soft_dice as soft_dice_of_probabilities
from m3d_edge.data.prompts import box_iou, box_iou_official, closed_vqa_correct


def bleu1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-1 in [0, 1] (brevity penalty included), as `evaluate`'s bleu with max_order=1."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    score = BLEU(max_ngram_order=1, tokenize="13a", smooth_method="none", effective_order=False)
    return score.corpus_score([p.strip() for p in predictions], [[r.strip() for r in references]]).score / 100


def rouge1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-1 F1 in [0, 1]."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    return float(np.mean([scorer.score(r.strip(), p.strip())["rouge1"].fmeasure
                          for p, r in zip(predictions, references)]))


def closed_vqa_accuracy(outputs: Sequence[str], letters: Sequence[str]) -> float:
    """Official: correct iff "<letter>." occurs anywhere in the output."""
    _check(outputs, letters)
    return float(np.mean([closed_vqa_correct(o, l) for o, l in zip(outputs, letters)]))


def majority_baseline(answers: Sequence[str]) -> float:
    """Accuracy of always giving the most frequent answer (the phantom data set's baselines use the same rule)."""
    return majority_fraction(answers)


def rec_iou(pred: Sequence[float] | None, target: Sequence[float], *, official: bool = True) -> float:
    """REC score of one sample: official "IoU" (intersection over the enclosing box) or true IoU; -1 when the
    prediction did not parse (as the official script)."""
    if pred is None:
        return -1.0
    return box_iou_official(pred, target) if official else box_iou(pred, target)


def soft_dice(logits: np.ndarray, target: np.ndarray) -> float:
    """Official seg metric on logits: 2*sum(sigmoid(x)*t) / (sum sigmoid(x) + sum t + 1); -inf logits give 0."""
    return soft_dice_of_probabilities(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), target > 0)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Hard Dice of two binary masks (1.0 when both are empty)."""
    a, b = pred > 0, target > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def mask_centre(mask: np.ndarray) -> Optional[list[float]]:
    """Centre of mass of a binary mask (> 0), as a voxel index per axis; None when the mask is empty."""
    where = np.nonzero(mask > 0)
    return [float(i.mean()) for i in where] if where[0].size else None


def _check(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
    if not len(a):
        raise ValueError("no predictions to score")
