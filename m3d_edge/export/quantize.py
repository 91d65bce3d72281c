"""Lower-precision decoder.onnx: 4-bit weights (MatMul -> MatMulNBits, block 32), and the fp16 variant
(`decoder_to_fp16`).

Methods (`quantize_decoder(method=...)`; bundle precision `int4-<method>`):
  q41  the default. llama.cpp's Q4_1 layout in MatMulNBits (`export.nbits`, our own packer): per block of 32
       input channels a scale and the block minimum, codes round((w - min) / scale); uint4 zero points (ORT's
       fast CPU path) plus the zero point's rounding remainder, restored in float32 through the block sums of
       the activations (one small MatMul per MatMul input, one small MatMul + Add per weight). Our
       SmolLM2 weights are Q4_1 blocks read from a GGUF, and come back exactly. Measured on SmolLM2 (30
       held-out phantom reports, docs/export.md): perplexity +1.2% over fp32 (all of it the int8 activations of
       accuracy_level 4), decoder 21% of fp32's bytes, decode ~0.85x the speed of rtn (the extra ops, not their
       arithmetic)
  rtn  round-to-nearest per block, ORT's `DefaultWeightOnlyQuantConfig` (the class ORT calls
       "RTNWeightOnlyQuantConfig" goes through Intel neural-compressor, which this project does not need).
       Symmetric by default (no zero point); `symmetric=False` gives ORT's uint4 zero points, which fit Q4_1
       blocks worse: the remainder above, left in, is an error shared by a block's 32 weights. On SmolLM2
       +44% perplexity (symmetric, int4 head), +25% with the int8 head; the fastest decode
  hqq  Half-Quadratic Quantization (`HQQWeightOnlyQuantConfig`): optimises scale and zero point per block against
       the weight error, no data needed; always asymmetric, uses torch (export machines have it). Its zero points
       are floats, for which ORT's CPU MatMulNBits kernel has no fast path: measured on SmolLM2 (2 cores),
       ~400 ms per decode step against ~19 ms for RTN and ~65 ms for fp32, and ~110 s to quantize against ~2 s.
       An accuracy experiment, not a CPU choice
  gptq GPTQ (data-driven, `export.gptq`, our implementation; ORT's vendored one is broken, see there): per
       weight, the Hessian of its input activations over a calibration set decides how each input channel's
       rounding error is compensated in the channels not yet rounded. Same grid as asymmetric rtn (blocks of
       32, min/max scale, uint4 zero points: ORT's fast CPU path), packed by `export.nbits`. The calibration
       set is multimodal (`m3d_edge.calibration.decoder_feeds`: phantom scans' image tokens in prompts of every
       task, plus a report): text-only calibration misjudges the image tokens' activations. On weights that
       already lie on a 4-bit grid (our SmolLM2) q41 is exact and GPTQ has nothing to gain; it is for
       checkpoints in bf16 / fp32 (the official Phi-3 and Llama-2 LaMeds). On a GPU with torch, GPTQModel is
       the maintained path (AutoGPTQ, its predecessor, is archived).
LM-head policy (`lm_head=`): the LM head is one MatMul of H x V (SmolLM2: 576 x 49156 = 28 M weights, a fifth of
the model; tied to the token embedding, which the GGUF stores as Q8_0).
  int8  8-bit symmetric blocks of 32, scale max|w| / 127 (`nbits.quantize_sym8`): Q8_0's own rule, so the GGUF's
        embedding comes back exactly. Default for q41
  int4  the method's 4-bit blocks. Default for rtn and hqq (their behaviour before the policy existed)
  fp32  left as a float MatMul
The token embeddings are not in the graph (embeddings.npy, fp16), so no policy is needed for them here.
`accuracy_level=4` lets the CPU kernel compute with int8 activations (the fast path on x86 and ARM).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from m3d_edge.export import gptq, import_keeping_logging, lora, nbits

METHODS = ("q41", "rtn", "hqq", "gptq")
LM_HEAD_POLICIES = ("int8", "int4", "fp32")
DEFAULT_LM_HEAD = {"q41": "int8", "rtn": "int4", "hqq": "int4", "gptq": "int8"}
BLOCK_SIZE = 32
LM_HEAD_NODE = "/lm_head/MatMul"  # the builder's name for the LM head MatMul
_LM_HEAD_BITS = {"int8": 8, "int4": 4, "fp32": None}


def quantize_decoder(src: str | Path, dst: str | Path, *, method: str = "q41", block_size: int = BLOCK_SIZE,
                     symmetric: bool = True, accuracy_level: int = 4, lm_head: Optional[str] = None,
                     calibration: Optional[Sequence[Mapping[str, Any]]] = None,
                     eight_bit: Sequence[str] = ()) -> dict[str, Any]:
    """Quantize the MatMuls of decoder.onnx at `src` into `dst` (+ `dst`.data). Returns every choice made, for the
    manifest's `quantization` entry.

    symmetric: rtn only (q41, hqq and gptq are asymmetric). lm_head: one of LM_HEAD_POLICIES, None for the
    method's default (DEFAULT_LM_HEAD). calibration: gptq only, the decoder's input feeds
    (`m3d_edge.calibration.decoder_feeds(...).feeds`). eight_bit: q41 only, MatMul nodes to store as 8-bit
    symmetric blocks (sym8) instead (int4-q41-lora8: the projections a merged LoRA changed)."""
    import onnx

    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is not supported; expected one of {', '.join(METHODS)}")
    lm_head = DEFAULT_LM_HEAD[method] if lm_head is None else lm_head
    if (method == "gptq") != (calibration is not None):
        raise ValueError("gptq needs calibration feeds (m3d_edge.calibration.decoder_feeds), and only gptq takes them")
    if lm_head not in LM_HEAD_POLICIES:
        raise ValueError(f"lm_head={lm_head!r} is not supported; expected one of {', '.join(LM_HEAD_POLICIES)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))  # with its external data
    all_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    branch = [name for name in all_matmuls if lora.is_branch(name)]  # a kept LoRA adapter stays float
    matmuls = [name for name in all_matmuls if not lora.is_branch(name)]
    if lm_head != "int4" and LM_HEAD_NODE not in matmuls:
        raise ValueError(f"{src}: no node named {LM_HEAD_NODE}; cannot give the LM head its own precision "
                         f"(lm_head={lm_head!r}); use lm_head='int4'")
    unknown = sorted(set(eight_bit) - (set(matmuls) - {LM_HEAD_NODE}))  # the head's precision is lm_head=
    if unknown or (eight_bit and method != "q41"):
        raise ValueError(f"eight_bit takes q41 MatMul nodes of {src}; got {unknown[:3] or method}")
    if method == "q41":
        symmetric = False
        plan = {name: "sym8" if name in eight_bit else "q41" for name in matmuls if name != LM_HEAD_NODE}
        head_scheme = {"int8": "sym8", "int4": "q41", "fp32": None}[lm_head]
        if head_scheme and LM_HEAD_NODE in matmuls:
            plan[LM_HEAD_NODE] = head_scheme
        offsets = _rewrite(model, plan, block_size, accuracy_level)
        library = "m3d_edge.export.nbits"
    elif method == "gptq":
        symmetric = False
        layers = [name for name in matmuls if name != LM_HEAD_NODE]
        given = _gptq_blocks(model, layers + ([LM_HEAD_NODE] if lm_head == "int4" else []), block_size, calibration)
        plan = {name: "gptq" for name in given}
        if lm_head == "int8" and LM_HEAD_NODE in matmuls:
            plan[LM_HEAD_NODE] = "sym8"
        offsets = _rewrite(model, plan, block_size, accuracy_level, given)
        library = "m3d_edge.export.gptq + m3d_edge.export.nbits"
    else:
        symmetric = symmetric if method == "rtn" else False  # HQQ fits a zero point by construction
        model = _ort_quantize(model, method, block_size, symmetric, accuracy_level,
                              exclude=branch + ([] if lm_head == "int4" else [LM_HEAD_NODE]))
        offsets = 0
        library = "onnxruntime.quantization.matmul_nbits_quantizer"
        if lm_head == "int8":
            _rewrite(model, {LM_HEAD_NODE: "sym8"}, block_size, accuracy_level)
            library += " (LM head: m3d_edge.export.nbits)"
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    done = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    zero_points = {"q41": "uint4", "hqq": "float", "gptq": "uint4"}.get(method, None if symmetric else "uint4")
    return {"method": method, "bits": 4, "block_size": block_size, "symmetric": symmetric,
            "zero_points": zero_points, "block_offsets": "float32" if method == "q41" else None,
            "accuracy_level": accuracy_level, "op": "MatMulNBits", "lm_head": lm_head,
            "lm_head_bits": _LM_HEAD_BITS[lm_head],
            "quantize_lm_head": lm_head != "fp32", "matmuls_quantized": done,
            "matmuls_kept_float": len(matmuls) - done, "lora_branch_matmuls": len(branch), "offset_terms": offsets,
            "eight_bit_matmuls": len(set(eight_bit)),
            "embeddings": "embeddings.npy float16 (outside the graph)", "library": library}


def _ort_quantize(model, method: str, block_size: int, symmetric: bool, accuracy_level: int, exclude: list[str]):
    """rtn / hqq through onnxruntime's MatMulNBitsQuantizer; returns the new ModelProto."""
    mnb = import_keeping_logging("onnxruntime.quantization.matmul_nbits_quantizer")

    if method == "rtn":
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                accuracy_level=accuracy_level)
    else:
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
    return quantizer.model.model


