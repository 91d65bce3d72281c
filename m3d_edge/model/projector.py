"""The spatial-pooling perceiver (`mm_projector_type: spp`, spec §2): pool the ViT token grid, then a token MLP."""

from __future__ import annotations

import torch
from torch import nn

from m3d_edge.config import ProjectorConfig, VisionConfig
from m3d_edge.kernels.spatial_pool import spatial_pool


class SpatialPoolingProjector(nn.Module):
    """[B, D*H*W, C] patch tokens -> [B, (D/k)(H/k)(W/k), H_llm] image tokens (256 for the official models)."""

    def __init__(self, vision: VisionConfig, cfg: ProjectorConfig, llm_hidden: int) -> None:
        super().__init__()
        self.grid = vision.grid
        self.k = cfg.pooling_size
        # Linear, GELU (exact), Linear: official keys projector.0 / projector.2
        self.projector = nn.Sequential(nn.Linear(vision.hidden_size, llm_hidden), nn.GELU(),
                                       nn.Linear(llm_hidden, llm_hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = spatial_pool(tokens, self.grid, self.k)  # [B, 2048, C] -> [B, 256, C]
        return self.projector(pooled)  # [B, 256, C] -> [B, 256, H]
