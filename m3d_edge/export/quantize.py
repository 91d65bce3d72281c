"""Lower-precision decoder.onnx: 4-bit weights (MatMul -> MatMulNBits, int4, block 32) with onnxruntime's
quantizer, and the fp16 variant (`decoder_to_fp16`).

Methods (onnxruntime.quantization.matmul_nbits_quantizer, checked against ORT 1.32):
  rtn  round-to-nearest per block of 32 input channels; ORT's own `DefaultWeightOnlyQuantConfig` (the class ORT
       calls "RTNWeightOnlyQuantConfig" goes through Intel neural-compressor, which this project does not need)
  hqq  Half-Quadratic Quantization (`HQQWeightOnlyQuantConfig`): optimises scale and zero point per block against
       the weight error, no data needed; always asymmetric, uses torch (export machines have it). Its zero points
       are floats, for which ORT's CPU MatMulNBits kernel has no fast path: measured on SmolLM2 (2 cores),
       ~400 ms per decode step against ~19 ms for RTN and ~65 ms for fp32, and ~110 s to quantize against ~2 s.
       Use it for accuracy experiments; RTN is the CPU default
GPTQ (data-driven) is not offered here: ORT's GPTQ config needs neural-compressor and a calibration reader, and
our calibration feeds (`m3d_edge.calibration`) do not exist yet. On a GPU with torch, GPTQModel is the maintained
path (AutoGPTQ, its predecessor, is archived).

lm_head policy: the LM head is one MatMul of H x V (SmolLM2: 576 x 49156 = 28 M weights, a fifth of the model).
`quantize_lm_head=True` (default) quantizes it too; False keeps it float32 for the last bit of logit fidelity.
The token embeddings are not in the graph (embeddings.npy, fp16), so no policy is needed for them here.
`accuracy_level=4` lets the CPU kernel compute with int8 activations (the fast path on x86 and ARM).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

METHODS = ("rtn", "hqq")
BLOCK_SIZE = 32
LM_HEAD_NODE = "/lm_head/MatMul"  # the builder's name for the LM head MatMul


def quantize_decoder(src: str | Path, dst: str | Path, *, method: str = "rtn", block_size: int = BLOCK_SIZE,
                     symmetric: bool = True, accuracy_level: int = 4, quantize_lm_head: bool = True) -> dict[str, Any]:
    """Quantize the MatMuls of decoder.onnx at `src` into `dst` (+ `dst`.data). Returns every choice made, for the
    manifest's `quantization` entry."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is not supported; expected one of {', '.join(METHODS)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))  # with its external data
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    exclude = [] if quantize_lm_head else [n for n in matmuls if n == LM_HEAD_NODE]
    if not quantize_lm_head and not exclude:
        raise ValueError(f"{src}: no node named {LM_HEAD_NODE}; cannot keep the LM head unquantized")
    if method == "rtn":
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                accuracy_level=accuracy_level)
    else:
        symmetric = False  # HQQ fits a zero point by construction
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    quantizer = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude, algo_config=algo)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with warnings.catch_warnings():
            # HQQ wraps ORT's read-only weight arrays in torch tensors without writing to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            quantizer.process()
    finally:
        logger.setLevel(level)
    q = quantizer.model.model
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(q, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    done = sum(1 for n in q.graph.node if n.op_type == "MatMulNBits")
    return {"method": method, "bits": 4, "block_size": block_size, "symmetric": symmetric,
            "accuracy_level": accuracy_level, "op": "MatMulNBits", "quantize_lm_head": quantize_lm_head,
            "matmuls_quantized": done, "matmuls_kept_float": len(matmuls) - done,
            "embeddings": "embeddings.npy float16 (outside the graph)",
            "library": "onnxruntime.quantization.matmul_nbits_quantizer"}


# the decoder's float inputs and outputs that stay float32 in the fp16 variant; the KV cache becomes float16
FP16_FLOAT_IO = ("inputs_embeds", "logits", "hidden_states")


def decoder_to_fp16(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """fp16 weights and arithmetic for decoder.onnx, with an fp16 KV cache (half the memory; GroupQueryAttention
    still appends in place). inputs_embeds, logits and hidden_states stay float32, so the runtime loop is unchanged.
    Returns the choices for the manifest."""
    import onnx

    from m3d_edge.export.onnx import to_fp16

    src, dst = Path(src), Path(dst)
    half = to_fp16(onnx.load(str(src)), keep_io_types=list(FP16_FLOAT_IO))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(half, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return {"method": "fp16", "kv_cache": "float16", "float32_io": list(FP16_FLOAT_IO),
            "library": "onnxruntime.transformers.float16"}
