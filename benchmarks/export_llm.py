"""What the LLM export costs and buys on a CPU: bundle size, decode speed and quality of fp32 / fp16 / int4 decoders.

    python benchmarks/export_llm.py [--checkpoint DIR] [--workdir DIR] [--out-dir docs/] [--name bench-export]
                                    [--repeats 3] [--new-tokens 64] [--reports 30] [--threads 2]

Model: phantom-small's LLM (SmolLM2-135M-Instruct + the four M3D tokens), built with torch.manual_seed(0) as
`export.bundle` does for `preset:phantom-small`, or the LLM of the checkpoint folder given with --checkpoint.
Writes NAME.json and NAME.md (--name, default bench-export) into --out-dir. Three parts, one run:

1. Sizes. One fp32 bundle (`export.bundle.build`), and decoder.onnx re-made from its fp32 decoder at fp16,
   int4-q41-lora8 (the default: int4-q41 with the projections a trained LoRA changed merged and stored at 8 bits),
   int4-q41, int4-rtn, int4-hqq and int4-gptq (`export.quantize`; GPTQ calibrated on phantom scans +
   prompts, `m3d_edge.calibration`, seed 30000, disjoint from the held-out reports), plus a diagnostic int4-rtn with the LM head
   kept fp32 (`lm_head="fp32"`); the other bundle files do not depend on the LLM precision, so they are counted
   once. The vision graphs are also exported at fp16 for their size. The GGUF llama.cpp reads is listed for scale.
2. Decode speed, batch 1, greedy, the same token ids for every engine (a short ChatML prompt, tokenized with the
   bundle's tokenizer.json): decoder.onnx through `runtime.decoder.Decoder` (KV cache bound in place), PyTorch
   eager fp32 (a plain KV-cache loop over the Hugging Face model, LM head on the last position), and llama.cpp on
   the GGUF. Each engine: prefill and first argmax (time to first token), then new_tokens - 1 decode steps, each
   a forward of one token plus an argmax; tokens/s = (new_tokens - 1) / decode time. Every engine runs in its own
   process (in one process llama.cpp, torch's OpenMP and the ORT thread pools slow each other down), all with
   --threads threads; int4-q41-lora8, int4-q41, int4-rtn and llama.cpp are also run with 1 thread. One warm-up
   run per engine, then `repeats` rounds in which every engine runs once (round robin, so a change in the
   machine's load hits every engine alike); median, min and max over the rounds.
3. Quality on held-out phantom reports (`generate_case(seed=20_000, i)` + `write_report`; training data uses
   other seeds): each report follows a fixed ChatML request and ends with <|im_end|>; perplexity over the report
   tokens, teacher forced, token by token through decoder.onnx with the KV cache (the graph returns only the last
   position's logits). The reports run as one batch, right-padded: a causal model never looks right, so padding
   changes no real position, and a check compares the batch with the runtime Decoder at batch 1. The same
   procedure for every precision, fp32 included; torch (one full-sequence forward) and llama.cpp are given as
   references, and so is the torch backend's NF4 (bitsandbytes Linear4bit on every LLM projection but the LM
   head, `m3d_edge.model.nf4`). Agreement with the fp32 decoder: teacher-forced top-1, and greedy continuation of 32 tokens from
   the request plus each report's first 16 tokens (share of positions equal; tokens before the first difference).

What is and is not comparable: phantom-small's SmolLM2 weights are read from the Q4_1 GGUF and dequantized by
transformers, so "fp32" holds exactly the GGUF's values (Q4_1 blocks, Q8_0 token embedding = tied LM head) and
llama.cpp runs the same weights in their packed form. int4-q41 stores those Q4_1 blocks exactly (uint4 zero
points plus float32 block offsets; LM head int8, exact for the Q8_0 embedding). int4-rtn re-quantizes them
(symmetric, block 32, fp32 scales, no zero point; LM head included), so it is a second rounding, not a rounding of
the original bf16 model. llama.cpp's Q4_1 is asymmetric (block 32, fp16 scale and min) and its LM head stays Q8_0.
All int4 paths quantize activations to 8 bits inside the matmul (ORT accuracy_level=4; llama.cpp's Q8_1 dot
products). Engines differ beyond precision: ORT adds IO binding and a numpy argmax per step; llama.cpp samples in C.

Limits: CPU only, batch 1 timing, a small model (135 M), where per-step overhead (op dispatch, binding, the
Python loop) weighs more than at 4 B / 7 B, so the ratios need not carry over to the official models. Timings on a shared machine move
with its load, which is recorded before and after each part.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from m3d_edge import offline_by_default
from m3d_edge.bench.timing import OtherCpu

DEFAULT_PRESET = "phantom-small"
BUSY_CORES = 0.25  # other processes' average CPU above which a run is marked as shared
PRECISIONS = ("fp32", "fp16", "int4-q41-lora8", "int4-q41", "int4-rtn", "int4-hqq", "int4-gptq")
# a diagnostic beside the four bundle precisions: RTN with the LM head (the tied embedding) left fp32
RTN_FP32_HEAD = "int4-rtn-fp32-head"
BUNDLE_FILES = ("decoder.onnx", "decoder.onnx.data", "embeddings.npy", "vision.onnx", "seg_detail.onnx",
                "seg_decoder.onnx", "tokenizer.json")  # seg_detail.onnx only with a seg detail path
DECODER_FILES = BUNDLE_FILES[:2]
HELD_OUT_SEED = 20_000  # phantom seed used by no training set
# SmolLM2's ChatML; the same ids go to every engine
CHAT_PROMPT = ("<|im_start|>system\nYou are a radiology assistant.<|im_end|>\n"
               "<|im_start|>user\nDescribe what a normal abdominal CT scan shows.<|im_end|>\n"
               "<|im_start|>assistant\n")
REPORT_REQUEST = ("<|im_start|>user\nWrite the findings of this CT scan.<|im_end|>\n"
                  "<|im_start|>assistant\n")
REPORT_END = "<|im_end|>"
CONTINUATION_PREFIX = 16  # report tokens given before the greedy continuation
CONTINUATION_TOKENS = 32
TARGET_INT4_SIZE = 0.30  # int4 decoder as a share of fp32
TARGET_PPL_DELTA = 0.05  # int4 perplexity within 5 % of fp32
MB = 1e6


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- the machine ---------------------------------------------------------------------------------------------------

def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def library_versions() -> dict[str, Optional[str]]:
    out = {}
    for dist in ("m3d_edge", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "llama_cpp_python",
                 "tokenizers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# -- model and artefacts ---------------------------------------------------------------------------------------------

@dataclass
class Source:
    model: Any  # LaMed
    tokenizer: Any  # transformers tokenizer with the M3D tokens
    description: str  # "preset:phantom-small (seed 0)" or the checkpoint folder and its digest


def load_source(checkpoint_dir: Optional[Path]) -> Source:
    import torch

    from m3d_edge.config import preset
    from m3d_edge.export import checkpoint_digest
    from m3d_edge.model import checkpoint
    from m3d_edge.model import llm as llm_model

    if checkpoint_dir is None:
        cfg = preset(DEFAULT_PRESET)
        torch.manual_seed(0)  # as export.bundle does for preset:NAME
        model = checkpoint.build(cfg)
        return Source(model.eval(), llm_model.load_tokenizer(cfg.llm), f"preset:{DEFAULT_PRESET} (seed 0)")
    model = checkpoint.load(checkpoint_dir)
    tokenizer = llm_model.load_tokenizer(model.cfg.llm, checkpoint_dir)
    # the digest makes a workdir stamp (build_artefacts) tell a retrained model in the same folder from the old one
    digest = checkpoint_digest(checkpoint_dir)[:16]
    return Source(model.eval(), tokenizer, f"{checkpoint_dir.resolve()} (sha256 {digest})")


def build_artefacts(source: Source, workdir: Path) -> dict[str, Any]:
    """The fp32 bundle, the decoder at each other precision, and fp16 vision graphs; reused when already there.

    Layout: workdir/bundle-fp32/ (a full bundle), workdir/decoder-{precision}/decoder.onnx(.data) +
    quantization.json, workdir/vision-fp16/, workdir/hf-fp32/ (the LLM as a Hugging Face folder). workdir/source.txt names the model they came from; a workdir made
    from another model is refused rather than silently measured."""
    from m3d_edge.export import bundle as bundle_export
    from m3d_edge.export import llm as llm_export
    from m3d_edge.export import onnx as onnx_export

    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / "source.txt"
    if stamp.is_file() and stamp.read_text() != source.description:
        raise ValueError(f"{workdir} holds artefacts of {stamp.read_text()!r}, not {source.description!r}; "
                         f"give another --workdir or remove this one")
    stamp.write_text(source.description)
    seconds: dict[str, Optional[float]] = {}
    bundle_dir = workdir / "bundle-fp32"
    if not (bundle_dir / "manifest.json").is_file():
        say("building the fp32 bundle")
        t = time.perf_counter()
        bundle_export.build(source.model, bundle_dir, llm="fp32", vision="fp32", progress=False,
                            tokenizer=source.tokenizer)
        seconds["bundle-fp32"] = round(time.perf_counter() - t, 1)
    decoders = {"fp32": bundle_dir / "decoder.onnx"}
    quantization: dict[str, Any] = {"fp32": None}
    for precision in (*PRECISIONS[1:], RTN_FP32_HEAD):
        folder = workdir / f"decoder-{precision}"
        target, record = folder / "decoder.onnx", folder / "quantization.json"
        if not record.is_file():
            say(f"making the {precision} decoder")
            shutil.rmtree(folder, ignore_errors=True)
            t = time.perf_counter()
            # as the bundle does it (a checkpoint's merged LoRA stays a float branch at 4 bits: export.lora)
            lm_head = "fp32" if precision == RTN_FP32_HEAD else None
            info = bundle_export.lower_decoder(source.model, decoders["fp32"], target,
                                               "int4-rtn" if lm_head else precision, lm_head=lm_head,
                                               tokenizer=source.tokenizer)
            seconds[f"decoder-{precision}"] = round(time.perf_counter() - t, 1)
            record.write_text(json.dumps(info, indent=2))  # written last: its presence marks a finished decoder
        decoders[precision] = target
        quantization[precision] = json.loads(record.read_text())
    hf_dir = workdir / "hf-fp32"  # the LLM as the builder reads it, for the torch engine's process
    if not (hf_dir / "done").is_file():
        shutil.rmtree(hf_dir, ignore_errors=True)
        llm_export.save_hf_folder(source.model.base_llm, hf_dir)
        (hf_dir / "done").write_text("")
    vision16 = workdir / "vision-fp16"
    if not (vision16 / "done").is_file():
        say("exporting the vision graphs at fp16 (for their size)")
        shutil.rmtree(vision16, ignore_errors=True)
        t = time.perf_counter()
        onnx_export.export_all(source.model, vision16, precision="fp16")
        seconds["vision-fp16"] = round(time.perf_counter() - t, 1)
        (vision16 / "done").write_text("")
    return {"bundle": bundle_dir, "decoders": decoders, "vision_fp16": vision16, "hf": hf_dir, "quantization": quantization,
            "build_seconds": seconds}


def sizes(art: dict[str, Any], gguf: Path) -> dict[str, Any]:
    """MB (10^6 bytes) per bundle file for each LLM precision (vision fp32), and the fp16 vision graphs."""
    bundle_dir: Path = art["bundle"]
    shared = {name: (bundle_dir / name).stat().st_size / MB
              for name in BUNDLE_FILES[2:] if (bundle_dir / name).is_file()}
    per_precision = {}
    for precision, decoder in art["decoders"].items():
        files = {name: (decoder.parent / name).stat().st_size / MB
                 for name in DECODER_FILES if (decoder.parent / name).is_file()}
        files.update(shared)
        decoder_mb = sum(files.get(n, 0.0) for n in DECODER_FILES)
        per_precision[precision] = {"files_mb": {k: round(v, 2) for k, v in files.items()},
                                    "decoder_mb": round(decoder_mb, 2), "bundle_mb": round(sum(files.values()), 2)}
    fp32 = per_precision["fp32"]
    for entry in per_precision.values():
        entry["decoder_vs_fp32"] = round(entry["decoder_mb"] / fp32["decoder_mb"], 4)
        entry["bundle_vs_fp32"] = round(entry["bundle_mb"] / fp32["bundle_mb"], 4)
    vision16 = {p.name: round(p.stat().st_size / MB, 2) for p in sorted(art["vision_fp16"].glob("*.onnx*"))}
    return {"per_llm_precision": per_precision, "vision_fp16_mb": vision16,
            "gguf_q4_1_mb": round(gguf.stat().st_size / MB, 2), "gguf_file": gguf.name,
            "gguf_tensor_types": gguf_tensor_types(gguf),
            "target_int4_decoder_vs_fp32": TARGET_INT4_SIZE}


def gguf_tensor_types(path: Path) -> Optional[dict[str, int]]:
    """{type: count} of the GGUF's tensors (needs the gguf package, which transformers uses to read GGUFs)."""
    try:
        import gguf
    except ImportError:
        return None
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


