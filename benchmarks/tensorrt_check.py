"""TensorRT engines against ONNX Runtime and torch, on one NVIDIA GPU: accuracy and latency.

    python benchmarks/tensorrt_check.py --out OUTDIR [--bundle DIR] [--work DIR] [--runs 20] [--budget-s 220]

1. Bundle: DIR if given, else WORK/phantom-small-bundle (reused when it is there and verifies, else built from
   `preset:phantom-small`, llm fp32: the decoder is not measured here). WORK defaults to a folder in the system
   temp dir, not OUTDIR: the bundle is ~0.6 GB and OUTDIR is for results that travel.
2. Engines: the bundle's folder for this GPU if it verifies (runtime.trt.choose_engines), else build_engines
   (fp16, batch 1..8, opt 1) into the bundle.
3. Accuracy: each engine against ONNX Runtime CPU fp32 on the same random input (images uniform in [0, 1], other
   inputs standard normal), batch 1 and 8: relative error max|a - b| / max|b| per output. ORT CUDA and torch eager
   fp32 are compared to the same reference (ORT CUDA may use TF32; eager shows the bundle matches its model).
4. Latency: median of --runs calls after warm-up, CUDA events, for vision and seg_decoder (and seg_encoder and
   seg_detail when the bundle has them) at batch 1 and 8: TensorRT; ORT CUDA with IO binding on torch buffers
   (no host copies); torch eager fp32 and fp16 autocast. ORT runs are synchronous (ORT syncs its stream at the
   end of Run), so the events around them measure the whole call.

Writes OUTDIR/tensorrt_check.json (rewritten after every step, so a run stopped by a timeout keeps what it
measured) and OUTDIR/tensorrt_check.md. Exit status: 0 when every engine is within --tolerance (default 1e-2) of
ORT CPU, 1 when one is not or a step failed, 2 without a CUDA GPU or TensorRT.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from m3d_edge.bench.timing import cuda_time_ms

BATCHES = (1, 8)
TIMED = ("vision", "seg_encoder", "seg_detail", "seg_decoder")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))



class Report:
    """The results so far, written to disk after every step."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.data = out, {"meta": meta, "steps": [], "accuracy": [], "latency": [], "errors": []}

    def step(self, name: str, seconds: float, **extra: Any) -> None:
        self.data["steps"].append({"step": name, "seconds": round(seconds, 2), **extra})
        print(f"[tensorrt_check] {name}: {seconds:.1f} s {extra or ''}", flush=True)
        self.save()

    def error(self, where: str, exc: BaseException) -> None:
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()})
        print(f"[tensorrt_check] {where} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        (self.out / "tensorrt_check.json").write_text(json.dumps(self.data, indent=2))


def gpu_or_exit() -> str:
    from m3d_edge.runtime.trt import TensorRTUnavailable, gpu_tag

    try:
        return gpu_tag()
    except TensorRTUnavailable as e:
        print(f"tensorrt_check: {e}", file=sys.stderr)
        sys.exit(2)


def get_bundle(args, report: Report) -> Path:
    from m3d_edge.runtime import bundle as bundle_reader

    if args.bundle:
        bundle_reader.load(args.bundle, verify=True)
        return Path(args.bundle)
    path = args.work / "phantom-small-bundle"
    if path.exists():
        try:
            bundle_reader.load(path, verify=True)
            report.step("bundle (reused)", 0.0, path=str(path))
            return path
        except bundle_reader.BundleError as e:
            raise SystemExit(f"{path} exists but does not verify ({e}); remove it or pass --bundle")
    from m3d_edge.export import bundle as bundle_export

    t0 = time.perf_counter()
    bundle_export.build("preset:phantom-small", path, llm="fp32", progress=True)
    report.step("bundle (built from preset:phantom-small)", time.perf_counter() - t0, path=str(path))
    return path


def get_engines(bundle: Path, args, report: Report) -> Path:
    from m3d_edge.export.tensorrt import build_engines
    from m3d_edge.runtime.trt import choose_engines

    choice = choose_engines(bundle)
    if choice.folder is not None:
        report.step("engines (reused)", 0.0, folder=str(choice.folder))
        return choice.folder
    print(f"[tensorrt_check] {choice.reason}; building", flush=True)
    t0 = time.perf_counter()
    folder = build_engines(bundle, fp16=True, max_batch=max(BATCHES), workspace_gb=args.workspace_gb,
                           optimization_level=args.opt_level, overwrite=True)
    report.step("engines (built)", time.perf_counter() - t0, folder=str(folder),
                build_seconds={k: v["build_seconds"] for k, v in
                               json.loads((folder / "engines.json").read_text())["engines"].items()})
    return folder


def eager_graphs(manifest: dict) -> dict[str, Any]:
    """The torch modules behind the bundle's graphs, when its source can be rebuilt (a preset or a checkpoint)."""
    import torch

    from m3d_edge.config import preset
    from m3d_edge.export import onnx as onnx_export
    from m3d_edge.model import checkpoint

    source = manifest.get("provenance", {}).get("source", {})
    if source.get("kind") == "preset":
        torch.manual_seed(source.get("seed", 0))  # as export.bundle builds a preset
        model = checkpoint.build(preset(source["name"]))
    elif source.get("kind") == "checkpoint" and Path(source.get("path", "")).is_dir():
        model = checkpoint.load(source["path"])
    else:
        return {}
    model = model.eval()
    return {spec.name: spec.module.eval().cuda() for spec in onnx_export.graph_specs(model)}


def make_inputs(session, batch: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = (batch, *inp.shape[1:])
        make = torch.rand if inp.name == "images" else torch.randn
        feeds[inp.name] = make(shape, generator=g, device="cuda", dtype=torch.float32)
    return feeds


def ort_cuda_runner(session, feeds: dict[str, Any], outputs: dict[str, Any]) -> Callable[[], None]:
    """Run an ORT CUDA session on torch buffers through IO binding: no host copies in the timed call."""
    import torch

    binding = session.io_binding()
    device = torch.cuda.current_device()
    for name, t in feeds.items():
        binding.bind_input(name, "cuda", device, np.float32, tuple(t.shape), t.data_ptr())
    for name, t in outputs.items():
        binding.bind_output(name, "cuda", device, np.float32, tuple(t.shape), t.data_ptr())
    return lambda: session.run_with_iobinding(binding)


def measure(bundle: Path, folder: Path, args, report: Report, deadline: float) -> None:
    import onnxruntime as ort
    import torch

    from m3d_edge.runtime import bundle as bundle_reader
    from m3d_edge.runtime.engines import create_session
    from m3d_edge.runtime.trt import load_engines

    b = bundle_reader.load(bundle, verify=False)
    engines = load_engines(folder)
    have_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    t0 = time.perf_counter()
    try:
        eager = eager_graphs(dict(b.manifest))
    except Exception as e:  # a missing tokenizer or LLM file must not cost the TensorRT numbers
        report.error("torch eager model", e)
        eager = {}
    report.step("sessions and eager model", time.perf_counter() - t0, ort_cuda=have_cuda_ep,
                eager=sorted(eager))
    for name, engine in engines.items():
        cpu = create_session(b.path(name), device="cpu")
        gpu = create_session(b.path(name), device="cuda") if have_cuda_ep else None
        module = eager.get(name)
        for batch in BATCHES:
            if time.perf_counter() > deadline:
                report.step(f"{name} batch {batch}: skipped, time budget spent", 0.0)
                continue
            t0 = time.perf_counter()
            feeds = make_inputs(cpu, batch, seed=batch)
            torch.cuda.synchronize()
            host = {k: v.cpu().numpy() for k, v in feeds.items()}
            out_names = [o.name for o in cpu.get_outputs()]
            ref = dict(zip(out_names, cpu.run(None, host)))
            got = engine(**feeds)
            torch.cuda.synchronize()
            row: dict[str, Any] = {"graph": name, "batch": batch,
                                   "trt_vs_ort_cpu": {k: rel_err(v.cpu().numpy(), ref[k]) for k, v in got.items()}}
            if gpu is not None:
                row["ort_cuda_vs_ort_cpu"] = {k: rel_err(v, ref[k]) for k, v in
                                              zip(out_names, gpu.run(None, host))}
            if module is not None:
                with torch.no_grad():
                    res = module(*[feeds[i.name] for i in cpu.get_inputs()])
                res = res if isinstance(res, tuple) else (res,)
                row["eager_fp32_vs_ort_cpu"] = {k: rel_err(v.cpu().numpy(), ref[k]) for k, v in zip(out_names, res)}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            report.data["accuracy"].append(row)
            report.save()
            print(f"[tensorrt_check] accuracy {name} b{batch}: {row['trt_vs_ort_cpu']}", flush=True)

            if name not in TIMED or time.perf_counter() > deadline:
                continue
            lat: dict[str, Any] = {"graph": name, "batch": batch, "runs": args.runs}
            lat["tensorrt_ms"] = cuda_time_ms(lambda: engine(**feeds), args.runs)
            if gpu is not None:
                outs = {k: torch.empty_like(v) for k, v in got.items()}
                lat["ort_cuda_ms"] = cuda_time_ms(ort_cuda_runner(gpu, feeds, outs), args.runs)
            if module is not None:
                args_in = [feeds[i.name] for i in cpu.get_inputs()]
                with torch.no_grad():
                    lat["eager_fp32_ms"] = cuda_time_ms(lambda: module(*args_in), args.runs)
                    with torch.autocast("cuda", dtype=torch.float16):
                        lat["eager_fp16_autocast_ms"] = cuda_time_ms(lambda: module(*args_in), args.runs)
            report.data["latency"].append(lat)
            report.save()
            print(f"[tensorrt_check] latency {name} b{batch}: {lat}", flush=True)


def markdown(data: dict[str, Any], tolerance: float) -> str:
    meta = data["meta"]
    lines = ["# TensorRT check", "",
             f"GPU {meta.get('gpu')} (tag `{meta.get('tag')}`), TensorRT {meta.get('tensorrt')}, torch "
             f"{meta.get('torch')} (CUDA {meta.get('cuda')}), onnxruntime {meta.get('onnxruntime')}; bundle "
             f"`{meta.get('bundle')}`; engines fp16, profile batch 1..8 (opt 1).", "",
             f"## Accuracy: relative error max|a - b| / max|b| against ONNX Runtime CPU fp32 (tolerance {tolerance:g})",
             "", "| graph | batch | output | TensorRT fp16 | ORT CUDA | torch eager fp32 |", "|---|---|---|---|---|---|"]
    for row in data["accuracy"]:
        for out, err in row["trt_vs_ort_cpu"].items():
            cuda = row.get("ort_cuda_vs_ort_cpu", {}).get(out)
            eager = row.get("eager_fp32_vs_ort_cpu", {}).get(out)
            lines.append(f"| {row['graph']} | {row['batch']} | {out} | {err:.2e} | "
                         f"{'-' if cuda is None else f'{cuda:.2e}'} | {'-' if eager is None else f'{eager:.2e}'} |")
    lines += ["", "## Latency: median ms (CUDA events, after warm-up)", "",
              "| graph | batch | TensorRT fp16 | ORT CUDA fp32 | torch eager fp32 | torch eager fp16 autocast | "
              "ORT CUDA / TensorRT |", "|---|---|---|---|---|---|---|"]

    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    for lat in data["latency"]:
        trt, ortc = lat["tensorrt_ms"], lat.get("ort_cuda_ms")
        lines.append(f"| {lat['graph']} | {lat['batch']} | {ms(trt)} | {ms(ortc)} | {ms(lat.get('eager_fp32_ms'))} | "
                     f"{ms(lat.get('eager_fp16_autocast_ms'))} | {'-' if ortc is None else f'{ortc / trt:.2f}x'} |")
    lines += ["", "## Steps", ""] + [f"- {s['step']}: {s['seconds']} s" for s in data["steps"]]
    if data["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['where']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tensorrt_check.{json,md}")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3d-edge-tensorrt-check",
                        help="where the phantom-small bundle is built and kept for the next run")
    parser.add_argument("--bundle", type=Path, help="an existing bundle (engines are added to it)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--opt-level", type=int, default=None, help="TensorRT builder optimization level (0..5)")
    parser.add_argument("--workspace-gb", type=float, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-2, help="largest relative error accepted")
    parser.add_argument("--budget-s", type=float, default=220, help="skip measurements started after this")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.budget_s
    tag = gpu_or_exit()  # exit 2 before anything is written

    import onnxruntime as ort
    import tensorrt as trt
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    meta = {"tag": tag, "gpu": torch.cuda.get_device_name(), "tensorrt": trt.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": platform.python_version(), "runs": args.runs, "opt_level": args.opt_level,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = Report(args.out, meta)
    failed = False
    try:
        bundle = get_bundle(args, report)
        meta["bundle"] = str(bundle)
        folder = get_engines(bundle, args, report)
        meta["engines"] = str(folder)
        measure(bundle, folder, args, report, deadline)
    except Exception as e:
        report.error("check", e)
        failed = True
    worst = max((err for row in report.data["accuracy"] for err in row["trt_vs_ort_cpu"].values()), default=None)
    meta["worst_trt_rel_err"] = worst
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    report.save()
    (args.out / "tensorrt_check.md").write_text(markdown(report.data, args.tolerance))
    print(f"[tensorrt_check] wrote {args.out / 'tensorrt_check.json'} and tensorrt_check.md "
          f"({meta['total_seconds']} s; worst TensorRT relative error {worst})", flush=True)
    if worst is None or worst > args.tolerance:
        print(f"[tensorrt_check] FAIL: worst relative error {worst} (tolerance {args.tolerance})", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
