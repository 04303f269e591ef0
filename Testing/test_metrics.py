"""Every evaluation metric against hand-computed values on tiny arrays (training/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from training import metrics as M

# --- MSE, PSNR, intensity scaling ----------------------------------------------------------------------------


def test_mse_whole_and_masked():
    a = np.array([[0.0, 1.0], [1.0, 0.0]])
    b = np.zeros((2, 2))
    assert M.mse(a, b) == pytest.approx(0.5)
    assert M.mse(a, b, np.array([[True, False], [False, False]])) == 0.0
    assert M.mse(a, b, np.array([[False, True], [True, True]])) == pytest.approx(2 / 3)
    assert math.isnan(M.mse(a, b, np.zeros((2, 2), bool)))
    with pytest.raises(ValueError):
        M.mse(a, np.zeros((3, 3)))


def test_psnr_known_pair_cap_and_empty_region():
    a, b = np.full((4, 4), 0.5), np.full((4, 4), 0.6)       # MSE 0.01 → 10·log10(1/0.01) = 20 dB
    assert M.psnr(a, b) == pytest.approx(20.0)
    assert M.psnr(a, b, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    assert M.psnr(a, a) == M.PSNR_CAP_DB
    assert math.isnan(M.psnr(a, b, np.zeros((4, 4), bool)))


def test_image_scores_map_network_range_to_unit_range():
    black, white = np.full((16, 16), -1.0), np.full((16, 16), 1.0)  # [0,1]: 0 vs 1
    scores = M.image_scores(black, white)
    assert scores["mse"] == pytest.approx(1.0)
    assert scores["psnr"] == pytest.approx(0.0)
    assert M.to_unit_range(np.array([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


# --- SSIM ------------------------------------------------------------------------------------------------------


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("shape", [(32, 40), (64, 64)])
def test_ssim_matches_skimage_on_full_images(shape):
    rng = np.random.default_rng(1)
    a = ndimage.gaussian_filter(rng.random(shape), 1.0)
    b = np.clip(a + 0.05 * rng.standard_normal(shape), 0, 1)
    assert M.ssim(a, b) == pytest.approx(_skimage_ssim(a, b), abs=1e-10)
    assert M.ssim_window_radius() == 5                              # 11×11 window


def test_ssim_constant_images_by_hand():
    c = np.full((20, 20), 0.3)
    assert M.ssim(c, c) == pytest.approx(1.0)
    # constant images: variances and covariance 0, so SSIM = (2·μa·μb + C1) / (μa² + μb² + C1)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.3 * 0.4 + c1) / (0.3**2 + 0.4**2 + c1)
    assert M.ssim(c, c + 0.1) == pytest.approx(expected)
    assert M.ssim(c, c + 0.1, np.ones((20, 20), bool)) == pytest.approx(expected)   # masked variant, same map


def test_masked_ssim_only_averages_the_region():
    rng = np.random.default_rng(2)
    a = rng.random((32, 32))
    b = a.copy()
    b[:, 16:] = rng.random((32, 16))                             # right half differs
    left = np.zeros((32, 32), bool)
    left[:, :11] = True                                          # its 11×11 windows never reach column 16
    assert M.ssim(a, b, left) == pytest.approx(1.0)
    right = ~left
    assert M.ssim(a, b, right) < 0.6
    local = M.ssim_map(a, b)
    assert M.ssim(a, b, right) == pytest.approx(local[right].mean())
    assert math.isnan(M.ssim(a, b, np.zeros((32, 32), bool)))


# --- masks and nodule measures ---------------------------------------------------------------------------------


def _disc_mask(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def test_equivalent_diameter_of_a_drawn_disc():
    mask = _disc_mask(64, 10.0)
    spacing = 0.5
    area_mm2 = mask.sum() * spacing**2
    assert M.equivalent_diameter_mm(mask, spacing) == pytest.approx(2 * math.sqrt(area_mm2 / math.pi))
    assert M.equivalent_diameter_mm(mask, spacing) == pytest.approx(10.0, rel=0.02)   # 2 · 10 px · 0.5 mm
    assert M.equivalent_diameter_mm(np.zeros((8, 8), bool), 1.0) == 0.0


def test_margin_gradient_of_a_square_step_by_hand():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    image = mask.astype(float)
    # band = 40 pixels just outside (|∇| = 0.5 by central differences) + the 36-pixel inner ring
    # (32 edge pixels at 0.5, 4 corners at |(0.5, 0.5)| = √0.5)
    expected = (72 * 0.5 + 4 * math.sqrt(0.5)) / 76
    assert M.boundary_band(mask).sum() == 76
    assert M.margin_gradient(image, mask) == pytest.approx(expected)
    assert M.margin_gradient(image, mask, spacing_mm=2.0) == pytest.approx(expected / 2)
    # a perfect step: inner layer 1, outer layer 0, ring outside 0 → (1 − 0) / spacing / (1 + 0 − 2·0)
    assert M.margin_sharpness(image, mask) == pytest.approx(1.0)
    assert M.margin_sharpness(image, mask, spacing_mm=0.5) == pytest.approx(2.0)
    assert M.margin_sharpness(100 * image - 800, mask) == pytest.approx(1.0)     # HU offset and scale cancel
    half = image.copy()
    half[~mask & M.dilate(mask, 1)] = 0.5         # outer layer at half height: slope halves, height grows 1.5×
    assert M.margin_sharpness(half, mask) == pytest.approx(0.5 / 1.5)


def test_core_contrast_by_hand():
    """A 10 px ground-glass disc (−700 HU) with a solid core (40 HU) filling its inner half (r < 5): the inner
    half's mean minus the outer half's is 740 HU; flat, 0; under CORE_MIN_PX pixels, NaN. The HU image's
    core contrast equals the losses' differentiable one on the same image (in [−1, 1] units × 750 HU)."""
    import torch

    from training.losses import core_contrast

    mask = _disc_mask(48, 10.0)
    faint = np.where(mask, -700.0, -850.0)
    cored = np.where(_disc_mask(48, 5.0), 40.0, faint)
    assert M.core_contrast_hu(cored, mask) == pytest.approx(740.0)
    assert M.core_contrast_hu(faint, mask) == pytest.approx(0.0)
    assert math.isnan(M.core_contrast_hu(faint, _disc_mask(48, 3.0)))       # 29 px
    unit = torch.from_numpy((cored + 600.0) / 750.0).float()[None, None]    # the training window (−1350, 150)
    differentiable = core_contrast(unit, torch.from_numpy(mask).float()[None, None])[0].item() * 750.0
    assert differentiable == pytest.approx(740.0, rel=0.01)


