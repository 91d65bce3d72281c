"""Synthetic abdominal CT anatomy: one phantom case with organ and lesion ground truth.

One case is a `Volume` of int16 Hounsfield units on an axial grid (array z, y, x; affine (z, y, x, 1) -> DICOM LPS
mm; index 0 along z is the most inferior slice), built from:

- a body (superellipse cross-section) with skin, subcutaneous fat, an abdominal wall of muscle, visceral fat with
  bowel loops and gas, ribs, a spine of vertebral bodies and discs with posterior elements, paraspinal and psoas
  muscles, pelvic bones, an optional carbon-fibre table, air (-1000 HU) outside;
- organs: lungs (above a two-dome diaphragm), heart, liver, gallbladder, stomach (wall, fluid, gas), spleen,
  pancreas, kidneys (cortex, medulla, sinus fat), urinary bladder, aorta with iliac arteries, inferior vena cava.
  Each organ's shape comes either from the real TotalSegmentator label map (`shared/data/totalseg`, randomly
  deformed by a smooth displacement field, rescaled and shifted) or from a superellipsoid whose boundary is
  perturbed by smooth noise. Position, size, HU, texture and noise vary per case; contrast phase (non-contrast,
  arterial, portal venous) changes the enhancing tissues as the literature describes (`HU_RANGES`, docs/data.md);
- lesions: cysts (0-20 HU), hypodense and hyperdense masses, calcifications in the liver, spleen, kidneys and
  pancreas, of varied size and location.

Limits: anatomy is schematic (no bowel topology, no hepatic vessels, no adrenal glands); the template covers only
90 mm of upper abdomen, so its organ shapes are stretched to the full organ length and their ends rounded off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from m3d_edge.imaging.volume import Volume

# ------------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------------

PHASES = ("non-contrast", "arterial", "portal venous")
PLANES = ("axial", "coronal", "sagittal")
LESION_KINDS = ("cyst", "hypodense", "hyperdense", "calcification")

# Literature HU ranges (low, high) per tissue and phase; sources and notes in docs/data.md.
# Order of each tuple: non-contrast, arterial (late arterial, ~35 s), portal venous (~70 s).
HU_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "liver": ((50, 65), (65, 85), (100, 125)),
    "spleen": ((40, 55), (90, 130), (110, 130)),
    "kidney_cortex": ((28, 38), (150, 200), (150, 190)),
    "kidney_medulla": ((25, 35), (60, 90), (140, 180)),
    "pancreas": ((35, 50), (100, 140), (80, 110)),
    "aorta": ((35, 50), (250, 350), (140, 180)),
    "ivc": ((35, 50), (70, 100), (130, 160)),
    "heart": ((35, 50), (220, 320), (140, 180)),
    "stomach_wall": ((30, 45), (60, 90), (70, 100)),
    "bowel": ((20, 40), (35, 55), (45, 70)),
    "muscle": ((45, 55), (50, 62), (55, 70)),
    "fluid": ((0, 15), (0, 15), (0, 15)),  # gastric fluid, bile, urine
    "fat": ((-120, -80), (-120, -80), (-120, -80)),
    "lung": ((-880, -820), (-880, -820), (-880, -820)),
    "cancellous_bone": ((150, 280), (150, 280), (150, 280)),
    "cortical_bone": ((600, 1000), (600, 1000), (600, 1000)),
    "disc": ((70, 100), (70, 100), (70, 100)),
    "skin": ((20, 50), (20, 50), (20, 50)),
}

# Label ids of the structures that get masks; 0 is everything else.
STRUCTURES = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder", "aorta",
              "ivc", "heart", "lung", "vertebrae", "urinary_bladder")
LABEL = {name: i + 1 for i, name in enumerate(STRUCTURES)}
# Plain-English names used in reports, questions and the M3D-Seg class list.
ORGAN_NAMES = {"liver": "liver", "spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney",
               "stomach": "stomach", "pancreas": "pancreas", "gallbladder": "gallbladder", "aorta": "aorta",
               "ivc": "inferior vena cava", "heart": "heart", "lung": "lung", "vertebrae": "vertebrae",
               "urinary_bladder": "urinary bladder"}
# M3D-Seg classes written for every case (k = index in this tuple); "lesion" is the union of all lesions.
SEG_CLASSES = ("liver", "spleen", "right kidney", "left kidney", "stomach", "pancreas", "gallbladder", "aorta",
               "lung", "vertebrae", "urinary bladder", "lesion")
# The organs the phantom-small targets name (Dice >= 0.8, boxes): the recipe samples them more often and the model
# card scores each of them separately.
KEY_ORGANS = ("liver", "spleen", "right kidney", "left kidney")
_SEG_SOURCE = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder", "aorta",
               "lung", "vertebrae", "urinary_bladder", "lesion")
# Which organs may carry which lesion kind.
LESION_ORGANS = {"cyst": ("liver", "kidney_right", "kidney_left", "spleen", "pancreas"),
                 "hypodense": ("liver", "kidney_right", "kidney_left", "spleen", "pancreas"),
                 "hyperdense": ("liver", "kidney_right", "kidney_left", "spleen", "pancreas"),
                 "calcification": ("liver", "kidney_right", "kidney_left", "spleen", "pancreas")}
# Organs whose shape may come from the TotalSegmentator template, with their label there (labels.json).
TEMPLATE_LABELS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6, "pancreas": 7,
                   "gallbladder": 4}

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "totalseg"


def _phase_index(phase: str) -> int:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")
    return PHASES.index(phase)


def sample_tissue_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One HU value per tissue of `HU_RANGES`, drawn uniformly inside the range of `phase`."""
    p = _phase_index(phase)
    return {name: float(rng.uniform(*ranges[p])) for name, ranges in HU_RANGES.items()}


