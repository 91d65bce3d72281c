"""The CT phantom: HU against the literature table, mask volumes, determinism, lesions in reports, balanced
answers, atomic dataset writing and the `synth` command."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from m3d_edge.cli import main
from m3d_edge.data import phantom as P

from conftest import TOTALSEG as TEMPLATE


@pytest.fixture(scope="module")
def cases() -> list[P.Case]:
    # one case per phase, then three free ones; seed 11 gives a mix of coverages
    forced = [P.generate_case(11, i, phase=ph, template_dir=TEMPLATE) for i, ph in enumerate(P.PHASES)]
    return forced + [P.generate_case(11, i, template_dir=TEMPLATE) for i in range(3, 6)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "phantoms"
    return P.synthesize(out, 20, 5, progress=False, template_dir=TEMPLATE, n_scan_copies=1)


def _core(mask: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Erode in-plane so blur and partial volume at the organ edge do not bias the mean."""
    return ndi.binary_erosion(mask, structure=np.ones((1, 3, 3), bool), iterations=iterations)


def test_volume_type_grid_and_affine(cases):
    for c in cases:
        v = c.volume
        assert v.array.dtype == np.int16 and v.modality == "CT"
        nz, ny, nx = v.shape
        assert 48 <= nz <= 64 and 128 <= ny == nx <= 192
        dz, dy, dx = v.spacing
        assert dz in (3.0, 4.0, 5.0) and 1.7 < dy == dx < 3.5
        assert v.orientation() == "SPL"  # z up, rows posterior, columns towards the patient's left (LPS axial)
        assert c.labels.shape == c.lesion_map.shape == v.shape


def test_air_is_minus_1000(cases):
    for c in cases:
        corner = c.volume.array[:, :6, :6].astype(float)
        assert abs(corner.mean() + 1000) < 15, f"air corner mean {corner.mean():.1f} HU, expected about -1000"


@pytest.mark.parametrize("organ,table", [("liver", "liver"), ("spleen", "spleen"), ("aorta", "aorta")])
def test_organ_hu_within_literature_range_of_its_phase(cases, organ, table):
    checked = 0
    for c in cases:
        core = _core(c.mask(organ) & (c.lesion_map == 0), 1 if organ == "aorta" else 2)
        if core.sum() < 30:
            continue
        lo, hi = P.HU_RANGES[table][P.PHASES.index(c.phase)]
        mean = float(c.volume.array[core].mean())
        assert lo - 15 <= mean <= hi + 15, f"{organ} {c.phase}: mean {mean:.1f} HU outside [{lo}, {hi}] +-15"
        checked += 1
    assert checked >= 3, f"only {checked} cases show the {organ}"


def test_phase_changes_enhancement(cases):
    by_phase = {c.phase: c for c in cases[:3]}
    aorta = {p: float(c.volume.array[_core(c.mask("aorta"), 1)].mean()) for p, c in by_phase.items()}
    assert aorta["arterial"] > aorta["portal venous"] > aorta["non-contrast"] + 60, aorta


def test_masks_non_empty_and_volumes_plausible(cases):
    # (min, max) mL for an organ the scan covers completely; adult ranges, generous
    plausible = {"liver": (700, 2800), "spleen": (40, 600), "kidney_right": (70, 350), "kidney_left": (70, 350),
                 "urinary_bladder": (60, 700), "gallbladder": (5, 120)}
    complete = 0
    for c in cases:
        assert c.visible("vertebrae") and c.visible("aorta")
        assert sum(c.visible(o) for o in ("liver", "spleen", "kidney_right", "kidney_left", "stomach")) >= 2
        for organ, (lo, hi) in plausible.items():
            m = c.mask(organ)
            if m.sum() < 50 or m[0].any() or m[-1].any():
                continue  # cut by the scan range
            complete += 1
            assert lo <= c.volume_ml(organ) <= hi, f"{c.case_id} {organ}: {c.volume_ml(organ):.0f} mL"
    assert complete >= 4


def test_template_shapes_are_used(tmp_path):
    c = P.generate_case(2, 0, template_dir=TEMPLATE, template_prob=1.0)
    for organ in P.TEMPLATE_LABELS:
        assert c.shape_source[organ] == "template"
    assert any(c.visible(o) for o in ("liver", "spleen", "kidney_left"))
    with pytest.raises(FileNotFoundError, match="example_seg.nii.gz"):
        P.generate_case(2, 0, template_dir=tmp_path)
    assert set(P.generate_case(2, 0, template_dir=None).shape_source.values()) == {"parametric"}


def test_deterministic_from_seed():
    a = P.generate_case(3, 4, template_dir=TEMPLATE)
    b = P.generate_case(3, 4, template_dir=TEMPLATE)
    c = P.generate_case(4, 4, template_dir=TEMPLATE)
    assert np.array_equal(a.volume.array, b.volume.array) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.volume.affine, b.volume.affine) and a.lesions == b.lesions
    assert a.volume.shape != c.volume.shape or not np.array_equal(a.volume.array, c.volume.array)


def test_lesions_inside_their_organ_with_their_density(cases):
    seen = 0
    for c in cases:
        for lesion in c.lesions:
            m = c.lesion_map == lesion.region_id
            assert m.any()
            assert np.all(c.labels[m] == P.LABEL[lesion.organ])
            if lesion.kind == "cyst" and m.sum() > 30:
                mean = float(c.volume.array[_core(m, 1) if _core(m, 1).sum() > 5 else m].mean())
                assert -15 < mean < 40, f"cyst mean {mean:.1f} HU"
            seen += 1
    assert seen >= 2