# -- decode speed ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    ids: list[int]
    prefill_s: float  # prompt forward + first argmax (time to first token)
    decode_s: float  # new_tokens - 1 steps of one-token forward + argmax


class Engine(Protocol):
    def generate(self, prompt: list[int], new_tokens: int) -> Run: ...


class OrtEngine:
    """decoder.onnx through the runtime's Decoder (in-place KV cache, IO binding), greedy, no stop ids."""

    def __init__(self, decoder_onnx: Path, embeddings: Path, spec, threads: int) -> None:
        from m3d_edge.runtime.decoder import Decoder

        self.decoder = Decoder.from_files(decoder_onnx, embeddings, spec, max_length=512, threads=threads)

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        from m3d_edge.runtime.decoder import GenerationOptions

        options = GenerationOptions(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        stream = iter(self.decoder.stream(self.decoder.embed(prompt), options))
        ids = [next(stream)]  # prefill + first argmax
        t1 = time.perf_counter()
        ids.extend(stream)  # each further token: one forward + argmax (the last token is never fed)
        t2 = time.perf_counter()
        return Run(ids, t1 - t0, t2 - t1)


class TorchEngine:
    """The Hugging Face LLM in eager fp32 with a DynamicCache, read from the folder the export hands the builder
    (the same weights); the LM head runs on the last position only, as in decoder.onnx."""

    def __init__(self, hf_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.llm = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                        local_files_only=True).eval()

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        import torch
        from transformers import DynamicCache

        trunk, head = self.llm.model, self.llm.lm_head
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = trunk(input_ids=torch.tensor([prompt]), cache=DynamicCache(), use_cache=True)
            token = int(head(out.last_hidden_state[:, -1]).argmax(-1))
            t1 = time.perf_counter()
            ids = [token]
            for _ in range(new_tokens - 1):
                out = trunk(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
                token = int(head(out.last_hidden_state[:, -1]).argmax(-1))
                ids.append(token)
            t2 = time.perf_counter()
        return Run(ids, t1 - t0, t2 - t1)


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on the GGUF: eval the prompt, then sample(temp=0) (its greedy sampler) and
    eval one token at a time. reset() before each run, so no prompt cache is reused between runs.

    n_ubatch=1: this build (llama-cpp-python 0.3.36, AVX-512 CPU backend) dies with SIGSEGV in llama_decode on any
    micro-batch of more than one token on this machine (benchmarks/runtime.py found the same), so llama.cpp runs
    the prompt one position at a time. Decode (one token per call) is unaffected; its prefill time is therefore
    not comparable with the other engines'."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_ubatch=1,
                         verbose=False)

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        ids = [llm.sample(temp=0.0)]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([ids[-1]])
            ids.append(llm.sample(temp=0.0))
        t2 = time.perf_counter()
        return Run(ids, t1 - t0, t2 - t1)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)


