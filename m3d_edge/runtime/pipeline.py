"""The slim runtime: a verified bundle answers questions about a scan (numpy + onnxruntime + tokenizers only).

    scan (Volume | DICOM folder | .nii(.gz) | .npy)
      ─ imaging.read ─▶ Volume                                      [read]        only for a path
      ─ preprocess.to_model_input(spec from the manifest) ─▶ x [1, 1, 32, 256, 256] + Transform   [preprocess]
      ─ vision.onnx ─▶ image tokens [1, N, H] (+ patch tokens [1, 2048, C] when the seg module shares the tower)
                                                                    [vision]      once per scan, cached
      ─ tokenizer.json + embeddings.npy + image tokens (manifest placement) ─▶ prompt [1, T, H]
      ─ decoder.onnx: image prefix (cached KV) + question prefill    [prefill]     up to the first token
      ─ decoder.onnx one token at a time, stop ids from the manifest [decode]
      ─ only after [SEG]: seg_encoder.onnx(x) (or the patch tokens) [+ seg_detail.onnx(x), with a seg
        detail path], both once per scan, + seg_decoder.onnx(those, the state that predicted [SEG])
        ─▶ mask logits [1, 1, 32, 256, 256] ─ sigmoid > 0.5 ─ Transform.invert_mask ─▶ mask on the source grid
                                                                    [seg]
      ─ boxes in the text (prompts.parse_boxes) ─ Transform.box_to_voxels / box_to_patient ─▶ Answer

Caching. A scan is identified by a digest of its voxels, grid and preprocessing (not by the Python object), so the
same scan read twice is recognised and a changed array is not. Per scan the pipeline keeps the Transform, the vision
outputs, the model input while a separate seg encoder or a detail path may still need it, the seg module's image
embedding and detail features once a [SEG] needed them (so a second mask of a scan runs the mask decoder alone), and
the KV cache rows of the prompt's image prefix: every prompt starts [BOS?] + image tokens (by_id prompts with the N
image tokens, positional ones with [BOS, image...]), so those rows are the same for every question about the scan
and are copied back into the KV buffer (a memcpy of ~1.5 MB for phantom-small) instead of being recomputed. On the
CPU only: the cache buffers there are numpy arrays the host can write; on a GPU the prefix is simply prefilled again
(cheap there). The scan cache is a small LRU (`cache_scans`, default 4).

Several questions about one scan (`ask_many`, CPU) are decoded together: each prompt is prefilled into its own row
of one batch KV cache, then one decoder.onnx run per step serves every row (runtime.decoder.DecoderBatch); the
answers are those of asking one by one, ~2x sooner for four questions.

Threads. One Pipeline may be shared by threads. ONNX Runtime sessions are thread-safe for `run`; everything that
changes per question (KV cache, IO binding) belongs to a Decoder taken from a pool for the length of one answer,
so two threads never share one; a second concurrent question allocates a second Decoder (one more KV cache, e.g.
47 MB for SmolLM2 at 1024 positions), which then stays in the pool. The scan cache is guarded by a lock, and
each scan's features by its own lock, so a scan asked about from two threads at once is encoded once.

Errors. A bundle that is damaged, of another format or missing a file raises `bundle.BundleError` at `load`;
an input the runtime refuses (unreadable file, 2-D array, NaN voxels, a volume preprocessing cannot scale, a
prompt longer than the context) raises `RuntimeInputError` from `ask`, before any state is touched, so the
Pipeline keeps serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from m3d_edge import imaging
from m3d_edge.data.prompts import image_prompt, parse_boxes
from m3d_edge.imaging.volume import ImagingError, Volume
from m3d_edge.preprocess import PreprocessError, Transform, box_from_mask, to_model_input
from m3d_edge.runtime import bundle as bundle_reader
from m3d_edge.runtime.answer import Answer, Box
from m3d_edge.runtime.decoder import (Decoder, DecoderBatch, DecoderSpec, GenerationOptions, Generated,
                                      LogitsProcessor)
from m3d_edge.runtime.engines import Engines, available_providers

log = logging.getLogger(__name__)

BACKENDS = ("ort", "tensorrt")
STAGES = ("read", "preprocess", "vision", "prefill", "decode", "seg")  # "write" is the caller's (cli)
QUESTION_BUDGET = 256  # text tokens of a question the default KV capacity leaves room for
Scan = Union[Volume, str, os.PathLike]


class RuntimeInputError(ValueError):
    """An input the runtime refuses; the message says what was wrong and what to do. The Pipeline stays usable."""


# -- pure helpers ------------------------------------------------------------------------------------------------

def volume_key(volume: Volume, spec: str) -> str:
    """Digest identifying a scan for the feature cache: voxels, dtype, shape, affine and preprocessing spec.

    blake2b runs at ~1 GB/s here, so a 512x512x300 int16 CT costs ~0.15 s once per question; cheaper than
    trusting object identity, which would silently reuse features after an in-place edit of the array."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.ascontiguousarray(volume.array)
    h.update(f"{spec}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def image_positions(ids: np.ndarray, placement: str, num_tokens: int, im_patch_id: int) -> np.ndarray:
    """Prompt ids [T] -> the N positions that take the image tokens, in order (model.lamed.place_image_tokens).

    positional (official): positions 1..N whatever the ids are (the prompt must start with BOS).
    by_id: exactly the positions holding <im_patch>; there must be N of them.
    """
    if placement == "positional":
        if ids.shape[0] < num_tokens + 1:
            raise RuntimeInputError(f"the prompt has {ids.shape[0]} tokens; positional image placement needs at "
                                    f"least {num_tokens + 1} (BOS + {num_tokens} image tokens)")
        return np.arange(1, num_tokens + 1)
    if placement == "by_id":
        pos = np.flatnonzero(ids == im_patch_id)
        if pos.shape[0] != num_tokens:
            raise RuntimeInputError(f"the prompt holds {pos.shape[0]} <im_patch> tokens, the model expects "
                                    f"{num_tokens}; do not write <im_patch> in the question")
        return pos
    raise bundle_reader.BundleError(f"image placement {placement!r} is not known to this runtime "
                                    f"(it reads 'positional' and 'by_id')")


def place_image_tokens(embeds: np.ndarray, image_tokens: np.ndarray, positions: np.ndarray,
                       start: int = 0) -> np.ndarray:
    """Overwrite the image positions of a prompt slice in place. embeds [1, S, H] holds prompt positions
    start .. start+S-1; image_tokens [1, N, H]; positions [N] (absolute). Returns embeds."""
    inside = (positions >= start) & (positions < start + embeds.shape[1])
    embeds[0, positions[inside] - start] = image_tokens[0, inside].astype(embeds.dtype, copy=False)
    return embeds


def sigmoid_mask(logits: np.ndarray) -> np.ndarray:
    """Mask logits -> uint8 mask, sigmoid(logit) > 0.5 in float32 as the official code thresholds."""
    logits = logits.astype(np.float32, copy=False)
    prob = np.empty_like(logits)
    np.negative(logits, out=prob)
    with np.errstate(over="ignore"):  # logits below -88.7: exp is inf and the probability 0, as it should be
        np.exp(prob, out=prob)
    prob += np.float32(1)
    np.reciprocal(prob, out=prob)
    return (prob > np.float32(0.5)).astype(np.uint8)


class TextAssembler:
    """Token ids -> text as the official decode does (`skip_special_tokens=True`: BOS, EOS, <im_patch>, box markers
    and other special tokens dropped, [SEG] kept, it is a plain added token), piece by piece for streaming.

    Each push decodes the kept ids again (a few tens of microseconds for 256 tokens) and returns what is new; a
    trailing U+FFFD (a multi-byte character cut between tokens) is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer, drop_ids: set[int]) -> None:
        self.tokenizer, self.drop_ids = tokenizer, drop_ids
        self.kept: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        if token in self.drop_ids:
            return ""
        self.kept.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self.text()
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.kept, skip_special_tokens=False)


# -- per-scan state ----------------------------------------------------------------------------------------------

@dataclass
class _Prefix:
    ids: tuple[int, ...]  # the prompt ids the rows were computed for
    rows: list[tuple[np.ndarray, np.ndarray]]  # per layer (k, v) [1, kv, P, d]


@dataclass
class _ScanFeatures:
    """What one scan contributes to every question about it."""

    key: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    x: Optional[np.ndarray] = None  # [1, 1, D, H, W], kept only while a seg encoder or detail path may need it
    transform: Optional[Transform] = None
    image_tokens: Optional[np.ndarray] = None  # [1, N, H]
    patch_tokens: Optional[np.ndarray] = None  # [1, 2048, C] when the seg decoder reads the vision tower
    seg_image: Optional[np.ndarray] = None  # the seg decoder's image input, once a [SEG] asked for it
    seg_detail: Optional[np.ndarray] = None  # [1, E/8, 32, 64, 64], the detail path's features, the same way
    prefix: Optional[_Prefix] = None


@dataclass
class _Question:
    """One question, ready to decode: its scan's features, prompt ids, image positions, fitted options."""

    question: str
    feats: _ScanFeatures
    ids: np.ndarray  # [T] int64
    positions: np.ndarray
    options: GenerationOptions
    timings: dict[str, float]


class AnswerStream:
    """Iterate for text pieces as they are generated; `.answer` is the Answer once iteration has finished."""

    def __init__(self, run: Generator[str, None, Answer]) -> None:
        self._run = run
        self.answer: Optional[Answer] = None

    def __iter__(self) -> Iterator[str]:
        self.answer = yield from self._run


# -- the pipeline ------------------------------------------------------------------------------------------------

class Pipeline:
    """A loaded bundle: `Pipeline.load(bundle_dir)`, then `ask`, `stream` or `ask_many`. See the module docstring."""

    def __init__(self, bundle: bundle_reader.Bundle, engines: Engines, *, max_length: Optional[int] = None,
                 cache_scans: int = 4) -> None:
        self.bundle, self.engines = bundle, engines
        m = bundle.manifest
        _require(bundle, m, "tokens", "image", "decoder", "preprocessing", "generation", "components")
        self.spec = m["preprocessing"]
        self.tokens: Mapping[str, Any] = m["tokens"]
        self.image: Mapping[str, Any] = m["image"]
        self.seg: Optional[Mapping[str, Any]] = m.get("seg")
        self.generation: Mapping[str, Any] = m["generation"]
        self.out_shape = tuple(int(v) for v in self.image["size"])
        self.tokenizer = Tokenizer.from_file(str(bundle.path("tokenizer")))
        special = {int(i) for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        listed = {self.tokens["im_patch"], self.tokens["bx_start"], self.tokens["bx_end"], *self.tokens["eos"]}
        if self.tokens.get("bos") is not None:
            listed.add(self.tokens["bos"])
        self._drop_ids = (special | {int(i) for i in listed}) - {int(self.tokens["seg"])}
        # every session is created here, once; a bundle whose graphs ORT cannot load fails at load, not mid-answer
        self._vision = engines.get(bundle.path("vision"))
        self._seg_encoder = engines.get(bundle.path("seg_encoder")) if bundle.has("seg_encoder") else None
        self._seg_decoder = (engines.get(bundle.path("seg_decoder"), mem_pattern=False)  # engines.session_options
                             if self.seg and bundle.has("seg_decoder") else None)
        # a seg module with a detail path (ours) reads the model input again, in seg_detail.onnx, once per scan
        self._seg_detail = (engines.get(bundle.path("seg_detail"), mem_pattern=False)
                            if self._seg_decoder is not None and bundle.has("seg_detail") else None)
        self._seg_inputs = ({i.name for i in self._seg_decoder.get_inputs()}
                            if self._seg_decoder is not None else set())
        self._seg_reads_detail = "seg_detail" in self._seg_inputs
        self._decoder_session = engines.get(bundle.path("decoder"))
        self._decoder_spec = DecoderSpec.from_manifest(m["decoder"])
        self._embeddings = bundle.embeddings()  # [V, H] float16, rows read when looked up
        self._max_length = max_length or self.default_capacity(m)
        self._vision_outputs = [o.name for o in self._vision.get_outputs()]
        self._check_graphs()
        self._pool: list[Decoder] = [self._new_decoder()]
        self.context_capacity = self._pool[0].cache.max_length  # positions: prompt + new tokens - 1
        self._pool_lock = threading.Lock()
        self._cache: OrderedDict[str, _ScanFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_scans = cache_scans
        self._runs = {"vision": 0, "seg_encoder": 0, "seg_detail": 0, "seg_decoder": 0, "prefix_prefill": 0,
                      "prefix_reused": 0}
        self._runs_lock = threading.Lock()

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, device: str = "cpu", backend: str = "ort", *,
             threads: Optional[int] = None, max_length: Optional[int] = None, cache_scans: int = 4) -> "Pipeline":
        """Verify the bundle (format and every file's sha256) and create its sessions.

        device: "cpu" or "cuda" (asking for CUDA where ORT has none is an error, never a silent CPU run).
        backend: "ort" or "tensorrt"; TensorRT falls back to ONNX Runtime with a warning when this machine or the
        bundle has no TensorRT. threads: ORT intra-op threads per session (None: ORT's default, all cores).
        max_length: KV cache capacity in positions (default `default_capacity`: image tokens + a 256-token
        question + the bundle's default max_new_tokens).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; expected one of {', '.join(BACKENDS)}")
        if cache_scans < 1:
            raise ValueError(f"cache_scans must be >= 1, got {cache_scans}")
        bundle = bundle_reader.load(bundle_dir, verify=True)
        tensorrt = False
        if backend == "tensorrt":
            why = None
            if device != "cuda":
                why = "TensorRT needs device='cuda'"
            elif "TensorrtExecutionProvider" not in available_providers():
                why = "this onnxruntime build has no TensorrtExecutionProvider"
            if why:
                warnings.warn(f"backend='tensorrt' requested but {why}; falling back to ONNX Runtime on {device}",
                              RuntimeWarning, stacklevel=2)
            tensorrt = why is None
        return cls(bundle, Engines(device=device, tensorrt=tensorrt, threads=threads), max_length=max_length,
                   cache_scans=cache_scans)

    def _check_graphs(self) -> None:
        if "image_tokens" not in self._vision_outputs:
            raise bundle_reader.BundleError(f"{self.bundle.path('vision')}: no output 'image_tokens' "
                                            f"(has {self._vision_outputs}); export the bundle again")
        if self._seg_decoder is not None:
            source, name = self.seg["image_source"], self.seg["image_input"]
            ok = (name in self._vision_outputs) if source == "vision" else self._seg_encoder is not None
            if not ok:
                raise bundle_reader.BundleError(f"{self.bundle.root}: the seg decoder reads {name!r} from "
                                                f"{source!r}, which the bundle does not provide")
            unknown = sorted(self._seg_inputs - {name, "seg_hidden", "seg_detail"})
            if unknown or (self._seg_reads_detail and self._seg_detail is None):
                # e.g. a decoder that runs the detail path itself, on `images` (export revision 2)
                raise bundle_reader.BundleError(
                    f"{self.bundle.path('seg_decoder')}: inputs {sorted(self._seg_inputs)} are not what this runtime "
                    f"feeds ({name}, seg_hidden, and seg_detail from a seg_detail graph); export the bundle again")

    @staticmethod
    def default_capacity(manifest: Mapping[str, Any]) -> int:
        """KV positions when Pipeline.load gets no max_length: the image tokens, a question of up to
        QUESTION_BUDGET tokens and the bundle's default max_new_tokens, within the model's context. phantom-small:
        32 + 256 + 256 = 544 positions (25 MB of fp32 cache instead of 47 MB at 1024); an official 4B model: 768
        (a quarter less than 1024). A longer answer is cut with a warning (`_fit_context`); pass max_length for
        more."""
        wanted = (int(manifest["image"]["num_tokens"]) + QUESTION_BUDGET
                  + int(manifest["generation"].get("max_new_tokens") or 256))
        return min(int(manifest["decoder"]["context_length"]), wanted)

    def _new_decoder(self) -> Decoder:
        return Decoder(self._decoder_session, self._decoder_spec, self._embeddings, max_length=self._max_length,
                       device=self.engines.device)

    # -- public API ------------------------------------------------------------------------------------------
    @property
    def runs(self) -> dict[str, int]:
        """How often each expensive stage actually ran (the rest came from the scan cache)."""
        with self._runs_lock:
            return dict(self._runs)

    @staticmethod
    def read(scan: Scan) -> Volume:
        """A Volume as it is, or the scan at a path (DICOM folder, .dcm, .nii(.gz), .npy) read with imaging.read;
        unreadable input raises RuntimeInputError."""
        if isinstance(scan, Volume):
            return scan
        if not isinstance(scan, (str, os.PathLike)):
            raise RuntimeInputError(f"expected a Volume or the path of a scan, got {type(scan).__name__}")
        try:
            return imaging.read(scan)
        except ImagingError as e:  # ImagingFileNotFoundError included
            raise RuntimeInputError(f"cannot read the scan: {e}") from e

    def clear_cache(self) -> None:
        """Forget every cached scan (the next question recomputes its features; benchmarks of cold runs use it)."""
        with self._cache_lock:
            self._cache.clear()

    def ask(self, volume: Scan, question: str, *, max_new_tokens: Optional[int] = None,
            do_sample: Optional[bool] = None, top_p: Optional[float] = None, temperature: Optional[float] = None,
            seed: Optional[int] = None, on_text: Optional[Callable[[str], None]] = None,
            logits_processor: Optional[LogitsProcessor] = None) -> Answer:
        """One question about one scan -> Answer. Generation options left None take the bundle's defaults
        (manifest `generation`: greedy, 256 new tokens). on_text receives the text as it is generated.
        logits_processor ((ids so far [t], logits [V]) -> logits [V]) constrains decoding (tests force tokens)."""
        stream = self.stream(volume, question, max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p,
                             temperature=temperature, seed=seed, logits_processor=logits_processor)
        for piece in stream:
            if on_text is not None:
                on_text(piece)
        assert stream.answer is not None
        return stream.answer

    def stream(self, volume: Scan, question: str, *, max_new_tokens: Optional[int] = None,
               do_sample: Optional[bool] = None, top_p: Optional[float] = None, temperature: Optional[float] = None,
               seed: Optional[int] = None, logits_processor: Optional[LogitsProcessor] = None) -> AnswerStream:
        """Like `ask`, but iterate the result for text pieces; its `.answer` is set when iteration ends."""
        options = self._options(max_new_tokens, do_sample, top_p, temperature, seed)
        return AnswerStream(self._answer(volume, question, options, logits_processor))

    def ask_many(self, volume: Scan, questions: Sequence[str], *, batched: bool = True,
                 logits_processors: Optional[Sequence[Optional[LogitsProcessor]]] = None,
                 **options: Any) -> list[Answer]:
        """Several questions about one scan: read once, encoded once, the image prefix computed once. `options` are
        `ask`'s. On the CPU the answers are decoded together (`batched`; one ORT run per step for all of them: the
        same tokens as asking one by one, ~2x faster for four questions); with `on_text`, on a GPU, or with
        batched=False they are asked one by one. logits_processors: one per question (or None)."""
        generation = ("max_new_tokens", "do_sample", "top_p", "temperature", "seed")
        unknown = set(options) - {*generation, "on_text", "logits_processor"}
        if unknown:
            raise TypeError(f"ask_many() got unexpected options {sorted(unknown)}")
        if logits_processors is not None and (len(logits_processors) != len(questions)
                                              or "logits_processor" in options):
            raise ValueError("logits_processors needs one entry per question, and replaces logits_processor")
        timings: dict[str, float] = {}
        vol = self._read_timed(volume, timings)
        processors = list(logits_processors or [options.pop("logits_processor", None)] * len(questions))
        if batched and len(questions) > 1 and options.get("on_text") is None and self._pool[0].cache.host_visible:
            generation_options = self._options(**{k: options.get(k) for k in generation})
            answers = self._answer_batch(vol, list(questions), generation_options, processors)
        else:
            answers = [self.ask(vol, q, logits_processor=p, **options) for q, p in zip(questions, processors)]
        if answers and "read" in timings:  # the read belongs to the first answer
            answers[0] = dataclasses.replace(answers[0], timings={"read": timings["read"], **answers[0].timings})
        return answers

    # -- the flow --------------------------------------------------------------------------------------------
    def _options(self, max_new_tokens, do_sample, top_p, temperature, seed) -> GenerationOptions:
        g = self.generation
        sample = bool(g.get("do_sample", False)) if do_sample is None else do_sample
        try:
            return GenerationOptions(
                max_new_tokens=int(g.get("max_new_tokens", 256)) if max_new_tokens is None else max_new_tokens,
                do_sample=sample,
                top_p=(g.get("top_p") if sample else None) if top_p is None else top_p,
                temperature=float(g.get("temperature", 1.0)) if temperature is None else temperature,
                seed=seed, stop_ids=tuple(self.tokens["eos"]))
        except ValueError as e:
            raise RuntimeInputError(str(e)) from e

    def _answer(self, scan: Scan, question: str, options: GenerationOptions,
                logits_processor: Optional[LogitsProcessor]) -> Generator[str, None, Answer]:
        timings = {stage: 0.0 for stage in STAGES if stage != "read"}
        volume = self._read_timed(scan, timings)
        q = self._prepare(volume, question, options, timings)
        text = TextAssembler(self.tokenizer, self._drop_ids)
        decoder = self._acquire_decoder()
        try:
            start = time.perf_counter()
            embeds, past = self._prompt_embeds(decoder, q)
            stream = decoder.stream(embeds, q.options, seg_token_id=int(self.tokens["seg"]),
                                    logits_processor=logits_processor, past_length=past)
            first_at = None
            for token in stream:
                if first_at is None:
                    first_at = time.perf_counter()
                    timings["prefill"] = first_at - start  # prefix + question + the first token's sampling
                piece = text.push(token)
                if piece:
                    yield piece
            timings["decode"] = time.perf_counter() - (first_at or start)
            generated = stream.result
        finally:
            self._release_decoder(decoder)
        tail = text.flush()
        if tail:
            yield tail
        return self._finish(q, generated, text.text())

    def _answer_batch(self, volume: Volume, questions: list[str], options: GenerationOptions,
                      processors: list[Optional[LogitsProcessor]]) -> list[Answer]:
        """The questions decoded together (DecoderBatch). Timings per answer: its own preprocess (the digest after
        the first), prefill (up to its first token; the rows are prefilled one after another) and seg; `decode` is
        the batched loop's time, the same for every answer (they share it)."""
        timed = [{stage: 0.0 for stage in STAGES if stage != "read"} for _ in questions]
        prepared = [self._prepare(volume, question, options, t) for question, t in zip(questions, timed)]
        capacity = max(q.ids.shape[0] + q.options.max_new_tokens - 1 for q in prepared)
        batch = DecoderBatch(self._decoder_session, self._decoder_spec, self._embeddings, len(prepared),
                             max_length=capacity)
        marks = [time.perf_counter()]
        prompts = [self._prompt_embeds(batch.rows[b], q) for b, q in enumerate(prepared)]
        generated = batch.generate(prompts, [q.options for q in prepared], seg_token_id=int(self.tokens["seg"]),
                                   logits_processors=processors,
                                   on_prefilled=lambda b: marks.append(time.perf_counter()))
        decode = time.perf_counter() - marks[-1]
        answers = []
        for b, (q, gen) in enumerate(zip(prepared, generated)):
            q.timings["prefill"], q.timings["decode"] = marks[b + 1] - marks[b], decode
            text = TextAssembler(self.tokenizer, self._drop_ids)
            for token in gen.ids:
                text.push(token)
            text.flush()
            answers.append(self._finish(q, gen, text.text()))
        return answers

    def _prepare(self, volume: Volume, question: str, options: GenerationOptions,
                 timings: dict[str, float]) -> _Question:
        feats = self._features(volume, timings)
        ids = self._prompt_ids(question)  # [T] int64
        positions = image_positions(ids, self.image["placement"], int(self.image["num_tokens"]),
                                    int(self.tokens["im_patch"]))
        return _Question(question, feats, ids, positions, self._fit_context(ids.shape[0], options), timings)

    def _prompt_embeds(self, decoder: Decoder, q: _Question) -> tuple[np.ndarray, int]:
        """The image prefix put into `decoder`'s cache (when it can be reused) and the rest of the prompt's
        embeddings, image tokens placed: (embeds [1, T - past, H], past)."""
        past = self._restore_prefix(decoder, q.feats, q.ids, q.positions)
        return place_image_tokens(decoder.embed(q.ids[past:]), q.feats.image_tokens, q.positions, start=past), past

    def _finish(self, q: _Question, generated: Generated, answer_text: str) -> Answer:
        mask = mask_box = None
        if generated.seg_hidden is not None and self._seg_decoder is not None:
            t = time.perf_counter()
            mask, mask_box = self._segment(q.feats, generated.seg_hidden)
            q.timings["seg"] = time.perf_counter() - t
        boxes = tuple(self._box(b, q.feats.transform) for b in parse_boxes(answer_text))
        return Answer(question=q.question, text=answer_text, token_ids=tuple(generated.ids), boxes=boxes,
                      mask=mask, mask_box=mask_box, timings=q.timings, stop_reason=generated.stop_reason)

    def _read_timed(self, scan: Scan, timings: dict[str, float]) -> Volume:
        if isinstance(scan, Volume):
            return scan
        t = time.perf_counter()
        volume = self.read(scan)
        timings["read"] = time.perf_counter() - t
        return volume

    def _features(self, volume: Volume, timings: dict[str, float]) -> _ScanFeatures:
        t = time.perf_counter()
        key = volume_key(volume, self.spec)
        with self._cache_lock:
            feats = self._cache.get(key)
            if feats is None:
                feats = self._cache[key] = _ScanFeatures(key)
                while len(self._cache) > self._cache_scans:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        with feats.lock:  # a second thread asking about the same scan waits here instead of encoding it again
            if feats.image_tokens is None:
                try:
                    self._encode(volume, feats, timings, since=t)
                except BaseException:
                    with self._cache_lock:  # leave no half-filled entry behind
                        if self._cache.get(key) is feats:
                            del self._cache[key]
                    raise
            else:
                timings["preprocess"] = time.perf_counter() - t  # the digest only
        return feats

    def _encode(self, volume: Volume, feats: _ScanFeatures, timings: dict[str, float], since: float) -> None:
        if np.issubdtype(volume.array.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(volume.array)))
            if bad:
                raise RuntimeInputError(f"the volume has {bad} NaN or infinite voxels; fix or mask them before "
                                        f"asking (the model input would be undefined)")
        try:
            x, transform = to_model_input(volume, self.spec, out_shape=self.out_shape)  # [1, 1, D, H, W]
        except PreprocessError as e:
            raise RuntimeInputError(f"preprocessing refused the volume {volume.shape}: {e}") from e
        t = time.perf_counter()
        timings["preprocess"] = t - since
        outputs = dict(zip(self._vision_outputs, self._vision.run(self._vision_outputs, {"images": x})))
        timings["vision"] = time.perf_counter() - t
        self._count("vision")
        feats.transform = transform
        feats.image_tokens = outputs["image_tokens"]  # [1, N, H]
        shared = self.seg is not None and self.seg["image_source"] == "vision"
        if shared:
            feats.patch_tokens = outputs[self.seg["image_input"]]  # [1, 2048, C]
        if not shared or self._seg_reads_detail:
            feats.x = x  # a separate seg encoder or a detail path reads the model input again, if a [SEG] comes

    def _prompt_ids(self, question: str) -> np.ndarray:
        if not isinstance(question, str):
            raise RuntimeInputError(f"the question must be a string, got {type(question).__name__}")
        prompt = image_prompt(question, int(self.image["num_tokens"]))
        return np.asarray(self.tokenizer.encode(prompt, add_special_tokens=True).ids, dtype=np.int64)

    def _fit_context(self, prompt_length: int, options: GenerationOptions) -> GenerationOptions:
        capacity = self.context_capacity
        if prompt_length > capacity:
            n = int(self.image["num_tokens"])
            raise RuntimeInputError(
                f"the prompt is {prompt_length} tokens ({n} image + {prompt_length - n} text), more than the "
                f"{capacity} positions this pipeline holds (model context {self._decoder_spec.context_length}); "
                f"shorten the question")
        room = capacity - prompt_length + 1  # the last new token is never fed back
        if options.max_new_tokens > room:
            log.warning("max_new_tokens %d does not fit after a %d-token prompt (capacity %d); generating at most %d",
                        options.max_new_tokens, prompt_length, capacity, room)
            options = GenerationOptions(room, options.do_sample, options.top_p, options.temperature, options.seed,
                                        options.stop_ids)
        return options

    def _restore_prefix(self, decoder: Decoder, feats: _ScanFeatures, ids: np.ndarray,
                        positions: np.ndarray) -> int:
        """Put the prompt's image prefix into the decoder's cache; return how many positions it holds (0: none).

        The prefix ends with the last image token. It is reused when its ids match the ones it was computed for
        (embeddings there depend only on those ids and on the scan's image tokens). At least one prompt position
        is always left for the prefill, whose logits give the first token."""
        length = min(int(positions.max()) + 1, ids.shape[0] - 1)
        if length <= 0 or not decoder.cache.host_visible:
            return 0
        key = tuple(int(i) for i in ids[:length])
        with feats.lock:
            prefix = feats.prefix
        if prefix is not None and prefix.ids[:length] == key:
            decoder.cache.restore(prefix.rows, length)
            self._count("prefix_reused")
            return length
        decoder.reset()
        embeds = place_image_tokens(decoder.embed(ids[:length]), feats.image_tokens, positions)
        decoder.forward(embeds)  # [1, length, H] -> the cache holds positions 0 .. length-1
        rows = decoder.cache.snapshot(length)
        with feats.lock:
            if feats.prefix is None or len(feats.prefix.ids) < length:
                feats.prefix = _Prefix(key, rows)
        self._count("prefix_prefill")
        return length

    def _segment(self, feats: _ScanFeatures, seg_hidden: np.ndarray) -> tuple[Volume, Optional[Box]]:
        """The mask of one [SEG] on the source grid, and the box around it (None: empty), taken on the model grid
        as the official boxes are, so that it reads like a box the model writes."""
        name = self.seg["image_input"]
        with feats.lock:  # what a scan's masks share is computed at its first [SEG], once
            if self.seg["image_source"] == "vision":
                image = feats.patch_tokens
            else:
                if feats.seg_image is None:
                    feats.seg_image = self._seg_encoder.run([name], {"images": feats.x})[0]  # [1, E, 8, 16, 16]
                    self._count("seg_encoder")
                image = feats.seg_image
            if self._seg_reads_detail and feats.seg_detail is None:
                feats.seg_detail = self._seg_detail.run(["seg_detail"], {"images": feats.x})[0]
                self._count("seg_detail")
            feeds = {name: image, "seg_hidden": seg_hidden[None].astype(np.float32)}
            if self._seg_reads_detail:
                feeds["seg_detail"] = feats.seg_detail
            feats.x = None  # no longer needed: free 8 MB per cached scan
        logits = self._seg_decoder.run(["mask_logits"], feeds)[0]  # [1, 1, D, H, W]
        self._count("seg_decoder")
        mask = sigmoid_mask(logits)[0, 0]
        box6 = box_from_mask(mask)
        box = self._box(box6, feats.transform) if box6 is not None else None
        return feats.transform.invert_mask(mask), box

    @staticmethod
    def _box(box6: Sequence[float], transform: Transform) -> Box:
        voxels = transform.box_to_voxels(box6)
        mm = transform.box_to_patient(box6)
        return Box(normalized=tuple(float(v) for v in box6), voxels=tuple(int(v) for v in voxels),
                   patient_mm=(tuple(float(v) for v in mm[0]), tuple(float(v) for v in mm[1])))

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _acquire_decoder(self) -> Decoder:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        return self._new_decoder()  # another thread holds the pooled one(s): one more KV cache

    def _release_decoder(self, decoder: Decoder) -> None:
        with self._pool_lock:
            self._pool.append(decoder)

    def _count(self, name: str) -> None:
        with self._runs_lock:
            self._runs[name] += 1


