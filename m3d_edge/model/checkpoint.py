"""Checkpoints: official M3D-LaMed folders and our own folders <-> `LaMed`, with strict key checking.

Official folder: config.json (model_type lamed_llama / lamed_phi3) and weights as `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model.bin` (+ index), the latter read with
`torch.load(weights_only=True)` so a pickle holding objects is refused, never executed.

Our folder: config.json (`m3d-edge-config/1`), model.safetensors, and the tokenizer files. Weights are loaded onto
the meta-device model with `assign=True`, so a 7B model is never allocated twice.

Key mapping (official -> ours):
    model.vision_tower.*   -> vision_tower.*         model.mm_projector.*  -> mm_projector.*
    model.seg_module.*     -> seg_module.*           model.seg_projector.* -> seg_projector.*
    model.*  (the LLM)     -> llm.model.*            lm_head.*             -> llm.lm_head.*
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m3d_edge.config import ModelConfig, load_config
from m3d_edge.model import llm as llm_mod
from m3d_edge.model.lamed import LaMed
from m3d_edge.model.lora import MergedLora, with_lora

_MM_PREFIXES = ("vision_tower.", "mm_projector.", "seg_module.", "seg_projector.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the fix."""


def official_to_ours(key: str) -> str:
    if key.startswith("model."):
        rest = key[len("model."):]
        return rest if rest.startswith(_MM_PREFIXES) else "llm.model." + rest
    if key.startswith("lm_head."):
        return "llm." + key
    return key  # unknown keys stay as they are and are reported as unexpected


def ours_to_official(key: str) -> str:
    if key.startswith(_MM_PREFIXES):
        return "model." + key
    if key.startswith("llm."):
        return key[len("llm."):]
    raise KeyError(key)


# -- reading weight files --------------------------------------------------------------------------------------

def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle: the file holds Python objects, not only tensors "
                              f"({str(e).splitlines()[0]}). Only weights-only checkpoints are loaded; convert it to "
                              f"safetensors in a trusted environment") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e}); is the file truncated?") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); is the download truncated?") from e


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, whatever its weight layout."""
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _read_bin)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{folder / shard}: shard listed in {index_name} is missing")
                state.update(reader(folder / shard))
            return state
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _read_bin(folder / "pytorch_model.bin")
    raise CheckpointError(f"{folder}: no weights found (model.safetensors, a safetensors index, or pytorch_model.bin)")


def _tied_keys(model: LaMed) -> set[str]:
    if getattr(model.llm.config, "tie_word_embeddings", False):
        return {"llm.lm_head.weight"}
    return set()


def _file_key(key: str) -> str:
    """Name a key as an official file spells it (for messages about official checkpoints)."""
    try:
        return ours_to_official(key)
    except KeyError:
        return key


def load_into(model: LaMed, state: Mapping[str, torch.Tensor], source: str | Path, *, official: bool = False) -> None:
    """Strict load: every key of the model present, no key left over; shapes must match. Messages name the keys
    as the file does (official names for an official folder)."""
    expected = set(model.state_dict().keys()) - _tied_keys(model)
    given = set(state) - _tied_keys(model)
    name = _file_key if official else str
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        missing, unexpected = [name(k) for k in missing], [name(k) for k in unexpected]
        raise CheckpointError(f"{source}: the weights do not match the model built from its config.\n"
                              f"  missing ({len(missing)}): {_summarise(missing)}\n"
                              f"  unexpected ({len(unexpected)}): {_summarise(unexpected)}\n"
                              f"Check that config.json belongs to these weights.")
    own = model.state_dict()
    bad = [f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(given) if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes do not match the config:\n  " + "\n  ".join(bad[:20]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items() if k in expected},
                          strict=False, assign=True)
    if _tied_keys(model):
        model.llm.tie_weights()


def _summarise(keys: Iterable[str], n: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") if keys else "none"


# -- building and loading models ---------------------------------------------------------------------------------

def build(cfg: ModelConfig, *, pretrained_llm: bool = True, device: Optional[str] = None) -> LaMed:
    """A LaMed for `cfg`. With a pretrained LLM source (smollm2, gguf:, hf:) and `pretrained_llm`, the LLM weights
    are the pretrained ones (plus the M3D tokens, mean-initialised); the rest is randomly initialised."""
    if cfg.llm.source != "config" and pretrained_llm:
        llm = llm_mod.load_pretrained(cfg.llm)
        llm_mod.resize_with_mean(llm, cfg.llm.vocab_size)
        with torch.device(device or "cpu"):
            return LaMed(cfg, llm)
    llm = llm_mod.build_from_config(cfg.llm, device=device)
    with torch.device(device or "cpu"):
        return LaMed(cfg, llm)


def load(path: str | Path) -> LaMed:
    """Load an official M3D-LaMed folder or one of ours. Returns the model in eval mode, float32, on the CPU."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a folder with config.json and weights)")
    try:
        cfg = load_config(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("storage", {}).get("format") == DELTA_FORMAT:
        return _load_delta(folder, cfg, raw["storage"])
    official = raw.get("model_type", "").startswith("lamed_")
    state = read_state_dict(folder)
    if official:
        state = {official_to_ours(k): v for k, v in state.items()}
    model = build(cfg, pretrained_llm=False, device="meta")
    load_into(model, state, folder, official=official)
    _rematerialise_buffers(model)
    return model.eval()


def _rematerialise_buffers(model: LaMed) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in any checkpoint, so after a meta-device build
    they are still meta. Rebuild each module that owns one from its own config, on the CPU."""
    for name, module in list(model.named_modules()):
        own_meta = [b for b in module.buffers(recurse=False) if b.is_meta]
        if own_meta and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, type(module)(config=module.config))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left uninitialised after loading: {_summarise(leftover)}")


def _write_folder(out: Path, state: Mapping[str, torch.Tensor], config: Mapping, tokenizer=None) -> Path:
    """config.json + model.safetensors (+ tokenizer files) written into a temporary sibling folder that is renamed
    to `out` only when complete: an interrupted save leaves no half folder."""
    import shutil

    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save(model: LaMed, path: str | Path, *, tokenizer=None, official: bool = False) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically.

    official=True writes the official flat config and key names, loadable by the official code.
    """
    state = {k: v for k, v in model.state_dict().items() if k not in _tied_keys(model)}
    if official:
        return _write_folder(Path(path), {ours_to_official(k): v for k, v in state.items()}, model.cfg.to_official(),
                             tokenizer)
    return _write_folder(Path(path), state, model.cfg.to_dict(), tokenizer)


def load_clip(path: str | Path):
    """Load an official M3D-CLIP folder (config.json model_type m3d_clip + weights) strictly."""
    from m3d_edge.config import ClipConfig
    from m3d_edge.model.clip import M3DCLIP, build_text_encoder

    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; expected an M3D-CLIP folder")
    d = json.loads(cfg_file.read_text())
    bert_dir = folder / str(d.get("language_model_name_or_path", ""))
    bert = json.loads((bert_dir / "config.json").read_text()) if (bert_dir / "config.json").is_file() else None
    try:
        cfg = ClipConfig.from_official(d, bert)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e
    model = M3DCLIP(cfg, build_text_encoder(cfg))
    state = read_state_dict(folder)
    expected = set(model.state_dict())
    # BERT's position_ids buffer is non-persistent in current transformers and may be absent or present
    given = {k for k in state if not k.endswith("embeddings.position_ids")}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the M3D-CLIP config.\n  missing: {_summarise(missing)}\n"
                              f"  unexpected: {_summarise(unexpected)}")
    model.load_state_dict({k: state[k] for k in given})
    return model.eval()


