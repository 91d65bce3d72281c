"""Build a bundle: everything the runtime needs to answer questions about a scan, in one verifiable folder.

    bundle/
      manifest.json       format m3d-edge-bundle/1; config, tokens, generation defaults, components, sha256s
      vision.onnx   [+ seg_encoder.onnx] [+ seg_detail.onnx] [+ seg_decoder.onnx]    (export.onnx)
      decoder.onnx (+ decoder.onnx.data)                                 (export.llm, export.quantize)
      embeddings.npy      [V, H] float16
      tokenizer.json

The bundle is written into a hidden temp folder beside `out_dir`, verified with the runtime's own reader, and
renamed into place at the end: a failure leaves nothing behind, and an existing `out_dir` is never touched.
Field by field: docs/export.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from m3d_edge import __version__, calibration
from m3d_edge.export import DEFAULT_LLM, EXPORT_REVISION, LLM_PRECISIONS, checkpoint_digest, reporter
from m3d_edge.config import BX_END, BX_START, IM_PATCH, SEG, preset
from m3d_edge.export import llm as llm_export
from m3d_edge.export import lora as lora_export
from m3d_edge.export import onnx as onnx_export
from m3d_edge.export import quantize
from m3d_edge.model import checkpoint
from m3d_edge.model import llm as llm_model
from m3d_edge.model.lamed import LaMed
from m3d_edge.runtime import bundle as bundle_reader

VISION_PRECISIONS = onnx_export.PRECISIONS
PRESET_PREFIX = "preset:"
# M3D-Bench settings (spec §8): greedy, 256 new tokens.
GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": False, "top_p": None, "temperature": 1.0}


class BundleBuildError(RuntimeError):
    """The bundle could not be built; the message says why. No partial bundle is left."""


@dataclass
class _Source:
    model: LaMed
    tokenizer: Any  # a transformers tokenizer, or None (then the byte-level stand-in is used)
    info: dict[str, Any]


def build(checkpoint_or_model: str | Path | LaMed, out_dir: str | Path, *, llm: str = DEFAULT_LLM,
          vision: str = "fp32", progress: bool = True, tokenizer: Any = None) -> Path:
    """Export `checkpoint_or_model` into the new folder `out_dir` and return its path.

    checkpoint_or_model: a checkpoint folder (ours or official), `preset:<name>` for a random-weights smoke
    export (seeded), or a LaMed in memory. tokenizer: overrides the checkpoint's (a transformers tokenizer).
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the bundle or remove the old one first")
    if llm not in LLM_PRECISIONS:
        raise ValueError(f"llm={llm!r} is not supported; expected one of {', '.join(LLM_PRECISIONS)}")
    if vision not in VISION_PRECISIONS:
        raise ValueError(f"vision={vision!r} is not supported; expected one of {', '.join(VISION_PRECISIONS)}")
    say = reporter(progress)
    source = _load_source(checkpoint_or_model, tokenizer, say)
    model = source.model.eval()
    arch = type(model.llm).__name__
    if arch not in llm_export.SUPPORTED_ARCHITECTURES:
        raise BundleBuildError(f"LLM architecture {arch} cannot be exported; supported: "
                               f"{', '.join(llm_export.SUPPORTED_ARCHITECTURES)}")
    tok = source.tokenizer
    if tok is None:  # before any heavy work: a checkpoint without a usable tokenizer fails here
        try:
            tok = llm_export.stand_in_tokenizer(model)
        except llm_export.LLMExportError as e:
            raise BundleBuildError(str(e)) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        components: dict[str, dict[str, Any]] = {}
        say(f"vision graphs ({vision})")
        for name, path in onnx_export.export_all(model, tmp, precision=vision).items():
            components[name] = {"file": path.name, "precision": vision, **onnx_export.io_signature(path)}
        say(f"decoder ({llm})")
        components["decoder"], quant = _export_decoder(model, tok, tmp, llm)
        say("embeddings and tokenizer")
        llm_export.save_embeddings(model, tmp / "embeddings.npy")
        emb_shape = [model.cfg.llm.vocab_size, model.cfg.llm.hidden_size]
        components["embeddings"] = {"file": "embeddings.npy", "dtype": "float16", "shape": emb_shape}
        llm_export.save_tokenizer_json(tok, tmp / "tokenizer.json")
        components["tokenizer"] = {"file": "tokenizer.json", "stand_in": source.tokenizer is None}
        manifest = _manifest(model, tok, tmp, components, quant, source.info)
        (tmp / bundle_reader.MANIFEST).write_text(json.dumps(manifest, indent=2))
        bundle_reader.load(tmp, verify=True)  # read back with the runtime's reader before publishing
        _publish_permissions(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (llm_export.LLMExportError, lora_export.LoraPlacementError)):
            raise BundleBuildError(str(e)) from e
        raise
    say(f"bundle written: {out}")
    return out


