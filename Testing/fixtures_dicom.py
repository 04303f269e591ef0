"""Tiny DICOM fixtures written the way NSCLC-Radiogenomics ships them: a few-slice CT and a binary SEG.

Not a test module (no `test_` prefix): helpers imported by the reader tests. The SEG comes in the two real
dialects — "slicer" (every CT slice has a frame) and "epad" (tumour frames only, source references moved
to the shared functional group) — built with highdicom and then edited with pydicom where the real files
deviate from what highdicom writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from RadiogenomicGANLib.geometry import VolumeGeometry


@dataclass
class CTFixture:
    folder: Path
    files: list[Path]
    datasets: list[Dataset]
    volume_hu: np.ndarray      # int16 (K, J, I), in the sorted (spatial) order
    geometry: VolumeGeometry
    series_uid: str
    study_uid: str


def small_volume(shape: tuple[int, int, int] = (6, 24, 20), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, size=shape).astype(np.int16)


def nodule_mask(shape: tuple[int, int, int], slices: range, centre: tuple[int, int] = (12, 9),
                radius: float = 4.0) -> np.ndarray:
    """A disc on the given slices, radius shrinking towards the ends (so frames differ)."""
    mask = np.zeros(shape, dtype=bool)
    jj, ii = np.mgrid[: shape[1], : shape[2]]
    for n, k in enumerate(slices):
        r = radius - 0.8 * abs(n - (len(slices) - 1) / 2)
        mask[k] = (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= max(r, 1.0) ** 2
    return mask


def write_ct(
    folder: Path,
    volume_hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin_lps: tuple[float, float, float] = (-10.0, -20.0, -50.0),
    patient_id: str = "R01-001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    description: str = "CT CHEST",
    modality: str = "CT",
    shuffle_names: bool = True,
) -> CTFixture:
    """One file per slice, int16 stored as value + 1024 with RescaleIntercept −1024 (as the real CTs).

    `spacing` is (i, j, k) mm. File names are deliberately out of spatial order (`shuffle_names`) so a
    reader sorting by name would fail.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference = generate_uid()
    depth = volume_hu.shape[0]
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    order = np.random.default_rng(1).permutation(depth) if shuffle_names else np.arange(depth)
    files, datasets = [], []
    for k in range(depth):
        position = np.asarray(origin_lps) + k * spacing[2] * normal
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = patient_id + "^"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.StudyID = "1"
        ds.StudyDate = "20000101"
        ds.StudyTime = "000000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.Manufacturer = "test"
        ds.SeriesNumber = 2
        ds.InstanceNumber = int(order[k]) + 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume_hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = (volume_hu[k].astype(np.int32) + 1024).astype(np.int16).tobytes()
        path = folder / f"1-{int(order[k]) + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        datasets.append(pydicom.dcmread(path))
    geometry = VolumeGeometry.from_lps(origin_lps, spacing, np.column_stack([row_dir, col_dir, normal]))
    return CTFixture(folder, files, datasets, volume_hu, geometry, series_uid, study_uid)


def write_seg(
    path: Path,
    ct: CTFixture,
    mask: np.ndarray,
    *,
    variant: str = "slicer",
    duplicate_references: bool = False,
    highdicom_key_error: bool = False,
) -> Path:
    """A binary one-segment SEG of `mask` (K, J, I, in the CT's file-slice order `ct.datasets`).

    variant "slicer": a frame for every CT slice (empty ones included). "epad": frames only where the mask
    has foreground, source-image references moved from the per-frame to the shared functional group.
    `duplicate_references` lists every referenced instance twice, as R01-003 does (older highdicom refuses
    it). `highdicom_key_error` keeps PixelMeasuresSequence on the first frame only, which makes highdicom
    raise KeyError (0028,9110) like the early Slicer-written SEGs of highdicom issue 344.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    description = highdicom.seg.SegmentDescription(
        segment_number=1,
        segment_label="Nodule",
        segmented_property_category=highdicom.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=highdicom.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = highdicom.seg.Segmentation(
        source_images=ct.datasets,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="fixture",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=(variant == "epad"),
        series_description="ePAD Generated DSO" if variant == "epad" else "3D Slicer segmentation result",
    )
    if variant == "epad":
        derivations = [group.DerivationImageSequence for group in seg.PerFrameFunctionalGroupsSequence
                       if "DerivationImageSequence" in group]
        shared = seg.SharedFunctionalGroupsSequence[0]
        sources = DicomSequence()
        for derivation in derivations:
            for item in derivation[0].SourceImageSequence:
                sources.append(item)
        shared_derivation = Dataset()
        shared_derivation.SourceImageSequence = sources
        shared_derivation.DerivationCodeSequence = derivations[0][0].DerivationCodeSequence
        shared.DerivationImageSequence = DicomSequence([shared_derivation])
        for group in seg.PerFrameFunctionalGroupsSequence:
            if "DerivationImageSequence" in group:
                del group.DerivationImageSequence
    if duplicate_references:
        instances = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        for item in list(instances):
            copy = Dataset()
            copy.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            copy.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            instances.append(copy)
    if highdicom_key_error:
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        del seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        seg.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence = measures
    seg.save_as(path)
    return path
