"""Synthetic abdominal CT phantoms with ground truth for the eight M3D-Bench tasks.

- `anatomy`: one case (`generate_case` -> `Case`): volume in HU, organ labels, lesions; the tissue HU tables.
- `text`: the findings report, closed and open VQA items for the five official question types, and referring
  expressions derived from a case.
- `dataset`: `synthesize` writes a whole dataset in the official M3D layouts (see `m3d_formats`) plus a stats JSON
  with the answer distributions and the constant-answer baseline of every task.

Everything public is re-exported here: `from m3d_edge.data.phantom import generate_case, synthesize, ...`.
"""

from m3d_edge.data.phantom.anatomy import (DEFAULT_TEMPLATE_DIR, HU_RANGES, KEY_ORGANS, LABEL, LESION_KINDS,
                                           LESION_ORGANS, ORGAN_NAMES, PHASES, PLANE_ORIENTATION, PLANES, SEG_CLASSES,
                                           STRUCTURES, TEMPLATE_LABELS, Case, Lesion, generate_case, load_template,
                                           render_blob, sample_tissue_hu, smooth_noise)
from m3d_edge.data.phantom.dataset import (CAP_GROUP, SEG_CODE, format_baselines, load_stats,
                                           majority_fraction, soft_dice, synthesize)
from m3d_edge.data.phantom.text import ABNORMALITY_ANSWER, Referral, VQAItem, make_referrals, make_vqa, write_report
# answer tables the tests read as `phantom._KIND_NOUN` etc.
from m3d_edge.data.phantom.text import _KIND_NOUN, _PHASE_ANSWER, _PLANE_ANSWER  # noqa: F401

__all__ = [
    # anatomy
    "DEFAULT_TEMPLATE_DIR", "HU_RANGES", "KEY_ORGANS", "LABEL", "LESION_KINDS", "LESION_ORGANS", "ORGAN_NAMES",
    "PHASES", "PLANE_ORIENTATION", "PLANES", "SEG_CLASSES", "STRUCTURES", "TEMPLATE_LABELS", "Case", "Lesion",
    "generate_case", "load_template", "render_blob", "sample_tissue_hu", "smooth_noise",
    # text
    "ABNORMALITY_ANSWER", "Referral", "VQAItem", "make_referrals", "make_vqa", "write_report",
    # dataset
    "CAP_GROUP", "SEG_CODE", "format_baselines", "load_stats", "majority_fraction", "soft_dice",
    "synthesize",
]
