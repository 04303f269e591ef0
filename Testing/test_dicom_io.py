"""DICOM readers: CT series → HU volume + geometry, SEG (both NSCLC dialects, both backends) → nodule mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from fixtures_dicom import CTFixture, nodule_mask, small_volume, write_ct, write_seg
from pydicom.data import get_testdata_file

from RadiogenomicGANLib.dicom_io import (
    DicomError,
    list_series,
    read_ct_series,
    read_seg_mask,
    seg_referenced_series_uid,
    seg_referenced_sop_uids,
)

SHAPE = (6, 24, 20)
NODULE_SLICES = range(2, 5)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> CTFixture:
    return write_ct(tmp_path_factory.mktemp("ct") / "series", small_volume(SHAPE))


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return nodule_mask(SHAPE, NODULE_SLICES)


def test_ct_series_sorted_by_position_with_hu_and_geometry(ct: CTFixture) -> None:
    volume = read_ct_series(ct.folder)
    assert volume.volume_hu.dtype == np.int16
    np.testing.assert_array_equal(volume.volume_hu, ct.volume_hu)  # file names are shuffled on purpose
    np.testing.assert_allclose(volume.geometry.ijk_to_ras, ct.geometry.ijk_to_ras, atol=1e-6)
    assert volume.sop_uids == [str(d.SOPInstanceUID) for d in ct.datasets]
    assert volume.series_uid == ct.series_uid and volume.tags["Modality"] == "CT"
    np.testing.assert_allclose(np.diff(volume.slice_positions), 2.5)


def test_ct_matches_simpleitk(ct: CTFixture) -> None:
    """An independent reader agrees on voxels and on the geometry (ITK is LPS; ours is RAS)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct.folder)))
    image = reader.Execute()
    ours = read_ct_series(sorted(ct.files))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ours.volume_hu)
    origin, spacing, direction = ours.geometry.to_lps()
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-6)