def _gptq_blocks(model, names: list[str], block_size: int, feeds: Sequence[Mapping[str, Any]]) -> dict:
    """{MatMul name: Blocks} for the named MatMuls that `_rewrite` can replace, from Hessians over `feeds`."""
    from onnx import numpy_helper

    if not feeds:
        raise ValueError("gptq needs at least one calibration feed")
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.name in names and _packable(inits.get(n.input[1]), block_size)]
    h = gptq.hessians(model, sorted({n.input[0] for n in nodes}), feeds)
    return {n.name: gptq.quantize_weight(numpy_helper.to_array(inits[n.input[1]]), h[n.input[0]], block=block_size)
            for n in nodes}


def _packable(init, block_size: int) -> bool:
    """A MatMul weight MatMulNBits can take: a 2-D initializer whose K is a multiple of the block."""
    return init is not None and len(init.dims) == 2 and init.dims[0] % block_size == 0


def _rewrite(model, plan: dict[str, str], block_size: int, accuracy_level: int,
             given: Optional[Mapping[str, Any]] = None) -> int:
    """Replace the MatMuls named in `plan` ({node name: nbits scheme}) in place; returns the number of offset terms
    added. A MatMul whose weight is not a 2-D initializer with K a multiple of the block stays float (counted by
    the caller as kept float)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    shared = nbits.Shared()
    nodes, dropped, offsets = [], set(), 0
    for n in graph.node:
        weight = n.input[1] if n.op_type == "MatMul" and n.name in plan else None
        init = inits.get(weight) if weight else None
        if not _packable(init, block_size) or uses[weight] != 1:
            nodes.append(n)
            continue
        new = nbits.rewrite_matmul(graph, n, numpy_helper.to_array(init), plan[n.name], block=block_size,
                                   accuracy_level=accuracy_level, shared=shared, blocks=(given or {}).get(n.name))
        offsets += sum(1 for m in new if m.op_type == "Add")
        nodes.extend(new)
        dropped.add(weight)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == nbits.MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(nbits.MS_DOMAIN, 1))
    return offsets


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
