"""Average pooling of ViT tokens in their native layout (the perceiver's spatial pooling).

Tokens arrive as [B, D*H*W, C], depth-major then H then W (the official ViT order). Pooling by k over the
(D, H, W) grid gives [B, (D/k)*(H/k)*(W/k), C] in the same order — what the official projector computes with
rearrange + avg_pool3d + rearrange (spec §2).

Three pieces, as for every kernel here: `spatial_pool_reference` (torch), the Triton kernel
(`triton_ops.spatial_pool_kernel`, imported only when used) and `spatial_pool`, the one dispatch function.
Inputs may be any strided view (e.g. `tokens[:, 1:]` after dropping the CLS token): the kernel reads them in place
through their strides, with no permute or contiguous copy. fp32, fp16 and bf16 are accepted; the sum is taken in
fp32 and the result is returned in the input dtype.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Optional

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")
MAX_K = 8  # the kernel unrolls k**3 loads; the official projector uses k = 2


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


def spatial_pool(
    tokens: torch.Tensor,
    grid: tuple[int, int, int],
    k: int,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool tokens by k over their (D, H, W) grid. [B, D*H*W, C] -> [B, (D/k)(H/k)(W/k), C]

    backend="auto" runs the Triton kernel on CUDA tensors and the torch reference elsewhere, and also when autograd
    needs a graph (the kernel has no backward) or a tracer (ONNX export, torch.jit.trace, torch.compile) is
    recording; if triton cannot be imported it warns and uses the reference. backend="triton" forces the kernel:
    CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests). backend="torch" forces the reference.
    `out`, if given, is written in place and returned (any strides).
    """
    _check_tokens(tokens, grid, k)
    needs_grad = torch.is_grad_enabled() and tokens.requires_grad
    if not use_triton(tokens, backend, "spatial_pool", needs_grad=needs_grad):
        result = spatial_pool_reference(tokens, grid, k)
        if out is None:
            return result
        _check_out(out, tokens, grid, k)
        return out.copy_(result)
    if needs_grad:
        raise ValueError("the Triton spatial_pool has no backward; use backend='auto' (it takes the torch reference "
                         "under autograd) or call it inside torch.no_grad()")
    return _spatial_pool_triton(tokens, grid, k, out)


def _spatial_pool_triton(
    tokens: torch.Tensor, grid: tuple[int, int, int], k: int, out: Optional[torch.Tensor]
) -> torch.Tensor:
    """Launch the kernel. [B, D*H*W, C] -> [B, (D/k)(H/k)(W/k), C]; strides are passed, nothing is copied."""
    from m3d_edge.kernels import triton_ops

    b, _, c = tokens.shape
    d, h, w = grid
    n_out = (d // k) * (h // k) * (w // k)
    if out is None:
        out = torch.empty((b, n_out, c), dtype=tokens.dtype, device=tokens.device)
    else:
        _check_out(out, tokens, grid, k)
    if b == 0 or n_out == 0 or c == 0:
        return out
    block_c = min(128, _next_pow2(c))
    block_t = max(1, min(32, 2048 // block_c, _next_pow2(n_out)))
    launch = (_cdiv(n_out, block_t), _cdiv(c, block_c), b)
    triton_ops.spatial_pool_kernel[launch](
        tokens, out, n_out, c, h, w, h // k, w // k,
        *tokens.stride(), *out.stride(),
        K=k, BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by both backends (and by resample.py), so that errors read the same whichever path runs.
# ---------------------------------------------------------------------------------------------------------------


def _check_tokens(tokens: torch.Tensor, grid: tuple[int, int, int], k: int) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor [B, D*H*W, C], got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, D*H*W, C] (rank 3), got shape {tuple(tokens.shape)}; "
                         "add a batch axis with tokens[None] or drop extra axes first")
    if tokens.dtype not in DTYPES:
        raise TypeError(f"tokens dtype {tokens.dtype} is not supported; use float32, float16 or bfloat16 "
                        "(e.g. tokens.float())")
    if len(grid) != 3 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid must be three positive ints (D, H, W), got {grid}")
    if int(k) != k or not 1 <= k <= MAX_K:
        raise ValueError(f"pooling size k must be an int in [1, {MAX_K}] (the projector uses 2 or 4), got {k}")
    d, h, w = grid
    if tokens.shape[1] != d * h * w:
        raise ValueError(f"{tokens.shape[1]} tokens do not form the grid {tuple(grid)} (D*H*W = {d * h * w}); "
                         "drop the CLS token first (tokens[:, 1:]) or pass the right grid")
    if d % k or h % k or w % k:
        raise ValueError(f"grid {tuple(grid)} is not divisible by the pooling size {k}; pick k dividing D, H and W")


def _check_out(out: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int, int], k: int) -> None:
    d, h, w = grid
    shape = (tokens.shape[0], (d // k) * (h // k) * (w // k), tokens.shape[2])
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != tokens.dtype:
        raise TypeError(f"out dtype {out.dtype} differs from the tokens dtype {tokens.dtype}; allocate it alike")
    if out.device != tokens.device:
        raise ValueError(f"out is on {out.device} but tokens are on {tokens.device}; put both on one device")


def use_triton(t: torch.Tensor, backend: str, name: str, *, needs_grad: bool = False) -> bool:
    """The dispatch rule of every kernel here. "torch": never. "triton": always (and the device must suit it).
    "auto": on CUDA tensors, unless autograd needs a graph or a tracer is recording; if triton cannot be imported,
    a warning and the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        if not t.is_cuda or needs_grad or _tracing():
            return False
        if not triton_available():
            warnings.warn(f"triton is not importable; {name} falls back to the torch reference", stacklevel=3)
            return False
    check_triton_device(t, name)
    return True


def _tracing() -> bool:
    """A graph is being recorded (ONNX export, torch.jit.trace, torch.compile / export): it must see torch ops."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def interpreting() -> bool:
    """True when the Triton kernels run in the CPU interpreter: TRITON_INTERPRET=1 was set before they were loaded.

    Set it before triton is first imported (anywhere in the process): triton's own helpers (tl.zeros, ...) are
    decorated at that import, and the interpreter cannot run GPU-built helpers.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from m3d_edge.kernels import triton_ops

    if not triton_ops.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton (or m3d_edge.kernels.triton_ops) was imported, "
                           "so the kernels were built for the GPU; set it before triton is first imported")
    return True


def triton_available() -> bool:
    """Whether triton is installed; it is not imported here (importing it fixes interpreter mode, see above)."""
    return importlib.util.find_spec("triton") is not None


def check_triton_device(t: torch.Tensor, name: str) -> None:
    """The Triton path needs a CUDA tensor, or a CPU tensor under the interpreter."""
    if not triton_available():
        raise ImportError("the Triton path needs triton: pip install 'triton>=3.0' (Linux), or use backend='torch'")
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(f"{name}: the input is on {t.device}, but the Triton path runs on CUDA tensors; move it "
                     "with .cuda(), use backend='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton "
                     "(tests)")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
