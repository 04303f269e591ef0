"""Find usable patients in an NSCLC-Radiogenomics-style download (or the phantom cohort) and load them.

The tree is the one TCIA's downloader writes:
`[<root>/]NSCLC Radiogenomics/<SubjectID>/<MM-DD-YYYY>-NA-<Study>-<n>/<n>.000000-<Series>-<n>/*.dcm`.
The root may be the folder above the collection or the collection folder itself: a series folder's
patient is the folder two levels above it (series → study → patient), so both work, and so do other
wrappers around the same three levels. Series shallower than that are grouped by their PatientID tag.
`metadata.csv` is not needed (the headers are authoritative) and no input file is ever written.

For each patient the SEG decides which CT series to use — the one its ReferencedSeriesSequence names —
because some studies hold several CT series (thin lung window, thick axials, bone kernel) and series
names are unreliable. Every patient that cannot be used becomes a `SkippedPatient` with a sentence that
says why; one bad patient never stops the run.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pydicom

from RadiogenomicGANLib.dicom_io import (
    DicomError,
    is_damaged,
    is_seg,
    list_series,
    read_ct_series,
    read_header,
    read_seg_mask,
    seg_referenced_series_uid,
    seg_referenced_sop_uids,
)
from RadiogenomicGANLib.genes import GeneTable
from RadiogenomicGANLib.geometry import VolumeGeometry

#: Suffixes never opened while walking (non-DICOM files that live in TCIA downloads and phantom folders).
_SKIP_SUFFIXES = {".csv", ".txt", ".gz", ".json", ".xml", ".md", ".zip", ".py", ".npz", ".nrrd", ".nii",
                  ".png", ".jpg", ".pdf", ".tsv", ".html", ".log"}


@dataclass
class PatientScan:
    """A patient whose SEG and referenced CT series were found (headers only; no pixels read yet)."""

    patient_id: str
    seg_file: Path
    ct_files: list[Path]
    series_uid: str
    study_uid: str = ""
    series_description: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class SkippedPatient:
    """A patient left out, and why (`stage`: scan, load or genes)."""

    patient_id: str
    reason: str
    stage: str = "scan"


@dataclass
class LoadedPatient:
    """A patient's CT in HU ([k, j, i] int16), its IJK→RAS geometry and the SEG's nodule mask (bool)."""

    patient_id: str
    volume_hu: np.ndarray
    geometry: VolumeGeometry
    nodule_mask: np.ndarray
    series_uid: str = ""


@dataclass
class _Series:
    """One series folder as seen through its first readable file."""

    folder: Path
    files: list[Path]
    series_uid: str = ""
    modality: str = ""
    description: str = ""
    is_seg: bool = False
    patient_tag: str = ""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


# --- scanning --------------------------------------------------------------------------------------------
def scan_cohort(
    root: str | Path,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[PatientScan], list[SkippedPatient]]:
    """(usable patients, skipped patients with reasons), both sorted by patient id.

    `progress(done, total, patient_id)` is called after each patient (for a progress bar).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort folder not found: {root}")
    patients = _group_series_by_patient(root)
    scans: list[PatientScan] = []
    skipped: list[SkippedPatient] = []
    for done, (patient_id, series) in enumerate(sorted(patients.items()), start=1):
        try:
            outcome = _scan_patient(patient_id, series)
        except Exception as error:  # a bug or an unforeseen file must not stop the other patients
            outcome = SkippedPatient(patient_id, f"unexpected error while scanning: {type(error).__name__}: "
                                                 f"{error}")
        (scans if isinstance(outcome, PatientScan) else skipped).append(outcome)  # type: ignore[arg-type]
        if progress is not None:
            progress(done, len(patients), patient_id)
    if not patients:
        raise FileNotFoundError(f"no DICOM series under {root} (expected <patient>/<study>/<series>/*.dcm)")
    return scans, skipped