# ------------------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lesion:
    """One lesion. `center_mm`: (x, y, z) LPS mm of the voxel it was grown from; `diameter_mm`: nominal largest
    diameter; `hu`: its mean HU before texture, blur and noise."""

    region_id: int
    kind: str
    organ: str
    location: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    hu: float


@dataclass(frozen=True, eq=False)
class Case:
    """A phantom scan and its ground truth.

    volume: int16 HU, axial, array (z, y, x). labels: uint8 (z, y, x), ids from `LABEL` (organs include their
    lesions). lesion_map: uint8 (z, y, x), 0 = none, k = `lesions[k-1]`. plane: the plane in which the captioned and
    VQA image is shown (`present`). tissue_hu: the HU drawn for each tissue. shape_source: organ -> "template" or
    "parametric". coverage: "chest and upper abdomen" | "abdomen" | "abdomen and pelvis".
    """

    case_id: str
    volume: Volume
    labels: np.ndarray
    lesion_map: np.ndarray
    lesions: tuple[Lesion, ...]
    phase: str
    plane: str
    tissue_hu: dict[str, float]
    shape_source: dict[str, str]
    coverage: str
    index: int = 0

    def mask(self, structure: str) -> np.ndarray:
        """Bool (z, y, x) mask of a structure of `STRUCTURES`, or "lesion" for the union of lesions."""
        if structure == "lesion":
            return self.lesion_map > 0
        return self.labels == LABEL[structure]

    def visible(self, structure: str, min_voxels: int = 50) -> bool:
        return int(np.count_nonzero(self.mask(structure))) >= min_voxels

    def volume_ml(self, structure: str) -> float:
        return float(np.count_nonzero(self.mask(structure)) * np.prod(self.volume.spacing) / 1000.0)


# ------------------------------------------------------------------------------------------------------------------
# Smooth random fields (numpy only)
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _CosineField:
    """A smooth random field: a sum of k plane waves over normalised coordinates, unit variance."""

    freqs: np.ndarray  # [k, 3] cycles per unit (z, y, x)
    phases: np.ndarray  # [k]

    def __call__(self, qz: np.ndarray, qy: np.ndarray, qx: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(qz.shape, qy.shape, qx.shape), dtype=np.float32)
        w = np.float32(np.sqrt(2.0 / len(self.phases)))
        for (fz, fy, fx), ph in zip(self.freqs, self.phases):
            out += w * np.cos(np.float32(2 * np.pi) * (fz * qz + fy * qy + fx * qx) + np.float32(ph))
        return out


def _cosine_field(rng: np.random.Generator, k: int = 5, max_freq: float = 1.2) -> _CosineField:
    freqs = rng.uniform(-max_freq, max_freq, size=(k, 3)).astype(np.float32)
    return _CosineField(freqs, rng.uniform(0, 2 * np.pi, size=k).astype(np.float32))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cell: tuple[float, float, float]
                 ) -> np.ndarray:
    """Unit-variance low-frequency noise of `shape` (z, y, x): white noise on a coarse grid with `cell` voxels per
    coarse sample, trilinearly upsampled. Costs one `ndi.zoom` of the full grid."""
    coarse = tuple(int(np.ceil(s / c)) + 2 for s, c in zip(shape, cell))
    small = rng.standard_normal(coarse).astype(np.float32)
    small = ndi.gaussian_filter(small, 0.7)
    small /= small.std() + 1e-6
    big = ndi.zoom(small, [c for c in cell], order=1, grid_mode=False)
    return np.ascontiguousarray(big[: shape[0], : shape[1], : shape[2]])


# ------------------------------------------------------------------------------------------------------------------
# Grid and the TotalSegmentator template
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Grid:
    """Voxel centres in the anatomical frame, mm: x = LPS x (patient left +), y = LPS y (posterior +), both
    relative to the body axis; z relative to the dome of the right hemidiaphragm (head +). Shapes [Z], [Y], [X]."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box covering the (z, y, x) mm interval [lo, hi]; None when it misses the grid."""
        out = []
        for axis, a, b in zip((self.z, self.y, self.x), lo, hi):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z [Z,1,1], y [1,Y,1], x [1,1,X]) mm coordinates of a box."""
        return (self.z[box[0]][:, None, None], self.y[box[1]][None, :, None], self.x[box[2]][None, None, :])


@dataclass(frozen=True)
class _TemplateOrgan:
    """One organ of the template as a float mask [z, y, x] (LPS axis directions, z up) cropped to its box."""

    mask: np.ndarray


@lru_cache(maxsize=4)
def load_template(template_dir: str) -> dict[str, _TemplateOrgan]:
    """Read `example_seg.nii.gz` and cut out each organ of `TEMPLATE_LABELS`.

    The NIfTI is RAS (x, y, z); it is turned into (z, y, x) with x towards the patient's left and y posterior (LPS),
    which is the frame of the phantom grid. Voxels are 3 mm isotropic; crops are normalised to [-1, 1] per axis when
    sampled, so the spacing does not matter.
    """
    import nibabel as nib

    path = Path(template_dir) / "example_seg.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"phantom template {path} not found; pass template_dir=None to use parametric "
                                "organ shapes only, or point template_dir at a copy of shared/data/totalseg")
    img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+, array (x, y, z)
    seg = np.asarray(img.dataobj).astype(np.uint8)
    seg = np.transpose(seg, (2, 1, 0))[:, ::-1, ::-1]  # (z, y, x), x: R->L, y: A->P
    out = {}
    for organ, lab in TEMPLATE_LABELS.items():
        m = seg == lab
        if not m.any():
            continue
        idx = np.argwhere(m)
        lo, hi = idx.min(0), idx.max(0) + 1
        crop = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
        # one voxel of zero padding in-plane so sampling at q = +-1 falls off the organ
        crop = np.pad(crop, ((0, 0), (1, 1), (1, 1)))
        out[organ] = _TemplateOrgan(np.ascontiguousarray(ndi.gaussian_filter(crop, 0.6)))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Organ shapes
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Blob:
    """A rotated (about z) organ-shaped region: centre and semi-axes in mm (z, y, x order), in-plane angle in rad,
    superellipsoid exponent, boundary-noise amplitude, and an optional template organ."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float
    exponent: float
    roughness: float
    field: _CosineField
    template: _TemplateOrgan | None = None
    warp: tuple[_CosineField, _CosineField, _CosineField] | None = None


