"""From a raw CT volume to the model input in one pass: window (or min-max), scale to [0, 1], crop, resize.

The official preprocessing (spec §7.2) is min-max to [0, 1], crop to the foreground (voxels > 0, margin 0), then a
trilinear resize to 32 x 256 x 256 (torch interpolate, align_corners=False, no anti-aliasing). Here that is
`resample(volume, crop_foreground=True)`. An HU window replaces min-max with `window=(lo, hi)`: clip to [lo, hi],
then scale, so that lo -> 0 and hi -> 1.

Definitions (the references below are the executable form of them):
- normalize(v) = (clamp(v, lo, hi) - lo) / (hi - lo), computed in fp32 as (clamp(v, lo, hi) - lo) * (1 / (hi - lo));
  a flat window (hi <= lo, e.g. a constant volume under min-max) maps every voxel to 0.
- foreground box = the half-open bounding box (z0, z1, y0, y1, x0, x1) of voxels with normalize(v) > threshold
  (threshold 0: the official "> 0"); with no foreground voxel it is the whole volume.
- mode="trilinear": torch.nn.functional.interpolate(mode="trilinear", align_corners=False) of the normalized crop.
- mode="area": torch adaptive_avg_pool3d (= interpolate(mode="area")) of the normalized crop, for any sizes:
  output index o along an axis of n_in -> n_out averages inputs [floor(o*n_in/n_out), ceil((o+1)*n_in/n_out)).
  When n_out divides n_in this is a plain k = n_in/n_out box filter (avg_pool3d); otherwise neighbouring windows
  overlap by at most one voxel. It is the anti-aliased choice for downsampling; for upsampling it repeats voxels.

The Triton path keeps everything on the device: min/max and the box come from reduction kernels into small device
tensors that the resize kernel reads, so the host never waits. Input volumes are read through their strides (a
transposed or sliced view costs no copy). Cost on the Triton path: min-max reads the volume once more, and the
foreground crop once more again (it needs the minimum first).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from m3d_edge.kernels.spatial_pool import use_triton

VOLUME_DTYPES = (torch.int16, torch.uint8, torch.int32, torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("trilinear", "area")
MODEL_SHAPE = (32, 256, 256)

Window = Union[tuple[float, float], torch.Tensor]
Box = Union[Sequence[int], torch.Tensor]

# Tile of the reduction kernels (rows x columns of one z slice) and of the final single-program reduction.
_RED_BLOCK_Y, _RED_BLOCK_X, _FINAL_BLOCK = 4, 256, 1024


# ---------------------------------------------------------------------------------------------------------------
# References (torch)
# ---------------------------------------------------------------------------------------------------------------


def minmax_reference(volume: torch.Tensor) -> torch.Tensor:
    """[Z, Y, X] -> [2] fp32 (min, max) on the volume's device."""
    lo, hi = torch.aminmax(volume)
    return torch.stack([lo, hi]).float()