def test_rescale_on_real_ct_pixels(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm: the one real CT slice in an installable package."""
    source = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(source, tmp_path / "ct.dcm")
    dataset = pydicom.dcmread(source)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    volume = read_ct_series(tmp_path)
    assert volume.volume_hu.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.volume_hu[0], np.rint(expected).astype(np.int16))
    assert volume.geometry.spacing[:2] == pytest.approx([float(v) for v in dataset.PixelSpacing[::-1]])


def test_list_series_records_corrupt_and_foreign_files(ct: CTFixture, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(ct.folder, folder)
    (folder / "garbage.dcm").write_bytes(b"\x00" * 50 + b"not dicom at all" * 10)
    data = (folder / ct.files[0].name).read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (folder / "metadata.csv").write_text("Subject ID,Modality\n")  # skipped without being opened
    index = list_series(folder)
    assert list(index) == [ct.series_uid] and len(index[ct.series_uid]) == SHAPE[0]
    reasons = {path.name: reason for path, reason in index.unreadable}
    assert set(reasons) == {"garbage.dcm", "truncated.dcm"}
    assert "corrupt DICOM file" in reasons["garbage.dcm"]
    assert "truncated" in reasons["truncated.dcm"]
    assert index.info[ct.series_uid].modality == "CT"


def test_ct_refusals(ct: CTFixture, tmp_path: Path) -> None:
    pet = write_ct(tmp_path / "pet", small_volume((3, 8, 8)), modality="PT")
    with pytest.raises(DicomError, match="modality PT, not CT"):
        read_ct_series(pet.folder)

    gap = tmp_path / "gap"
    shutil.copytree(ct.folder, gap)
    middle = ct.files[3]  # files are in spatial order k = 0..5
    (gap / middle.name).unlink()
    with pytest.raises(DicomError, match="1 missing slice"):
        read_ct_series(gap)

    tilted = tmp_path / "orientation"
    shutil.copytree(ct.folder, tilted)
    odd = pydicom.dcmread(tilted / ct.files[1].name)
    odd.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    odd.save_as(tilted / ct.files[1].name)
    with pytest.raises(DicomError, match="inconsistent ImageOrientationPatient"):
        read_ct_series(tilted)

    two = tmp_path / "two"
    shutil.copytree(ct.folder, two / "a")
    write_ct(two / "b", small_volume((3, 8, 8)))
    with pytest.raises(DicomError, match="holds 2 series; pass series_uid"):
        read_ct_series(two)
    assert read_ct_series(two, ct.series_uid).volume_hu.shape == SHAPE

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ct.folder, corrupt)
    data = (corrupt / ct.files[2].name).read_bytes()
    (corrupt / ct.files[2].name).write_bytes(data[: len(data) - 100])  # pixel data cut short
    with pytest.raises(DicomError, match=rf"1 unreadable DICOM file.*{ct.files[2].name}: truncated"):
        read_ct_series(corrupt)


@pytest.mark.parametrize("variant", ["slicer", "epad"])
@pytest.mark.parametrize("backend", ["highdicom", "pydicom", "auto"])
def test_seg_variants_give_exactly_the_mask(ct: CTFixture, mask: np.ndarray, tmp_path: Path, variant: str,
                                            backend: str) -> None:
    seg_path = write_seg(tmp_path / "seg" / "1-1.dcm", ct, mask, variant=variant)
    dataset = pydicom.dcmread(seg_path)
    frames = int(dataset.NumberOfFrames)
    assert frames == (SHAPE[0] if variant == "slicer" else len(NODULE_SLICES))
    result = read_seg_mask(seg_path, read_ct_series(ct.folder), backend=backend)
    assert result.dtype == bool and result.shape == SHAPE
    np.testing.assert_array_equal(result, mask)


def test_seg_known_bad_files_fall_back_to_pydicom(ct: CTFixture, mask: np.ndarray, tmp_path: Path) -> None:
    volume = read_ct_series(ct.folder)
    keyerror = write_seg(tmp_path / "a" / "1-1.dcm", ct, mask, highdicom_key_error=True)
    with pytest.raises(DicomError, match="highdicom cannot read"):
        read_seg_mask(keyerror, volume, backend="highdicom")
    np.testing.assert_array_equal(read_seg_mask(keyerror, volume), mask)
    duplicates = write_seg(tmp_path / "b" / "1-1.dcm", ct, mask, variant="epad", duplicate_references=True)
    np.testing.assert_array_equal(read_seg_mask(duplicates, volume), mask)


def test_seg_references(ct: CTFixture, mask: np.ndarray, tmp_path: Path) -> None:
    seg_path = write_seg(tmp_path / "1-1.dcm", ct, mask, variant="epad")
    dataset = pydicom.dcmread(seg_path)
    assert seg_referenced_series_uid(dataset) == ct.series_uid
    tumour_uids = {str(ct.datasets[k].SOPInstanceUID) for k in NODULE_SLICES}
    assert tumour_uids <= seg_referenced_sop_uids(dataset)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    assert "DerivationImageSequence" in shared  # the ePAD layout the placement must not rely on


def test_seg_on_the_wrong_ct_is_refused(ct: CTFixture, mask: np.ndarray, tmp_path: Path) -> None:
    seg_path = write_seg(tmp_path / "seg.dcm", ct, mask, variant="epad")
    shifted = write_ct(tmp_path / "shifted", small_volume(SHAPE), origin_lps=(-10.0, -20.0, 100.0))
    with pytest.raises(DicomError, match="matching no slice"):
        read_seg_mask(seg_path, read_ct_series(shifted.folder), backend="pydicom")
    finer = write_ct(tmp_path / "finer", small_volume(SHAPE), spacing=(0.5, 0.5, 2.5))
    with pytest.raises(DicomError, match="not on the CT's in-plane grid"):
        read_seg_mask(seg_path, read_ct_series(finer.folder))
    with pytest.raises(DicomError, match="not a DICOM SEG"):
        read_seg_mask(ct.files[0], read_ct_series(ct.folder))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("no_rows", "has no valid Rows/Columns"),
        ("spacing_text", "PixelSpacing 'abc' is not numbers"),
        ("spacing_count", "PixelSpacing must hold 2 finite numbers"),
        ("spacing_zero", "PixelSpacing must be positive"),
        ("position_nan", "ImagePositionPatient must hold 3 finite numbers"),
    ],
)
def test_broken_slice_attributes_name_the_file(ct: CTFixture, tmp_path: Path, edit: str, message: str) -> None:
    """A slice without Rows once raised AttributeError (a traceback), PixelSpacing 'abc' a message without a
    file name: every broken attribute is a DicomError naming the file and the attribute."""
    folder = tmp_path / edit
    shutil.copytree(ct.folder, folder)
    name = ct.files[0].name
    dataset = pydicom.dcmread(folder / name)
    if edit == "no_rows":
        del dataset.Rows
    elif edit == "spacing_count":
        dataset.PixelSpacing = [0.7]
    elif edit == "spacing_zero":
        dataset.PixelSpacing = [0.7, 0]
    elif edit == "position_nan":
        dataset.ImagePositionPatient = [0, 0, float("nan")]
    dataset.save_as(folder / name)
    if edit == "spacing_text":  # pydicom will not write an invalid DS: edit the bytes (same length)
        data = (folder / name).read_bytes()
        value = "\\".join(f"{v}" for v in dataset.PixelSpacing).encode()
        value += b" " * (len(value) % 2)
        assert data.count(value) == 1
        (folder / name).write_bytes(data.replace(value, b"abc".ljust(len(value))))
    with pytest.raises(DicomError, match=message) as raised:
        read_ct_series(folder)
    assert name in str(raised.value)
