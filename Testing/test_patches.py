"""Patches are cut in millimetres and pasted back onto exactly the voxels they came from."""

import numpy as np
import pytest

from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.patches import (
    extract_mask_patch,
    extract_patch,
    feather_alpha,
    patch_frame,
    resample_to_slice,
)


def _ramp_volume(shape=(5, 80, 90)) -> np.ndarray:
    k, j, i = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    return (10.0 * i + 1000.0 * j + 0.5 * k).astype(np.float32)


def test_identity_spacing_patch_is_a_crop() -> None:
    """With 1 mm voxels, 1 mm patch pixels and LPS-standard axes, the patch is a plain crop."""
    volume = _ramp_volume()
    # DICOM-standard axial: i → patient left (−R), j → posterior (−A)
    geometry = VolumeGeometry.from_lps([0, 0, 0], [1.0, 1.0, 2.0], np.eye(3))
    centre = geometry.kji_to_ras([[2, 40, 45]])[0]
    patch = extract_patch(volume, geometry, centre, 2, size_px=11, spacing_mm=1.0)
    np.testing.assert_allclose(patch, volume[2, 35:46, 40:51])


def test_flipped_orientation_gives_the_same_display_patch() -> None:
    """A volume stored with i running towards patient right still yields columns towards patient left."""
    volume = _ramp_volume()
    flipped = volume[:, :, ::-1].copy()
    standard = VolumeGeometry.from_lps([0, 0, 0], [0.7, 0.7, 2.0], np.eye(3))
    direction = np.diag([-1.0, 1.0, 1.0])
    flipped_geometry = VolumeGeometry.from_lps([0.7 * 89, 0, 0], [0.7, 0.7, 2.0], direction)
    centre = standard.kji_to_ras([[1, 40, 30]])[0]
    a = extract_patch(volume, standard, centre, 1, size_px=16, spacing_mm=0.9)
    b = extract_patch(flipped, flipped_geometry, centre, 1, size_px=16, spacing_mm=0.9)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-2)


def test_physical_size_follows_spacing() -> None:
    """60 mm of a 0.6 mm-spaced ramp spans 100 voxels, whatever the patch resolution."""
    volume = _ramp_volume((3, 200, 200))
    geometry = VolumeGeometry.from_lps([0, 0, 0], [0.6, 0.6, 2.0], np.eye(3))
    centre = geometry.kji_to_ras([[1, 100, 100]])[0]
    patch = extract_patch(volume, geometry, centre, 1, size_px=64, spacing_mm=60 / 64)
    span_i = (patch[0, -1] - patch[0, 0]) / 10.0
    assert span_i == pytest.approx(63 * (60 / 64) / 0.6, rel=1e-4)


def test_outside_volume_is_filled_and_bad_slice_refused() -> None:
    volume = np.zeros((2, 20, 20), dtype=np.float32)
    geometry = VolumeGeometry.from_spacing([1.0, 1.0, 1.0])
    patch = extract_patch(volume, geometry, geometry.kji_to_ras([[0, 0, 0]])[0], 0, size_px=8, spacing_mm=1.0)
    assert patch.min() == -1000.0 and patch.max() == 0.0
    with pytest.raises(IndexError, match="slice 5"):
        extract_patch(volume, geometry, np.zeros(3), 5)


def test_resample_back_round_trip() -> None:
    """Patch → slice resampling reproduces the slice where the grids coincide."""
    volume = _ramp_volume((1, 60, 60))
    geometry = VolumeGeometry.from_lps([0, 0, 0], [1.0, 1.0, 1.0], np.eye(3))
    centre = geometry.kji_to_ras([[0, 30, 30]])[0]
    frame = patch_frame(geometry, centre, 0, size_px=21, spacing_mm=1.0)
    patch = extract_patch(volume, geometry, centre, 0, size_px=21, spacing_mm=1.0)
    box, values = resample_to_slice(patch, frame, volume.shape[1:])
    np.testing.assert_allclose(values, volume[0][box], rtol=1e-6)


def test_mask_patch_and_feather() -> None:
    mask = np.zeros((1, 64, 64), dtype=bool)
    mask[0, 28:36, 28:36] = True
    geometry = VolumeGeometry.from_lps([0, 0, 0], [1.0, 1.0, 1.0], np.eye(3))
    patch = extract_mask_patch(mask, geometry, geometry.kji_to_ras([[0, 31.5, 31.5]])[0], 0, 32, 1.0)
    assert patch.sum() == 64
    alpha = feather_alpha(patch.astype(np.float32), border_px=4)
    assert np.all(alpha[patch] == 1.0)
    assert np.all(alpha[:4] == 0) and np.all(alpha[:, -4:] == 0)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
