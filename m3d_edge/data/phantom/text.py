"""Text ground truth derived from a phantom case: findings report, VQA items, referring expressions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from m3d_edge.data.phantom.anatomy import LABEL, LESION_KINDS, ORGAN_NAMES, Case, Lesion

# ------------------------------------------------------------------------------------------------------------------
# Text: findings report, VQA, referring expressions
# ------------------------------------------------------------------------------------------------------------------

_KIND_NOUN = {"cyst": ("cyst", "simple cyst", "cystic lesion"),
              "hypodense": ("hypodense lesion", "hypoattenuating mass", "low-density lesion"),
              "hyperdense": ("hyperdense lesion", "hyperattenuating mass", "hyperenhancing lesion"),
              "calcification": ("calcification", "calcified focus", "punctate calcification")}
# The canonical answer for the abnormality question (type 4): one string per kind.
ABNORMALITY_ANSWER = {"cyst": "Cyst", "hypodense": "Hypodense mass", "hyperdense": "Hyperdense mass",
                      "calcification": "Calcification", None: "No abnormality"}
_PHASE_ANSWER = {"non-contrast": "Non-contrast", "arterial": "Arterial phase", "portal venous": "Portal venous phase"}
_PLANE_ANSWER = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_ORGAN_QUADRANT = {"liver": "Right upper quadrant", "gallbladder": "Right upper quadrant",
                   "spleen": "Left upper quadrant", "stomach": "Left upper quadrant",
                   "urinary_bladder": "Pelvis", "pancreas": "Retroperitoneum, crossing the midline",
                   "kidney_right": "Right retroperitoneum", "kidney_left": "Left retroperitoneum"}
_EXTRA_ORGANS = ("brain", "thyroid gland", "prostate", "uterus", "femur")


def _size_text(rng: np.random.Generator, mm: float) -> str:
    if mm < 10 or rng.random() < 0.5:
        return f"{mm:.0f} mm"
    return f"{mm / 10:.1f} cm"


def _a(size: str) -> str:
    """The indefinite article for a spoken number: "an 8 mm", "an 11 mm", "an 18 mm", "a 1.8 cm"."""
    number = size.split()[0]
    return "an" if number.startswith("8") or number.split(".")[0] in ("11", "18") else "a"


def _lesion_sentence(rng: np.random.Generator, lesion: Lesion) -> str:
    noun = str(rng.choice(_KIND_NOUN[lesion.kind]))
    size = _size_text(rng, lesion.diameter_mm)
    # absolute HU only where it characterises the lesion (fluid, calcium); masses are described relative to the organ
    hu = f" (about {lesion.hu:.0f} HU)" if lesion.kind in ("cyst", "calcification") and rng.random() < 0.6 else ""
    a = _a(size)
    forms = (f"There is {a} {size} {noun} in the {lesion.location}{hu}.",
             f"{a.capitalize()} {size} {noun} is seen in the {lesion.location}{hu}.",
             f"The {lesion.location} contains {a} {size} {noun}{hu}.",
             f"{noun[0].upper() + noun[1:]} measuring {size} in the {lesion.location}{hu}.")
    return str(rng.choice(forms))


def write_report(case: Case, rng: np.random.Generator) -> str:
    """A findings paragraph: study line, one sentence per lesion, then the visible organs without findings."""
    phase_txt = {"non-contrast": str(rng.choice(["Non-contrast", "Unenhanced"])),
                 "arterial": str(rng.choice(["Arterial phase contrast-enhanced", "Late arterial phase"])),
                 "portal venous": str(rng.choice(["Portal venous phase", "Contrast-enhanced portal venous phase"]))
                 }[case.phase]
    sentences = [f"{phase_txt} CT of the {case.coverage}, {case.plane} images."]
    for lesion in case.lesions:
        sentences.append(_lesion_sentence(rng, lesion))
    abnormal = {l.organ for l in case.lesions}
    normal = [o for o in ("liver", "spleen", "pancreas", "gallbladder", "kidney_right", "kidney_left", "stomach",
                          "urinary_bladder") if o not in abnormal and case.visible(o, 200)]
    if "kidney_right" in normal and "kidney_left" in normal:
        normal = [o for o in normal if not o.startswith("kidney")] + ["kidneys"]
    names = [ORGAN_NAMES.get(o, o) for o in normal]
    if names:
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        verb = "is" if len(names) == 1 and names[0] != "kidneys" else "are"
        sentences.append(str(rng.choice([f"The {listed} {verb} unremarkable.",
                                         f"The {listed} {verb} normal in size and attenuation.",
                                         f"No focal abnormality of the {listed}."])))
    if case.visible("lung", 500):
        sentences.append(str(rng.choice(["The lung bases are clear.", "No consolidation at the lung bases."])))
    if case.visible("aorta", 50):
        sentences.append(str(rng.choice(["The abdominal aorta is normal in calibre.",
                                         "No aortic aneurysm."])))
    if not case.lesions:
        sentences.append(str(rng.choice(["No focal lesion is identified.", "No abnormality is seen."])))
    return " ".join(sentences)


@dataclass(frozen=True)
class VQAItem:
    """One VQA row: question type 1-5 (plane, phase, organ, abnormality, location), the four choices in order
    A-D, the answer text and its letter."""

    question_type: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    answer_choice: str


def _closed(rng: np.random.Generator, qtype: int, question: str, answer: str, pool: Sequence[str],
            letter: int) -> VQAItem:
    """Four choices: the answer at position `letter`, three distinct distractors drawn from `pool`."""
    others = [p for p in dict.fromkeys(pool) if p != answer]
    picks = [others[i] for i in rng.permutation(len(others))[:3]]
    if len(picks) < 3:
        raise ValueError(f"need three distractors for {question!r}; pool has {len(others)}")
    choices = picks[:letter] + [answer] + picks[letter:]
    return VQAItem(qtype, question, tuple(choices), answer, "ABCD"[letter])  # type: ignore[arg-type]


def make_vqa(case: Case, rng: np.random.Generator) -> list[VQAItem]:
    """Five items, one per official question type. The answer letter cycles with the case index so that every
    letter is right equally often; answers themselves follow the balanced case distributions."""
    base = case.index % 4
    items = []
    q = str(rng.choice(["In which plane is this CT image displayed?", "Which plane does this image show?",
                        "What is the imaging plane of this scan?"]))
    items.append(_closed(rng, 1, q, _PLANE_ANSWER[case.plane], list(_PLANE_ANSWER.values()) + ["Oblique"],
                         (base + 0) % 4))
    q = str(rng.choice(["Which contrast phase was this CT acquired in?", "What is the phase of this CT scan?",
                        "In which phase of contrast enhancement was the image taken?"]))
    items.append(_closed(rng, 2, q, _PHASE_ANSWER[case.phase], list(_PHASE_ANSWER.values()) + ["Delayed phase"],
                         (base + 1) % 4))
    # ask about a lesion whose kind is unique in the case, so "the cyst" names one lesion
    kinds_seen = Counter(l.kind for l in case.lesions)
    unique = [l for l in case.lesions if kinds_seen[l.kind] == 1]
    lesion = unique[int(rng.integers(len(unique)))] if unique else None
    lesion_organs = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")
    if lesion is not None:
        noun = _KIND_NOUN[lesion.kind][0]
        q = str(rng.choice([f"Which organ contains the {noun}?", f"In which organ is the {noun} located?"]))
        holders = {l.organ for l in case.lesions if l.kind == lesion.kind}
        pool = [ORGAN_NAMES[o] for o in lesion_organs if o not in holders] + ["stomach", "gallbladder"]
        items.append(_closed(rng, 3, q, ORGAN_NAMES[lesion.organ].capitalize(),
                             [p.capitalize() for p in pool], (base + 2) % 4))
    else:
        present = [o for o in ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach",
                               "urinary_bladder", "heart", "lung") if case.visible(o, 300)]
        absent = [ORGAN_NAMES[o] for o in ("urinary_bladder", "heart", "lung") if not case.visible(o, 30)]
        organ = str(rng.choice(present))
        q = str(rng.choice(["Which of the following organs is included in this scan?",
                            "Which organ can be seen in this image?"]))
        items.append(_closed(rng, 3, q, ORGAN_NAMES[organ].capitalize(),
                             [p.capitalize() for p in absent + list(_EXTRA_ORGANS)], (base + 2) % 4))
    kinds = [ABNORMALITY_ANSWER[k] for k in LESION_KINDS] + [ABNORMALITY_ANSWER[None]]
    # ask about an organ with exactly one lesion (one right answer), else about an organ without any
    per_organ = Counter(l.organ for l in case.lesions)
    single = [l for l in case.lesions if per_organ[l.organ] == 1]
    if single:
        target = single[int(rng.integers(len(single)))]
        organ_name = ORGAN_NAMES[target.organ]
        q = str(rng.choice([f"What abnormality is seen in the {organ_name}?",
                            f"What is the finding in the {organ_name}?"]))
        items.append(_closed(rng, 4, q, ABNORMALITY_ANSWER[target.kind], kinds, (base + 3) % 4))
    else:
        organ = str(rng.choice([o for o in lesion_organs if case.visible(o, 100) and o not in per_organ]
                               or ["stomach"]))  # the stomach never carries a lesion here
        q = str(rng.choice([f"What abnormality is seen in the {ORGAN_NAMES[organ]}?",
                            f"What is the finding in the {ORGAN_NAMES[organ]}?"]))
        items.append(_closed(rng, 4, q, ABNORMALITY_ANSWER[None], kinds, (base + 3) % 4))
    if lesion is not None:
        noun = _KIND_NOUN[lesion.kind][0]
        q = str(rng.choice([f"Where is the {noun} located?", f"What is the location of the {noun}?"]))
        answer = lesion.location[0].upper() + lesion.location[1:]
        pool = ["Right lobe of the liver", "Left lobe of the liver", "Upper pole of the left kidney",
                "Lower pole of the right kidney", "Interpolar region of the left kidney", "Tail of the pancreas",
                "Head of the pancreas", "Upper pole of the spleen", "Lower pole of the spleen",
                "Upper pole of the right kidney", "Body of the pancreas"]
        taken = {l.location[0].upper() + l.location[1:] for l in case.lesions if l.kind == lesion.kind}
        items.append(_closed(rng, 5, q, answer, [p for p in pool if p not in taken], (base + 0) % 4))
    else:
        organ = str(rng.choice([o for o in _ORGAN_QUADRANT if case.visible(o, 300)] or ["liver"]))
        q = str(rng.choice([f"Where is the {ORGAN_NAMES[organ]} located?",
                            f"In which region of the body is the {ORGAN_NAMES[organ]}?"]))
        pool = sorted(set(_ORGAN_QUADRANT.values()) | {"Left lower quadrant", "Posterior mediastinum"})
        items.append(_closed(rng, 5, q, _ORGAN_QUADRANT[organ], pool, (base + 0) % 4))
    return items


@dataclass(frozen=True)
class Referral:
    """One referring-expression item for M3D-RefSeg: region id in the case's region map, question type
    (0 description, 1 reasoning), question, answer (with [SEG]) and the region's report text."""

    region_id: int
    question_type: int
    question: str
    answer: str
    text: str


