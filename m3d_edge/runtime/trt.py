"""Native TensorRT engines in a bundle: which folder fits this machine, and running one engine on torch CUDA tensors.

    bundle/engines/<tag>/            tag = <gpu slug>-sm<compute capability>-trt<TensorRT version>
        vision.engine  [seg_encoder.engine]  [seg_detail.engine]  seg_decoder.engine
        engines.json                 tag, TensorRT version, per-engine sha256 and IO, build time

A serialized engine only runs on the GPU model and the TensorRT version that built it (TensorRT refuses other
versions outright, and warns that another GPU model may fail or run slowly), so a bundle may hold one folder per
machine type and the runtime picks the folder whose tag is this machine's. Anything else (no engines, another GPU,
another TensorRT, an engine whose sha256 differs from the manifest) gives None and a logged reason: the caller then
runs the ONNX graphs through ONNX Runtime, as it would without engines.

Engine files are listed in the manifest's `engines` section, not in `files`: `bundle.load(verify=True)` hashes
`files` on every load, and engines are hundreds of MB a CPU-only box never reads. They are hashed here, when a
folder is about to be used. `export.tensorrt.build_engines` writes both.

Imports: json, logging, re and runtime.bundle at module level; torch and tensorrt only inside the functions that
need a GPU (the CPU runtime never imports torch). The GPU is queried through torch.cuda because TRTEngine hands
torch CUDA tensors to TensorRT anyway, and torch's CUDA device i is the device TensorRT builds and runs on (both
honour CUDA_VISIBLE_DEVICES); nvidia-smi numbers GPUs in PCI order and ignores that variable, so on a box with two
different GPUs it could tag an engine with the wrong model.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from m3d_edge.runtime import bundle as bundle_reader

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINES_JSON = "engines.json"
ENGINES_FORMAT = "m3d-edge-engines/1"
ENGINE_SUFFIX = ".engine"
GRAPHS = ("vision", "seg_encoder", "seg_detail", "seg_decoder")  # the graphs TensorRT builds; decoder.onnx stays on ORT
MIN_TENSORRT_MAJOR = 10  # the name-based IO API (set_input_shape / set_tensor_address / execute_async_v3)
INSTALL_HINT = "run on a machine with an NVIDIA GPU and `pip install m3d-edge[gpu]`"

_TAG = re.compile(r"^(?P<gpu>[a-z0-9][a-z0-9-]*)-sm(?P<sm>\d+)-trt(?P<trt>\d+(?:\.\d+)*)$")


class TensorRTUnavailable(RuntimeError):
    """No CUDA GPU, or no usable TensorRT, on this machine; the message says which and how to fix it."""


class TRTEngineError(RuntimeError):
    """An engine file that cannot be loaded or run as asked; the message names the file and the fix."""


# -- tags --------------------------------------------------------------------------------------------------------

def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; 'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {name!r} has no letters or digits to build a tag from")
    return slug


def make_tag(gpu_name: str, capability: tuple[int, int], tensorrt_version: str) -> str:
    """The engine folder name for a GPU model, its compute capability (major, minor) and a TensorRT version.

    The full TensorRT version is kept (e.g. 10.13.3.9): engines are refused by any other TensorRT build."""
    major, minor = capability
    version = tensorrt_version.strip()
    if not re.fullmatch(r"\d+(?:\.\d+)*", version):
        raise ValueError(f"TensorRT version {tensorrt_version!r} is not dotted numbers")
    return f"{gpu_slug(gpu_name)}-sm{int(major)}{int(minor)}-trt{version}"


@dataclass(frozen=True)
class Tag:
    gpu: str          # slug, e.g. nvidia-h200
    sm: str           # compute capability digits, e.g. 90
    tensorrt: str     # e.g. 10.13.3.9

    @property
    def device(self) -> str:
        return f"{self.gpu} (sm{self.sm})"


def parse_tag(tag: str) -> Optional[Tag]:
    """A folder name -> its parts, or None when the name is not a tag (e.g. a leftover temp folder)."""
    m = _TAG.match(tag)
    return Tag(m["gpu"], m["sm"], m["trt"]) if m else None


def require_cuda(device: Optional[int] = None):
    """Return torch with a usable CUDA device, or raise TensorRTUnavailable saying what is missing."""
    try:
        import torch
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT engines are run on torch CUDA tensors and torch is not installed; "
                                  f"{INSTALL_HINT} (and a CUDA build of torch)") from e
    if not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise TensorRTUnavailable(f"no CUDA GPU available ({build}); TensorRT engines need one: {INSTALL_HINT}")
    if device is not None and not 0 <= device < torch.cuda.device_count():
        raise TensorRTUnavailable(f"CUDA device {device} does not exist (this machine has "
                                  f"{torch.cuda.device_count()})")
    return torch


def import_tensorrt():
    """Return the tensorrt module (10 or newer), or raise TensorRTUnavailable with the pip command."""
    try:
        import tensorrt as trt
    except ImportError as e:  # also raised when a broken install cannot load libnvinfer
        raise TensorRTUnavailable(f"the tensorrt Python package is not importable ({e}); `pip install "
                                  f"m3d-edge[gpu]` (or `pip install tensorrt`) on this GPU machine") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; {MIN_TENSORRT_MAJOR} or newer is needed "
                                  f"(`pip install -U 'tensorrt>={MIN_TENSORRT_MAJOR}'`)")
    return trt


def gpu_tag(device: Optional[int] = None) -> str:
    """This machine's engine tag, e.g. 'nvidia-h200-sm90-trt10.13.3.9', for CUDA device `device` (default: the
    current one). Raises TensorRTUnavailable without a CUDA GPU or without TensorRT (checked in that order)."""
    torch = require_cuda(device)
    trt = import_tensorrt()
    index = torch.cuda.current_device() if device is None else device
    return make_tag(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), trt.__version__)


# -- choosing the engine folder ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineChoice:
    """The engine folder to use (None: run ONNX Runtime) and, either way, a sentence saying why."""

    folder: Optional[Path]
    reason: str


def choose_engines(bundle_dir: str | Path, *, tag: Optional[str] = None, verify: bool = True) -> EngineChoice:
    """Find the engines built for this machine in a bundle.

    tag: this machine's tag (default: gpu_tag(), which needs CUDA and TensorRT). verify: check the engine files'
    sha256 against the manifest's `engines` section (the bundle's own files are verified by bundle.load)."""
    root = Path(bundle_dir)
    manifest = bundle_reader.read_manifest(root)
    listed: Mapping[str, Any] = manifest.get("engines") or {}
    engines_dir = root / ENGINES_DIR
    present = sorted(p.name for p in engines_dir.iterdir() if p.is_dir() and parse_tag(p.name)) \
        if engines_dir.is_dir() else []
    if not listed and not present:
        return EngineChoice(None, f"{root}: the bundle has no TensorRT engines; build them on this GPU with "
                                  f"m3d_edge.export.tensorrt.build_engines")
    if tag is None:
        try:
            tag = gpu_tag()
        except TensorRTUnavailable as e:
            return EngineChoice(None, f"{root}: has engines for {', '.join(present or sorted(listed))}, "
                                      f"but they cannot run here: {e}")
    if tag not in present:
        return EngineChoice(None, _mismatch(root, tag, present))
    folder = engines_dir / tag
    if tag not in listed:
        return EngineChoice(None, f"{folder}: not listed in the manifest's engines section (an interrupted build, "
                                  f"or copied in by hand); rebuild with build_engines(..., overwrite=True)")
    entry = listed[tag]
    try:
        info = read_engines_json(folder)
        if info.get("tag") != tag:
            raise bundle_reader.BundleError(f"{folder / ENGINES_JSON}: says tag {info.get('tag')!r}, the folder "
                                            f"is named {tag!r}; rebuild the engines")
        if verify:
            bundle_reader.verify_files(root, {"files": entry.get("files") or {}})
        missing = [n for n, f in (info.get("engines") or {}).items() if not (folder / f["file"]).is_file()]
        if missing or not info.get("engines"):
            raise bundle_reader.BundleError(f"{folder}: engine files missing for {', '.join(missing) or 'all'}")
    except bundle_reader.BundleError as e:
        return EngineChoice(None, f"engines for this machine are unusable: {e}")
    return EngineChoice(folder, f"{folder}: TensorRT engines built for this GPU and TensorRT ({tag})")


def engines_for_this_gpu(bundle_dir: str | Path, *, tag: Optional[str] = None,
                         verify: bool = True) -> Optional[Path]:
    """The bundle's engine folder for this GPU and TensorRT version, or None; the reason is logged (a warning when
    engines exist but cannot be used here, info when the bundle has none). See choose_engines for the arguments."""
    choice = choose_engines(bundle_dir, tag=tag, verify=verify)
    if choice.folder is not None:
        log.info("%s", choice.reason)
    elif "has no TensorRT engines" in choice.reason:
        log.info("%s; using ONNX Runtime", choice.reason)
    else:
        log.warning("%s; falling back to ONNX Runtime", choice.reason)
    return choice.folder


def _mismatch(root: Path, tag: str, present: list[str]) -> str:
    """Why none of the present folders fits `tag`: another GPU, or this GPU with another TensorRT."""
    here = parse_tag(tag)
    if here is None:
        return f"{root}: {tag!r} is not an engine tag (<gpu>-sm<cc>-trt<version>)"
    if not present:
        return f"{root}: the manifest lists engines but the engines folder is missing; copy the whole bundle again"
    same_gpu = [t for t in present if (p := parse_tag(t)) and (p.gpu, p.sm) == (here.gpu, here.sm)]
    if same_gpu:
        versions = ", ".join(parse_tag(t).tensorrt for t in same_gpu)
        return (f"{root}: engines for this GPU ({here.device}) were built with TensorRT {versions}; this machine "
                f"has TensorRT {here.tensorrt}, and engines only load in the version that built them; rebuild them "
                f"here with build_engines")
    others = ", ".join(f"{p.device} / TensorRT {p.tensorrt}" for p in map(parse_tag, present))
    return (f"{root}: engines were built for another GPU ({others}); this is {here.device} / TensorRT "
            f"{here.tensorrt}; rebuild them here with build_engines")


def read_engines_json(folder: str | Path) -> dict[str, Any]:
    file = Path(folder) / ENGINES_JSON
    if not file.is_file():
        raise bundle_reader.BundleError(f"{file}: missing; the engine folder is incomplete, rebuild it")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise bundle_reader.BundleError(f"{file}: not valid JSON ({e}); rebuild the engines") from e
    if info.get("format") != ENGINES_FORMAT:
        raise bundle_reader.BundleError(f"{file}: format {info.get('format')!r} is not known to this runtime "
                                        f"(it reads {ENGINES_FORMAT!r}); rebuild the engines")
    return info


# -- running an engine -------------------------------------------------------------------------------------------

_TRT_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def trt_logger():
    """One TensorRT logger per process, forwarding to `logging` (TensorRT keeps the first logger it is given and
    warns when a later builder or runtime brings another). Errors are also kept, so a failure can quote them."""
    global _TRT_LOGGER
    with _LOGGER_LOCK:
        if _TRT_LOGGER is None:
            trt = import_tensorrt()

            class _Forward(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.errors: list[str] = []

                def log(self, severity, msg) -> None:
                    sev = trt.ILogger.Severity
                    if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                        self.errors.append(msg)
                        del self.errors[:-20]
                        log.error("TensorRT: %s", msg)
                    elif severity == sev.WARNING:
                        log.warning("TensorRT: %s", msg)
                    elif severity == sev.INFO:
                        log.debug("TensorRT: %s", msg)

            _TRT_LOGGER = _Forward()
        return _TRT_LOGGER


def torch_dtype(trt_dtype):
    """A TensorRT DataType -> the torch dtype of the buffer it needs."""
    import torch

    trt = import_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if trt_dtype not in table:
        raise TRTEngineError(f"TensorRT data type {trt_dtype} has no torch buffer type here")
    return table[trt_dtype]


def describe_engine(engine) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a deserialized engine: name, dtype (numpy-style name), shape (-1 where dynamic) and,
    for inputs, the optimization profile's [min, opt, max] shapes."""
    trt = import_tensorrt()
    out: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry: dict[str, Any] = {"name": name, "dtype": str(torch_dtype(engine.get_tensor_dtype(name))).split(".")[-1],
                                 "shape": [int(d) for d in engine.get_tensor_shape(name)]}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            entry["profile"] = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, 0)]
            out["inputs"].append(entry)
        else:
            out["outputs"].append(entry)
    return out


