"""Average pooling of ViT tokens in their native layout (the perceiver's spatial pooling).

Tokens arrive as [B, D*H*W, C], depth-major then H then W (the official ViT order). Pooling by k over the
(D, H, W) grid gives [B, (D/k)*(H/k)*(W/k), C] in the same order — what the official projector computes with
rearrange + avg_pool3d + rearrange (spec §2).
"""

from __future__ import annotations

import torch


def spatial_pool_reference(tokens: torch.Tensor, grid: tuple[int, int, int], k: int) -> torch.Tensor:
    """Torch reference. [B, D*H*W, C] -> [B, (D/k)(H/k)(W/k), C]; a view + mean, no layout copy of the input."""
    b, n, c = tokens.shape
    d, h, w = grid
    if n != d * h * w:
        raise ValueError(f"{n} tokens do not form the grid {grid}")
    if d % k or h % k or w % k:
        raise ValueError(f"grid {grid} is not divisible by the pooling size {k}")
    x = tokens.reshape(b, d // k, k, h // k, k, w // k, k, c)
    return x.mean(dim=(2, 4, 6), dtype=torch.float32).to(tokens.dtype).reshape(b, -1, c)


def spatial_pool(tokens: torch.Tensor, grid: tuple[int, int, int], k: int) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the torch reference elsewhere (and under autograd)."""
    return spatial_pool_reference(tokens, grid, k)