def test_margin_sharpness_of_a_step_beats_a_blurred_step():
    mask = _disc_mask(48, 10.0)
    step = np.where(mask, 40.0, -850.0)
    blurred = ndimage.gaussian_filter(step, 2.0)
    faint = np.where(mask, -700.0, -850.0)                        # same sharp edge, ground-glass contrast
    assert M.margin_gradient(step, mask) > 2 * M.margin_gradient(blurred, mask)
    assert M.margin_sharpness(step, mask) > 2 * M.margin_sharpness(blurred, mask)
    # the edge-height normalisation makes sharpness about the edge, not the density
    assert M.margin_sharpness(faint, mask) == pytest.approx(M.margin_sharpness(step, mask))
    assert M.margin_gradient(faint, mask) < M.margin_gradient(step, mask) / 5
    # a solid core inside a ground-glass rim does not change the rim's sharpness
    cored = np.where(_disc_mask(48, 6.0), 40.0, faint)
    assert M.margin_sharpness(cored, mask) == pytest.approx(M.margin_sharpness(faint, mask))
    assert math.isnan(M.margin_sharpness(step, np.zeros_like(mask)))


def test_margin_sharpness_falls_with_blur_on_mixed_noisy_nodules():
    """Logistic edges of drawn width on nodules with a random solid core, 30 HU noise (the phantom's look)."""
    rng = np.random.default_rng(0)
    yy, xx = (np.mgrid[0:64, 0:64] - 31.5) * 0.9375
    rho = np.hypot(yy, xx)
    blurs, values = [], []
    for _ in range(40):
        blur, solid, radius = rng.uniform(0.3, 2.7), rng.uniform(0.05, 0.95), rng.uniform(5, 15)
        scale = blur / 1.7
        body = 1 / (1 + np.exp(np.clip((rho - radius) / scale, -50, 50)))
        core = 1 / (1 + np.exp(np.clip((rho - radius * solid ** (1 / 3)) / scale, -50, 50)))
        image = -850 + body * (-700 + 730 * core + 850) + rng.normal(0, 30, rho.shape)
        blurs.append(blur)
        values.append(M.margin_sharpness(image, body >= 0.5, 0.9375))
    assert M.spearman(values, blurs)[0] < -0.6


