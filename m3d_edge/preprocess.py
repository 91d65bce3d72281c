"""Volume -> model input [1, 1, 32, 256, 256] and the Transform that maps model outputs back (numpy only).

Steps, in order (each recorded in the Transform):

1. Reorient to the canonical orientation CANONICAL = "SPL": array axis 0 (depth) runs feet -> head, axis 1
   (rows) anterior -> posterior, axis 2 (columns) patient right -> left. In-plane this is the radiological axial
   view (anterior at the top, the patient's right on the image's left) that the Radiopaedia slices of M3D-Cap —
   most of the official training images — were stored in; depth feet -> head is what the official M3D-Seg
   `swapaxes(-1, -3)` of NIfTI data gives for the usual files whose k axis points to the head. It is also the
   order of a DICOM axial series sorted along its normal, so the commonest input is not touched. Only a
   permutation and flips (no resampling): an oblique or tilted scan keeps its obliquity.
2. Intensity: spec "m3d" = min-max over the whole volume to [0, 1] (spec §7.2); spec "ct" = clip to an HU window
   (default [-1000, 1000]) and scale it to [0, 1].
3. Crop to the foreground: the bounding box of voxels > 0 after step 2, margin 0 (MONAI CropForeground's
   default, as used by the official data scripts).
4. Resize to `out_shape` with trilinear interpolation exactly as torch.nn.functional.interpolate(
   mode="trilinear", align_corners=False) without antialiasing: the sample for output index o along an axis of
   input length n and output length m is at s = max((o + 0.5) * n / m - 0.5, 0), linear between floor(s) and
   min(floor(s) + 1, n - 1). Trilinear = three such 1-D passes (it is separable), done here in float32.

Model-grid boxes use the official normalised form (spec §7.3): [d_min/D, h_min/H, w_min/W, d_max/D, h_max/H,
w_max/W] with min/max voxel indices of the model grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from m3d_edge.imaging.volume import (
    Volume,
    reorient_array,
    reorient_index_matrix,
    reorientation,
    unreorient_array,
)

CANONICAL = "SPL"  # (z, y, x) increase towards superior, posterior, patient left; see the module docstring
OUT_SHAPE = (32, 256, 256)  # (D, H, W) of the official models
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)  # HU
SPECS = ("m3d", "ct")


class PreprocessError(ValueError):
    """A volume that cannot be turned into model input (constant image, nothing in the window, bad box)."""


@dataclass(frozen=True, eq=False)
class Transform:
    """How a source volume became the model grid; maps masks and boxes back.

    Index frames: *source* = the input Volume's array (z, y, x); *canonical* = source reoriented to
    `orientation` by `np.transpose(a, perm)` then flipped on the axes where `flips` is True; *crop* = canonical
    restricted to the half-open box `crop` ((z0, z1), (y0, y1), (x0, x1)); *model* = crop resized to `out_shape`.
    """

    spec: str
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray  # [4, 4], (z, y, x, 1) -> LPS mm
    source_orientation: str
    orientation: str
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    out_shape: tuple[int, int, int]
    window: Optional[tuple[float, float]]  # HU window of spec "ct"; None for "m3d"
    source_meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[j] for j in self.perm)  # type: ignore[return-value]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.crop)  # type: ignore[return-value]

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """Source-grid mask [z, y, x] -> model-grid mask `out_shape`, uint8, with torch mode="nearest"
        semantics (the official label resize). For training targets and tests."""
        mask = np.asarray(mask)
        if mask.shape != self.source_shape:
            raise PreprocessError(f"mask shape {mask.shape} differs from the source grid {self.source_shape}")
        crop = reorient_array(mask, self.perm, self.flips)[tuple(slice(a, b) for a, b in self.crop)]
        for axis, n_out in enumerate(self.out_shape):
            crop = np.take(crop, _nearest_index(crop.shape[axis], n_out), axis=axis)
        return (crop > 0).astype(np.uint8)

    def invert_mask(self, mask: np.ndarray, *, method: str = "linear", threshold: float = 0.5) -> Volume:
        """Model-grid mask `out_shape` (binary, or probabilities in [0, 1]) -> uint8 mask Volume on the source grid.

        method "linear": the same align_corners=False linear resampling from the model grid back to the crop,
        then `> threshold` (smooth edges, no staircase where the model grid is coarser than the source);
        "nearest": each source voxel takes the model voxel its centre falls in. Voxels outside the crop are 0.
        The Volume has the source affine, so it can be written next to the source (imaging.write_mask).
        Accepts [D, H, W], [1, D, H, W] or [1, 1, D, H, W] (the seg decoder's output layout).
        """
        mask = np.asarray(mask)
        if mask.shape == (1, 1, *self.out_shape) or mask.shape == (1, *self.out_shape):
            mask = mask.reshape(self.out_shape)
        if mask.shape != self.out_shape:
            raise PreprocessError(f"mask shape {mask.shape} is not the model grid {self.out_shape}")
        if method == "linear":
            inside = _resize_linear_threshold(mask.astype(np.float32), self.crop_shape, threshold)
        elif method == "nearest":
            inside = mask > threshold
            for axis, n_out in enumerate(self.crop_shape):
                centres = (np.arange(n_out) + 0.5) * self.out_shape[axis] / n_out
                inside = np.take(inside, np.minimum(centres.astype(np.int64), self.out_shape[axis] - 1), axis=axis)
        else:
            raise PreprocessError(f"method {method!r} must be 'linear' or 'nearest'")
        canonical = np.zeros(self.canonical_shape, dtype=np.uint8)
        canonical[tuple(slice(a, b) for a, b in self.crop)] = inside
        array = np.ascontiguousarray(unreorient_array(canonical, self.perm, self.flips))
        meta = {k: self.source_meta[k] for k in ("source", "series_uid", "format") if k in self.source_meta}
        return Volume(array, self.source_affine.copy(), "SEG", meta)

    def box_to_voxels(self, box6: Sequence[float]) -> np.ndarray:
        """Official normalised box -> inclusive source voxel box [z0, y0, x0, z1, y1, x1] (int).

        A model voxel m covers crop coordinates [m * s - 0.5, (m + 1) * s - 0.5] with s = crop/out (voxel
        centres at integers); the box is the source voxels whose centres lie inside the model box, or the
        voxel at its centre when the box is thinner than one source voxel.
        """
        b = np.asarray(box6, dtype=np.float64)
        if b.shape != (6,) or not np.all(np.isfinite(b)):
            raise PreprocessError(f"a box needs 6 finite numbers [d0, h0, w0, d1, h1, w1]; got {box6!r}")
        out = np.array(self.out_shape)
        m = np.clip(np.rint(b.reshape(2, 3) * out), 0, out - 1)  # [2, 3] model voxel indices
        m_lo, m_hi = m.min(axis=0), m.max(axis=0)
        s = np.array(self.crop_shape) / out
        q_lo, q_hi = np.ceil(m_lo * s - 0.5), np.floor((m_hi + 1) * s - 0.5)
        thin = q_lo > q_hi
        centre = np.rint((m_lo + m_hi + 1) / 2 * s - 0.5)
        q_lo, q_hi = np.where(thin, centre, q_lo), np.where(thin, centre, q_hi)
        crop_max = np.array(self.crop_shape) - 1
        q = np.clip(np.stack([q_lo, q_hi]), 0, crop_max) + np.array([a for a, _ in self.crop])  # canonical index
        to_source = reorient_index_matrix(self.source_shape, self.perm, self.flips)
        src = np.rint(np.c_[q, np.ones(2)] @ to_source.T)[:, :3].astype(np.int64)
        return np.concatenate([src.min(axis=0), src.max(axis=0)])

    def box_to_patient(self, box6: Sequence[float]) -> np.ndarray:
        """Official normalised box -> [2, 3] LPS mm: the centres of the min and max corner voxels of
        `box_to_voxels` (with an oblique source these two corners span a box in voxel space, not in LPS)."""
        v = self.box_to_voxels(box6).reshape(2, 3).astype(np.float64)
        return v @ self.source_affine[:3, :3].T + self.source_affine[:3, 3]


def to_model_input(
    volume: Volume,
    spec: str = "m3d",
    *,
    out_shape: tuple[int, int, int] = OUT_SHAPE,
    window: tuple[float, float] = DEFAULT_CT_WINDOW,
    orientation: str = CANONICAL,
) -> tuple[np.ndarray, Transform]:
    """Volume -> (x [1, 1, D, H, W] float32 in [0, 1], Transform). See the module docstring for the steps.

    spec "m3d" reproduces the official training preprocessing; "ct" windows HU first (`window`, HU), which
    removes the effect of outliers (metal, padding at -2000/-3024) on the min-max scaling.
    """
    if spec not in SPECS:
        raise PreprocessError(f"spec {spec!r} is not one of {SPECS}")
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise PreprocessError(f"out_shape {out_shape} must be three positive sizes (D, H, W)")
    perm, flips = reorientation(volume.affine, orientation)
    canonical = reorient_array(volume.array, perm, flips)  # a view
    if spec == "m3d":
        lo, hi = float(canonical.min()), float(canonical.max())
        if not hi > lo:
            raise PreprocessError(f"the volume is constant ({lo}); min-max scaling needs at least two values")
        used_window = None
    else:
        lo, hi = (float(window[0]), float(window[1]))
        if not hi > lo:
            raise PreprocessError(f"window {window} must be (low HU, high HU) with low < high")
        used_window = (lo, hi)
    # foreground of the scaled image (> 0) is exactly "raw value > lo", so crop before converting to float:
    # only the crop is ever copied
    crop = _foreground_box(canonical > lo)
    if crop is None:
        raise PreprocessError(f"no voxel above {lo:g}: nothing to crop to (an empty scan or a wrong HU window)")
    region = canonical[tuple(slice(a, b) for a, b in crop)].astype(np.float32)
    if spec == "ct":
        np.clip(region, lo, hi, out=region)
    region = (region - np.float32(lo)) / np.float32(hi - lo)  # [0, 1]
    x = resize_trilinear(region, out_shape)  # [D, H, W]
    transform = Transform(
        spec=spec,
        source_shape=volume.shape,
        source_affine=volume.affine.copy(),
        source_orientation=volume.orientation(),
        orientation=orientation.upper(),
        perm=perm,
        flips=flips,
        crop=crop,
        out_shape=tuple(out_shape),  # type: ignore[arg-type]
        window=used_window,
        source_meta=dict(volume.meta),
    )
    return x[None, None].astype(np.float32, copy=False), transform  # [D, H, W] -> [1, 1, D, H, W]


def box_from_mask(mask: np.ndarray) -> Optional[list[float]]:
    """Model-grid mask [D, H, W] -> official normalised box (spec §7.3), or None when the mask is empty.

    [d_min/D, h_min/H, w_min/W, d_max/D, h_max/H, w_max/W], min/max voxel indices, each round(..., 3).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise PreprocessError(f"box_from_mask needs a [D, H, W] mask; got shape {mask.shape}")
    box = _foreground_box(mask > 0)
    if box is None:
        return None
    lo = [round(a / n, 3) for (a, _), n in zip(box, mask.shape)]
    hi = [round((b - 1) / n, 3) for (_, b), n in zip(box, mask.shape)]
    return lo + hi


def resize_trilinear(a: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """[D, H, W] -> out_shape, float32, identical (to float rounding) to torch trilinear, align_corners=False."""
    out = np.asarray(a, dtype=np.float32)
    for axis, n_out in enumerate(out_shape):  # depth first: it usually shrinks most, so later passes are cheap
        out = _resize_axis_linear(out, axis, int(n_out))
    return out


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weight of i1 for each output index (align_corners=False, no antialiasing)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize_axis_linear(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    if a.shape[axis] == n_out:
        return a  # torch's scale is then exactly 1: the identity
    i0, i1, w1 = _linear_weights(a.shape[axis], n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w1 = w1.reshape(shape)
    return np.take(a, i0, axis=axis) * (np.float32(1) - w1) + np.take(a, i1, axis=axis) * w1


def _resize_linear_threshold(mask: np.ndarray, out_shape: Sequence[int], threshold: float) -> np.ndarray:
    """Linear resize [D, H, W] -> out_shape then `> threshold`, depth last and in slabs of 16 output slices,
    so a full-size CT mask never exists as float32 (a 512x512x600 float mask would be 600 MB)."""
    small = _resize_axis_linear(_resize_axis_linear(mask, 2, out_shape[2]), 1, out_shape[1])
    i0, i1, w1 = _linear_weights(small.shape[0], out_shape[0])
    out = np.empty(tuple(out_shape), dtype=bool)
    for start in range(0, out_shape[0], 16):
        sl = slice(start, start + 16)
        w = w1[sl, None, None]
        out[sl] = small[i0[sl]] * (np.float32(1) - w) + small[i1[sl]] * w > threshold
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch mode="nearest" source index: floor(o * scale) with scale = n_in / n_out in float32, as torch's CPU
    kernel computes it (float64 would differ where o * scale lands on an integer)."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def _foreground_box(fg: np.ndarray) -> Optional[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Half-open bounding box ((z0, z1), (y0, y1), (x0, x1)) of True voxels, or None if there are none."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]
