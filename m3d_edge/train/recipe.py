"""The phantom-small recipe: synth -> clip -> align -> instruct, sized for a 2-core CPU (about two hours).

    out/data/                phantom data set in the M3D layouts (unless --data is given)
    out/clip/  out/align/  out/instruct/     each stage's log.jsonl and resumable checkpoints
    out/model/               the merged LaMed checkpoint (config.json + model.safetensors + tokenizer + adapter)

Choices for the CPU budget, all recorded in the model card:
- the seg module shares the vision tower (one ViT instead of two);
- 32 image tokens (pooling 4) instead of 256;
- the CLIP stage also trains the seg module on the shared tower (class-prompted masks: a dense signal that teaches
  the from-scratch ViT anatomy far faster than the contrastive loss alone); CLIP's text encoder is the pretrained
  MiniLM-L6 with its own mean pooling, frozen but for its projection; the logit scale starts at 10 (a plain factor,
  as in the official code, whose initial 2.66 left the loss at chance in a CPU budget);
- the vision tower is frozen after the CLIP stage (`train_vision=False`), so stage 1 and stage 2 run on vision
  features computed once per image;
- stage 2 trains LoRA (q, k, v, o), the projector, the seg projector and seg module and only the four new token rows
  of the tied embedding (gradients of the pretrained rows are zeroed, so they stay bit-identical to SmolLM2);
- stage 2 samples the target organs (liver, spleen, kidneys) more often for seg / REC, and closed VQA most;
- bf16 autocast on CPUs with bf16 instructions (weights and optimizer state stay fp32);
- `closed_vqa_format="content"` (phantom-small v4): stage 2's closed-VQA answers name the choice before its letter
  ("Liver. Choice B."), so the first answer token carries what the model read (docs/training.md).
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from m3d_edge.config import ClipConfig, preset
from m3d_edge.data.datasets import (LaMedCollator, LaMedSample, SampleList, TaskDataset, TaskItem, task_items,
                                    validate_items, with_closed_vqa_format)
from m3d_edge.data.phantom import KEY_ORGANS
from m3d_edge.data.prompts import CLOSED_VQA_FORMATS
from m3d_edge.model import checkpoint, llm as llm_mod
from m3d_edge.model.clip import M3DCLIP, build_text_encoder, minilm_folder
from m3d_edge.model.segvol import SegVol
from m3d_edge.train import stages
from m3d_edge.train.loop import TrainConfig, cpu_supports_bf16, run


@dataclass(frozen=True)
class RecipeConfig:
    out: str
    data: Optional[str] = None
    n_cases: int = 256
    seed: int = 0
    clip_steps: int = 360
    clip_batch: int = 8
    clip_seg: bool = True  # train the seg module on the shared tower during the CLIP stage
    # before the CLIP loss: steps of class-prompted seg alone, every key organ and lesion of one image per ViT pass
    # (0 = none, as phantom-small v1; docs/training.md "Probes toward a v2")
    seg_warmup_steps: int = 0
    align_steps: int = 150
    instruct_steps: int = 1500
    batch: int = 4
    lr_clip: float = 3e-4
    lr_align: float = 1e-3
    lr_instruct: float = 2e-4
    lr_seg: float = 1e-3  # the seg module starts from scratch (docs/training.md: it learns at 1e-3)
    # the seg module's rate in stage 2 (the seg projector keeps lr_seg); None: lr_seg (v1). A decoder that the
    # warm-up already taught is fine-tuned slower while the [SEG] states it is prompted with are still untrained.
    lr_seg_instruct: Optional[float] = None
    lora_r: int = 16
    # stage 2's LM term: "token" averages over all answer tokens of a batch (official, v1, v2); "sample" averages
    # within each sample first, so that long reports do not drown short answers (model.lamed.lm_loss)
    lm_loss: str = "token"
    # stage 2's closed-VQA answers: "letter" = official "B. Liver"; "content" = "Liver. Choice B." (prompts.py)
    closed_vqa_format: str = "letter"
    # stage 2 trains the vision tower too (official; its rate: instruct_groups); False (v1-v5) caches its features
    train_vision: bool = False
    # the seg stage after stage 2 (ours; `train_seg`): its steps (0 = none, v1-v6), and the width of the detail
    # path it adds to the seg module (SegConfig.detail_channels; 0 = none)
    seg_steps: int = 0
    seg_detail_channels: int = 0
    # the seg stage shows each image this many times an epoch, each time with all its key-organ masks and a share
    # of its other masks (`seg_stage_entries`): the key organs get that many times the steps; 1 = every mask once
    seg_key_repeat: int = 1
    # a folder where the seg stage keeps the [SEG] states it computes, keyed by the frozen weights and the samples
    # (`SegStateCache`): a later seg stage from the same LLM, projector and tower reads them instead (None = none)
    seg_states_cache: Optional[str] = None
    mixed_precision: str = field(default_factory=lambda: "bf16" if cpu_supports_bf16() else "auto")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lm_loss not in ("token", "sample"):
            raise ValueError(f"RecipeConfig.lm_loss must be token or sample, got {self.lm_loss!r}")
        if self.closed_vqa_format not in CLOSED_VQA_FORMATS:
            raise ValueError(f"RecipeConfig.closed_vqa_format must be one of {', '.join(CLOSED_VQA_FORMATS)}, "
                             f"got {self.closed_vqa_format!r}")
        if self.seg_key_repeat < 1:
            raise ValueError(f"RecipeConfig.seg_key_repeat must be at least 1, got {self.seg_key_repeat}")


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
    pretrained = train_clip(cfg, data, out / "clip")
    model, tok, collate = phantom_small(pretrained)
    train_align(cfg, model, collate, train_items, out / "align")
    adapter, lora = train_instruct(cfg, model, collate, train_items, out / "instruct")
    if cfg.seg_steps:
        if cfg.seg_detail_channels:
            add_detail_path(model, cfg.seg_detail_channels)
        train_seg(cfg, model, collate, train_items, out / "seg")
    return _save(model, out / "model", tok, adapter, lora)


# -- the stages one at a time (m3d-edge train clip | align | instruct) -------------------------------------------

def clip_stage(cfg: RecipeConfig, data: str | Path) -> Path:
    """CLIP only: writes OUT/clip.safetensors (+ OUT/seg.safetensors with the seg warm-up, the run's log and
    checkpoints)."""
    validated_items(cfg, data)
    train_clip(cfg, Path(data), Path(cfg.out))
    return Path(cfg.out) / "clip.safetensors"


def align_stage(cfg: RecipeConfig, data: str | Path, clip: str | Path) -> Path:
    """Stage 1 from a CLIP run's weights: writes OUT/model (a compact checkpoint without LoRA)."""
    items = validated_items(cfg, data)
    model, tok, collate = phantom_small(load_pretrained(clip))
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