def _group_series_by_patient(root: Path) -> dict[str, list[_Series]]:
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            path = Path(directory) / name
            if not name.startswith(".") and path.suffix.lower() not in _SKIP_SUFFIXES and name != "DICOMDIR":
                by_folder[path.parent].append(path)
    patients: dict[str, list[_Series]] = defaultdict(list)
    for folder in sorted(by_folder):
        series = _probe_series_folder(folder, sorted(by_folder[folder]))
        if series is None:
            continue
        depth = len(folder.relative_to(root).parts)
        if depth >= 3:
            patient_id = folder.parents[1].name
        else:
            patient_id = series.patient_tag or folder.name
        patients[patient_id].append(series)
    return patients


def _probe_series_folder(folder: Path, files: list[Path]) -> _Series | None:
    """Read headers until one is usable; None for a folder of foreign (non-DICOM) files only."""
    series = _Series(folder=folder, files=files)
    for path in files:
        dataset, reason = read_header(path, check_size=False)
        if dataset is None:
            series.unreadable.append((path, reason))
            continue
        series.series_uid = str(dataset.SeriesInstanceUID)
        series.modality = str(dataset.get("Modality", ""))
        series.description = str(dataset.get("SeriesDescription", ""))
        series.is_seg = is_seg(dataset)
        series.patient_tag = str(dataset.get("PatientID", ""))
        return series
    if any(is_damaged(reason) for _, reason in series.unreadable):
        return series  # only damaged files: keep it so the patient's reason can mention them
    return None


def _scan_patient(patient_id: str, series: list[_Series]) -> PatientScan | SkippedPatient:
    damaged = [(p, r) for s in series for p, r in s.unreadable if is_damaged(r)]
    seg_folders = [s for s in series if s.is_seg]
    if not seg_folders:
        kinds = ", ".join(sorted({s.modality or "unreadable" for s in series}))
        extra = f"; {_list_bad(damaged)}" if damaged else ""
        return SkippedPatient(patient_id, f"no SEG (nodule segmentation) among its {len(series)} series "
                                          f"({kinds}){extra}")

    warnings: list[str] = []
    reasons: list[str] = []
    chosen: tuple[Path, _Series, list[Path]] | None = None
    for seg_series in seg_folders:
        for seg_file in seg_series.files:
            outcome = _resolve_seg(seg_file, series)
            if isinstance(outcome, str):
                reasons.append(outcome)
            elif chosen is None:
                chosen = (seg_file, *outcome)
            else:
                warnings.append(f"several usable SEGs; using {chosen[0]}, ignoring {seg_file}")
    if chosen is None:
        return SkippedPatient(patient_id, "; ".join(dict.fromkeys(reasons)))

    seg_file, ct_series, ct_files = chosen
    ct_index = list_series(ct_series.folder)  # every header of the chosen series, with truncation checks
    bad = [(p, r) for p, r in ct_index.unreadable if is_damaged(r)]
    if bad:
        return SkippedPatient(patient_id, f"the CT series folder {ct_series.folder.name} has "
                                          f"{_list_bad(bad)}; the series may be incomplete")
    ct_files = ct_index.get(ct_series.series_uid, ct_files)
    seg_header, seg_problem = read_header(seg_file)
    if seg_header is None:
        return SkippedPatient(patient_id, f"SEG {seg_file.name} is unreadable: {seg_problem}")
    tag = str(seg_header.get("PatientID", ""))
    if tag and tag != patient_id:
        warnings.append(f"folder {patient_id} holds a SEG whose PatientID is {tag}")
    return PatientScan(
        patient_id=patient_id,
        seg_file=seg_file,
        ct_files=list(ct_files),
        series_uid=ct_series.series_uid,
        study_uid=str(seg_header.get("StudyInstanceUID", "")),
        series_description=ct_series.description,
        warnings=warnings,
    )