# -- source ------------------------------------------------------------------------------------------------------

def _load_source(spec: str | Path | LaMed, tokenizer: Any, say: Callable[[str], None]) -> _Source:
    if isinstance(spec, LaMed):
        return _Source(spec, tokenizer, {"kind": "in-memory", "name": spec.cfg.name, "sha256": None})
    text = str(spec)
    if text.startswith(PRESET_PREFIX):
        name = text[len(PRESET_PREFIX):]
        cfg = preset(name)  # ValueError names the presets
        say(f"building preset {name} with random weights (seed 0)")
        torch.manual_seed(0)
        model = checkpoint.build(cfg)
        if tokenizer is None and cfg.llm.source != "config":
            tokenizer = llm_model.load_tokenizer(cfg.llm)
        return _Source(model, tokenizer, {"kind": "preset", "name": name, "seed": 0, "sha256": None})
    folder = Path(spec)
    say(f"loading checkpoint {folder}")
    model = checkpoint.load(folder)  # CheckpointError names unknown layouts and bad weights
    if tokenizer is None:
        try:
            tokenizer = llm_model.load_tokenizer(model.cfg.llm, folder)
        except ValueError:  # a random-weights checkpoint without tokenizer files: the stand-in is used
            tokenizer = None
    return _Source(model, tokenizer, {"kind": "checkpoint", "path": str(folder.resolve()),
                                      "sha256": checkpoint_digest(folder)})


# -- decoder -----------------------------------------------------------------------------------------------------

