"""PNG overlay: a few axial slices of a volume with the mask contour and boxes drawn (matplotlib, Agg).

Slices are shown in the radiological axial view (the canonical "SPL" orientation of preprocess: anterior at
the top, the patient's right on the left of the image), whatever the stored orientation, so a reviewer sees
every scan the same way. Boxes are given in source voxel indices [z0, y0, x0, z1, y1, x1] (inclusive), as
`Transform.box_to_voxels` returns them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from m3d_edge.imaging.volume import (
    ImagingError,
    Volume,
    atomic_output,
    reorient_array,
    reorient_index_matrix,
    reorientation,
)

DISPLAY = "SPL"  # display orientation (same as preprocess.CANONICAL; not imported to keep imaging below preprocess)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU (level 40, width 400)


def write_overlay(
    volume: Volume,
    path: str | os.PathLike,
    *,
    mask: Optional[Volume] = None,
    boxes: Sequence[Sequence[int]] = (),
    n_slices: int = 3,
    slices: Optional[Sequence[int]] = None,
    window: Optional[tuple[float, float]] = None,
    title: str = "",
) -> Path:
    """Write a PNG of `n_slices` axial slices (or the given source z indices) with mask contour and boxes.

    Default slices: evenly through the mask (or the first box, or the whole volume). window: HU display
    window (default soft tissue for CT, 1st-99th percentile otherwise).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on an edge box; the caller only wants a file
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if mask is not None and mask.shape != volume.shape:
        raise ImagingError(f"mask shape {mask.shape} differs from the volume {volume.shape}")
    perm, flips = reorientation(volume.affine, DISPLAY)
    image = reorient_array(volume.array, perm, flips)
    shown_mask = reorient_array(np.asarray(mask.array) > 0, perm, flips) if mask is not None else None
    # source voxel -> display voxel: the inverse of display -> source
    to_display = np.linalg.inv(reorient_index_matrix(volume.shape, perm, flips))
    shown_boxes = []
    for b in boxes:
        corners = np.array([[b[0], b[1], b[2], 1.0], [b[3], b[4], b[5], 1.0]]) @ to_display.T
        shown_boxes.append((corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)))

    depth = image.shape[0]
    if slices is not None:
        chosen = sorted({int(np.rint((to_display @ np.array([z, 0, 0, 1.0]))[0])) for z in slices})
    else:
        if shown_mask is not None and shown_mask.any():
            z_hit = np.flatnonzero(shown_mask.any(axis=(1, 2)))
            lo, hi = z_hit[0], z_hit[-1]
        elif shown_boxes:
            lo, hi = int(shown_boxes[0][0][0]), int(shown_boxes[0][1][0])
        else:
            lo, hi = 0, depth - 1
        chosen = sorted({int(round(v)) for v in np.linspace(lo, hi, n_slices + 2)[1:-1]}) or [depth // 2]
    if window is None:
        window = SOFT_TISSUE_WINDOW if volume.modality == "CT" else tuple(np.percentile(image, [1, 99]))

    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)[list(perm)]  # display (z, y, x) mm
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 4), squeeze=False)
    for ax, z in zip(axes[0], chosen):
        # aspect = row spacing / column spacing, so anisotropic pixels look right
        ax.imshow(image[z], cmap="gray", vmin=window[0], vmax=window[1], aspect=spacing[1] / spacing[2],
                  interpolation="nearest")
        if shown_mask is not None and shown_mask[z].any():
            ax.contour(shown_mask[z].astype(np.uint8), levels=[0.5], colors="red", linewidths=1.0)
        for lo, hi in shown_boxes:
            if lo[0] <= z <= hi[0]:
                ax.add_patch(Rectangle((lo[2] - 0.5, lo[1] - 0.5), hi[2] - lo[2] + 1, hi[1] - lo[1] + 1,
                                       fill=False, edgecolor="yellow", linewidth=1.2))
        ax.set_title(f"axial {z + 1}/{depth}, feet to head", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)  # figures are global state in pyplot; close even when saving fails
    return path
