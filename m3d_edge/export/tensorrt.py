"""TensorRT engines for a bundle's vision and segmentation graphs (GPU machines only).

    build_engines(bundle) -> bundle/engines/<tag>/{vision,seg_encoder,seg_detail,seg_decoder}.engine + engines.json

tag = <GPU name slug>-sm<compute capability>-trt<TensorRT version>, e.g. nvidia-h200-sm90-trt10.13.3.9
(`gpu_tag()`): an engine only runs on the GPU model and the TensorRT version that built it, so a bundle carries one
folder per kind of machine and the runtime (`runtime.trt.engines_for_this_gpu`) picks its own or falls back to ONNX
Runtime. decoder.onnx is not built: its KV cache lives in ORT's GroupQueryAttention (export.llm).

Each engine: the bundle's ONNX file parsed by TensorRT's ONNX parser; one optimization profile over batch
1..max_batch, tuned for batch 1 (one scan per question is the common case); fp16 by default, with float32
inputs and outputs as in the ONNX graph. fp16 on TensorRT 10 is the builder flag (weak typing: TensorRT may keep a
layer in fp32 when that is faster or the layer needs it). TensorRT 11 dropped the flag; there the graph is first
converted to fp16 (export.onnx.to_fp16, as `--vision fp16` does) and built strongly typed.

The folder is built in a hidden temp folder beside its target and renamed into place; then the manifest gets an
`engines` entry for the tag (files with sha256 and bytes), written atomically. Engines are not added to the
manifest's `files`, which `runtime.bundle.load` hashes on every load: hundreds of MB a CPU box never reads, and a
bundle copied without its engines must stay valid. The runtime hashes an engine folder when it is about to use it.

Errors: no CUDA GPU, or no TensorRT -> TensorRTUnavailable (a RuntimeError) with the fix; an ONNX graph TensorRT
cannot parse or build -> EngineBuildError quoting TensorRT's own messages; an existing folder for the tag ->
FileExistsError unless overwrite=True. A failure leaves the bundle as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from m3d_edge.export import reporter
from m3d_edge.runtime import bundle as bundle_reader
from m3d_edge.runtime.trt import (ENGINE_SUFFIX, ENGINES_DIR, ENGINES_FORMAT, ENGINES_JSON, GRAPHS, TensorRTUnavailable,
                                  TRTEngine, choose_engines, describe_engine, engines_for_this_gpu, gpu_tag,
                                  import_tensorrt, make_tag, parse_tag, read_engines_json, require_cuda, trt_logger)

__all__ = ["TensorRTUnavailable", "EngineBuildError", "TRTEngine", "gpu_tag", "make_tag", "parse_tag",
           "build_engines", "build_engine", "engines_for_this_gpu", "choose_engines", "publish_engines",
           "engines_info", "read_engines_json"]

OPT_BATCH = 1


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message quotes TensorRT's errors and names the file."""


