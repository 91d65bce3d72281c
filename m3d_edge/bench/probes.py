"""Probes of what a vision tower has learned: a linear classifier on frozen features, and patch-level organ labels;
and where a model's masks lie against the organs they name (mask_placement).

`benchmarks/phase_probe.py` asks whether the contrast phase survives the tower; `benchmarks/organ_probe.py` asks
whether its patch tokens tell the key organs apart (and sets a small MLP beside the linear fit). Both fit the same
L2-regularised multinomial logistic regression, here with L-BFGS in torch: scikit-learn is not a dependency, and a probe of a few hundred thousand
rows by a few hundred features is one small convex problem.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m3d_edge.bench import metrics


def standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets scaled by the train set's per-feature mean and standard deviation."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mu) / sd, (x_test - mu) / sd


def balanced_weights(y: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class loss weights: the square root of the inverse class frequency (1 for equal classes)."""
    counts = torch.bincount(y, minlength=classes).float().clamp(min=1)
    return (len(y) / (classes * counts)).sqrt()


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int, *,
                 l2: float = 1e-2, balanced: bool = False, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test predictions of a multinomial logistic regression on standardised features.

    The loss is the mean cross-entropy plus `l2` times the squared weights. `balanced` weighs each class by the
    square root of its inverse frequency, so that a class of a few percent of the rows (an organ among background
    patches) is not simply never predicted; the full inverse would trade too much precision for recall.
    """
    a, b = standardise(x_train, x_test)
    weight = balanced_weights(y_train, classes) if balanced else None
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train, weight=weight) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (a @ w + bias).argmax(1), (b @ w + bias).argmax(1)


def mlp_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int, *,
              steps: int = 400, batch: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test predictions of a two-hidden-layer MLP (256 wide, AdamW, seed 0), class-balanced as
    `linear_probe(balanced=True)`: what a non-linear classifier gets from the same features."""
    torch.manual_seed(0)
    a, b = standardise(x_train, x_test)
    weight = balanced_weights(y_train, classes)
    net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, classes))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(a), (min(batch, len(a)),))
        opt.zero_grad()
        F.cross_entropy(net(a[idx]), y_train[idx], weight=weight).backward()
        opt.step()
    with torch.no_grad():
        return net(a).argmax(1), net(b).argmax(1)


def patch_labels(masks: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[K, D, H, W] binary masks -> [N] label per patch in the ViT's token order (depth, then H, then W).

    Label k + 1 where mask k covers at least half of the patch (the largest such cover if several do), else 0.
    """
    frac = F.avg_pool3d(masks.float()[None], patch)[0].flatten(1)  # [K, N]
    return torch.cat([torch.full_like(frac[:1], 0.5), frac]).argmax(0)


def class_dice(pred: torch.Tensor, target: torch.Tensor, classes: int) -> list[float]:
    """Dice of each foreground class 1..classes-1 between two label vectors (`metrics.dice`, per class)."""
    return [metrics.dice((pred == c).numpy(), (target == c).numpy()) for c in range(1, classes)]


def mask_placement(rows: Sequence[dict], organs: Sequence[str]) -> dict[str, dict]:
    """Where predicted masks lie against where the organ lies, per organ and axis (z, y, x), from `m3d-edge eval`
    seg rows (their "target" organ, "centre" and "target_centre", voxel indices): the mean absolute error of the
    centre, the slope of the predicted centre regressed on the true one (1: the mask moves with the organ from scan
    to scan; 0: it sits at one place whatever the scan), and the spread (std) of the true centres. Organs with
    fewer than three rows that have both centres are left out."""
    out = {}
    for organ in organs:
        pairs = [(r["centre"], r["target_centre"]) for r in rows
                 if r["target"] == organ and r.get("centre") is not None and r.get("target_centre") is not None]
        if len(pairs) < 3:
            continue
        pred, true = (np.array(v, dtype=np.float64) for v in zip(*pairs))  # [n, 3] each
        out[organ] = {"items": len(pairs), "abs_error": np.abs(pred - true).mean(0).tolist(),
                      "slope": [float(np.polyfit(true[:, k], pred[:, k], 1)[0]) for k in range(true.shape[1])],
                      "true_spread": true.std(0).tolist()}
    return out
