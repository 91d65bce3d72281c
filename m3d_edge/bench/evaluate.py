"""Held-out evaluation of a LaMed checkpoint on the M3D-Bench tasks, and the real-CT check.

Runs the PyTorch model (fp32, greedy) on a split the model never saw and reports, per task, the official metrics
(bench.metrics) beside the constant-answer baselines. Used for the model card of our own models.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from m3d_edge.bench import metrics
from m3d_edge.data.datasets import TASKS, TaskDataset, TaskItem, task_items
from m3d_edge.data.phantom import KEY_ORGANS
from m3d_edge.data.prompts import image_prompt, parse_boxes
from m3d_edge.preprocess import box_from_mask, to_model_input

MAX_NEW = {"caption": 160, "vqa_closed": 24, "vqa_open": 24, "seg": 24, "rec": 48, "reg": 32, "refseg": 32}


def ask(model, tok, image: torch.Tensor, question: str, max_new_tokens: int):
    """One greedy answer: (decoded text with [SEG] kept, mask logits or None)."""
    ids = torch.tensor([tok(image_prompt(question, model.cfg.num_image_tokens)).input_ids])
    g = model.generate(image, ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    text = tok.decode(g.ids[0], skip_special_tokens=False)
    for marker in (tok.eos_token or "", "<|endoftext|>"):
        if marker:
            text = text.replace(marker, "")
    has = g.has_seg is not None and bool(g.has_seg[0])
    return text.strip(), (g.seg_logits[0, 0].numpy() if has else None)


def evaluate_split(model, tok, data: str | Path, split: str = "test", *, per_task: int = 30, seed: int = 0,
                   organs: Sequence[str] = KEY_ORGANS, tasks: Sequence[str] = TASKS, progress: bool = True) -> dict:
    """Metrics per task on at most `per_task` samples of each of `tasks` in `split`; semantic seg also scores up
    to `per_task` cases of each of `organs`, so that their per-organ Dice rests on more than a few masks."""
    from tqdm.auto import tqdm

    items = task_items(data, split, tasks, seed=seed)
    rng = random.Random(seed)
    chosen: list[TaskItem] = []
    by_task: dict[str, list[TaskItem]] = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    for task, pool in sorted(by_task.items()):
        if task == "seg":  # only masks that exist: a seg score needs a target
            pool = [it for it in pool if it.mask is not None]
            for organ in organs:
                of_organ = [it for it in pool if it.target == organ]
                chosen += rng.sample(of_organ, min(per_task, len(of_organ)))
            pool = [it for it in pool if it.target not in organs]
        chosen += rng.sample(pool, min(per_task, len(pool)))
    ds = TaskDataset(chosen)
    rows = []
    model.eval()
    for i in tqdm(range(len(ds)), desc=f"eval {split}", disable=not progress):
        it, sample = chosen[i], ds[i]
        text, logits = ask(model, tok, torch.from_numpy(sample.image)[None], sample.question, MAX_NEW[it.task])
        row = {"task": it.task, "question": it.question, "answer": it.answer, "output": text, "target": it.target}
        if it.task in ("seg", "refseg"):
            target = sample.mask[0] if sample.mask is not None else np.zeros(sample.image.shape[1:])
            row["dice"] = metrics.dice(logits > 0, target) if logits is not None else 0.0
            row["soft_dice"] = metrics.soft_dice(logits, target) if logits is not None else 0.0
            # where the mask lies, beside how well it overlaps (voxel indices z, y, x; None: empty)
            row["centre"] = metrics.mask_centre(logits > 0) if logits is not None else None
            row["target_centre"] = metrics.mask_centre(target)
            row.update(mask_box_scores(logits, target))
        if it.task == "rec" and it.target:
            target_box = [float(v) for v in it.target.strip("[]").split(",")]
            boxes = parse_boxes(text)
            row["iou"] = metrics.rec_iou(boxes[0] if boxes else None, target_box)
            row["true_iou"] = max(0.0, metrics.rec_iou(boxes[0] if boxes else None, target_box, official=False))
        rows.append(row)
    return {"split": split, "summary": summarise(rows), "rows": rows}


def summarise(rows: Sequence[dict]) -> dict:
    out: dict[str, dict] = {}
    by = defaultdict(list)
    for r in rows:
        by[r["task"]].append(r)
    for task, rs in by.items():
        s: dict = {"n": len(rs)}
        if task == "vqa_closed":
            s["accuracy"] = metrics.closed_vqa_accuracy([r["output"] for r in rs], [r["target"] for r in rs])
            s["majority_baseline"] = metrics.majority_baseline([r["target"] for r in rs])
        if task in ("caption", "vqa_open", "reg"):
            s["bleu1"] = metrics.bleu1([r["output"] for r in rs], [r["answer"] for r in rs])
            s["rouge1"] = metrics.rouge1([r["output"] for r in rs], [r["answer"] for r in rs])
        if task == "vqa_open":
            s["exact"] = float(np.mean([r["output"].strip(" .").lower() == r["answer"].strip(" .").lower() for r in rs]))
            s["majority_baseline"] = metrics.majority_baseline([r["answer"] for r in rs])
        if task == "reg":
            s["names_class"] = float(np.mean([r["target"].lower() in r["output"].lower() for r in rs]))
        if task == "rec":
            scored = [r for r in rs if "iou" in r]
            s["mean_iou_official"] = float(np.mean([max(r["iou"], 0.0) for r in scored])) if scored else None
            s["mean_iou"] = float(np.mean([r["true_iou"] for r in scored])) if scored else None
            s["parse_rate"] = float(np.mean([r["iou"] >= 0 for r in scored])) if scored else None
        if task in ("seg", "refseg"):
            s["dice"] = float(np.mean([r["dice"] for r in rs]))
            s["soft_dice"] = float(np.mean([r["soft_dice"] for r in rs]))
            boxed = [r for r in rs if "mask_box_iou" in r]  # rows whose target has a box (not an empty mask)
            if boxed:
                s["mask_box_iou"] = float(np.mean([r["mask_box_iou"] for r in boxed]))
                s["mask_box_iou_official"] = float(np.mean([r["mask_box_iou_official"] for r in boxed]))
            if task == "seg":
                organs, organ_boxes = defaultdict(list), defaultdict(list)
                for r in rs:
                    organs[r["target"]].append(r["dice"])
                    if "mask_box_iou" in r:
                        organ_boxes[r["target"]].append(r["mask_box_iou"])
                s["dice_per_organ"] = {k: float(np.mean(v)) for k, v in sorted(organs.items())}
                s["mask_box_iou_per_organ"] = {k: float(np.mean(v)) for k, v in sorted(organ_boxes.items())}
        out[task] = s
    return out


def mask_box_scores(logits: Optional[np.ndarray], target: np.ndarray) -> dict:
    """How the box around a [SEG] mask (what `Answer.mask_box` holds) matches the box of the target mask, both
    on the model grid as REC's boxes are: true IoU and the official REC score, 0 for no mask or an empty one; {}
    when the target is empty (no box to match)."""
    target_box = box_from_mask(target)
    if target_box is None:
        return {}
    box = box_from_mask(logits > 0) if logits is not None else None
    if box is None:
        return {"mask_box": None, "mask_box_iou": 0.0, "mask_box_iou_official": 0.0}
    return {"mask_box": box, "mask_box_iou": metrics.rec_iou(box, target_box, official=False),
            "mask_box_iou_official": max(0.0, metrics.rec_iou(box, target_box))}


def clip_retrieval(clip, n: int = 100, seed: int = 10_000) -> dict:
    """R@1/5/10 of image->text and text->image over `n` fresh phantom cases (never generated for training)."""
    from transformers import AutoTokenizer

    from m3d_edge.data.phantom import PLANE_ORIENTATION, generate_case, write_report
    from m3d_edge.model.clip import minilm_folder

    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    images, texts = [], []
    for i in range(n):
        case = generate_case(seed, i)
        # presented in the plane its report names, as the M3D-Cap images of the phantom data set are
        x, _ = to_model_input(case.volume, "ct", orientation=PLANE_ORIENTATION[case.plane])
        images.append(torch.from_numpy(x[0]))
        texts.append(write_report(case, np.random.default_rng(seed + i)))
    clip.eval()
    with torch.no_grad():
        img = torch.cat([clip.encode_image(torch.stack(images[i:i + 8])) for i in range(0, n, 8)])
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        txt = clip.encode_text(enc.input_ids, enc.attention_mask)
    sim = (img @ txt.T).numpy()  # [n images, n texts]
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        rank = (s > np.diag(s)[:, None]).sum(1)  # how many candidates beat the true pair
        out[name] = {f"R@{k}": float(np.mean(rank < k)) for k in (1, 5, 10)}
    out["candidates"] = n
    return out


def real_ct_check(model, tok, ct: str | Path, seg: str | Path, labels: dict[str, Sequence[int]]) -> dict:
    """Segment and box organs of a real CT (TotalSegmentator's example) and compare with its label map."""
    from m3d_edge.imaging import read

    volume, label_map = read(ct), read(seg).array
    x, transform = to_model_input(volume, "ct")
    image = torch.from_numpy(x)
    result: dict = {}
    on_model_grid: dict[str, np.ndarray] = {}  # each organ's label on the model grid, where boxes are taken
    for organ, ids in labels.items():
        target = np.isin(label_map, ids)
        on_model_grid[organ] = transform.mask_to_model(target)
        text, logits = ask(model, tok, image, f"Can you segment the {organ} in this image? Please output the mask.", 24)
        entry: dict = {"seg_output": text}
        if logits is not None:
            mask = transform.invert_mask((logits > 0).astype(np.uint8)).array
            entry["dice"] = metrics.dice(mask, target)
        else:
            entry["dice"] = 0.0
        entry.update(mask_box_scores(logits, on_model_grid[organ]))
        result[organ] = entry
    text, _ = ask(model, tok, image, "Where is the liver? Please output the box.", 48)
    boxes = parse_boxes(text)
    truth_box = box_from_mask(on_model_grid["liver"])
    result["liver_box"] = {"output": text, "label_box": truth_box,
                           "iou": metrics.rec_iou(boxes[0] if boxes else None, truth_box, official=False)
                           if boxes else -1.0}
    return result


def write_report_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(path)
    return path


# TotalSegmentator v2 ids (../shared/data/totalseg/labels.json); "kidney" is both, as the issue asks, and each
# side is asked by the name the phantom classes (and so phantom-small) use
TOTALSEG_LABELS = {"liver": (5,), "spleen": (1,), "kidney": (2, 3), "right kidney": (2,), "left kidney": (3,)}


def load_phantom_clip(path: str | Path):
    """The M3D-CLIP of the phantom-small recipe (phantom-small ViT + MiniLM text encoder) from its safetensors."""
    from safetensors.torch import load_file

    from m3d_edge.config import ClipConfig, preset
    from m3d_edge.model.clip import M3DCLIP, build_text_encoder

    cfg = ClipConfig(vision=preset("phantom-small").vision, text_hf_config={}, text_source="minilm",
                     text_pooling="mean")
    clip = M3DCLIP(cfg, build_text_encoder(cfg))
    clip.load_state_dict(load_file(str(path)))
    return clip.eval()


def model_card_metrics(checkpoint_dir: str | Path, data: str | Path, *, clip: Optional[str | Path] = None,
                       real_ct: Optional[str | Path] = None, per_task: int = 30, tasks: Sequence[str] = TASKS,
                       progress: bool = True) -> dict:
    """Everything a model card reports: held-out metrics of `tasks`, CLIP retrieval, and the real-CT check."""
    from m3d_edge.model import checkpoint, llm as llm_mod

    t0 = time.perf_counter()
    model = checkpoint.load(checkpoint_dir)
    tok = llm_mod.load_tokenizer(model.cfg.llm, checkpoint_dir)
    out: dict = {"checkpoint": str(checkpoint_dir), "data": str(data)}
    split = evaluate_split(model, tok, data, "test", per_task=per_task, tasks=tasks, progress=progress)
    out["test"] = split["summary"]
    out["rows"] = split["rows"]
    stats = Path(data) / "stats.json"
    if stats.is_file():
        out["baselines"] = json.loads(stats.read_text()).get("splits", {}).get("test")
    if clip is not None:
        out["clip_retrieval"] = clip_retrieval(load_phantom_clip(clip))
    if real_ct is not None:
        folder = Path(real_ct)
        out["real_ct"] = real_ct_check(model, tok, folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz",
                                       TOTALSEG_LABELS)
    out["seconds"] = time.perf_counter() - t0
    return out
