"""Task prompts and the box text format (spec §7.3, §9).

Prompt layout (no chat template, no system prompt, as the official models were trained):
    inference:  "<im_patch>" * N + question
    training:   "<im_patch>" * N + " " + question + " " + answer        (caption: template + " " + report)

Box text: "<bx_start>" + str([d_min/32, h_min/256, w_min/256, d_max/32, h_max/256, w_max/256]) + "<bx_end>",
each value rounded to 3 decimals and printed with Python's float repr, ", " separated. Values are the min/max
voxel indices (not max+1) of the 32x256x256 grid divided by the axis length; axes are the array axes (D, H, W).

The question phrasings here are ours, written in the style of the official templates, plus the few phrasings the
official demo uses verbatim (the released models expect those).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from m3d_edge.config import BX_END, BX_START, IM_PATCH, SEG

Box = tuple[float, float, float, float, float, float]

# The LLM's tasks in the M3D layouts, as data/datasets reads them: M3D-Bench's eight but image-text retrieval (CLIP's).
TASKS = ("caption", "vqa_closed", "vqa_open", "seg", "rec", "reg", "refseg")

CAPTION = (
    "Please generate a medical report based on this image.",
    "Describe the findings of the medical image you see.",
    "Write a radiology report for this scan.",
    "What are the findings in this CT image? Write them as a report.",
    "Summarise what this image shows in a short report.",
)

SEG_QUESTIONS = (
    "Can you segment the {} in this image? Please output the mask.",
    "Please segment the {} in this image.",
    "Where is the {}? Please output the mask.",
    "Outline the {} in this scan.",
)
SEG_DESC_QUESTIONS = (
    "Can you segment the structure described as follows: {}? Please output the mask.",
    "Please segment this: {}.",
)
SEG_ANSWERS = ("It is [SEG].", "Sure, [SEG].", "Here is the segmentation: [SEG].", "[SEG].")
SEG_DESC_ANSWERS = ("It is the {} [SEG].", "That is the {}: [SEG].")
SEG_NEGATIVE = ("Sorry, there is no {} in this image.", "There is no {} here.")

REC_QUESTIONS = (
    "Where is {} in this image? Please output the box.",
    "Where is the {}? Please output the box.",
    "Please give the bounding box of the {}.",
    "Locate the {} and output its box.",
)
REC_ANSWERS = ("Coordinates are {}.", "The box is {}.", "It is at {}.", "{}")
REC_NEGATIVE = ("Sorry, there is no {} in this image.", "There is no {} here.")

REG_QUESTIONS = (
    "What is in the region {}?",
    "Please describe the structure at {}.",
    "What organ is in {}?",
)
REG_ANSWERS = ("It is the {}.", "The region contains the {}.", "{}.")

_NUM = r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?"
_BOX_RE = re.compile(r"\[\s*(" + _NUM + r")" + r"".join(r"\s*,\s*(" + _NUM + r")" for _ in range(5)) + r"\s*\]")
_BRACKET_RE = re.compile(r"\[[^\[\]]*\]")


class BoxParseError(ValueError):
    pass


def image_prompt(question: str, num_image_tokens: int) -> str:
    """The inference prompt: N image placeholders, then the question (no space, as the official quickstart)."""
    return IM_PATCH * num_image_tokens + question


def training_text(question: str, answer: str, num_image_tokens: int) -> tuple[str, str]:
    """(prompt part, full text) of a training sample; labels cover only what follows the prompt part."""
    prompt = IM_PATCH * num_image_tokens + " " + question
    return prompt, prompt + " " + answer


def closed_vqa_question(question: str, choices: Sequence[str]) -> str:
    if len(choices) != 4:
        raise ValueError(f"closed VQA needs 4 choices, got {len(choices)}")
    return question + " Choices: " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", choices))


# How a closed-VQA answer is written. "letter": the official "B. Liver". "content": the choice text first, then its
# letter ("Liver. Choice B."), our own training format: the first answer token then carries what the model knows
# about the image, and the letter is looked up from the text it just wrote (docs/training.md). Both pass the
# official substring scoring.
CLOSED_VQA_FORMATS = ("letter", "content")


def closed_vqa_answer(letter: str, choice: str, fmt: str = "letter") -> str:
    if fmt == "letter":
        return f"{letter}. {choice}"
    if fmt == "content":
        return f"{choice}. Choice {letter}."
    raise ValueError(f"closed VQA answer format must be one of {', '.join(CLOSED_VQA_FORMATS)}, got {fmt!r}")


def closed_vqa_correct(output: str, letter: str) -> bool:
    """Official scoring (spec §8): the string "<letter>." occurs anywhere in the output."""
    return f"{letter}." in output


def format_box(box: Sequence[float]) -> str:
    """Six normalised values -> "<bx_start>[0.125, 0.332, 0.1, 0.5, 0.7, 0.6]<bx_end>"."""
    values = [round(float(v), 3) for v in box]
    if len(values) != 6:
        raise ValueError(f"a box has 6 values (d,h,w min then max); got {len(values)}")
    return BX_START + str(values) + BX_END


def parse_boxes(text: str, *, strict: bool = False) -> list[Box]:
    """All boxes in a text. Lenient (default): ignore malformed brackets. strict: any bracketed group that is not
    a valid box (6 numbers in [0, 1] with min <= max) raises BoxParseError."""
    boxes: list[Box] = []
    for group in _BRACKET_RE.finditer(text):
        m = _BOX_RE.fullmatch(group.group(0))
        box = tuple(float(v) for v in m.groups()) if m else None
        valid = box is not None and all(0.0 <= v <= 1.0 for v in box) and all(box[i] <= box[i + 3] for i in range(3))
        if valid:
            boxes.append(box)  # type: ignore[arg-type]
        elif strict:
            raise BoxParseError(f"not a box: {group.group(0)!r}; expected [d0, h0, w0, d1, h1, w1] in [0, 1], min <= max")
    return boxes


def box_iou_official(a: Sequence[float], b: Sequence[float]) -> float:
    """M3D-Bench REC "IoU" (spec §8): intersection over the volume of the box enclosing both (+1e-6)."""
    inter = 1.0
    enclose = 1.0
    for i in range(3):
        inter *= max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i]))
        enclose *= max(a[i + 3], b[i + 3]) - min(a[i], b[i])
    return inter / (enclose + 1e-6)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """True 3-D IoU of two boxes given as (min, max) corners."""
    inter, va, vb = 1.0, 1.0, 1.0
    for i in range(3):
        inter *= max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i]))
        va *= a[i + 3] - a[i]
        vb *= b[i + 3] - b[i]
    return inter / (va + vb - inter + 1e-12)


def has_seg(text: str) -> bool:
    return SEG in text


def seg_sample(name: str, rng: random.Random, present: bool = True) -> tuple[str, str]:
    """A (question, answer) pair asking to segment `name`."""
    q = rng.choice(SEG_QUESTIONS).format(name)
    return q, (rng.choice(SEG_ANSWERS) if present else rng.choice(SEG_NEGATIVE).format(name))


def rec_sample(name: str, box: Sequence[float] | None, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair asking for the box of `name` (box None: the structure is absent)."""
    q = rng.choice(REC_QUESTIONS).format(name)
    if box is None:
        return q, rng.choice(REC_NEGATIVE).format(name)
    return q, rng.choice(REC_ANSWERS).format(format_box(box))


def reg_sample(name: str, box: Sequence[float], rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair naming what lies in a box."""
    return rng.choice(REG_QUESTIONS).format(format_box(box)), rng.choice(REG_ANSWERS).format(name)


def caption_question(rng: random.Random) -> str:
    return rng.choice(CAPTION)
