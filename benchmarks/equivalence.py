"""Does the fp32 bundle answer exactly like the PyTorch model? 20 held-out phantom prompts covering every task.

    python benchmarks/equivalence.py [--checkpoint models/phantom-small] [--out docs] [--work DIR]

Scans are fresh phantom cases (seed 30 000: never generated for training). Each prompt runs twice on the same scan:
the slim runtime (m3d_edge.runtime.Pipeline over an fp32 bundle exported from the checkpoint) and the PyTorch model
(`LaMed.generate` on the same numpy preprocessing). Both are greedy. Compared: the token ids, the decoded text, the
parsed boxes, and, when [SEG] was written, the masks on the source grid (Dice). Writes equivalence.json/.md to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from m3d_edge import offline_by_default

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(case, rng: random.Random) -> list[tuple[str, str]]:
    """(task, question) pairs for one phantom case, one per task."""
    from m3d_edge.data import prompts as P
    from m3d_edge.data.phantom import make_vqa

    nrng = np.random.default_rng(rng.randrange(1 << 30))
    vqa = make_vqa(case, nrng)
    closed = next(v for v in vqa if v.choices)
    open_ = next(v for v in vqa if v.question != closed.question)
    organ = rng.choice(["liver", "spleen", "left kidney", "right kidney"])
    return [
        ("caption", P.caption_question(rng)),
        ("vqa_closed", P.closed_vqa_question(closed.question, closed.choices)),
        ("vqa_open", open_.question),
        ("rec", P.rec_sample(organ, None, rng)[0]),
        ("reg", P.reg_sample(organ, (0.2, 0.3, 0.2, 0.6, 0.6, 0.5), rng)[0]),
        ("seg", P.seg_sample(organ, rng)[0]),
        ("refseg", "Can you segment the largest abnormality in this image? Please output the mask."),
    ]


def main() -> int:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "phantom-small"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--work", default="build/equivalence")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    from m3d_edge.bench.metrics import dice
    from m3d_edge.data.phantom import generate_case
    from m3d_edge.data.prompts import parse_boxes
    from m3d_edge.export import built_from
    from m3d_edge.export.bundle import build
    from m3d_edge.model import checkpoint, llm as llm_mod
    from m3d_edge.preprocess import to_model_input
    from m3d_edge.runtime.pipeline import Pipeline

    model = checkpoint.load(args.checkpoint)
    tok = llm_mod.load_tokenizer(model.cfg.llm, args.checkpoint)
    bundle = Path(args.work) / "bundle-fp32"
    if not built_from(bundle, args.checkpoint):  # a bundle of an older checkpoint is built again, never compared
        shutil.rmtree(bundle, ignore_errors=True)
        build(args.checkpoint, bundle, llm="fp32", vision="fp32", progress=False)
    pipe = Pipeline.load(bundle)
    spec = pipe.bundle.manifest["preprocessing"]  # "ct" for our models, "m3d" for official ones
    rng = random.Random(0)
    rows = []
    case_index = 0
    while len(rows) < args.n:
        case = generate_case(30_000, case_index)
        case_index += 1
        for task, question in prompts_for(case, rng):
            if len(rows) >= args.n:
                break
            ans = pipe.ask(case.volume, question, max_new_tokens=args.max_new_tokens)
            x, transform = to_model_input(case.volume, spec)
            ids = torch.tensor([tok(image_prompt_text(question, model)).input_ids])
            g = model.generate(torch.from_numpy(x), ids, max_new_tokens=args.max_new_tokens,
                               eos_token_id=tok.eos_token_id)
            torch_ids = [int(t) for t in g.ids[0]]
            torch_text = tok.decode(g.ids[0], skip_special_tokens=True)
            row = {"task": task, "question": question, "runtime": ans.text, "torch": torch_text,
                   "ids_equal": list(ans.token_ids) == torch_ids[:len(ans.token_ids)]
                   and len(ans.token_ids) in (len(torch_ids), len(torch_ids) - 1),
                   "boxes_equal": [b.normalized for b in ans.boxes] == [tuple(b) for b in parse_boxes(
                       tok.decode(g.ids[0]))]}
            torch_has_mask = g.has_seg is not None and bool(g.has_seg[0])
            if ans.mask is not None or torch_has_mask:
                if ans.mask is None or not torch_has_mask:
                    row["mask_dice"] = 0.0
                else:
                    ref = transform.invert_mask((g.seg_logits[0, 0].numpy() > 0).astype(np.uint8)).array
                    row["mask_dice"] = dice(ans.mask.array, ref)
                    row["mask_voxels"] = [int(np.count_nonzero(ans.mask.array)), int(np.count_nonzero(ref))]
            rows.append(row)
            print(f"{task:10s} ids {'=' if row['ids_equal'] else 'DIFF'}  {ans.text[:70]!r}", flush=True)
    summary = {"prompts": len(rows), "tasks": sorted({r["task"] for r in rows}),
               "ids_equal": sum(r["ids_equal"] for r in rows), "boxes_equal": sum(r["boxes_equal"] for r in rows),
               "masks": [r["mask_dice"] for r in rows if "mask_dice" in r],
               "mask_voxels": [r["mask_voxels"] for r in rows if "mask_voxels" in r], "checkpoint": args.checkpoint,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "equivalence.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = ["# Runtime (fp32 bundle) vs PyTorch: equivalence", "",
             f"`python benchmarks/equivalence.py` on {summary['date']}, checkpoint `{args.checkpoint}`, "
             f"{len(rows)} prompts on fresh phantom scans (seed 30 000), greedy, up to {args.max_new_tokens} tokens.", "",
             f"- identical token ids: {summary['ids_equal']} / {len(rows)}",
             f"- identical boxes: {summary['boxes_equal']} / {len(rows)}",
             f"- masks written: {len(summary['masks'])}; Dice runtime vs torch: "
             + (", ".join(f"{d:.4f}" for d in summary["masks"]) or "none (no [SEG] written)"),
             "- mask voxels (runtime, torch): " + (", ".join(f"{a}/{b}" for a, b in summary["mask_voxels"]) or "-")
             + " (Dice of two empty masks counts as 1.0)", "",
             "| task | question | runtime answer | same ids |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['question'][:60]} | {r['runtime'][:60].replace('|', '/')} | "
              f"{'yes' if r['ids_equal'] else 'no'} |" for r in rows]
    (out / "equivalence.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if summary["ids_equal"] == len(rows) else 1


def image_prompt_text(question: str, model) -> str:
    from m3d_edge.data.prompts import image_prompt

    return image_prompt(question, model.cfg.num_image_tokens)


if __name__ == "__main__":
    sys.exit(main())