def test_compactness_orders_shapes():
    disc = _disc_mask(64, 15.0)
    square = np.zeros((64, 64), bool)
    square[17:47, 17:47] = True
    angle = np.arctan2(*np.mgrid[-32:32, -32:32])
    lobed = np.hypot(*np.mgrid[-32:32, -32:32]) <= 15 * (1 + 0.35 * np.cos(6 * angle))
    c_disc, c_square, c_lobed = M.compactness(disc), M.compactness(square), M.compactness(lobed)
    assert c_disc == pytest.approx(1.0, abs=0.1)
    assert c_square == pytest.approx(math.pi / 4, abs=0.08)
    assert c_disc > c_square > c_lobed
    assert math.isnan(M.compactness(np.zeros((8, 8), bool)))


def _lobed(size: int, radius: float, amplitude: float, lobes: int, phase: float = 0.0) -> np.ndarray:
    """r(θ) ≤ radius · (1 + amplitude · cos(lobes · θ + phase)) about a centre off the pixel grid."""
    rows, cols = np.mgrid[:size, :size].astype(float)
    dr, dc = rows - size / 2 + 0.3, cols - size / 2 - 0.2
    return np.hypot(dr, dc) <= radius * (1 + amplitude * np.cos(lobes * np.arctan2(dr, dc) + phase))


def test_lobe_amplitude_reads_lobes_not_discs_ellipses_or_strands():
    """A disc reads ≈ 0 at any size (the pixelation floor is taken off); r = R(1 + a·cos kθ) reads ≈ a/√2 for
    k = 3…8 and rises with a, whatever the lobes' phase; an ellipse and a disc with 1-px strands stay near the
    disc; a body under LOBE_MIN_PX pixels is undefined."""
    for radius in (6.0, 10.0, 15.0):
        assert abs(M.lobe_amplitude(_lobed(64, radius, 0.0, 1))) < 0.01
    for lobes in (3, 5, 8):
        assert M.lobe_amplitude(_lobed(64, 15.0, 0.2, lobes)) == pytest.approx(0.2 / math.sqrt(2), abs=0.02)
    readings = [M.lobe_amplitude(_lobed(64, 12.0, a, 5)) for a in (0.05, 0.1, 0.2, 0.3)]
    assert readings == sorted(readings) and readings[0] > 0.02
    assert M.lobe_amplitude(_lobed(64, 12.0, 0.2, 5, phase=1.0)) == pytest.approx(readings[2], abs=0.01)
    rows, cols = np.mgrid[:64, :64].astype(float)
    ellipse = ((rows - 31.7) / 13.0) ** 2 + ((cols - 32.2) / 10.0) ** 2 <= 1.0     # axes 1.3 : 1
    assert M.lobe_amplitude(ellipse) < 0.03
    disc = _lobed(64, 10.0, 0.0, 1)
    spiked = disc.copy()
    spiked[32, 42:50] = True
    spiked[14:22, 32] = True
    assert M.lobe_amplitude(spiked) == pytest.approx(M.lobe_amplitude(disc), abs=0.01)
    assert math.isnan(M.lobe_amplitude(np.zeros((16, 16), bool)))
    assert math.isnan(M.lobe_amplitude(_lobed(16, 1.2, 0.0, 1)))
    assert M.nodule_features(np.where(spiked, 0.0, -800.0), spiked, 1.0)["lobe_amplitude"] == \
        M.lobe_amplitude(spiked)