def seg_stage(cfg: RecipeConfig, data: str | Path, model_dir: str | Path,
              extra_data: Sequence[str | Path] = ()) -> Path:
    """Seg only, from a stage-2 checkpoint (ours, not the official recipe): writes OUT/model.

    The LLM, its LoRA and the vision tower stay as they are; the [SEG] states that stage 2's answers give and the
    tower's tokens are computed once; the seg projector and seg module are trained on every seg mask of the
    training split (of `data` and of each `extra_data` set, e.g. phantoms of another seed), one image a step with
    all its masks. With `cfg.seg_detail_channels` and a checkpoint without a detail path, the path is added (its
    last layer at zero, so training starts from the checkpoint's masks) and trained at lr_seg, the rest of the seg
    module at lr_seg_instruct (default lr_seg / 5). With `cfg.seg_states_cache` the [SEG] states are read from,
    and added to, that folder (`SegStateCache`).
    """
    if not cfg.seg_steps:
        raise ValueError("the seg stage needs seg_steps > 0")
    model_dir = Path(model_dir)
    items = validated_items(cfg, data, extra_data)
    model = checkpoint.load(model_dir)
    if model.cfg.seg is None:
        raise ValueError(f"{model_dir}: the model has no seg module")
    if cfg.seg_detail_channels and not model.seg_module.has_detail:
        add_detail_path(model, cfg.seg_detail_channels)
    storage = json.loads((model_dir / "config.json").read_text()).get("storage") or {}
    adapter = {k[len("lora."):]: v for k, v in checkpoint.read_state_dict(model_dir).items() if k.startswith("lora.")}
    tok = llm_mod.load_tokenizer(model.cfg.llm, model_dir)
    collate = LaMedCollator(tok, model.cfg.num_image_tokens, model.cfg.vision.image_size, max_length=400)
    train_seg(cfg, model, collate, items, Path(cfg.out))
    return _save(model, Path(cfg.out) / "model", tok, adapter or None, storage.get("lora"))