def _blob(rng: np.random.Generator, center: Sequence[float], radii: Sequence[float],
          template: _TemplateOrgan | None = None, angle: float = 0.0) -> _Blob:
    warp = (_cosine_field(rng, 4, 0.8), _cosine_field(rng, 4, 0.8), _cosine_field(rng, 4, 0.8))
    return _Blob(tuple(float(c) for c in center), tuple(float(r) for r in radii),
                 angle + float(rng.normal(0, 0.12)), float(rng.uniform(1.9, 2.6)), float(rng.uniform(0.05, 0.14)),
                 _cosine_field(rng), template, warp if template is not None else None)


def _local_coords(blob: _Blob, grid: _Grid) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray,
                                                     np.ndarray] | None:
    """Box around the blob and normalised local coordinates q (z, y, x) in it; |q| = 1 on the nominal surface."""
    cz, cy, cx = blob.center
    rz, ry, rx = blob.radii
    r_in = 1.25 * max(ry, rx)
    box = grid.box((cz - 1.1 * rz, cy - r_in, cx - r_in), (cz + 1.1 * rz, cy + r_in, cx + r_in))
    if box is None:
        return None
    z, y, x = grid.coords(box)
    c, s = np.float32(np.cos(blob.angle)), np.float32(np.sin(blob.angle))
    dy, dx = y - np.float32(cy), x - np.float32(cx)
    qy = (c * dy - s * dx) / np.float32(ry)
    qx = (s * dy + c * dx) / np.float32(rx)
    qz = (z - np.float32(cz)) / np.float32(rz)
    return box, qz, qy, qx


