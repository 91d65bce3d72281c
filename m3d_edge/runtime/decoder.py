"""Text generation over decoder.onnx with a KV cache allocated once and updated in place.

numpy + onnxruntime only. The graph contract is in `m3d_edge.export.llm`; in short, one run takes the new
positions' embeddings [1, S, H], an all-ones attention mask [1, T] and the cache, and returns the last position's
logits [1, 1, V], the final-normed hidden states [1, S, H], and the cache with S rows appended. `KVCache` holds
one [1, kv, max_length, d] OrtValue per layer for keys and one for values, and binds each as both the past input
and the present output, so GroupQueryAttention writes the new rows straight into it: no per-step copy of the
cache, no allocation after start-up.

Generation follows LaMed.generate (spec §3.5): greedy or nucleus sampling (seeded numpy Generator), stop ids,
`max_new_tokens`, new tokens only. [SEG] capture uses the official rule: the hidden state computed on generated
token j is kept when token j+1 is [SEG]; several are averaged; a [SEG] as the very first token has no such
state (the prompt's state is never used) and is ignored.

Several questions about one scan decode together (`DecoderBatch`, CPU): each row's prompt is prefilled alone,
then every step runs all rows in one call with a right-padded attention mask, and GroupQueryAttention writes each
row's new keys at that row's own length (tested: the same logits as the rows decoded one by one). A step at batch
4 costs ~1.6x a step at batch 1 on 2 cores (the 4-bit weights are read once for the four rows). Prompts are never
left-padded. With float weights the rows are bit-identical to one-by-one decoding; a 4-bit decoder with int8
activations is not: ORT's one-row and several-row kernels differ in the last bits, which activation rounding can
carry to ~2% of the logits (docs/runtime.md, Measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort

from m3d_edge.runtime.bundle import NpyRows
from m3d_edge.runtime.engines import create_session

# (ids generated so far [t] int64, logits [V] float32) -> logits [V]; e.g. to force tokens in tests
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Default cache capacity: an official prompt (~300 tokens with 256 image tokens) plus 256 new tokens fits, and
# SmolLM2's fp32 cache stays at 47 MB (its 8192-position context would take 377 MB).
DEFAULT_MAX_LENGTH = 1024


# -- sampling: pure functions ----------------------------------------------------------------------------------

def greedy(logits: np.ndarray) -> int:
    """[V] -> the argmax id (the first one on ties, as torch.argmax)."""
    return int(np.argmax(logits))


def top_p_sample(logits: np.ndarray, *, top_p: Optional[float], temperature: float, rng: np.random.Generator) -> int:
    """[V] -> one id from the smallest set of most likely tokens whose mass reaches top_p (all of them if None)."""
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        drop = np.cumsum(sorted_p) - sorted_p > top_p  # tokens whose more likely predecessors already cover top_p
        sorted_p[drop] = 0.0
        p = np.zeros_like(p)
        p[order] = sorted_p
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


# -- options and results ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderSpec:
    """Sizes of the decoder graph (manifest `decoder` section, written by export.llm.decoder_spec)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int

    @classmethod
    def from_manifest(cls, d: Mapping) -> "DecoderSpec":
        return cls(**{k: int(d[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                                              "context_length")})


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    do_sample: bool = False
    top_p: Optional[float] = None
    temperature: float = 1.0
    seed: Optional[int] = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if (self.top_p is not None or self.seed is not None) and not self.do_sample:
            raise ValueError("top_p and seed only apply with do_sample=True")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@dataclass(frozen=True)
class Generated:
    ids: list[int]  # new tokens only, the stop token included when one ended generation
    seg_hidden: Optional[np.ndarray]  # [H] float32: mean of the states that predicted [SEG]; None when none did
    prompt_length: int
    stop_reason: str  # "stop" (a stop id) or "length" (max_new_tokens)


# -- the cache ---------------------------------------------------------------------------------------------------

def _cache_dtype(session: ort.InferenceSession):
    return _NP_TYPES[next(i.type for i in session.get_inputs() if i.name == "past_key_values.0.key")]


def _step_outputs(session: ort.InferenceSession, spec: DecoderSpec, batch: int):
    """Preallocated decode-step outputs: (logits [B, 1, V], hidden [B, 1, H], their OrtValues). Bound once per
    step and read without get_outputs."""
    types = {o.name: _NP_TYPES[o.type] for o in session.get_outputs() if o.name in ("logits", "hidden_states")}
    logits = np.zeros((batch, 1, spec.vocab_size), types["logits"])
    hidden = np.zeros((batch, 1, spec.hidden_size), types["hidden_states"])
    return logits, hidden, [ort.OrtValue.ortvalue_from_numpy(a) for a in (logits, hidden)]


class KVCache:
    """Keys and values of every layer, [batch, kv, max_length, d] each, allocated once on `device`.

    On the CPU each buffer is a numpy array wrapped (not copied) by its OrtValue, so the host can read and write
    rows directly: `snapshot` / `restore` copy a prompt prefix out of and back into the cache (the pipeline keeps
    the image prefix of a scan this way), and `row(b)` is sequence b of a batch as a cache of its own, sharing
    the memory. On a GPU the buffers live in device memory and have no such view. `length` counts the positions
    held by a batch-1 cache (a batch's rows each have their own; `DecoderBatch` keeps them).
    """

    def __init__(self, spec: DecoderSpec, max_length: int, dtype=np.float32, device: str = "cpu",
                 batch: int = 1) -> None:
        shape = (batch, spec.num_kv_heads, max_length, spec.head_dim)
        self.nbytes = 2 * spec.num_layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.max_length = max_length
        self.length = 0  # rows that hold real positions
        if device == "cpu":
            # np.zeros maps pages lazily: memory is taken as positions are written, not for the whole capacity
            self._wrap([(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(spec.num_layers)])
        else:
            self.arrays = None
            self.buffers = [tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
                                  for _ in range(2)) for _ in range(spec.num_layers)]

    def _wrap(self, arrays: list[tuple[np.ndarray, np.ndarray]]) -> None:
        # ortvalue_from_numpy shares a C-contiguous array's memory; the OrtValue keeps the array alive
        self.arrays: Optional[list[tuple[np.ndarray, np.ndarray]]] = arrays
        self.buffers = [tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in pair) for pair in arrays]

    def row(self, b: int) -> "KVCache":
        """Sequence b as a batch-1 cache over the same memory (CPU): its prefill writes straight into the batch."""
        if self.arrays is None:
            raise RuntimeError("the KV cache lives in device memory; row views are only available on the CPU")
        view = KVCache.__new__(KVCache)
        view.nbytes, view.max_length, view.length = self.nbytes // self.arrays[0][0].shape[0], self.max_length, 0
        view._wrap([(k[b:b + 1], v[b:b + 1]) for k, v in self.arrays])  # the batch axis is outermost: contiguous
        return view

    @property
    def host_visible(self) -> bool:
        return self.arrays is not None

    def snapshot(self, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Copies of the first `length` rows of every layer: [(k, v)] each [1, kv, length, d]."""
        if self.arrays is None:
            raise RuntimeError("the KV cache lives in device memory; snapshots are only available on the CPU")
        if not 0 < length <= self.length:
            raise ValueError(f"cannot snapshot {length} rows of a cache holding {self.length}")
        return [(k[:, :, :length].copy(), v[:, :, :length].copy()) for k, v in self.arrays]

    def restore(self, snapshot: Sequence[tuple[np.ndarray, np.ndarray]], length: Optional[int] = None) -> None:
        """Write the first `length` rows of a snapshot (default: all of them) back and make them the cache.

        Keys and values of position p depend only on positions <= p, so any leading part of a snapshot is the
        exact cache of that shorter prefix."""
        if self.arrays is None:
            raise RuntimeError("the KV cache lives in device memory; snapshots are only available on the CPU")
        n = snapshot[0][0].shape[2] if length is None else length
        if not 0 < n <= snapshot[0][0].shape[2] or n > self.max_length or len(snapshot) != len(self.arrays):
            raise ValueError(f"snapshot of {snapshot[0][0].shape[2]} rows x {len(snapshot)} layers cannot restore "
                             f"{n} rows into a cache of {self.max_length} x {len(self.arrays)}")
        for (k, v), (sk, sv) in zip(self.arrays, snapshot):
            k[:, :, :n] = sk[:, :, :n]
            v[:, :, :n] = sv[:, :, :n]
        self.length = n

    def bind(self, binding: ort.IOBinding) -> None:
        for i, (k, v) in enumerate(self.buffers):
            # the same OrtValue as input and output: GroupQueryAttention appends in place
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            binding.bind_ortvalue_output(f"present.{i}.key", k)
            binding.bind_ortvalue_output(f"present.{i}.value", v)

    def output_names(self) -> list[str]:
        """The present outputs in the order `bind` binds them (IOBinding.get_outputs keeps binding order)."""
        return [f"present.{i}.{kv}" for i in range(len(self.buffers)) for kv in ("key", "value")]


# -- the decoder -------------------------------------------------------------------------------------------------

class Decoder:
    """decoder.onnx + the embedding table + one KV cache.

    embeddings: [V, H] array or `NpyRows` (float16 or float32; rows are cast to the graph's input type when looked
    up).
    max_length: cache capacity in positions (prompt + generated); default min(context length, 1024).
    """

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, embeddings: np.ndarray | NpyRows, *,
                 max_length: Optional[int] = None, device: str = "cpu", cache: Optional[KVCache] = None) -> None:
        if embeddings.shape != (spec.vocab_size, spec.hidden_size):
            raise ValueError(f"embedding table {embeddings.shape} does not match the decoder "
                             f"({spec.vocab_size}, {spec.hidden_size})")
        types = {i.name: i.type for i in session.get_inputs()}
        missing = {"inputs_embeds", "attention_mask", "past_key_values.0.key"} - set(types)
        if missing:
            raise ValueError(f"decoder graph lacks inputs {sorted(missing)}; re-export it with m3d_edge.export.llm")
        self.session, self.spec, self.embeddings, self.device = session, spec, embeddings, device
        self.embed_dtype = _NP_TYPES[types["inputs_embeds"]]
        # `cache`: a batch-1 cache to use instead of a new one (a DecoderBatch row)
        self.cache = cache or KVCache(spec, max_length or min(spec.context_length, DEFAULT_MAX_LENGTH),
                                      _cache_dtype(session), device)
        # Bound once: the cache buffers never move (GroupQueryAttention appends in place), so a step only rebinds
        # its embeddings, the attention mask (a view of one preallocated row of ones) and, for one-position
        # steps, preallocated logits / hidden outputs read without get_outputs. Rebinding all 2L cache values and
        # wrapping 2L + 2 outputs on every token cost ~1 ms a step on SmolLM2 (2 cores), ~10% of decode.
        self._binding = session.io_binding()
        self.cache.bind(self._binding)
        self._output_names = self.cache.output_names() + ["logits", "hidden_states"]
        self._mask = np.ones((1, self.cache.max_length), dtype=np.int64)
        self._step_logits, self._step_hidden, self._step_outputs = _step_outputs(session, spec, 1)

    @classmethod
    def from_files(cls, decoder_onnx: str | Path, embeddings_npy: str | Path, spec: DecoderSpec, *,
                   max_length: Optional[int] = None, device: str = "cpu", threads: Optional[int] = None) -> "Decoder":
        session = create_session(decoder_onnx, device=device, threads=threads)
        return cls(session, spec, NpyRows(embeddings_npy), max_length=max_length, device=device)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """ids [n] -> [1, n, H] in the graph's input dtype."""
        return np.asarray(self.embeddings[np.asarray(ids, dtype=np.int64)], dtype=self.embed_dtype)[None]

    def reset(self) -> None:
        self.cache.length = 0  # stale rows need no clearing: the attention mask hides them

    def forward(self, inputs_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run S new positions [1, S, H] and append them to the cache. -> (logits [V], hidden [H] of the last one)."""
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1 or inputs_embeds.shape[2] != self.spec.hidden_size:
            raise ValueError(f"inputs_embeds must be [1, S, {self.spec.hidden_size}], got {list(inputs_embeds.shape)}")
        s = inputs_embeds.shape[1]
        total = self.cache.length + s
        if total > self.cache.max_length:
            raise ValueError(f"{total} positions do not fit the KV cache ({self.cache.max_length}); "
                             f"shorten the prompt or max_new_tokens, or build the Decoder with a larger max_length")
        b = self._binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=self.embed_dtype))
        b.bind_cpu_input("attention_mask", self._mask[:, :total])
        if s == 1:  # a decode step: outputs into the preallocated arrays
            b.bind_ortvalue_output("logits", self._step_outputs[0])
            b.bind_ortvalue_output("hidden_states", self._step_outputs[1])
            self.session.run_with_iobinding(b)
            self.cache.length = total
            return self._step_logits[0, -1].astype(np.float32), self._step_hidden[0, -1].astype(np.float32)
        b.bind_output("logits", "cpu")
        b.bind_output("hidden_states", "cpu")
        self.session.run_with_iobinding(b)
        outputs = dict(zip(self._output_names, b.get_outputs()))
        self.cache.length = total
        logits = outputs["logits"].numpy()[0, -1].astype(np.float32)  # [1, 1, V] -> [V]
        hidden = outputs["hidden_states"].numpy()[0, -1].astype(np.float32)  # [1, S, H] -> [H]
        return logits, hidden

    def stream(self, inputs_embeds: np.ndarray, options: GenerationOptions = GenerationOptions(), *,
               seg_token_id: Optional[int] = None, logits_processor: Optional[LogitsProcessor] = None,
               past_length: int = 0) -> "Stream":
        """Start generating after the prompt [1, T, H] (already assembled: text + image tokens). Iterate the result
        for token ids as they come; its `.result` is the Generated once iteration ends.

        past_length: the cache already holds the prompt's first `past_length` positions (put there with
        `cache.restore`); `inputs_embeds` is then the rest of the prompt, [1, T - past_length, H]."""
        return Stream(self, inputs_embeds, options, seg_token_id, logits_processor, past_length)

    def generate(self, inputs_embeds: np.ndarray, options: GenerationOptions = GenerationOptions(), *,
                 seg_token_id: Optional[int] = None, logits_processor: Optional[LogitsProcessor] = None,
                 on_token: Optional[Callable[[int], None]] = None, past_length: int = 0) -> Generated:
        stream = self.stream(inputs_embeds, options, seg_token_id=seg_token_id, logits_processor=logits_processor,
                             past_length=past_length)
        for token in stream:
            if on_token is not None:
                on_token(token)
        return stream.result


@dataclass
class _SegCapture:
    """Sum and count of the hidden states that predicted [SEG]."""

    total: Optional[np.ndarray] = None
    count: int = 0

    def add(self, hidden: np.ndarray) -> None:
        self.total = hidden.astype(np.float64) if self.total is None else self.total + hidden
        self.count += 1

    def mean(self) -> Optional[np.ndarray]:
        return None if self.count == 0 else (self.total / self.count).astype(np.float32)


class _Row:
    """One sequence's choices, step by step: logits processor, greedy or nucleus sampling (its own seeded
    Generator), [SEG] capture, stop ids and max_new_tokens. `Stream` and `DecoderBatch` both decide through it."""

    def __init__(self, options: GenerationOptions, seg_token_id: Optional[int],
                 logits_processor: Optional[LogitsProcessor], prompt_length: int) -> None:
        self.options, self.seg_token_id, self.logits_processor = options, seg_token_id, logits_processor
        self.prompt_length = prompt_length
        self.rng = np.random.default_rng(options.seed) if options.do_sample else None
        self.stop = set(options.stop_ids)
        self.ids: list[int] = []
        self.seg = _SegCapture()
        self.reason = "length"
        self.done = False

    def take(self, logits: np.ndarray, hidden: np.ndarray) -> int:
        """The next token from the logits the state `hidden` produced; sets `done` when it is the last one (the
        last token is never fed back: its state could only predict a token we will not make)."""
        opts = self.options
        if self.logits_processor is not None:
            logits = self.logits_processor(np.asarray(self.ids, dtype=np.int64), logits)
        token = (top_p_sample(logits, top_p=opts.top_p, temperature=opts.temperature, rng=self.rng)
                 if opts.do_sample else greedy(logits))
        if token == self.seg_token_id and self.ids:  # a state computed on a generated token, not the prompt's
            self.seg.add(hidden)
        self.ids.append(token)
        if token in self.stop:
            self.reason, self.done = "stop", True
        elif len(self.ids) == opts.max_new_tokens:
            self.done = True
        return token

    def result(self) -> Generated:
        return Generated(ids=self.ids, seg_hidden=self.seg.mean(), prompt_length=self.prompt_length,
                         stop_reason=self.reason)


def _start(dec: Decoder, inputs_embeds: np.ndarray, past_length: int, options: GenerationOptions,
           seg_token_id: Optional[int], logits_processor: Optional[LogitsProcessor]) -> tuple[_Row, int]:
    """Prefill a prompt whose first `past_length` positions `dec`'s cache already holds; -> (its _Row, the first
    token). Checks that the prompt and max_new_tokens fit the cache."""
    if past_length > dec.cache.length:
        raise ValueError(f"past_length {past_length} but the cache holds {dec.cache.length} positions; "
                         f"restore the prefix into the cache first")
    prompt_length = past_length + inputs_embeds.shape[1]
    needed = prompt_length + options.max_new_tokens - 1  # the last token is never fed
    if needed > dec.cache.max_length:
        raise ValueError(f"{needed} positions (prompt + max_new_tokens - 1) do not fit the KV cache "
                         f"({dec.cache.max_length}); build the Decoder with a larger max_length")
    row = _Row(options, seg_token_id, logits_processor, prompt_length)
    dec.cache.length = past_length  # 0: a fresh prompt; stale rows need no clearing (the mask hides them)
    return row, row.take(*dec.forward(inputs_embeds))


@dataclass
class Stream:
    """An iterator of generated token ids; `.result` (a Generated) is set when it is exhausted."""

    decoder: Decoder
    inputs_embeds: np.ndarray
    options: GenerationOptions
    seg_token_id: Optional[int]
    logits_processor: Optional[LogitsProcessor]
    past_length: int = 0
    result: Optional[Generated] = field(default=None, init=False)

    def __iter__(self) -> Iterator[int]:
        dec = self.decoder
        row, token = _start(dec, self.inputs_embeds, self.past_length, self.options, self.seg_token_id,
                            self.logits_processor)
        yield token
        while not row.done:
            token = row.take(*dec.forward(dec.embed([token])))
            yield token
        self.result = row.result()


class DecoderBatch:
    """Several sequences decoded together on the CPU, one KV cache [batch, kv, max_length, d] per layer.

    `rows[b]` is a batch-1 Decoder over row b of the cache: the pipeline restores a prefix into it and each
    prompt is prefilled alone (prompts differ in length). Then every step feeds one token per row in one run:
    the attention mask is right-padded (row b: ones for its len_b + 1 positions), from which GroupQueryAttention
    takes each row's length, writes the row's new keys at that position and attends to that row's positions only.
    A finished row keeps being fed at a frozen length (its output is ignored) until every row is done.
    """

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, embeddings: np.ndarray | NpyRows,
                 batch: int, *, max_length: int) -> None:
        self.session, self.spec, self.batch = session, spec, batch
        self.cache = KVCache(spec, max_length, _cache_dtype(session), "cpu", batch=batch)
        self.rows = [Decoder(session, spec, embeddings, cache=self.cache.row(b)) for b in range(batch)]
        self._binding = session.io_binding()
        self.cache.bind(self._binding)
        self._logits, self._hidden, self._outputs = _step_outputs(session, spec, batch)

    def step(self, tokens: Sequence[int], lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Feed token b at position lengths[b] of row b -> (logits [B, V], hidden [B, H]) float32."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.max()) >= self.cache.max_length:
            raise ValueError(f"position {int(lengths.max())} is beyond the KV cache ({self.cache.max_length})")
        mask = (np.arange(int(lengths.max()) + 1) <= lengths[:, None]).astype(np.int64)  # [B, T], right-padded
        embeds = self.rows[0].embed(tokens)[0][:, None]  # [B, 1, H]
        b = self._binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        b.bind_cpu_input("attention_mask", mask)
        b.bind_ortvalue_output("logits", self._outputs[0])
        b.bind_ortvalue_output("hidden_states", self._outputs[1])
        self.session.run_with_iobinding(b)
        return self._logits[:, -1].astype(np.float32), self._hidden[:, -1].astype(np.float32)

    def generate(self, prompts: Sequence[tuple[np.ndarray, int]], options: Sequence[GenerationOptions], *,
                 seg_token_id: Optional[int] = None,
                 logits_processors: Optional[Sequence[Optional[LogitsProcessor]]] = None,
                 on_prefilled: Optional[Callable[[int], None]] = None) -> list[Generated]:
        """prompts[b] = (inputs_embeds [1, S_b, H], past_length_b): row b's cache already holds past_length_b
        positions (restored through rows[b].cache). Same choices as `Decoder.stream` row by row.
        on_prefilled(b) is called when row b's first token is known (for timings)."""
        if len(prompts) != self.batch or len(options) != self.batch:
            raise ValueError(f"{len(prompts)} prompts and {len(options)} option sets for a batch of {self.batch}")
        processors = list(logits_processors or [None] * len(prompts))
        states, tokens, lengths = [], [], []
        for b, ((embeds, past), opts) in enumerate(zip(prompts, options)):
            row, token = _start(self.rows[b], embeds, past, opts, seg_token_id, processors[b])
            if on_prefilled is not None:
                on_prefilled(b)
            states.append(row)
            tokens.append(token)
            lengths.append(row.prompt_length)
        last = self.cache.max_length - 1
        while not all(row.done for row in states):
            # a finished row is fed at its frozen length, or at the last position when it ended right at the cache's
            # end (its own room check allows that); what it writes there is never read
            logits, hidden = self.step(tokens, [n if not row.done else min(n, last) for n, row in zip(lengths, states)])
            for b, row in enumerate(states):
                if not row.done:
                    lengths[b] += 1
                    tokens[b] = row.take(logits[b], hidden[b])
        return [row.result() for row in states]
