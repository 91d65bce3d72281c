"""The 3D ViT of M3D-LaMed (and of SegVol's image encoder), written for the MONAI 1.3 parameter layout.

The official checkpoints were saved from MONAI 1.3's `ViT` (spec §1); MONAI 1.4+ renamed arguments and added
parameters, so we carry our own module with the 1.3 key names:

    cls_token                                   [1, 1, C]        (only with a CLS token)
    patch_embedding.position_embeddings         [1, N, C]
    patch_embedding.patch_embeddings.1.{weight [C, P], bias}      (index 0 was MONAI's parameter-free Rearrange)
    blocks.{i}.norm1 / attn.qkv (no bias) / attn.out_proj / norm2 / mlp.linear1 / mlp.linear2
    norm

Input [B, Cin, D, H, W]; tokens are ordered depth-major, then H, then W; inside a patch the vector order is
(depth offset, H offset, W offset, channel).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from m3d_edge.config import VisionConfig


class PatchEmbedding(nn.Module):
    """Perceptron patch embedding: flatten each patch, Linear(P -> C), add the learned position embedding."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        # ModuleList so that the Linear sits at index 1, as in MONAI 1.3 (`Sequential(Rearrange, Linear)`).
        self.patch_embeddings = nn.ModuleList([nn.Identity(), nn.Linear(cfg.patch_dim, cfg.hidden_size)])
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, Cin, D, H, W] -> [B, N, C]. The Linear over flattened (p1, p2, p3, c) patches equals a Conv3d whose
        # kernel is that weight reshaped; the conv avoids materialising an 8-D permuted copy of the volume and
        # exports to one ONNX Conv.
        lin = self.patch_embeddings[1]
        p1, p2, p3 = self.patch_size
        weight = lin.weight.view(-1, p1, p2, p3, self.in_channels).permute(0, 4, 1, 2, 3)
        x = F.conv3d(x, weight, lin.bias, stride=self.patch_size)  # [B, C, D/p1, H/p2, W/p3]
        x = x.flatten(2).transpose(1, 2)  # [B, N, C], depth-major
        return x + self.position_embeddings


class SelfAttention(nn.Module):
    """Multi-head self-attention. `query_chunk` (None: off) computes it for that many queries at a time: the
    same numbers (softmax is per query), while the scores held at once shrink from [B, heads, N, N] to
    [B, heads, chunk, N]. Torch's fused kernel needs no help; a traced ONNX graph does (export.onnx sets it)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)
        self.query_chunk: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # the qkv output splits as (qkv=3, heads, head_dim), i.e. MONAI's "b h (qkv l d)"
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.query_chunk and self.query_chunk < n:
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + self.query_chunk], k, v)
                           for i in range(0, n, self.query_chunk)], dim=2)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim], scale head_dim^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))  # exact (erf) GELU, as MONAI


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden: int, mlp_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """3D ViT. `forward` returns the final-LayerNorm tokens [B, (1 +) N, C] (CLS first when `cls_token`)."""

    def __init__(self, cfg: VisionConfig, *, cls_token: bool = True, hidden_size: int | None = None,
                 mlp_dim: int | None = None, num_layers: int | None = None, num_heads: int | None = None) -> None:
        super().__init__()
        # The width arguments let the SegVol image encoder reuse this class with its own sizes.
        if hidden_size is not None:
            cfg = dataclasses.replace(cfg, hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
                                      num_heads=num_heads)
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cls_token else None
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, cfg.mlp_dim, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.in_channels, *self.cfg.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the vision encoder expects images [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}; preprocess with m3d_edge.preprocess.to_model_input")
        x = self.patch_embedding(x)  # [B, N, C]
        if self.cls_token is not None:
            # prepended after the position embedding: the CLS token gets none (as MONAI)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """The LLM's vision tower: ViT3D and feature selection. [B, 1, 32, 256, 256] -> [B, 2048, C] patch tokens."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.select_feature = cfg.select_feature
        self.vision_tower = ViT3D(cfg, cls_token=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_tower(images)  # [B, 1 + N, C]
        return tokens[:, 1:] if self.select_feature == "patch" else tokens