def normalize_reference(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """[Z, Y, X] any dtype -> fp32 in [0, 1]: clip to window = [lo, hi] (fp32 [2]) and scale."""
    lo, hi = window[0], window[1]
    scale = torch.where(hi > lo, 1.0 / (hi - lo), torch.zeros_like(hi))
    return (torch.minimum(torch.maximum(volume.float(), lo), hi) - lo) * scale


def foreground_box_reference(
    volume: torch.Tensor, window: Optional[Window] = None, *, threshold: float = 0.0
) -> torch.Tensor:
    """[Z, Y, X] -> [6] int32 (z0, z1, y0, y1, x0, x1), half-open, of voxels with normalize(v) > threshold."""
    fg = normalize_reference(volume, _window_tensor(volume, window)) > threshold
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = fg.any(dim=others).nonzero().flatten()
        box += [int(hits[0]), int(hits[-1]) + 1] if hits.numel() else [0, volume.shape[axis]]
    return torch.tensor(box, dtype=torch.int32, device=volume.device)


def resample_reference(
    volume: torch.Tensor,
    out_shape: Sequence[int] = MODEL_SHAPE,
    *,
    window: Optional[Window] = None,
    mode: str = "trilinear",
    crop_foreground: bool = False,
    box: Optional[Box] = None,
    threshold: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of `resample`: [Z, Y, X] -> [*out_shape] out_dtype, values in [0, 1]."""
    _check_resample_args(volume, out_shape, mode, crop_foreground, box, out_dtype)
    win = _window_tensor(volume, window)
    x = normalize_reference(volume, win)
    if crop_foreground:
        box = foreground_box_reference(volume, win, threshold=threshold)
    if box is not None:
        z0, z1, y0, y1, x0, x1 = (int(v) for v in box)
        x = x[z0:z1, y0:y1, x0:x1]
    x = x[None, None]  # [1, 1, z, y, x]
    if mode == "trilinear":
        x = F.interpolate(x, size=tuple(out_shape), mode="trilinear", align_corners=False)
    else:
        x = F.adaptive_avg_pool3d(x, tuple(out_shape))
    return x[0, 0].to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def minmax(volume: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """[Z, Y, X] -> [2] fp32 (min, max), on the volume's device (no host sync on the Triton path)."""
    _check_volume(volume)
    if not use_triton(volume, backend, "minmax"):
        return minmax_reference(volume)
    from m3d_edge.kernels import triton_ops

    z, y, x = volume.shape
    n_yblocks = _cdiv(y, _RED_BLOCK_Y)
    parts = torch.empty((z * n_yblocks, 2), dtype=torch.float32, device=volume.device)
    out = torch.empty(2, dtype=torch.float32, device=volume.device)
    triton_ops.minmax_partial_kernel[(z * n_yblocks,)](
        volume, parts, y, x, *volume.stride(), n_yblocks, BLOCK_Y=_RED_BLOCK_Y, BLOCK_X=_RED_BLOCK_X
    )
    triton_ops.minmax_final_kernel[(1,)](parts, out, parts.shape[0], BLOCK=_FINAL_BLOCK)
    return out


def foreground_box(
    volume: torch.Tensor, window: Optional[Window] = None, *, threshold: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """[Z, Y, X] -> [6] int32 (z0, z1, y0, y1, x0, x1), half-open box of voxels with normalize(v) > threshold.

    window: (lo, hi) in the volume's units, a [2] tensor (e.g. from `minmax`), or None for the volume's min-max.
    """
    _check_volume(volume)
    if not use_triton(volume, backend, "foreground_box"):
        return foreground_box_reference(volume, window, threshold=threshold)
    win = minmax(volume, backend="triton") if window is None else _window_tensor(volume, window)
    return _foreground_box_triton(volume, win, threshold)


def resample(
    volume: torch.Tensor,
    out_shape: Sequence[int] = MODEL_SHAPE,
    *,
    window: Optional[Window] = None,
    mode: str = "trilinear",
    crop_foreground: bool = False,
    box: Optional[Box] = None,
    threshold: float = 0.0,
    out_dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Raw volume -> model input. [Z, Y, X] (z, y, x; HU for CT) -> [*out_shape] (default 32, 256, 256) in [0, 1].

    window: (lo, hi) clip window, a [2] tensor, or None for min-max. crop_foreground: crop to the foreground box
    (normalize(v) > threshold) before resizing; box: an explicit half-open (z0, z1, y0, y1, x0, x1) crop instead.
    mode: "trilinear" (official) or "area" (anti-aliased). out: an optional buffer of shape out_shape (any strides,
    e.g. `batch[i, 0]`), written in place. backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch".
    """
    _check_resample_args(volume, out_shape, mode, crop_foreground, box, out_dtype)
    if out is not None:
        _check_out(out, volume, out_shape, out_dtype)
    if not use_triton(volume, backend, "resample"):
        result = resample_reference(volume, out_shape, window=window, mode=mode, crop_foreground=crop_foreground,
                                    box=box, threshold=threshold, out_dtype=out_dtype)
        return result if out is None else out.copy_(result)

    from m3d_edge.kernels import triton_ops

    win = minmax(volume, backend="triton") if window is None else _window_tensor(volume, window)
    if crop_foreground:
        box_t = _foreground_box_triton(volume, win, threshold)
    elif box is not None:
        box_t = torch.as_tensor(box, device=volume.device).to(torch.int32).contiguous()
    else:
        box_t = win  # not read: HAS_BOX=False
    od, oh, ow = (int(s) for s in out_shape)
    if out is None:
        out = torch.empty((od, oh, ow), dtype=out_dtype, device=volume.device)
    block_w = min(256, _next_pow2(ow))
    triton_ops.resample_kernel[(od * oh, _cdiv(ow, block_w))](
        volume, win, box_t, out, *volume.shape, *volume.stride(), od, oh, ow, *out.stride(),
        HAS_BOX=crop_foreground or box is not None, AREA=mode == "area", BLOCK_W=block_w,
    )
    return out


def _foreground_box_triton(volume: torch.Tensor, win: torch.Tensor, threshold: float) -> torch.Tensor:
    from m3d_edge.kernels import triton_ops

    z, y, x = volume.shape
    n_yblocks = _cdiv(y, _RED_BLOCK_Y)
    parts = torch.empty((z * n_yblocks, 6), dtype=torch.int32, device=volume.device)
    box = torch.empty(6, dtype=torch.int32, device=volume.device)
    triton_ops.box_partial_kernel[(z * n_yblocks,)](
        volume, win, parts, float(threshold), y, x, *volume.stride(), n_yblocks,
        BLOCK_Y=_RED_BLOCK_Y, BLOCK_X=_RED_BLOCK_X,
    )
    triton_ops.box_final_kernel[(1,)](parts, box, parts.shape[0], z, y, x, BLOCK=_FINAL_BLOCK)
    return box


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def _check_volume(volume: torch.Tensor) -> None:
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume must be a torch.Tensor [Z, Y, X], got {type(volume).__name__}; "
                        "wrap a numpy array with torch.from_numpy")
    if volume.dim() != 3:
        raise ValueError(f"volume must be [Z, Y, X] (rank 3), got shape {tuple(volume.shape)}; "
                         "drop batch and channel axes first, e.g. volume[0, 0]")
    if volume.dtype not in VOLUME_DTYPES:
        raise TypeError(f"volume dtype {volume.dtype} is not supported; use one of "
                        f"{[str(d) for d in VOLUME_DTYPES]} (e.g. volume.to(torch.int16) for HU, .float() otherwise)")
    if volume.numel() == 0:
        raise ValueError(f"volume is empty (shape {tuple(volume.shape)})")


def _check_resample_args(
    volume: torch.Tensor, out_shape: Sequence[int], mode: str, crop_foreground: bool, box: Optional[Box],
    out_dtype: torch.dtype,
) -> None:
    _check_volume(volume)
    if len(out_shape) != 3 or any(int(s) != s or s <= 0 for s in out_shape):
        raise ValueError(f"out_shape must be three positive ints (D, H, W), got {tuple(out_shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype {out_dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    if box is None:
        return
    if crop_foreground:
        raise ValueError("give either crop_foreground=True or an explicit box, not both")
    if isinstance(box, torch.Tensor):
        if box.shape != (6,) or box.dtype.is_floating_point:
            raise ValueError(f"box must be an integer tensor [6] (z0, z1, y0, y1, x0, x1), got {box.dtype} "
                             f"{tuple(box.shape)}")
        return  # a device tensor (e.g. from foreground_box) is trusted: checking it would sync with the host
    if len(box) != 6:
        raise ValueError(f"box must be (z0, z1, y0, y1, x0, x1), half-open, got {tuple(box)}")
    for axis, size in enumerate(volume.shape):
        lo, hi = box[2 * axis], box[2 * axis + 1]
        if not 0 <= lo < hi <= size:
            raise ValueError(f"box {tuple(box)} is empty or outside the volume {tuple(volume.shape)} on axis {axis}; "
                             "need 0 <= start < end <= size")


def _check_out(out: torch.Tensor, volume: torch.Tensor, out_shape: Sequence[int], out_dtype: torch.dtype) -> None:
    if tuple(out.shape) != tuple(out_shape):
        raise ValueError(f"out must have shape {tuple(out_shape)}, got {tuple(out.shape)}")
    if out.dtype != out_dtype:
        raise TypeError(f"out dtype {out.dtype} differs from out_dtype {out_dtype}; pass out_dtype=out.dtype")
    if out.device != volume.device:
        raise ValueError(f"out is on {out.device} but the volume is on {volume.device}; put both on one device")


def _window_tensor(volume: torch.Tensor, window: Optional[Window]) -> torch.Tensor:
    """(lo, hi) | [2] tensor | None (min-max) -> [2] fp32 on the volume's device."""
    if window is None:
        return minmax_reference(volume)
    if isinstance(window, torch.Tensor):
        if window.shape != (2,):
            raise ValueError(f"window must be a [2] tensor (lo, hi), got shape {tuple(window.shape)}")
        return window.to(device=volume.device, dtype=torch.float32).contiguous()
    if len(window) != 2:
        raise ValueError(f"window must be (lo, hi), got {window!r}")
    return torch.tensor([float(window[0]), float(window[1])], dtype=torch.float32, device=volume.device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
