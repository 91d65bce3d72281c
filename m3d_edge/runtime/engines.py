"""ONNX Runtime sessions, created once per file, on the best execution provider this machine offers.

numpy + onnxruntime only (the CPU runtime never imports torch). Provider order: TensorRT, then CUDA, then CPU,
each only when asked for and installed; ORT itself falls back per node to the next provider in the list.
Native TensorRT engines (`export.tensorrt`) are not handled here yet.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnxruntime as ort

DEVICES = ("cpu", "cuda")


class EngineError(RuntimeError):
    """A session that cannot be created as asked; the message names the file or provider and the fix."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def providers_for(device: str, *, tensorrt: bool = False) -> list[str]:
    """The provider list for `device`. Asking for CUDA or TensorRT where ORT has no such provider is an error, not
    a silent fall-back to CPU: a hospital box that lost its GPU should say so."""
    if device not in DEVICES:
        raise EngineError(f"device={device!r} is not supported; expected one of {', '.join(DEVICES)}")
    have = set(available_providers())
    if tensorrt and device != "cuda":
        raise EngineError("TensorRT needs device='cuda'")
    wanted = ["TensorrtExecutionProvider"] if tensorrt else []
    wanted += ["CUDAExecutionProvider"] if device == "cuda" else []
    missing = [p for p in wanted if p not in have]
    if missing:
        raise EngineError(f"{', '.join(missing)} not available in this onnxruntime build "
                          f"(it has {', '.join(sorted(have))}); install onnxruntime-gpu on a machine with an NVIDIA GPU, or use device='cpu'")
    return wanted + ["CPUExecutionProvider"]


_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _share_cpu_arena() -> None:
    """Register one CPU memory arena for the whole process (once); sessions opt in with
    `session.use_env_allocators`. Each session otherwise keeps its own arena at its own peak: the vision graph's
    buffers and the mask decoder's then both stay held, while with one arena the mask decoder reuses what the
    vision run freed. Measured on the phantom-small int4 bundle (scan -> four answers, three times): peak RSS
    525 -> 475 MB, with no growth over repeated runs."""
    global _shared_arena_registered
    with _shared_arena_lock:
        if not _shared_arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's default arena settings
            _shared_arena_registered = True


def session_options(threads: Optional[int] = None, mem_pattern: bool = True) -> ort.SessionOptions:
    """mem_pattern=False: ORT does not plan one block for all of a run's activations but takes each from the shared
    arena as it goes, so blocks are reused; for the seg decoder with a detail path (3-D convs at 32 x 64 x 64) that
    is 95 instead of 158 MB of peak RSS, the same output and no slower (docs/runtime.md). Only there: with every
    session so (one run of benchmarks/runtime.py, 2026-12-07) peak RSS stayed 464 MB while decode fell from 140 to
    119 tokens/s and vision rose from 0.12 to 0.14 s."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_mem_pattern = mem_pattern
    if threads:
        opts.intra_op_num_threads = threads
    _share_cpu_arena()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    # Logging at "warning" lets the few ORT messages that matter through (e.g. a node falling back to CPU).
    opts.log_severity_level = 2
    return opts


def create_session(path: str | Path, *, device: str = "cpu", tensorrt: bool = False,
                   threads: Optional[int] = None, mem_pattern: bool = True) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: ONNX file not found")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, mem_pattern),
                                    providers=providers_for(device, tensorrt=tensorrt))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as e:
        raise EngineError(f"{path}: onnxruntime could not load it ({e})") from e


@dataclass
class Engines:
    """One session per ONNX file (and its options), created on first use and kept:
    `Engines(device="cpu").get(path)`."""

    device: str = "cpu"
    tensorrt: bool = False
    threads: Optional[int] = None
    _sessions: dict[tuple[Path, bool], ort.InferenceSession] = field(default_factory=dict, repr=False)

    def get(self, path: str | Path, *, mem_pattern: bool = True) -> ort.InferenceSession:
        key = (Path(path).resolve(), mem_pattern)  # a session made with other options is not this one
        if key not in self._sessions:
            self._sessions[key] = create_session(key[0], device=self.device, tensorrt=self.tensorrt,
                                                 threads=self.threads, mem_pattern=mem_pattern)
        return self._sessions[key]
