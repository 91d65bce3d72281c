"""The Triton kernels behind `spatial_pool.py` and `resample.py`.

This module is imported lazily, by the dispatch functions and only on the Triton path, for two reasons:
triton is optional (it is not installed on every platform), and `@triton.jit` decides at decoration time whether
a kernel is compiled for the GPU or run by the CPU interpreter (`TRITON_INTERPRET=1`). Importing it late lets a test
set that variable first. Callers validate shapes, dtypes and devices; the kernels trust their arguments.

Every kernel takes element strides for its inputs and outputs, so views (a token slice without the CLS token, a
transposed volume, a slice of a batch buffer) are read and written in place, without layout copies. Offsets that can
pass 2**31 elements (a 1024 x 1024 x 2048 volume has exactly 2**31 voxels) are computed in int64.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# True when these kernels run in the CPU interpreter. That needs TRITON_INTERPRET=1 both now (for the kernels
# below) and when triton itself was first imported (for its own jit helpers such as tl.zeros).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1" and not isinstance(tl.zeros, triton.runtime.JITFunction)

# ---------------------------------------------------------------------------------------------------------------
# Spatial pooling of ViT tokens
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def spatial_pool_kernel(
    x_ptr, y_ptr,                  # tokens [B, D*H*W, C] -> pooled [B, Do*Ho*Wo, C]
    n_out, C, H, W, Ho, Wo,        # n_out = Do*Ho*Wo; Ho = H/K, Wo = W/K
    sxb, sxn, sxc, syb, syn, syc,  # element strides of x and y
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_T consecutive output tokens x BLOCK_C channels of one batch item."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # output token index, depth-major: t = (od*Ho + oh)*Wo + ow
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    od = t // (Ho * Wo)
    oh = (t // Wo) % Ho
    ow = t % Wo
    # The window's first input token (od*K, oh*K, ow*K) in the input order n = (d*H + h)*W + w.
    n0 = ((od * K) * H + oh * K) * W + ow * K
    mask = (t < n_out)[:, None] & (c < C)[None, :]
    x_base = x_ptr + b * sxb + c[None, :].to(tl.int64) * sxc

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(K):          # depth offset
        for j in tl.static_range(K):      # H offset
            for l in tl.static_range(K):  # W offset
                n = n0 + (i * H + j) * W + l
                acc += tl.load(x_base + n[:, None].to(tl.int64) * sxn, mask=mask, other=0.0).to(tl.float32)
    acc = acc * (1.0 / (K * K * K))  # K is a power of two in practice, so this equals a division by K**3

    y_offs = b * syb + t[:, None].to(tl.int64) * syn + c[None, :].to(tl.int64) * syc
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Volume reductions: min/max and the foreground bounding box, in two stages each
# (stage 1: one partial per program over BLOCK_Y rows of one z slice; stage 2: one program reduces the partials).
# Two stages instead of atomics keep the result deterministic and need no initialised buffer.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _normalize(v, lo, hi):
    """Clip to [lo, hi] and scale to [0, 1]; a flat window (hi <= lo) maps everything to 0."""
    flat = hi <= lo
    scale = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, hi - lo))  # never divides by zero
    return (tl.minimum(tl.maximum(v, lo), hi) - lo) * scale


@triton.jit
def minmax_partial_kernel(
    x_ptr, part_ptr,               # volume [Z, Y, X] -> partials [P, 2] fp32 (min, max); P = Z * n_yblocks
    Y, X, sz, sy, sx, n_yblocks,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    z = pid // n_yblocks
    y = (pid % n_yblocks) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    row_ptr = x_ptr + z.to(tl.int64) * sz + y[:, None].to(tl.int64) * sy
    vmin = tl.full([BLOCK_Y, BLOCK_X], float("inf"), tl.float32)
    vmax = tl.full([BLOCK_Y, BLOCK_X], float("-inf"), tl.float32)
    for x0 in range(0, X, BLOCK_X):
        x = x0 + tl.arange(0, BLOCK_X)
        m = (y < Y)[:, None] & (x < X)[None, :]
        v = tl.load(row_ptr + x[None, :].to(tl.int64) * sx, mask=m, other=0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(m, v, float("inf")))
        vmax = tl.maximum(vmax, tl.where(m, v, float("-inf")))
    tl.store(part_ptr + 2 * pid, tl.min(tl.min(vmin, axis=1), axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.max(tl.max(vmax, axis=1), axis=0))


@triton.jit
def minmax_final_kernel(part_ptr, out_ptr, P, BLOCK: tl.constexpr):
    """partials [P, 2] -> out [2] fp32 = (min, max); launched with one program."""
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = p < P
        vmin = tl.minimum(vmin, tl.load(part_ptr + 2 * p, mask=m, other=float("inf")))
        vmax = tl.maximum(vmax, tl.load(part_ptr + 2 * p + 1, mask=m, other=float("-inf")))
    tl.store(out_ptr, tl.min(vmin, axis=0))
    tl.store(out_ptr + 1, tl.max(vmax, axis=0))


@triton.jit
def box_partial_kernel(
    x_ptr, win_ptr, part_ptr,      # volume [Z, Y, X], window [2] fp32 -> partials [P, 6] int32
    threshold, Y, X, sz, sy, sx, n_yblocks,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Partial (zmin, zmax, ymin, ymax, xmin, xmax), inclusive, of voxels with normalize(v) > threshold.

    A program that sees no foreground writes mins of 2**30 and maxes of -1, which stage 2 ignores.
    """
    BIG: tl.constexpr = 1 << 30
    pid = tl.program_id(0)
    z = pid // n_yblocks
    y = (pid % n_yblocks) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    lo = tl.load(win_ptr)
    hi = tl.load(win_ptr + 1)
    row_ptr = x_ptr + z.to(tl.int64) * sz + y[:, None].to(tl.int64) * sy
    yy = tl.broadcast_to(y[:, None], [BLOCK_Y, BLOCK_X])
    ymin = tl.full([BLOCK_Y, BLOCK_X], BIG, tl.int32)
    ymax = tl.full([BLOCK_Y, BLOCK_X], -1, tl.int32)
    xmin = tl.full([BLOCK_Y, BLOCK_X], BIG, tl.int32)
    xmax = tl.full([BLOCK_Y, BLOCK_X], -1, tl.int32)
    for x0 in range(0, X, BLOCK_X):
        x = x0 + tl.arange(0, BLOCK_X)
        xx = tl.broadcast_to(x[None, :], [BLOCK_Y, BLOCK_X])
        m = (y < Y)[:, None] & (x < X)[None, :]
        v = tl.load(row_ptr + x[None, :].to(tl.int64) * sx, mask=m, other=0).to(tl.float32)
        fg = m & (_normalize(v, lo, hi) > threshold)
        ymin = tl.minimum(ymin, tl.where(fg, yy, BIG))
        ymax = tl.maximum(ymax, tl.where(fg, yy, -1))
        xmin = tl.minimum(xmin, tl.where(fg, xx, BIG))
        xmax = tl.maximum(xmax, tl.where(fg, xx, -1))
    row_ymax = tl.max(tl.max(ymax, axis=1), axis=0)
    found = row_ymax >= 0
    out = part_ptr + 6 * pid
    tl.store(out + 0, tl.where(found, z, BIG))
    tl.store(out + 1, tl.where(found, z, -1))
    tl.store(out + 2, tl.min(tl.min(ymin, axis=1), axis=0))
    tl.store(out + 3, row_ymax)
    tl.store(out + 4, tl.min(tl.min(xmin, axis=1), axis=0))
    tl.store(out + 5, tl.max(tl.max(xmax, axis=1), axis=0))


@triton.jit
def box_final_kernel(part_ptr, box_ptr, P, Z, Y, X, BLOCK: tl.constexpr):
    """partials [P, 6] -> box [6] int32 = (z0, z1, y0, y1, x0, x1), half-open; the full volume if no foreground."""
    BIG: tl.constexpr = 1 << 30
    zmin = tl.full([BLOCK], BIG, tl.int32)
    ymin = tl.full([BLOCK], BIG, tl.int32)
    xmin = tl.full([BLOCK], BIG, tl.int32)
    zmax = tl.full([BLOCK], -1, tl.int32)
    ymax = tl.full([BLOCK], -1, tl.int32)
    xmax = tl.full([BLOCK], -1, tl.int32)
    for p0 in range(0, P, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = p < P
        zmin = tl.minimum(zmin, tl.load(part_ptr + 6 * p + 0, mask=m, other=BIG))
        zmax = tl.maximum(zmax, tl.load(part_ptr + 6 * p + 1, mask=m, other=-1))
        ymin = tl.minimum(ymin, tl.load(part_ptr + 6 * p + 2, mask=m, other=BIG))
        ymax = tl.maximum(ymax, tl.load(part_ptr + 6 * p + 3, mask=m, other=-1))
        xmin = tl.minimum(xmin, tl.load(part_ptr + 6 * p + 4, mask=m, other=BIG))
        xmax = tl.maximum(xmax, tl.load(part_ptr + 6 * p + 5, mask=m, other=-1))
    z1 = tl.max(zmax, axis=0)
    found = z1 >= 0
    tl.store(box_ptr + 0, tl.where(found, tl.min(zmin, axis=0), 0))
    tl.store(box_ptr + 1, tl.where(found, z1 + 1, Z))
    tl.store(box_ptr + 2, tl.where(found, tl.min(ymin, axis=0), 0))
    tl.store(box_ptr + 3, tl.where(found, tl.max(ymax, axis=0) + 1, Y))
    tl.store(box_ptr + 4, tl.where(found, tl.min(xmin, axis=0), 0))
    tl.store(box_ptr + 5, tl.where(found, tl.max(xmax, axis=0) + 1, X))


# ---------------------------------------------------------------------------------------------------------------
# Window + normalise + resize in one pass
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _linear_taps(o, n_in, n_out):
    """torch's align_corners=False source index for output o: src = max((o + 0.5) * n_in / n_out - 0.5, 0).

    Returns (i0, i1, w1): the two input taps and the weight of i1 (i1 = i0 at the upper border).
    """
    # n_in * 1.0 rather than .to(): a size of 1 may arrive as a compile-time constant.
    src = tl.maximum((o.to(tl.float32) + 0.5) * ((n_in * 1.0) / n_out) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0, so truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def resample_kernel(
    x_ptr, win_ptr, box_ptr, out_ptr,  # volume [Z, Y, X], window [2] fp32, box [6] int32 -> out [OD, OH, OW]
    Z, Y, X, sz, sy, sx,
    OD, OH, OW, so_d, so_h, so_w,
    HAS_BOX: tl.constexpr, AREA: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: BLOCK_W outputs of output row (od, oh). The input region is box (or the whole volume)."""
    row = tl.program_id(0)
    od = row // OH
    oh = row % OH
    ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_w = ow < OW
    lo = tl.load(win_ptr)
    hi = tl.load(win_ptr + 1)
    if HAS_BOX:
        z0 = tl.load(box_ptr + 0)
        y0 = tl.load(box_ptr + 2)
        x0 = tl.load(box_ptr + 4)
        nz = tl.load(box_ptr + 1) - z0
        ny = tl.load(box_ptr + 3) - y0
        nx = tl.load(box_ptr + 5) - x0
        base = x_ptr + z0.to(tl.int64) * sz + y0.to(tl.int64) * sy + x0.to(tl.int64) * sx
    else:
        nz = Z
        ny = Y
        nx = X
        base = x_ptr

    if AREA:
        # torch adaptive_avg_pool3d: output o averages input [floor(o*n_in/n_out), ceil((o+1)*n_in/n_out)).
        zs = (od * nz) // OD
        ze = ((od + 1) * nz + OD - 1) // OD
        ys = (oh * ny) // OH
        ye = ((oh + 1) * ny + OH - 1) // OH
        xs = (ow * nx) // OW
        xe = ((ow + 1) * nx + OW - 1) // OW
        kx = (nx + OW - 1) // OW + 1  # the widest x window
        acc = tl.zeros([BLOCK_W], dtype=tl.float32)
        z_ptr = base + zs.to(tl.int64) * sz  # pointers advance by strides: 64-bit, no index overflow
        for zi in range(zs, ze):  # noqa: B007 (the pointers carry the position)
            row_ptr = z_ptr + ys.to(tl.int64) * sy
            for yi in range(ys, ye):  # noqa: B007
                for dx in range(0, kx):
                    xi = xs + dx
                    m = mask_w & (xi < xe)
                    v = tl.load(row_ptr + xi.to(tl.int64) * sx, mask=m, other=0).to(tl.float32)
                    acc += tl.where(m, _normalize(v, lo, hi), 0.0)
                row_ptr += sy
            z_ptr += sz
        res = acc / ((ze - zs) * (ye - ys) * (xe - xs)).to(tl.float32)
    else:
        # Trilinear, align_corners=False, as torch.nn.functional.interpolate: z and y taps are scalars for this
        # program, x taps are vectors; 8 gathers per output, each clipped and scaled before interpolation.
        iz0, iz1, wz = _linear_taps(od, nz, OD)
        iy0, iy1, wy = _linear_taps(oh, ny, OH)
        ix0, ix1, wx = _linear_taps(ow, nx, OW)
        p00 = base + iz0.to(tl.int64) * sz + iy0.to(tl.int64) * sy
        p01 = base + iz0.to(tl.int64) * sz + iy1.to(tl.int64) * sy
        p10 = base + iz1.to(tl.int64) * sz + iy0.to(tl.int64) * sy
        p11 = base + iz1.to(tl.int64) * sz + iy1.to(tl.int64) * sy
        ox0 = ix0.to(tl.int64) * sx
        ox1 = ix1.to(tl.int64) * sx
        v000 = _normalize(tl.load(p00 + ox0, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v001 = _normalize(tl.load(p00 + ox1, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v010 = _normalize(tl.load(p01 + ox0, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v011 = _normalize(tl.load(p01 + ox1, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v100 = _normalize(tl.load(p10 + ox0, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v101 = _normalize(tl.load(p10 + ox1, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v110 = _normalize(tl.load(p11 + ox0, mask=mask_w, other=0).to(tl.float32), lo, hi)
        v111 = _normalize(tl.load(p11 + ox1, mask=mask_w, other=0).to(tl.float32), lo, hi)
        # torch's weights: w0 = 1 - w1 per axis; out = sum over the 8 corners of wz*wy*wx*v.
        v00 = (1.0 - wx) * v000 + wx * v001
        v01 = (1.0 - wx) * v010 + wx * v011
        v10 = (1.0 - wx) * v100 + wx * v101
        v11 = (1.0 - wx) * v110 + wx * v111
        v0 = (1.0 - wy) * v00 + wy * v01
        v1 = (1.0 - wy) * v10 + wy * v11
        res = (1.0 - wz) * v0 + wz * v1

    out = out_ptr + od.to(tl.int64) * so_d + oh.to(tl.int64) * so_h + ow.to(tl.int64) * so_w
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=mask_w)
