"""What limits a checkpoint's segmentation: do its vision tower's patch tokens tell the key organs apart?

    python benchmarks/organ_probe.py CHECKPOINT --data RUN/data [--out probe.json]

phantom-small's [SEG] masks reach a liver Dice of about 0.6 and kidney Dice of 0.2-0.3, and a longer seg warm-up
(v5) did not move them. This asks where they stop, on a phantom data set (`m3d-edge synth`), in four parts:

1. Fit: the model's [SEG] Dice per key organ on train-split items against test-split items (greedy answers to the
   seg questions, as `m3d-edge eval` scores them). Equal figures mean the model underfits; it does not overfit.
   Placement: on the test items, how far each mask's centre lies from the organ's, per axis, and whether it moves
   with the organ from scan to scan (the slope of the predicted centre on the true one).
2. Resolution bounds, per organ: the Dice a test mask keeps when it is known only as its cover of each ViT patch,
   or of each voxel of the mask decoder's output grid (area-averaged down, trilinear up, > 0.5). The first is what
   a decoder that knew only which patches hold the organ could reach; the second what the output grid allows.
3. Patch probe: every patch of a case gets the key organ that covers at least half of it (else background); a
   classifier is fitted on the train-split cases and scored on the test-split ones, as a Dice per organ over the
   patch labels. Features: the tower's tokens; the same tower freshly initialised (what training added); and the
   raw patch (its intensities averaged to 4 x 4 in-plane per slice) with the patch's position, for a linear
   probe and a small MLP (what a local classifier with no context gets).
4. A Markdown table on stdout; --out writes everything as JSON.

About five minutes for phantom-small on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3d_edge import offline_by_default
from m3d_edge.bench import metrics
from m3d_edge.bench.evaluate import evaluate_split
from m3d_edge.bench.probes import class_dice, linear_probe, mask_placement, mlp_probe, patch_labels
from m3d_edge.data.datasets import task_items
from m3d_edge.data.phantom import KEY_ORGANS
from m3d_edge.model import checkpoint, llm as llm_mod
from m3d_edge.model.vit3d import VisionTower

CLASSES = len(KEY_ORGANS) + 1  # background + key organs


def seg_cases(data: Path, split: str, limit: int) -> list[tuple[str, dict[str, str]]]:
    """(image, {organ: mask}) of the first `limit` images of `split` with key-organ masks."""
    by_image: dict[str, dict[str, str]] = defaultdict(dict)
    for it in task_items(data, split, ("seg",)):
        if it.mask is not None and it.target in KEY_ORGANS:
            by_image[it.image][it.target] = it.mask
    if not by_image:
        raise SystemExit(f"{data}: no key-organ masks in the {split} split; this probe needs a data set written by "
                         "`m3d-edge synth`")
    return list(by_image.items())[:limit]


def load_masks(masks: dict[str, str], shape: tuple[int, ...]) -> torch.Tensor:
    """[K, D, H, W] masks in KEY_ORGANS order; an organ the case lacks is all zero."""
    out = torch.zeros(len(KEY_ORGANS), *shape)
    for k, organ in enumerate(KEY_ORGANS):
        if organ in masks:
            out[k] = torch.from_numpy(np.load(masks[organ]).astype(np.float32)).reshape(shape)
    return out


def raw_patch_features(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[1, 1, D, H, W] -> [N, pd*16 + 3]: each patch's intensities averaged to 4 x 4 in-plane per slice, and the
    patch's (z, y, x) position in [-1, 1], in the ViT's token order."""
    pd, ph, pw = patch
    pooled = F.avg_pool3d(x, (1, ph // 4, pw // 4))[0, 0]  # [D, 4H/ph, 4W/pw]
    gd, gh, gw = pooled.shape[0] // pd, pooled.shape[1] // 4, pooled.shape[2] // 4
    values = pooled.reshape(gd, pd, gh, 4, gw, 4).permute(0, 2, 4, 1, 3, 5).reshape(gd * gh * gw, pd * 16)
    axes = [torch.linspace(-1, 1, n) for n in (gd, gh, gw)]
    position = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([values, position], 1)


def occupancy_bound(mask: torch.Tensor, grid: tuple[int, int, int]) -> float:
    """Dice of a mask against itself known only as its cover of each cell of `grid`."""
    low = F.adaptive_avg_pool3d(mask[None, None], grid)
    back = F.interpolate(low, size=mask.shape, mode="trilinear", align_corners=False)[0, 0] > 0.5
    return metrics.dice(back.numpy(), mask.numpy())


@torch.no_grad()
def patch_data(model, random_tower, cases) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features and labels of every patch of `cases`."""
    vision = model.cfg.vision
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    labels = []
    for image, masks in cases:
        x = torch.from_numpy(np.load(image)).float().reshape(1, 1, *vision.image_size)
        feats["tower"].append(model.vision_features(x)[0])
        feats["fresh tower"].append(random_tower(x)[0])
        feats["raw patch + position"].append(raw_patch_features(x, vision.patch_size))
        labels.append(patch_labels(load_masks(masks, tuple(vision.image_size)), vision.patch_size))
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def resolution_bounds(vision, cases) -> dict[str, dict]:
    """Per organ, the mean Dice its masks keep at the patch grid and at the decoder's output grid, and their count."""
    decoder_grid = tuple(4 * g for g in vision.grid)
    kept: dict[str, dict[str, list[float]]] = {o: {"patch_grid": [], "decoder_grid": []} for o in KEY_ORGANS}
    for _, masks in cases:
        m = load_masks(masks, tuple(vision.image_size))
        for k, organ in enumerate(KEY_ORGANS):
            if organ in masks and m[k].any():
                kept[organ]["patch_grid"].append(occupancy_bound(m[k], vision.grid))
                kept[organ]["decoder_grid"].append(occupancy_bound(m[k], decoder_grid))
    return {organ: {grid: float(np.mean(v)) for grid, v in b.items()} | {"masks": len(b["patch_grid"])}
            for organ, b in kept.items()}


def seg_rows(model, tok, data: Path, split: str, per_organ: int) -> list[dict]:
    """`m3d-edge eval`'s rows for `per_organ` seg items of each key organ of `split` (other seg classes left out)."""
    rows = evaluate_split(model, tok, data, split, per_task=per_organ, tasks=("seg",), progress=False)["rows"]
    return [row for row in rows if row["target"] in KEY_ORGANS]


def seg_fit(rows: list[dict]) -> dict[str, float]:
    """Mean [SEG] Dice per key organ."""
    scores: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        scores[row["target"]].append(row["dice"])
    return {organ: float(np.mean(v)) for organ, v in scores.items()}


def main(argv=None) -> int:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="a phantom data set (m3d-edge synth)")
    p.add_argument("--train-cases", type=int, default=80, help="train-split images the patch probes are fitted on")
    p.add_argument("--test-cases", type=int, default=25)
    p.add_argument("--seg-items", type=int, default=15, help="[SEG] items per organ and split for the fit check")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = checkpoint.load(args.checkpoint).eval()
    tok = llm_mod.load_tokenizer(model.cfg.llm, args.checkpoint)
    fresh = VisionTower(model.cfg.vision).eval()  # seeded above: the same fresh tower every run
    result: dict = {"checkpoint": str(args.checkpoint), "organs": list(KEY_ORGANS)}
    rows = {split: seg_rows(model, tok, args.data, split, args.seg_items) for split in ("train", "test")}
    result["seg_fit"] = {split: seg_fit(r) for split, r in rows.items()}
    result["placement"] = mask_placement(rows["test"], KEY_ORGANS)
    test_cases = seg_cases(args.data, "test", args.test_cases)
    x_train, y_train = patch_data(model, fresh, seg_cases(args.data, "train", args.train_cases))
    x_test, y_test = patch_data(model, fresh, test_cases)
    result["bounds"] = resolution_bounds(model.cfg.vision, test_cases)
    result["test_patches_per_class"] = torch.bincount(y_test, minlength=CLASSES).tolist()
    probes = {}
    for name in x_train:
        fits = [("linear", linear_probe)] + ([("mlp", mlp_probe)] if name == "raw patch + position" else [])
        for kind, fit in fits:
            kwargs = {"balanced": True, "l2": 1e-4, "max_iter": 300} if fit is linear_probe else {}
            pred_train, pred_test = fit(x_train[name], y_train, x_test[name], CLASSES, **kwargs)
            probes[f"{kind}: {name}"] = {"train": class_dice(pred_train, y_train, CLASSES),
                                         "test": class_dice(pred_test, y_test, CLASSES)}
    result["patch_probes"] = probes

    organs = " / ".join(KEY_ORGANS)
    fmt = lambda v: " / ".join(f"{d:.2f}" for d in v)  # noqa: E731
    print(f"organ probe on {args.checkpoint}")
    print(f"\n| [SEG] Dice ({organs}) | train | test |\n|---|---|---|")
    fit = result["seg_fit"]
    print(f"| {args.seg_items} items per organ | {fmt([fit['train'][o] for o in KEY_ORGANS])} | "
          f"{fmt([fit['test'][o] for o in KEY_ORGANS])} |")
    print("\n| test [SEG] masks, z / y / x (voxels) | items | centre error | slope, predicted on true centre "
          "| spread of true centres |\n|---|---|---|---|---|")
    for organ, p in result["placement"].items():
        cells = [" / ".join(f"{v:{spec}}" for v in p[key])
                 for key, spec in (("abs_error", ".1f"), ("slope", ".2f"), ("true_spread", ".1f"))]
        print(f"| {organ} | {p['items']} | {' | '.join(cells)} |")
    b = result["bounds"]
    print(f"\n| Dice a mask keeps ({organs}) | patch grid {tuple(model.cfg.vision.grid)} | decoder's output grid |"
          "\n|---|---|---|")
    print(f"| test masks: {' / '.join(str(b[o]['masks']) for o in KEY_ORGANS)} | "
          f"{fmt([b[o]['patch_grid'] for o in KEY_ORGANS])} | {fmt([b[o]['decoder_grid'] for o in KEY_ORGANS])} |")
    print(f"\n| patch probe, Dice per organ ({organs}) | train | test |\n|---|---|---|")
    for name, r in probes.items():
        print(f"| {name} | {fmt(r['train'])} | {fmt(r['test'])} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