class TRTEngine:
    """One serialized engine, run on torch CUDA tensors: `outputs = engine(images=x)` -> {name: tensor}.

    Inputs must be CUDA tensors of the engine's dtype (float32 for our graphs: fp16 engines keep float32 IO).
    Outputs are allocated per call with the shapes TensorRT infers from the inputs. Work is enqueued on an
    engine-owned stream ordered after, and before, torch's current stream, so callers see ordinary torch stream
    semantics (no host synchronisation). Why not torch's current stream directly: it is usually the legacy default
    stream, on which TensorRT adds synchronisations of its own to enqueueV3. One call at a time per engine (an
    execution context holds the shapes and addresses of one inference): a lock serialises calls."""

    def __init__(self, path: str | Path, *, device: Optional[int] = None) -> None:
        self.path = Path(path)
        torch = require_cuda(device)
        trt = import_tensorrt()
        if not self.path.is_file():
            raise TRTEngineError(f"{self.path}: engine file not found")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        logger = trt_logger()
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                detail = f" ({logger.errors[-1]})" if logger.errors else ""
                raise TRTEngineError(f"{self.path}: TensorRT {trt.__version__} could not load this engine{detail}; "
                                     f"it was probably built for another GPU or TensorRT version: rebuild it here")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TRTEngineError(f"{self.path}: could not create an execution context (out of GPU memory?)")
            self._stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = {n: [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0)]
                         for n in self.inputs}
        self._lock = threading.Lock()

    def __call__(self, feeds: Optional[Mapping[str, Any]] = None, /, **named: Any) -> dict[str, Any]:
        import torch

        feeds = {**(feeds or {}), **named}
        missing, extra = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or extra:
            raise ValueError(f"{self.path.name}: inputs are {', '.join(self.inputs)}; missing "
                             f"{sorted(missing) or 'none'}, unknown {sorted(extra) or 'none'}")
        with self._lock, torch.cuda.device(self.device):
            tensors = {}
            for name in self.inputs:
                x = feeds[name]
                if not isinstance(x, torch.Tensor) or x.device != self.device:
                    where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"{self.path.name}: input {name} is on {where}; TensorRT reads GPU memory, "
                                     f"move it with .to('{self.device}')")
                if x.dtype != self.dtypes[name]:
                    raise TypeError(f"{self.path.name}: input {name} is {x.dtype}, the engine takes "
                                    f"{self.dtypes[name]}; convert it with .to({self.dtypes[name]})")
                x = x.contiguous()  # TensorRT assumes dense row-major buffers
                if not self.context.set_input_shape(name, tuple(x.shape)):
                    lo, _, hi = self.profiles[name]
                    raise ValueError(f"{self.path.name}: input {name} has shape {tuple(x.shape)}; this engine "
                                     f"takes {lo} up to {hi} (its optimization profile)")
                tensors[name] = x
            unresolved = self.context.infer_shapes()
            if unresolved:
                raise TRTEngineError(f"{self.path.name}: TensorRT could not infer the shapes of {unresolved}")
            outputs = {}
            for name in self.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            for name, t in (*tensors.items(), *outputs.items()):
                self.context.set_tensor_address(name, t.data_ptr())
            current = torch.cuda.current_stream(self.device)
            # The engine's stream waits for the work that produced the inputs; the caller's stream then waits for
            # the engine. Every later use, or reuse by the caching allocator, of these buffers on the caller's
            # stream is therefore ordered after the engine: no record_stream bookkeeping is needed.
            self._stream.wait_stream(current)
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise TRTEngineError(f"{self.path.name}: execute_async_v3 failed; see the TensorRT log")
            current.wait_stream(self._stream)
        return outputs


def load_engines(folder: str | Path, *, device: Optional[int] = None) -> dict[str, TRTEngine]:
    """Every engine of a folder chosen by choose_engines / engines_for_this_gpu: {graph name: TRTEngine}."""
    folder = Path(folder)
    info = read_engines_json(folder)
    return {name: TRTEngine(folder / entry["file"], device=device) for name, entry in info["engines"].items()}