def test_largest_component_and_dilation():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True                     # 4 px speck
    mask[10:16, 10:16] = True                 # 36 px nodule
    assert M.largest_component(mask).sum() == 36
    corners = np.zeros((10, 10), bool)
    corners[1:4, 1:4] = True                  # 9 px
    corners[4:8, 4:8] = True                  # 16 px, touching the first at a corner only
    assert M.largest_component(corners).sum() == 25
    assert M.largest_component(corners, connectivity=4).sum() == 16
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        M.largest_component(corners, connectivity=6)
    point = np.zeros((9, 9), bool)
    point[4, 4] = True
    assert M.dilate(point, 2).sum() == 13     # disc of radius 2: 13 pixels
    assert M.erode(M.dilate(point, 2), 2).sum() == 1


def test_nodule_features_by_hand_and_empty():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    image = np.where(mask, 0.0, -800.0)
    image[5, 5] = 100.0
    f = M.nodule_features(image, mask, 0.5)
    assert f["area_mm2"] == pytest.approx(100 * 0.25)
    assert f["mean_hu"] == pytest.approx(100.0 / 100)
    assert f["std_hu"] == pytest.approx(np.std(np.r_[100.0, np.zeros(99)]))
    assert set(M.NODULE_FEATURES) <= set(f)
    empty = M.nodule_features(image, np.zeros_like(mask), 0.5)
    assert empty["diameter_mm"] == 0.0 and math.isnan(empty["mean_hu"])


def test_patient_features_take_the_largest_slice_for_size():
    masks = np.stack([_disc_mask(32, 3.0), _disc_mask(32, 8.0)])
    images = np.where(masks, np.array([-600.0, 0.0])[:, None, None], -850.0)
    f = M.patient_nodule_features(images, masks, 1.0)
    assert f["diameter_mm"] == pytest.approx(M.equivalent_diameter_mm(masks[1], 1.0))
    areas = masks.reshape(2, -1).sum(axis=1)
    assert f["mean_hu"] == pytest.approx((areas[0] * -600.0 + areas[1] * 0.0) / areas.sum())


# --- clustering and regression scores ---------------------------------------------------------------------------


def test_ari_and_nmi_on_hand_labelings():
    assert M.adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert M.normalized_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    # contingency all ones: Σ C(n_ij,2) = 0, Σ C(a_i,2) = Σ C(b_j,2) = 2, C(4,2) = 6 → (0 − 2/3) / (2 − 2/3)
    assert M.adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert M.normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # Σ C(n_ij,2) = 2, Σ C(a_i,2) = 6, Σ C(b_j,2) = 3, C(6,2) = 15 → (2 − 1.2) / (4.5 − 1.2)
    assert M.adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (10, 3)), rng.normal(5, 0.1, (10, 3)), rng.normal(-5, 0.1, (10, 3))])
    truth = np.repeat([0, 1, 2], 10)
    assert M.adjusted_rand(truth, M.kmeans_labels(x, 3, seed=1)) == pytest.approx(1.0)
    assert M.kmeans_labels(np.zeros((5, 2)), 3).tolist() == [0] * 5       # k capped at distinct rows


def test_cross_validated_r2_linear_vs_unrelated():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 5))
    assert M.cross_validated_r2(x, 2 * x[:, 0] + 0.01 * rng.standard_normal(40)) > 0.95
    assert M.cross_validated_r2(x, rng.standard_normal(40)) < 0.2
    assert M.cross_validated_r2(x[:12], x[:12, 1] * 3) > 0.9              # leave-one-out branch
    assert math.isnan(M.cross_validated_r2(x, np.ones(40)))


def test_spearman_and_undefined_cases():
    rho, _, n = M.spearman([1, 2, 3, 4, 5], [2, 4, 9, 16, 25])
    assert rho == pytest.approx(1.0) and n == 5
    rho, _, n = M.spearman([1, 2, np.nan, 4, 5], [5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0) and n == 4
    assert math.isnan(M.spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])