def _resolve_seg(seg_file: Path, series: list[_Series]) -> tuple[_Series, list[Path]] | str:
    """(the referenced CT series, its files) or the reason why this SEG cannot be used."""
    try:
        seg = pydicom.dcmread(seg_file, stop_before_pixels=True)
    except Exception as error:
        return f"SEG {seg_file.name} is unreadable: {type(error).__name__}: {error}"
    if not is_seg(seg):
        return f"{seg_file.name} in the SEG folder is not a SEG"
    reference = seg_referenced_series_uid(seg)
    candidates = [s for s in series if not s.is_seg and s.series_uid]
    if reference is None:  # no ReferencedSeriesSequence: follow the source-image SOP instance UIDs
        sops = seg_referenced_sop_uids(seg)
        for candidate in candidates:
            index = list_series(candidate.files, check_size=False)
            if any(sops & _sop_uids(files) for files in index.values()):
                reference = next(uid for uid, files in index.items() if sops & _sop_uids(files))
                break
        if reference is None:
            return f"SEG {seg_file.name} names no referenced series and none of its source images is present"
    matches = [s for s in candidates if s.series_uid == reference]
    if not matches:  # a folder may mix series: look at every header before giving up
        for candidate in candidates:
            index = list_series(candidate.files, check_size=False)
            if reference in index:
                info = index.info[reference]
                matches = [_Series(folder=candidate.folder, files=index[reference], series_uid=reference,
                                   modality=info.modality, description=info.description)]
                break
    if not matches:
        present = ", ".join(f"{s.modality} '{s.description}'" for s in candidates) or "none"
        return (f"SEG {seg_file.name} references series {reference}, which is not present in the patient's "
                f"folder (series present: {present})")
    target = matches[0]
    if target.modality != "CT":
        return (f"SEG {seg_file.name} references a non-CT series ({target.modality or 'unknown modality'} "
                f"'{target.description}')")
    return target, [f for m in matches for f in m.files]


def _sop_uids(files: Iterable[Path]) -> set[str]:
    uids = set()
    for path in files:
        dataset, _ = read_header(path, check_size=False)
        if dataset is not None and "SOPInstanceUID" in dataset:
            uids.add(str(dataset.SOPInstanceUID))
    return uids


def _list_bad(bad: Sequence[tuple[Path, str]]) -> str:
    shown = "; ".join(f"{p.name}: {r}" for p, r in bad[:3])
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return f"{len(bad)} unreadable DICOM file(s) ({shown}{more})"


# --- loading ---------------------------------------------------------------------------------------------
def load_patient(scan: PatientScan) -> LoadedPatient:
    """Read the CT (HU) and the SEG mask on its grid; DicomError if either is unusable or the mask is empty."""
    ct = read_ct_series(scan.ct_files, scan.series_uid)
    mask = read_seg_mask(scan.seg_file, ct)
    if not mask.any():
        raise DicomError(f"SEG {scan.seg_file} has no foreground voxel on CT series {scan.series_uid}")
    return LoadedPatient(scan.patient_id, ct.volume_hu, ct.geometry, mask, ct.series_uid)


def try_load_patient(scan: PatientScan) -> LoadedPatient | SkippedPatient:
    """`load_patient`, with any failure turned into a SkippedPatient (stage "load") so a run goes on."""
    try:
        return load_patient(scan)
    except DicomError as error:
        return SkippedPatient(scan.patient_id, str(error), stage="load")
    except Exception as error:
        return SkippedPatient(scan.patient_id, f"unexpected error while loading: {type(error).__name__}: "
                                               f"{error}", stage="load")


# --- joining with genes ----------------------------------------------------------------------------------
class _HasPatientId(Protocol):
    patient_id: str


T = TypeVar("T", bound=_HasPatientId)


def match_rna(items: Sequence[T], table: GeneTable) -> tuple[list[T], list[SkippedPatient]]:
    """Keep the patients that have an RNA-seq sample (column) in `table`; the others are skipped with why.

    The join key is the subject id (`R01-001`), which is both the TCIA folder name and the GEO column.
    A column with no value at all counts as missing.
    """
    kept: list[T] = []
    skipped: list[SkippedPatient] = []
    for item in items:
        if not table.has_sample(item.patient_id):
            skipped.append(SkippedPatient(item.patient_id, f"no RNA-seq sample '{item.patient_id}' in the "
                                                           f"gene table ({table.num_samples} samples)",
                                          stage="genes"))
        elif np.isnan(table.sample_values(item.patient_id)).all():
            skipped.append(SkippedPatient(item.patient_id, "its RNA-seq sample has only NA values",
                                          stage="genes"))
        else:
            kept.append(item)
    return kept, skipped