# -- compact folders: only what differs from the pretrained LLM -------------------------------------------------------

DELTA_FORMAT = "delta-from-base/1"


def save_delta(model: LaMed, path: str | Path, *, adapter: Optional[Mapping[str, torch.Tensor]] = None,
               lora: Optional[Mapping] = None, tokenizer=None, dtype: Optional[torch.dtype] = None) -> Path:
    """Save a model whose LLM is a pretrained base (cfg.llm.source) + merged LoRA + new token rows, storing only
    the difference: vision, projector, seg weights, the new embedding rows and the LoRA adapter (peft keys).

    `load` rebuilds the base, merges the same adapter the same way and so reproduces the saved model bit for bit.
    dtype=torch.float16 stores the floating-point tensors in half precision (half the file; the model that loads
    is the rounded one, and saving that again in float16 reproduces it bit for bit).
    """
    cfg = model.cfg
    if cfg.llm.source == "config":
        raise ValueError("a delta checkpoint needs a pretrained LLM source (smollm2, gguf:, hf:)")
    base_vocab = cfg.im_patch_id
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    state["llm.new_embedding_rows"] = model.embed_tokens.weight[base_vocab:]
    if not getattr(model.llm.config, "tie_word_embeddings", False):
        state["llm.new_lm_head_rows"] = model.base_llm.lm_head.weight[base_vocab:]
    state.update({f"lora.{k}": v for k, v in (adapter or {}).items()})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = {**cfg.to_dict(), "storage": {"format": DELTA_FORMAT, "base_vocab": base_vocab,
                                           "lora": dict(lora) if lora else None,
                                           "dtype": str(dtype).replace("torch.", "") if dtype else "float32"}}
    return _write_folder(Path(path), state, config, tokenizer)


def _load_delta(folder: Path, cfg: ModelConfig, storage: Mapping) -> LaMed:
    from peft import LoraConfig, set_peft_model_state_dict

    # tensors stored in half precision come back as float32, the model's own dtype
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(folder).items()}
    model = build(cfg, pretrained_llm=True)
    base_vocab = int(storage["base_vocab"])
    lora = storage.get("lora")
    if lora:
        adapter = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        model.llm = with_lora(model.llm, LoraConfig(**lora))
        result = set_peft_model_state_dict(model.llm, adapter)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder}: adapter keys the LoRA config does not have: "
                                  f"{_summarise(result.unexpected_keys)}")
        model.llm = model.llm.merge_and_unload()
        model.merged_lora = MergedLora.from_adapter(adapter, lora)
    with torch.no_grad():
        model.embed_tokens.weight[base_vocab:] = state.pop("llm.new_embedding_rows")
        if "llm.new_lm_head_rows" in state:
            model.base_llm.lm_head.weight[base_vocab:] = state.pop("llm.new_lm_head_rows")
    rest = {k: v for k, v in state.items() if not k.startswith("lora.")}
    expected = {k for k in model.state_dict() if not k.startswith("llm.")}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the weights do not match the model built from its config.\n"
                              f"  missing ({len(missing)}): {_summarise(missing)}\n"
                              f"  unexpected ({len(unexpected)}): {_summarise(unexpected)}")
    model.load_state_dict(rest, strict=False)
    return model.eval()
