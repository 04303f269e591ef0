"""How much of a patch is chest wall or mediastinum rather than lung: the position confound of the paper's
sampling, measured so that training and evaluation can match real nodule slices with backgrounds.

The paper takes background VOIs 5–25 mm from the lung boundary, while nodules sit anywhere in the lung. On
the phantom (64-patient cohorts of seeds 7 and 2026) 57–59 % of the background patches' central 40 px hold
chest wall (21 % of the crop on average) and none of the nodule patches' (the nodule itself left out); over
the whole 64 px patch, 94 % of the backgrounds against 13–17 % of the nodule slices: a critic — the evaluation's
C2ST or the discriminator D_I — tells them apart by the chest wall alone, and a generator fed such backgrounds
is pushed to erase the wall. `wall_fraction` measures it; vessels and spicules (small dense components) and
the nodule (with a margin) do not count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from RadiogenomicGANLib.intensity import hu_to_unit

WALL_HU = -300.0          # denser than this is tissue, not aerated lung
MIN_WALL_PX = 150          # a dense component this large (≈ 130 mm² at 0.94 mm/px) is wall, not a vessel
NODULE_MARGIN_PX = 4       # the nodule's mask grown by this much is left out (its soft edge, short spicules)
LUNG_ONLY = 0.02           # a patch with at most this wall fraction counts as surrounded by lung


def central_crop(images: np.ndarray, size: int) -> np.ndarray:
    """The central size × size pixels of (N, S, S) patches (all of them when size ≥ S)."""
    full = images.shape[-1]
    size = min(size, full)
    start = (full - size) // 2
    return images[..., start : start + size, start : start + size]


def wall_fraction(images: np.ndarray, window: tuple[float, float], masks: np.ndarray | None = None,
                  crop: int | None = None) -> np.ndarray:
    """(N,) fraction of each patch (its central `crop` px when given) taken by large dense components: chest
    wall, mediastinum, diaphragm. `images` (N, S, S) in [-1, 1] under the HU `window`; `masks` (N, S, S) the
    nodules to leave out, or None for backgrounds."""
    images = np.asarray(images)
    dense = images > hu_to_unit(np.float32(WALL_HU), window)
    if masks is not None:
        grown = ndimage.binary_dilation(np.asarray(masks) > 0.5, structure=np.ones((1, 3, 3), bool),
                                        iterations=NODULE_MARGIN_PX)
        dense &= ~grown
    if crop is not None:
        dense = central_crop(dense, crop)
    fractions = np.empty(dense.shape[0])
    for n, plane in enumerate(dense):
        sizes = np.bincount(ndimage.label(plane)[0].ravel())[1:]  # empty without a dense pixel
        fractions[n] = sizes[sizes >= MIN_WALL_PX].sum() / plane.size
    return fractions
