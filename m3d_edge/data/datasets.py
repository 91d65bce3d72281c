"""Torch datasets and collators for training (spec §7.3 for the text layout).

A LaMed sample is (image [1, 32, 256, 256] float in [0, 1], question, answer, optional mask [1, 32, 256, 256]).
`LaMedCollator` turns samples into a batch the way the official data pipeline does:

    text   = "<im_patch>" * N + " " + question + " " + answer, then EOS
    labels = -100 over BOS, image placeholders and question (counted by tokenizing the prompt part alone),
             the answer ids and the EOS are labels; padding (right) is -100 with attention 0
    segs   = the mask, or zeros for samples without one (they do not enter the seg loss)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from m3d_edge.data.prompts import training_text


@dataclass(frozen=True)
class LaMedSample:
    image: np.ndarray  # [1, 32, 256, 256] float32 in [0, 1]
    question: str
    answer: str
    mask: Optional[np.ndarray] = None  # [1, 32, 256, 256] {0, 1}
    source: str = ""  # where the sample came from, for error messages


class SampleList(Dataset):
    """A dataset over already-built samples (phantom splits, tests)."""

    def __init__(self, samples: Sequence[LaMedSample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> LaMedSample:
        return self.samples[i]


class LaMedCollator:
    def __init__(self, tokenizer, num_image_tokens: int, image_shape: tuple[int, int, int], max_length: int = 512) -> None:
        self.tok = tokenizer
        self.n = num_image_tokens
        self.image_shape = tuple(image_shape)
        self.max_length = max_length
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the training text ends with one")

    def encode(self, sample: LaMedSample) -> tuple[list[int], list[int]]:
        prompt, full = training_text(sample.question, sample.answer, self.n)
        n_prompt = len(self.tok(prompt).input_ids)
        ids = self.tok(full).input_ids + [self.tok.eos_token_id]
        if len(ids) > self.max_length:
            raise ValueError(f"{sample.source or 'a sample'}: {len(ids)} tokens exceed max_length {self.max_length}; "
                             f"shorten the text or raise max_length")
        labels = [-100] * n_prompt + ids[n_prompt:]
        return ids, labels

    def __call__(self, samples: Sequence[LaMedSample]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s) for s in samples]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            attention[i, :len(ids)] = 1
        images = torch.stack([torch.as_tensor(self._check(s.image, s, "image"), dtype=torch.float32) for s in samples])
        batch = {"images": images, "input_ids": input_ids, "labels": labels, "attention_mask": attention}
        if any(s.mask is not None for s in samples):
            batch["segs"] = torch.stack([
                torch.as_tensor(self._check(s.mask, s, "mask"), dtype=torch.float32) if s.mask is not None
                else torch.zeros((1, *self.image_shape)) for s in samples])
        return batch

    def _check(self, array: np.ndarray, sample: LaMedSample, what: str) -> np.ndarray:
        if tuple(array.shape) != (1, *self.image_shape):
            raise ValueError(f"{sample.source or 'a sample'}: {what} has shape {tuple(array.shape)}, "
                             f"expected {(1, *self.image_shape)}; preprocess it with m3d_edge.preprocess")
        return array
