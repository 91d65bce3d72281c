"""The three training stages of the official recipe (spec §5, §6), as (trainable parameters, loss function) pairs
for `train.loop.run`.

    clip      M3D-CLIP: the 3D ViT and the text encoder, symmetric contrastive loss
    align     stage 1: only the projector learns (LLM and ViT frozen), on captions
    instruct  stage 2: LoRA on the LLM, projector, vision tower, seg projector and seg module; all tasks mixed;
              LM loss + Dice + BCE on samples with a mask
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from m3d_edge.model.clip import M3DCLIP
from m3d_edge.model.lamed import LaMed
from m3d_edge.model.lora import MergedLora, with_lora

# Every nn.Linear inside the LLM's decoder layers gets LoRA (official: all LLM linears but lm_head).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj")


def clip_loss(model: M3DCLIP, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return out.loss, {"logit_scale": float(model.logit_scale.detach())}


def lamed_loss(model: LaMed, batch: dict[str, Any], *,
               per_sample: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """LaMed's training loss. per_sample=False: the official LM term, a mean over every answer token of the batch.
    per_sample=True: a mean over each sample's answer tokens, then over the samples (`lamed.lm_loss`)."""
    out = model(batch.get("images"), batch["input_ids"], labels=batch["labels"],
                attention_mask=batch.get("attention_mask"), segs=batch.get("segs"),
                patch_tokens=batch.get("patch_tokens"), per_sample_lm=per_sample)
    metrics = {k: float(getattr(out, k).detach()) for k in ("lm_loss", "dice_loss", "bce_loss")
               if getattr(out, k) is not None}
    return out.loss, metrics


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def align_params(model: LaMed) -> list[nn.Parameter]:
    """Stage 1: everything frozen but the projector."""
    freeze(model)
    for p in model.mm_projector.parameters():
        p.requires_grad_(True)
    return list(model.mm_projector.parameters())


def add_lora(model: LaMed, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Wrap the LLM with peft LoRA adapters (official settings: r 16, alpha 32, dropout 0.05, every linear)."""
    from peft import LoraConfig

    names = {n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)}
    targets = sorted(names & set(targets))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets,
                        task_type="CAUSAL_LM")
    model.llm = with_lora(model.llm, config)


def merge_lora(model: LaMed) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold the adapters into the base weights (the model becomes a plain LaMed again). Returns the adapter
    weights and the LoRA settings, so that `checkpoint.save_delta` can keep them beside the merged model."""
    from peft import PeftModel, get_peft_model_state_dict

    if not isinstance(model.llm, PeftModel):
        raise ValueError("the model has no LoRA adapters to merge")
    pc = model.llm.peft_config["default"]
    settings = {"r": pc.r, "lora_alpha": pc.lora_alpha, "lora_dropout": pc.lora_dropout, "bias": pc.bias,
                "target_modules": sorted(pc.target_modules), "task_type": "CAUSAL_LM"}
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.llm).items()}
    model.llm = model.llm.merge_and_unload()
    model.merged_lora = MergedLora.from_adapter(adapter, settings)
    return adapter, settings


def instruct_params(model: LaMed, *, train_embeddings: bool = False, train_vision: bool = True) -> list[nn.Parameter]:
    """Stage 2: LoRA adapters + projector + vision tower (unless train_vision=False) + seg projector + seg module
    (+ embeddings if asked)."""
    freeze(model)
    if not hasattr(model.llm, "peft_config"):
        add_lora(model)
    trainable = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    modules = [model.mm_projector] + ([model.vision_tower] if train_vision else [])
    if model.cfg.seg is not None:
        modules += [model.seg_projector, model.seg_module]
    if train_embeddings:
        modules.append(model.llm.get_input_embeddings())
    for m in modules:
        trainable += list(m.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable
