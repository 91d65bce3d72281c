"""Block-wise weight quantization for onnxruntime's MatMulNBits (com.microsoft), written out by us: the numerics
as pure numpy functions, and the graph rewrite that swaps a MatMul for MatMulNBits.

Layout (a MatMul weight W is [K, N]: K input channels, N outputs). Blocks run along K, `block` input channels
each, one block per (output n, block j):

    q        [N, K/block, block]  uint8 codes; 4-bit codes are packed two per byte, low nibble first
    scale    [N, K/block]         float32
    zero     [N, K/block]         uint8 (4-bit: packed two per byte along the blocks, low nibble first);
                                  absent = 8 (4-bit) or 128 (8-bit)
    W[k, n] ~ scale[n, j] * (q[n, j, k % block] - zero[n, j]),  j = k // block

Two schemes:

q41   4-bit, asymmetric, llama.cpp's Q4_1 fitted into MatMulNBits: per block, s = (max - min) / 15 and the codes
      round (w - min) / s, so the block reads min + s * q, as in Q4_1. MatMulNBits wants an integer zero point,
      and -min / s is rarely one: zero = round(-min / s), and the remainder
          offset = min + s * zero            (|offset| <= s / 2 unless zero hit 0 or 15)
      is kept in float32 and restored outside the kernel, because sum_k x_k * offset_j over a block is
      offset_j * (block sum of x):   y = MatMulNBits(x) + blocksum(x) @ offsets,   offsets [K/block, N].
      Weights that were Q4_1 blocks of the same size (our SmolLM2, read from its GGUF) come back exactly.
      Without the offset term the remainder is a shift shared by the 32 weights of a block, whose errors add
      up in a dot product instead of averaging out: on SmolLM2 that is worse than symmetric rounding (see
      docs/export.md). Cost: one MatMul per distinct input (the block sums x @ S, S [K, K/block] of ones), one
      MatMul + Add per weight, fp32 (any input rank). Measured on SmolLM2 decode (ORT profile, 2 cores): the
      small float MatMuls cost ~13 us each whatever their size, the bulk of q41's gap to rtn; folding a kept
      LoRA branch into the same MatMuls (x @ [A | S] @ [s B ; offsets]) saved nodes but no time, so it was
      not kept; nor was merging gate and up into one MatMulNBits (N = 2 x 1536, one offset MatMul, a Split)
      on top of it (943 -> 703 nodes; decode step 11.6 against 11.4 ms, medians of 10 paired whole-process
      runs, AMD EPYC 2 cores, 2026-12-04), nor 8-bit right-hand factors (4x fewer bytes, no faster). Two
      other ways out, measured on phantom-small (2 cores) and not kept either: float zero points
      z - offset / s (MatMulNBits' T-typed zero_points) hold the block exactly but ORT has no fast CPU path for
      them (94 ms per token against 11); widening K instead (block sums and x @ A^T appended to the input,
      offsets and s B as extra 4-bit rows of the same MatMulNBits) decoded 9% faster but rounds the offsets to
      4 bits: perplexity +1.2% of fp32 against q41's +0.55% (+0.8% and no faster with a second residual row).
      What the float terms cost is per-node work, not bytes (8-bit offsets: no faster; dropping them: 15-20%
      faster and inexact): docs/runtime.md, "What the float terms of int4-q41-lora8 cost".
sym8  8-bit, symmetric: s = max|w| / 127, codes round(w / s) + 128, no zero-point input. llama.cpp's Q8_0
      (block 32, the same rule) comes back exactly: SmolLM2's tied embedding / LM head is Q8_0 in the GGUF.

Limits: K must be a multiple of the block (`block_view` raises; `export.quantize` leaves such a MatMul float and
counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SCHEMES = ("q41", "sym8")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Blocks:
    """One weight [K, N] in MatMulNBits form (field shapes in the module docstring)."""
    bits: int
    block: int
    k: int
    q: np.ndarray  # [N, K/block, block] uint8, unpacked codes
    scale: np.ndarray  # [N, K/block] float32
    zero: Optional[np.ndarray]  # [N, K/block] uint8, or None (8 / 128 implied)
    offset: Optional[np.ndarray]  # [N, K/block] float32 restored outside the kernel, or None


def block_view(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [N, K/block, block] float64 (K must be a multiple of block)."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    return np.asarray(w, dtype=np.float64).T.reshape(n, k // block, block)


def quantize_q41(w: np.ndarray, block: int = 32) -> Blocks:
    """4-bit asymmetric blocks with a float32 remainder offset (see the module docstring)."""
    b = block_view(w, block)
    lo, hi = b.min(-1), b.max(-1)  # [N, nb]
    scale = ((hi - lo) / 15).astype(np.float32)
    scale[scale == 0] = 1.0  # a constant block: codes 0, the value lives in the offset
    s = scale.astype(np.float64)[..., None]
    q = np.clip(np.rint((b - lo[..., None]) / s), 0, 15).astype(np.uint8)
    zero = np.clip(np.rint(-lo / s[..., 0]), 0, 15).astype(np.uint8)
    offset = (lo + s[..., 0] * zero).astype(np.float32)  # s * (q - zero) + offset = lo + s * q
    return Blocks(4, block, w.shape[0], q, scale, zero, offset)


def quantize_sym8(w: np.ndarray, block: int = 32) -> Blocks:
    """8-bit symmetric blocks, Q8_0's rule: s = max|w| / 127, no zero-point input (128 implied)."""
    b = block_view(w, block)
    scale = (np.abs(b).max(-1) / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(b / scale.astype(np.float64)[..., None]), -127, 127) + 128).astype(np.uint8)
    return Blocks(8, block, w.shape[0], q, scale, None, None)


