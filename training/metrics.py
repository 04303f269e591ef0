"""Metrics of the evaluation: image similarity (Table 1), nodule phenotype measures, clustering and regression
scores against a known truth, rank correlation with multiple-testing correction, diversity and realism.

Every function works on plain numpy arrays (one image at a time, or a small stack) so that it can be checked by
hand on tiny arrays (Testing/test_metrics.py); the evaluation CLI (`training.evaluate`) only loops over them.

Intensity scaling of the image metrics: images enter in the network range [-1, 1] (the HU window
[-1000, 500] mapped linearly, DESIGN.md decision 2) and are mapped linearly to [0, 1] (`to_unit_range`), so
MSE is in units of (window width)², and PSNR and SSIM use `data_range = 1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage, stats

# --- SSIM constants of Wang et al. (2004) ----------------------------------------------------------------
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5          # 2·int(3.5·1.5 + 0.5) + 1 = 11: the 11×11 Gaussian window of the paper
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PSNR_CAP_DB = 100.0          # PSNR of two identical images is +∞; capped so that means and JSON stay finite


def ssim_window_radius(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> int:
    """Half-width of the Gaussian window (5 for σ = 1.5: an 11×11 window)."""
    return int(truncate * sigma + 0.5)


# ============================================================================================================
# Image similarity (Table 1)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """[-1, 1] network range → [0, 1] (float64), the scaling every image metric here uses."""
    return (np.asarray(image, dtype=np.float64) + 1.0) * 0.5


def _region(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
    return mask


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared difference over the mask (whole image when None); NaN for an empty mask."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    region = _region(mask, a.shape)
    if not region.any():
        return float("nan")
    return float(np.mean((a[region] - b[region]) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0,
         cap_db: float = PSNR_CAP_DB) -> float:
    """10·log10(data_range² / MSE) over the mask, capped at `cap_db` (identical images); NaN for an empty mask."""
    error = mse(a, b, mask)
    if math.isnan(error):
        return error
    if error <= 0.0:
        return cap_db
    return float(min(cap_db, 10.0 * math.log10(data_range**2 / error)))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = SSIM_SIGMA,
             k1: float = SSIM_K1, k2: float = SSIM_K2) -> np.ndarray:
    """Local SSIM of Wang et al. — skimage's `structural_similarity` map with Gaussian weights (σ 1.5, 11×11
    window), population statistics, C1 = (K1·L)², C2 = (K2·L)², borders reflected."""
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    _, local = structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=sigma,
                                     use_sample_covariance=False, K1=k1, K2=k2, full=True)
    return local


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Mean SSIM. Whole image (mask None): mean over the interior that the 11×11 window covers without
    padding, exactly skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`. Masked: mean of the local SSIM map over the mask's pixels — the local
    statistics still use the full image, the region only selects which local values are averaged."""
    local = ssim_map(a, b, data_range)
    if mask is None:
        pad = ssim_window_radius()
        interior = local[pad:-pad, pad:-pad] if min(local.shape) > 2 * pad else local
        return float(interior.mean())
    region = _region(mask, local.shape)
    if not region.any():
        return float("nan")
    return float(local[region].mean())


def image_scores(synthetic: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """MSE, SSIM and PSNR of one synthetic image against its reference, both in [-1, 1], over a region."""
    a, b = to_unit_range(synthetic), to_unit_range(reference)
    return {"mse": mse(a, b, mask), "ssim": ssim(a, b, mask), "psnr": psnr(a, b, mask)}


# ============================================================================================================
# Masks and nodule phenotype measures


def disc(radius_px: int) -> np.ndarray:
    """Boolean disc structuring element of a radius in pixels."""
    r = int(radius_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2) <= r * r


def dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Binary dilation by a disc (radius 0 = the mask itself)."""
    mask = np.asarray(mask, dtype=bool)
    if radius_px <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=disc(radius_px))


def erode(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Binary erosion by a disc; pixels outside the image count as background."""
    mask = np.asarray(mask, dtype=bool)
    if radius_px <= 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, structure=disc(radius_px), border_value=0)


