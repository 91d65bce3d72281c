"""Export: a LaMed checkpoint -> ONNX graphs, a 4-bit LLM decoder, TensorRT engines, a verified bundle."""

from __future__ import annotations

from typing import Callable


def reporter(progress: bool, stage: str = "export") -> Callable[[str], None]:
    """A progress printer for one export stage ("[export] writing vision.onnx"), or a no-op."""
    if not progress:
        return lambda message: None

    def say(message: str) -> None:
        print(f"[{stage}] {message}", flush=True)

    return say