def test_benjamini_hochberg_by_hand():
    # sorted p: 0.005, 0.01, 0.03, 0.04 → ·m/rank: 0.02, 0.02, 0.04, 0.04 (already monotone)
    q = M.benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert q.tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # 0.02·3/1 = 0.06 > 0.03·3/2 = 0.045: the step-up minimum carries 0.045 down to rank 1
    q = M.benjamini_hochberg([0.02, 0.5, 0.03])
    assert q.tolist() == pytest.approx([0.045, 0.5, 0.045])
    q = M.benjamini_hochberg([0.02, np.nan, 0.03])        # NaN ignored: m = 2
    assert q[0] == pytest.approx(0.03) and math.isnan(q[1]) and q[2] == pytest.approx(0.03)
    p = np.random.default_rng(4).random(30) ** 3
    assert M.benjamini_hochberg(p) == pytest.approx(stats.false_discovery_control(p, method="bh"))


# --- diversity and realism ---------------------------------------------------------------------------------------


def test_mean_pairwise_l1_by_hand():
    stack = np.stack([np.full((4, 4), v) for v in (0.0, 1.0, 0.5)])   # pairs 1, 0.5, 0.5
    assert M.mean_pairwise_l1(stack) == pytest.approx(2 / 3)
    assert M.mean_pairwise_l1(np.repeat(stack[:1], 5, axis=0)) == 0.0
    region = np.zeros((4, 4), bool)
    region[0, 0] = True
    assert M.mean_pairwise_l1(stack, region) == pytest.approx(2 / 3)
    assert math.isnan(M.mean_pairwise_l1(stack[:1]))


def test_classifier_two_sample_test_separable_and_too_small():
    rng = np.random.default_rng(5)
    real = rng.normal(-0.7, 0.05, (48, 16, 16)).astype(np.float32)
    fake = real[::-1].copy()
    fake[:, 5:11, 5:11] = 0.5                                      # an obvious bright square
    result = M.classifier_two_sample_test(real, fake, seed=0, epochs=15)
    assert result["accuracy"] >= 0.9 and not result["collapsed"]
    assert result["n_train"] == 48 and result["n_test"] == 48
    assert math.isnan(M.classifier_two_sample_test(real[:3], fake[:3])["accuracy"])


def test_classifier_two_sample_test_splits_by_group():
    """A critic must not be rewarded for memorising a patient: with groups, no group is on both sides."""
    rng = np.random.default_rng(6)
    # each 'patient' has its own brightness, real and fake come from the same patient distribution
    groups = np.repeat(np.arange(12), 8)
    level = rng.normal(0.0, 0.3, 12)[groups]
    real = (level[:, None, None] + rng.normal(0, 0.02, (96, 16, 16))).astype(np.float32)
    fake_level = rng.normal(0.0, 0.3, 12)[groups]
    fake = (fake_level[:, None, None] + rng.normal(0, 0.02, (96, 16, 16))).astype(np.float32)
    grouped = [M.classifier_two_sample_test(real, fake, seed=s, epochs=10, real_groups=groups,
                                            fake_groups=groups + 100)["accuracy"] for s in range(3)]
    assert np.median(grouped) < 0.8  # same distribution: a grouped critic cannot separate them reliably
    halves = M._grouped_halves(real, groups, 96, np.random.default_rng(0))
    first_levels = {round(float(x[0, 0]), 1) for x in halves[0]}
    assert len(halves[0]) + len(halves[1]) == 96 and first_levels


def test_placement_by_hand():
    """A 4×4 mask at rows 2–5, cols 2–5 of a 16² patch whose left 8 columns are wall: centroid (3.5, 3.5),
    centre (7.5, 7.5) → 4·√2 px; all of it on the wall; the centred disc of the same area (r = √(16/π))
    straddles the wall's edge."""
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:6, 2:6] = True
    background = np.full((16, 16), -800.0)
    background[:, :8] = 40.0
    offset, on_tissue, centred = M.placement(mask, background, spacing_mm=0.5)
    assert offset == pytest.approx(4 * math.sqrt(2) * 0.5)
    assert on_tissue == 1.0
    rows, cols = np.mgrid[0:16, 0:16]
    disc = np.hypot(rows - 7.5, cols - 7.5) <= math.sqrt(16 / math.pi)
    assert centred == pytest.approx(disc[:, :8].sum() / disc.sum()) and 0.3 < centred < 0.7
    assert all(math.isnan(v) for v in M.placement(np.zeros((16, 16), bool), background, 0.5))
    speck = np.zeros((16, 16), dtype=bool)
    speck[7, 7] = True
    assert M.placement(speck, background, 0.5)[2] == 0.5     # the 4 central pixels, two on the wall


