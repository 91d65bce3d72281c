"""Does a checkpoint's vision path keep the contrast phase? A linear probe on the phantoms' caption images.

    python benchmarks/phase_probe.py CHECKPOINT --data RUN/data [--out probe.json]

Closed VQA asks for the contrast phase of a scan (non-contrast, arterial, portal venous); phantom-small v4
answers those questions at chance. This asks where the phase is lost. For every caption image of the train and
test splits (the phantom writes them as `<plane>_<phase>.npy`, so the phase is read from the name) it takes three
feature sets and fits a multinomial logistic regression on the train split, scored on the test split:

- image: a 32-bin histogram of the soft-tissue intensities (model input 0.45-0.75, -100..500 HU in the default
  window): whether the phase is in the image at all;
- tower: mean and standard deviation over the vision tower's patch tokens;
- projector: mean and standard deviation over the image tokens the LLM reads.

The regression is `m3d_edge.bench.probes.linear_probe` (L2-regularised, L-BFGS in torch). Prints a table;
--out writes the accuracies as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from m3d_edge import offline_by_default
from m3d_edge.bench.probes import linear_probe
from m3d_edge.data.datasets import task_items
from m3d_edge.model import checkpoint

SERIES = re.compile(r"^(axial|coronal|sagittal|oblique)_(?P<phase>[a-z_]+)\.npy$")
HIST_RANGE = (0.45, 0.75)  # model-input intensities of soft tissue and contrast, -100..500 HU in (-1000, 1000)


def caption_images(data: Path, split: str) -> list[tuple[str, str]]:
    """(image, phase) of every caption image of `split` written by the phantom generator."""
    out = []
    for it in task_items(data, split, tasks=("caption",)):
        m = SERIES.match(Path(it.image).name)
        if m is None:
            raise SystemExit(f"{it.image}: not a phantom caption image (<plane>_<phase>.npy); "
                             "this probe needs a data set written by `m3d-edge synth`")
        out.append((it.image, m["phase"]))
    return out


@torch.no_grad()
def features(model, images: list[str]) -> dict[str, torch.Tensor]:
    feats: dict[str, list[torch.Tensor]] = {"image": [], "tower": [], "projector": []}
    for path in images:
        x = torch.from_numpy(np.load(path)).float().reshape(1, 1, *model.cfg.vision.image_size)
        hist = torch.histc(x, bins=32, min=HIST_RANGE[0], max=HIST_RANGE[1])
        feats["image"].append(hist / hist.sum().clamp(min=1))
        tokens = model.vision_features(x)[0]
        feats["tower"].append(torch.cat([tokens.mean(0), tokens.std(0)]))
        llm_tokens = model.mm_projector(tokens[None])[0]
        feats["projector"].append(torch.cat([llm_tokens.mean(0), llm_tokens.std(0)]))
    return {k: torch.stack(v).float() for k, v in feats.items()}


def main(argv=None) -> int:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="a phantom data set (m3d-edge synth)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = checkpoint.load(args.checkpoint).eval()
    train, test = caption_images(args.data, "train"), caption_images(args.data, "test")
    phases = sorted({ph for _, ph in train})
    y_train = torch.tensor([phases.index(ph) for _, ph in train])
    y_test = torch.tensor([phases.index(ph) for _, ph in test])
    f_train, f_test = features(model, [i for i, _ in train]), features(model, [i for i, _ in test])
    majority = float((y_test == torch.mode(y_train).values).float().mean())
    rows = {}
    for name in f_train:
        pred_train, pred_test = linear_probe(f_train[name], y_train, f_test[name], len(phases))
        rows[name] = {"dim": f_train[name].shape[1], "train": float((pred_train == y_train).float().mean()),
                      "test": float((pred_test == y_test).float().mean())}
    result = {"checkpoint": str(args.checkpoint), "phases": phases, "n_train": len(train), "n_test": len(test),
              "majority": majority, "probes": rows}
    print(f"phase probe on {args.checkpoint}: {len(train)} train / {len(test)} test caption images, "
          f"majority {majority:.2f}")
    print("| features | dim | train acc | test acc |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['dim']} | {r['train']:.2f} | {r['test']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
