"""GPTQ for decoder.onnx: 4-bit blocks whose rounding errors are compensated using the calibration activations.

Per MatMul (weight W [K, N]; K input channels) with Hessian H = sum over calibration positions of x^T x [K, K]:
the rows of W (input channels) are rounded one at a time, and each row's error, scaled by the inverse-Hessian
Cholesky factor, is pushed onto the rows not yet rounded (Frantar et al., GPTQ, 2022). The grid is the one
asymmetric RTN uses: per block of 32 input channels and output, s = (max - min) / 15 of the block as it stands when
the block is reached, zero = round(-min / s), codes 0..15 -> MatMulNBits with uint4 zero points (ORT's fast CPU
path). Lazy batching: inside a block of 32 rows the updates are row by row, the rest of W gets one matrix
product per block.

Why our own: ORT ships a GPTQ (`onnxruntime.quantization.neural_compressor.weight_only.gptq`, vendored from Intel
Neural Compressor), but in ORT 1.32 it reads the inverse-Hessian factor by column where it needs the row (an upper
triangular factor, so every update it applies is zero) and its result equals plain rounding; measured here on
random correlated activations: the same weights whatever the Hessian. Its packer also mixes up zero points when
K / 32 is odd. GPTQModel, the maintained torch implementation, targets CUDA. The Hessians come from ONNX Runtime
itself (the MatMul inputs added as graph outputs), so they are those of the graph being quantized.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from m3d_edge.export.nbits import Blocks

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (the GPTQ paper's default)


def hessians(model, inputs: Sequence[str], feeds: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """H = X^T X / positions [K, K] (float64) for each named MatMul input of the ONNX `model`, over `feeds`."""
    import onnxruntime as ort
    from onnx import helper

    probe = type(model)()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in inputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    positions = 0
    for feed in feeds:
        outputs = session.run(list(inputs), dict(feed))
        for name, x in zip(inputs, outputs):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
        positions += outputs[0].reshape(-1, outputs[0].shape[-1]).shape[0]
    return {name: h / positions for name, h in sums.items()}


def quantize_weight(w: np.ndarray, h: np.ndarray, *, block: int = 32, damp: float = DAMP) -> Blocks:
    """GPTQ of one weight [K, N] given its input Hessian [K, K] -> 4-bit asymmetric Blocks (no offset)."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    W = np.array(w, dtype=np.float64)
    H = np.array(h, dtype=np.float64)
    dead = np.diag(H) == 0  # an input channel that is always zero: its weights do not matter
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular, U^T U = H^-1
    nb = k // block
    q = np.zeros((n, nb, block), np.uint8)
    scale = np.zeros((n, nb), np.float32)
    zero = np.zeros((n, nb), np.uint8)
    for j in range(nb):
        b0, b1 = j * block, (j + 1) * block
        rows = W[b0:b1]  # a view: updated in place below
        lo, hi = rows.min(0), rows.max(0)
        s = ((hi - lo) / 15).astype(np.float32)
        s[s == 0] = 1.0
        z = np.clip(np.rint(-lo / s), 0, 15)
        s64 = s.astype(np.float64)
        err = np.zeros((block, n))
        for i in range(block):
            r = b0 + i
            codes = np.clip(np.rint(W[r] / s64) + z, 0, 15)
            err[i] = (W[r] - s64 * (codes - z)) / U[r, r]
            W[r + 1:b1] -= np.outer(U[r, r + 1:b1], err[i])  # within the block, row by row
            q[:, j, i] = codes
        W[b1:] -= U[b0:b1, b1:].T @ err  # the rows after the block, at once
        scale[:, j], zero[:, j] = s, z.astype(np.uint8)
    return Blocks(4, block, k, q, scale, zero, None)