def _engine_worker(conn, kind: str, threads: int, kwargs: dict[str, Any]) -> None:
    """Child process: build one engine, then answer (prompt, new_tokens) requests with Runs until sent None."""
    try:
        if kind == "ort":
            engine: Engine = OrtEngine(threads=threads, **kwargs)
        elif kind == "torch":
            engine = TorchEngine(threads=threads, **kwargs)
        else:
            engine = LlamaCppEngine(threads=threads, **kwargs)
        conn.send(("ok", engine.tokenize(CHAT_PROMPT) if kind == "llama" else None))
        while (request := conn.recv()) is not None:
            conn.send(("ok", engine.generate(*request)))
    except Exception as e:  # reported to the parent, which raises it with the engine's name
        conn.send(("error", f"{type(e).__name__}: {e}"))


class ChildEngine:
    """An engine in its own (spawned) process. Why: in one process, torch's OpenMP threads, four ORT thread pools
    and llama.cpp's threads compete for the 2 cores; measured here, llama.cpp fell from ~16 to ~1 token/s beside
    them. Idle children block on a pipe, so only the engine being timed uses the CPU."""

    def __init__(self, ctx, name: str, weights: str, kind: str, threads: int, **kwargs: Any) -> None:
        self.name, self.weights, self.threads = name, weights, threads
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_worker, args=(child, kind, threads, kwargs), daemon=True)
        self.process.start()
        child.close()

    def ready(self) -> Any:
        return self._receive()

    def generate(self, prompt: list[int], new_tokens: int) -> Run:
        self.conn.send((prompt, new_tokens))
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()

    def _receive(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(f"{self.name}: its process died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"{self.name}: {payload}")
        return payload


def time_engines(engines: list[ChildEngine], prompt: list[int], new_tokens: int,
                 repeats: int) -> list[dict[str, Any]]:
    runs: dict[str, list[Run]] = {e.name: [] for e in engines}
    for engine in engines:
        say(f"warm-up: {engine.name}")
        engine.generate(prompt, new_tokens)
    for r in range(repeats):
        say(f"round {r + 1}/{repeats}")
        for engine in engines:  # round robin: load changes on a shared machine hit every engine
            runs[engine.name].append(engine.generate(prompt, new_tokens))
    rows = []
    for engine in engines:
        rs = runs[engine.name]
        tps = [(new_tokens - 1) / r.decode_s for r in rs]
        prefill = [r.prefill_s * 1e3 for r in rs]
        rows.append({"engine": engine.name, "weights": engine.weights, "threads": engine.threads,
                     "decode_tok_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
                     "ms_per_token_median": 1e3 / statistics.median(tps),
                     "prefill_ms": {"median": statistics.median(prefill), "min": min(prefill), "max": max(prefill)},
                     "ids": rs[0].ids, "same_ids_every_run": all(r.ids == rs[0].ids for r in rs)})
    return rows


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- quality -----------------------------------------------------------------------------------------------------------

def held_out_reports(n: int) -> list[str]:
    """Reports of phantom cases (HELD_OUT_SEED, 0..n-1), drawn with the same rng as dataset.synthesize uses."""
    from m3d_edge.data.phantom import generate_case, write_report

    return [write_report(generate_case(HELD_OUT_SEED, i), np.random.default_rng([HELD_OUT_SEED, i, 1]))
            for i in range(n)]


class BatchedDecoder:
    """decoder.onnx at batch B, teacher forced or greedy, with one [B, kv, max_length, d] cache buffer per layer
    bound as both past and present (the runtime's in-place scheme, widened to B rows). Rows are right-padded:
    positions past a row's end hold garbage that no earlier position can see."""

    def __init__(self, session, spec, embeddings: np.ndarray, batch: int, max_length: int) -> None:
        import onnxruntime as ort

        np_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        types = {i.name: i.type for i in session.get_inputs()}
        self.session, self.spec, self.embeddings = session, spec, embeddings
        self.embed_dtype = np_types[types["inputs_embeds"]]
        shape = (batch, spec.num_kv_heads, max_length, spec.head_dim)
        cache_dtype = np_types[types["past_key_values.0.key"]]
        self._arrays = [(np.zeros(shape, cache_dtype), np.zeros(shape, cache_dtype)) for _ in range(spec.num_layers)]
        self._values = [tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in pair) for pair in self._arrays]
        self._binding = session.io_binding()
        self.batch, self.max_length, self.length = batch, max_length, 0

    def reset(self) -> None:
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, S] int -> logits [B, V] float32 of each row's last new position."""
        s = ids.shape[1]
        total = self.length + s
        if total > self.max_length:
            raise ValueError(f"{total} positions exceed the batch cache ({self.max_length})")
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(self.embeddings[ids], dtype=self.embed_dtype))
        b.bind_cpu_input("attention_mask", np.ones((self.batch, total), dtype=np.int64))
        b.bind_output("logits", "cpu")
        b.bind_output("hidden_states", "cpu")
        for i, (k, v) in enumerate(self._values):
            b.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            b.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            b.bind_ortvalue_output(f"present.{i}.key", k)
            b.bind_ortvalue_output(f"present.{i}.value", v)
        self.session.run_with_iobinding(b)
        self.length = total
        return b.get_outputs()[0].numpy()[:, -1].astype(np.float32)  # logits [B, 1, V] -> [B, V]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class Scored:
    nll: np.ndarray  # [B, L] negative log-likelihood of each target token (nan past a row's end)
    top1: np.ndarray  # [B, L] argmax at the position that predicts it (-1 past a row's end)


