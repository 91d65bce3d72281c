"""Triton kernels against their torch references (m3d_edge.kernels).

Without CUDA the kernels run in Triton's CPU interpreter. `@triton.jit` reads TRITON_INTERPRET when the kernel module
(m3d_edge.kernels.triton_ops) is imported, which the dispatch functions do lazily on their first Triton call, so
setting the variable here, at collection time, is early enough even if other test modules imported torch or
m3d_edge.kernels before. Shapes are small: the interpreter runs each program in Python (a few ms per program).
With CUDA the same tests run the compiled kernels; the `requires_cuda` tests add the official sizes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# The interpreter only works if triton is imported after the variable is set (its own helpers, such as tl.zeros,
# are decorated at import). If another module imported triton first, the Triton tests skip rather than fail.
_INTERPRETER_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the GPU compile check below
    os.environ["TRITON_INTERPRET"] = "1"

from m3d_edge.kernels.resample import (  # noqa: E402
    foreground_box,
    foreground_box_reference,
    minmax,
    minmax_reference,
    resample,
    resample_reference,
)
from m3d_edge.kernels.spatial_pool import spatial_pool, spatial_pool_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if importlib.util.find_spec("triton") is None:
    _NO_TRITON = "triton is not installed"
elif DEVICE == "cpu" and _INTERPRETER_TOO_LATE:
    _NO_TRITON = "triton was imported before TRITON_INTERPRET=1 was set; run this file alone"
else:
    _NO_TRITON = None
needs_triton = pytest.mark.skipif(_NO_TRITON is not None, reason=str(_NO_TRITON))
requires_cuda = pytest.mark.requires_cuda
skip_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_within_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Low-precision outputs: at most one unit in the last place of the reference value apart.

    One ulp, not zero: the kernel and the reference round slightly different fp32 sums, and Triton's CPU interpreter
    truncates fp32 -> bf16 where the GPU (and torch) round to nearest even.
    """
    eps = torch.finfo(out.dtype).eps
    bound = eps * ref.float().abs() + torch.finfo(out.dtype).tiny
    excess = ((out.float() - ref.float()).abs() - bound).max().item()
    assert excess <= 0, f"{out.dtype}: max error {max_err(out, ref):.3g} exceeds one ulp by {excess:.3g}"