def add_detail_path(model, channels: int) -> None:
    """Give `model`'s seg module a detail path of width `channels` (`segvol.DetailNet`), keeping its weights."""
    import dataclasses

    seg_cfg = dataclasses.replace(model.cfg.seg, detail_channels=channels)
    seg = SegVol(seg_cfg, model.cfg.vision)
    missing, unexpected = seg.load_state_dict(model.seg_module.state_dict(), strict=False)
    if unexpected or any(not k.startswith("detail.") for k in missing):
        raise ValueError(f"cannot add a detail path: missing {missing}, unexpected {unexpected}")
    model.seg_module = seg
    model.cfg = dataclasses.replace(model.cfg, seg=seg_cfg)


def seg_stage_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Dice + BCE of the masks of one image, each prompted by the [SEG] state its sample gives, at the mask
    decoder's output grid (the masks area-averaged to it: 16x fewer voxels than the official full-size loss, the
    same optimum up to the final trilinear upsampling)."""
    from m3d_edge.model.lamed import dice_loss

    seg = model.seg_module
    logits = seg.decode(seg.tokens_to_grid(batch["patch_tokens"]), model.seg_projector(batch["seg_hidden"]),
                        detail=seg.detail_features(batch["images"]), upsample=False).float()
    dice = dice_loss(logits, batch["seg_masks"])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["seg_masks"])
    return dice + bce, {"dice_loss": float(dice.detach()), "bce_loss": float(bce.detach())}


def train_seg(cfg: RecipeConfig, model, collate, items: Sequence[TaskItem], out: Path) -> None:
    from tqdm.auto import tqdm

    seg_items = [it for it in items if it.task == "seg" and it.mask is not None]
    if not seg_items:
        raise ValueError("no seg samples with a mask in the training split")
    _log(f"seg: caching vision features of {len({it.image for it in seg_items})} images and the [SEG] states of "
         f"{len(seg_items)} samples (LLM and tower frozen)")
    cache = CachedFeatures(model, seg_items, cfg.progress)
    stored = SegStateCache(cfg.seg_states_cache, model) if cfg.seg_states_cache else None
    states: dict[str, list[tuple[str, str, torch.Tensor]]] = {}
    with torch.no_grad():
        for it in tqdm(seg_items, desc="[SEG] states", disable=not cfg.progress):
            # only the text is needed here: the masks are read per step, at training time
            ids, _ = collate.encode(LaMedSample(None, it.question, it.answer, source=it.mask))
            key = stored.key(it.image, cache.tokens[it.image], ids) if stored else None
            h = stored.get(key) if stored else None
            if h is None:
                hs, found = model.seg_states(None, torch.tensor([ids]), patch_tokens=cache.tokens[it.image][None])
                if not found.all():
                    raise ValueError(f"{it.mask}: the sample's answer has no [SEG] token")
                h = hs[0]
                if stored:
                    stored.put(key, h)
            states.setdefault(it.image, []).append((it.mask, it.target, h))
    if stored:
        _log(f"seg: {stored.hits} [SEG] states read from {stored.path}, {stored.added} computed")
        stored.save()
    entries = seg_stage_entries({image: [c for _, c, _ in s] for image, s in sorted(states.items())},
                                cfg.seg_key_repeat)
    pool = tuple(i // (4 * g) for i, g in zip(model.cfg.vision.image_size, model.cfg.vision.grid))  # to 4x the grid

    def collate_image(batch):
        ((image, picked),) = batch
        chosen = [states[image][i] for i in picked]
        return {"images": torch.from_numpy(np.load(image))[None], "patch_tokens": cache.tokens[image][None],
                "seg_hidden": torch.stack([h for _, _, h in chosen]),
                "seg_masks": torch.nn.functional.avg_pool3d(
                    torch.stack([torch.from_numpy(np.load(m)).float() for m, _, _ in chosen]), pool)}

    for p in model.parameters():
        p.requires_grad_(False)
    seg_params = list(model.seg_projector.parameters()) + list(model.seg_module.parameters())
    for p in seg_params:
        p.requires_grad_(True)
    detail_ids = {id(p) for p in model.seg_module.detail.parameters()} if model.seg_module.has_detail else set()
    rest_lr = cfg.lr_seg / 5 if cfg.lr_seg_instruct is None else cfg.lr_seg_instruct
    groups = [{"params": [p for p in seg_params if id(p) in detail_ids]},
              {"params": [p for p in seg_params if id(p) not in detail_ids], "lr": rest_lr}]
    _log(f"seg: {len(states)} images, {cfg.seg_steps} steps of one image with "
         + ("all its masks" if cfg.seg_key_repeat == 1 else
            f"its key-organ masks and 1/{cfg.seg_key_repeat} of the others ({len(entries)} an epoch)"))
    run(model, groups, SampleList(entries), collate_image, seg_stage_loss,
        _train_config(cfg, out, cfg.seg_steps, 1, cfg.lr_seg, 4))


def seg_stage_entries(classes: dict[str, Sequence[str]], key_repeat: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """The seg stage's epoch: (image, indices of its masks) entries, given each image's mask classes in order.

    Each image appears `key_repeat` times, each time with all its key-organ masks (phantom.KEY_ORGANS) and every
    key_repeat-th of its other masks, offset by the pass, so that every mask comes once or more an epoch and the
    key organs key_repeat times; an entry left with no mask is dropped. key_repeat 1: one entry an image, every
    mask (v7, v8). Fewer masks an entry is also a cheaper step: the decoder runs once per mask."""
    entries = []
    for image, names in classes.items():
        key = [i for i, c in enumerate(names) if c in KEY_ORGANS]
        other = [i for i, c in enumerate(names) if c not in KEY_ORGANS]
        for r in range(key_repeat):
            picked = tuple(sorted(key + other[r::key_repeat]))
            if picked:
                entries.append((image, picked))
    return entries


def validated_items(cfg: RecipeConfig, data: str | Path, extra_data: Sequence[str | Path] = ()) -> list[TaskItem]:
    """The training split's samples of `data`, then of each `extra_data` set, every file checked before a step."""
    roots = [Path(data), *map(Path, extra_data)]
    resolved = [r.resolve() for r in roots]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"the same data set is given twice among {[str(r) for r in roots]}; its samples would "
                         "count double: pass each folder once")
    items = [it for root in roots for it in task_items(root, "train", seed=cfg.seed)]
    _log(f"validating {len(items)} training samples" + (f" of {len(roots)} data sets" if extra_data else ""))
    validate_items(items)
    return items


