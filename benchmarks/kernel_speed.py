"""Time the Triton kernels against the torch op chains they replace, on one NVIDIA GPU.

    python benchmarks/kernel_speed.py [--out docs/] [--runs 50]

(Not `kernels.py`: a script's own folder comes first on sys.path, and transformers imports the PyPI package
`kernels`, which a benchmarks/kernels.py would shadow for every script in this folder.)

For each case: warm-up, then the median of N runs timed with CUDA events; the bytes each kernel must move (model
below); the achieved bandwidth as a share of the device's copy bandwidth, measured here with a large device-to-device
copy (bytes read + bytes written, per second). Each case also checks the kernel against its reference and records
the max abs error. Writes kernels_benchmark.json and kernels_benchmark.md into --out.

Cases (the official sizes):
- spatial_pool: B in 1, 2, 4, 8; C = 768; grid 8 x 16 x 16; k = 2; fp16 and fp32. Replaces rearrange + avg_pool3d +
  rearrange (the official projector). Bytes: read B*2048*C + write B*256*C elements.
- resample: a 512 x 512 x 300 int16 CT (z = 300) -> 32 x 256 x 256 fp16. Replaces cast + clamp + normalize +
  interpolate (and aminmax, and the nonzero-based foreground crop, which syncs with the host). Bytes: the resize
  reads only the input voxels its taps touch (trilinear: at most 2 per output along each axis; area: the whole
  crop) and writes the output; min-max adds one full read of the volume, the foreground box another.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3d_edge.kernels.resample import foreground_box, minmax, resample, resample_reference
from m3d_edge.kernels.spatial_pool import spatial_pool, spatial_pool_reference
from m3d_edge.bench.timing import cuda_time_ms

GRID, C, K = (8, 16, 16), 768, 2
CT_SHAPE, MODEL_SHAPE = (300, 512, 512), (32, 256, 256)
HU_WINDOW = (-1000.0, 1000.0)



def copy_bandwidth_gbs(runs: int) -> float:
    """Device copy bandwidth: a 1 GiB D2D copy moves 2 GiB (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), runs=max(5, runs // 5), warmup=3)
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# spatial_pool
# ---------------------------------------------------------------------------------------------------------------


def official_pool_chain(tokens: torch.Tensor) -> torch.Tensor:
    """The official projector's pooling: rearrange + avg_pool3d + rearrange. [B, 2048, C] -> [B, 256, C]"""
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *GRID)  # b (p1 p2 p3) d -> b d p1 p2 p3 (copies: not a view)
    x = F.avg_pool3d(x, kernel_size=K, stride=K)
    return x.flatten(2).transpose(1, 2)  # b d p1 p2 p3 -> b (p1 p2 p3) d


def bench_pool(runs: int, copy_gbs: float) -> list[dict]:
    rows = []
    for dtype in (torch.float16, torch.float32):
        for b in (1, 2, 4, 8):
            x = torch.randn(b, 1 + GRID[0] * GRID[1] * GRID[2], C, device="cuda").to(dtype)[:, 1:]  # CLS dropped
            out = torch.empty(b, 256, C, device="cuda", dtype=dtype)
            err = (spatial_pool(x, GRID, K) - spatial_pool_reference(x, GRID, K)).abs().max().item()
            kernel_ms = cuda_time_ms(lambda: spatial_pool(x, GRID, K, out=out), runs)
            chain_ms = cuda_time_ms(lambda: official_pool_chain(x), runs)
            nbytes = (x.shape[1] + out.shape[1]) * b * C * x.element_size()
            rows.append(_row(f"spatial_pool B={b} {_name(dtype)}", kernel_ms, chain_ms, nbytes, copy_gbs, err))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------------------------------------------


def torch_chain(volume: torch.Tensor, *, window, crop: bool, mode: str) -> torch.Tensor:
    """What the kernels replace: cast + (aminmax) + clamp + normalize + (nonzero crop) + interpolate + cast."""
    x = volume.float()
    lo, hi = window if window is not None else torch.aminmax(x)
    x = (x.clamp(lo, hi) - lo) / (hi - lo)
    if crop:
        fg = x > 0
        ranges = []
        for axis in range(3):
            hits = fg.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()  # syncs with the host
            ranges.append(slice(int(hits[0]), int(hits[-1]) + 1))
        x = x[tuple(ranges)]
    x = x[None, None]
    if mode == "trilinear":
        x = F.interpolate(x, size=MODEL_SHAPE, mode="trilinear", align_corners=False)
    else:
        x = F.adaptive_avg_pool3d(x, MODEL_SHAPE)
    return x[0, 0].half()


