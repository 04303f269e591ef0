"""Volumes and segmentations on disk for the headless insert: NRRD / NIfTI / MHA / DICOM in, NRRD & co. out.

Reading gives a [k, j, i] array plus its IJK→RAS `VolumeGeometry`; ITK files are LPS, converted once through
`VolumeGeometry.from_lps`. Writing keeps the geometry (origin, spacing, axis directions) exactly, so the new
volume overlays the input in any viewer.

The segmentation is written in 3D Slicer's `.seg.nrrd` format — a labelmap NRRD whose `SegmentN_*` header
fields carry each segment's ID, name, colour, label value, layer, extent and tags (terminology included), so
Slicer loads names, colours and terminology. When the input was a DICOM series, a DICOM SEG (highdicom) can
reference that series; it is marked as synthetic (algorithm RadiogenomicGAN, series description, content
label and a coded "synthetic" modifier) so no one mistakes the nodules for findings.

Every writer writes to a hidden temporary file beside the target and renames it at the end (`atomic.atomic_path`),
so an interrupted run never leaves a half-written output under the requested name.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from RadiogenomicGANLib.atomic import atomic_path
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.segments import SegmentInfo

VOLUME_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
SEG_SUFFIX = ".seg.nrrd"

#: Private coding scheme for the "synthetic" note in DICOM SEG (DICOM PS3.16 allows "99" local schemes).
SYNTHETIC_CODE = ("SYNTHETIC", "99RGGAN", "Synthetic lesion (generated, not a finding)")
SERIES_DESCRIPTION = "Synthetic nodules (RadiogenomicGAN)"
#: The SEG series number is the source's plus this offset, so viewers list the derived series after the CT.
SERIES_NUMBER_OFFSET = 9000
#: The gene sample's description is cut to this many characters in the SEG's AlgorithmParameters, which lists
#: every parameter in one string viewers show on one line (a blend's description runs long; the full
#: provenance stays in the .seg.nrrd and volume headers).
GENE_SAMPLE_MAX_CHARS = 60


class VolumeIOError(ValueError):
    """A file that cannot be read or written as asked; the message says why."""


@dataclass
class LoadedVolume:
    """A CT as read from disk: voxels [k, j, i], geometry, and the DICOM series when it came from one."""

    array: np.ndarray
    geometry: VolumeGeometry
    path: Path
    source: str  # "nrrd" | "nifti" | "mha" | "dicom"
    dicom: Any = None  # dicom_io.CTVolume for DICOM input
    dicom_files: list[Path] = field(default_factory=list)


# --- paths ----------------------------------------------------------------------------------------------
def volume_format(path: str | Path) -> str:
    """'nrrd' | 'nifti' | 'mha' | 'dicom' from a path (a folder is DICOM); unknown suffix → VolumeIOError."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        return "nrrd"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".mha"):
        return "mha"
    if name.endswith(".dcm"):
        return "dicom"
    raise VolumeIOError(
        f"cannot tell the format of {path.name!r}: use .nrrd, .nii, .nii.gz, .mha or a DICOM folder"
    )


def check_output_path(path: str | Path, suffixes: Sequence[str] = VOLUME_SUFFIXES) -> Path:
    """Refuse an output path with an unsupported suffix or a missing folder, before anything runs."""
    path = Path(path)
    if not any(path.name.lower().endswith(s) for s in suffixes):
        raise VolumeIOError(f"output {path.name!r} must end with one of {', '.join(suffixes)}")
    if not path.parent.exists() and str(path.parent) not in ("", "."):
        raise VolumeIOError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise VolumeIOError(f"output {path} is a folder")
    return path


