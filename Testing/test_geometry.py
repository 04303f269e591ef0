"""Geometry and intensity conversions that every reader and writer relies on."""

import numpy as np
import pytest

from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.intensity import hu_to_unit, unit_to_hu


def test_lps_round_trip_and_spacing() -> None:
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # a sagittal-ish acquisition
    geometry = VolumeGeometry.from_lps([10.0, -20.0, 30.0], [0.7, 0.8, 2.5], direction)
    origin, spacing, direction_back = geometry.to_lps()
    np.testing.assert_allclose(origin, [10.0, -20.0, 30.0])
    np.testing.assert_allclose(spacing, [0.7, 0.8, 2.5])
    np.testing.assert_allclose(direction_back, direction, atol=1e-12)
    assert geometry.spacing_kji == pytest.approx((2.5, 0.8, 0.7))
    # origin of LPS (10, -20, 30) is RAS (-10, 20, 30)
    np.testing.assert_allclose(geometry.ijk_to_ras_points([0, 0, 0])[0], [-10.0, 20.0, 30.0])


def test_point_conversions_are_inverse() -> None:
    geometry = VolumeGeometry.from_spacing([0.6, 0.6, 2.0], origin_ras=[-100, -120, 50])
    kji = np.array([[3.0, 10.5, 20.25], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(geometry.ras_to_kji(geometry.kji_to_ras(kji)), kji, atol=1e-9)
    np.testing.assert_allclose(geometry.kji_to_ras([[1, 2, 3]])[0], [-100 + 1.8, -120 + 1.2, 52.0])


def test_singular_matrix_refused() -> None:
    with pytest.raises(ValueError, match="singular"):
        VolumeGeometry(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_hu_window() -> None:
    hu = np.array([-3024.0, -1000.0, -250.0, 500.0, 3000.0])
    np.testing.assert_allclose(hu_to_unit(hu), [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu[1:4])), hu[1:4], atol=1e-3)
