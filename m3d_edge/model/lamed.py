"""M3D-LaMed: a 3D vision tower and a spatial-pooling perceiver in front of any Hugging Face causal LM, and a
SegVol-style mask decoder driven by the hidden state that predicts `[SEG]` (spec §3).

One class serves Llama, Phi-3 and SmolLM2 backbones (the official code forks a file per LLM). The module tree is

    vision_tower.vision_tower   ViT3D             [B, 1, 32, 256, 256] -> [B, 2048, C]
    mm_projector                spatial pooling   [B, 2048, C] -> [B, 256, H]
    llm                         the causal LM     inputs_embeds [B, T, H] -> hidden [B, T, H], logits [B, T, V]
    seg_projector               Linear, ReLU, Linear, Dropout   [B, H] -> [B, C]
    seg_module                  SegVol            (image | patch tokens, prompt [B, C]) -> logits [B, 1, 32, 256, 256]

and `model.checkpoint` maps it to and from the official key names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from m3d_edge.config import ModelConfig
from m3d_edge.model.lora import MergedLora
from m3d_edge.model.projector import SpatialPoolingProjector
from m3d_edge.model.segvol import SegVol
from m3d_edge.model.vit3d import VisionTower

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids so far [B, t], logits [B, V])


def place_image_tokens(embeds: torch.Tensor, image_features: torch.Tensor, input_ids: torch.Tensor,
                       placement: str, im_patch_id: Optional[int]) -> torch.Tensor:
    """Put the projected image tokens into the prompt embeddings. [B, T, H], [B, N, H] -> [B, T, H].

    positional (official, spec §3.3): keep position 0, overwrite positions 1..N, whatever the ids are.
    by_id: overwrite exactly the positions that hold `<im_patch>`; there must be N of them in each row.
    """
    n = image_features.shape[1]
    if placement == "positional":
        if embeds.shape[1] < n + 1:
            raise ValueError(f"the prompt has {embeds.shape[1]} tokens; positional placement needs at least {n + 1}")
        return torch.cat([embeds[:, :1], image_features.to(embeds.dtype), embeds[:, n + 1:]], dim=1)
    mask = input_ids == im_patch_id  # [B, T]
    counts = mask.sum(dim=1)
    if not bool((counts == n).all()):
        raise ValueError(f"each prompt must hold exactly {n} <im_patch> tokens (id {im_patch_id}); "
                         f"found {counts.tolist()}. Build prompts with data.prompts.image_prompt")
    return embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))


def seg_hidden_positions(ids: torch.Tensor, seg_token_id: int) -> torch.Tensor:
    """[B, T] ids -> [B, T] bool: position p is selected when token p+1 is [SEG] (the state that predicts it)."""
    sel = torch.zeros_like(ids, dtype=torch.bool)
    sel[:, :-1] = ids[:, 1:] == seg_token_id
    return sel


def average_selected(hidden: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the selected hidden states per row. [B, T, H], [B, T] -> ([B, H], has_any [B])."""
    w = selected.to(hidden.dtype).unsqueeze(-1)
    count = w.sum(dim=1)
    return (hidden * w).sum(dim=1) / count.clamp(min=1), count.squeeze(-1) > 0


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official BinaryDiceLoss (spec §4): sigmoid; -1 labels as 0; 1 - 2*sum(p*t) / (sum p + sum t + 1), batch mean."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).to(p.dtype).clamp(min=0)
    return (1 - 2 * (p * t).sum(1) / (p.sum(1) + t.sum(1) + 1)).mean()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, per_sample: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (!= -100) positions. Official (spec §3.4): the mean over every
    such token of the batch. per_sample: the mean within each sample, then across the samples that have labels.

    Why per_sample exists: with the token mean a long answer outweighs a short one token for token; in
    phantom-small v2's stage-2 mix the reports (10 % of the samples) held 42 % of the answer tokens and the
    closed-VQA letters (30 % of the samples, the one token that decides) 1.8 % (docs/training.md). Per sample,
    the task shares of the mix are the shares of the LM term."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    if not per_sample:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    tokens = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # 0 if ignored
    counts = (target != -100).sum(dim=1)
    has = counts > 0
    return (tokens.sum(dim=1)[has] / counts[has]).mean()


def sample_next(logits: torch.Tensor, *, do_sample: bool, top_p: Optional[float], temperature: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] logits -> [B] next ids: argmax, or nucleus sampling (keep the smallest set with mass >= top_p)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens whose predecessors already cover top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class LaMedOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, H], final-normed last layer
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    dice_loss: Optional[torch.Tensor] = None
    bce_loss: Optional[torch.Tensor] = None
    seg_logits: Optional[torch.Tensor] = None