# --- reading --------------------------------------------------------------------------------------------
def read_volume(path: str | Path, *, series_uid: str | None = None) -> LoadedVolume:
    """Read a CT from NRRD / NIfTI / MHA (SimpleITK) or a DICOM folder (`dicom_io.read_ct_series`).

    `series_uid` picks one CT series when the folder holds several.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeIOError(f"input not found: {path}")
    kind = volume_format(path)
    if kind == "dicom":
        return _read_dicom(path, series_uid)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeIOError(f"cannot read {path.name}: {str(error).strip().splitlines()[-1]}") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeIOError(f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                            "a scalar CT volume is needed")
    if image.GetDimension() != 3:
        raise VolumeIOError(f"{path.name} is a {image.GetDimension()}D image; a 3D CT volume is needed")
    array = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    geometry = VolumeGeometry.from_lps(image.GetOrigin(), image.GetSpacing(), direction)
    return LoadedVolume(array, geometry, path, kind)


def _read_dicom(path: Path, series_uid: str | None) -> LoadedVolume:
    from RadiogenomicGANLib import dicom_io

    try:
        ct = dicom_io.read_ct_series(path if path.is_dir() else [path], series_uid)
    except (ValueError, OSError) as error:
        raise VolumeIOError(f"cannot read the DICOM series in {path}: {error}") from error
    files = [Path(f) for f in getattr(ct, "files", []) or []]
    return LoadedVolume(np.asarray(ct.volume_hu), ct.geometry, path, "dicom", dicom=ct, dicom_files=files)


# --- writing volumes ------------------------------------------------------------------------------------
def _sitk_image(array: np.ndarray, geometry: VolumeGeometry) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    origin, spacing, direction = geometry.to_lps()
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    return image


def write_volume(
    path: str | Path, array: np.ndarray, geometry: VolumeGeometry, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a [k, j, i] volume with its geometry (NRRD/NIfTI/MHA by suffix), atomically, compressed."""
    import SimpleITK as sitk

    if array.ndim != 3:
        raise VolumeIOError(f"a volume must be 3D, got shape {array.shape}")
    path = check_output_path(path)
    image = _sitk_image(array, geometry)
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, str(value).replace("\n", " "))
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        except RuntimeError as error:  # ITK reports a full disk or a read-only folder as a RuntimeError
            raise VolumeIOError(f"cannot write {path}: {str(error).strip().splitlines()[-1]}") from None
    return path


# --- writing segmentations ------------------------------------------------------------------------------
def _tag_text(value: str) -> str:
    """Tag values may not contain '|' (the tag separator) or newlines."""
    return str(value).replace("|", "/").replace("\n", " ")


