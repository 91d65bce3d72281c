"""Keep a merged LoRA adapter out of the 4-bit weights: take it back out of the float decoder graph's weights and
add it again as a float branch beside each MatMul it touched, before `export.quantize` runs.

    y = x @ W                                   W = W_base + (s B A)^T, what the builder wrote (merged)
 -> y = x @ W_base  +  (x @ A^T) @ (s B)^T      W_base is then quantized; the two small MatMuls stay float

Why (model.lora): the adapter's update is far below half a 4-bit step of the base, so quantizing the merged
weight loses it. Our base, SmolLM2, *is* 4-bit (the GGUF's Q4_1 blocks), so the q41 scheme stores W_base
exactly and the 4-bit bundle computes the trained model up to its int8 activations.

The builder packs q, k and v into one MatMul (/model/layers.i/attn/qkv_proj/MatMul, columns q | k | v): their
A's stack into one [K, 3r] matrix and their B's into one block-diagonal [3r, N], so a packed weight gets two
small MatMuls and one Add like any other. Every placement is checked against the torch model's merged weight
(the graph's columns must equal it exactly) before anything is changed; a layout we cannot place is an error
that says to export fp32 or fp16 instead (those keep the merged weights, which their precision resolves).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from onnx import ModelProto, helper, numpy_helper
from torch import nn

from m3d_edge.model.lora import MergedLora

BRANCH_PREFIX = "/lora"
_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_PACKED_QKV = ("q_proj", "k_proj", "v_proj")


class LoraPlacementError(RuntimeError):
    """The adapter cannot be kept apart in this graph; the message says which module and what to do."""


def is_branch(node_name: str) -> bool:
    """True for the nodes `split_adapter` adds (the quantizer leaves them float)."""
    return node_name.startswith(BRANCH_PREFIX + "/")


def split_adapter(model: ModelProto, lora: MergedLora, llm: nn.Module) -> dict[str, Any]:
    """Rewrite the float decoder `model` in place: W -> W_base for every adapted weight, plus the float branch.
    `llm` is the Hugging Face model the graph was exported from (merged). Returns the manifest's record."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    weights: dict[str, np.ndarray] = {}  # initializer name -> its (edited) array
    groups: dict[str, list[tuple[str, int, int]]] = {}  # node -> [(module, first column, end column)]
    for module in lora.factors:
        node_name, first, end = _locate(module, nodes, llm)
        node = nodes[node_name]
        name = node.input[1]
        if name not in weights:
            if name not in inits:
                raise LoraPlacementError(f"{node_name}: its weight {name!r} is not an initializer")
            weights[name] = numpy_helper.to_array(inits[name]).astype(np.float32, copy=True)
        w = weights[name]
        merged = llm.get_submodule(module).weight.detach().float().numpy().T  # [in, out]
        if w.shape[0] != merged.shape[0] or not np.array_equal(w[:, first:end], merged):
            raise LoraPlacementError(f"{module}: the columns {first}:{end} of {node_name} are not its merged weight; "
                                     f"this graph layout cannot keep the adapter apart. Export with --llm fp32 or "
                                     f"fp16 (they keep the merged weights)")
        groups.setdefault(node_name, []).append((module, first, end))

    branches = {}
    for node_name, parts in groups.items():
        node = nodes[node_name]
        w = weights[node.input[1]]
        a = np.concatenate([lora.factors[m][0].numpy().T for m, _, _ in parts], axis=1)  # [K, R]
        b = np.zeros((a.shape[1], w.shape[1]), np.float32)  # [R, N], block-diagonal
        row = 0
        for module, first, end in parts:
            w[:, first:end] -= lora.delta(module).numpy().T
            rank = lora.factors[module][0].shape[0]
            b[row:row + rank, first:end] = lora.scaling * lora.factors[module][1].numpy().T
            row += rank
        branches[node_name] = _branch(graph, node, a.astype(np.float32), b)
    for name, w in weights.items():
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    # each branch right after the MatMul it extends keeps the node list in topological order
    ordered = []
    for node in graph.node:
        ordered += [node, *branches.get(node.name, ())]
    del graph.node[:]
    graph.node.extend(ordered)
    return record(lora, "float branch beside the quantized base", matmuls_with_branch=len(groups))


def record(lora: MergedLora, kept: str, **counts: int) -> dict[str, Any]:
    """The manifest's `lora` record: how the adapter was kept, its rank, scaling and module count, and `counts`."""
    return {"kept": kept, "rank": lora.rank, "scaling": lora.scaling, "modules": len(lora.factors), **counts}


def adapted_matmuls(model: ModelProto, lora: MergedLora, llm: nn.Module) -> list[str]:
    """The MatMul nodes of the float decoder `model` whose weights the adapter changed (q|k|v packed count once),
    for the export that keeps them merged at 8 bits instead of splitting the adapter out (int4-q41-lora8)."""
    nodes = {n.name: n for n in model.graph.node}
    return sorted({_locate(module, nodes, llm)[0] for module in lora.factors})


def _locate(module: str, nodes: dict, llm: nn.Module) -> tuple[str, int, int]:
    """The MatMul node holding `module`'s weight and its column range [first, end)."""
    match = _MODULE.fullmatch(module)
    if match is None:
        raise LoraPlacementError(f"LoRA on {module!r}: only decoder-layer projections can be kept apart; export "
                                 f"with --llm fp32 or fp16")
    layer, block, proj = match.groups()
    prefix = f"/model/layers.{layer}/{'attn' if block == 'self_attn' else 'mlp'}"
    out = llm.get_submodule(module).weight.shape[0]
    if f"{prefix}/{proj}/MatMul" in nodes:
        return f"{prefix}/{proj}/MatMul", 0, out
    packed = f"{prefix}/qkv_proj/MatMul"
    if proj in _PACKED_QKV and packed in nodes:
        parent = module.rsplit(".", 1)[0]
        first = sum(llm.get_submodule(f"{parent}.{p}").weight.shape[0] for p in _PACKED_QKV[:_PACKED_QKV.index(proj)])
        return packed, first, first + out
    raise LoraPlacementError(f"LoRA on {module!r}: decoder.onnx has no MatMul for it (looked for {prefix}/{proj}/"
                             f"MatMul{' and ' + packed if proj in _PACKED_QKV else ''}); export with --llm fp32 or fp16")


def _branch(graph, node, a: np.ndarray, b: np.ndarray) -> list:
    """x @ a @ b added to `node`'s output (whose consumers keep reading the same name)."""
    base = node.name.rsplit("/", 1)[0]
    name = f"{BRANCH_PREFIX}{base}"
    out = node.output[0]
    node.output[0] = f"{out}/base"
    graph.initializer.extend([numpy_helper.from_array(a, f"{name}.A"), numpy_helper.from_array(b, f"{name}.B")])
    return [helper.make_node("MatMul", [node.input[0], f"{name}.A"], [f"{name}/A/output_0"], name=f"{name}/A/MatMul"),
            helper.make_node("MatMul", [f"{name}/A/output_0", f"{name}.B"], [f"{name}/B/output_0"],
                             name=f"{name}/B/MatMul"),
            helper.make_node("Add", [f"{out}/base", f"{name}/B/output_0"], [out], name=f"{name}/Add")]