def _export_decoder(model: LaMed, tokenizer: Any, tmp: Path,
                    precision: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    target = tmp / llm_export.DECODER_FILE
    quant = None
    if precision == "fp32":
        llm_export.export_decoder(model, tmp, tokenizer=tokenizer)
    else:
        work = tmp / ".decoder-fp32"
        llm_export.export_decoder(model, work, tokenizer=tokenizer)
        quant = lower_decoder(model, work / llm_export.DECODER_FILE, target, precision, tokenizer=tokenizer)
        shutil.rmtree(work)
    entry = {"file": target.name, "precision": precision, **onnx_export.io_signature(target)}
    return entry, quant


def lower_decoder(model: LaMed, src: Path, dst: Path, precision: str, *, lm_head: Optional[str] = None,
                  tokenizer: Any = None) -> dict[str, Any]:
    """The fp32 decoder.onnx of `model` at `src` -> `precision` (fp16 or int4-*) at `dst` (+ .data); `src` is not
    changed. At 4 bits a merged LoRA goes back to a float branch beside the quantized base first (export.lora),
    except for int4-q41-lora8, which keeps the projections it changed merged and stores them at 8 bits;
    int4-gptq calibrates on scans + prompts (m3d_edge.calibration) made with `tokenizer` (None: the stand-in).
    Returns the manifest's `quantization` record."""
    if precision == "fp16":
        return quantize.decoder_to_fp16(src, dst)
    method = precision.split("-", 1)[1]
    extra: dict[str, Any] = {}
    calibration_feeds = None
    if method == "gptq":
        feeds = calibration.decoder_feeds(model, tokenizer or llm_export.stand_in_tokenizer(model),
                                          llm_export.decoder_spec(model))
        calibration_feeds, extra["calibration"] = feeds.feeds, feeds.record
    lora = model.merged_lora
    import onnx

    if method == "q41-lora8":  # the adapted projections stay merged, at 8 bits; everything else q41
        adapted = ([] if lora is None else
                   lora_export.adapted_matmuls(onnx.load(str(src), load_external_data=False), lora, model.base_llm))
        quant = quantize.quantize_decoder(src, dst, method="q41", lm_head=lm_head, eight_bit=adapted)
        if lora is not None:
            extra["lora"] = lora_export.record(lora, "merged into 8-bit blocks", matmuls=len(adapted))
        return {**quant, **extra, "method": method}
    if lora is None:
        quant = quantize.quantize_decoder(src, dst, method=method, lm_head=lm_head, calibration=calibration_feeds)
        return {**quant, **extra}
    proto = onnx.load(str(src))
    adapter = lora_export.split_adapter(proto, lora, model.base_llm)
    split = dst.parent / ".decoder-lora-apart" / src.name
    split.parent.mkdir(parents=True, exist_ok=True)
    try:
        onnx.save_model(proto, str(split), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=split.name + ".data", size_threshold=1024)
        del proto
        quant = quantize.quantize_decoder(split, dst, method=method, lm_head=lm_head, calibration=calibration_feeds)
    finally:
        shutil.rmtree(split.parent, ignore_errors=True)
    return {**quant, **extra, "lora": adapter}


# -- manifest ----------------------------------------------------------------------------------------------------

def _manifest(model: LaMed, tokenizer: Any, folder: Path, components: dict, quant: Optional[dict],
              source: dict) -> dict[str, Any]:
    cfg = model.cfg
    files = {p.name: {"sha256": bundle_reader.sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != bundle_reader.MANIFEST}
    for comp in components.values():
        data = comp["file"] + ".data"
        if data in files:
            comp["external_data"] = data
    shared = cfg.seg is not None and cfg.seg.share_vision_encoder
    return {
        "format": bundle_reader.FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        # official checkpoints were trained on M3D's min-max + crop-foreground + resize; ours on the CT windowing
        "preprocessing": "m3d" if cfg.name.startswith("official") else "ct",
        "tokens": _special_tokens(cfg, tokenizer, folder / "tokenizer.json"),
        "image": {"placement": cfg.llm.image_placement, "num_tokens": cfg.num_image_tokens,
                  "size": list(cfg.vision.image_size), "channels": cfg.vision.in_channels},
        "seg": None if cfg.seg is None else {
            "shared_vision_encoder": shared,
            # the mask decoder's image input, and the graph whose output of the same name feeds it
            "image_input": "patch_tokens" if shared else "seg_embedding",
            "image_source": "vision" if shared else "seg_encoder",
        },
        "generation": dict(GENERATION_DEFAULTS),
        "decoder": llm_export.decoder_spec(model),
        "components": components,
        "quantization": quant,
        "files": files,
        "provenance": {"source": source,
                       "calibration_sha256": ((quant or {}).get("calibration") or {}).get("sha256"),
                       "libraries": _library_versions(),
                       "python": platform.python_version(), "m3d_edge": __version__,
                       "export_revision": EXPORT_REVISION},
    }


def _special_tokens(cfg, tokenizer, tokenizer_json: Path) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    ids = {}
    for key, token in (("im_patch", IM_PATCH), ("bx_start", BX_START), ("bx_end", BX_END), ("seg", SEG)):
        if token not in vocab:
            raise BundleBuildError(f"the tokenizer has no {token} token; it must carry the four M3D tokens")
        ids[key] = vocab[token]
    if cfg.seg_token_id is not None and ids["seg"] != cfg.seg_token_id:
        raise BundleBuildError(f"tokenizer [SEG] id {ids['seg']} differs from the config's seg_token_id "
                               f"{cfg.seg_token_id}; the tokenizer does not belong to this checkpoint")
    if cfg.im_patch_id is not None and ids["im_patch"] != cfg.im_patch_id:
        raise BundleBuildError(f"tokenizer <im_patch> id {ids['im_patch']} differs from the config's "
                               f"{cfg.im_patch_id}; the tokenizer does not belong to this checkpoint")
    eos = cfg.llm.hf_config.get("eos_token_id")
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return {**ids, "eos": [int(e) for e in eos], "bos": llm_export.tokenizer_adds_bos(tokenizer_json)}


def _publish_permissions(folder: Path) -> None:
    """mkdtemp and onnx's external-data writer create owner-only files; a bundle is meant to be copied and read by
    the service account, so give it the usual umask-derived modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _library_versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "onnxslim", "tokenizers",
                 "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
