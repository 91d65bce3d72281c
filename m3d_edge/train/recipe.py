"""The phantom-small recipe: synth -> clip -> align -> instruct, sized for a 2-core CPU (about two hours).

    out/data/                phantom data set in the M3D layouts (unless --data is given)
    out/clip/  out/align/  out/instruct/     each stage's log.jsonl and resumable checkpoints
    out/model/               the merged LaMed checkpoint (config.json + model.safetensors + tokenizer + adapter)

Choices for the CPU budget, all recorded in the model card:
- the seg module shares the vision tower (one ViT instead of two);
- 32 image tokens (pooling 4) instead of 256;
- stage 1 runs on cached vision features (the tower is frozen there, so it is computed once per image);
- the text encoder of CLIP is the pretrained MiniLM-L6, frozen but for its projection;
- stage 2 trains LoRA (q, k, v, o), the projector, the vision tower, the seg module and only the four new token rows
  of the tied embedding (gradients of the pretrained rows are zeroed, so they stay bit-identical to SmolLM2);
- stage 2 samples the target organs (liver, spleen, kidneys) more often for seg / REC.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from m3d_edge.config import ClipConfig, preset
from m3d_edge.data.datasets import LaMedCollator, SampleList, TaskDataset, TaskItem, task_items, validate_items
from m3d_edge.model import checkpoint, llm as llm_mod
from m3d_edge.model.clip import M3DCLIP, build_text_encoder, minilm_folder
from m3d_edge.train import stages
from m3d_edge.train.loop import TrainConfig, run

TARGET_ORGANS = ("liver", "spleen", "right kidney", "left kidney")


@dataclass(frozen=True)
class RecipeConfig:
    out: str
    data: Optional[str] = None
    n_cases: int = 160
    seed: int = 0
    clip_steps: int = 120
    clip_batch: int = 4
    align_steps: int = 150
    instruct_steps: int = 600
    batch: int = 2
    lr_clip: float = 1e-4
    lr_align: float = 1e-3
    lr_instruct: float = 2e-4
    lr_seg: float = 1e-3  # the seg module starts from scratch (docs/training.md: it learns at 1e-3)
    lora_r: int = 16
    progress: bool = True


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_recipe(cfg: RecipeConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    data = Path(cfg.data) if cfg.data else out / "data"
    if not data.exists():
        from m3d_edge.data.phantom import synthesize

        _log(f"synth: {cfg.n_cases} phantom cases -> {data}")
        synthesize(data, cfg.n_cases, cfg.seed, progress=cfg.progress)
    train_items = validated_items(cfg, data)
    vision_state = train_clip(cfg, data, out / "clip")
    model, tok, collate = phantom_small(vision_state)
    train_align(cfg, model, collate, train_items, out / "align")
    adapter, lora = train_instruct(cfg, model, collate, train_items, out / "instruct")
    return _save(model, out / "model", tok, adapter, lora)


# -- the stages one at a time (m3d-edge train clip | align | instruct) -------------------------------------------

def clip_stage(cfg: RecipeConfig, data: str | Path) -> Path:
    """CLIP only: writes OUT/clip.safetensors (+ the run's log and checkpoints)."""
    validated_items(cfg, data)
    train_clip(cfg, Path(data), Path(cfg.out))
    return Path(cfg.out) / "clip.safetensors"


def align_stage(cfg: RecipeConfig, data: str | Path, clip: str | Path) -> Path:
    """Stage 1 from a CLIP run's weights: writes OUT/model (a compact checkpoint without LoRA)."""
    from safetensors.torch import load_file

    items = validated_items(cfg, data)
    prefix = "vision_encoder."
    vision = {k[len(prefix):]: v for k, v in load_file(str(clip)).items() if k.startswith(prefix)}
    if not vision:
        raise ValueError(f"{clip}: no vision_encoder.* weights; pass the clip.safetensors of a CLIP run")
    model, tok, collate = phantom_small(vision)
    train_align(cfg, model, collate, items, Path(cfg.out))
    return _save(model, Path(cfg.out) / "model", tok)


def instruct_stage(cfg: RecipeConfig, data: str | Path, model_dir: str | Path) -> Path:
    """Stage 2 from an align checkpoint: writes OUT/model."""
    storage = json.loads((Path(model_dir) / "config.json").read_text()).get("storage") or {}
    if storage.get("lora"):
        # a compact checkpoint holds one adapter over the base; a second one would be lost at reload
        raise ValueError(f"{model_dir} already holds a LoRA adapter; start stage 2 from an align checkpoint")
    items = validated_items(cfg, data)
    model = checkpoint.load(model_dir)
    tok = llm_mod.load_tokenizer(model.cfg.llm, model_dir)
    collate = LaMedCollator(tok, model.cfg.num_image_tokens, model.cfg.vision.image_size, max_length=400)
    adapter, lora = train_instruct(cfg, model, collate, items, Path(cfg.out))
    return _save(model, Path(cfg.out) / "model", tok, adapter, lora)


def validated_items(cfg: RecipeConfig, data: str | Path) -> list[TaskItem]:
    items = task_items(data, "train", seed=cfg.seed)
    _log(f"validating {len(items)} training samples")
    validate_items(items)
    return items


def phantom_small(vision_state: dict[str, torch.Tensor]):
    """The phantom-small LaMed (pretrained SmolLM2) with the given vision-tower weights, its tokenizer and collator."""
    model_cfg = preset("phantom-small")
    model = checkpoint.build(model_cfg)
    model.vision_tower.vision_tower.load_state_dict(vision_state)
    tok = llm_mod.load_tokenizer(model_cfg.llm)
    return model, tok, LaMedCollator(tok, model_cfg.num_image_tokens, model_cfg.vision.image_size, max_length=400)


def _save(model, final: Path, tok, adapter=None, lora=None) -> Path:
    if not final.exists():
        checkpoint.save_delta(model.eval(), final, adapter=adapter, lora=lora, tokenizer=tok)
    _log(f"saved {final}")
    return final


# -- stage 0: M3D-CLIP ------------------------------------------------------------------------------------------

def train_clip(cfg: RecipeConfig, data: Path, out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    vision = preset("phantom-small").vision
    clip_cfg = ClipConfig(vision=vision, text_hf_config={}, text_source="minilm")
    clip = M3DCLIP(clip_cfg, build_text_encoder(clip_cfg))
    for p in clip.language_encoder.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    caps = [it for it in task_items(data, "train", ("caption",), seed=cfg.seed)]

    def collate(items: Sequence[TaskItem]):
        enc = tok([it.answer for it in items], padding=True, truncation=True, max_length=128, return_tensors="pt")
        images = torch.stack([torch.from_numpy(np.load(it.image)) for it in items])
        return {"images": images, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    _log(f"clip: {len(caps)} image-report pairs, {cfg.clip_steps} steps of {cfg.clip_batch}")
    run(clip, [p for p in clip.parameters() if p.requires_grad], SampleList(caps), collate, stages.clip_loss,
        TrainConfig(out=str(out), max_steps=cfg.clip_steps, batch_size=cfg.clip_batch, lr=cfg.lr_clip,
                    weight_decay=0.1, save_every=max(1, cfg.clip_steps // 4), seed=cfg.seed, progress=cfg.progress))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "clip.safetensors"))
    return clip.vision_encoder.state_dict()


# -- stage 1: align (projector only, cached vision features) -----------------------------------------------------

class CachedFeatures:
    """Vision-tower patch tokens per image path, computed once while the tower is frozen."""

    def __init__(self, model, paths: Sequence[str]) -> None:
        self.tokens: dict[str, torch.Tensor] = {}
        model.eval()
        with torch.no_grad():
            for p in sorted(set(paths)):
                self.tokens[p] = model.vision_features(torch.from_numpy(np.load(p))[None])[0]

    def wrap(self, collate):
        def collate_cached(samples):
            batch = collate(samples)
            batch["patch_tokens"] = torch.stack([self.tokens[s.source] for s in samples])
            del batch["images"]
            return batch

        return collate_cached


def train_align(cfg: RecipeConfig, model, collate, items: Sequence[TaskItem], out: Path) -> None:
    rng = random.Random(cfg.seed)
    pool = [it for it in items if it.task in ("caption", "vqa_closed", "vqa_open")]  # official stage-1 data
    pool = rng.sample(pool, min(len(pool), cfg.align_steps * cfg.batch))
    params = stages.align_params(model)
    _log(f"align: caching vision features of {len({it.image for it in pool})} images")
    cache = CachedFeatures(model, [it.image for it in pool])
    _log(f"align: {len(pool)} samples, {cfg.align_steps} steps")
    run(model, params, TaskDataset(pool), cache.wrap(collate), stages.lamed_loss,
        TrainConfig(out=str(out), max_steps=cfg.align_steps, batch_size=cfg.batch, lr=cfg.lr_align,
                    save_every=max(1, cfg.align_steps // 3), seed=cfg.seed, progress=cfg.progress))


# -- stage 2: instruct -------------------------------------------------------------------------------------------

def instruct_mix(items: Sequence[TaskItem], n: int, seed: int) -> list[TaskItem]:
    """n samples: 45 % seg + refseg (target organs first), 20 % REC/REG, 25 % VQA, 10 % captions."""
    rng = random.Random(seed)
    by = {t: [it for it in items if it.task == t] for t in ("seg", "refseg", "rec", "reg", "vqa_closed", "vqa_open",
                                                              "caption")}
    seg_target = [it for it in by["seg"] if it.target in TARGET_ORGANS]
    rec_target = [it for it in by["rec"] + by["reg"] if any(o in it.answer or o in it.question for o in TARGET_ORGANS)]
    plan = [(seg_target, 0.30), (by["seg"], 0.05), (by["refseg"], 0.10), (rec_target, 0.15),
            (by["rec"] + by["reg"], 0.05), (by["vqa_closed"], 0.17), (by["vqa_open"], 0.08), (by["caption"], 0.10)]
    out: list[TaskItem] = []
    for pool, share in plan:
        if pool:
            out += [rng.choice(pool) for _ in range(round(share * n))]
    rng.shuffle(out)
    return out


def new_rows_only(embedding: torch.nn.Embedding, first_new: int) -> None:
    """Let only the rows >= first_new of a (tied) embedding learn: their gradient passes, the rest is zeroed.
    With zero gradient and no weight decay, Adam leaves the pretrained rows bit-identical."""
    mask = torch.zeros(embedding.weight.shape[0], 1)
    mask[first_new:] = 1.0
    embedding.weight.register_hook(lambda g: g * mask.to(g.dtype))


def train_instruct(cfg: RecipeConfig, model, collate, items: Sequence[TaskItem], out: Path) -> tuple[dict, dict]:
    stages.add_lora(model, r=cfg.lora_r, alpha=2 * cfg.lora_r, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    params = stages.instruct_params(model)
    emb = model.embed_tokens
    emb.weight.requires_grad_(True)
    new_rows_only(emb, model.cfg.im_patch_id)
    params.append(emb.weight)
    mix = instruct_mix(items, cfg.instruct_steps * cfg.batch, cfg.seed)
    frozen_rows = model.cfg.im_patch_id * emb.weight.shape[1]  # pretrained embedding rows, gradient zeroed
    trainable = sum(p.numel() for p in params if p.requires_grad) - frozen_rows
    _log(f"instruct: {len(mix)} samples, {cfg.instruct_steps} steps, {trainable / 1e6:.1f} M trainable values")
    seg_ids = {id(p) for m in (model.seg_module, model.seg_projector) for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in seg_ids]},
              {"params": [p for p in params if id(p) in seg_ids], "lr": cfg.lr_seg}]
    run(model, groups, TaskDataset(mix), collate, stages.lamed_loss,
        TrainConfig(out=str(out), max_steps=cfg.instruct_steps, batch_size=cfg.batch, lr=cfg.lr_instruct,
                    save_every=max(1, cfg.instruct_steps // 6), seed=cfg.seed, progress=cfg.progress))
    return stages.merge_lora(model)
