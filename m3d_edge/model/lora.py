"""A LoRA adapter that has been merged into the LLM, kept beside it so the export can take it apart again.

Merged weights (W + s * B @ A) are what the PyTorch model, the fp32 bundle and the fp16 bundle use. A 4-bit
bundle cannot: phantom-small's update is small (layer 25 q_proj: mean |s * B @ A| 0.004) against half a 4-bit
step of its base (0.026), so quantizing the merged weight rounds the fine-tuning away (measured: every answer
changed). The export quantizes the base instead and adds the adapter back as a float branch (`export.lora`),
which needs the factors this class keeps.

Also `with_lora`, the one place that wraps an LLM with peft adapters (training, and loading a LoRA checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

# peft's state-dict keys: base_model.model.<module in the LLM>.lora_A.weight
_PEFT_PREFIX = "base_model.model."
_UNSUPPORTED = ("use_dora", "fan_in_fan_out")  # peft options that change what a merged adapter means


@dataclass(frozen=True)
class MergedLora:
    scaling: float  # s: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module in the LLM -> (A [r, in], B [out, r])

    @classmethod
    def from_adapter(cls, adapter: Mapping[str, torch.Tensor], config: Mapping) -> "MergedLora":
        """From a peft adapter state dict and its LoraConfig fields (as save_delta stores them)."""
        for option in _UNSUPPORTED:
            if config.get(option):
                raise ValueError(f"LoRA option {option}=True is not supported by the 4-bit export")
        r, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in adapter.items():
            module, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise ValueError(f"adapter key {key!r} is not a LoRA A/B weight")
            pairs.setdefault(module, {})[part[0]] = value.detach().float()
        incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
        if incomplete:
            raise ValueError(f"adapter modules without both A and B: {', '.join(incomplete)}")
        return cls(scaling, {m: (p["A"], p["B"]) for m, p in sorted(pairs.items())})

    def delta(self, module: str) -> torch.Tensor:
        """s * B @ A: what merging added to `module`'s weight [out, in]."""
        a, b = self.factors[module]
        return self.scaling * (b @ a)

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]


def with_lora(llm: torch.nn.Module, config) -> torch.nn.Module:
    """`peft.get_peft_model(llm, config)`, without the FutureWarning that peft's call of transformers'
    `is_gradient_checkpointing` (deprecated in transformers 5) prints on every load of a LoRA checkpoint; the
    warning is about their two versions, not about anything a user can change."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llm, config)