def pad_targets(targets: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids [B, L] right-padded with 0, mask [B, L] bool)"""
    length = max(len(t) for t in targets)
    ids = np.zeros((len(targets), length), dtype=np.int64)
    mask = np.zeros_like(ids, dtype=bool)
    for i, t in enumerate(targets):
        ids[i, :len(t)] = t
        mask[i, :len(t)] = True
    return ids, mask


def score_onnx(dec: BatchedDecoder, context: list[int], targets: list[list[int]]) -> Scored:
    """Teacher forcing: the shared context as one prefill, then each target token fed in turn."""
    ids, mask = pad_targets(targets)
    b, length = ids.shape
    nll = np.full((b, length), np.nan)
    top1 = np.full((b, length), -1, dtype=np.int64)
    dec.reset()
    logits = dec.step(np.tile(np.asarray(context, dtype=np.int64), (b, 1)))  # predicts target 0
    for t in range(length):
        lp = log_softmax(logits)
        nll[:, t] = np.where(mask[:, t], -lp[np.arange(b), ids[:, t]], np.nan)
        top1[:, t] = np.where(mask[:, t], logits.argmax(-1), -1)
        if t < length - 1:
            logits = dec.step(ids[:, t:t + 1])
    return Scored(nll, top1)


def greedy_onnx(dec: BatchedDecoder, prefixes: np.ndarray, new_tokens: int) -> np.ndarray:
    """prefixes [B, P] (equal lengths) -> greedy continuations [B, new_tokens]."""
    dec.reset()
    logits = dec.step(prefixes)
    out = np.zeros((prefixes.shape[0], new_tokens), dtype=np.int64)
    for t in range(new_tokens):
        out[:, t] = logits.argmax(-1)
        if t < new_tokens - 1:
            logits = dec.step(out[:, t:t + 1])
    return out


def score_torch(model, context: list[int], targets: list[list[int]], chunk: int = 6) -> Scored:
    """Reference: one full-sequence forward per chunk of rows (right padding is harmless under a causal mask)."""
    import torch

    ids, mask = pad_targets(targets)
    full = np.concatenate([np.tile(np.asarray(context, dtype=np.int64), (len(targets), 1)), ids], axis=1)
    c = len(context)
    nll = np.full(ids.shape, np.nan)
    top1 = np.full(ids.shape, -1, dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(targets), chunk):
            logits = model.base_llm(input_ids=torch.from_numpy(full[s:s + chunk])).logits  # [b, c + L, V]
            pred = logits[:, c - 1:-1].double()  # the positions that predict each target
            lp = torch.log_softmax(pred, dim=-1)
            rows = torch.from_numpy(ids[s:s + chunk])
            nll[s:s + chunk] = -lp.gather(-1, rows[..., None])[..., 0].numpy()
            top1[s:s + chunk] = pred.argmax(-1).numpy()
    nll[~mask] = np.nan
    top1[~mask] = -1
    return Scored(nll, top1)


def score_nf4(model, context: list[int], targets: list[list[int]]) -> tuple[Scored, dict[str, Any]]:
    """score_torch on a copy of the model whose LLM projections are NF4 (m3d_edge.model.nf4)."""
    import copy

    from m3d_edge.model.nf4 import quantize_llm_nf4

    quantized = copy.deepcopy(model)
    record = quantize_llm_nf4(quantized)
    return score_torch(quantized, context, targets), record


def score_llama(gguf: Path, threads: int, context: list[int], targets: list[list[int]]) -> Scored:
    """Reference: llama.cpp on the GGUF, logits of every position (logits_all), one sequence at a time."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_ubatch=1,
                logits_all=True, verbose=False)  # n_ubatch=1: see LlamaCppEngine
    ids, mask = pad_targets(targets)
    nll = np.full(ids.shape, np.nan)
    top1 = np.full(ids.shape, -1, dtype=np.int64)
    c = len(context)
    for i, t in enumerate(targets):
        llm.reset()
        llm.eval(context + t)
        pred = np.asarray(llm.scores[c - 1:c - 1 + len(t)], dtype=np.float32)  # [len(t), V of the GGUF]
        lp = log_softmax(pred)
        nll[i, :len(t)] = -lp[np.arange(len(t)), t]
        top1[i, :len(t)] = pred.argmax(-1)
    llm.close()
    return Scored(nll, top1)


