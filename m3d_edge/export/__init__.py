"""Export: a LaMed checkpoint -> ONNX graphs, a 4-bit LLM decoder, TensorRT engines, a verified bundle.

This package file stays free of torch: the CLI reads the default precision and a checkpoint's digest from here
to find a cached default bundle without importing the model code.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Callable

LLM_PRECISIONS = ("int4-q41", "int4-q41-lora8", "int4-rtn", "int4-hqq", "int4-gptq", "fp32", "fp16")
DEFAULT_LLM = "int4-q41-lora8"
# int4-q41 stores SmolLM2's Q4_1 weights exactly and keeps a merged LoRA beside them as a float branch
# (export.lora), so the trained model's answers survive: phantom-small +0.55% perplexity from the int8
# activations, 24% of fp32's bytes (docs/export.md). int4-rtn decodes faster but re-rounds the base (+72%).
# int4-q41-lora8, the default since 2026-12-04: the same, but the projections the LoRA changed (q|k|v, o) stay
# merged and are stored at 8 bits instead of a float branch: decode 5-10% faster step for step, perplexity +0.91%
# against q41's +1.17%, closer to the fp32 bundle's answers (docs/export.md, docs/runtime.md). Without a LoRA it
# is int4-q41.
# What the export writes for a given checkpoint; bumped whenever that changes, so that cached default bundles
# (`m3d-edge run` without --bundle) are rebuilt. 2: ViT attention traced in query chunks (export.onnx).
# 3: a seg detail path is its own graph, seg_detail.onnx, instead of a part of seg_decoder.onnx.
EXPORT_REVISION = 3


# What a checkpoint folder holds for people, not for the loader: the model card and its held-out metrics. Editing
# them must not make a cached bundle of the same weights stale.
CHECKPOINT_DOCS = ("README.md", "eval.json")


def checkpoint_digest(folder: str | Path) -> str:
    """One sha256 over a checkpoint folder: each file's name and sha256, sorted (sub-folders and CHECKPOINT_DOCS
    excluded)."""
    from m3d_edge.runtime.bundle import sha256_file

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in CHECKPOINT_DOCS):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def built_from(bundle_dir: str | Path, checkpoint: str | Path | None) -> bool:
    """True when `bundle_dir` holds a bundle of `checkpoint` (a checkpoint folder, its digest in the manifest's
    provenance; None: a preset, which has no digest) written by this export revision. Benchmarks that keep a work
    folder across runs rebuild what this refuses, so a retrained model is never measured through an old bundle."""
    import json

    manifest = Path(bundle_dir) / "manifest.json"
    if not manifest.is_file():
        return False
    provenance = json.loads(manifest.read_text()).get("provenance", {})
    digest = checkpoint_digest(checkpoint) if checkpoint is not None else None
    return (provenance.get("source", {}).get("sha256") == digest
            and provenance.get("export_revision") == EXPORT_REVISION)


def import_keeping_logging(name: str) -> ModuleType:
    """Import `name` and undo any change it makes to the root logger. onnxruntime's matmul_nbits_quantizer (also
    imported by onnxruntime-genai's builder) calls logging.basicConfig(level=INFO) at import, after which every
    INFO record of every library (matplotlib's font cache, ...) would be printed by our CLI."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(name)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def reporter(progress: bool, stage: str = "export") -> Callable[[str], None]:
    """A progress printer for one export stage ("[export] writing vision.onnx"), or a no-op."""
    if not progress:
        return lambda message: None

    def say(message: str) -> None:
        print(f"[{stage}] {message}", flush=True)

    return say