@dataclass
class Generation:
    ids: torch.Tensor  # [B, n_new] new tokens only (as the official generate)
    seg_logits: Optional[torch.Tensor]  # [B, 1, D, H, W]; -inf rows where no [SEG] was selected
    seg_hidden: Optional[torch.Tensor]  # [B, H] averaged states that predicted [SEG] (zeros where none)
    has_seg: Optional[torch.Tensor]  # [B] bool
    step_logits: Optional[torch.Tensor] = None  # [n_new, B, V] when requested


class LaMed(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = llm.config.hidden_size
        if hidden != cfg.llm.hidden_size:
            raise ValueError(f"LLM hidden size {hidden} does not match the config ({cfg.llm.hidden_size})")
        self.vision_tower = VisionTower(cfg.vision)
        self.mm_projector = SpatialPoolingProjector(cfg.vision, cfg.projector, hidden)
        self.llm = llm
        if cfg.seg is not None:
            self.seg_projector = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, cfg.mm_hidden_size),
                                               nn.Dropout(0.1))
            self.seg_module = SegVol(cfg.seg, cfg.vision)
        # set when a LoRA adapter was merged into self.llm (checkpoint loading, train.stages.merge_lora): the 4-bit
        # export keeps it apart from the quantized base (model.lora explains why)
        self.merged_lora: Optional[MergedLora] = None

    # -- pieces ------------------------------------------------------------------------------------------------
    @property
    def base_llm(self) -> nn.Module:
        """The Hugging Face causal LM, also while peft LoRA adapters wrap it (they stay active inside)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def vision_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 256, 256] -> [B, 2048, C] patch tokens (the seg module reuses them when shared)."""
        return self.vision_tower(images)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 256, 256] -> [B, N, H] image tokens for the LLM."""
        return self.mm_projector(self.vision_features(images))

    def prompt_embeds(self, input_ids: torch.Tensor, image_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if image_tokens is None:
            return embeds
        return place_image_tokens(embeds, image_tokens, input_ids, self.cfg.llm.image_placement, self.cfg.im_patch_id)

    def seg_embedding(self, images: torch.Tensor, patch_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The seg module's image embedding [B, C, 8, 16, 16] (from the shared tower's tokens when configured)."""
        if self.cfg.seg.share_vision_encoder:
            if patch_tokens is None:
                patch_tokens = self.vision_features(images)
            return self.seg_module.tokens_to_grid(patch_tokens)
        if images is None:
            raise ValueError("this model's seg module has its own image encoder: segmenting needs the images, "
                             "not only cached vision-tower features")
        return self.seg_module.encode(images)

    def segment(self, images: torch.Tensor, seg_hidden: torch.Tensor,
                patch_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(images [B,1,32,256,256], hidden that predicted [SEG] [B, H]) -> mask logits [B, 1, 32, 256, 256]."""
        prompt = self.seg_projector(seg_hidden)  # [B, H] -> [B, C]
        return self.seg_module.decode(self.seg_embedding(images, patch_tokens), prompt,
                                      detail=self.seg_module.detail_features(images))

    def _run_llm(self, inputs_embeds, attention_mask=None, cache=None):
        """The LLM trunk only: final-normed hidden states [B, T, H] (lm_head applied where logits are needed)."""
        out = self.base_llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                             use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    # -- training / teacher forcing ----------------------------------------------------------------------------
    def forward(self, images: Optional[torch.Tensor], input_ids: torch.Tensor, *,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                segs: Optional[torch.Tensor] = None, patch_tokens: Optional[torch.Tensor] = None,
                per_sample_lm: bool = False) -> LaMedOutput:
        """Official training forward (spec §3.4): LM loss, plus Dice + BCE on the samples whose mask is non-empty.

        patch_tokens: precomputed vision-tower output [B, 2048, C] (a stage with a frozen tower caches them).
        per_sample_lm: the LM loss averaged per sample, then over samples, instead of the official token mean
        (`lm_loss`).
        """
        hidden, patch = self._last_hidden(images, input_ids, attention_mask, patch_tokens)
        logits = self.base_llm.lm_head(hidden)
        out = LaMedOutput(logits=logits, hidden=hidden)
        if labels is None:
            return out
        out.lm_loss = lm_loss(logits, labels, per_sample=per_sample_lm)
        out.loss = out.lm_loss
        if segs is not None and self.cfg.seg is not None:
            seg_ids = segs.flatten(1).any(dim=1).nonzero().squeeze(1)
            if seg_ids.numel():
                h, _ = average_selected(hidden[seg_ids], seg_hidden_positions(input_ids[seg_ids], self.cfg.seg_token_id))
                seg_logits = self.segment(images[seg_ids] if images is not None else None, h,
                                          patch[seg_ids] if patch is not None else None)
                target = segs[seg_ids].to(seg_logits.dtype)
                out.dice_loss = dice_loss(seg_logits, target)
                out.bce_loss = F.binary_cross_entropy_with_logits(seg_logits, target)
                out.seg_logits = seg_logits
                out.loss = out.loss + out.dice_loss + out.bce_loss
        return out

    def _last_hidden(self, images, input_ids, attention_mask, patch_tokens):
        """The LLM's last hidden states [B, T, H] over the prompt with its image tokens, and the patch tokens."""
        patch = patch_tokens if patch_tokens is not None else (
            self.vision_features(images) if images is not None else None)
        image_tokens = self.mm_projector(patch) if patch is not None else None
        hidden, _ = self._run_llm(self.prompt_embeds(input_ids, image_tokens), attention_mask)
        return hidden, patch

    def seg_states(self, images: Optional[torch.Tensor], input_ids: torch.Tensor, *,
                   patch_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The [SEG] states of teacher-forced sequences (prompt and answer), as `forward` gives them to the seg
        module: ([B, H], has_any [B]). Skips the LM head: a fifth of a seg sample's forward on SmolLM2."""
        hidden, _ = self._last_hidden(images, input_ids, None, patch_tokens)
        return average_selected(hidden, seg_hidden_positions(input_ids, self.cfg.seg_token_id))

    # -- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Optional[torch.Tensor], input_ids: torch.Tensor, *, max_new_tokens: int = 256,
                 do_sample: bool = False, top_p: Optional[float] = None, temperature: float = 1.0,
                 seed: Optional[int] = None, eos_token_id: Optional[int | list[int]] = None,
                 seg_enable: bool = True, logits_processor: Optional[LogitsProcessor] = None,
                 return_step_logits: bool = False) -> Generation:
        """Official generate semantics (spec §3.5) on a plain KV-cache loop.

        Returns only the new tokens. The hidden state computed on generated token j is kept when token j+1 is
        [SEG]; several are averaged; a [SEG] as the very first token is never selected; rows with none get -inf
        mask logits. Batches must be unpadded (the official generate drops attention masks too).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T]; got {list(input_ids.shape)}")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        from transformers import DynamicCache

        patch = self.vision_features(images) if images is not None else None
        embeds = self.prompt_embeds(input_ids, self.mm_projector(patch) if patch is not None else None)
        cache = DynamicCache()
        hidden, cache = self._run_llm(embeds, cache=cache)
        logits = self.base_llm.lm_head(hidden[:, -1])  # [B, V]
        b = input_ids.shape[0]
        ids = input_ids.new_zeros((b, 0))
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        states, step_logits = [], []
        for step in range(max_new_tokens):
            if return_step_logits:
                step_logits.append(logits.float())
            if logits_processor is not None:
                logits = logits_processor(ids, logits)
            nxt = sample_next(logits, do_sample=do_sample, top_p=top_p, temperature=temperature, generator=generator)
            if eos:
                pad = next(iter(eos))
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            hidden, cache = self._run_llm(self.embed_tokens(nxt[:, None]), cache=cache)
            states.append(hidden[:, -1])  # the state computed on generated token `step`
            logits = self.base_llm.lm_head(hidden[:, -1])
        result = Generation(ids=ids, seg_logits=None, seg_hidden=None, has_seg=None,
                            step_logits=torch.stack(step_logits) if return_step_logits else None)
        if not (seg_enable and self.cfg.seg is not None and images is not None):
            return result
        hid = self.cfg.llm.hidden_size
        if states:
            seg_h, has = average_selected(torch.stack(states, dim=1),
                                          ids[:, 1:len(states) + 1] == self.cfg.seg_token_id)
        else:
            seg_h, has = embeds.new_zeros((b, hid)), torch.zeros(b, dtype=torch.bool)
        seg_logits = torch.full((b, 1, *self.cfg.vision.image_size), float("-inf"), dtype=embeds.dtype)
        if bool(has.any()):
            rows = has.nonzero().squeeze(1)
            seg_logits[rows] = self.segment(images[rows], seg_h[rows], patch[rows] if patch is not None else None)
        result.seg_logits, result.seg_hidden, result.has_seg = seg_logits, seg_h, has
        return result