def perplexity(s: Scored) -> float:
    return float(np.exp(np.nanmean(s.nll)))


def top1_agreement(s: Scored, ref: Scored) -> float:
    valid = ref.top1 >= 0
    return float((s.top1[valid] == ref.top1[valid]).mean())


def quality(art: dict[str, Any], source: Source, spec, gguf: Path, n_reports: int, threads: int,
            tokenizer) -> dict[str, Any]:
    from m3d_edge.runtime.decoder import Decoder
    from m3d_edge.runtime.engines import create_session

    say(f"generating {n_reports} held-out phantom reports (seed {HELD_OUT_SEED})")
    reports = held_out_reports(n_reports)
    context = tokenizer.encode(REPORT_REQUEST, add_special_tokens=False).ids
    targets = [tokenizer.encode(r + REPORT_END, add_special_tokens=False).ids for r in reports]
    too_short = [i for i, t in enumerate(targets) if len(t) <= CONTINUATION_PREFIX]
    if too_short:
        raise ValueError(f"reports {too_short} have <= {CONTINUATION_PREFIX} tokens; lower CONTINUATION_PREFIX")
    prefixes = np.asarray([context + t[:CONTINUATION_PREFIX] for t in targets], dtype=np.int64)
    max_length = len(context) + max(max(len(t) for t in targets), CONTINUATION_PREFIX + CONTINUATION_TOKENS)
    embeddings = np.load(art["bundle"] / "embeddings.npy")
    scored, greedy_out, seconds = {}, {}, {}
    for precision, path in art["decoders"].items():
        say(f"quality: decoder {precision}")
        t = time.perf_counter()
        session = create_session(path, threads=threads)
        dec = BatchedDecoder(session, spec, embeddings, len(targets), max_length)
        scored[precision] = score_onnx(dec, context, targets)
        greedy_out[precision] = greedy_onnx(dec, prefixes, CONTINUATION_TOKENS)
        seconds[precision] = round(time.perf_counter() - t, 1)
        if precision == "fp32":  # the batch procedure against the runtime Decoder at batch 1, on report 0
            single = Decoder(session, spec, embeddings, max_length=max_length)
            logits, _ = single.forward(single.embed(context))
            nll0 = []
            for j, token in enumerate(targets[0]):
                nll0.append(-log_softmax(logits)[token])
                if j < len(targets[0]) - 1:
                    logits, _ = single.forward(single.embed([token]))
            batch_check = float(np.max(np.abs(np.asarray(nll0) - scored["fp32"].nll[0, :len(targets[0])])))
        del dec, session
    say("quality: torch and llama.cpp references, and the torch backend's NF4 (bitsandbytes)")
    torch_ref = score_torch(source.model, context, targets)
    nf4_ref, nf4_record = score_nf4(source.model, context, targets)
    # in its own process (see ChildEngine), 1 thread: each position is one llama_decode call here (n_ubatch=1),
    # and a row's dot product runs on one thread whatever the count, so the numbers do not depend on it
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        llama_ref = pool.submit(score_llama, gguf, 1, context, targets).result()
    ref, ref_greedy = scored["fp32"], greedy_out["fp32"]
    ppl32 = perplexity(ref)
    rows = []
    for precision in art["decoders"]:
        s, g = scored[precision], greedy_out[precision]
        prefix_len = [common_prefix(list(a), list(b)) for a, b in zip(g, ref_greedy)]
        ppl = perplexity(s)
        rows.append({"model": f"decoder.onnx {precision}", "precision": precision, "perplexity": ppl,
                     "ppl_vs_fp32": ppl / ppl32 - 1, "top1_agreement": top1_agreement(s, ref),
                     "greedy_position_agreement": float((g == ref_greedy).mean()),
                     "greedy_mean_tokens_before_first_difference": float(np.mean(prefix_len)),
                     "greedy_identical_rows": int(sum(p == CONTINUATION_TOKENS for p in prefix_len)),
                     "seconds": seconds[precision]})
    for name, s in (("PyTorch eager fp32 (full-sequence forward)", torch_ref),
                    ("PyTorch NF4, bitsandbytes (torch backend, full-sequence forward)", nf4_ref),
                    ("llama.cpp Q4_1 (logits_all)", llama_ref)):
        ppl = perplexity(s)
        rows.append({"model": name, "precision": "reference", "perplexity": ppl, "ppl_vs_fp32": ppl / ppl32 - 1,
                     "top1_agreement": top1_agreement(s, ref)})
    tokens = int(np.isfinite(ref.nll).sum())
    return {"reports": n_reports, "seed": HELD_OUT_SEED, "scored_tokens": tokens,
            "report_tokens": {"min": min(map(len, targets)), "max": max(map(len, targets)),
                              "mean": round(tokens / len(targets), 1)},
            "context": REPORT_REQUEST, "context_tokens": len(context), "continuation_prefix": CONTINUATION_PREFIX,
            "continuation_tokens": CONTINUATION_TOKENS, "batch_vs_runtime_decoder_max_abs_nll_diff": batch_check,
            "example_report": reports[0], "rows": rows, "target_ppl_delta": TARGET_PPL_DELTA, "nf4": nf4_record}


