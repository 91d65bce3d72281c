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

from m3d_edge.data.prompts import TASKS, training_text


@dataclass(frozen=True)
class LaMedSample:
    image: Optional[np.ndarray]  # [1, 32, 256, 256] float32 in [0, 1]; None where a stage uses cached features
    question: str
    answer: str
    mask: Optional[np.ndarray] = None  # [1, 32, 256, 256] {0, 1}
    source: str = ""  # where the sample came from, for error messages
    image_key: str = ""  # the image's file, the key of cached vision features


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
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        with_image = [s.image is not None for s in samples]
        if all(with_image):
            batch["images"] = torch.stack([torch.as_tensor(self._check(s.image, s, "image"), dtype=torch.float32)
                                           for s in samples])
        elif any(with_image):
            raise ValueError("a batch mixes samples with and without images; a stage either reads images or uses "
                             "cached features for all of them")
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


# -- the eight tasks over the M3D layouts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    """One training or evaluation sample, by reference (arrays are read when the item is used).

    image: a model-input .npy [1, 32, 256, 256] (or, for refseg, a ct.nii.gz preprocessed on load)
    mask:  a model-grid mask .npy (seg) or a mask.nii.gz whose region `mask_id` is the target (refseg)
    target: what scoring needs (the answer letter, the box, the class name), as text
    """

    task: str
    image: str
    question: str
    answer: str
    mask: Optional[str] = None
    mask_id: Optional[int] = None
    target: str = ""


def task_items(root, split: str, tasks: Sequence[str] = TASKS, *, seed: int = 0,
               seg_code: Optional[str] = None) -> list[TaskItem]:
    """All samples of `split` for `tasks`, read from the M3D layouts under `root` (phantom or real M3D-Data).

    Every referenced file must exist (the readers check), so a broken data set fails here, before training.
    Phrasings are drawn from data.prompts with a seeded RNG, so a split always yields the same samples.
    """
    import random
    from pathlib import Path

    from m3d_edge.data import m3d_formats as fmt
    from m3d_edge.data import prompts as P

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    root = Path(root)
    rng = random.Random(f"{seed}-{split}")
    items: list[TaskItem] = []
    vqa_split = {"validation": "val"}.get(split, split)
    if "caption" in tasks:
        for c in fmt.read_cap(root, split):
            items.append(TaskItem("caption", str(c.image_path), P.caption_question(rng), c.report.strip()))
    if {"vqa_closed", "vqa_open"} & set(tasks):
        for r in fmt.read_vqa(root, vqa_split):
            image = str(root / r.image_path)
            if "vqa_closed" in tasks:
                q = P.closed_vqa_question(r.question, [r.choice_a, r.choice_b, r.choice_c, r.choice_d])
                items.append(TaskItem("vqa_closed", image, q, P.closed_vqa_answer(r.answer_choice, r.answer),
                                      target=r.answer_choice))
            if "vqa_open" in tasks:
                items.append(TaskItem("vqa_open", image, r.question, str(r.answer), target=str(r.answer)))
    if {"seg", "rec", "reg"} & set(tasks):
        codes = [seg_code] if seg_code else sorted(p.name for p in (root / fmt.SEG_DIR).iterdir() if p.is_dir())
        for code in codes:
            for s in fmt.read_seg(root, code, split):
                image, mask = str(root / fmt.SEG_DIR / s.image), str(root / fmt.SEG_DIR / s.label)
                box = _model_box(mask)
                name = s.class_name
                if "seg" in tasks:
                    q, a = P.seg_sample(name, rng, present=box is not None)
                    items.append(TaskItem("seg", image, q, a, mask if box is not None else None, target=name))
                if "rec" in tasks:
                    q, a = P.rec_sample(name, box, rng)
                    items.append(TaskItem("rec", image, q, a, target=str(box) if box else ""))
                if "reg" in tasks and box is not None:
                    q, a = P.reg_sample(name, box, rng)
                    items.append(TaskItem("reg", image, q, a, target=name))
    if "refseg" in tasks:
        refseg_split = {"validation": "val"}.get(split, split)
        for r in fmt.read_refseg(root, refseg_split):
            base = root / fmt.REFSEG_DIR
            items.append(TaskItem("refseg", str(base / r.image), r.question, r.answer, str(base / r.mask), r.mask_id,
                                  target=r.answer))
    return items


def with_closed_vqa_format(items: Sequence[TaskItem], fmt: str) -> list[TaskItem]:
    """The items with every closed-VQA answer rewritten in `fmt` (data.prompts.CLOSED_VQA_FORMATS); the others
    unchanged. The answers must be in the official form "<letter>. <choice>" that `task_items` writes."""
    from dataclasses import replace

    from m3d_edge.data.prompts import closed_vqa_answer

    closed_vqa_answer("A", "x", fmt)  # an unknown format fails here, before any item is touched
    out = []
    for it in items:
        if it.task == "vqa_closed" and fmt != "letter":
            prefix = f"{it.target}. "
            if not it.answer.startswith(prefix):
                raise ValueError(f"{it.image}: closed-VQA answer {it.answer!r} does not start with its letter "
                                 f"{prefix!r}")
            it = replace(it, answer=closed_vqa_answer(it.target, it.answer[len(prefix):], fmt))
        out.append(it)
    return out


def _model_box(mask_path: str) -> Optional[list[float]]:
    from m3d_edge.preprocess import box_from_mask

    mask = np.load(mask_path, mmap_mode="r")
    if mask.size == 1:  # official empty-class marker [1, 1, 1, 1]
        return None
    return box_from_mask(np.asarray(mask[0]))


class TaskDataset(Dataset):
    """TaskItems -> LaMedSamples, reading arrays on access (refseg scans are preprocessed with the `ct` spec)."""

    def __init__(self, items: Sequence[TaskItem], image_shape: tuple[int, int, int] = (32, 256, 256), *,
                 with_images: bool = True) -> None:
        self.items = list(items)
        self.image_shape = tuple(image_shape)
        self.with_images = with_images  # False: a stage with cached vision features reads masks and text only

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        """The model input [1, D, H, W] float32 of item i alone (no mask, no text): what a feature cache needs."""
        it = self.items[i]
        if it.task == "refseg":
            return self._refseg_input(it)[0][0]
        return np.load(it.image).astype(np.float32, copy=False)

    def _refseg_input(self, it: TaskItem):
        from m3d_edge.imaging import read
        from m3d_edge.preprocess import to_model_input

        return to_model_input(read(it.image), "ct", out_shape=self.image_shape)  # (x [1, 1, D, H, W], Transform)

    def __getitem__(self, i: int) -> LaMedSample:
        it = self.items[i]
        if it.task == "refseg":
            from m3d_edge.imaging import read

            x, transform = self._refseg_input(it)
            region = read(it.mask).array == it.mask_id
            mask = transform.mask_to_model(region)[None].astype(np.float32)
            return LaMedSample(x[0] if self.with_images else None, it.question, it.answer, mask, source=it.mask,
                               image_key=it.image)
        image = self.image(i) if self.with_images else None
        mask = None
        if it.mask is not None:
            mask = np.load(it.mask).astype(np.float32)
        return LaMedSample(image, it.question, it.answer, mask, source=it.image, image_key=it.image)


def validate_items(items: Sequence[TaskItem], image_shape: tuple[int, int, int] = (32, 256, 256)) -> None:
    """Check every image and mask header before training starts (cheap: .npy headers are read, not the data)."""
    from pathlib import Path

    expected = (1, *image_shape)
    for it in items:
        for path in (it.image, it.mask):
            if path is None:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: referenced by a {it.task} sample but missing")
            if path.endswith(".npy"):
                shape = np.load(path, mmap_mode="r").shape
                if shape != expected and not (path == it.mask and shape == (1, 1, 1, 1)):
                    raise ValueError(f"{path}: shape {shape}, expected {expected} (a {it.task} sample); "
                                     f"regenerate it with m3d_edge.preprocess")
        if not it.answer.strip():
            raise ValueError(f"{it.image}: a {it.task} sample has an empty answer")