def test_spicule_area_counts_thin_strands_not_the_body():
    """A disc has (almost) no thin strands; the same disc with three 1-px spikes of 6 px has 15 px more (each
    spike's pixel beside the body stays: a cross centred on the edge covers it);
    a 3-px-wide bar only its corners; the area scales with the pixel spacing."""
    disc = _disc_mask(40, 8.0)
    spiked = disc.copy()
    spiked[20, 28:34] = True      # right, from the disc's edge (columns 12–27) outwards
    spiked[6:12, 20] = True       # up
    spiked[28:34, 20] = True      # down
    base = M.spicule_area_mm2(disc, 1.0)
    assert base <= 4.0
    assert M.spicule_area_mm2(spiked, 1.0) == base + 15.0
    assert M.spicule_area_mm2(spiked, 0.5) == pytest.approx(M.spicule_area_mm2(spiked, 1.0) / 4)
    bar = np.zeros((20, 20), bool)
    bar[5:15, 8:11] = True
    assert M.spicule_area_mm2(bar, 1.0) == 4.0   # its four corners only: a 3-px bar is body, not strand
    assert M.spicule_area_mm2(np.zeros((8, 8), bool)) == 0.0
    features = M.nodule_features(np.where(spiked, 0.0, -800.0), spiked, 1.0)
    assert features["spicule_area_mm2"] == M.spicule_area_mm2(spiked, 1.0)


def test_long_strands_count_spicules_that_reach_out_not_the_teeth_of_a_serrated_outline():
    """The three 6-px spikes are long strands (15 px of them); a square whose outline has short teeth all round
    has more thin-strand pixels but no long strand; the threshold and the spacing are honoured."""
    disc = _disc_mask(40, 8.0)
    spiked = disc.copy()
    spiked[20, 28:34] = True
    spiked[6:12, 20] = True
    spiked[28:34, 20] = True
    assert M.long_strand_area_mm2(spiked, 1.0) == M.spicule_area_mm2(spiked, 1.0) - M.spicule_area_mm2(disc, 1.0)
    assert M.long_strand_area_mm2(spiked, 0.5) == pytest.approx(M.long_strand_area_mm2(spiked, 1.0) / 4)
    serrated = np.zeros((40, 40), bool)
    serrated[10:30, 10:30] = True
    serrated[8:10, 10:30:2] = serrated[30:32, 10:30:2] = True   # two-pixel teeth on every second pixel of each side
    serrated[10:30:2, 8:10] = serrated[10:30:2, 30:32] = True
    assert M.spicule_area_mm2(serrated, 1.0) >= 40.0       # each tooth's outer pixel (and two at corners)
    assert M.long_strand_area_mm2(serrated, 1.0) == 0.0
    assert M.long_strand_area_mm2(spiked, 1.0, min_px=7) == 0.0   # each spike is 5 px of strand
    assert M.long_strand_area_mm2(np.zeros((8, 8), bool)) == 0.0
    assert M.nodule_features(np.where(spiked, 0.0, -800.0), spiked, 1.0)["long_strand_area_mm2"] == 15.0


