"""How much of a patch is chest wall or mediastinum rather than lung: the position confound of the paper's
sampling, measured so that training and evaluation can match real nodule slices with backgrounds.

The paper takes background VOIs 5–25 mm from the lung boundary, while nodules sit anywhere in the lung. On
the phantom (64-patient cohorts of seeds 7 and 2026) 57–59 % of the background patches' central 40 px hold
chest wall (21 % of the crop on average) and none of the nodule patches' (the nodule itself left out); over
the whole 64 px patch, 94 % of the backgrounds against 13–17 % of the nodule slices: a critic — the evaluation's
C2ST or the discriminator D_I — tells them apart by the chest wall alone, and a generator fed such backgrounds
is pushed to erase the wall. `wall_fraction` measures it; vessels and spicules (small dense components) and
the nodule (with a margin) do not count.

Without the wall the lung itself still differs: the background VOIs lie near the pleura, the phantom's nodules
deep in the lung, and around them the real crops hold half the high-frequency texture and a third of the dense
pixels (cohort 7 of the README's protocol: high-pass sd 0.048 against 0.087, dense share 0.023 against
0.074, outside the nodule in the central 40 px). `surroundings_texture` measures both, `texture_pair` for
nodule slices and backgrounds alike, and `match_surroundings` picks, for each real crop, the backgrounds whose
surroundings are most alike, so the evaluation can test the nodule alone (its surroundings-matched C2ST) and
training can pair each nodule slice with such backgrounds (`TrainConfig.match_texture`).
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


DENSE_HU = -500.0          # denser than this is a vessel, an airway wall or a nodule's solid part
TEXTURE_SIGMA_PX = 2.0     # the high-pass that measures the surroundings' texture: image − Gaussian of this σ


def surroundings_texture(images: np.ndarray, window: tuple[float, float], footprints: np.ndarray,
                         crop: int) -> np.ndarray:
    """(N, 2) what lies around a nodule in each patch's central `crop` px: the share of dense pixels and the
    standard deviation of the high-passed image, both outside the footprint (N, S, S) grown by
    `NODULE_MARGIN_PX` — the nodule itself (a real one's mask, or where a generated one will be drawn)."""
    images = np.asarray(images, dtype=np.float32)
    grown = ndimage.binary_dilation(np.asarray(footprints) > 0.5, structure=np.ones((1, 3, 3), bool),
                                    iterations=NODULE_MARGIN_PX)
    outside = central_crop(~grown, crop)
    plain = central_crop(images, crop)
    high = plain - central_crop(ndimage.gaussian_filter(images, (0, TEXTURE_SIGMA_PX, TEXTURE_SIGMA_PX)), crop)
    dense = plain > hu_to_unit(np.float32(DENSE_HU), window)
    return np.array([[dense[n][outside[n]].mean(), high[n][outside[n]].std()] if outside[n].any()
                     else [np.nan, np.nan] for n in range(images.shape[0])])


def central_disc(count: int, size: int, area_px: float) -> np.ndarray:
    """(count, size, size) a centred disc of `area_px` pixels: where a generated nodule of that area will lie."""
    offsets = np.arange(size) - (size - 1) / 2
    disc = np.hypot(*np.meshgrid(offsets, offsets, indexing="ij")) <= np.sqrt(area_px / np.pi)
    return np.broadcast_to(disc, (count, size, size))


def texture_pair(nodule_images: np.ndarray, nodule_masks: np.ndarray, background_images: np.ndarray,
                 window: tuple[float, float], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """`surroundings_texture` of the nodule slices (outside their masks) and of the backgrounds (outside a
    central disc of the nodule slices' median area: where a generated nodule will lie), in that order."""
    area = float(np.median((np.asarray(nodule_masks) > 0.5).sum(axis=(1, 2))))
    size = background_images.shape[-1]
    return (surroundings_texture(nodule_images, window, nodule_masks, crop),
            surroundings_texture(background_images, window, central_disc(len(background_images), size, area), crop))


def match_surroundings(wanted: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
                       count: int = 1) -> np.ndarray:
    """For each row of `wanted` (N, F) the indices (N, count) of the `count` nearest rows of `candidates` (M, F),
    nearest first, with replacement across rows; each feature divided by its sd over both sets (so no
    feature's unit dominates); equal distances are broken at random. Not ranks: a pool of many nearest by
    rank reaches past the end of a tight group into outliers just beyond it."""
    both = np.concatenate([wanted, candidates])
    spread = both.std(axis=0)
    scaled = both / np.where(spread > 0, spread, 1.0)
    distance = ((scaled[: len(wanted), None, :] - scaled[None, len(wanted):, :]) ** 2).sum(-1)
    distance += 1e-9 * rng.random(distance.shape)
    count = min(int(count), len(candidates))
    nearest = np.argpartition(distance, count - 1, axis=1)[:, :count]
    order = np.take_along_axis(distance, nearest, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(nearest, order, axis=1)
