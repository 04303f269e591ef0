"""The classical lung mask survives real-CT pitfalls (table, padding, trachea, cropping) and matches the phantom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from RadiogenomicGANLib.lungmask import LungMaskError, boundary_distance_mm, compute_lung_mask


@dataclass
class Chest:
    volume: np.ndarray  # int16 HU [k, j, i]
    spacing: tuple[float, float, float]  # (k, j, i) mm
    lungs: np.ndarray  # truth
    nodule: np.ndarray
    trachea: np.ndarray


def synthetic_chest(
    shape: tuple[int, int, int] = (48, 112, 128),
    spacing: tuple[float, float, float] = (2.5, 2.0, 2.0),
    *,
    touching: bool = False,
    table: bool = True,
    padding: float | None = -2000.0,
    nodule_radius_mm: float = 6.0,
    seed: int = 0,
) -> Chest:
    """An elliptic body with two ellipsoid lungs, vessels, a trachea reaching the first slice, a hollow table
    splitting the outside air, −2000 HU padding outside a circular field of view (`padding=None`: none, so the
    table's core is an enclosed air pocket), and a juxta-pleural nodule."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    cz, cy, cx = (np.asarray(shape) - 1) * np.asarray(spacing) / 2
    volume = np.full(shape, -1000.0)
    body = ((j - cy + 8) / 95) ** 2 + ((i - cx) / 120) ** 2 <= 1
    volume[body] = -100.0  # fat
    volume[((j - cy + 8) / 85) ** 2 + ((i - cx) / 110) ** 2 <= 1] = 40.0  # muscle
    gap = 22.0 if not touching else 0.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        centre_x = cx + side * (gap / 2 + 40)
        lungs |= ((k - cz - 6) / (cz + 4)) ** 2 + ((j - cy + 5) / 60) ** 2 + ((i - centre_x) / 40) ** 2 <= 1
    if touching:  # merge the lungs over a band, as at the anterior junction line
        lungs |= (np.abs(i - cx) < 6) & (np.abs(j - cy + 25) < 12) & (np.abs(k - cz) < 30)
    volume[lungs] = -850.0
    # vessels: small dense spheres inside the lungs
    inside = np.argwhere(lungs)
    reach = np.ceil(3.0 / np.asarray(spacing)).astype(int)
    for index in rng.choice(len(inside), size=25, replace=False):
        box = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(inside[index], reach))
        p = inside[index] * np.asarray(spacing)
        ball = (k[box] - p[0]) ** 2 + (j[box] - p[1]) ** 2 + (i[box] - p[2]) ** 2 <= 3.0**2
        volume[box][ball & lungs[box]] = 40.0
    # trachea from the top slice down to the carina, then two main bronchi towards the lungs
    trachea = ((j - cy + 20) ** 2 + (i - cx) ** 2 <= 7.0**2) & (k > cz + 10)
    for side in (-1, 1):
        t = np.clip((cz + 12 - k) / 25, 0, 1)
        bronchus = (j - cy + 20) ** 2 + (i - cx - side * (8 + 30 * t)) ** 2 <= 4.5**2
        trachea |= bronchus & (k <= cz + 12) & (k >= cz - 13)
    volume[trachea] = -1000.0
    # juxta-pleural nodule touching the lateral pleura of the right lung
    lateral = np.argwhere(lungs[shape[0] // 2])
    right = lateral[lateral[:, 1].argmin()]  # most lateral lung voxel of the mid slice (low i)
    p = np.array([cz, right[0] * spacing[1], right[1] * spacing[2] + nodule_radius_mm - 1.0])
    nodule = (k - p[0]) ** 2 + (j - p[1]) ** 2 + (i - p[2]) ** 2 <= nodule_radius_mm**2
    volume[nodule] = 30.0
    volume += rng.normal(0, 20, size=shape)
    if table:  # a table under the body, from border to border, with a hollow foam core
        slab = (j > cy + 95) & (j < cy + 110)
        volume[slab] = 200.0
        volume[(j > cy + 99) & (j < cy + 106) & (np.abs(i - cx) < 100)] = -980.0
    if padding is not None:
        volume[(j - cy) ** 2 + (i - cx) ** 2 > (min(cy, cx) + 10) ** 2] = padding
    return Chest(volume.astype(np.int16), spacing, lungs & ~trachea, nodule, trachea)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def chest() -> Chest:
    return synthetic_chest()


def test_synthetic_chest_is_found_despite_table_padding_and_trachea(chest: Chest) -> None:
    mask = compute_lung_mask(chest.volume, chest.spacing)
    assert mask.shape == chest.volume.shape and mask.dtype == bool
    assert dice(mask, chest.lungs) >= 0.95
    # the trachea (and the hollow table) are not lung
    upper_trachea = chest.trachea & (np.arange(mask.shape[0])[:, None, None] > mask.shape[0] * 0.8)
    assert not (mask & upper_trachea).any()
    assert mask[:, int(mask.shape[1] * 0.95) :].sum() == 0


def test_juxta_pleural_nodule_stays_inside(chest: Chest) -> None:
    mask = compute_lung_mask(chest.volume, chest.spacing)
    inside_truth = chest.nodule & chest.lungs
    assert mask[inside_truth].mean() >= 0.95


def test_two_lungs_kept_when_separate_and_when_touching() -> None:
    from scipy import ndimage

    separate = synthetic_chest(seed=1)
    mask = compute_lung_mask(separate.volume, separate.spacing)
    _, count = ndimage.label(mask)
    assert count == 2
    touching = synthetic_chest(touching=True, seed=2)
    mask = compute_lung_mask(touching.volume, touching.spacing)
    assert dice(mask, touching.lungs) >= 0.95


@pytest.mark.parametrize(
    ("padding", "table", "touching"), [(-3024.0, True, False), (None, True, True), (None, False, False)]
)
def test_padding_values_and_enclosed_table_core(padding: float | None, table: bool, touching: bool) -> None:
    """Without padding the table's hollow core is an air pocket touching no border; with merged lungs it is the
    second largest air region — it must still not be taken for a lung."""
    chest = synthetic_chest(table=table, padding=padding, touching=touching, seed=3)
    mask = compute_lung_mask(chest.volume, chest.spacing)
    assert dice(mask, chest.lungs) >= 0.95
    assert mask[:, int(mask.shape[1] * 0.95) :].sum() == 0


def test_fine_and_anisotropic_grid_is_downsampled_and_restored() -> None:
    """Sub-mm voxels go through the block-averaged route (2×2×2 here) and come back aligned; the lungs also
    reach the first slice, as when a scan cuts the apices."""
    chest = synthetic_chest(shape=(80, 220, 250), spacing=(0.8, 1.0, 1.0), table=True, seed=4)
    mask = compute_lung_mask(chest.volume, chest.spacing)
    assert dice(mask, chest.lungs) >= 0.95


def test_no_lung_raises_a_clear_error() -> None:
    water = np.zeros((10, 40, 40), dtype=np.int16)
    with pytest.raises(LungMaskError, match="no air region"):
        compute_lung_mask(water, (2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        compute_lung_mask(water, (2.0, 0.0, 1.0))


def test_boundary_distance_is_in_millimetres() -> None:
    mask = np.zeros((21, 41, 41), dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    distance = boundary_distance_mm(mask, (3.0, 1.0, 0.5))
    assert distance[10, 20, 20] == pytest.approx(min(10 * 3.0, 20 * 1.0, 20 * 0.5))
    assert distance[0].max() == 0 and distance.dtype == np.float32
    full = np.ones((5, 5, 5), dtype=bool)  # the volume edge counts as boundary
    assert boundary_distance_mm(full, (1.0, 1.0, 1.0))[2, 2, 2] == pytest.approx(3.0)


@pytest.mark.parametrize("index", [0, 1, 3])
def test_dice_against_the_phantom_lungs(index: int) -> None:
    """The phantom's truth (lungs with vessels, intrapulmonary airways and the nodule) at a small matrix."""
    from RadiogenomicGANLib.phantom import generate_patient

    patient = generate_patient(index, 0, size_ij=96, n_genes=40)
    mask = compute_lung_mask(patient.volume_hu, patient.geometry.spacing_kji)
    assert dice(mask, patient.lung_mask) >= 0.95
    assert mask[patient.nodule_mask].mean() >= 0.95


@pytest.mark.parametrize("crop", ["one_side", "around_one_lung", "inside_the_chest"])
def test_cropped_ct_whose_lung_touches_the_border(chest: Chest, crop: str) -> None:
    """Slicer's Crop Volume (or a small field of view) leaves lungs touching the in-plane border: they are lung
    parenchyma (≈ −850 HU), not outside air (≈ −1000 HU), and must not be removed as such."""
    js, is_ = np.nonzero(chest.lungs.any(axis=0))
    quarter_i = is_.min() + (is_.max() - is_.min()) // 4        # through the middle of one lung
    three_quarters_i = is_.max() - (is_.max() - is_.min()) // 4  # through the middle of the other
    box = {
        "one_side": (slice(None), slice(None), slice(quarter_i, None)),
        "around_one_lung": (slice(None), slice(js.min() - 4, js.max() + 4), slice(three_quarters_i, is_.max() - 6)),
        "inside_the_chest": (slice(None), slice(js.min() + 6, js.max() - 6), slice(is_.min() + 6, is_.max() - 6)),
    }[crop]
    truth = chest.lungs[box]
    assert truth[:, [0, -1], :].any() or truth[:, :, [0, -1]].any(), "the crop must cut through a lung"
    mask = compute_lung_mask(chest.volume[box], chest.spacing)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
