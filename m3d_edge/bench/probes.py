"""Probes of what a vision tower has learned: a linear classifier on frozen features, and patch-level organ labels.

`benchmarks/phase_probe.py` asks whether the contrast phase survives the tower; `benchmarks/organ_probe.py` asks
whether its patch tokens tell the key organs apart. Both fit the same L2-regularised multinomial logistic
regression, here with L-BFGS in torch: scikit-learn is not a dependency, and a probe of a few hundred thousand
rows by a few hundred features is one small convex problem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m3d_edge.bench import metrics


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int, *,
                 l2: float = 1e-2, balanced: bool = False, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test predictions of a multinomial logistic regression on standardised features.

    The loss is the mean cross-entropy plus `l2` times the squared weights. `balanced` weighs each class by the
    square root of its inverse frequency, so that a class of a few percent of the rows (an organ among background
    patches) is not simply never predicted; the full inverse would trade too much precision for recall.
    """
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    weight = None
    if balanced:
        counts = torch.bincount(y_train, minlength=classes).float().clamp(min=1)
        weight = (len(y_train) / (classes * counts)).sqrt()
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


def patch_labels(masks: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[K, D, H, W] binary masks -> [N] label per patch in the ViT's token order (depth, then H, then W).

    Label k + 1 where mask k covers at least half of the patch (the largest such cover if several do), else 0.
    """
    frac = F.avg_pool3d(masks.float()[None], patch)[0].flatten(1)  # [K, N]
    return torch.cat([torch.full_like(frac[:1], 0.5), frac]).argmax(0)


def class_dice(pred: torch.Tensor, target: torch.Tensor, classes: int) -> list[float]:
    """Dice of each foreground class 1..classes-1 between two label vectors (`metrics.dice`, per class)."""
    return [metrics.dice((pred == c).numpy(), (target == c).numpy()) for c in range(1, classes)]