def load_pretrained(clip: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The vision tower of a CLIP run's clip.safetensors, and its seg warm-up (seg.safetensors beside it) if any."""
    from safetensors.torch import load_file

    clip = Path(clip)
    prefix = "vision_encoder."
    vision = {k[len(prefix):]: v for k, v in load_file(str(clip)).items() if k.startswith(prefix)}
    if not vision:
        raise ValueError(f"{clip}: no vision_encoder.* weights; pass the clip.safetensors of a CLIP run")
    seg_file = clip.with_name("seg.safetensors")
    seg = {k[len("seg_module."):]: v for k, v in load_file(str(seg_file)).items()
           if k.startswith("seg_module.")} if seg_file.is_file() else {}
    return {"vision": vision, "seg": seg}


def phantom_small(pretrained: dict[str, dict[str, torch.Tensor]]):
    """The phantom-small LaMed (pretrained SmolLM2) with the CLIP stage's vision tower (and seg module, when the
    stage trained one), its tokenizer and collator."""
    model_cfg = preset("phantom-small")
    model = checkpoint.build(model_cfg)
    model.vision_tower.vision_tower.load_state_dict(pretrained["vision"])
    if pretrained.get("seg"):
        model.seg_module.load_state_dict(pretrained["seg"])
    tok = llm_mod.load_tokenizer(model_cfg.llm)
    return model, tok, LaMedCollator(tok, model_cfg.num_image_tokens, model_cfg.vision.image_size, max_length=400)


def _save(model, final: Path, tok, adapter=None, lora=None) -> Path:
    if not final.exists():  # float16 storage: the compact model stays under ~25 MB (rounding, not a different model)
        checkpoint.save_delta(model.eval(), final, adapter=adapter, lora=lora, tokenizer=tok, dtype=torch.float16)
    _log(f"saved {final}")
    return final


def _train_config(cfg: RecipeConfig, out: Path, steps: int, batch: int, lr: float, saves: int, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), max_steps=steps, batch_size=batch, lr=lr, save_every=max(1, steps // saves),
                       seed=cfg.seed, progress=cfg.progress, mixed_precision=cfg.mixed_precision, **kw)


# -- stage 0: M3D-CLIP, with the seg module learning on the same tower --------------------------------------------

class VisionPretraining(nn.Module):
    """M3D-CLIP plus, optionally, the seg module on its vision encoder, prompted by one learned vector per class.

    The contrastive loss alone gives a from-scratch 3D ViT little signal in a CPU budget (docs/training.md); class
    masks give a dense one. The class vectors live in the space the seg projector maps the [SEG] hidden state to,
    so stage 2 starts from a decoder that already segments.
    """

    def __init__(self, clip: M3DCLIP, seg: Optional[SegVol], classes: Sequence[str], prompt_dim: int) -> None:
        super().__init__()
        self.clip = clip
        self.classes = list(classes)
        self.seg_module = seg
        if seg is not None:
            self.class_prompts = nn.Embedding(len(self.classes), prompt_dim)
            nn.init.normal_(self.class_prompts.weight, std=0.02)


def class_seg_loss(model: VisionPretraining, images: torch.Tensor, patches: torch.Tensor, masks: torch.Tensor,
                   classes: torch.Tensor,
                   owner: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Dice + BCE of the class-prompted masks on the tower's patch tokens (and the images, for a detail path).
    `owner[m]` is the image of mask m (default: mask m belongs to image m), so one pass of the tower serves
    several masks of an image."""
    from m3d_edge.model.lamed import dice_loss

    seg = model.seg_module
    grid = seg.tokens_to_grid(patches)
    detail = seg.detail_features(images)
    if owner is not None:
        grid = grid[owner]
        detail = detail[owner] if detail is not None else None
    logits = seg.decode(grid, model.class_prompts(classes), detail=detail).float()
    dice = dice_loss(logits, masks)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    return dice + bce, {"dice_loss": float(dice.detach()), "bce_loss": float(bce.detach())}


def vision_loss(model: VisionPretraining, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = stages.clip_loss(model.clip, batch)
    metrics["clip_loss"] = float(loss.detach())
    if "seg_images" in batch:
        patches = model.clip.vision_encoder(batch["seg_images"])[:, 1:]  # the LLM tower drops CLS the same way
        seg, seg_metrics = class_seg_loss(model, batch["seg_images"], patches, batch["seg_masks"],
                                          batch["seg_classes"])
        metrics.update(seg_metrics)
        loss = loss + seg
    return loss, metrics


def seg_warmup_loss(model: VisionPretraining, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The seg warm-up: the tower runs once per image, the mask decoder once per mask of that image."""
    patches = model.clip.vision_encoder(batch["images"])[:, 1:]
    return class_seg_loss(model, batch["images"], patches, batch["seg_masks"], batch["seg_classes"],
                          batch["seg_owner"])


# The warm-up's classes: the organs the targets name, and the lesions the VQA and referring questions ask about.
SEG_WARMUP_CLASSES = (*KEY_ORGANS, "lesion")


def seg_sets(items: Sequence[TaskItem], classes: Sequence[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The seg items with a mask grouped by image: (image, [(mask, class), ...]) for the listed classes, in the
    order of `classes`; images without any of them are left out."""
    rank = {c: i for i, c in enumerate(classes)}
    by_image: dict[str, list[tuple[str, str]]] = {}
    for it in items:
        if it.task == "seg" and it.mask is not None and it.target in rank:
            by_image.setdefault(it.image, []).append((it.mask, it.target))
    return [(image, sorted(masks, key=lambda m: rank[m[1]])) for image, masks in by_image.items()]


def train_seg_warmup(cfg: RecipeConfig, model: VisionPretraining, sets: Sequence[tuple[str, list[tuple[str, str]]]],
                     out: Path) -> None:
    """Class-prompted seg alone on the shared tower, one image per step with all its masks (lr_seg for all)."""
    classes = model.classes

    def collate(batch):
        masks, names, owner = [], [], []
        for b, (_, pairs) in enumerate(batch):
            for mask, name in pairs:
                masks.append(torch.from_numpy(np.load(mask)).float())
                names.append(classes.index(name))
                owner.append(b)
        return {"images": torch.stack([torch.from_numpy(np.load(image)) for image, _ in batch]),
                "seg_masks": torch.stack(masks), "seg_classes": torch.tensor(names), "seg_owner": torch.tensor(owner)}

    params = (list(model.clip.vision_encoder.parameters()) + list(model.seg_module.parameters())
              + [model.class_prompts.weight])
    _log(f"seg warm-up: {len(sets)} images, {cfg.seg_warmup_steps} steps of one image with its "
         f"{'/'.join(SEG_WARMUP_CLASSES)} masks")
    run(model, params, SampleList(list(sets)), collate, seg_warmup_loss,
        _train_config(cfg, out, cfg.seg_warmup_steps, 1, cfg.lr_seg, 4))


def _seg_pairs(items: Sequence[TaskItem], n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (image, mask, class) draws from the seg items with a mask: 60 % a target organ, 40 % any class."""
    rng = random.Random(f"{seed}-clip-seg")
    with_mask = [it for it in items if it.task == "seg" and it.mask is not None]
    target = [it for it in with_mask if it.target in KEY_ORGANS]
    out = []
    for _ in range(n):
        it = rng.choice(target if target and rng.random() < 0.6 else with_mask)
        out.append((it.image, it.mask, it.target))
    return out


def train_clip(cfg: RecipeConfig, data: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    model_cfg = preset("phantom-small")
    clip_cfg = ClipConfig(vision=model_cfg.vision, text_hf_config={}, text_source="minilm", text_pooling="mean")
    clip = M3DCLIP(clip_cfg, build_text_encoder(clip_cfg))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    for p in clip.language_encoder.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    caps = task_items(data, "train", ("caption",), seed=cfg.seed)
    n = cfg.clip_steps * cfg.clip_batch
    rng = random.Random(f"{cfg.seed}-clip")
    draws = [rng.choice(caps) for _ in range(n)]
    use_seg = cfg.clip_seg and model_cfg.seg is not None and model_cfg.seg.share_vision_encoder
    seg_items = task_items(data, "train", ("seg",), seed=cfg.seed) if use_seg else []
    pairs = _seg_pairs(seg_items, n, cfg.seed) if seg_items else []
    classes = sorted({c for _, _, c in pairs})
    model = VisionPretraining(clip, SegVol(model_cfg.seg, model_cfg.vision) if pairs else None, classes,
                              model_cfg.mm_hidden_size)
    samples = [(cap, pairs[i] if pairs else None) for i, cap in enumerate(draws)]
    if cfg.seg_warmup_steps:
        if not pairs:
            raise ValueError(f"{data}: a seg warm-up needs seg masks and a seg module that shares the vision tower")
        missing = sorted(set(SEG_WARMUP_CLASSES) - set(classes))
        if missing:
            raise ValueError(f"{data}: no training masks of {', '.join(missing)} for the seg warm-up")
        train_seg_warmup(cfg, model, seg_sets(seg_items, SEG_WARMUP_CLASSES), out / "seg-warmup")

    def collate(batch):
        enc = tok([c.answer for c, _ in batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out = {"images": torch.stack([torch.from_numpy(np.load(c.image)) for c, _ in batch]),
               "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        if pairs:
            out["seg_images"] = torch.stack([torch.from_numpy(np.load(s[0])) for _, s in batch])
            out["seg_masks"] = torch.stack([torch.from_numpy(np.load(s[1])).float() for _, s in batch])
            out["seg_classes"] = torch.tensor([classes.index(s[2]) for _, s in batch])
        return out

    seg_params = list(model.seg_module.parameters()) + [model.class_prompts.weight] if pairs else []
    groups = [{"params": [p for p in clip.parameters() if p.requires_grad]}]
    if seg_params:
        groups.append({"params": seg_params, "lr": cfg.lr_seg})
    _log(f"clip: {len(caps)} image-report pairs, {cfg.clip_steps} steps of {cfg.clip_batch}"
         + (f"; seg warm-up on {len(classes)} classes" if pairs else ""))
    run(model, groups, SampleList(samples), collate, vision_loss,
        _train_config(cfg, out, cfg.clip_steps, cfg.clip_batch, cfg.lr_clip, 4, weight_decay=0.1))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "clip.safetensors"))
    if pairs:
        save_file({f"seg_module.{k}": v.contiguous() for k, v in model.seg_module.state_dict().items()},
                  str(out / "seg.safetensors"))
    return {"vision": clip.vision_encoder.state_dict(), "seg": model.seg_module.state_dict() if pairs else {}}


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class SegStateCache:
    """[SEG] states kept on disk between seg stages (ours). Every seg stage since v7 starts from an LLM, projector
    and tower that the stages before it left as they were, so it would compute the same states again (most of
    its 6-30 minutes of caching at phantom-small's sizes). One safetensors file per set of frozen weights, named
    by a sha256 over every weight but the seg projector's and the seg module's; an entry per sample, keyed by a
    sha256 of the image's tower tokens and the sample's token ids, so a changed image or text is computed anew."""

    def __init__(self, folder: str | Path, model) -> None:
        import hashlib

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            if not name.startswith(("seg_projector.", "seg_module.")):
                digest.update(name.encode())
                digest.update(_raw_bytes(tensor))
        self.path = Path(folder) / f"seg-states-{digest.hexdigest()[:20]}.safetensors"
        try:
            self.states: dict[str, torch.Tensor] = load_file(str(self.path)) if self.path.is_file() else {}
        except SafetensorError as e:
            raise ValueError(f"{self.path}: not a readable [SEG] states file ({e}); delete it and the seg stage "
                             f"computes the states again") from e
        self.hits = self.added = 0
        self._tokens_digest: dict[str, bytes] = {}  # per image: its tokens hashed once, not once per sample

    def key(self, image: str, tokens: torch.Tensor, ids: Sequence[int]) -> str:
        """The entry of one sample: `image`'s tower `tokens` (hashed on the image's first sample) and its ids."""
        import hashlib

        if image not in self._tokens_digest:
            self._tokens_digest[image] = hashlib.sha256(_raw_bytes(tokens)).digest()
        h = hashlib.sha256(self._tokens_digest[image])
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        return h.hexdigest()

    def get(self, key: str) -> Optional[torch.Tensor]:
        state = self.states.get(key)
        self.hits += state is not None
        return state

    def put(self, key: str, state: torch.Tensor) -> None:
        self.states[key] = state.detach().contiguous()
        self.added += 1

    def save(self) -> None:
        """Write the file if anything was added (to a temporary name first, then renamed)."""
        from safetensors.torch import save_file

        if not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(self.states, str(tmp))
        tmp.replace(self.path)


# -- cached vision features (stages with a frozen tower) ---------------------------------------------------------

class CachedFeatures:
    """Vision-tower patch tokens per image file, computed once while the tower is frozen."""

    def __init__(self, model, items: Sequence[TaskItem], progress: bool = False) -> None:
        from tqdm.auto import tqdm

        first = {}
        for it in items:
            first.setdefault(it.image, it)
        loader = TaskDataset(list(first.values()))  # keyed as LaMedSample.image_key: the item's image file
        self.tokens: dict[str, torch.Tensor] = {}
        model.eval()
        with torch.no_grad():
            for i in tqdm(range(len(loader)), desc="vision features", disable=not progress):
                image = torch.from_numpy(loader.image(i))[None]
                self.tokens[loader.items[i].image] = model.vision_features(image)[0]

    def wrap(self, collate, keep_images: bool = False):
        """`collate` with the cached tokens added; the images are dropped unless kept (a seg detail path reads
        them)."""
        def collate_cached(samples):
            batch = collate(samples)
            batch["patch_tokens"] = torch.stack([self.tokens[s.image_key] for s in samples])
            if not keep_images:
                batch.pop("images", None)
            return batch

        return collate_cached


# -- stage 1: align (projector only, cached vision features) -----------------------------------------------------

def train_align(cfg: RecipeConfig, model, collate, items: Sequence[TaskItem], out: Path) -> None:
    rng = random.Random(cfg.seed)
    pool = [it for it in items if it.task in ("caption", "vqa_closed", "vqa_open")]  # official stage-1 data
    pool = rng.sample(pool, min(len(pool), cfg.align_steps * cfg.batch))
    params = stages.align_params(model)
    _log(f"align: caching vision features of {len({it.image for it in pool})} images")
    cache = CachedFeatures(model, pool, cfg.progress)
    _log(f"align: {len(pool)} samples, {cfg.align_steps} steps")
    run(model, params, TaskDataset(pool, with_images=False), cache.wrap(collate), stages.lamed_loss,
        _train_config(cfg, out, cfg.align_steps, cfg.batch, cfg.lr_align, 3))


# -- stage 2: instruct -------------------------------------------------------------------------------------------

def instruct_mix(items: Sequence[TaskItem], n: int, seed: int) -> list[TaskItem]:
    """n samples: 30 % seg + refseg (target organs first), 20 % REC/REG, 40 % VQA (closed most), 10 % captions.
    Fewer "[SEG]" answers than a uniform mix: with half of the answers a "[SEG]" form, a first run learned to
    answer "[SEG]." to everything (docs/training.md)."""
    rng = random.Random(seed)
    by = {t: [it for it in items if it.task == t] for t in ("seg", "refseg", "rec", "reg", "vqa_closed", "vqa_open",
                                                              "caption")}
    seg_target = [it for it in by["seg"] if it.target in KEY_ORGANS]
    rec_target = [it for it in by["rec"] + by["reg"] if any(o in it.answer or o in it.question for o in KEY_ORGANS)]
    plan = [(seg_target, 0.18), (by["seg"], 0.04), (by["refseg"], 0.08), (rec_target, 0.12),
            (by["rec"] + by["reg"], 0.08), (by["vqa_closed"], 0.30), (by["vqa_open"], 0.10), (by["caption"], 0.10)]
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


def instruct_groups(cfg: RecipeConfig, model, params: Sequence[nn.Parameter]) -> list[dict]:
    """Stage 2's optimizer groups: LoRA, projector and new token rows at lr_instruct (the loop's rate); the seg
    projector at lr_seg; the seg module at lr_seg_instruct, and with it the vision tower when it trains (the
    warm-up taught the two together)."""
    projector_ids = {id(p) for p in model.seg_projector.parameters()}
    module_ids = {id(p) for p in model.seg_module.parameters()}
    if cfg.train_vision:
        module_ids |= {id(p) for p in model.vision_tower.parameters()}
    module_lr = cfg.lr_seg if cfg.lr_seg_instruct is None else cfg.lr_seg_instruct
    seg_ids = projector_ids | module_ids
    return [{"params": [p for p in params if id(p) not in seg_ids]},
            {"params": [p for p in params if id(p) in projector_ids], "lr": cfg.lr_seg},
            {"params": [p for p in params if id(p) in module_ids], "lr": module_lr}]


def train_instruct(cfg: RecipeConfig, model, collate, items: Sequence[TaskItem], out: Path) -> tuple[dict, dict]:
    mix = with_closed_vqa_format(instruct_mix(items, cfg.instruct_steps * cfg.batch, cfg.seed), cfg.closed_vqa_format)
    cache = None
    if not cfg.train_vision:
        _log(f"instruct: caching vision features of {len({it.image for it in mix})} images (tower frozen)")
        cache = CachedFeatures(model, mix, cfg.progress)
    stages.add_lora(model, r=cfg.lora_r, alpha=2 * cfg.lora_r, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    params = stages.instruct_params(model, train_vision=cfg.train_vision)
    emb = model.embed_tokens
    emb.weight.requires_grad_(True)
    new_rows_only(emb, model.cfg.im_patch_id)
    params.append(emb.weight)
    frozen_rows = model.cfg.im_patch_id * emb.weight.shape[1]  # pretrained embedding rows, gradient zeroed
    trainable = sum(p.numel() for p in params if p.requires_grad) - frozen_rows
    _log(f"instruct: {len(mix)} samples, {cfg.instruct_steps} steps, {trainable / 1e6:.1f} M trainable values")
    groups = instruct_groups(cfg, model, params)
    detail = model.cfg.seg is not None and model.cfg.seg.detail_channels > 0  # the seg detail path reads images
    dataset = TaskDataset(mix, with_images=cache is None or detail)
    loss = functools.partial(stages.lamed_loss, per_sample=cfg.lm_loss == "sample")
    run(model, groups, dataset, cache.wrap(collate, keep_images=detail) if cache else collate, loss,
        _train_config(cfg, out, cfg.instruct_steps, cfg.batch, cfg.lr_instruct, 6))
    return stages.merge_lora(model)
