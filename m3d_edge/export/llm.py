"""The LLM of a LaMed as `decoder.onnx`, plus `embeddings.npy` and `tokenizer.json`.

How the graph is made: onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`, export time only;
the runtime needs plain onnxruntime). Checked on this machine (ort-genai 0.18, ORT 1.32) for Llama, Phi-3 and
SmolLM2, it gives what the runtime needs and a torch.onnx trace of a DynamicCache wrapper does not:

  - `exclude_embeds`: the graph starts at inputs_embeds, where LaMed splices in the image tokens;
  - `include_hidden_states`: the final-normed hidden states come out beside the logits ([SEG] needs them);
  - `prune_lm_head`: the LM head runs on the last position only (a 300-token multimodal prefill would otherwise
    write 300 x V logits for one argmax);
  - GroupQueryAttention (an ORT contrib op) with RoPE inside: when the runtime binds `present.i.*` to the SAME
    OrtValue as `past_key_values.i.*`, ORT's CPU and CUDA kernels see equal buffers and append the new keys and
    values in place, so the KV cache is allocated once and never copied (measured: identical numbers to the
    copying mode, 2e-7 relative to torch). A traced wrapper concatenates past and new keys every step instead;
  - the same builder is the upstream path for CUDA / DirectML / TensorRT-RTX graphs.
Its costs, accepted: no `position_ids` input (GQA derives rotary positions from the attention mask, so prompts
cannot be left-padded; LaMed's generate never pads, spec §3.5); `hidden_states` covers every input position
(the runtime reads the last row); the builder wants a tokenizer in the folder it reads (`stand_in_tokenizer`
gives one to checkpoints that ship none).

Decoder IO contract (L layers, kv KV heads, d head dim, V vocab, H hidden; float32 unless said):

    inputs   inputs_embeds              [B, S, H]        the S new positions (prefill: the whole prompt; decode: 1)
             attention_mask             [B, T]  int64    T = tokens already in the cache + S; all ones (no padding)
             past_key_values.{i}.key    [B, kv, P, d]    i < L; P >= T - S. Rows >= T - S are ignored
             past_key_values.{i}.value  [B, kv, P, d]
    outputs  logits                     [B, 1, V]        for the last position only
             hidden_states              [B, S, H]        after the final norm; row S-1 predicts the next token
             present.{i}.key            [B, kv, max(P, T), d]
             present.{i}.value          [B, kv, max(P, T), d]

In-place cache (what `runtime.decoder` does): allocate one [B, kv, max_len, d] OrtValue per layer and per key /
value, bind it as both `past_key_values.{i}.*` and `present.{i}.*`; each run writes its S new rows at positions
T-S..T-1 of that buffer. Without shared buffers (P = T - S, P = 0 for the first prompt) the graph returns the
concatenated cache, which is also correct, just copied.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from m3d_edge.config import SPECIAL_TOKENS
from m3d_edge.export import import_keeping_logging
from m3d_edge.model.lamed import LaMed

DECODER_FILE = "decoder.onnx"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Phi3ForCausalLM")
# hf_token=false: the builder reads a local folder and must never ask a hub for credentials
_BUILDER_OPTIONS = ("exclude_embeds=true", "include_hidden_states=true", "prune_lm_head=true",
                    f"filename={DECODER_FILE}", "hf_token=false")


class LLMExportError(RuntimeError):
    """The LLM could not be turned into decoder.onnx; the message says why and what to do."""


def export_decoder(model: LaMed, out_dir: str | Path, *, tokenizer=None, verbose: bool = False) -> list[Path]:
    """Write decoder.onnx (+ decoder.onnx.data) for the LLM of `model` into `out_dir`, float32.

    Returns the files written. Quantize afterwards with `export.quantize`. `tokenizer` (a transformers tokenizer)
    is only read by the builder for special-token ids; None uses `stand_in_tokenizer`.
    """
    arch = type(model.llm).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LLMExportError(f"LLM class {arch} is not supported by the export; expected one of "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        builder = import_keeping_logging("onnxruntime_genai.models.builder")
    except ImportError as e:
        raise ImportError("exporting the LLM needs the onnxruntime-genai model builder: "
                          "pip install onnxruntime-genai (export machines only; the runtime does not use it)") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="m3d-llm-") as tmp:
        hf_dir, build_dir, cache_dir = Path(tmp, "hf"), Path(tmp, "onnx"), Path(tmp, "cache")
        log = io.StringIO()
        # The builder prints every step and tensor; keep that for the error message unless `verbose`.
        out_ctx = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log)
        err_ctx = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(log)
        try:
            with out_ctx, err_ctx:
                save_hf_folder(model.llm, hf_dir)
                (tokenizer or stand_in_tokenizer(model)).save_pretrained(hf_dir)
                options = builder.parse_extra_options(None, str(hf_dir), str(build_dir), "fp32", "cpu",
                                                      str(cache_dir), list(_BUILDER_OPTIONS))
                builder.create_model(None, str(hf_dir), str(build_dir), "fp32", "cpu", str(cache_dir), **options)
        except LLMExportError:
            raise
        except Exception as e:  # the builder raises bare Exceptions; re-raise with its log attached
            tail = "\n".join(log.getvalue().splitlines()[-20:])
            raise LLMExportError(f"onnxruntime-genai's builder failed on {arch}: {e}\n{tail}") from e
        written = []
        for name in (DECODER_FILE, DECODER_FILE + ".data"):
            if (build_dir / name).is_file():
                written.append(Path(shutil.move(str(build_dir / name), out_dir / name)))
    if not written or written[0].name != DECODER_FILE:
        raise LLMExportError(f"the builder wrote no {DECODER_FILE} for {arch}")
    return written


def save_hf_folder(llm: torch.nn.Module, folder: Path) -> None:
    """config.json + model.safetensors of a causal LM, for the builder to read.

    Not `save_pretrained`: transformers refuses to save a model it dequantized from GGUF (our SmolLM2), although
    its weights are plain float tensors by then. The GGUF marker is dropped from the config, and a tied LM head is
    left out (it is the embedding; the config's tie_word_embeddings restores it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(llm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(llm).__name__]  # the builder dispatches on it; a GGUF load leaves it empty
    config.save_pretrained(folder)
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v.detach().float().contiguous() for k, v in llm.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def decoder_spec(model: LaMed) -> dict[str, Any]:
    """The numbers the runtime needs to allocate the cache and check a bundle (manifest `decoder` section)."""
    c = model.llm.config
    heads = c.num_attention_heads
    return {"num_layers": c.num_hidden_layers, "num_kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "context_length": c.max_position_embeddings,
            "past_names": ["past_key_values.{i}.key", "past_key_values.{i}.value"],
            "present_names": ["present.{i}.key", "present.{i}.value"]}


def save_embeddings(model: LaMed, path: str | Path) -> Path:
    """The input embedding table [V, H] as float16 .npy: the runtime embeds prompt and generated tokens with it.

    fp16 halves the file; a row is cast back to float32 when looked up, and fp16's 11-bit mantissa moves a
    typical embedding by ~3e-4 relative, far below what changes a greedy token (the test measures it)."""
    table = model.embed_tokens.weight.detach().to(torch.float16).cpu().numpy()  # [V, H]
    path = Path(path)
    np.save(path, table)
    return path


def save_tokenizer_json(tokenizer, path: str | Path) -> Path:
    """tokenizer.json (the `tokenizers` library format, read by the runtime without transformers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise LLMExportError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; the runtime needs "
                             f"tokenizer.json. Convert it with transformers' AutoTokenizer(use_fast=True) first")
    path = Path(path)
    backend.save(str(path))
    return path


def stand_in_tokenizer(model: LaMed):
    """A byte-level tokenizer for checkpoints that ship none (the tiny test models: vocab = 256 bytes + the four
    M3D tokens). It adds BOS when the config has one, so positional image placement (spec §3.3) holds.

    Refuses any other vocabulary size: a made-up tokenizer for a real model would decode garbage silently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    cfg = model.cfg
    vocab_size = cfg.llm.vocab_size
    if vocab_size != 256 + len(SPECIAL_TOKENS) or cfg.im_patch_id != 256:
        raise LLMExportError(f"the checkpoint has no tokenizer files and its vocabulary ({vocab_size}) is not the "
                             f"byte-level test layout (260); put its tokenizer.json in the checkpoint folder")
    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_tokens))}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tk = Tokenizer(models.BPE(vocab, merges=[]))  # no merges: one token per byte
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(SPECIAL_TOKENS[:3]))
    tk.add_tokens([SPECIAL_TOKENS[3]])
    hf = cfg.llm.hf_config
    bos = hf.get("bos_token_id")
    bos_tok = _token_for(vocab, bos)
    if bos_tok is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos_tok} $A", special_tokens=[(bos_tok, bos)])
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos_tok, eos_token=_token_for(vocab, eos))


def _token_for(vocab: dict[str, int], token_id: Optional[int]) -> Optional[str]:
    if token_id is None:
        return None
    return next(t for t, i in vocab.items() if i == token_id)


def tokenizer_adds_bos(tokenizer_json: str | Path) -> Optional[int]:
    """The BOS id that tokenizer.json's post-processor prepends, or None (SmolLM2 adds none)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(tokenizer_json))
    with_special = tk.encode("a", add_special_tokens=True).ids
    plain = tk.encode("a", add_special_tokens=False).ids
    return with_special[0] if len(with_special) > len(plain) and with_special[1:] == plain else None