def segmentation_header(label: np.ndarray, geometry: VolumeGeometry, segments: Sequence[SegmentInfo]) -> dict:
    """The pynrrd header of a Slicer `.seg.nrrd` (LPS space, as Slicer writes it) for a [k, j, i] labelmap."""
    origin, spacing, direction = geometry.to_lps()
    header: dict[str, Any] = {
        "type": "unsigned char",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": (np.asarray(direction) * spacing).T,  # one row per axis i, j, k
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "space origin": np.asarray(origin, dtype=np.float64),
    }
    for index, segment in enumerate(segments):
        present = np.argwhere(label == segment.label_value)
        if present.size:
            low, high = present.min(axis=0), present.max(axis=0)  # k, j, i
            extent = f"{low[2]} {high[2]} {low[1]} {high[1]} {low[0]} {high[0]}"
        else:
            extent = "0 -1 0 -1 0 -1"
        tags = {"TerminologyEntry": segment.terminology, "Segmentation.Status": "completed", **segment.tags}
        prefix = f"Segment{index}_"
        header[prefix + "Color"] = " ".join(f"{c:.6g}" for c in segment.colour)
        header[prefix + "ColorAutoGenerated"] = "0"
        header[prefix + "Extent"] = extent
        header[prefix + "ID"] = segment.segment_id or f"Segment_{segment.label_value}"
        header[prefix + "LabelValue"] = str(segment.label_value)
        header[prefix + "Layer"] = "0"
        header[prefix + "Name"] = segment.name
        header[prefix + "NameAutoGenerated"] = "0"
        header[prefix + "Tags"] = "".join(f"{_tag_text(k)}:{_tag_text(v)}|" for k, v in tags.items())
    header["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    header["Segmentation_ConversionParameters"] = ""
    header["Segmentation_MasterRepresentation"] = "Binary labelmap"
    header["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    return header


def write_segmentation(
    path: str | Path, label: np.ndarray, geometry: VolumeGeometry, segments: Sequence[SegmentInfo]
) -> Path:
    """Write a labelmap [k, j, i] (uint8, value = segment label) as a Slicer `.seg.nrrd`, atomically."""
    import nrrd

    path = check_output_path(path, (SEG_SUFFIX,))
    if label.ndim != 3:
        raise VolumeIOError(f"a segmentation must be 3D, got shape {label.shape}")
    if label.max(initial=0) > 255:
        raise VolumeIOError("at most 255 segments fit in one labelmap layer")
    header = segmentation_header(label, geometry, segments)
    with atomic_path(path) as temporary:
        nrrd.write(str(temporary), np.ascontiguousarray(label, dtype=np.uint8), header, index_order="C")
    return path


# --- DICOM SEG ------------------------------------------------------------------------------------------
def write_dicom_seg(
    path: str | Path,
    label: np.ndarray,
    loaded: LoadedVolume,
    segments: Sequence[SegmentInfo],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """A DICOM SEG of the synthetic nodules referencing the input DICOM series, marked as synthetic.

    Frames follow the input slices (k order); only non-empty frames are stored. Requires DICOM input.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if loaded.source != "dicom":
        raise VolumeIOError("a DICOM SEG needs a DICOM input series to reference (use --out-segmentation instead)")
    path = Path(path)
    if not path.parent.exists() and str(path.parent) not in ("", "."):
        raise VolumeIOError(f"output folder {path.parent} does not exist")
    datasets = _source_datasets(loaded, pydicom)
    present = [s for s in segments if (label == s.label_value).any()]
    if not present:
        raise VolumeIOError("no synthetic nodule voxels to store in a DICOM SEG (the nodule label is empty)")
    pixel = np.zeros((*label.shape, len(present)), dtype=np.uint8)
    for index, segment in enumerate(present):
        pixel[..., index] = label == segment.label_value
    provenance = provenance or {}
    version = str(provenance.get("version", "unknown"))
    parameters = {
        "synthetic": "true",
        "model": str(provenance.get("model_kind", "")),
        "weights": str(provenance.get("weights_file", "")),
        "gene_sample": json.dumps(provenance.get("gene_sample"), default=str)[:GENE_SAMPLE_MAX_CHARS],
        "seed": str(provenance.get("seed", "")),
    }
    algorithm = hd.AlgorithmIdentificationSequence(
        name="RadiogenomicGAN", family=codes.cid7162.ArtificialIntelligence, version=version, parameters=parameters
    )
    synthetic = hd.sr.CodedConcept(*SYNTHETIC_CODE)
    descriptions = []
    for number, segment in enumerate(present, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Lung],
        )
        description.SegmentDescription = "Synthetic nodule generated by RadiogenomicGAN; not a real finding"
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [synthetic]
        descriptions.append(description)
    first = datasets[0]
    with warnings.catch_warnings():
        # TCIA-style PatientName "R01-001" (copied from the source) is a valid single-component name
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _build_seg(hd, datasets, pixel, descriptions, first, version)
    seg.SeriesDescription = SERIES_DESCRIPTION
    with atomic_path(path) as temporary:
        seg.save_as(str(temporary))
    return path


def _build_seg(hd: Any, datasets: list[Any], pixel: np.ndarray, descriptions: list[Any], first: Any,
               version: str) -> Any:
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="RadiogenomicGAN",
        manufacturer_model_name="RadiogenomicGAN",
        software_versions=version,
        device_serial_number="synthetic",
        content_label="SYNTHETIC",
        content_description="Synthetic nodules (RadiogenomicGAN)",
        content_creator_name="RadiogenomicGAN^",
    )


def _source_datasets(loaded: LoadedVolume, pydicom: Any) -> list[Any]:
    """The input series' datasets (no pixel data) in slice order k, matched by SOPInstanceUID."""
    ct = loaded.dicom
    files = loaded.dicom_files
    if not files:
        folder = loaded.path if loaded.path.is_dir() else loaded.path.parent
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    by_uid: dict[str, Any] = {}
    for file in files:
        try:
            dataset = pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception:
            continue
        if str(getattr(dataset, "SeriesInstanceUID", "")) == str(ct.series_uid):
            by_uid[str(dataset.SOPInstanceUID)] = dataset
    sop_uids = [str(u) for u in ct.sop_uids]
    missing = [u for u in sop_uids if u not in by_uid]
    if missing:
        raise VolumeIOError(f"{len(missing)} slices of the input series could not be re-read for the DICOM SEG")
    return [by_uid[u] for u in sop_uids]
