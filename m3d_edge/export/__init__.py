"""Export: a LaMed checkpoint -> ONNX graphs, a 4-bit LLM decoder, TensorRT engines, a verified bundle."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Callable


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
