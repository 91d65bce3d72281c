"""SegVol-style 3D segmentation module driven by a text prompt (spec §4).

Only the parts M3D-LaMed uses are computed: the image encoder (a ViT3D without CLS token), the text path of the
prompt encoder (sparse = the prompt, dense = `no_mask_embed`), and the mask decoder with its text branch. The
prompt encoder's point and mask-downscaling parameters exist only so that official state dicts load strictly.

    image [B, 1, 32, 256, 256] --encode--> embedding [B, E, 8, 16, 16]
    (embedding, prompt [B, E]) --decode--> mask logits [B, 1, 32, 256, 256]

Ours, off for official checkpoints (`SegConfig.detail_channels`): a detail path, `DetailNet`, that reads the image at
the decoder's output grid and adds its features to the upscaled embedding before the prompt's dot product:

    image --detail--> detail [B, E/8, 32, 64, 64];  decode(embedding, prompt, detail=detail)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from m3d_edge.config import SegConfig, VisionConfig
from m3d_edge.model.vit3d import ViT3D


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of SAM's unused 2-D mask-downscaling path; kept for its parameters only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, grid: tuple[int, int, int], mask_in_chans: int) -> None:
        super().__init__()
        self.grid = grid
        self.pe_layer = nn.Module()
        # random-Fourier matrix; a persistent buffer that must come from the checkpoint (spec §10.9)
        self.pe_layer.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, embed_dim // 2))
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        c4 = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c4, 2, 2), LayerNorm2d(c4), nn.GELU(),
            nn.Conv2d(c4, mask_in_chans, 2, 2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1),
        )

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid: [1, E, D, H, W].

        Coordinates are voxel centres (i + 0.5) / size, stacked in SegVol's order (H, D, W), mapped to [-1, 1],
        projected by the Gaussian matrix and 2*pi, then [sin, cos].
        """
        gmat = self.pe_layer.positional_encoding_gaussian_matrix
        d, h, w = self.grid
        axes = [(torch.arange(n, device=gmat.device, dtype=gmat.dtype) + 0.5) / n for n in (d, h, w)]
        zd, yh, xw = torch.meshgrid(*axes, indexing="ij")  # each [D, H, W]
        coords = torch.stack([yh, zd, xw], dim=-1) * 2 - 1  # [D, H, W, 3] in SegVol's (x, y, z) order
        proj = 2 * math.pi * (coords @ gmat)  # [D, H, W, E/2]
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(3, 0, 1, 2).unsqueeze(0)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, E] prompt -> sparse [B, 1, E], dense [B, E, D, H, W]."""
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(text.shape[0], -1, *self.grid)
        return text[:, None], dense


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of q/k/v (SAM's two-way transformer)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, heads, N, c/heads]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Nq, c/heads]
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Tokens attend to themselves and to the image; the image attends back to the tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample)
        self.skip_first_pe = skip_first_pe

    def forward(self, queries, keys, query_pe, key_pe):  # [B, T, E], [B, N, E], [B, T, E], [B, N, E]
        if self.skip_first_pe:  # first layer: no query PE and no residual (SAM behaviour)
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, cfg: SegConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.attention_downsample, skip_first_pe=i == 0)
            for i in range(cfg.decoder_depth))
        self.final_attn_token_to_image = Attention(dim, cfg.decoder_heads, cfg.attention_downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).transpose(1, 2)  # [B, E, D, H, W] -> [B, N, E]
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """Linear layers with ReLU between them (SAM's hypernetwork / IoU head)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SegConfig, grid: tuple[int, int, int]) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(cfg)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up_grid = [2 * g for g in grid]
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, 2, 2),
            nn.LayerNorm([dim // 4, *up_grid]),  # normalises C, D, H, W together, per sample (spec §4)
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, 2, 2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP([dim, dim, dim, dim // 8])
                                                       for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP([dim] + [cfg.iou_head_hidden] * (cfg.iou_head_depth - 1)
                                       + [self.num_mask_tokens])
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                text: torch.Tensor, detail: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> low-resolution logits of mask token 0 (multimask_output=False): [B, 1, 4D, 4H, 4W].

        detail: ours (`DetailNet`), [B or 1, E/8, 4D, 4H, 4W] added to the upscaled embedding."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # [B, 6, E]
        if image.shape[0] != b:
            image = image.expand(b, -1, -1, -1, -1)
        src = image + dense
        pos = image_pe.expand(b, -1, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        src = src.transpose(1, 2).reshape(image.shape)  # [B, N, E] -> [B, E, D, H, W]
        up = self.output_upscaling(src)  # [B, E/8, 4D, 4H, 4W]
        if detail is not None:
            up = up + detail
        # The IoU head and mask tokens 1..3 do not reach the output with multimask_output=False; computing only
        # mask token 0 gives the same numbers as the official decoder.
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])  # [B, E/8]
        txt = self.txt_align_upscaled_embedding(text)  # [B, E/8]
        flat = up.flatten(2)  # [B, E/8, N']
        logits = torch.einsum("bc,bcn->bn", hyper + txt, flat)  # (hyper @ up) + (txt @ up), fused
        return logits.view(b, 1, *up.shape[2:])


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.GELU(),
                         nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.GELU())


class DetailNet(nn.Module):
    """Ours, not SegVol's: what a mask needs to follow an edge inside a ViT patch.

    The image, area-averaged to the mask decoder's output grid (4x the patch grid: 32 x 64 x 64 for the official
    input), goes through a four-level 3-D conv U-Net (widths w, 2w, 4w, 8w; down 1x2x2, then 2x2x2 twice) whose
    features, E/8 channels at that grid, are added to the decoder's upscaled embedding; the prompt's vector then
    picks the organ from both. The last layer starts at zero, so a decoder trained without the path is unchanged
    until it learns. Why: on phantom-small the masks sit where an organ usually is, not where it is in this
    scan, because one token per 16 x 16 pixels does not say where inside the patch an edge lies
    (docs/training.md, "A detail path for the masks").
    """

    DOWN = ((1, 2, 2), (2, 2, 2), (2, 2, 2))

    def __init__(self, width: int, out_channels: int, image_size: tuple[int, int, int],
                 out_grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.pool = tuple(i // o for i, o in zip(image_size, out_grid))
        total = [math.prod(f[a] for f in self.DOWN) for a in range(3)]
        if any(i % o for i, o in zip(image_size, out_grid)) or any(o % t for o, t in zip(out_grid, total)):
            raise ValueError(f"the seg detail path needs the decoder grid {out_grid} to divide the image "
                             f"{image_size} and to be divisible by {tuple(total)}")
        w = width
        self.down = nn.ModuleList([_conv_block(1, w), _conv_block(w, 2 * w), _conv_block(2 * w, 4 * w),
                                   _conv_block(4 * w, 8 * w)])
        self.up = nn.ModuleList([_conv_block(12 * w, 4 * w), _conv_block(6 * w, 2 * w), _conv_block(3 * w, w)])
        self.out = nn.Conv3d(w, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] -> [B, out_channels, D/pool, H/pool, W/pool]."""
        x = F.avg_pool3d(images, self.pool)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool3d(x, self.DOWN[i - 1]))
            skips.append(x)
        for block, skip, factor in zip(self.up, reversed(skips[:-1]), reversed(self.DOWN)):
            x = block(torch.cat([F.interpolate(x, scale_factor=factor, mode="nearest"), skip], dim=1))
        return self.out(x)


class SegVol(nn.Module):
    def __init__(self, cfg: SegConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = vision.grid
        self.image_size = vision.image_size
        if not cfg.share_vision_encoder:
            self.image_encoder = ViT3D(vision, cls_token=False, hidden_size=cfg.embed_dim,
                                       mlp_dim=cfg.encoder_mlp_dim, num_layers=cfg.encoder_layers,
                                       num_heads=cfg.encoder_heads)
        self.prompt_encoder = PromptEncoder(cfg.embed_dim, vision.grid, cfg.mask_in_chans)
        self.mask_decoder = MaskDecoder(cfg, vision.grid)
        if cfg.detail_channels:
            self.detail = DetailNet(cfg.detail_channels, cfg.embed_dim // 8, vision.image_size,
                                    tuple(4 * g for g in vision.grid))

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, E] patch tokens -> [B, E, D, H, W] image embedding."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 32, 256, 256] -> [B, E, 8, 16, 16]. Not available when the vision encoder is shared."""
        if self.cfg.share_vision_encoder:
            raise RuntimeError("this seg module shares the vision tower: pass its patch tokens to tokens_to_grid")
        return self.tokens_to_grid(self.image_encoder(images))

    @property
    def has_detail(self) -> bool:
        return self.cfg.detail_channels > 0

    def detail_features(self, images: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, 1, 32, 256, 256] -> the detail path's features [B, E/8, 32, 64, 64] (`DetailNet`), or None for a
        module without one: what `decode(detail=...)` takes either way."""
        if not self.has_detail:
            return None
        if images is None:
            raise ValueError("this seg module has a detail path: segmenting needs the images, not only cached "
                             "vision-tower features")
        return self.detail(images)

    def decode(self, embedding: torch.Tensor, text: torch.Tensor, *, detail: Optional[torch.Tensor] = None,
               upsample: bool = True) -> torch.Tensor:
        """([B, E, 8, 16, 16], prompt [B, E]) -> mask logits [B, 1, 32, 256, 256] (or the [B,1,32,64,64] low-res).

        detail: `detail_features` of the images, required when the module has a detail path (batch B, or 1)."""
        if self.has_detail != (detail is not None):
            raise ValueError("this seg module has a detail path: pass detail=detail_features(images)"
                             if self.has_detail else "this seg module has no detail path: detail must be None")
        sparse, dense = self.prompt_encoder(text)
        low = self.mask_decoder(embedding, self.prompt_encoder.dense_pe(), sparse, dense, text, detail)
        if not upsample:
            return low
        return F.interpolate(low, size=self.image_size, mode="trilinear", align_corners=False)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images), text, detail=self.detail_features(images))
