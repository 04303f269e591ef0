"""DICOM readers for CT series and SEG nodule masks, robust to the files NSCLC-Radiogenomics actually ships.

Why not a generic loader: the collection has two SEG dialects (full-frame "3D Slicer segmentation result"
and tumour-frames-only "ePAD Generated DSO" whose source-image references sit in the shared functional
group), SEGs that highdicom refuses (issue 344 KeyError, R01-003's duplicate referenced UIDs) and studies
with several CT series. So SEG frames are placed by their own ImagePositionPatient projected on the CT's
slice normal — never by frame order or referenced SOP UIDs — and highdicom is tried first with a pydicom
fallback. Volumes come back as int16 HU arrays indexed [k, j, i] with an IJK→RAS `VolumeGeometry`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from .geometry import VolumeGeometry

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: Tags kept from a CT series (taken from its first slice) for provenance and reports.
COMMON_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "SeriesNumber",
               "Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness",
               "KVP", "FrameOfReferenceUID", "StudyDate", "BodyPartExamined")

#: File names that are never DICOM in a TCIA download; not even opened.
_NON_DICOM_SUFFIXES = {".csv", ".txt", ".gz", ".json", ".xml", ".md", ".zip", ".py", ".npz", ".nrrd",
                       ".nii", ".png", ".jpg", ".pdf", ".tsv", ".html"}
_UNCOMPRESSED_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


#: Reason recorded for files that are simply not DICOM (as opposed to damaged DICOM files).
NOT_DICOM = "not a DICOM file"


def is_damaged(reason: str) -> bool:
    """True for an unreadable-file reason that means damaged DICOM rather than a foreign file."""
    return not reason.startswith(NOT_DICOM)


class DicomError(ValueError):
    """A DICOM input that cannot be used; the message names the file or series and what is wrong."""


# --- series index ----------------------------------------------------------------------------------------
@dataclass
class SeriesInfo:
    """What the headers say about one series (enough to choose it without reading pixels)."""

    series_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    study_uid: str = ""
    patient_id: str = ""
    description: str = ""
    folders: set[Path] = field(default_factory=set)


class SeriesIndex(dict):
    """`dict[series_uid, list[Path]]` (sorted paths) plus `info` per series and the files it could not use.

    `unreadable` lists (path, reason) for every file that is not DICOM, is corrupt or truncated, or has no
    SeriesInstanceUID: such files are skipped, and callers decide whether that matters (a corrupt slice in
    the chosen CT folder does; a stray README does not).
    """

    def __init__(self) -> None:
        super().__init__()
        self.info: dict[str, SeriesInfo] = {}
        self.unreadable: list[tuple[Path, str]] = []


def list_series(folder: str | Path | Iterable[str | Path], *, check_size: bool = True) -> SeriesIndex:
    """Index DICOM files by SeriesInstanceUID, reading headers only (`stop_before_pixels`).

    `folder` is a directory (walked recursively) or an iterable of files. With `check_size`, uncompressed
    files shorter than their pixel data must be are reported as truncated (header-only reads cannot see it).
    """
    if isinstance(folder, (str, Path)):
        root = Path(folder)
        if not root.exists():
            raise DicomError(f"DICOM folder not found: {root}")
        files = sorted(_walk_files(root)) if root.is_dir() else [root]
    else:
        files = sorted(Path(f) for f in folder)
    index = SeriesIndex()
    for path in files:
        dataset, reason = read_header(path, check_size=check_size)
        if dataset is None:
            index.unreadable.append((path, reason))
            continue
        uid = str(dataset.SeriesInstanceUID)
        index.setdefault(uid, []).append(path)
        info = index.info.setdefault(uid, SeriesInfo(
            series_uid=uid,
            modality=str(dataset.get("Modality", "")),
            sop_class_uid=str(dataset.get("SOPClassUID", "")),
            study_uid=str(dataset.get("StudyInstanceUID", "")),
            patient_id=str(dataset.get("PatientID", "")),
            description=str(dataset.get("SeriesDescription", "")),
        ))
        info.folders.add(path.parent)
    return index


def _walk_files(root: Path) -> Iterable[Path]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            path = Path(directory) / name
            if name.startswith(".") or path.suffix.lower() in _NON_DICOM_SUFFIXES or name == "DICOMDIR":
                continue
            yield path


def read_header(path: Path, *, check_size: bool = True) -> tuple[Dataset | None, str]:
    """(header dataset, "") or (None, why it cannot be used). Never raises for a bad file."""
    if not path.is_file():
        return None, "file not found"
    try:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:  # no preamble: a raw dataset is still legal DICOM, garbage is not
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPInstanceUID" not in dataset or "SeriesInstanceUID" not in dataset:
                if path.suffix.lower() == ".dcm":  # named as DICOM, so a damaged file, not a foreign one
                    return None, "corrupt DICOM file (a .dcm name but no DICOM content)"
                return None, NOT_DICOM
    except Exception as error:  # truncated or garbled headers raise anything from EOFError to ValueError
        return None, f"corrupt DICOM header ({type(error).__name__}: {error})"
    if "SeriesInstanceUID" not in dataset:
        return None, "corrupt or incomplete DICOM header (no SeriesInstanceUID)"
    if check_size:
        short = _truncation(path, dataset)
        if short:
            return None, short
    return dataset, ""


def _truncation(path: Path, dataset: Dataset) -> str:
    """Reason string if the file is too short to hold its (uncompressed) pixel data, else "".

    A header-only read cannot see a file cut inside its pixel data, so look at the PixelData element
    itself: first where it sits in an intact file (pixel data last), else by scanning the bytes.
    """
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _UNCOMPRESSED_SYNTAXES or "Rows" not in dataset or "Columns" not in dataset:
        return ""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    needed = (int(dataset.Rows) * int(dataset.Columns) * frames * samples * bits + 7) // 8
    big = syntax == "1.2.840.10008.1.2.2"
    tag = b"\x7f\xe0\x00\x10" if big else b"\xe0\x7f\x10\x00"
    header = 8 if syntax == "1.2.840.10008.1.2" else 12
    size = path.stat().st_size
    padded = needed + (needed % 2)
    with open(path, "rb") as handle:
        offset = size - padded - header
        if offset > 0:
            handle.seek(offset)
            if handle.read(4) == tag:
                return ""  # the element header sits exactly where an intact file has it
        handle.seek(0)
        data = handle.read()
    offset = data.rfind(tag)
    if offset < 0:
        return f"truncated DICOM file ({size} bytes, no pixel data element; {needed} bytes expected)"
    length = int.from_bytes(data[offset + header - 4: offset + header], "big" if big else "little")
    if length == 0xFFFFFFFF:
        return ""
    if length < needed or offset + header + length > size:
        return (f"truncated DICOM file ({size} bytes; pixel data needs {needed} bytes, the file holds "
                f"{max(size - offset - header, 0)})")
    return ""


# --- CT series -------------------------------------------------------------------------------------------
@dataclass
class CTVolume:
    """A CT series as a volume: int16 HU [k, j, i], IJK→RAS geometry, and where it came from."""

    volume_hu: np.ndarray
    geometry: VolumeGeometry
    series_uid: str
    study_uid: str
    sop_uids: list[str]
    tags: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    slice_positions: np.ndarray = field(default_factory=lambda: np.zeros(0))  # mm along the slice normal

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume_hu.shape)  # type: ignore[return-value]


def read_ct_series(
    files: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    *,
    spacing_tolerance: float = 0.05,
) -> CTVolume:
    """Read one CT series into HU; refuse what would give a wrong volume rather than guess.

    `files` is a folder or a list of files. Several series present → `series_uid` picks one (required if
    more than one CT series is present). Slices are sorted by ImagePositionPatient projected on the slice
    normal (row × column direction), so file names and InstanceNumber do not matter. Refused with
    DicomError: non-CT modality, mixed orientation/size/pixel spacing, duplicate positions, gaps (missing
    slices) or non-uniform spacing beyond `spacing_tolerance` (relative), and gantry-tilted (sheared) stacks.
    """
    paths = _collect_series_files(files, series_uid)
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as error:
            raise DicomError(f"cannot read CT slice {path}: {type(error).__name__}: {error}") from error
    # A scout/localizer stored inside the axial series would break the stack; it is not a slice of it.
    axial = [i for i, d in enumerate(datasets) if "LOCALIZER" not in [str(v).upper() for v in
                                                                      d.get("ImageType", []) or []]]
    if axial and len(axial) < len(datasets):
        logger.info("leaving %d localizer image(s) out of series %s", len(datasets) - len(axial),
                    datasets[0].get("SeriesInstanceUID", "?"))
        datasets, paths = [datasets[i] for i in axial], [paths[i] for i in axial]
    first = datasets[0]
    series = str(first.get("SeriesInstanceUID", ""))
    where = f"series {series} ({paths[0].parent})"

    modality = str(first.get("Modality", ""))
    if modality != "CT":
        raise DicomError(f"{where} is modality {modality or 'unknown'}, not CT")
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(f"{where} is a multi-frame (enhanced) CT; only one slice per file is supported")

    counts = {"ImageOrientationPatient": 6, "PixelSpacing": 2, "ImagePositionPatient": 3}

    def values(dataset: Dataset, keyword: str, path: Path) -> np.ndarray:
        """A numeric multi-value attribute, checked: a bad one names the file and the attribute."""
        if keyword not in dataset:
            raise DicomError(f"CT slice {path} has no {keyword}")
        try:
            raw = dataset[keyword].value
            parsed = np.asarray([float(v) for v in (raw if isinstance(raw, list | tuple | MultiValue) else [raw])],
                                dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            text = dataset.get_item(keyword).value  # the undecoded bytes
            text = text.decode("ascii", "replace").strip() if isinstance(text, bytes) else str(text)
            raise DicomError(f"CT slice {path}: {keyword} {text[:40]!r} is not numbers") from None
        if parsed.shape != (counts[keyword],) or not np.isfinite(parsed).all():
            raise DicomError(f"CT slice {path}: {keyword} must hold {counts[keyword]} finite numbers, got "
                             f"{str(raw)[:40]!r}")
        if keyword == "PixelSpacing" and (parsed <= 0).any():
            raise DicomError(f"CT slice {path}: PixelSpacing must be positive, got {str(raw)[:40]!r}")
        return parsed

    def size(dataset: Dataset, path: Path) -> tuple[int, int]:
        """(Rows, Columns), present and positive."""
        try:
            shape = (int(dataset.Rows), int(dataset.Columns))
        except (AttributeError, TypeError, ValueError):
            raise DicomError(f"CT slice {path} has no valid Rows/Columns (image size)") from None
        if min(shape) < 1:
            raise DicomError(f"CT slice {path}: image size {shape[0]}×{shape[1]} is empty")
        return shape

    orientation = values(first, "ImageOrientationPatient", paths[0])
    pixel_spacing = values(first, "PixelSpacing", paths[0])
    rows, columns = size(first, paths[0])
    for dataset, path in zip(datasets, paths):
        if str(dataset.get("Modality", "")) != "CT":
            raise DicomError(f"{where}: {path.name} is modality {dataset.get('Modality', '?')}, not CT")
        if not np.allclose(values(dataset, "ImageOrientationPatient", path), orientation, atol=1e-4):
            raise DicomError(f"{where}: inconsistent ImageOrientationPatient ({path.name} differs)")
        if size(dataset, path) != (rows, columns):
            raise DicomError(f"{where}: inconsistent image size ({path.name} is {dataset.Rows}×"
                             f"{dataset.Columns}, first slice {rows}×{columns})")
        if not np.allclose(values(dataset, "PixelSpacing", path), pixel_spacing, atol=1e-4):
            raise DicomError(f"{where}: inconsistent PixelSpacing ({path.name} differs)")

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([values(d, "ImagePositionPatient", p) for d, p in zip(datasets, paths)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets = [datasets[o] for o in order]
    paths = [paths[o] for o in order]
    positions, along = positions[order], along[order]

    slice_spacing = _check_slice_stack(positions, along, normal, first, where, spacing_tolerance)
    # DICOM PixelSpacing is (between rows, between columns) = (j, i).
    spacing_ijk = (pixel_spacing[1], pixel_spacing[0], slice_spacing)
    geometry = VolumeGeometry.from_lps(positions[0], spacing_ijk, np.column_stack([row_dir, col_dir, normal]))

    volume = np.empty((len(datasets), rows, columns), dtype=np.int16)
    for k, (dataset, path) in enumerate(zip(datasets, paths)):
        volume[k] = _slice_hu(dataset, path)
    tags = {key: _plain(first.get(key)) for key in COMMON_TAGS if key in first}
    return CTVolume(
        volume_hu=volume,
        geometry=geometry,
        series_uid=series,
        study_uid=str(first.get("StudyInstanceUID", "")),
        sop_uids=[str(d.get("SOPInstanceUID", "")) for d in datasets],
        tags=tags,
        files=paths,
        slice_positions=along,
    )


def _collect_series_files(files: str | Path | Sequence[str | Path], series_uid: str | None) -> list[Path]:
    source = files if isinstance(files, (str, Path)) else [Path(f) for f in files]
    index = list_series(source)
    # An explicitly listed file must be usable; in a folder, only damaged DICOM files matter (a slice may
    # be among them), foreign files are ignored.
    bad = [(p, r) for p, r in index.unreadable if not isinstance(source, (str, Path)) or is_damaged(r)]
    if bad:
        shown = "; ".join(f"{p.name}: {r}" for p, r in bad[:3])
        raise DicomError(f"{len(bad)} unreadable DICOM file(s) in {_describe(files)} — the series may be "
                         f"incomplete: {shown}")
    if series_uid is not None:
        if series_uid not in index:
            raise DicomError(f"series {series_uid} is not among the {len(index)} series in {_describe(files)}")
        return index[series_uid]
    if not index:
        reasons = "; ".join(f"{p.name}: {r}" for p, r in index.unreadable[:3])
        raise DicomError(f"no readable DICOM series in {_describe(files)}" + (f" ({reasons})" if reasons else ""))
    if len(index) == 1:
        return next(iter(index.values()))
    ct = [uid for uid, info in index.info.items() if info.modality == "CT"]
    if len(ct) == 1:
        return index[ct[0]]
    listing = "; ".join(f"{uid} ({index.info[uid].modality} '{index.info[uid].description}', "
                        f"{len(index[uid])} files)" for uid in index)
    raise DicomError(f"{_describe(files)} holds {len(index)} series; pass series_uid to choose one: {listing}")


def _describe(files: str | Path | Sequence[str | Path]) -> str:
    if isinstance(files, (str, Path)):
        return str(files)
    return f"{len(files)} files" + (f" under {Path(files[0]).parent}" if len(files) else "")


def _check_slice_stack(positions: np.ndarray, along: np.ndarray, normal: np.ndarray, first: Dataset,
                       where: str, tolerance: float) -> float:
    """Slice spacing (mm) of a sorted stack, or DicomError for duplicates, gaps, irregularity or tilt."""
    if len(along) == 1:
        spacing = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
        return abs(spacing)
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise DicomError(f"{where}: two slices at the same position ({along[k]:.3f} mm along the normal); "
                         "the series holds duplicates or several acquisitions")
    spacing = float(np.median(steps))
    irregular = np.abs(steps - spacing) > tolerance * spacing + 1e-3
    if irregular.any():
        k = int(np.argmax(irregular))
        gap = steps[k] / spacing
        if abs(gap - round(gap)) < tolerance and round(gap) >= 2:
            raise DicomError(f"{where}: {round(gap) - 1} missing slice(s) between {along[k]:.2f} and "
                             f"{along[k + 1]:.2f} mm (spacing {spacing:.3f} mm)")
        raise DicomError(f"{where}: non-uniform slice spacing ({steps.min():.3f}…{steps.max():.3f} mm)")
    drift = positions[-1] - positions[0]
    in_plane = drift - (drift @ normal) * normal
    if np.linalg.norm(in_plane) > max(0.5, 0.01 * abs(drift @ normal)):
        raise DicomError(f"{where}: slice positions drift {np.linalg.norm(in_plane):.2f} mm in-plane across "
                         "the stack (gantry tilt); resample it to an orthogonal grid first")
    return spacing


def _slice_hu(dataset: Dataset, path: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomError(f"cannot decode pixel data of {path} (transfer syntax {syntax}): "
                         f"{type(error).__name__}: {error}") from error
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    if slope == 1.0 and float(intercept).is_integer():
        hu = pixels.astype(np.int32)  # the common case, exact and fast
        hu += int(intercept)
    else:
        hu = np.rint(pixels.astype(np.float64) * slope + intercept)
    if hu.min() < -32768 or hu.max() > 32767:
        hu = np.clip(hu, -32768, 32767)
    return hu.astype(np.int16)


def _plain(value: Any) -> Any:
    """Tag value → JSON-friendly Python value."""
    if value is None:
        return None
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


# --- SEG -------------------------------------------------------------------------------------------------
def seg_referenced_series_uid(seg: Dataset) -> str | None:
    """SeriesInstanceUID of the image series a SEG was drawn on (ReferencedSeriesSequence), if stated."""
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        uid = item.get("SeriesInstanceUID")
        if uid:
            return str(uid)
    return None


def seg_referenced_sop_uids(seg: Dataset) -> set[str]:
    """Every source-image SOPInstanceUID a SEG names (referenced series, shared and per-frame derivation).

    A fallback link to the CT when ReferencedSeriesSequence is absent; duplicates (R01-003) collapse.
    """
    uids: set[str] = set()
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        for ref in item.get("ReferencedInstanceSequence", []) or []:
            if "ReferencedSOPInstanceUID" in ref:
                uids.add(str(ref.ReferencedSOPInstanceUID))
    groups = list(seg.get("SharedFunctionalGroupsSequence", []) or []) + \
        list(seg.get("PerFrameFunctionalGroupsSequence", []) or [])
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []) or []:
            for source in derivation.get("SourceImageSequence", []) or []:
                if "ReferencedSOPInstanceUID" in source:
                    uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def is_seg(dataset: Dataset) -> bool:
    return str(dataset.get("SOPClassUID", "")) == SEG_STORAGE or str(dataset.get("Modality", "")) == "SEG"


@dataclass
class _Frames:
    """SEG frames ready for placement: pixels (N, R, C) bool and per-frame geometry in LPS."""

    pixels: np.ndarray
    origins: np.ndarray       # (N, 3) position of pixel (row 0, column 0)
    column_step: np.ndarray   # (3,) LPS mm per column index (along the row direction)
    row_step: np.ndarray      # (3,) LPS mm per row index
    reader: str


def read_seg_mask(
    seg_path: str | Path,
    ct: CTVolume,
    *,
    segment_number: int | None = None,
    backend: str = "auto",
    slice_tolerance: float = 0.25,
    inplane_tolerance: float = 0.25,
) -> np.ndarray:
    """The SEG's foreground on the CT grid: bool (K, J, I) like `ct.volume_hu`.

    backend "auto" tries highdicom and falls back to pydicom on any exception (both readers are also
    selectable, for tests). `segment_number` None = union of all segments (NSCLC SEGs hold one). FRACTIONAL
    SEGs are thresholded at 0.5. Each frame goes to the CT slice whose position along the CT normal is
    within `slice_tolerance` × slice spacing of the frame's ImagePositionPatient, shifted in-plane by a whole
    number of pixels (± `inplane_tolerance` pixel); a frame matching no slice, a different orientation or
    pixel spacing, or foreground outside the CT is a DicomError.
    """
    seg_path = Path(seg_path)
    try:
        dataset = pydicom.dcmread(seg_path)
    except Exception as error:
        raise DicomError(f"cannot read SEG {seg_path}: {type(error).__name__}: {error}") from error
    if not is_seg(dataset):
        raise DicomError(f"{seg_path} is not a DICOM SEG (modality {dataset.get('Modality', '?')}, "
                         f"SOP class {dataset.get('SOPClassUID', '?')})")
    if backend not in ("auto", "highdicom", "pydicom"):
        raise ValueError(f"backend must be auto, highdicom or pydicom, not {backend!r}")

    if backend in ("auto", "highdicom"):
        try:
            frames = _frames_highdicom(dataset, segment_number)
        except Exception as error:
            if backend == "highdicom":
                raise DicomError(f"highdicom cannot read SEG {seg_path}: {type(error).__name__}: {error}") \
                    from error
            logger.info("highdicom failed on %s (%s: %s); falling back to pydicom", seg_path,
                        type(error).__name__, error)
        else:
            try:
                return _place_frames(frames, ct, seg_path, slice_tolerance, inplane_tolerance)
            except DicomError as error:
                if backend == "highdicom":
                    raise
                logger.info("highdicom's frames of %s do not fit the CT (%s); retrying with pydicom",
                            seg_path, error)
    try:
        frames = _frames_pydicom(dataset, segment_number)
    except DicomError as error:
        raise DicomError(f"SEG {seg_path}: {error}") from error
    except Exception as error:
        raise DicomError(f"cannot decode SEG {seg_path}: {type(error).__name__}: {error}") from error
    return _place_frames(frames, ct, seg_path, slice_tolerance, inplane_tolerance)


def _frames_highdicom(dataset: Dataset, segment_number: int | None) -> _Frames:
    import highdicom

    seg = highdicom.seg.Segmentation.from_dataset(dataset, copy=True)
    segments = [segment_number] if segment_number is not None else None
    volume = seg.get_volume(segment_numbers=segments, combine_segments=False, skip_overlap_checks=True,
                            allow_missing_positions=True)
    array = np.asarray(volume.array)
    if array.ndim == 4:
        array = (array > 0.5).any(axis=-1) if array.dtype.kind == "f" else (array > 0).any(axis=-1)
    else:
        array = array > (0.5 if array.dtype.kind == "f" else 0)
    affine = np.asarray(volume.affine, dtype=np.float64)  # (slice, row, column) index → LPS mm
    origins = affine[:3, 3][None, :] + np.arange(array.shape[0])[:, None] * affine[:3, 0][None, :]
    return _Frames(array, origins, affine[:3, 2].copy(), affine[:3, 1].copy(), "highdicom")


def _frames_pydicom(dataset: Dataset, segment_number: int | None) -> _Frames:
    pixels = np.asarray(dataset.pixel_array)
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != count:
        raise DicomError(f"{pixels.shape[0]} frames decoded, NumberOfFrames says {count}")
    if str(dataset.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        maximum = float(dataset.get("MaximumFractionalValue", 255) or 255)
        pixels = pixels.astype(np.float64) / maximum > 0.5
    else:
        pixels = pixels > 0

    shared = (dataset.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = list(dataset.get("PerFrameFunctionalGroupsSequence", []) or [])
    if len(per_frame) != count:
        raise DicomError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {count} frames")

    def lookup(group: Dataset, sequence: str, keyword: str) -> Any:
        for source in (group, shared):
            items = source.get(sequence)
            if items and keyword in items[0]:
                return items[0][keyword].value
        return None

    origins = np.empty((count, 3))
    orientation = spacing = None
    keep = np.ones(count, dtype=bool)
    for f, group in enumerate(per_frame):
        position = lookup(group, "PlanePositionSequence", "ImagePositionPatient")
        if position is None:
            raise DicomError(f"frame {f + 1} has no ImagePositionPatient (PlanePositionSequence)")
        origins[f] = [float(v) for v in position]
        frame_orientation = np.asarray([float(v) for v in
                                        lookup(group, "PlaneOrientationSequence", "ImageOrientationPatient")
                                        or dataset.get("ImageOrientationPatient", []) or []])
        frame_spacing = np.asarray([float(v) for v in lookup(group, "PixelMeasuresSequence", "PixelSpacing")
                                    or dataset.get("PixelSpacing", []) or []])
        if frame_orientation.size != 6:
            raise DicomError(f"frame {f + 1} has no ImageOrientationPatient")
        if orientation is None:
            orientation, spacing = frame_orientation, frame_spacing
        elif not np.allclose(frame_orientation, orientation, atol=1e-4) or \
                (frame_spacing.size and not np.allclose(frame_spacing, spacing, atol=1e-4)):
            raise DicomError(f"frame {f + 1} has a different orientation or pixel spacing from frame 1")
        if segment_number is not None:
            number = lookup(group, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            keep[f] = number is None or int(number) == segment_number
    if orientation is None:
        raise DicomError("SEG has no frames")
    row_dir, col_dir = orientation[:3], orientation[3:]
    if spacing is None or spacing.size != 2:  # some writers omit PixelMeasures: the CT's spacing is assumed
        column_step, row_step = row_dir * np.nan, col_dir * np.nan
    else:
        column_step, row_step = row_dir * spacing[1], col_dir * spacing[0]
    return _Frames(pixels[keep], origins[keep], column_step, row_step, "pydicom")


def _place_frames(frames: _Frames, ct: CTVolume, seg_path: Path, slice_tolerance: float,
                  inplane_tolerance: float) -> np.ndarray:
    geometry = ct.geometry
    depth, rows, columns = ct.volume_hu.shape
    lps_to_ijk = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.ijk_to_ras)  # LPS → continuous ijk
    linear = lps_to_ijk[:3, :3]
    column_step, row_step = frames.column_step, frames.row_step
    if np.isnan(column_step).any():  # no pixel spacing in the SEG: use the CT's in-plane axes
        column_step = np.linalg.inv(linear)[:, 0]
        row_step = np.linalg.inv(linear)[:, 1]
    di, dj = linear @ column_step, linear @ row_step
    width = max(rows, columns, frames.pixels.shape[-1], frames.pixels.shape[-2])
    if not (np.allclose(di, [1, 0, 0], atol=0.5 / width) and np.allclose(dj, [0, 1, 0], atol=0.5 / width)):
        raise DicomError(
            f"SEG {seg_path} frames are not on the CT's in-plane grid (one SEG column step = {np.round(di, 3)}, "
            f"row step = {np.round(dj, 3)} CT voxels); a SEG drawn on another series or resampled?"
        )
    mask = np.zeros((depth, rows, columns), dtype=bool)
    starts = (lps_to_ijk[:3, :3] @ frames.origins.T).T + lps_to_ijk[:3, 3]  # (N, 3) continuous i, j, k
    spacing_k = float(geometry.spacing[2])
    for f, (frame, (i0, j0, k0)) in enumerate(zip(frames.pixels, starts.tolist())):
        k = round(k0)
        if abs(k0 - k) > slice_tolerance or not 0 <= k < depth:
            if not frame.any():
                continue  # an empty frame off the CT changes nothing
            raise DicomError(
                f"SEG {seg_path} frame {f + 1} lies {k0 * spacing_k:.2f} mm along the CT normal, matching no "
                f"slice of CT series {ct.series_uid} within {slice_tolerance * spacing_k:.2f} mm "
                f"(CT slices at 0…{(depth - 1) * spacing_k:.2f} mm from the first); wrong CT series?"
            )
        io, jo = round(i0), round(j0)
        if abs(i0 - io) > inplane_tolerance or abs(j0 - jo) > inplane_tolerance:
            raise DicomError(f"SEG {seg_path} frame {f + 1} is offset by a fraction of a pixel "
                             f"({i0:.2f}, {j0:.2f}) from the CT grid")
        fr, fc = frame.shape
        r0, r1 = max(jo, 0), min(jo + fr, rows)
        c0, c1 = max(io, 0), min(io + fc, columns)
        inside = frame[r0 - jo:r1 - jo, c0 - io:c1 - io] if r1 > r0 and c1 > c0 else frame[:0, :0]
        if int(inside.sum()) != int(frame.sum()):
            raise DicomError(f"SEG {seg_path} frame {f + 1} has foreground outside the CT's field of view")
        if inside.size:
            mask[k, r0:r1, c0:c1] |= inside  # duplicate frames at one position (R01-003) are OR-ed
    logger.debug("SEG %s read with %s: %d frames, %d voxels", seg_path, frames.reader, len(frames.pixels),
                 int(mask.sum()))
    return mask