def render_blob(blob: _Blob, grid: _Grid) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Rasterise a blob: (box, mask [bool, box shape], depth [float, box shape]).

    depth is the superellipsoid norm (0 at the centre, about 1 at the surface), used to layer kidney cortex or
    stomach wall. Template blobs sample the template organ at the warped normalised coordinates (trilinear) and are
    intersected with a slightly larger ellipsoid, which rounds off the ends the 90 mm template cuts flat.
    """
    local = _local_coords(blob, grid)
    if local is None:
        return None
    box, qz, qy, qx = local
    qz, qy, qx = np.broadcast_arrays(qz, qy, qx)
    e = blob.exponent
    depth = (np.abs(qz) ** e + np.abs(qy) ** e + np.abs(qx) ** e) ** (1.0 / e)
    if blob.template is None:
        mask = depth + blob.roughness * blob.field(qz, qy, qx) < 1.0
    else:
        wz, wy, wx = blob.warp  # type: ignore[misc]
        amp = np.float32(0.07)
        tz = qz + amp * wz(qz, qy, qx)
        ty = qy + amp * wy(qz, qy, qx)
        tx = qx + amp * wx(qz, qy, qx)
        t = blob.template.mask
        coords = np.stack([(tz + 1) * 0.5 * (t.shape[0] - 1), (ty + 1) * 0.5 * (t.shape[1] - 1),
                           (tx + 1) * 0.5 * (t.shape[2] - 1)])
        inside = ndi.map_coordinates(t, coords.reshape(3, -1), order=1, mode="constant", cval=0.0)
        inside = inside.reshape(qz.shape)
        envelope = qz ** 2 + (qy ** 2 + qx ** 2) / 1.6 < 1.0
        mask = (inside > 0.5) & envelope
    return box, mask, depth.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# The case generator
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class _Canvas:
    """Mutable state while a case is painted: HU float32 and structure labels uint8, both (z, y, x)."""

    hu: np.ndarray
    labels: np.ndarray
    texture: np.ndarray  # unit-variance low-frequency noise, (z, y, x)
    depth: dict[str, tuple[tuple[slice, slice, slice], np.ndarray]] = field(default_factory=dict)

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, hu: np.ndarray | float,
              texture_hu: float = 0.0, label: int | None = None) -> None:
        """Write `hu` (+ texture_hu x texture) where mask is set inside box; set `label` there when given."""
        region = self.hu[box]
        value = np.broadcast_to(np.asarray(hu, dtype=np.float32), mask.shape)
        if texture_hu:
            value = value + np.float32(texture_hu) * self.texture[box]
        region[mask] = value[mask]
        if label is not None:
            self.labels[box][mask] = label


def _full(grid: _Grid) -> tuple[slice, slice, slice]:
    return (slice(0, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))


def _sample_grid(rng: np.random.Generator) -> tuple[_Grid, str]:
    """Scan geometry: 48-64 axial slices of 3-5 mm, 128-192 in-plane voxels over a 340-440 mm field of view,
    the body slightly off-centre. Returns the grid and the coverage name."""
    nz = int(rng.integers(48, 65))
    dz = float(rng.choice([3.0, 4.0, 5.0]))
    n_xy = int(rng.choice([128, 144, 160, 176, 192]))
    fov = float(rng.uniform(340, 440))
    dxy = round(fov / n_xy, 3)
    length = nz * dz
    # three kinds of study, equally often: chest + upper abdomen, abdomen, abdomen + pelvis
    z_top = float(rng.uniform(*((60, 130), (-20, 60), (-110, -20))[int(rng.integers(3))]))
    z = (z_top - length + dz / 2 + dz * np.arange(nz)).astype(np.float32)  # inferior -> superior
    y0 = float(rng.uniform(-25, 5))
    x0 = float(rng.uniform(-10, 10))
    y = ((np.arange(n_xy) - (n_xy - 1) / 2) * dxy - y0).astype(np.float32)
    x = ((np.arange(n_xy) - (n_xy - 1) / 2) * dxy - x0).astype(np.float32)
    bottom = z_top - length
    pelvis = bottom < -290
    if z_top > 40:
        coverage = "chest, abdomen and pelvis" if pelvis else "chest and upper abdomen"
    else:
        coverage = "abdomen and pelvis" if pelvis else "abdomen"
    return _Grid(z, y, x, (dz, dxy, dxy)), coverage


@dataclass(frozen=True)
class _Habitus:
    a: float  # body half-width (x), mm
    b: float  # body half-depth (y), mm
    p: float  # superellipse exponent of the body outline
    fat: float  # subcutaneous fat thickness, mm
    wall: float  # muscle wall thickness, mm
    sx: float  # organ scale in x (1 for a 160 mm half-width inside the fat)
    sy: float  # organ scale in y (1 for a 105 mm half-depth inside the fat)
    sz: float  # cranio-caudal scale
    spine_y: float  # y of the vertebral body centre, mm


def _sample_habitus(rng: np.random.Generator) -> _Habitus:
    a = float(rng.uniform(145, 190))
    b = float(rng.uniform(100, 135))
    fat = float(rng.uniform(8, 40))
    sx, sy = (a - fat * 0.6) / 160.0, (b - fat * 0.6) / 105.0
    return _Habitus(a, b, float(rng.uniform(2.0, 2.5)), fat, float(rng.uniform(8, 15)), sx, sy,
                    float(rng.uniform(0.9, 1.1)), b - fat - 72.0 * sy)


def _body_layers(canvas: _Canvas, grid: _Grid, body: _Habitus, t: dict[str, float],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Air, skin, subcutaneous fat, abdominal wall muscle, visceral fat and bowel. Returns (depth_mm [z,y,x],
    inner [bool z,y,x]: the cavity inside the muscle wall)."""
    z, y, x = grid.coords(_full(grid))
    # the body is slightly wider at the pelvis and narrower at the lower chest
    width = body.a * (1 + 0.05 * np.tanh((-z - 250) / 80)).astype(np.float32)
    post = np.where(y > 0, np.float32(body.b * 0.92), np.float32(body.b))
    r = (np.abs(x) / width) ** body.p + (np.abs(y) / post) ** body.p
    rho = r ** (1.0 / body.p)
    depth = (1.0 - rho) * np.float32(np.sqrt(body.a * body.b))  # approximate depth below the skin, mm
    canvas.hu[...] = -1000.0
    inside = depth > 0
    canvas.hu[inside] = t["skin"]
    fat = depth > 2.5
    canvas.hu[fat] = t["fat"] + 6 * canvas.texture[fat]
    muscle = depth > 2.5 + body.fat
    canvas.hu[muscle] = t["muscle"] + 5 * canvas.texture[muscle]
    inner = depth > 2.5 + body.fat + body.wall
    # visceral fat and bowel loops: threshold smooth noise; gas inside some loops
    loops = smooth_noise(rng, grid.shape, (2, 6, 6))
    bowel = inner & (loops > rng.uniform(-0.4, 0.4))
    canvas.hu[inner] = t["fat"] + 8 * canvas.texture[inner]
    canvas.hu[bowel] = t["bowel"] + 8 * loops[bowel]
    gas = bowel & (loops > 2.0)
    canvas.hu[gas] = -950.0
    return depth, inner


def _diaphragm(grid: _Grid, body: _Habitus, dome_left: float) -> np.ndarray:
    """Height (mm) of the diaphragm over the (y, x) plane: right dome at 0, left dome lower, lower laterally and
    posteriorly (costophrenic recesses). Shape [Y, X]."""
    y, x = grid.y[:, None], grid.x[None, :]
    half = 0.45 * body.a
    right = -55.0 * ((x + half) / half) ** 2
    left = dome_left - 55.0 * ((x - half) / half) ** 2
    return (np.maximum(right, left) - 35.0 * np.clip(y / body.b, 0, 1) ** 2).astype(np.float32)