def largest_component(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The largest `connectivity`-connected (8 or 4) component: a generated mask's stray specks must not count
    as nodule."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


#: Above this the background already holds tissue (vessel, chest wall, mediastinum), not aerated lung.
TISSUE_HU = -500.0


def placement(mask: np.ndarray, background_hu: np.ndarray, spacing_mm: float) -> tuple[float, float, float]:
    """Where a generated nodule (a binary mask, its largest component) lies in its patch: (distance of its
    centroid from the patch centre in mm, share of it on tissue the background already had (> TISSUE_HU),
    the same share for a disc of its area at the centre). NaNs for an empty mask.

    Why: the generator is asked for a nodule at the patch centre (the point a user clicks), in lung. A mask
    drawn off centre over existing wall or vessel satisfies the size and density measures without drawing
    a nodule; the centred disc says how much tissue a nodule at the point itself would cover.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return float("nan"), float("nan"), float("nan")
    size = mask.shape[-1]
    centre = (size - 1) / 2.0
    tissue = np.asarray(background_hu) > TISSUE_HU
    grid_rows, grid_cols = np.mgrid[0:size, 0:size]
    # at least the 4 central pixels (an even patch has no centre pixel), so a one-pixel mask has a disc too
    radius = max(np.sqrt(mask.sum() / np.pi), np.sqrt(0.5))
    disc = np.hypot(grid_rows - centre, grid_cols - centre) <= radius
    return centroid_offset_mm(mask, spacing_mm), float(tissue[mask].mean()), float(tissue[disc].mean())


def centroid_offset_mm(mask: np.ndarray, spacing_mm: float) -> float:
    """Distance (mm) of a binary mask's centroid from its square patch's centre; NaN for an empty mask."""
    rows, cols = np.nonzero(np.asarray(mask, dtype=bool))
    if rows.size == 0:
        return float("nan")
    centre = (np.asarray(mask).shape[-1] - 1) / 2.0
    return float(np.hypot(rows.mean() - centre, cols.mean() - centre)) * float(spacing_mm)


def equivalent_diameter_mm(mask: np.ndarray, spacing_mm: float) -> float:
    """Diameter of the disc with the mask's area: 2·sqrt(area / π), area in mm² (pixel count · spacing²)."""
    area_mm2 = float(np.count_nonzero(mask)) * float(spacing_mm) ** 2
    return 2.0 * math.sqrt(area_mm2 / math.pi)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """The two-pixel band straddling the mask's edge (one pixel inside, one outside): where an edge's
    gradient peaks whichever side the threshold put it."""
    mask = np.asarray(mask, dtype=bool)
    return dilate(mask, 1) & ~erode(mask, 1)


def gradient_magnitude(image: np.ndarray, spacing_mm: float = 1.0) -> np.ndarray:
    """|∇image| by central differences, per mm."""
    gy, gx = np.gradient(np.asarray(image, dtype=np.float64), float(spacing_mm))
    return np.hypot(gy, gx)


def margin_gradient(image: np.ndarray, mask: np.ndarray, spacing_mm: float = 1.0) -> float:
    """Mean gradient magnitude on the mask boundary band (image units per mm); NaN for an empty mask."""
    band = boundary_band(mask)
    if not band.any() or not np.any(mask):
        return float("nan")
    return float(gradient_magnitude(image, spacing_mm)[band].mean())


def margin_sharpness(image: np.ndarray, mask: np.ndarray, spacing_mm: float = 1.0,
                     far_px: tuple[int, int] = (3, 5)) -> float:
    """Slope across the mask edge divided by the edge's own height (1/mm): ≈ 1/edge width, independent of
    how dense the nodule is; 1/spacing for a perfect step, smaller the blurrier the margin.

    slope = (mean of the mask's inner boundary layer − mean of the outer layer) / spacing; height =
    2 × (mean of the two layers − mean of the ring `far_px` pixels outside), which assumes the mask boundary
    sits at half height — true for a mask thresholded at 0.5 of a symmetric edge (the phantom's occupancy
    ≥ 0.5, a generator's mask > 0.5). Why not the raw boundary gradient: a faint ground-glass nodule has a
    small gradient however sharp its edge. Why not the mean inside the mask as the height: a solid core
    inside a ground-glass rim inflates it (on mixed nodules that measure did not track the blur at all,
    while this one keeps |ρ| ≈ 0.8 with the true blur at 30 HU noise). NaN for an empty mask or no height.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return float("nan")
    image = np.asarray(image, dtype=np.float64)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    inner = mask & (inside <= 1.0)
    outer = ~mask & (outside <= 1.0)
    far = ~mask & (outside > far_px[0] - 0.5) & (outside <= far_px[1] + 0.5)
    if not (inner.any() and outer.any() and far.any()):
        return float("nan")
    a, b, lo = float(image[inner].mean()), float(image[outer].mean()), float(image[far].mean())
    height = a + b - 2.0 * lo
    if abs(height) < 1e-6:
        return float("nan")
    return (a - b) / float(spacing_mm) / height


def perimeter_mm(mask: np.ndarray, spacing_mm: float = 1.0) -> float:
    """Perimeter of the mask's outline (skimage's 4-connected estimate with diagonal weights), in mm."""
    from skimage.measure import perimeter

    return float(perimeter(np.asarray(mask, dtype=bool), neighborhood=4)) * float(spacing_mm)


def compactness(mask: np.ndarray) -> float:
    """4π·area / perimeter² (1 for a disc, smaller for lobulated or spiculated outlines); NaN when empty."""
    mask = np.asarray(mask, dtype=bool)
    area = float(np.count_nonzero(mask))
    length = perimeter_mm(mask, 1.0)
    if area == 0.0 or length <= 0.0:
        return float("nan")
    return 4.0 * math.pi * area / length**2


def thin_strands(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels a binary opening with the 3×3 cross removes: its parts at most about 2 px wide."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(2, 1))


def spicule_area_mm2(mask: np.ndarray, spacing_mm: float = 1.0) -> float:
    """Area (mm²) of the mask's thin strands (`thin_strands`: spicules, not the body). On the phantom's real
    nodules (cohort 7, area-weighted over slices) its Spearman ρ with the true spiculation is 0.73, compactness's
    0.34. 0 for an empty mask."""
    return float(np.count_nonzero(thin_strands(mask))) * float(spacing_mm) ** 2


# The outline's lobes: harmonics LOBE_HARMONICS of the body's radius r(θ), sampled on LOBE_RAYS rays from its centroid.
# Why 3-8: harmonic 1 is where the centroid sits and 2 an ellipse (elongation, a nuisance in the phantom); the
# phantom's 4-8 lobes, each about 0.35 rad wide, put their weight at 3-8.
LOBE_HARMONICS = (3, 8)
LOBE_RAYS = 128
LOBE_STEP_PX = 0.25
LOBE_MIN_PX = 8          # a smaller body has too few boundary pixels for an outline


def _body(mask: np.ndarray) -> np.ndarray:
    """The mask without its thin strands (the opening `thin_strands` uses), its largest 4-connected piece."""
    mask = np.asarray(mask, dtype=bool)
    return largest_component(mask & ~thin_strands(mask), connectivity=4)


def _lobe_harmonics(body: np.ndarray) -> float:
    """RMS amplitude of r(θ)'s harmonics LOBE_HARMONICS over r's mean: r along each ray is where the body's
    bilinear occupancy first falls under ½ (steps of LOBE_STEP_PX)."""
    rows, cols = np.nonzero(body)
    theta = 2.0 * math.pi * np.arange(LOBE_RAYS) / LOBE_RAYS
    steps = np.arange(0.0, float(max(body.shape)), LOBE_STEP_PX)
    sample_r = rows.mean() + steps[None, :] * np.sin(theta)[:, None]
    sample_c = cols.mean() + steps[None, :] * np.cos(theta)[:, None]
    occupancy = ndimage.map_coordinates(body.astype(np.float64), [sample_r.ravel(), sample_c.ravel()], order=1,
                                        cval=0.0).reshape(LOBE_RAYS, steps.size)
    outside = occupancy < 0.5
    radius = steps[np.where(outside.any(axis=1), outside.argmax(axis=1), steps.size - 1)]
    if radius.mean() <= 0.0:
        return float("nan")
    spectrum = np.abs(np.fft.rfft(radius)) / LOBE_RAYS
    low, high = LOBE_HARMONICS
    return float(math.sqrt(2.0 * float((spectrum[low: high + 1] ** 2).sum())) / radius.mean())


@lru_cache(maxsize=1)
def _disc_lobe_floor() -> tuple[np.ndarray, np.ndarray]:
    """(radii px, harmonic amplitude) of rasterised discs, averaged over 3 × 3 sub-pixel centres: what
    pixelation alone reads, which grows as the disc shrinks (0.027 at a 5-px radius, 0.007 at 15)."""
    radii = np.arange(1.5, 40.5, 0.5)
    offsets = (-1.0 / 3.0, 0.0, 1.0 / 3.0)
    floor = []
    for radius in radii:
        size = 2 * int(radius) + 8
        grid_r, grid_c = np.mgrid[:size, :size].astype(np.float64)
        values = [_lobe_harmonics((grid_r - size / 2 - dr) ** 2 + (grid_c - size / 2 - dc) ** 2 <= radius**2)
                  for dr in offsets for dc in offsets]
        floor.append(float(np.mean(values)))
    return radii, np.asarray(floor)


def lobe_amplitude(mask: np.ndarray) -> float:
    """How lobulated the outline is: the RMS amplitude of harmonics 3-8 of the body's radius r(θ) relative to its
    mean radius, minus what a rasterised disc of the same area reads (the pixelation floor; 0 for a disc, about
    a/√2 for r = R(1 + a·cos kθ), 3 ≤ k ≤ 8; an ellipse and thin strands read ≈ 0). The body is the mask without
    its thin strands, its largest piece. On the phantom's real nodule slices (area-weighted per patient) its
    Spearman ρ with the true lobulation is 0.62-0.75 on cohorts 2026, 5 and 7, where compactness reads 0.17-0.29
    (and follows spiculation and margin more). NaN below LOBE_MIN_PX body pixels."""
    body = _body(mask)
    area = int(np.count_nonzero(body))
    if area < LOBE_MIN_PX:
        return float("nan")
    radii, floor = _disc_lobe_floor()
    return _lobe_harmonics(body) - float(np.interp(math.sqrt(area / math.pi), radii, floor))


LONG_STRAND_PX = 3   # a strand of at least this many pixels: longer than the notch of a serrated outline


def long_strands(mask: np.ndarray, min_px: int = LONG_STRAND_PX) -> np.ndarray:
    """The thin strands (`thin_strands`) that form 8-connected pieces of at least `min_px` pixels: spicules that
    reach out, not the one-pixel teeth of a serrated outline."""
    labels, count = ndimage.label(thin_strands(mask), structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(np.shape(mask), dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return sizes[labels] >= min_px


def long_strand_area_mm2(mask: np.ndarray, spacing_mm: float = 1.0, min_px: int = LONG_STRAND_PX) -> float:
    """Area (mm²) of the long strands (`long_strands`), which `spicule_area_mm2` counts with the teeth of a
    serrated outline. On cohort 2026's real nodules its ρ with the true spiculation is 0.84 (all strands 0.72)."""
    return float(np.count_nonzero(long_strands(mask, min_px))) * float(spacing_mm) ** 2


