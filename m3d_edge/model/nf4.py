"""The LLM of a LaMed in 4-bit NF4 for the PyTorch backend (bitsandbytes), for quantization experiments.

The ONNX bundle is the deployment path (export.quantize); this is the researcher's path: the same LaMed object,
its LLM's projections swapped in place for bitsandbytes `Linear4bit` (NF4, blocks of 64, float32 absmax: no
double quantization, which would save 0.4 bit per weight at some accuracy; fp32 compute), so that
`LaMed.generate`, the evaluation and the benchmarks run on it unchanged. Vision, projector, seg module, the token
embeddings and the LM head stay as they are (the QLoRA convention). bitsandbytes >= 0.46 runs NF4 on CPU as well
as on CUDA; on CPU its fallback kernel dequantizes per call (slow: for accuracy figures, not for speed).

Not `from_pretrained(quantization_config=BitsAndBytesConfig(...))`: our SmolLM2 comes from a GGUF and official
checkpoints from our own key mapping, so the model exists before quantization; swapping its Linears is the one way
that serves both. A merged LoRA is quantized with its base, as QLoRA's merged export would be.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SKIP = ("lm_head",)  # module names (last part) left in float
BLOCK = 64  # bitsandbytes' NF4 block size


def quantize_llm_nf4(model, *, skip: tuple[str, ...] = SKIP) -> dict[str, Any]:
    """Swap every nn.Linear inside `model.llm` (but `skip`) for an NF4 Linear4bit holding the same weights, in
    place. Returns a record of what was done (for reports)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("NF4 needs bitsandbytes: pip install 'bitsandbytes>=0.46' (install torch first; "
                          "bitsandbytes >= 0.46 runs on CPU too)") from e
    llm = model.base_llm
    swapped, params, kept = 0, 0, []
    for name, module in list(llm.named_modules()):
        if (not isinstance(module, nn.Linear) or isinstance(module, bnb.nn.Linear4bit)
                or name.rsplit(".", 1)[-1] in skip):
            continue
        if module.in_features % BLOCK:
            # bitsandbytes 0.50's CPU quantizer puts wrong values into the blocks after the first row ends inside
            # a block (measured: a [64, 160] weight; rows of 576 / 1536 / 3072 / 4096 / 11008 are whole blocks)
            kept.append(name)
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(module.weight.data.detach().float().cpu(), requires_grad=False,
                                     quant_type="nf4", blocksize=BLOCK, compress_statistics=False)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.detach().float().cpu(), requires_grad=False)
        device = module.weight.device
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, child, q.to(device))
        swapped += 1
        params += module.in_features * module.out_features
    if swapped == 0:
        raise ValueError("the LLM has no nn.Linear to quantize (already quantized?)")
    return {"method": "nf4", "library": f"bitsandbytes {bnb.__version__}", "block_size": BLOCK,
            "absmax": "float32 (no double quantization)",
            "linears": swapped, "weights": params, "skipped": list(skip), "kept_float": kept,
            "compute_dtype": "float32"}