QUANTIZERS = {"q41": quantize_q41, "sym8": quantize_sym8}


def dequantize(blocks: Blocks) -> np.ndarray:
    """The [K, N] float64 weight the graph computes with (offset included): the reference for tests."""
    zero = (blocks.zero if blocks.zero is not None else np.full(blocks.scale.shape, 1 << (blocks.bits - 1)))
    w = blocks.scale.astype(np.float64)[..., None] * (blocks.q.astype(np.float64) - zero[..., None])
    if blocks.offset is not None:
        w = w + blocks.offset.astype(np.float64)[..., None]
    n = w.shape[0]
    return w.reshape(n, -1).T


def pack_codes(blocks: Blocks) -> np.ndarray:
    """MatMulNBits input B: [N, K/block, block * bits / 8] uint8."""
    if blocks.bits == 8:
        return np.ascontiguousarray(blocks.q)
    return (blocks.q[..., 0::2] | (blocks.q[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(blocks: Blocks) -> np.ndarray:
    """MatMulNBits input zero_points, flattened: 4-bit packs two blocks per byte (odd counts padded with 0)."""
    z = blocks.zero
    if blocks.bits == 8:
        return z.reshape(-1)
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def _block_sum_matrix(k: int, block: int) -> np.ndarray:
    """S [K, K/block] float32 with S[i, i // block] = 1: x @ S sums x over each block of input channels."""
    s = np.zeros((k, k // block), np.float32)
    s[np.arange(k), np.arange(k) // block] = 1.0
    return s


@dataclass
class Shared:
    """What the rewrites of one graph share: block sums per MatMul input (gate and up projections read the same
    tensor) and the names of constant initializers already written."""
    blocksums: dict[str, str] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)


def rewrite_matmul(graph, node, w: np.ndarray, scheme: str, *, block: int, accuracy_level: int, shared: Shared,
                   blocks: Optional[Blocks] = None) -> list:
    """The nodes that replace MatMul `node` (weight `w` [K, N]) under `scheme`, in order; their initializers are
    appended to `graph`. `blocks`: already quantized (e.g. by export.gptq); `scheme` is then only a label."""
    from onnx import helper, numpy_helper

    k, n = w.shape
    blocks = QUANTIZERS[scheme](w, block) if blocks is None else blocks
    weight = node.input[1]
    tag = f"_Q{blocks.bits}"
    inits = [numpy_helper.from_array(pack_codes(blocks), weight + tag),
             numpy_helper.from_array(blocks.scale.reshape(-1), weight + "_scales")]
    inputs = [node.input[0], weight + tag, weight + "_scales"]
    if blocks.zero is not None:
        inits.append(numpy_helper.from_array(pack_zero_points(blocks), weight + "_zero_points"))
        inputs.append(weight + "_zero_points")
    offset = blocks.offset is not None and bool(np.any(blocks.offset))
    out = node.output[0]
    attrs = {"K": k, "N": n, "bits": blocks.bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    nodes = [helper.make_node("MatMulNBits", inputs, [out + "/nbits" if offset else out], name=node.name + tag,
                              domain=MS_DOMAIN, **attrs)]
    if offset:
        x = node.input[0]
        if x not in shared.blocksums:  # block sums x @ S [K, K/block] (ones on each block's rows), shared by
            ones = f"q41_blocksum_{k}x{block}"  # the weights that read x (gate and up)
            if ones not in shared.constants:
                inits.append(numpy_helper.from_array(_block_sum_matrix(k, block), ones))
                shared.constants.add(ones)
            nodes.insert(0, helper.make_node("MatMul", [x, ones], [x + "/blocksum"], name=x + "/blocksum"))
            shared.blocksums[x] = x + "/blocksum"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(blocks.offset.T), weight + "_offsets"))
        nodes += [helper.make_node("MatMul", [shared.blocksums[x], weight + "_offsets"], [out + "/offset"],
                                   name=node.name + "_offset"),  # [..., K/block] x [K/block, N] -> [..., N]
                  helper.make_node("Add", [out + "/nbits", out + "/offset"], [out], name=node.name + "_add")]
    graph.initializer.extend(inits)
    return nodes