STRAND_SURROUND_PX = 2


def strand_contrast_hu(image_hu: np.ndarray, mask: np.ndarray) -> float:
    """How the long strands stand out in the image: their pixels' mean HU minus the mean HU of the pixels within
    STRAND_SURROUND_PX of them outside the mask. The phantom's real spicules are solid strands; a strand drawn in
    the label but blurred into the lung in the image reads low. NaN without a long strand."""
    strands, surround = _strands_and_surround(np.asarray(mask, dtype=bool))
    return _contrast_hu(np.asarray(image_hu, dtype=np.float64), strands, surround)


def _strands_and_surround(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A boolean mask's long strands and the pixels within STRAND_SURROUND_PX of them outside the mask."""
    strands = long_strands(mask)
    return strands, ndimage.binary_dilation(strands, iterations=STRAND_SURROUND_PX) & ~mask


def _contrast_hu(image_hu: np.ndarray, pixels: np.ndarray, reference: np.ndarray) -> float:
    """Mean HU of `pixels` minus that of `reference`; NaN where either is empty."""
    if not pixels.any() or not reference.any():
        return float("nan")
    return float(image_hu[pixels].mean() - image_hu[reference].mean())


#: Above this a long strand's surround is tissue it crosses (vessel, chest wall). Not TISSUE_HU's −500: a real
#: strand's own partial-volume rim reaches it (cohort 29: 7.4 % of the real strands' surround lies above −500 HU,
#: 0.5 % above −200), and the "tissue" it found was that rim, at 186 HU under the strand.
STRAND_TISSUE_HU = -200.0


def strand_contrast_split_hu(image_hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """`strand_contrast_hu` split by what the long strands run through: (over the lung, over tissue).

    The surround's pixels at > STRAND_TISSUE_HU away from the nodule's body (more than STRAND_SURROUND_PX from the mask
    without its long strands, whose partial-volume rim is not tissue) are tissue: a vessel or the chest wall that
    a strand crosses or touches. A strand pixel whose 8 neighbours outside the mask (the rim left out) are mostly
    tissue lies over tissue and is read against those tissue neighbours; the rest are read against the surround's
    other pixels (over the lung). Why: a spicule that crosses a vessel merges with it (the phantom blends its
    strands into whatever they cross, at about the nodule's solid value), so over tissue a strand should read ≈ 0
    or below, and only over the lung is its contrast the lift a painting sets; `strand_contrast_hu` mixes the two
    by how many strands cross tissue. Without tissue the first equals `strand_contrast_hu`. NaN for a part without
    pixels."""
    mask = np.asarray(mask, dtype=bool)
    strands, surround = _strands_and_surround(mask)
    if not strands.any() or not surround.any():
        return float("nan"), float("nan")
    image_hu = np.asarray(image_hu, dtype=np.float64)
    outside = ~mask & ~ndimage.binary_dilation(mask & ~strands, iterations=STRAND_SURROUND_PX)
    tissue = surround & outside & (image_hu > STRAND_TISSUE_HU)
    neighbourhood = np.ones((3, 3))
    tissue_neighbours = ndimage.convolve(tissue.astype(np.float64), neighbourhood, mode="constant")
    outside_neighbours = ndimage.convolve(outside.astype(np.float64), neighbourhood, mode="constant")
    over_tissue = strands & (2.0 * tissue_neighbours > outside_neighbours)
    tissue_reference = tissue & ndimage.binary_dilation(over_tissue, structure=neighbourhood.astype(bool))
    return (_contrast_hu(image_hu, strands & ~over_tissue, surround & ~tissue),
            _contrast_hu(image_hu, over_tissue, tissue_reference))


def strand_contrast_lung_hu(image_hu: np.ndarray, mask: np.ndarray) -> float:
    """The long strands' contrast where they run through the lung (`strand_contrast_split_hu`)."""
    return strand_contrast_split_hu(image_hu, mask)[0]


def strand_over_tissue_hu(image_hu: np.ndarray, mask: np.ndarray) -> float:
    """How far the long strands stand over the tissue they cross (`strand_contrast_split_hu`): ≈ 0 where a
    strand merges with a vessel, as the real ones do; NaN where no strand touches tissue."""
    return strand_contrast_split_hu(image_hu, mask)[1]


STRAND_RIM_PX = 3    # the lung a strand lifts: more than this from the mask (beyond the strands' partial-volume rim)
STRAND_LUNG_PX = 6   # and within this of the strands


def strand_lift_hu(image_hu: np.ndarray, mask: np.ndarray) -> float:
    """How far the long strands rise over the lung they cross: their pixels' mean HU minus the mean HU of the
    pixels within STRAND_LUNG_PX of them and more than STRAND_RIM_PX from the mask. Unlike `strand_contrast_hu`
    the reference is not the strands' own rim, which partial volume lifts too (on cohort 2026's real strands the
    lift reads 418 HU where the contrast reads 295): it is what a strand painted at the background + a lift
    (`GeneratorConfig.spicule_contrast`) is calibrated to. NaN without a long strand or lung around it."""
    mask = np.asarray(mask, dtype=bool)
    strands = long_strands(mask)
    lung = ndimage.binary_dilation(strands, iterations=STRAND_LUNG_PX) & ~ndimage.binary_dilation(
        mask, iterations=STRAND_RIM_PX)
    return _contrast_hu(np.asarray(image_hu, dtype=np.float64), strands, lung)


def median_strand_contrast_hu(images_hu: np.ndarray, masks: np.ndarray,
                              measure: Callable[[np.ndarray, np.ndarray], float] = strand_contrast_hu) -> float:
    """Median `measure` (`strand_contrast_hu`, or `strand_lift_hu`) over the (N, H, W) slices that carry a long
    strand (masks nonzero inside); NaN when none does: the real strands' contrast, which the evaluation compares
    with, or their lift, which drawn strands can be painted at (`GeneratorConfig.spicule_contrast`)."""
    values = np.array([measure(h, np.asarray(m) > 0) for h, m in zip(images_hu, masks)], dtype=float)
    return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")


def carries_long_strand(masks: np.ndarray) -> np.ndarray:
    """(N,) bool for (N, H, W) masks (nonzero = inside): whether each has a long strand (`long_strands`). The real
    slices' share of them is what drawn strands are calibrated to and compared with."""
    return np.array([long_strands(np.asarray(m) > 0).any() for m in masks], dtype=bool)


CORE_MIN_PX = 40   # mask pixels (a 6.7 mm disc at 0.94 mm/px): below this the inner half is a few pixels


def core_contrast_hu(image_hu: np.ndarray, mask: np.ndarray) -> float:
    """Mean HU of the mask's inner half (within R/2 of its centroid, R = √(area / π) in pixels) minus the mean
    of its outer half: a solid core in a ground-glass nodule is positive, a flat nodule ≈ 0. NaN below
    CORE_MIN_PX pixels. The losses' core term is the differentiable twin of this."""
    mask = np.asarray(mask, dtype=bool)
    pixels = int(np.count_nonzero(mask))
    if pixels < CORE_MIN_PX:
        return float("nan")
    rows, cols = np.nonzero(mask)
    distance = np.hypot(rows - rows.mean(), cols - cols.mean())
    inner = distance < np.sqrt(pixels / math.pi) / 2
    values = np.asarray(image_hu, dtype=np.float64)[rows, cols]
    if inner.all() or not inner.any():
        return float("nan")
    return float(values[inner].mean() - values[~inner].mean())


NODULE_FEATURES: tuple[str, ...] = ("diameter_mm", "mean_hu", "std_hu", "margin_sharpness", "compactness")


def nodule_features(image_hu: np.ndarray, mask: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """Hand-crafted measures of one nodule slice (HU image and its mask): size, density, its spread, margin.

    `diameter_mm` equivalent diameter; `mean_hu`, `std_hu` inside the mask; `margin_gradient` (HU/mm) mean
    gradient magnitude on the boundary band; `margin_sharpness` (1/mm) the slope across the edge over the
    edge's height (`margin_sharpness`); `compactness`; `lobe_amplitude`; `spicule_area_mm2`; `long_strand_area_mm2`;
    `strand_contrast_hu` and its parts over the lung and over tissue; `core_contrast_hu`.
    An empty mask gives diameter 0 and NaN for the rest.
    """
    mask = np.asarray(mask, dtype=bool)
    image_hu = np.asarray(image_hu, dtype=np.float64)
    if not mask.any():
        return {"diameter_mm": 0.0, "area_mm2": 0.0, "mean_hu": float("nan"), "std_hu": float("nan"),
                "margin_gradient": float("nan"), "margin_sharpness": float("nan"), "compactness": float("nan"),
                "lobe_amplitude": float("nan"), "spicule_area_mm2": float("nan"), "long_strand_area_mm2": float("nan"),
                "strand_contrast_hu": float("nan"), "strand_contrast_lung_hu": float("nan"),
                "strand_over_tissue_hu": float("nan"), "core_contrast_hu": float("nan")}
    values = image_hu[mask]
    lung, over_tissue = strand_contrast_split_hu(image_hu, mask)
    return {
        "diameter_mm": equivalent_diameter_mm(mask, spacing_mm),
        "area_mm2": float(mask.sum()) * float(spacing_mm) ** 2,
        "mean_hu": float(values.mean()),
        "std_hu": float(values.std()),
        "margin_gradient": margin_gradient(image_hu, mask, spacing_mm),
        "margin_sharpness": margin_sharpness(image_hu, mask, spacing_mm),
        "compactness": compactness(mask),
        "lobe_amplitude": lobe_amplitude(mask),
        "spicule_area_mm2": spicule_area_mm2(mask, spacing_mm),
        "long_strand_area_mm2": long_strand_area_mm2(mask, spacing_mm),
        "strand_contrast_hu": strand_contrast_hu(image_hu, mask),
        "strand_contrast_lung_hu": lung, "strand_over_tissue_hu": over_tissue,
        "core_contrast_hu": core_contrast_hu(image_hu, mask),
    }


def patient_nodule_features(images_hu: np.ndarray, masks: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """Features of one patient's nodule from all its slices: size = the largest slice's equivalent diameter
    (the axial size a reader would measure); every other feature is the area-weighted mean over slices."""
    per_slice = [nodule_features(img, m, spacing_mm) for img, m in zip(images_hu, masks)]
    areas = np.array([f["area_mm2"] for f in per_slice])
    if areas.sum() == 0:
        return per_slice[0]
    result = {"diameter_mm": max(f["diameter_mm"] for f in per_slice), "area_mm2": float(areas.max())}
    for key in per_slice[0]:
        if key in result:
            continue
        values = np.array([f[key] for f in per_slice])
        ok = np.isfinite(values) & (areas > 0)
        result[key] = float(np.average(values[ok], weights=areas[ok])) if ok.any() else float("nan")
    return result


# ============================================================================================================
# Scores against a known truth


def adjusted_rand(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Adjusted Rand index (Hubert & Arabie): 0 for chance, 1 for identical partitions."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(labels_true, labels_pred))


def normalized_mutual_info(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """NMI with the arithmetic-mean normalisation (sklearn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels_true, labels_pred))


def kmeans_labels(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (k-means++, 10 restarts) labels of the rows; k is capped at the number of distinct rows."""
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float64)
    distinct = np.unique(features, axis=0).shape[0]
    k = max(1, min(int(k), distinct))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def cross_validated_r2(features: np.ndarray, target: np.ndarray, seed: int = 0, folds: int = 5,
                       loo_below: int = 20) -> float:
    """Out-of-fold R² of a ridge regression (standardised features, penalty chosen by inner
    generalised CV over 10^-3…10^4) predicting `target`: 5-fold, or leave-one-out when fewer than
    `loo_below` samples. Rows with a non-finite target are dropped; NaN when fewer than 4 remain."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, LeaveOneOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    ok = np.isfinite(target)
    features, target = features[ok], target[ok]
    if target.size < 4 or np.ptp(target) == 0:
        return float("nan")
    splitter = LeaveOneOut() if target.size < loo_below else KFold(folds, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    predicted = cross_val_predict(model, features, target, cv=splitter)
    return float(r2_score(target, predicted))


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """(ρ, two-sided p, n) over the pairs where both are finite; (NaN, NaN, n) when fewer than 3 pairs or a
    constant side (ρ is undefined there, which must not read as 'no correlation')."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), float("nan"), n
    result = stats.spearmanr(x[ok], y[ok])
    return float(result.statistic), float(result.pvalue), n


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """BH-adjusted p-values (q-values, scipy's `false_discovery_control`) in the input order. NaN p-values
    stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


# ============================================================================================================
# Diversity (mode collapse) and realism (classifier two-sample test)


def mean_pairwise_l1(images: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference over all pairs of a stack (n,H,W) of [0,1] images, inside `mask` if given
    (one (H,W) region for every pair); 0 when the stack holds identical images, NaN for n < 2."""
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[0]
    if n < 2:
        return float("nan")
    region = _region(mask, images.shape[1:])
    if not region.any():
        return float("nan")
    flat = images[:, region]
    total, pairs = 0.0, 0
    for i in range(n - 1):
        total += float(np.abs(flat[i + 1 :] - flat[i]).mean(axis=1).sum())
        pairs += n - 1 - i
    return total / pairs


def classifier_two_sample_test(real: np.ndarray, fake: np.ndarray, seed: int = 0, epochs: int = 12,
                               real_groups: np.ndarray | None = None, fake_groups: np.ndarray | None = None,
                               batch_size: int = 32) -> dict[str, float]:
    """Realism as a classifier two-sample test (Lopez-Paz & Oquab 2017): a small CNN learns to tell real
    patches from synthetic ones on one half of each, and its accuracy on the other half is reported — 0.5
    means the two sets cannot be told apart, 1.0 that they always can.

    Both sets are cut to the smaller one's size (balanced classes). With `real_groups` / `fake_groups` (e.g. the
    donor of each patch) the halves are split by group, so slices of one nodule never sit on both sides: a
    critic that memorises a patient is not rewarded. A fixed number of `epochs` (never a time budget), so the
    result does not depend on the machine's load. `collapsed` is True when the critic gave every test patch
    the same answer (its accuracy then says nothing about realism).
    """
    import torch

    real = np.asarray(real, dtype=np.float32)
    fake = np.asarray(fake, dtype=np.float32)
    rng = np.random.default_rng([seed, 0xC257])
    n = min(real.shape[0], fake.shape[0])
    if n < 4:
        return {"accuracy": float("nan"), "stderr": float("nan"), "n_train": 0, "n_test": 0, "epochs": 0,
                "collapsed": False}
    real_train, real_test = _grouped_halves(real, real_groups, n, rng)
    fake_train, fake_test = _grouped_halves(fake, fake_groups, n, rng)
    x_train = np.concatenate([real_train, fake_train])[:, None]
    y_train = np.concatenate([np.ones(len(real_train)), np.zeros(len(fake_train))]).astype(np.float32)
    x_test = np.concatenate([real_test, fake_test])[:, None]
    y_test = np.concatenate([np.ones(len(real_test)), np.zeros(len(fake_test))]).astype(np.float32)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a ~6 k-parameter CNN: one thread is faster than several fighting for cores
    try:
        logits = _train_critic(x_train, y_train, x_test, seed, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)
    predicted = (logits > 0).float().numpy()
    # balanced accuracy: the halves of a grouped split need not hold equal counts of each class
    accuracy = float(0.5 * (predicted[y_test == 1].mean() + (1 - predicted[y_test == 0]).mean()))
    return {
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / y_test.size),
        "n_train": int(y_train.size),
        "n_test": int(y_test.size),
        "epochs": int(epochs),
        "collapsed": bool(np.all(predicted == predicted[0])),
    }


def _grouped_halves(images: np.ndarray, groups: np.ndarray | None, n: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` images drawn at random, split in two halves; by whole groups when `groups` is given."""
    chosen = rng.permutation(images.shape[0])[:n]
    if groups is None:
        return images[chosen[: n // 2]], images[chosen[n // 2 :]]
    groups = np.asarray(groups)[chosen]
    names = rng.permutation(np.unique(groups))
    first = np.isin(groups, names[: max(1, names.size // 2)])
    if first.all():  # a single group: fall back to a random split rather than an empty half
        first = np.arange(n) < n // 2
    return images[chosen[first]], images[chosen[~first]]


def _train_critic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int, epochs: int,
                  batch_size: int):
    """Train the two-sample critic for `epochs`; returns its test logits as a tensor."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    # group norm, not batch norm: with a few hundred patches the running statistics of batch norm lag the
    # weights, and the evaluated critic answered one class for everything (a "collapsed" critic)
    critic = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.LeakyReLU(0.2),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1),
    )
    optimiser = torch.optim.Adam(critic.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _epoch in range(epochs):
        critic.train()
        order = torch.randperm(xt.shape[0], generator=generator)
        for i in range(0, order.numel(), batch_size):
            idx = order[i : i + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(critic(xt[idx]).squeeze(1), yt[idx])
            loss.backward()
            optimiser.step()
    critic.eval()
    with torch.no_grad():
        return torch.cat([critic(torch.from_numpy(x_test[i : i + 256])).squeeze(1)
                          for i in range(0, x_test.shape[0], 256)])