def test_strand_contrast_tells_a_solid_strand_from_one_blurred_into_the_lung():
    """A strand at 0 HU in −800 HU lung stands out by 800 HU; the same label over an image whose strand was
    blurred away reads far less; without a long strand the measure is undefined."""
    from scipy import ndimage

    disc = _disc_mask(40, 8.0)
    spiked = disc.copy()
    spiked[20, 28:34] = True
    solid = np.where(spiked, 0.0, -800.0)
    assert M.strand_contrast_hu(solid, spiked) == pytest.approx(800.0)
    blurred = np.where(disc, 0.0, -800.0)     # the image of a nodule without its strand, edge blurred
    blurred = ndimage.gaussian_filter(blurred, 1.5)
    assert M.strand_contrast_hu(blurred, spiked) < 400.0
    assert np.isnan(M.strand_contrast_hu(np.where(disc, 0.0, -800.0), disc))
    assert M.nodule_features(solid, spiked, 1.0)["strand_contrast_hu"] == pytest.approx(800.0)


def test_strand_contrast_splits_what_a_strand_crosses_into_lung_and_tissue():
    """A strand at −400 HU in −800 HU lung that crosses a 40 HU vessel: where it merges with the vessel (painted at
    the vessel's value, as the phantom's strands are) it reads ≈ 0 over tissue, where it stands 400 HU over it (a
    lift painted over the vessel too) it reads 400; over the lung both read the 400 HU lift, which the whole-surround
    contrast mixes with the crossing. Without a vessel the lung part is the whole contrast and the tissue part is
    undefined; the nodule's own bright rim is not tissue."""
    disc = _disc_mask(40, 8.0)
    spiked = disc.copy()
    spiked[20, 28:38] = True
    strand = spiked & ~disc
    vessel = np.zeros_like(disc)
    vessel[:, 33:35] = True
    vessel &= ~disc
    lung = np.where(disc, 0.0, -800.0)
    merged = np.where(vessel, 40.0, lung)
    merged[strand & ~vessel] = -400.0
    lifted = merged.copy()
    lifted[strand & vessel] = 440.0
    for image, over_tissue in ((merged, 0.0), (lifted, 400.0)):
        lung_part, tissue_part = M.strand_contrast_split_hu(image, spiked)
        assert lung_part == pytest.approx(400.0)
        assert tissue_part == pytest.approx(over_tissue, abs=1e-9)
        assert M.nodule_features(image, spiked, 1.0)["strand_over_tissue_hu"] == pytest.approx(tissue_part)
    assert M.strand_contrast_hu(lifted, spiked) > M.strand_contrast_hu(merged, spiked)   # the mix moves
    plain = np.where(spiked, np.where(strand, -400.0, 0.0), -800.0)
    assert M.strand_contrast_lung_hu(plain, spiked) == pytest.approx(M.strand_contrast_hu(plain, spiked))
    assert np.isnan(M.strand_over_tissue_hu(plain, spiked))
    bright_rim = plain.copy()   # the nodule's partial-volume rim around the strand's base is brighter than tissue
    bright_rim[(_disc_mask(40, 10.0) & ~disc)] = -100.0
    assert np.isnan(M.strand_over_tissue_hu(bright_rim, spiked))
    assert np.isnan(M.strand_contrast_lung_hu(plain, disc))


def test_strand_lift_reads_over_the_lung_beyond_the_rim_that_the_contrast_reads_over():
    """A strand at 0 HU whose partial-volume rim (the pixels beside it, outside the label) sits at −400 HU in
    −800 HU lung: the contrast over its 2-px surround reads the rim and falls short of 800 HU; the lift, over the
    lung beyond the rim, reads the 800 HU that painting the lung + a lift must use; the median over slices can read
    either; without a long strand the lift is undefined."""
    from scipy import ndimage

    disc = _disc_mask(40, 8.0)
    spiked = disc.copy()
    spiked[20, 28:34] = True
    strand = spiked & ~disc
    rim = ndimage.binary_dilation(strand) & ~spiked
    image = np.where(spiked, 0.0, -800.0)
    image[rim] = -400.0
    assert M.strand_contrast_hu(image, spiked) < 700.0
    assert M.strand_lift_hu(image, spiked) == pytest.approx(800.0)
    assert M.median_strand_contrast_hu(image[None], spiked[None], measure=M.strand_lift_hu) == pytest.approx(800.0)
    assert M.median_strand_contrast_hu(image[None], spiked[None]) == pytest.approx(M.strand_contrast_hu(image, spiked))
    assert np.isnan(M.strand_lift_hu(image, disc))