# -- output ------------------------------------------------------------------------------------------------------

def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m, sz, gen, q = result["machine"], result["sizes"], result["generation"], result["quality"]
    lines = ["# LLM export benchmark", "",
             f"`{result['command']}`, {result['date']}. Script: `benchmarks/export_llm.py` (its docstring gives the "
             f"method); raw numbers: `{result.get('name', 'bench-export')}.json`.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {result['threads']} threads per engine; "
             f"no GPU. CPU used by other processes during the run: {m['other_cpu_cores']} cores"
             f"{' (shared with another job: timings are noisy)' if m['other_cpu_cores'] > BUSY_CORES else ''}; "
             f"load average (1, 5, 15 min) before: {m['load_before']}, after: {m['load_after']}.",
             "Libraries: " + ", ".join(f"{k} {v}" for k, v in result["libraries"].items() if v) + ".", "",
             f"Model: {result['model']['source']}; LLM {result['model']['llm']}.", "",
             "## Bundle size (MB = 10^6 bytes; vision fp32)", ""]
    precisions = list(sz["per_llm_precision"])
    lines += ["| file | " + " | ".join(f"LLM {p}" for p in precisions) + " |",
              "|---|" + "---:|" * len(precisions)]
    names = list(BUNDLE_FILES)
    for name in names:
        cells = [sz["per_llm_precision"][p]["files_mb"].get(name) for p in precisions]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else _f(c) for c in cells) + " |")
    for key, label in (("decoder_mb", "**decoder total**"), ("bundle_mb", "**bundle total**")):
        lines.append(f"| {label} | " + " | ".join(_f(sz["per_llm_precision"][p][key]) for p in precisions) + " |")
    for key, label in (("decoder_vs_fp32", "decoder vs fp32"), ("bundle_vs_fp32", "bundle vs fp32")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * sz['per_llm_precision'][p][key]:.0f}%"
                                                  for p in precisions) + " |")
    v16 = ", ".join(f"{k} {_f(v)}" for k, v in sz["vision_fp16_mb"].items())
    built = result["build_seconds"]
    built_text = ("Export times in this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in built.items()) + "."
                  if built else "All exported files were reused from --workdir (no export times).")
    lines += ["", f"Target: int4 decoder <= {100 * sz['target_int4_decoder_vs_fp32']:.0f}% of fp32. The files other "
              f"than the decoder are the same for every LLM precision. Vision at fp16: {v16} MB. For scale, "
              f"llama.cpp's {sz['gguf_file']} (whole LLM, embedding included): {_f(sz['gguf_q4_1_mb'])} MB "
              f"(tensor types {sz['gguf_tensor_types']}). {built_text}", "",
              f"## Decode speed (batch 1, greedy, {gen['new_tokens']} new tokens, {gen['prompt_tokens']}-token "
              f"prompt, 1 warm-up + {gen['repeats']} round-robin rounds)", "",
              "| engine | weights | decode tok/s, median (min-max) | ms/token | prefill ms | vs llama.cpp | vs torch "
              "| tokens = torch's |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in gen["rows"]:
        tps = r["decode_tok_s"]
        lines.append(f"| {r['engine']} | {r['weights']} | {_f(tps['median'])} ({_f(tps['min'])}-{_f(tps['max'])}) "
                     f"| {_f(r['ms_per_token_median'])} | {_f(r['prefill_ms']['median'])} "
                     f"| {r['vs_llama_cpp']:.2f}x | {r['vs_torch']:.2f}x "
                     f"| {r['same_prefix_as_torch']}/{gen['new_tokens']} |")
    lines += ["", f"Ratios are of median decode tokens/s; \"vs llama.cpp\" against llama.cpp at the same thread "
              f"count. \"tokens = torch's\": greedy tokens equal to PyTorch fp32's before the first difference. "
              f"llama.cpp's prefill runs one position at a time (n_ubatch=1, see the notes), so its prefill column is "
              f"not comparable. Load average during this part: {gen['load_before']} -> {gen['load_after']}.", "",
              f"## Quality vs the fp32 decoder ({q['reports']} held-out phantom reports, seed {q['seed']}, "
              f"{q['scored_tokens']} scored tokens)", "",
              "| model | perplexity | vs fp32 | top-1 agreement (teacher forced) | greedy 32-token agreement "
              "| tokens before first difference | identical continuations |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in q["rows"]:
        greedy_cells = (f"{100 * r['greedy_position_agreement']:.1f}% | "
                        f"{_f(r['greedy_mean_tokens_before_first_difference'])} | "
                        f"{r['greedy_identical_rows']}/{q['reports']}") if "greedy_position_agreement" in r else "- | - | -"
        lines.append(f"| {r['model']} | {r['perplexity']:.3f} | {100 * r['ppl_vs_fp32']:+.2f}% "
                     f"| {100 * r['top1_agreement']:.1f}% | {greedy_cells} |")
    lines += ["", f"Target: int4 perplexity within {100 * q['target_ppl_delta']:.0f}% of fp32. Teacher forced, token "
              f"by token through decoder.onnx with its KV cache, all reports as one right-padded batch (checked "
              f"against the runtime Decoder at batch 1: max |NLL difference| "
              f"{q['batch_vs_runtime_decoder_max_abs_nll_diff']:.1e}). Greedy: {q['continuation_tokens']} tokens "
              f"after the request and each report's first {q['continuation_prefix']} tokens, compared with fp32's. "
              f"Load average during this part: {q['load_before']} -> {q['load_after']}.",
              "", "## Notes", ""]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def notes(result: dict[str, Any]) -> list[str]:
    if result["model"]["same_weights_as_gguf"]:
        out = ["Same weights: phantom-small's SmolLM2 weights come from the Q4_1 GGUF, dequantized to fp32 by "
               "transformers; llama.cpp runs that GGUF. fp32 / fp16 decoders hold those values; int4-rtn, "
               "int4-hqq and int4-gptq re-quantize them (a second rounding). The four M3D token rows exist only in "
               "our models."]
    else:
        out = ["Not the same weights: this checkpoint's LLM is not the untouched SmolLM2 GGUF that llama.cpp runs; "
               "the llama.cpp rows are the base model, for scale only."]
    out += ["Not the same format: llama.cpp Q4_1 is asymmetric (block 32, fp16 scale + min) with a Q8_0 LM head; "
            "int4-q41 holds the same blocks as fp32 scale, uint4 zero point and a float32 offset (the zero point's "
            "rounding remainder, applied as block sums of the activations times the offsets), with an int8 LM "
            "head (Q8_0's rule): the GGUF's values exactly; "
            "int4-rtn is symmetric (block 32, fp32 scale, no zero point) with an int4 LM head; int4-gptq is "
            "asymmetric (uint4 zero points, min/max blocks of 32) with GPTQ's error compensation from 16 multimodal "
            "calibration feeds (4 phantom scans x 4 task prompts + report) and an int8 LM head; int4-hqq is "
            "asymmetric with float zero points, for which ORT's CPU kernel has no fast path.",
            "Timing covers the whole loop each engine needs (ORT: embedding lookup, IO binding, numpy argmax; "
            "torch: the Python loop; llama.cpp: its C sampler). Greedy ties or tiny logit differences can make "
            "engines diverge late in a sequence; the token counts show where.",
            "llama.cpp runs with n_ubatch=1: this llama-cpp-python build (0.3.36, AVX-512 CPU backend) dies with "
            "SIGSEGV in llama_decode on any micro-batch of more than one token on this machine, so it evaluates "
            "the prompt one position at a time. Decode steps are single tokens anyway and unaffected.",
            "Each engine runs in its own process; idle ones block on a pipe. While this script was written, with "
            "every engine in one process (load ~5), llama.cpp decoded ~1 token/s beside torch and four ORT "
            "sessions, against ~16 alone at the same time.",
            "int4-rtn-fp32-head is a diagnostic, not a bundle option: RTN with the LM head (= the tied embedding) "
            "left fp32, to separate the LM head's share of the int4 error.",
            "The quality references are computed differently (torch: one full-sequence forward; llama.cpp: "
            "logits_all over the sequence) and only frame the decoder rows."]
    adapter = (result["quantization"].get("int4-q41") or {}).get("lora")
    if adapter:
        out.append(f"This checkpoint's LLM carries a merged LoRA (rank {adapter['rank']}, {adapter['modules']} "
                   f"modules). Every int4 decoder but int4-q41-lora8 keeps it apart (export.lora): the base "
                   f"weights are quantized and the adapter runs as a float branch beside "
                   f"{adapter['matmuls_with_branch']} of the MatMuls; the "
                   f"fp32 and fp16 decoders hold the merged weights. PyTorch eager runs the merged model.")
    lora8 = (result["quantization"].get("int4-q41-lora8") or {}).get("lora")
    if lora8:
        out.append(f"int4-q41-lora8 (the bundle default) does not keep the adapter apart: the {lora8['matmuls']} "
                   f"MatMuls whose weights it changed stay merged and are stored at 8 bits (symmetric blocks), "
                   f"every other projection as int4-q41's exact Q4_1 blocks.")
    rows = {r["engine"]: r for r in result["generation"]["rows"]}
    one = [rows.get("decoder.onnx int4-rtn, 1 thread"), rows.get("llama.cpp, 1 thread")]
    if all(one) and result["threads"] != 1:
        many = [rows["decoder.onnx int4-rtn"], rows["llama.cpp"]]
        gains = [m["decode_tok_s"]["median"] / o["decode_tok_s"]["median"] for m, o in zip(many, one)]
        text = (f"Threads: going from 1 to {result['threads']} threads changed decode speed by {gains[0]:.2f}x for "
                f"int4-rtn and {gains[1]:.2f}x for llama.cpp.")
        if min(gains) < 1:
            text += (" Slower with more threads: when other jobs hold the cores, a thread waiting at a barrier for "
                     "a descheduled sibling costs more than the extra thread gains, so the multi-thread rows "
                     "measure that contention as much as the engines.")
        out.append(text)
    other = result["machine"]["other_cpu_cores"]
    if other > BUSY_CORES:
        out.append(f"The machine was shared while this ran: other processes used {other} cores on average "
                   f"(of {result['machine']['cores']}): absolute tokens/s depend on what the other job was doing; "
                   f"the min-max spread over the rounds is the better sign of noise within this run, and the "
                   f"round-robin order keeps the ratios fairer than the absolute numbers.")
    return out


def decode_speed(art: dict[str, Any], spec, gguf: Path, prompt: list[int],
                 args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """Start every engine in its own process, check they see the same prompt ids, time them round robin."""
    ctx = multiprocessing.get_context("spawn")
    embeddings = art["bundle"] / "embeddings.npy"
    llama_weights = "Q4_1 (embedding / LM head Q8_0)"
    plan = [(f"decoder.onnx {p}", p, "ort", args.threads, {"decoder_onnx": path, "embeddings": embeddings,
                                                           "spec": spec})
            for p, path in art["decoders"].items()]
    plan += [("PyTorch eager", "fp32", "torch", args.threads, {"hf_dir": art["hf"]}),
             ("llama.cpp", llama_weights, "llama", args.threads, {"gguf": gguf})]
    if args.threads != 1:  # a shared machine punishes thread barriers; one thread shows how much
        plan += [(f"decoder.onnx {p}, 1 thread", p, "ort", 1,
                  {"decoder_onnx": art["decoders"][p], "embeddings": embeddings, "spec": spec})
                 for p in ("int4-q41-lora8", "int4-q41", "int4-rtn")]
        plan.append(("llama.cpp, 1 thread", llama_weights, "llama", 1, {"gguf": gguf}))
    say(f"starting {len(plan)} engine processes")
    engines = [ChildEngine(ctx, name, weights, kind, threads, **kw) for name, weights, kind, threads, kw in plan]
    try:
        for engine in engines:
            ids = engine.ready()
            if ids is not None and ids != prompt:
                raise RuntimeError(f"{engine.name} tokenizes the prompt as {ids}, tokenizer.json as {prompt}; "
                                   f"the engines must see the same ids")
        before = load_average()
        rows = time_engines(engines, prompt, args.new_tokens, args.repeats)
        return rows, before, load_average()
    finally:
        for engine in engines:
            engine.close()


# -- main --------------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"checkpoint folder whose LLM to measure (default: preset {DEFAULT_PRESET}, seed 0)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep (and reuse) the exported bundle and decoders here; default: a temporary folder")
    p.add_argument("--out-dir", type=Path, default=Path("docs"), help="where NAME.json / NAME.md go")
    p.add_argument("--name", default="bench-export", help="output file stem (default bench-export)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per engine, after one warm-up")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    p.add_argument("--reports", type=int, default=30, help="held-out phantom reports for the quality part")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (ORT, torch, llama.cpp)")
    args = p.parse_args(argv)
    for name in ("repeats", "reports", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token is timed as prefill)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    args = parse_args(argv)
    from tokenizers import Tokenizer

    from m3d_edge.model.llm import smollm2_gguf
    from m3d_edge.runtime.decoder import DecoderSpec

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    load_before = load_average()
    other_cpu = OtherCpu()  # CPU of processes not ours, over the whole run (the load average counts our own)
    started = time.perf_counter()
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench-export-")
        workdir = Path(tmp)
    try:
        say(f"loading the model ({args.checkpoint or 'preset:' + DEFAULT_PRESET})")
        source = load_source(args.checkpoint)
        gguf = smollm2_gguf()
        if source.model.cfg.llm.source != "smollm2":
            say("warning: this LLM is not built from the SmolLM2 GGUF; the llama.cpp rows then run other weights")
        art = build_artefacts(source, workdir)
        manifest = json.loads((art["bundle"] / "manifest.json").read_text())
        spec = DecoderSpec.from_manifest(manifest["decoder"])
        tokenizer = Tokenizer.from_file(str(art["bundle"] / "tokenizer.json"))
        size_table = sizes(art, gguf)

        prompt = tokenizer.encode(CHAT_PROMPT, add_special_tokens=False).ids
        rows, load_gen_before, load_gen_after = decode_speed(art, spec, gguf, prompt, args)
        by_name = {r["engine"]: r for r in rows}
        ref_llama, ref_torch = by_name["llama.cpp"], by_name["PyTorch eager"]
        llama_by_threads = {r["threads"]: r for r in rows if r["engine"].startswith("llama.cpp")}
        for r in rows:
            same_threads = llama_by_threads.get(r["threads"], ref_llama)  # llama.cpp at the same thread count
            r["vs_llama_cpp"] = r["decode_tok_s"]["median"] / same_threads["decode_tok_s"]["median"]
            r["vs_torch"] = r["decode_tok_s"]["median"] / ref_torch["decode_tok_s"]["median"]
            r["same_prefix_as_torch"] = common_prefix(r["ids"], ref_torch["ids"])
        generation = {"prompt": CHAT_PROMPT, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "warmup": 1, "order": "round robin",
                      "load_before": load_gen_before, "load_after": load_gen_after,
                      "torch_text": tokenizer.decode(ref_torch["ids"]), "rows": rows}

        load_q_before = load_average()
        q = quality(art, source, spec, gguf, args.reports, args.threads, tokenizer)
        q["load_before"], q["load_after"] = load_q_before, load_average()

        result = {"benchmark": "benchmarks/export_llm.py", "name": args.name,
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": command, "threads": args.threads,
                  "machine": {**machine(), "load_before": load_before, "load_after": load_average(),
                              "other_cpu_cores": other_cpu.cores()},
                  "libraries": library_versions(),
                  "model": {"source": source.description,
                            "llm": f"{type(source.model.base_llm).__name__}, {spec.num_layers} layers, hidden "
                                   f"{spec.hidden_size}, vocab {spec.vocab_size}, weights from {gguf.name}",
                            "gguf": str(gguf),
                            # a preset's LLM is the GGUF's weights as read; a checkpoint's may be fine-tuned
                            "same_weights_as_gguf": args.checkpoint is None
                                                    and source.model.cfg.llm.source == "smollm2"},
                  "workdir": None if tmp else str(workdir), "build_seconds": art["build_seconds"],
                  "quantization": art["quantization"], "sizes": size_table, "generation": generation, "quality": q,
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        result["notes"] = notes(result)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / f"{args.name}.md").write_text(markdown(result))
        say(f"wrote {args.out_dir / args.name}.json and .md in {result['wall_seconds']} s")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
