"""The probe helpers of benchmarks/phase_probe.py and organ_probe.py against known answers."""

import pytest
import torch

from m3d_edge.bench.probes import class_dice, linear_probe, mask_placement, patch_labels


def test_linear_probe_separates_separable_classes_and_balancing_finds_a_rare_one():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    # class 2 is 1 % of the rows and overlaps class 0 a little
    y = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(594, dtype=torch.long),
                   torch.full((6,), 2, dtype=torch.long)])
    x = centres[y] + torch.randn(len(y), 2, generator=g)
    x_test = centres + 0.1 * torch.randn(3, 2, generator=g)
    pred_train, pred_test = linear_probe(x, y, x_test, 3, l2=1e-4, balanced=True)
    assert pred_test.tolist() == [0, 1, 2]
    assert (pred_train[:1194] == y[:1194]).float().mean() > 0.95
    # unbalanced, strongly regularised: the rare class is never predicted
    pred_train, _ = linear_probe(x, y, x_test, 3, l2=1.0)
    assert not (pred_train == 2).any()


def test_patch_labels_follow_the_vit_token_order_and_the_half_cover_rule():
    masks = torch.zeros(2, 4, 4, 4)
    masks[0, :2, :2, 2:] = 1  # organ 1 fills the patch at (d=0, h=0, w=1) of a 2x2x2 grid of 2x2x2 patches
    masks[1, 2:, 2:, :2] = 1  # organ 2 fills (d=1, h=1, w=0) ...
    masks[1, 0, 2, 0] = 1  # ... and covers 1/8 of (0, 1, 0): background
    masks[0, 2, :2, :2] = 1  # in (1, 0, 0) organ 1 covers 1/2 and organ 2 3/4: organ 2 wins
    masks[1, 2:, :2, :2] = 1
    masks[1, 2, 0, 0] = 0
    masks[1, 3, 0, 0] = 0
    labels = patch_labels(masks, (2, 2, 2))
    # token order: index = d * 4 + h * 2 + w
    assert labels.tolist() == [0, 1, 0, 0, 2, 0, 2, 0]


def test_class_dice_per_class():
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    pred = torch.tensor([1, 1, 0, 2, 2, 0])
    assert class_dice(pred, target, 3) == pytest.approx([2 * 1 / (2 + 2), 1.0])
    assert class_dice(pred, target, 4)[2] == 1.0  # absent from both: metrics.dice's convention


def test_mask_placement_slope_error_and_spread():
    """Masks that move half as far as the organ, along z only, shifted by one slice: slope 0.5 on z; in-plane
    they follow exactly."""
    true_z = [4.0, 8.0, 12.0, 16.0]
    rows = [{"target": "liver", "target_centre": [z, 10.0 + z, 20.0 - z], "centre": [0.5 * z + 5, 10.0 + z, 20.0 - z]}
            for z in true_z]
    rows += [{"target": "spleen", "target_centre": [1.0, 1.0, 1.0], "centre": None}] * 5  # empty masks: no centre
    got = mask_placement(rows, ("liver", "spleen"))
    assert set(got) == {"liver"} and got["liver"]["items"] == 4
    assert got["liver"]["slope"] == pytest.approx([0.5, 1.0, 1.0])
    errors = [abs(0.5 * z + 5 - z) for z in true_z]  # 3, 1, 1, 3
    assert got["liver"]["abs_error"] == pytest.approx([sum(errors) / 4, 0.0, 0.0])
    assert got["liver"]["true_spread"][0] == pytest.approx(torch.tensor(true_z).std(unbiased=False).item())
