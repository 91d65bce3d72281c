"""Calibration sets for data-driven quantization: scans + prompts, turned into the inputs a graph sees at run time.

`decoder_feeds` gives GPTQ (export.quantize, method "gptq") what decoder.onnx is fed when it answers: the image
tokens of real-looking scans spliced into prompts of the M3D tasks, plus an answer, as inputs_embeds. Text-only
calibration is known to misjudge a vision-language model's activations (the image tokens' statistics differ from
text's), so every feed carries a scan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# one question per task family; the report question gets the case's own report as its answer
CALIBRATION_QUESTIONS = (
    "Please generate a medical report based on this image.",
    "Which contrast phase was this CT acquired in?",
    "Where is the liver? Please output the box.",
    "Can you segment the liver in this image? Please output the mask.",
)
CALIBRATION_SEED = 30_000  # phantom seed of the calibration scans: disjoint from training (0..) and held-out (20_000)


@dataclass(frozen=True)
class DecoderFeeds:
    feeds: list[dict[str, np.ndarray]]  # decoder.onnx inputs: inputs_embeds, attention_mask, empty past
    record: dict[str, Any]  # for the manifest: what the set is made of and its sha256


def decoder_feeds(model, tokenizer, spec: dict[str, Any], *, n_scans: int = 4, seed: int = CALIBRATION_SEED,
                  questions: Sequence[str] = CALIBRATION_QUESTIONS) -> DecoderFeeds:
    """`n_scans` phantom scans x `questions`, each an image prompt (the model's image tokens placed as at run time)
    followed by the case's report. model: a LaMed; tokenizer: its transformers tokenizer; spec: the decoder graph's
    numbers (`export.llm.decoder_spec(model)`: num_layers, num_kv_heads, head_dim, context_length), passed in so
    that the calibration sets stay below the export that uses them."""
    from m3d_edge.data.phantom import PLANE_ORIENTATION, generate_case, write_report
    from m3d_edge.data.prompts import image_prompt
    from m3d_edge.preprocess import to_model_input

    empty = np.zeros((1, spec["num_kv_heads"], 0, spec["head_dim"]), np.float32)
    feeds, digest, tokens = [], hashlib.sha256(), 0
    model.eval()
    for i in range(n_scans):
        case = generate_case(seed, i)
        x, _ = to_model_input(case.volume, "ct", orientation=PLANE_ORIENTATION[case.plane])
        report = write_report(case, np.random.default_rng(seed + i))
        with torch.no_grad():
            image = model.encode_images(torch.from_numpy(x))
            for question in questions:
                text = image_prompt(question, model.cfg.num_image_tokens) + " " + report
                ids = torch.tensor([tokenizer(text).input_ids[:spec["context_length"]]])  # a long report is cut
                embeds = model.prompt_embeds(ids, image).float().numpy()
                feed = {"inputs_embeds": embeds, "attention_mask": np.ones(ids.shape, np.int64)}
                for layer in range(spec["num_layers"]):
                    feed[f"past_key_values.{layer}.key"] = empty
                    feed[f"past_key_values.{layer}.value"] = empty
                feeds.append(feed)
                digest.update(embeds.tobytes())
                tokens += ids.shape[1]
    record = {"source": f"phantom scans, seed {seed}, cases 0..{n_scans - 1}", "scans": n_scans,
              "prompts_per_scan": len(questions), "feeds": len(feeds), "tokens": tokens,
              "image_tokens_per_feed": model.cfg.num_image_tokens, "sha256": digest.hexdigest()}
    return DecoderFeeds(feeds, record)
