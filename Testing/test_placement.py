"""Lung locations: distance bounds in mm, exclusion of a nodule, separation, determinism, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from RadiogenomicGANLib import placement
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.lungmask import boundary_distance_mm
from RadiogenomicGANLib.placement import PlacementError, check_centre, local_distance_mm, sample_lung_centres


def _ellipsoid(shape, spacing, radii_mm, centre_mm=None) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    c = centre_mm if centre_mm is not None else (np.asarray(shape) - 1) * np.asarray(spacing) / 2
    return ((k - c[0]) / radii_mm[0]) ** 2 + ((j - c[1]) / radii_mm[1]) ** 2 + ((i - c[2]) / radii_mm[2]) ** 2 <= 1


SPACING = (2.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def lung() -> np.ndarray:
    return _ellipsoid((50, 90, 90), SPACING, (55, 60, 60))


def test_centres_are_within_the_band_apart_and_deterministic(lung: np.ndarray) -> None:
    centres = sample_lung_centres(lung, SPACING, 6, np.random.default_rng(4), min_separation_mm=15)
    assert centres.shape == (6, 3) and centres.dtype == np.int64
    distance = boundary_distance_mm(lung, SPACING)
    values = distance[tuple(centres.T)]
    assert np.all((values >= 5) & (values <= 25))
    mm = centres * np.asarray(SPACING)
    gaps = np.linalg.norm(mm[:, None] - mm[None], axis=-1) + np.eye(6) * 1e9
    assert gaps.min() >= 15
    again = sample_lung_centres(lung, SPACING, 6, np.random.default_rng(4), min_separation_mm=15)
    np.testing.assert_array_equal(centres, again)


def test_exclusion_box_keeps_patches_off_the_nodule(lung: np.ndarray) -> None:
    nodule = _ellipsoid(lung.shape, SPACING, (6, 6, 6), centre_mm=(62, 40, 67))
    margin = (30.0, 31.5, 31.5)
    centres = sample_lung_centres(
        lung, SPACING, 4, np.random.default_rng(0), exclude_mask=nodule, exclude_margin_mm=margin
    )
    nodule_points = np.argwhere(nodule) * np.asarray(SPACING)
    for centre in centres * np.asarray(SPACING):
        inside_box = np.all(np.abs(nodule_points - centre) <= np.asarray(margin), axis=1)
        assert not inside_box.any()
    # the distance counts the nodule as boundary (paper: nodule excluded from the lung before the EDT)
    distance = boundary_distance_mm(lung & ~nodule, SPACING)
    assert np.all(distance[tuple(centres.T)] >= 5)


def test_coarse_route_matches_the_exact_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large volumes go through the ≈3 mm grid; the returned centres still meet the bounds exactly."""
    spacing = (1.25, 0.7, 0.7)
    lung = _ellipsoid((80, 160, 160), spacing, (45, 50, 50))
    nodule = _ellipsoid(lung.shape, spacing, (5, 5, 5), centre_mm=(50, 56, 40))
    monkeypatch.setattr(placement, "EXACT_LIMIT_VOXELS", 1000)
    margin = (20.0, 20.0, 20.0)
    centres = sample_lung_centres(
        lung, spacing, 5, np.random.default_rng(1), exclude_mask=nodule, exclude_margin_mm=margin
    )
    distance = boundary_distance_mm(lung & ~nodule, spacing)
    values = distance[tuple(centres.T)]
    assert np.all((values >= 5) & (values <= 25)), values
    points = np.argwhere(nodule) * np.asarray(spacing)
    for centre in centres * np.asarray(spacing):
        assert not np.all(np.abs(points - centre) <= np.asarray(margin), axis=1).any()


def test_refusals_are_clear(lung: np.ndarray) -> None:
    thin = _ellipsoid((20, 40, 40), (2.0, 1.0, 1.0), (8, 8, 8))  # deepest point ≈ 8 mm from the boundary
    with pytest.raises(PlacementError, match="no lung location lies 9–25 mm"):
        sample_lung_centres(thin, (2.0, 1.0, 1.0), 1, np.random.default_rng(0), min_mm=9)
    small = _ellipsoid((24, 50, 50), (2.0, 1.5, 1.5), (22, 35, 35))
    with pytest.raises(PlacementError, match=r"only .* of 50 .* 20 mm apart"):
        sample_lung_centres(small, (2.0, 1.5, 1.5), 50, np.random.default_rng(0), min_separation_mm=20)
    few = sample_lung_centres(small, (2.0, 1.5, 1.5), 50, np.random.default_rng(0), allow_fewer=True)
    assert 1 <= len(few) < 50
    with pytest.raises(PlacementError, match="empty"):
        sample_lung_centres(np.zeros((5, 5, 5), bool), SPACING, 1, np.random.default_rng(0))


def test_check_centre_reasons(lung: np.ndarray) -> None:
    geometry = VolumeGeometry.from_spacing(SPACING[::-1], origin_ras=(10.0, -20.0, 5.0))
    centre = geometry.kji_to_ras([[25, 45, 45]])[0]
    assert check_centre(lung, geometry, centre) is None
    assert check_centre(lung, geometry, centre, min_mm=5) is None
    assert check_centre(lung, geometry, centre + np.array([500.0, 0.0, 0.0])) == "outside the volume"
    assert check_centre(lung, geometry, geometry.kji_to_ras([[25, 1, 1]])[0]) == "outside the lung"
    near_edge = geometry.kji_to_ras([[25, 45, 7]])[0]  # about 3 mm inside the lateral boundary
    reason = check_centre(lung, geometry, near_edge, min_mm=5)
    assert reason is not None and "mm from the lung boundary, closer than 5 mm" in reason
    assert check_centre(lung, geometry, centre, max_mm=10) == "more than 10 mm from the lung boundary"


def test_local_distance_equals_the_full_transform(lung: np.ndarray) -> None:
    distance = boundary_distance_mm(lung, SPACING)
    rng = np.random.default_rng(2)
    for point in np.argwhere(lung)[rng.choice(int(lung.sum()), 20, replace=False)]:
        local = local_distance_mm(lung, SPACING, point, 200.0)
        assert local == pytest.approx(float(distance[tuple(point)]), abs=1e-4)