def _paint_thorax(canvas: _Canvas, grid: _Grid, body: _Habitus, depth: np.ndarray, inner: np.ndarray,
                  t: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Lungs above the diaphragm (minus the mediastinum) with small vessels, and the heart. Returns the diaphragm
    height map [Y, X]."""
    diaph = _diaphragm(grid, body, float(rng.uniform(-25, -8)))
    z = grid.z[:, None, None]
    above = z > diaph[None]
    if not above.any():
        return diaph
    x = grid.x[None, None, :]
    y = grid.y[None, :, None]
    mediastinum = (np.abs(x - 10 * body.sx) < 28 * body.sx + 10 * np.clip(-y / body.b, 0, 1) * body.sx) & \
        (y < body.spine_y + 25)
    lung = inner & above & ~mediastinum & (depth > 2.5 + body.fat + body.wall + 6)
    vessels = smooth_noise(rng, grid.shape, (1, 1.5, 1.5))
    value = t["lung"] + 25 * canvas.texture
    value = np.where(vessels > 2.3, np.float32(t["aorta"] * 0.5), value)
    canvas.paint(_full(grid), lung, value, label=LABEL["lung"])
    # mediastinal fat above the diaphragm
    canvas.paint(_full(grid), inner & above & mediastinum, t["fat"] + 10, 6)
    heart = _blob(rng, (45 * body.sz, -20 * body.sy, 25 * body.sx),
                  (50 * body.sz * rng.uniform(0.9, 1.1), 50 * body.sy, 60 * body.sx), angle=-0.5)
    drawn = render_blob(heart, grid)
    if drawn is not None:
        box, mask, _ = drawn
        mask &= inner[box]
        canvas.paint(box, mask, t["heart"], 8, LABEL["heart"])
    return diaph


def _paint_ribs_and_pelvis(canvas: _Canvas, grid: _Grid, body: _Habitus, depth: np.ndarray,
                           t: dict[str, float], rng: np.random.Generator) -> None:
    """Rib arcs in the chest wall above z = -170 mm, iliac wings and femoral heads in the pelvis."""
    z, y, x = grid.coords(_full(grid))
    band = (depth > body.fat + 2.5 + 0.2 * body.wall) & (depth < body.fat + 2.5 + 0.2 * body.wall + 9)
    theta = np.arctan2(x, -y)  # 0 anterior, +-pi posterior
    pitch = 32.0 * body.sz
    slope = 110.0 * (1 - np.abs(theta) / np.pi)  # ribs run down from back to front: short arcs per slice
    phase = np.mod((z + slope + rng.uniform(0, pitch)) / pitch, 1.0)
    ribs = band & (phase < 0.3) & (np.abs(x) > 0.25 * body.a) & (z > -170 * body.sz)
    canvas.paint(_full(grid), ribs, t["cortical_bone"] * 0.6, 30)
    # iliac wings: curved plates posterolateral, from -240 to -340 mm
    c = body.spine_y - 5
    for side in (-1, 1):
        zc = (z < -240 * body.sz) & (z > -340 * body.sz)
        ring = np.abs(np.hypot((x - side * 0.45 * body.a) / (0.35 * body.a), (y - c) / (0.55 * body.b)) - 1.0)
        wing = zc & (ring < 0.06) & (np.abs(x) > 0.15 * body.a) & (side * x > 0) & (y > c - 0.1 * body.b)
        canvas.paint(_full(grid), wing, t["cortical_bone"] * 0.5, 40)
        head = _blob(rng, (-375 * body.sz, c - 30 * body.sy, side * 0.5 * body.a), (22, 22, 22))
        drawn = render_blob(head, grid)
        if drawn is not None:
            box, mask, d = drawn
            canvas.paint(box, mask, np.where(d > 0.85, t["cortical_bone"], t["cancellous_bone"]), 10)


def _paint_spine(canvas: _Canvas, grid: _Grid, body: _Habitus, t: dict[str, float],
                 rng: np.random.Generator) -> None:
    """Vertebral bodies (cortical shell, cancellous core) alternating with discs, posterior arch, spinous and
    transverse processes, spinal canal, paraspinal muscles and psoas. Built per slice from 2-D masks."""
    pitch = float(rng.uniform(28, 34)) * body.sz
    offset = float(rng.uniform(0, pitch))
    y, x = grid.y[:, None], grid.x[None, :]
    for k, z in enumerate(grid.z):
        lumbar = float(np.clip((-z + 60) / 200, 0, 1))  # thoracic bodies are smaller than lumbar ones
        rx, ry = (16 + 7 * lumbar) * body.sx ** 0.5, (13 + 5 * lumbar) * body.sy ** 0.5
        sy = body.spine_y
        slab = (k, slice(None), slice(None))
        # paraspinal muscles and psoas first, bone over them
        for side in (-1, 1):
            para = ((x - side * 38) / 26) ** 2 + ((y - (sy + ry + 28)) / 24) ** 2 < 1
            canvas.hu[k][para] = t["muscle"] + 4 * canvas.texture[k][para]
            if z < -110:
                r_ps = min(8 + 0.12 * (-110 - z), 26)
                psoas = ((x - side * (rx + r_ps * 0.8)) / r_ps) ** 2 + ((y - sy) / (r_ps * 0.9)) ** 2 < 1
                canvas.hu[k][psoas] = t["muscle"] + 4 * canvas.texture[k][psoas]
        level = np.mod(z + offset, pitch) / pitch  # 0..0.22 disc, then the body
        in_body = level > 0.22
        ell = (x / rx) ** 2 + ((y - sy) / ry) ** 2
        vb = ell < 1
        canal_c = sy + ry + 9
        canal = x ** 2 + (y - canal_c) ** 2 < 8.5 ** 2
        arch = (x ** 2 + (y - canal_c) ** 2 < 14.5 ** 2) & ~canal
        spinous = (np.abs(x) < 4.5) & (y > canal_c + 10) & (y < canal_c + 30) & (level > 0.35)
        transverse = (np.abs(y - canal_c + 3) < 5) & (np.abs(x) < 18 + 14 * lumbar) & (0.45 < level < 0.75)
        if in_body:
            bone_hu = np.where(ell > 0.8, np.float32(t["cortical_bone"]), np.float32(t["cancellous_bone"]))
            canvas.hu[slab][vb] = bone_hu[vb] + 15 * canvas.texture[k][vb]
            post = arch | spinous | transverse
            canvas.hu[slab][post] = t["cortical_bone"] * 0.7
            canvas.labels[slab][vb | post] = LABEL["vertebrae"]
        else:
            canvas.hu[slab][vb] = t["disc"]
            canvas.hu[slab][arch] = t["cortical_bone"] * 0.7
            canvas.labels[slab][arch] = LABEL["vertebrae"]
        canvas.hu[slab][canal] = 10.0
        canvas.labels[slab][canal] = 0


def _paint_vessels(canvas: _Canvas, grid: _Grid, body: _Habitus, t: dict[str, float],
                   rng: np.random.Generator) -> None:
    """Aorta (thoracic part posterior-left, abdominal part anterior-left of the spine) bifurcating into the common
    iliac arteries, and the IVC to the right of it. Circles per slice."""
    y, x = grid.y[:, None], grid.x[None, :]
    r_ao = float(rng.uniform(9, 13))
    bif = -260 * body.sz
    for k, z in enumerate(grid.z):
        sy = body.spine_y
        up = float(np.clip(z / 60, 0, 1))
        ax = (12 + 10 * up) * body.sx
        ay = sy - 28 * body.sy + 18 * up
        if z > bif:
            arteries = [(ax, ay, r_ao)]
        else:
            spread = 16 + 0.45 * (bif - z)
            arteries = [(ax - spread, ay + 0.1 * (bif - z), 6.5), (ax + spread - 10, ay + 0.1 * (bif - z), 6.5)]
        for cx, cy, r in arteries:
            m = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
            canvas.hu[k][m] = t["aorta"] + 5 * canvas.texture[k][m]
            canvas.labels[k][m] = LABEL["aorta"]
        if z < 25 and z > bif - 10:
            m = ((x + 24 * body.sx) / 13) ** 2 + ((y - (sy - 25 * body.sy)) / 9.5) ** 2 < 1
            canvas.hu[k][m] = t["ivc"] + 5 * canvas.texture[k][m]
            canvas.labels[k][m] = LABEL["ivc"]


def _organ_blobs(rng: np.random.Generator, body: _Habitus, template: dict[str, _TemplateOrgan] | None,
                 template_prob: float) -> tuple[dict[str, _Blob], dict[str, str]]:
    """Centre (z, y, x mm) and semi-axes of each solid organ, scaled to the body, jittered, with a shape source."""
    sx, sy, sz = body.sx, body.sy, body.sz

    def jitter(v: float, mm: float) -> float:
        return v + float(rng.normal(0, mm))

    def size(v: float) -> float:
        return v * float(rng.uniform(0.85, 1.15))

    spine = body.spine_y
    layout = {
        # name: ((cz, cy, cx), (rz, ry, rx), angle)
        "liver": ((-75 * sz, -15 * sy, -60 * sx), (78 * sz, 72 * sy, 88 * sx), 0.2),
        "spleen": ((-65 * sz, spine + 5 * sy, 95 * sx), (55 * sz, 48 * sy, 28 * sx), -0.6),
        "stomach": ((-60 * sz, -40 * sy, 60 * sx), (50 * sz, 38 * sy, 42 * sx), 0.4),
        "gallbladder": ((-115 * sz, -55 * sy, -50 * sx), (32 * sz, 16 * sy, 15 * sx), 0.3),
        "pancreas": ((-110 * sz, spine - 45 * sy, 20 * sx), (18 * sz, 14 * sy, 70 * sx), -0.25),
        "kidney_right": ((-155 * sz, spine + 10 * sy, -70 * sx), (55 * sz, 25 * sy, 28 * sx), 0.35),
        "kidney_left": ((-140 * sz, spine + 10 * sy, 70 * sx), (55 * sz, 25 * sy, 28 * sx), -0.35),
        "urinary_bladder": ((-345 * sz, -40 * sy, 0.0), (38 * sz, 35 * sy, 45 * sx), 0.0),
    }
    blobs, source = {}, {}
    for name, (c, r, ang) in layout.items():
        c = (jitter(c[0], 10), jitter(c[1], 6), jitter(c[2], 6))
        r = (size(r[0]), size(r[1]), size(r[2]))
        tmpl = None
        if template is not None and name in template and rng.random() < template_prob:
            tmpl = template[name]
            # the template boxes are tight: let the shape fill 90 % of the blob box
            r = (r[0], r[1] * 1.1, r[2] * 1.1)
        blobs[name] = _blob(rng, c, r, tmpl, angle=ang)
        source[name] = "template" if tmpl is not None else "parametric"
    return blobs, source


def _paint_organs(canvas: _Canvas, grid: _Grid, blobs: dict[str, _Blob], inner: np.ndarray,
                  t: dict[str, float], rng: np.random.Generator) -> None:
    """Rasterise the solid organs in painting order (later ones win where they touch)."""
    order = ("liver", "gallbladder", "stomach", "spleen", "pancreas", "kidney_right", "kidney_left",
             "urinary_bladder")
    for name in order:
        drawn = render_blob(blobs[name], grid)
        if drawn is None:
            continue
        box, mask, d = drawn
        mask &= inner[box]
        if not mask.any():
            continue
        canvas.depth[name] = (box, d)
        label = LABEL[name]
        if name == "liver":
            canvas.paint(box, mask, t["liver"], 6, label)
        elif name == "spleen":
            canvas.paint(box, mask, t["spleen"], 6, label)
        elif name == "pancreas":
            lobulated = canvas.texture[box] > -1.2  # fatty clefts between lobules
            canvas.paint(box, mask & lobulated, t["pancreas"], 8, label)
        elif name == "gallbladder":
            canvas.paint(box, mask, np.where(d > 0.9, t["stomach_wall"], t["fluid"] + 5), 2, label)
        elif name == "urinary_bladder":
            canvas.paint(box, mask, np.where(d > 0.93, t["muscle"], t["fluid"]), 2, label)
        elif name == "stomach":
            z, y, x = grid.coords(box)
            level = blobs[name].center[1] - blobs[name].radii[1] * rng.uniform(0.2, 0.6)
            contents = np.where(y < level, np.float32(-990.0), np.float32(t["fluid"] + 10))
            canvas.paint(box, mask, np.where(d > 0.82, np.float32(t["stomach_wall"]), contents), 3, label)
        else:  # kidneys: cortex rim, medullary pyramids, sinus fat near the hilum
            medial = (grid.x[box[2]][None, None, :] * np.sign(blobs[name].center[2])) < blobs[name].center[2] \
                * np.sign(blobs[name].center[2])
            hu = np.where(d > 0.7, np.float32(t["kidney_cortex"]), np.float32(t["kidney_medulla"]))
            hu = np.where((d < 0.4) & medial, np.float32(t["fat"] + 30), hu)
            canvas.paint(box, mask, hu, 5, label)


# -- lesions -----------------------------------------------------------------------------------------------------

def _lesion_hu(rng: np.random.Generator, kind: str, organ_hu: float, phase: str) -> float:
    """Mean HU of a lesion: cysts 0-20 HU (Bosniak simple cyst); masses a phase-dependent step below or above the
    parenchyma; calcifications 250-900 HU."""
    p = _phase_index(phase)
    if kind == "cyst":
        return float(rng.uniform(0, 20))
    if kind == "calcification":
        return float(rng.uniform(250, 900))
    if kind == "hypodense":
        step = rng.uniform(*((15, 30), (25, 50), (35, 60))[p])
        return float(max(organ_hu - step, 22.0))  # stays above the cyst range
    step = rng.uniform(*((15, 30), (40, 90), (20, 45))[p])
    return float(organ_hu + step)


def _lesion_location(organ: str, c: tuple[float, float, float], blob: _Blob, body: _Habitus) -> str:
    """Plain-English location of a lesion at c = (z, y, x) mm inside `organ`."""
    z, _, x = c
    if organ == "liver":
        # Cantlie's line (gallbladder fossa to IVC) divides the functional right and left lobes
        return "left lobe of the liver" if x > -30 * body.sx else "right lobe of the liver"
    if organ.startswith("kidney"):
        side = "right" if organ == "kidney_right" else "left"
        rel = (z - blob.center[0]) / blob.radii[0]
        part = "upper pole" if rel > 0.2 else ("lower pole" if rel < -0.2 else "interpolar region")
        return f"{part} of the {side} kidney"
    if organ == "spleen":
        return "upper pole of the spleen" if z > blob.center[0] else "lower pole of the spleen"
    if organ == "pancreas":
        rel = (x - blob.center[2]) / blob.radii[2]
        part = "head" if rel < -0.2 else ("tail" if rel > 0.2 else "body")
        return f"{part} of the pancreas"
    raise ValueError(f"no lesion location rule for organ {organ!r}")


def _choose_lesion_plan(rng: np.random.Generator) -> list[str]:
    """Lesion kinds of a case: about a fifth of cases are normal, the others have 1-3 lesions of distinct kinds
    drawn uniformly, so that the abnormality answers stay balanced and "the cyst" names one lesion."""
    if rng.random() < 0.22:
        return []
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    return [str(k) for k in rng.permutation(LESION_KINDS)[:n]]


def _paint_lesions(canvas: _Canvas, grid: _Grid, blobs: dict[str, _Blob], body: _Habitus, kinds: list[str],
                   phase: str, t: dict[str, float], rng: np.random.Generator
                   ) -> tuple[np.ndarray, list[Lesion]]:
    """Place lesions inside visible organs; returns the lesion map (uint8, z y x) and the lesion records."""
    lesion_map = np.zeros(grid.shape, np.uint8)
    lesions: list[Lesion] = []
    organ_hu = {"liver": t["liver"], "spleen": t["spleen"], "kidney_right": t["kidney_cortex"],
                "kidney_left": t["kidney_cortex"], "pancreas": t["pancreas"]}
    for kind in kinds:
        candidates = [o for o in LESION_ORGANS[kind] if o in canvas.depth]
        if not candidates:
            continue
        organ = str(rng.choice(candidates))
        box, depth = canvas.depth[organ]
        deep = (canvas.labels[box] == LABEL[organ]) & (depth < 0.65) & (lesion_map[box] == 0)
        if deep.sum() < 20:
            continue
        idx = np.argwhere(deep)
        kz, ky, kx = idx[rng.integers(len(idx))]
        center = (float(grid.z[box[0]][kz]), float(grid.y[box[1]][ky]), float(grid.x[box[2]][kx]))
        r_organ = min(blobs[organ].radii[1], blobs[organ].radii[2])
        if kind == "calcification":
            radius = float(rng.uniform(1.5, 4.0))
        else:
            radius = float(rng.uniform(4.0, min(25.0, max(5.0, 0.45 * r_organ))))
        radius = max(radius, 0.75 * max(grid.spacing[1], grid.spacing[2]))
        region_id = len(lesions) + 1
        shape = _blob(rng, center, (max(radius, grid.spacing[0] * 0.75), radius, radius))
        drawn = render_blob(_Blob(shape.center, shape.radii, shape.angle, 2.0, 0.08 if kind != "cyst" else 0.02,
                                  shape.field), grid)
        if drawn is None:
            continue
        lbox, lmask, _ = drawn
        lmask &= (canvas.labels[lbox] == LABEL[organ]) & (lesion_map[lbox] == 0)  # lesions do not overlap
        if not lmask.any():
            continue
        hu = _lesion_hu(rng, kind, organ_hu[organ], phase)
        canvas.paint(lbox, lmask, hu, 2 if kind == "cyst" else 6)
        lesion_map[lbox][lmask] = region_id
        lesions.append(Lesion(region_id, kind, organ, _lesion_location(organ, center, blobs[organ], body),
                              (center[2], center[1], center[0]), round(2 * radius, 1), round(hu, 1)))
    return lesion_map, lesions


def _paint_table(canvas: _Canvas, grid: _Grid, body: _Habitus) -> None:
    """A curved carbon-fibre table under the patient: two thin shells around a foam core."""
    y, x = grid.y[:, None], grid.x[None, :]
    top = body.b + 6 + 0.0006 * x ** 2
    shell = ((y > top) & (y < top + 2.5)) | ((y > top + 14) & (y < top + 16.5))
    core = (y >= top + 2.5) & (y <= top + 14)
    wide = np.abs(x) < 0.9 * body.a + 40
    canvas.hu[:, shell & wide] = 180.0
    canvas.hu[:, core & wide] = -900.0


def _finish(canvas: _Canvas, grid: _Grid, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner effects: blur (point-spread function), spatially varying correlated noise (higher in the body
    centre, where fewer photons get through), round and clip to int16 HU in [-1024, 3071]."""
    blurred = ndi.gaussian_filter(canvas.hu, (0.4, 0.7, 0.7))
    sigma = float(rng.uniform(6, 18))
    noise = ndi.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), (0.3, 0.6, 0.6))
    noise /= noise.std() + 1e-6
    centre = np.clip(depth / 120.0, 0, 1)
    scale = np.where(depth > 0, np.float32(sigma) * (0.8 + 0.6 * centre), np.float32(0.3 * sigma))
    out = blurred + noise * scale
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16)