def build_engines(bundle_dir: str | Path, *, fp16: bool = True, max_batch: int = 8, workspace_gb: float = 8,
                  overwrite: bool = False, graphs: Optional[Sequence[str]] = None,
                  optimization_level: Optional[int] = None, progress: bool = True) -> Path:
    """Build TensorRT engines for the bundle's vision / seg graphs on this GPU; return the engine folder.

    graphs: a subset of vision, seg_encoder, seg_detail, seg_decoder (default: each one the bundle has).
    optimization_level: TensorRT's builder optimization level 0..5 (None: TensorRT's default, 3; lower builds
    faster, runs slower).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}; it must be at least 1")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb={workspace_gb}; it must be positive")
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level={optimization_level}; TensorRT takes 0..5")
    tag = gpu_tag()  # TensorRTUnavailable before anything is read or written
    trt = import_tensorrt()
    torch = require_cuda()
    say = reporter(progress, "tensorrt")
    root = Path(bundle_dir)
    bundle = bundle_reader.load(root, verify=True)  # never build engines from a damaged bundle
    names = [g for g in GRAPHS if bundle.has(g)] if graphs is None else list(graphs)
    unknown = [g for g in names if g not in GRAPHS or not bundle.has(g)]
    if unknown or not names:
        raise ValueError(f"graphs {unknown or names}: the bundle's TensorRT-buildable graphs are "
                         f"{', '.join(g for g in GRAPHS if bundle.has(g)) or 'none'}")
    engines_root = root / ENGINES_DIR
    engines_root.mkdir(exist_ok=True)
    with _build_lock(engines_root):
        if (engines_root / tag).exists() and not overwrite:
            raise FileExistsError(f"{engines_root / tag} exists; pass overwrite=True to rebuild it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.partial-", dir=engines_root))
        try:
            cache: list[Any] = []  # one timing cache across the graphs: the ViT layers repeat between them
            records, typing, started = {}, None, time.perf_counter()
            for name in names:
                component = bundle.component(name)
                source = root / component["file"]
                target = tmp / f"{name}{ENGINE_SUFFIX}"
                say(f"{name}: building {'fp16' if fp16 else 'fp32'} engine from {source.name} "
                    f"(batch 1..{max_batch}) on {tag}")
                built = build_engine(source, target, fp16=fp16, max_batch=max_batch,
                                     workspace_bytes=int(workspace_gb * (1 << 30)),
                                     optimization_level=optimization_level, timing_cache=cache,
                                     source_precision=component.get("precision", "fp32"))
                _check_io_names(name, component, built["io"], source)
                typing = built["typing"]
                records[name] = {"file": target.name, "sha256": bundle_reader.sha256_file(target),
                                 "bytes": target.stat().st_size,
                                 "source": {"file": component["file"],
                                            "sha256": bundle.manifest["files"][component["file"]]["sha256"]},
                                 **built["io"], "build_seconds": round(built["seconds"], 2)}
                say(f"{name}: {records[name]['bytes'] / 1e6:.1f} MB in {built['seconds']:.1f} s")
            index = torch.cuda.current_device()
            info = engines_info(tag, records, gpu_name=torch.cuda.get_device_name(index),
                                capability=torch.cuda.get_device_capability(index), tensorrt=trt.__version__,
                                precision="fp16" if fp16 else "fp32", typing=typing, max_batch=max_batch,
                                workspace_bytes=int(workspace_gb * (1 << 30)),
                                optimization_level=optimization_level,
                                build_seconds=time.perf_counter() - started,
                                cuda=torch.version.cuda)
            write_engines_json(tmp, info)
            folder = publish_engines(root, tmp, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"engines written: {folder}")
    return folder


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = True, max_batch: int = 8,
                 workspace_bytes: int = 8 << 30, optimization_level: Optional[int] = None,
                 timing_cache: Optional[list] = None, source_precision: str = "fp32") -> dict[str, Any]:
    """Build one engine from one ONNX file with a dynamic batch axis 0 (profile 1 / OPT_BATCH / max_batch).

    timing_cache: a list holding (or receiving) one TensorRT timing cache to share across calls.
    Returns {"typing": "weak"|"strong", "seconds": build time, "io": describe_engine(...)}."""
    trt = import_tensorrt()
    logger = trt_logger()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    # TensorRT 10 has BuilderFlag.FP16 (weak typing, deprecated from 10.12); TensorRT 11 removed it and builds every
    # network strongly typed, so the fp16 arithmetic must already be in the graph.
    strong = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m3d-trt-") as work:
        parse_path = onnx_path
        if strong and source_precision != "fp16":
            parse_path = _fp16_copy(onnx_path, Path(work))
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file (not parse(bytes)) so that weights in an external .data file beside the graph are found
        if not parser.parse_from_file(str(parse_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors or 'no detail'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if fp16 and not strong:
            config.set_flag(trt.BuilderFlag.FP16)
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if timing_cache is not None:
            if not timing_cache:
                timing_cache.append(config.create_timing_cache(b""))
            config.set_timing_cache(timing_cache[0], False)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(int(d) for d in tensor.shape)
            if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
                raise EngineBuildError(f"{onnx_path}: input {tensor.name} has shape {shape}; expected a dynamic "
                                       f"batch axis 0 and fixed other axes (as export.onnx writes them)")
            rest = shape[1:]
            profile.set_shape(tensor.name, (1, *rest), (min(OPT_BATCH, max_batch), *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
        del logger.errors[:]
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = "; ".join(logger.errors[-3:]) or "see the TensorRT log"
            raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine ({detail})")
        data = bytes(memoryview(serialized))
    seconds = time.perf_counter() - started
    engine_path.write_bytes(data)
    # Load it back: proves the plan deserializes here and gives the IO as the runtime will see it. The runtime
    # is kept in a name until the engine is described: TensorRT wants it alive as long as its engines.
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineBuildError(f"{engine_path}: the engine just built does not load back; see the TensorRT log")
    io = describe_engine(engine)
    del engine, runtime
    return {"typing": "strong" if strong else "weak", "seconds": seconds, "io": io}


# -- bookkeeping (no TensorRT needed: tested on CPU) -------------------------------------------------------------

def engines_info(tag: str, engines: dict[str, dict[str, Any]], *, gpu_name: str, capability: tuple[int, int],
                 tensorrt: str, precision: str, typing: Optional[str], max_batch: int, workspace_bytes: int,
                 optimization_level: Optional[int], build_seconds: float, cuda: Optional[str] = None) -> dict:
    """The content of engines.json. engines: {graph: {file, sha256, bytes, source, inputs, outputs, ...}}."""
    if make_tag(gpu_name, capability, tensorrt) != tag:
        raise ValueError(f"tag {tag!r} does not match GPU {gpu_name!r} sm{capability[0]}{capability[1]} and "
                         f"TensorRT {tensorrt}")
    return {
        "format": ENGINES_FORMAT,
        "tag": tag,
        "gpu": {"name": gpu_name, "compute_capability": f"{capability[0]}.{capability[1]}"},
        "tensorrt": tensorrt,
        "cuda": cuda,
        "precision": precision,
        "typing": typing,
        "profile": {"min_batch": 1, "opt_batch": min(OPT_BATCH, max_batch), "max_batch": max_batch},
        "workspace_bytes": workspace_bytes,
        "optimization_level": optimization_level,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 2),
        "engines": engines,
    }


def write_engines_json(folder: str | Path, info: dict[str, Any]) -> Path:
    folder = Path(folder)
    for name, entry in info["engines"].items():  # the record must describe the files actually there
        path = folder / entry["file"]
        if not path.is_file() or bundle_reader.sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: missing or not the file engines.json describes for {name}")
    path = folder / ENGINES_JSON
    path.write_text(json.dumps(info, indent=2))
    return path


def publish_engines(bundle_dir: str | Path, staged: str | Path, *, overwrite: bool = False) -> Path:
    """Move a staged engine folder (engine files + engines.json) into bundle/engines/<tag> and list it in the
    manifest's `engines` section. The staged folder must sit in bundle/engines/ (a rename, not a copy). On any
    failure the bundle is left as it was: the old folder (if any) is put back and the manifest untouched."""
    root, staged = Path(bundle_dir), Path(staged)
    info = read_engines_json(staged)
    tag = info["tag"]
    if parse_tag(tag) is None:
        raise ValueError(f"{staged / ENGINES_JSON}: tag {tag!r} is not <gpu>-sm<cc>-trt<version>")
    engines_root = root / ENGINES_DIR
    if staged.parent.resolve() != engines_root.resolve():
        raise ValueError(f"{staged}: stage engine folders inside {engines_root} so publishing is one rename")
    target = engines_root / tag
    manifest = bundle_reader.read_manifest(root)
    files = {}
    for path in sorted(p for p in staged.iterdir() if p.is_file()):
        rel = f"{ENGINES_DIR}/{tag}/{path.name}"
        files[rel] = {"sha256": bundle_reader.sha256_file(path), "bytes": path.stat().st_size}
    entry = {"dir": f"{ENGINES_DIR}/{tag}", "tensorrt": info["tensorrt"], "gpu": info["gpu"],
             "precision": info["precision"], "max_batch": info["profile"]["max_batch"],
             "engines": {name: e["file"] for name, e in info["engines"].items()}, "files": files,
             "created": info["created"]}
    _publish_permissions(staged)
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        old = engines_root / f".{tag}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(staged, target)
        try:
            manifest["engines"] = {**(manifest.get("engines") or {}), tag: entry}
            _write_json_atomic(root / bundle_reader.MANIFEST, manifest)
        except BaseException:
            os.replace(target, staged)  # hand the staged folder back to the caller, who removes it
            raise
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# -- helpers -----------------------------------------------------------------------------------------------------

def _check_io_names(name: str, component: dict, io: dict, source: Path) -> None:
    """The engine must expose the ONNX graph's names: the runtime joins graphs by tensor name."""
    for side in ("inputs", "outputs"):
        want = [t["name"] for t in component.get(side, [])]
        got = [t["name"] for t in io[side]]
        if sorted(want) != sorted(got):
            raise EngineBuildError(f"{source}: the {name} engine's {side} are {got}, the manifest says {want}")


def _fp16_copy(onnx_path: Path, work: Path) -> Path:
    """The graph with fp16 weights and arithmetic and float32 IO (for strongly typed builds)."""
    import onnx

    from m3d_edge.export.onnx import save, to_fp16

    half = to_fp16(onnx.load(str(onnx_path)))
    return save(half, work / onnx_path.name)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same folder, fsync, rename over: a reader sees the old or the new file."""
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2))
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes owner-only folders; a bundle is copied and read by a service account (as export.bundle)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@contextmanager
def _build_lock(engines_root: Path) -> Iterator[None]:
    """One engine build per bundle at a time: two would race on the manifest."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, builds must not overlap
        yield
        return
    with open(engines_root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"{engines_root}: another engine build is running on this bundle") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