def touched(n_in: int, n_out: int, mode: str) -> int:
    """Input indices along one axis that the resize reads (torch's align_corners=False taps, or area windows)."""
    if mode == "area":
        return n_in
    o = np.arange(n_out)
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = src.astype(np.int64)
    return len(np.union1d(i0, np.minimum(i0 + 1, n_in - 1)))


def bench_resample(runs: int, copy_gbs: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randint(-1024, 2000, CT_SHAPE, dtype=torch.int16, device="cuda", generator=g)
    v[:, :48] = -1024  # an air margin in y, so that the foreground crop is smaller than the volume
    vol_bytes = v.numel() * v.element_size()
    out_bytes = int(np.prod(MODEL_SHAPE)) * 2  # fp16
    out = torch.empty(MODEL_SHAPE, dtype=torch.float16, device="cuda")
    box = foreground_box(v).tolist()
    crop_shape = (box[1] - box[0], box[3] - box[2], box[5] - box[4])
    rows = []
    for label, window, crop, mode in [
        ("HU window, trilinear", HU_WINDOW, False, "trilinear"),
        ("min-max, trilinear", None, False, "trilinear"),
        ("min-max + crop, trilinear (official)", None, True, "trilinear"),
        ("HU window, area", HU_WINDOW, False, "area"),
    ]:
        kw = dict(window=window, crop_foreground=crop, mode=mode)
        ref = resample_reference(v, MODEL_SHAPE, out_dtype=torch.float32, **kw)
        err = (resample(v, MODEL_SHAPE, out_dtype=torch.float32, **kw) - ref).abs().max().item()
        kernel_ms = cuda_time_ms(lambda: resample(v, MODEL_SHAPE, out_dtype=torch.float16, out=out, **kw), runs)
        chain_ms = cuda_time_ms(lambda: torch_chain(v, window=window, crop=crop, mode=mode), runs)
        shape = crop_shape if crop else CT_SHAPE
        read = np.prod([touched(n, o, mode) for n, o in zip(shape, MODEL_SHAPE)]) * v.element_size()
        nbytes = int(read) + out_bytes + vol_bytes * ((window is None) + crop)
        rows.append(_row(f"resample {label}", kernel_ms, chain_ms, nbytes, copy_gbs, err))
    # The reductions alone.
    rows.append(_row("minmax", cuda_time_ms(lambda: minmax(v), runs), cuda_time_ms(lambda: torch.aminmax(v), runs),
                     vol_bytes, copy_gbs, 0.0))
    return rows


def _row(name: str, kernel_ms: float, chain_ms: float, nbytes: int, copy_gbs: float, err: float) -> dict:
    gbs = nbytes / (kernel_ms * 1e-3) / 1e9
    return {"case": name, "kernel_ms": kernel_ms, "torch_ms": chain_ms, "speedup": chain_ms / kernel_ms,
            "bytes": nbytes, "kernel_gbs": gbs, "pct_of_copy": 100 * gbs / copy_gbs, "max_abs_err": err}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_benchmark.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        f"# Kernel benchmark: {meta['gpu']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; median of {meta['runs']} runs; "
        f"device copy bandwidth {meta['copy_gbs']:.0f} GB/s (1 GiB D2D copy, read + write).",
        "",
        "| case | kernel ms | torch ms | speedup | MB moved | GB/s | % of copy | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel_ms']:.4f} | {r['torch_ms']:.4f} | {r['speedup']:.2f}x | "
                     f"{r['bytes'] / 1e6:.1f} | {r['kernel_gbs']:.0f} | {r['pct_of_copy']:.0f}% | "
                     f"{r['max_abs_err']:.2g} |")
    (out_dir / "kernels_benchmark.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="results folder (default: docs/)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per case (median reported)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs an NVIDIA GPU with CUDA; torch.cuda.is_available() is False here. "
              "Run it on a GPU machine (benchmarks/gpu_check.sh OUTDIR does it with the tests).", file=sys.stderr)
        return 2
    import triton

    copy_gbs = copy_bandwidth_gbs(args.runs)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "runs": args.runs,
            "copy_gbs": copy_gbs}
    print(f"{meta['gpu']}: copy bandwidth {copy_gbs:.0f} GB/s")
    rows = bench_pool(args.runs, copy_gbs) + bench_resample(args.runs, copy_gbs)
    for r in rows:
        print(f"{r['case']:<45} kernel {r['kernel_ms']:8.4f} ms  torch {r['torch_ms']:8.4f} ms  "
              f"{r['speedup']:5.2f}x  {r['kernel_gbs']:6.0f} GB/s ({r['pct_of_copy']:3.0f}% of copy)  "
              f"err {r['max_abs_err']:.2g}")
    write(args.out, meta, rows)
    print(f"wrote {args.out / 'kernels_benchmark.json'} and {args.out / 'kernels_benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
