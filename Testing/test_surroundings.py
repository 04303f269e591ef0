"""The chest-wall share of a patch: large dense components count; vessels, spicules and the nodule do not. The
texture around a nodule, and backgrounds matched to it."""

import numpy as np
import pytest

from RadiogenomicGANLib.intensity import hu_to_unit
from training.dataset import NoduleBatchDataset, load_dataset, make_synthetic_dataset
from training.surroundings import (
    central_crop,
    central_disc,
    match_surroundings,
    surroundings_texture,
    wall_fraction,
)

WINDOW = (-1000.0, 400.0)


def _lung(size: int = 64) -> np.ndarray:
    return np.full((size, size), hu_to_unit(np.float32(-850.0), WINDOW), dtype=np.float32)


def test_wall_counts_and_vessels_and_nodules_do_not() -> None:
    tissue = hu_to_unit(np.float32(40.0), WINDOW)
    wall, vessel, nodule = _lung(), _lung(), _lung()
    wall[:, :16] = tissue  # a quarter of the patch is chest wall
    vessel[30:32, 5:60] = tissue  # a thin vessel across the patch
    nodule[22:42, 22:42] = tissue  # a dense nodule, left out through its mask
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[22:42, 22:42] = 1
    fractions = wall_fraction(np.stack([wall, vessel, nodule]), WINDOW, np.stack([0 * mask, 0 * mask, mask]))
    assert fractions[0] == pytest.approx(0.25)
    assert fractions[1] == 0.0 and fractions[2] == 0.0
    # the same nodule without its mask is a large dense component; in a central crop the wall is gone
    assert wall_fraction(nodule[None], WINDOW)[0] > 0.05
    assert wall_fraction(wall[None], WINDOW, crop=24)[0] == 0.0
    assert central_crop(np.zeros((2, 64, 64)), 40).shape == (2, 40, 40)


def test_matched_backgrounds_follow_the_nodule_slices_wall(tmp_path) -> None:
    """With match_backgrounds, a slice without wall gets backgrounds with the least wall."""
    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=6, genes=8, size=32))
    tissue = hu_to_unit(np.float32(40.0), tuple(data.hu_window))
    walled = np.arange(data.num_backgrounds) % 3 == 0
    data.background_images[walled, :, :10] = tissue  # every third background has a wall on its left
    items = NoduleBatchDataset(data, "train", seed=0, match_backgrounds=True)
    drawn = np.stack([items[i]["background"].numpy()[0] for i in range(len(items))])
    assert np.all(wall_fraction(drawn, tuple(data.hu_window)) == 0.0)  # the nodule slices have no wall
    plain = NoduleBatchDataset(data, "train", seed=0)
    drawn = np.stack([plain[i]["background"].numpy()[0] for i in range(len(plain))])
    assert np.mean(wall_fraction(drawn, tuple(data.hu_window)) > 0.1) > 0.15


def test_surroundings_texture_leaves_the_nodule_out_and_sees_vessels_and_noise() -> None:
    tissue = hu_to_unit(np.float32(40.0), WINDOW)
    plain, vessel, noisy = _lung(), _lung(), _lung()
    for patch in (plain, vessel, noisy):
        patch[24:40, 24:40] = tissue  # a dense nodule, left out through its footprint
    vessel[14:16, 12:52] = tissue     # 80 dense pixels outside the nodule, inside the central 40 px
    noisy += np.random.default_rng(0).normal(0, 0.05, noisy.shape).astype(np.float32)
    footprint = np.zeros((3, 64, 64), dtype=np.float32)
    footprint[:, 24:40, 24:40] = 1
    texture = surroundings_texture(np.stack([plain, vessel, noisy]), WINDOW, footprint, crop=40)
    outside = 40 * 40 - (16 + 2 * 4) ** 2  # the central crop minus the footprint grown by 4 px (a square)
    assert texture[0, 0] == 0.0 and texture[0, 1] < 0.005  # only the nodule's blurred edge reaches past 4 px
    assert texture[1, 0] == pytest.approx(80 / outside, rel=0.02) and texture[1, 1] > 0.01
    assert texture[2, 0] == 0.0 and texture[2, 1] > 0.03
    # without the footprint the nodule itself is counted as dense surroundings
    assert surroundings_texture(plain[None], WINDOW, 0 * footprint[:1], crop=40)[0, 0] > 0.1
    assert central_disc(2, 64, 16 * 16).sum(axis=(1, 2)).tolist() == pytest.approx([256, 256], rel=0.05)


def test_match_surroundings_picks_the_nearest_candidate_in_units_of_spread() -> None:
    candidates = np.array([[0.00, 0.01], [0.05, 0.03], [0.10, 0.09], [0.30, 0.20]])
    wanted = np.array([[0.01, 0.012], [0.28, 0.5], [0.06, 0.03]])
    assert match_surroundings(wanted, candidates, np.random.default_rng(0))[:, 0].tolist() == [0, 3, 1]
    # in units of each feature's spread: a feature 100 × larger does not decide alone
    scaled = match_surroundings(wanted * [1, 100], candidates * [1, 100], np.random.default_rng(0))
    assert scaled[:, 0].tolist() == [0, 3, 1]
    # the two nearest, nearest first
    assert match_surroundings(wanted, candidates, np.random.default_rng(0), count=2).tolist() == [[0, 1], [3, 2],
                                                                                                  [1, 2]]


def test_texture_matched_backgrounds_follow_the_nodule_slices_surroundings(tmp_path) -> None:
    """With match_texture, a nodule slice in quiet lung gets quiet backgrounds, not the textured ones."""
    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=6, genes=8, size=32))
    window = tuple(data.hu_window)
    textured = np.arange(data.num_backgrounds) % 4 == 0  # a quarter: a pool (at least 16) can avoid them all
    rng = np.random.default_rng(0)
    data.background_images[textured] += rng.normal(0, 0.1, data.background_images[textured].shape).astype(np.float32)
    quiet = surroundings_texture(data.nodule_images, window, data.nodule_masks, 32)[:, 1].max()
    items = NoduleBatchDataset(data, "train", seed=0, match_backgrounds=True, match_share=0.3, match_texture=True)
    drawn = np.stack([items[i]["background"].numpy()[0] for i in range(len(items))])
    drawn_texture = surroundings_texture(drawn, window, np.zeros_like(drawn), 32)[:, 1]
    assert quiet < 0.05 and np.all(drawn_texture < 0.05)  # only quiet ones, as quiet as the nodules' lung
    plain = NoduleBatchDataset(data, "train", seed=0)
    drawn = np.stack([plain[i]["background"].numpy()[0] for i in range(len(plain))])
    assert np.mean(surroundings_texture(drawn, window, np.zeros_like(drawn), 32)[:, 1] > 0.05) > 0.1