def _affine(grid: _Grid, z_offset: float) -> np.ndarray:
    """(z, y, x, 1) -> LPS mm for the grid; the anatomical z origin sits at `z_offset` in scanner coordinates."""
    dz, dy, dx = grid.spacing
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2] = dz, dy, dx
    aff[:3, 3] = (float(grid.x[0]), float(grid.y[0]), float(grid.z[0]) + z_offset)
    aff[3, 3] = 1.0
    return aff


def generate_case(seed: int, index: int = 0, *, case_id: str | None = None,
                  template_dir: Path | str | None = DEFAULT_TEMPLATE_DIR, template_prob: float = 0.5,
                  phase: str | None = None, plane: str | None = None) -> Case:
    """Build one phantom, deterministic from (seed, index).

    phase / plane force the contrast phase or the presented plane (otherwise drawn uniformly). template_dir=None
    uses only parametric organ shapes; template_prob is the chance that an organ takes its template shape.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    template = load_template(str(template_dir)) if template_dir is not None else None
    phase = phase if phase is not None else PHASES[int(rng.integers(3))]
    plane = plane if plane is not None else PLANES[int(rng.integers(3))]
    _phase_index(phase)
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}; got {plane!r}")
    t = sample_tissue_hu(rng, phase)
    grid, coverage = _sample_grid(rng)
    body = _sample_habitus(rng)
    canvas = _Canvas(np.zeros(grid.shape, np.float32), np.zeros(grid.shape, np.uint8),
                     smooth_noise(rng, grid.shape, (2, 5, 5)))
    depth, inner = _body_layers(canvas, grid, body, t, rng)
    _paint_ribs_and_pelvis(canvas, grid, body, depth, t, rng)
    diaph = _paint_thorax(canvas, grid, body, depth, inner, t, rng)
    blobs, source = _organ_blobs(rng, body, template, template_prob)
    # organs below the diaphragm only: keep the lungs where the liver/spleen would poke through
    below = grid.z[:, None, None] < diaph[None] + 5
    _paint_organs(canvas, grid, blobs, inner & below, t, rng)
    _paint_vessels(canvas, grid, body, t, rng)
    _paint_spine(canvas, grid, body, t, rng)
    lesion_map, lesions = _paint_lesions(canvas, grid, blobs, body, _choose_lesion_plan(rng), phase, t, rng)
    if rng.random() < 0.6:
        _paint_table(canvas, grid, body)
    hu = _finish(canvas, grid, depth, rng)
    z_offset = float(rng.uniform(-800, -400))
    affine = _affine(grid, z_offset)
    lesions = [replace(l, center_mm=(l.center_mm[0], l.center_mm[1], l.center_mm[2] + z_offset)) for l in lesions]
    cid = case_id if case_id is not None else f"phantom_{seed}_{index:05d}"
    vol = Volume(hu, affine, "CT", {"source": "m3d_edge.data.phantom", "seed": int(seed), "index": int(index),
                                    "phase": phase, "case_id": cid})
    return Case(cid, vol, canvas.labels, lesion_map, tuple(lesions), phase, plane, t, source, coverage, index)


# ------------------------------------------------------------------------------------------------------------------
# Presentation plane
# ------------------------------------------------------------------------------------------------------------------

# Axis codes (preprocess orientation) that show the axial source volume in each plane on the model grid:
# depth axis, rows, columns. Axial = the preprocess default; coronal: slices front -> back, head at the top,
# patient right on the image left; sagittal: slices right -> left, head at the top, anterior on the left.
PLANE_ORIENTATION = {"axial": "SPL", "coronal": "PIL", "sagittal": "LIP"}