def test_report_mentions_every_lesion(cases):
    for c in cases:
        report = P.write_report(c, np.random.default_rng(0))
        assert c.coverage in report
        for lesion in c.lesions:
            assert lesion.location in report, (lesion, report)
            assert any(noun in report for noun in P._KIND_NOUN[lesion.kind]), (lesion, report)
        if not c.lesions:
            assert "No focal lesion" in report or "No abnormality" in report


def test_vqa_items_are_consistent(cases):
    for c in cases:
        items = P.make_vqa(c, np.random.default_rng(1))
        assert [i.question_type for i in items] == [1, 2, 3, 4, 5]
        for it in items:
            assert len(set(it.choices)) == 4
            assert it.choices["ABCD".index(it.answer_choice)] == it.answer
        assert items[1].answer == P._PHASE_ANSWER[c.phase]
        assert items[0].answer == P._PLANE_ANSWER[c.plane]


def test_referrals_point_at_regions(cases):
    for c in cases:
        regions, refs = P.make_referrals(c, np.random.default_rng(2))
        assert refs, "every case has at least one referring expression"
        for r in refs:
            assert (regions == r.region_id).any()
            assert "[SEG]" in r.answer and r.question_type in (0, 1)


def test_dataset_baselines_not_degenerate(dataset):
    stats = P.load_stats(dataset)
    train = stats["splits"]["train"]
    b = train["baselines"]
    assert b["3_closed_vqa_majority_letter"] < 0.4, b
    for t, frac in b["3_closed_vqa_majority_letter_by_type"].items():
        assert frac <= 0.5, (t, frac)
    assert b["4_open_vqa_majority_answer"] < 0.6, b
    assert b["2_report_majority_identical"] < 0.2
    assert set(train["phases"]) == set(P.PHASES)
    assert set(stats["splits"]) == {"train", "val", "test"}
    assert sum(s["cases"] for s in stats["splits"].values()) == 20


def test_closed_vqa_answers_rewritten_content_first(dataset):
    from m3d_edge.data.datasets import task_items, with_closed_vqa_format
    from m3d_edge.data.prompts import closed_vqa_correct

    items = task_items(dataset, "train", ("vqa_closed", "vqa_open"))
    rewritten = with_closed_vqa_format(items, "content")
    closed = 0
    for before, after in zip(items, rewritten):
        if before.task != "vqa_closed":
            assert after == before
            continue
        closed += 1
        choices = dict(re.findall(r"([ABCD])\. (.*?)(?= [ABCD]\. |$)", before.question.split(" Choices: ")[1]))
        assert after.answer == f"{choices[before.target]}. Choice {before.target}."
        assert [l for l in "ABCD" if closed_vqa_correct(after.answer, l)] == [before.target]
    assert closed > 20
    assert with_closed_vqa_format(items, "letter") == items
    broken = [dataclasses.replace(next(it for it in items if it.task == "vqa_closed"), answer="Liver")]
    with pytest.raises(ValueError, match="does not start with its letter"):
        with_closed_vqa_format(broken, "content")


def test_dataset_is_complete_and_atomic(dataset, tmp_path):
    assert (dataset / "stats.json").is_file()
    assert len(list((dataset / "scans" / "dicom" / "case_00000").glob("*.dcm"))) >= 48
    assert (dataset / "scans" / "nifti" / "case_00000.nii.gz").is_file()
    assert not list(dataset.parent.glob(".phantoms.partial-*"))
    with pytest.raises(FileExistsError, match="already exists"):
        P.synthesize(dataset, 2, 0, progress=False)
    with pytest.raises(ValueError, match="split names"):
        P.synthesize(tmp_path / "bad", 2, 0, progress=False, splits=(("train", 1.0), ("train", 1.0)))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_synth_cli(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "4", "--seed", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "closed VQA majority letter" in result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n"] == 4
    again = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "4"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_lesion_centre_is_in_patient_coordinates(cases):
    for c in cases:
        for lesion in c.lesions:
            voxel = np.rint(c.volume.patient_to_voxel(np.array(lesion.center_mm))).astype(int)
            assert c.lesion_map[tuple(voxel)] == lesion.region_id, lesion


def test_vqa_for_every_lesion_combination(cases):
    """Up to three lesions of distinct kinds anywhere: five well-formed questions, one right answer each."""
    rng = np.random.default_rng(0)
    base = cases[0]
    organs = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")
    for trial in range(150):
        kinds = rng.permutation(P.LESION_KINDS)[: int(rng.integers(0, 4))]
        lesions = []
        for k, kind in enumerate(kinds):
            organ = str(rng.choice(organs))
            loc = {"liver": "right lobe of the liver", "spleen": "upper pole of the spleen",
                   "kidney_right": "upper pole of the right kidney", "kidney_left": "lower pole of the left kidney",
                   "pancreas": "tail of the pancreas"}[organ]
            lesions.append(P.Lesion(k + 1, str(kind), organ, loc, (0.0, 0.0, 0.0), 12.0, 30.0))
        case = dataclasses.replace(base, lesions=tuple(lesions), index=trial)
        items = P.make_vqa(case, rng)
        assert [i.question_type for i in items] == [1, 2, 3, 4, 5]
        for it in items:
            assert len(set(it.choices)) == 4 and it.choices["ABCD".index(it.answer_choice)] == it.answer
        q4 = items[3]
        for l in lesions:
            if P.ORGAN_NAMES[l.organ] in q4.question:
                assert sum(m.organ == l.organ for m in lesions) == 1 and q4.answer == P.ABNORMALITY_ANSWER[l.kind]


def test_synth_cli_reports_a_missing_template(tmp_path):
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "x"), "--n", "2", "--no-progress",
                                       "--template-dir", str(tmp_path)])
    assert result.exit_code != 0 and "example_seg.nii.gz" in result.output
    assert not (tmp_path / "x").exists()