def tokens_for(b: int, grid: tuple[int, int, int], c: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid[0] * grid[1] * grid[2], c, generator=g).to(dtype).to(DEVICE)


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """int16 HU-like volume: air background, a body of soft tissue, some bone."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-1024, 1500, shape, generator=g, dtype=torch.int16)
    return v.to(DEVICE)


def blob_volume(shape: tuple[int, int, int], box: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Zeros with random positive values inside the half-open box (z0, z1, y0, y1, x0, x1)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(shape)
    z0, z1, y0, y1, x0, x1 = box
    v[z0:z1, y0:y1, x0:x1] = torch.rand(z1 - z0, y1 - y0, x1 - x0, generator=g) + 0.1
    return v.to(DEVICE)


# ---------------------------------------------------------------------------------------------------------------
# spatial_pool
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "grid, k, c", [((2, 6, 10), 2, 24), ((4, 4, 8), 4, 40), ((4, 8, 4), 2, 130), ((3, 3, 6), 3, 8)]
)
def test_pool_fp32_matches_reference(grid, k, c):
    x = tokens_for(2, grid, c)
    out = spatial_pool(x, grid, k, backend="triton")
    ref = spatial_pool_reference(x, grid, k)
    assert out.shape == ref.shape == (2, (grid[0] // k) * (grid[1] // k) * (grid[2] // k), c)
    assert max_err(out, ref) <= 1e-5, f"max abs error {max_err(out, ref):.3g}"


@needs_triton
def test_pool_random_grids():
    g = torch.Generator().manual_seed(3)
    for k in (2, 2, 4):
        grid = tuple(k * int(n) for n in torch.randint(1, 4 if k == 2 else 2, (3,), generator=g))
        b = int(torch.randint(1, 4, (1,), generator=g))
        c = int(torch.randint(1, 70, (1,), generator=g))
        x = tokens_for(b, grid, c, seed=k)
        err = max_err(spatial_pool(x, grid, k, backend="triton"), spatial_pool_reference(x, grid, k))
        assert err <= 1e-5, f"grid {grid}, k={k}, B={b}, C={c}: max abs error {err:.3g}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_low_precision_within_rounding(dtype):
    x = tokens_for(2, (2, 6, 10), 40, dtype)
    out = spatial_pool(x, (2, 6, 10), 2, backend="triton")
    assert out.dtype == dtype
    assert_within_rounding(out, spatial_pool_reference(x, (2, 6, 10), 2))


@needs_triton
def test_pool_reads_strided_views_in_place():
    grid, k, c = (2, 6, 10), 2, 24
    with_cls = tokens_for(2, (1, 1, 1 + 120), c).reshape(2, 121, c)  # [B, 1 + D*H*W, C]
    views = {
        "cls dropped": with_cls[:, 1:],
        "every other channel": tokens_for(2, grid, 2 * c)[..., ::2],
        "channel-major storage": tokens_for(1, (1, 1, c), 2 * 120).reshape(c, 120, 2).permute(2, 1, 0),
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        err = max_err(spatial_pool(x, grid, k, backend="triton"), spatial_pool_reference(x, grid, k))
        assert err <= 1e-5, f"{name}: max abs error {err:.3g}"


@needs_triton
def test_pool_overwrites_poisoned_out_and_nothing_else():
    grid, k, c = (2, 6, 10), 2, 24
    x = tokens_for(2, grid, c)
    buf = torch.full((2, 15, 2 * c), float("nan"), device=DEVICE)
    out = buf[..., :c]  # a strided slice: the kernel must write exactly this half
    result = spatial_pool(x, grid, k, out=out, backend="triton")
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "some outputs were not written"
    assert buf[..., c:].isnan().all(), "the kernel wrote outside `out`"
    assert max_err(out, spatial_pool_reference(x, grid, k)) <= 1e-5


def test_pool_auto_on_cpu_uses_reference_with_autograd():
    x = torch.randn(1, 2 * 4 * 4, 8, requires_grad=True)
    out = spatial_pool(x, (2, 4, 4), 2)
    out.sum().backward()
    # Each input token contributes 1/8 to exactly one output token.
    assert torch.allclose(x.grad, torch.full_like(x, 1 / 8))


@needs_triton
def test_pool_triton_refuses_autograd():
    x = tokens_for(1, (2, 4, 4), 8).requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        spatial_pool(x, (2, 4, 4), 2, backend="triton")


@pytest.mark.parametrize(
    "tokens, grid, k, exc, message",
    [
        (torch.zeros(32, 8), (2, 4, 4), 2, ValueError, "rank 3"),
        (torch.zeros(1, 32, 8), (2, 4, 2), 2, ValueError, "do not form the grid"),
        (torch.zeros(1, 2 * 6 * 10, 8), (2, 6, 10), 4, ValueError, "not divisible by the pooling size 4"),
        (torch.zeros(1, 32, 8, dtype=torch.float64), (2, 4, 4), 2, TypeError, "float32, float16 or bfloat16"),
        (torch.zeros(1, 32, 8, dtype=torch.int32), (2, 4, 4), 2, TypeError, "tokens.float()"),
        (torch.zeros(1, 32, 8), (2, 4, 4), 0, ValueError, "pooling size k"),
    ],
)
def test_pool_errors_name_the_fix(tokens, grid, k, exc, message):
    for backend in ("torch", "triton"):
        with pytest.raises(exc, match=message):
            spatial_pool(tokens, grid, k, backend=backend)


def test_pool_rejects_bad_backend_and_out():
    x = torch.zeros(1, 32, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        spatial_pool(x, (2, 4, 4), 2, backend="cuda")
    with pytest.raises(ValueError, match=r"out must have shape \(1, 4, 8\)"):
        spatial_pool(x, (2, 4, 4), 2, out=torch.empty(1, 4, 9), backend="torch")
    with pytest.raises(TypeError, match="allocate it alike"):
        spatial_pool(x, (2, 4, 4), 2, out=torch.empty(1, 4, 8, dtype=torch.float16), backend="torch")


@needs_triton
def test_triton_path_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"move it with \.cuda\(\)"):
        spatial_pool(torch.zeros(1, 32, 8), (2, 4, 4), 2, backend="triton")
    with pytest.raises(ValueError, match=r"move it with \.cuda\(\)"):
        resample(torch.zeros(4, 4, 4), (2, 2, 2), backend="triton")


@requires_cuda
@skip_no_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k", [(1, 2), (8, 2), (2, 4)])
def test_pool_cuda_official_sizes(dtype, b, k):
    x = torch.randn(b, 1 + 2048, 768, device="cuda").to(dtype)[:, 1:]  # CLS dropped, as in the model
    out = spatial_pool(x, (8, 16, 16), k)  # backend="auto" takes the kernel on CUDA
    ref = spatial_pool_reference(x, (8, 16, 16), k)
    if dtype == torch.float32:
        assert max_err(out, ref) <= 1e-5, f"max abs error {max_err(out, ref):.3g}"
    else:
        assert_within_rounding(out, ref)


@requires_cuda
@skip_no_cuda
def test_dispatch_on_cuda_falls_back_under_tracing_and_without_triton(monkeypatch):
    from m3d_edge.kernels import spatial_pool as sp

    x = torch.randn(1, 2 * 4 * 4, 8, device="cuda")
    traced = torch.jit.trace(lambda t: spatial_pool(t, (2, 4, 4), 2), (x,))
    assert "aten::mean" in str(traced.graph), "a tracer must record the torch reference, not the Triton call"
    monkeypatch.setattr(sp, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match="falls back to the torch reference"):
        out = spatial_pool(x, (2, 4, 4), 2)
    assert max_err(out, spatial_pool_reference(x, (2, 4, 4), 2)) == 0


# ---------------------------------------------------------------------------------------------------------------
# minmax, foreground_box
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
def test_minmax_matches_reference_exactly():
    cases = {
        "int16 odd": ct_volume((7, 13, 11)),
        "float32": torch.randn(5, 9, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE),
        "uint8": torch.randint(3, 250, (3, 5, 7), dtype=torch.uint8).to(DEVICE),
        "float16 transposed view": torch.randn(6, 7, 5).half().to(DEVICE).permute(2, 0, 1),
    }
    for name, v in cases.items():
        got, ref = minmax(v, backend="triton"), minmax_reference(v)
        assert got.dtype == torch.float32 and got.shape == (2,)
        assert torch.equal(got, ref), f"{name}: {got.tolist()} != {ref.tolist()}"


@needs_triton
def test_foreground_box_matches_reference():
    box = (2, 5, 3, 12, 1, 4)
    v = blob_volume((7, 13, 11), box)
    got = foreground_box(v, backend="triton")  # min-max window: foreground = voxels above the minimum
    assert got.tolist() == list(box) == foreground_box_reference(v).tolist()
    # An HU window and a threshold: foreground = normalize(v) > 0.5, i.e. v > 0 on the window (-1000, 1000).
    ct = ct_volume((6, 9, 10), seed=3)
    ref = foreground_box_reference(ct, (-1000.0, 1000.0), threshold=0.5)
    assert foreground_box(ct, (-1000.0, 1000.0), threshold=0.5, backend="triton").tolist() == ref.tolist()
    # A transposed view is read through its strides.
    vt = blob_volume((11, 7, 13), (0, 4, 2, 5, 3, 12)).permute(1, 2, 0)
    assert foreground_box(vt, backend="triton").tolist() == foreground_box_reference(vt).tolist() == [2, 5, 3, 12, 0, 4]


@needs_triton
def test_foreground_box_empty_is_whole_volume():
    flat = torch.full((3, 4, 5), 7.0, device=DEVICE)  # constant: nothing above the minimum
    assert foreground_box(flat, backend="triton").tolist() == [0, 3, 0, 4, 0, 5]
    assert foreground_box_reference(flat).tolist() == [0, 3, 0, 4, 0, 5]


# ---------------------------------------------------------------------------------------------------------------
# resample
# ---------------------------------------------------------------------------------------------------------------


RESAMPLE_CASES = {
    "int16 down, odd sizes": (ct_volume((7, 13, 11)), (4, 6, 5), {}),
    "int16 up, odd sizes": (ct_volume((5, 9, 6), seed=1), (8, 12, 10), {}),
    "HU window": (ct_volume((7, 13, 11), seed=2), (3, 5, 7), {"window": (-200.0, 300.0)}),
    "float32, foreground crop": (blob_volume((9, 13, 11), (2, 7, 3, 12, 1, 8)), (4, 6, 5), {"crop_foreground": True}),
    "explicit box": (ct_volume((7, 13, 11), seed=4), (3, 4, 5), {"box": (1, 6, 2, 11, 3, 10)}),
    "transposed view": (ct_volume((11, 7, 9), seed=5).permute(1, 0, 2), (4, 5, 6), {}),
}


@needs_triton
@pytest.mark.parametrize("mode", ["trilinear", "area"])
@pytest.mark.parametrize("case", list(RESAMPLE_CASES))
def test_resample_fp32_matches_reference(case, mode):
    v, shape, kw = RESAMPLE_CASES[case]
    out = resample(v, shape, mode=mode, backend="triton", **kw)
    ref = resample_reference(v, shape, mode=mode, **kw)
    assert out.shape == shape and out.dtype == torch.float32
    assert max_err(out, ref) <= 1e-4, f"{case}, {mode}: max abs error {max_err(out, ref):.3g}"


@needs_triton
def test_resample_random_sizes_and_input_dtypes():
    g = torch.Generator().manual_seed(7)
    dtypes = [torch.int16, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.int32]
    for i, dtype in enumerate(dtypes):
        in_shape = tuple(int(n) for n in torch.randint(2, 14, (3,), generator=g))
        out_shape = tuple(int(n) for n in torch.randint(1, 9, (3,), generator=g))
        v = (torch.rand(in_shape, generator=g) * 200 - 50).to(dtype).to(DEVICE)
        mode = ("trilinear", "area")[i % 2]
        kw = {"crop_foreground": True} if i % 3 == 0 else {}
        err = max_err(resample(v, out_shape, mode=mode, backend="triton", **kw),
                      resample_reference(v, out_shape, mode=mode, **kw))
        assert err <= 1e-4, f"{dtype} {in_shape} -> {out_shape} {mode} {kw}: max abs error {err:.3g}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resample_low_precision_out_within_rounding(dtype):
    v = ct_volume((7, 13, 11))
    out = resample(v, (4, 6, 5), out_dtype=dtype, backend="triton")
    assert out.dtype == dtype
    assert_within_rounding(out, resample_reference(v, (4, 6, 5), out_dtype=dtype))


def test_resample_area_is_box_filter_when_sizes_divide():
    v = ct_volume((8, 12, 10))
    x = ((v.float() - v.min()) / (v.max() - v.min()))[None, None]
    ref = resample_reference(v, (4, 6, 5), mode="area")
    assert max_err(ref, F.avg_pool3d(x, 2)[0, 0]) <= 1e-6
    assert max_err(ref, F.interpolate(x, size=(4, 6, 5), mode="area")[0, 0]) <= 1e-6


def test_resample_reference_is_the_official_chain():
    """min-max -> crop voxels > 0 (margin 0) -> trilinear resize (align_corners=False), spec §7.2."""
    v = blob_volume((9, 13, 11), (2, 7, 3, 12, 1, 8)) - 0.5  # background -0.5, foreground above
    x = (v - v.min()) / (v.max() - v.min())
    nz = (x > 0).nonzero()
    lo, hi = nz.min(0).values, nz.max(0).values + 1
    crop = x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    official = F.interpolate(crop[None, None], size=(4, 6, 5), mode="trilinear", align_corners=False)[0, 0]
    ref = resample_reference(v, (4, 6, 5), crop_foreground=True)
    assert max_err(ref, official) <= 1e-6


@needs_triton
@pytest.mark.parametrize("mode", ["trilinear", "area"])
def test_resample_overwrites_poisoned_out_and_nothing_else(mode):
    v = ct_volume((7, 13, 11))
    buf = torch.full((2, 1, 4, 6, 5), float("nan"), dtype=torch.float16, device=DEVICE)
    out = buf[1, 0]  # writing one item of a batch buffer in place
    result = resample(v, (4, 6, 5), mode=mode, out_dtype=torch.float16, out=out, backend="triton")
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "some outputs were not written"
    assert buf[0].isnan().all(), "the kernel wrote outside `out`"
    assert_within_rounding(out, resample_reference(v, (4, 6, 5), mode=mode, out_dtype=torch.float16))


def test_resample_auto_on_cpu_is_reference():
    v = ct_volume((5, 6, 7)).cpu()
    assert torch.equal(resample(v, (3, 4, 5)), resample_reference(v, (3, 4, 5)))


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"volume": torch.zeros(1, 4, 4, 4)}, ValueError, r"rank 3.*volume\[0, 0\]"),
        ({"volume": torch.zeros(4, 4, 4, dtype=torch.float64)}, TypeError, "is not supported"),
        ({"volume": torch.zeros(0, 4, 4)}, ValueError, "empty"),
        ({"out_shape": (2, 2)}, ValueError, "three positive ints"),
        ({"mode": "bicubic"}, ValueError, "mode must be one of"),
        ({"out_dtype": torch.int16}, TypeError, "out_dtype"),
        ({"crop_foreground": True, "box": (0, 2, 0, 2, 0, 2)}, ValueError, "not both"),
        ({"box": (0, 5, 0, 2, 0, 2)}, ValueError, "outside the volume"),
        ({"window": (1.0, 2.0, 3.0)}, ValueError, r"window must be \(lo, hi\)"),
        ({"out": torch.empty(2, 2, 3)}, ValueError, "out must have shape"),
        ({"out": torch.empty(2, 2, 2, dtype=torch.float16)}, TypeError, "out_dtype=out.dtype"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_resample_errors_name_the_fix(kwargs, exc, message):
    args = {"volume": torch.zeros(4, 4, 4), "out_shape": (2, 2, 2), **kwargs}
    with pytest.raises(exc, match=message):
        resample(args.pop("volume"), args.pop("out_shape"), backend=args.pop("backend", "torch"), **args)


@requires_cuda
@skip_no_cuda
@pytest.mark.parametrize("mode", ["trilinear", "area"])
@pytest.mark.parametrize("kw", [{}, {"crop_foreground": True}, {"window": (-1000.0, 1000.0)}])
def test_resample_cuda_official_size(mode, kw):
    v = torch.randint(-1024, 2000, (300, 512, 512), dtype=torch.int16, device="cuda")
    v[:20] = -1024
    v[:, :40] = -1024  # an air margin, so that the foreground crop is not the whole volume
    out = resample(v, (32, 256, 256), mode=mode, **kw)  # backend="auto" takes the kernels on CUDA
    ref = resample_reference(v, (32, 256, 256), mode=mode, **kw)
    assert max_err(out, ref) <= 1e-4, f"max abs error {max_err(out, ref):.3g}"
    half = resample(v, (32, 256, 256), mode=mode, out_dtype=torch.float16, **kw)
    assert_within_rounding(half, ref.half())


# ---------------------------------------------------------------------------------------------------------------
# Compilation for real GPUs, without one
# ---------------------------------------------------------------------------------------------------------------
# The interpreter is lenient (it runs Python on numpy), so a kernel that passes above can still fail to compile.
# Triton compiles down to a cubin without a GPU when given a target; this runs in a subprocess because this process
# has the kernels built for the interpreter. Integer arguments equal to 1 are compile-time constants in real
# launches (unit strides, single-slice sizes), so those variants are compiled too.


@needs_triton
def test_kernels_compile_for_gpu_targets():
    ptxas = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends", "nvidia", "bin")
    if not os.path.isdir(ptxas):
        pytest.skip("this triton has no bundled NVIDIA toolchain (ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, "--compile-check"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"compilation failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert "compiled" in run.stdout


def _compile_check() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from m3d_edge.kernels import triton_ops as t

    def compile_for(target, fn, types: dict, consts: dict) -> None:
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert "cubin" in kernel.asm, fn

    red = {"BLOCK_Y": 4, "BLOCK_X": 256}
    for arch in (80, 90):  # A100 / L40-class and H100 / H200
        target = GPUTarget("cuda", arch, 32)
        for dtype, k, consts in [("fp16", 2, {"sxc": 1, "syc": 1}), ("bf16", 4, {"sxc": 1, "syc": 1}),
                                 ("fp32", 2, {"H": 1, "W": 1, "Ho": 1, "Wo": 1, "C": 1})]:
            compile_for(target, t.spatial_pool_kernel, {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "sxb": "i64"},
                        {"K": k, "BLOCK_T": 16, "BLOCK_C": 128, **consts})
        for dtype in ("i16", "fp32"):
            compile_for(target, t.minmax_partial_kernel, {"x_ptr": f"*{dtype}", "part_ptr": "*fp32", "sz": "i64"},
                        {**red, "sx": 1})
            compile_for(target, t.box_partial_kernel, {"x_ptr": f"*{dtype}", "win_ptr": "*fp32",
                                                        "part_ptr": "*i32", "threshold": "fp32"}, {**red, "sx": 1})
        compile_for(target, t.minmax_final_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 1024})
        compile_for(target, t.box_final_kernel, {"part_ptr": "*i32", "box_ptr": "*i32"}, {"BLOCK": 1024, "P": 1})
        for has_box in (False, True):
            for area in (False, True):
                compile_for(target, t.resample_kernel,
                            {"x_ptr": "*i16", "win_ptr": "*fp32", "box_ptr": "*i32", "out_ptr": "*fp16"},
                            {"HAS_BOX": has_box, "AREA": area, "BLOCK_W": 256, "sx": 1, "so_w": 1})
        compile_for(target, t.resample_kernel,
                    {"x_ptr": "*fp32", "win_ptr": "*fp32", "box_ptr": "*i32", "out_ptr": "*fp32"},
                    {"HAS_BOX": False, "AREA": False, "BLOCK_W": 256, "Z": 1, "X": 1, "OD": 1, "OW": 1})
    print("all kernels compiled for sm_80 and sm_90")


if __name__ == "__main__" and sys.argv[1:] == ["--compile-check"]:
    _compile_check()
