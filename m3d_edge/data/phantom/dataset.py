"""Writing a phantom dataset in the M3D layouts, with answer distributions and constant-answer baselines.

`synthesize` writes the cases in the official M3D layouts (see `m3d_formats`) plus a stats JSON with the answer
distributions and the constant-answer baseline of every task; `load_stats` / `format_baselines` read it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from m3d_edge.data.phantom.anatomy import (_SEG_SOURCE, DEFAULT_TEMPLATE_DIR, PLANE_ORIENTATION, SEG_CLASSES, Case,
                                           generate_case)
from m3d_edge.data.phantom.text import VQAItem, make_referrals, make_vqa, write_report
from m3d_edge.data.prompts import box_iou_official

# ------------------------------------------------------------------------------------------------------------------
# Baselines: what a model that always gives the same answer scores
# ------------------------------------------------------------------------------------------------------------------

def majority_fraction(answers: Sequence[Any]) -> float:
    """Share of the most common answer (0.0 for no answers): the accuracy of always giving it."""
    if not answers:
        return 0.0
    return Counter(answers).most_common(1)[0][1] / len(answers)


def soft_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """The official Dice (spec §4 loss / §8): 2 sum(p t) / (sum p + sum t + 1)."""
    p, t = pred.astype(np.float64), target.astype(np.float64)
    return float(2 * (p * t).sum() / (p.sum() + t.sum() + 1))


@dataclass
class _SplitStats:
    """What `synthesize` remembers of a split to compute its answer distributions and baselines."""

    reports: list[str] = field(default_factory=list)
    vqa: list[VQAItem] = field(default_factory=list)
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # class -> model-grid boxes of present masks
    small_masks: dict[str, list[np.ndarray]] = field(default_factory=dict)  # class -> [8, 64, 64] bool
    res_masks: list[np.ndarray] = field(default_factory=list)  # referral targets, [8, 64, 64] bool
    phases: list[str] = field(default_factory=list)
    planes: list[str] = field(default_factory=list)
    lesion_kinds: list[str] = field(default_factory=list)
    n_lesions: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.reports)
        by_type: dict[int, list[VQAItem]] = {}
        for it in self.vqa:
            by_type.setdefault(it.question_type, []).append(it)
        closed = {str(t): majority_fraction([i.answer_choice for i in items]) for t, items in sorted(by_type.items())}
        open_ = {str(t): majority_fraction([i.answer for i in items]) for t, items in sorted(by_type.items())}
        n_q = max(len(self.vqa), 1)
        open_all = sum(open_[str(t)] * len(items) for t, items in by_type.items()) / n_q
        rec, seg = {}, {}
        for name, boxes in self.boxes.items():
            mean_box = np.mean(np.asarray(boxes), axis=0)
            rec[name] = float(np.mean([box_iou_official(mean_box, b) for b in boxes]))
        for name, masks in self.small_masks.items():
            const = np.mean(masks, axis=0) > 0.5  # voxelwise majority over the split
            seg[name] = float(np.mean([soft_dice(const, m) for m in masks]))
        present = [name for name, boxes in self.boxes.items() for _ in boxes]
        res_const = np.mean(self.res_masks, axis=0) > 0.5 if self.res_masks else None
        res = float(np.mean([soft_dice(res_const, m) for m in self.res_masks])) if self.res_masks else 0.0
        return {
            "cases": n,
            "phases": dict(Counter(self.phases)), "planes": dict(Counter(self.planes)),
            "lesion_kinds": dict(Counter(self.lesion_kinds)), "lesions_per_case": dict(Counter(self.n_lesions)),
            "organ_shape_sources": dict(Counter(self.sources)),
            "vqa_answers": {str(t): dict(Counter(i.answer for i in items)) for t, items in sorted(by_type.items())},
            "baselines": {
                "1_retrieval_chance_R@1": 1.0 / n if n else 0.0,
                "2_report_majority_identical": majority_fraction(self.reports),
                "3_closed_vqa_majority_letter": majority_fraction([i.answer_choice for i in self.vqa]),
                "3_closed_vqa_majority_letter_by_type": closed,
                "4_open_vqa_majority_answer": open_all,
                "4_open_vqa_majority_answer_by_type": open_,
                "5_rec_constant_box_iou": rec,
                "6_reg_majority_class": majority_fraction(present),
                "7_seg_constant_mask_dice": seg,
                "8_res_constant_mask_dice": res,
            },
        }


def _small(mask: np.ndarray) -> np.ndarray:
    """Model-grid mask [32, 256, 256] -> [8, 64, 64] bool (any voxel of each 4x4x4 block), for baselines only."""
    return mask.reshape(8, 4, 64, 4, 64, 4).any(axis=(1, 3, 5))


def format_baselines(stats: dict[str, Any]) -> str:
    """Human-readable table of the per-split baselines in a stats dict from `synthesize`."""
    lines = []
    for split, s in stats["splits"].items():
        b = s["baselines"]
        n_q = sum(sum(v.values()) for v in s["vqa_answers"].values())
        lines.append(f"{split}: {s['cases']} cases, {n_q} VQA questions")
        by_type = ", ".join(f"{k}:{v:.2f}" for k, v in b["4_open_vqa_majority_answer_by_type"].items())
        lines.append(f"  closed VQA majority letter {b['3_closed_vqa_majority_letter']:.3f}  "
                     f"open VQA majority answer {b['4_open_vqa_majority_answer']:.3f}  (by type: {by_type})")
        rec = b["5_rec_constant_box_iou"]
        seg = b["7_seg_constant_mask_dice"]
        lines.append(f"  report identical {b['2_report_majority_identical']:.3f}  retrieval chance R@1 "
                     f"{b['1_retrieval_chance_R@1']:.3f}  REG majority class {b['6_reg_majority_class']:.3f}  "
                     f"RES constant Dice {b['8_res_constant_mask_dice']:.3f}")
        if rec:
            lines.append(f"  REC constant-box IoU mean {np.mean(list(rec.values())):.3f}  "
                         f"SS constant-mask Dice mean {np.mean(list(seg.values())):.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Writing a dataset
# ------------------------------------------------------------------------------------------------------------------

SEG_CODE = "9000"  # our M3D-Seg subset code, outside the official 0000-0025
CAP_GROUP = "phantom"  # M3D_Cap_npy/<group>/<case>/<series>.npy, like the official ct_case / ct_quizze
_BASELINE_CAP = 500  # cases per split kept in memory for the mask baselines (8x64x64 per class)


def _split_sizes(n: int, splits: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    """Integer split sizes that add up to n (largest remainders)."""
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    names = [s for s, _ in splits]
    if len(set(names)) != len(names) or any(s not in ("train", "val", "test") for s in names):
        raise ValueError(f"split names must be distinct, from train/val/test; got {names}")
    fr = np.asarray([f for _, f in splits], float)
    if np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum; got {list(fr)}")
    raw = fr / fr.sum() * n
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes))[: n - sizes.sum()]:
        sizes[i] += 1
    return list(zip(names, sizes.tolist()))


def _write_case(root: Path, case: Case, stats: _SplitStats, cap: list, vqa: list, refseg: list,
                keep_masks: bool) -> None:
    """Everything one case contributes: Cap image + report, VQA rows, Seg image + masks, RefSeg files."""
    from m3d_edge.data import m3d_formats as fmt
    from m3d_edge.preprocess import box_from_mask, to_model_input

    rng = np.random.default_rng([int(case.volume.meta["seed"]), case.index, 1])
    report = write_report(case, rng)
    items = make_vqa(case, rng)
    regions, referrals = make_referrals(case, rng)

    series = f"{case.plane}_{case.phase.replace(' ', '_').replace('-', '_')}"
    rel_dir = f"{fmt.CAP_DIR}/{CAP_GROUP}/{case.case_id}"
    x_plane, _ = to_model_input(case.volume, "ct", orientation=PLANE_ORIENTATION[case.plane])
    fmt.save_image(root / rel_dir / f"{series}.npy", x_plane)
    fmt.write_text(root / rel_dir / "text.txt", report)
    cap.append(fmt.CapRecord(f"{rel_dir}/{series}.npy", f"{rel_dir}/text.txt"))
    for it in items:
        vqa.append(fmt.VQARecord(f"{rel_dir}/{series}.npy", report, it.question_type, it.question, *it.choices,
                                 it.answer, it.answer_choice))

    x_axial, tf = to_model_input(case.volume, "ct")  # axial image and the Transform that maps the masks
    masks = []
    for name, source in zip(SEG_CLASSES, _SEG_SOURCE):
        m = tf.mask_to_model(case.mask(source))  # [32, 256, 256] uint8
        present = bool(m.any())
        masks.append(m if present else None)
        if present:
            stats.boxes.setdefault(name, []).append(box_from_mask(m))
            if keep_masks:
                stats.small_masks.setdefault(name, []).append(_small(m > 0))
    fmt.write_seg_case(root, SEG_CODE, case.case_id, x_axial, masks)

    rel_ct, rel_mask = fmt.write_refseg_case(root, case.case_id, case.volume, regions,
                                             {r.region_id: r.text for r in referrals})
    for r in referrals:
        refseg.append(fmt.RefSegRecord(rel_ct, rel_mask, r.region_id, r.question_type, r.question, r.answer))
        if keep_masks and r.question_type == 0:
            stats.res_masks.append(_small(tf.mask_to_model(regions == r.region_id) > 0))

    stats.reports.append(report)
    stats.vqa.extend(items)
    stats.phases.append(case.phase)
    stats.planes.append(case.plane)
    stats.lesion_kinds.extend(l.kind for l in case.lesions)
    stats.n_lesions.append(len(case.lesions))
    stats.sources.extend(case.shape_source.values())


def synthesize(out_dir: str | os.PathLike, n: int, seed: int, *,
               splits: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.1), ("test", 0.1)),
               progress: bool = True, template_dir: Path | str | None = DEFAULT_TEMPLATE_DIR,
               n_scan_copies: int = 2) -> Path:
    """Generate `n` phantom cases (deterministic from `seed`) and write them to `out_dir` in the M3D layouts.

    Writes M3D_Cap_npy (images + reports, M3D_Cap.json), M3D-VQA CSVs, M3D_Seg_npy/9000 (axial image, one mask
    per class of `SEG_CLASSES`), M3D_RefSeg (NIfTI scans, region masks, texts, CSVs), DICOM and NIfTI copies of the
    first `n_scan_copies` scans under scans/, and stats.json (answer distributions and constant-answer baselines
    per split). Everything goes to a temporary folder next to `out_dir`, renamed at the end, so a crash leaves no
    half-written dataset. Refuses an existing `out_dir`.
    """
    from m3d_edge.data import m3d_formats as fmt

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder or delete it first")
    sizes = _split_sizes(n, splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        per_split: dict[str, _SplitStats] = {}
        cap: dict[str, list] = {}
        vqa: dict[str, list] = {}
        refseg: dict[str, list] = {}
        cases_by_split: dict[str, list[str]] = {}
        order = [(name, i) for name, size in sizes for i in range(size)]
        bar = _progress(len(order), progress)
        for index, (split, k) in enumerate(order):
            case = generate_case(seed, index, case_id=f"case_{index:05d}", template_dir=template_dir)
            stats = per_split.setdefault(split, _SplitStats())
            _write_case(tmp, case, stats, cap.setdefault(split, []), vqa.setdefault(split, []),
                        refseg.setdefault(split, []), keep_masks=k < _BASELINE_CAP)
            cases_by_split.setdefault(split, []).append(case.case_id)
            if index < n_scan_copies:
                from m3d_edge.imaging import write_nifti, write_series

                write_series(case.volume, tmp / "scans" / "dicom" / case.case_id,
                             series_description=f"M3D-Edge phantom {case.phase}")
                (tmp / "scans" / "nifti").mkdir(parents=True, exist_ok=True)
                write_nifti(case.volume, tmp / "scans" / "nifti" / f"{case.case_id}.nii.gz")
            bar(1)
        bar(None)
        cap_names = {"train": "train", "val": "validation", "test": "test"}
        fmt.write_cap_index(tmp, {cap_names[s]: recs for s, recs in cap.items()})
        for s, recs in vqa.items():
            fmt.write_vqa(tmp, s, recs)
        for s, recs in refseg.items():
            fmt.write_refseg(tmp, s, recs)
        seg_splits = {s: c for s, c in cases_by_split.items() if s != "val"}
        if "val" in cases_by_split:
            seg_splits["validation"] = cases_by_split["val"]
        fmt.write_seg_index(tmp, SEG_CODE, SEG_CLASSES, seg_splits)
        elapsed = time.perf_counter() - t0
        stats_doc = {"format": "m3d-edge-phantom/1", "seed": int(seed), "n": int(n),
                     "seconds": round(elapsed, 1), "seconds_per_case": round(elapsed / max(n, 1), 3),
                     "template": str(template_dir) if template_dir is not None else None,
                     "seg_code": SEG_CODE, "seg_classes": list(SEG_CLASSES),
                     "splits": {s: st.summary() for s, st in per_split.items()}}
        (tmp / "stats.json").write_text(json.dumps(stats_doc, indent=1), encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    """A tqdm bar as a function: bar(k) advances by k, bar(None) closes it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="phantoms", unit="case", disable=not enabled)

    def step(k: int | None) -> None:
        if k is None:
            bar.close()
        else:
            bar.update(k)

    return step


def load_stats(out_dir: str | os.PathLike) -> dict[str, Any]:
    """stats.json of a dataset written by `synthesize`."""
    path = Path(out_dir) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {out_dir} a folder written by synthesize?")
    return json.loads(path.read_text(encoding="utf-8"))