def _require(bundle: bundle_reader.Bundle, manifest: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise bundle_reader.BundleError(f"{bundle.root / bundle_reader.MANIFEST}: missing {', '.join(missing)}; "
                                        f"export the bundle again with this version of m3d-edge")


def measure(pipeline: Pipeline, scan: Scan, questions: Sequence[str], *, repeat: int = 3,
            max_new_tokens: int = 64) -> dict[str, Any]:
    """Stage timings of `pipeline` over `repeat` runs after one warm-up run (not counted).

    Each run starts cold (scan cache cleared), reads `scan` when it is a path and asks every question, greedy with
    at most `max_new_tokens`. Returns medians in seconds: `cold` per stage for the first question of a run (read,
    preprocess and vision included), `warm` per stage for the later ones (features and image prefix reused),
    `decode_tokens_per_s` (tokens after the first / decode time) and `first_token_s` (everything up to the
    first token, cold and warm)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    rates: list[float] = []
    for run in range(repeat + 1):
        pipeline.clear_cache()
        # one by one: each answer's stages are its own (decoded together, `decode` would be the shared loop's)
        answers = pipeline.ask_many(scan, questions, max_new_tokens=max_new_tokens, batched=False)
        if run == 0:
            continue  # warm-up: ORT's first runs allocate arenas and pick kernels
        cold.append(answers[0].timings)
        warm.extend(a.timings for a in answers[1:])
        rates.extend((len(a.token_ids) - 1) / a.timings["decode"] for a in answers
                     if len(a.token_ids) > 1 and a.timings["decode"] > 0)

    def medians(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = [k for k in ("read", *STAGES[1:]) if any(k in r for r in rows)]
        return {k: float(np.median([r.get(k, 0.0) for r in rows])) for k in keys}

    def first_token(rows: list[dict[str, float]]) -> Optional[float]:
        if not rows:
            return None
        return float(np.median([sum(r.get(k, 0.0) for k in ("read", "preprocess", "vision", "prefill"))
                                for r in rows]))

    return {"repeat": repeat, "questions": list(questions), "max_new_tokens": max_new_tokens,
            "cold": medians(cold), "warm": medians(warm) if warm else {},
            "first_token_s": {"cold": first_token(cold), "warm": first_token(warm)},
            "decode_tokens_per_s": float(np.median(rates)) if rates else None}
