"""The chest-wall share of a patch: large dense components count; vessels, spicules and the nodule do not."""

import numpy as np
import pytest

from RadiogenomicGANLib.intensity import hu_to_unit
from training.dataset import NoduleBatchDataset, load_dataset, make_synthetic_dataset
from training.surroundings import central_crop, wall_fraction

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