_REASON = {"cyst": "a benign fluid-filled cyst", "hypodense": "a hypovascular tumour or metastasis",
           "hyperdense": "a hypervascular tumour", "calcification": "a calcified granuloma or stone"}


def make_referrals(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, list[Referral]]:
    """Region map (uint8, z y x; lesions keep their ids, then one visible organ) and two referrals per region."""
    regions = case.lesion_map.copy()
    out: list[Referral] = []
    for lesion in case.lesions:
        noun = _KIND_NOUN[lesion.kind][0]
        desc = f"the {noun} in the {lesion.location}"
        size = f"{lesion.diameter_mm:.0f} mm"
        text = (f"{_a(size).capitalize()} {size} {noun} in the {lesion.location}, "
                f"consistent with {_REASON[lesion.kind]}.")
        out.append(Referral(lesion.region_id, 0,
                            str(rng.choice([f"Please segment {desc}.", f"Can you segment {desc} in this image?",
                                            f"Where is {desc}? Please output the mask."])),
                            str(rng.choice(["It is [SEG].", "Sure, it is [SEG].", f"{desc.capitalize()} is [SEG]."])),
                            text))
        out.append(Referral(lesion.region_id, 1,
                            f"Which finding in the {ORGAN_NAMES[lesion.organ]} could be {_REASON[lesion.kind]}? "
                            "Please segment it.",
                            f"The {lesion.diameter_mm:.0f} mm {noun} in the {lesion.location} [SEG].", text))
    organs = [o for o in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "urinary_bladder")
              if case.visible(o, 300)]
    if organs:
        organ = str(rng.choice(organs))
        rid = len(case.lesions) + 1
        regions[(case.labels == LABEL[organ]) & (regions == 0)] = rid
        name = ORGAN_NAMES[organ]
        out.append(Referral(rid, 0, f"Please segment the {name}.", "It is [SEG].", f"The {name}."))
        out.append(Referral(rid, 1, f"Which organ lies in the {_ORGAN_QUADRANT[organ].lower()}? Please segment it.",
                            f"The {name} [SEG].", f"The {name}."))
    return regions, out
