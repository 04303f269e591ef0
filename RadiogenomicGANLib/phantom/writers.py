"""Write a phantom cohort exactly in the NSCLC-Radiogenomics on-disk formats, as TCIA and GEO publish them.

Layout (as the TCIA downloader leaves it)::

    OUT/metadata.csv
    OUT/NSCLC Radiogenomics/<SubjectID>/<MM-DD-YYYY>-NA-<StudyDesc>-<5 digits>/
        <SeriesNumber>.000000-<SeriesDesc>-<5 digits>/1-001.dcm …   (CT, 1-001 = most superior slice)
        <SeriesNumber>.000000-<SegDesc>-<5 digits>/1-1.dcm          (SEG)
    OUT/GSE103584_R01_NSCLC_RNAseq.txt.gz     (GEO: genes × samples, linear FPKM, literal NA)
    OUT/ground_truth.csv, OUT/ground_truth_genes.csv                (the truth; never read by training)

SEG variants, like the real collection: the first half of the patients get a "3D Slicer segmentation
result" (one frame per CT slice, per-frame source references); the second half an "ePAD Generated DSO"
(tumour frames only, source references in the *shared* functional group, so frames must be placed by
their per-frame ImagePositionPatient). Some studies hold a decoy CT series (thick axials or a bone-kernel
copy with its own UIDs) that the SEG does not reference. Everything, UIDs included, is a function of the
seed: same seed → same bytes.
"""

from __future__ import annotations

import csv
import functools
import gzip
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ..processes import ordered_map
from .genomics import GeneModel
from .patient import PhantomPatient, generate_patient

COLLECTION = "NSCLC Radiogenomics"
RNASEQ_NAME = "GSE103584_R01_NSCLC_RNAseq.txt.gz"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RESCALE_INTERCEPT = -1024
SLICER, EPAD = "slicer", "epad"
SEG_DESCRIPTION = {SLICER: "3D Slicer segmentation result", EPAD: "ePAD Generated DSO"}
MAIN_DESCRIPTIONS = ("THIN LUNG WINDOW", "1.25MM CHEST LUNG", "CHEST 1.0 B70f", "LUNG THIN AXIAL")
STUDY_DESCRIPTIONS = ("CT CHEST WITHOUT CONTRAST", "CT CHEST W CONTRAST", "CHEST", "CT CHEST HIGH RESOLUTION")
SEGMENT_LABELS = ("Tumor", "Nodule", "lesion 1", "Segment_1", "GTV")
METADATA_COLUMNS = (
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
)  # fmt: skip


def uid_for(seed: int, *parts: object) -> str:
    """Deterministic DICOM UID from the cohort seed and a path of names."""
    return str(generate_uid(entropy_srcs=["RadiogenomicGAN-phantom", str(seed), *map(str, parts)]))


def _ds(value: float) -> str:
    """Decimal string (DS, ≤ 16 chars) without float noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass
class SeriesRecord:
    """What metadata.csv needs about one written series."""

    series_uid: str
    study_uid: str
    subject: str
    study_description: str
    study_date: str  # MM-DD-YYYY
    description: str
    manufacturer: str
    modality: str
    sop_class_name: str
    sop_class_uid: str
    files: list[Path]
    folder: Path


@dataclass
class CohortSummary:
    """What `write_cohort` wrote, for CLIs, tests and benchmarks."""

    out_dir: Path
    collection_dir: Path
    patient_ids: list[str]
    rnaseq_path: Path
    metadata_path: Path
    ground_truth_path: Path
    genes_truth_path: Path
    seg_variant: dict[str, str | None] = field(default_factory=dict)
    decoy: dict[str, str | None] = field(default_factory=dict)
    rna_samples: list[str] = field(default_factory=list)
    ct_series_uid: dict[str, str] = field(default_factory=dict)
    series: list[SeriesRecord] = field(default_factory=list)
    seconds_per_patient: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        n_seg = sum(v is not None for v in self.seg_variant.values())
        n_epad = sum(v == EPAD for v in self.seg_variant.values())
        n_decoy = sum(v is not None for v in self.decoy.values())
        return (
            f"{len(self.patient_ids)} patients in {self.collection_dir}: {n_seg} SEG ({n_seg - n_epad} Slicer "
            f"full-frame, {n_epad} ePAD tumour-only), {n_decoy} decoy CT series, {len(self.rna_samples)} RNA "
            f"samples in {self.rnaseq_path.name}; {self.seconds:.1f} s"
        )


# --- DICOM CT ---------------------------------------------------------------------------------------
def _study_info(patient: PhantomPatient) -> dict[str, str]:
    rng = np.random.default_rng([patient.seed, patient.patient_index, 77])
    year, month, day = int(rng.integers(2004, 2013)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hour, minute = int(rng.integers(7, 19)), int(rng.integers(0, 60))
    return {
        "date": f"{year:04d}{month:02d}{day:02d}",
        "time": f"{hour:02d}{minute:02d}00",
        "folder_date": f"{month:02d}-{day:02d}-{year:04d}",
        "description": str(rng.choice(STUDY_DESCRIPTIONS)),
        "main_description": str(rng.choice(MAIN_DESCRIPTIONS)),
        "sex": str(rng.choice(["M", "F"])),
        "age": f"{int(rng.integers(45, 88)):03d}Y",
        "segment_label": str(rng.choice(SEGMENT_LABELS)),
    }


def _base_ct_dataset(patient: PhantomPatient, info: dict[str, str], study_uid: str, frame_uid: str) -> Dataset:
    """Attributes shared by every slice of every CT series of the patient."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = info["date"]
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = info["time"]
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "RadiogenomicGAN phantom"
    ds.ManufacturerModelName = "procedural chest"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = info["description"]
    ds.PatientName = patient.patient_id
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = info["sex"]
    ds.PatientAge = info["age"]
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return ds


def _encode_elements(ds: Dataset) -> dict[int, bytes]:
    """Explicit-VR little-endian bytes of each top-level element, keyed by tag."""
    encoded = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings=["latin_1"])
        encoded[int(elem.tag)] = fp.getvalue()
    return encoded


def _pixel_element(pixels: bytes) -> bytes:
    """(7FE0,0010) PixelData as OW, explicit VR little endian."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels


def write_ct_series(
    folder: Path,
    volume_hu: np.ndarray,
    origin_lps: np.ndarray,
    spacing_ijk: Sequence[float],
    base: Dataset,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    sop_uid: Callable[[int], str],
    thickness: float | None = None,
) -> list[Dataset]:
    """Write one axial CT series (identity LPS direction); returns the slice headers (no pixels), k order.

    Files are numbered from the most superior slice (1-001.dcm), like scanner exports, so readers must sort
    by position rather than by name. Why hand-assembled bytes: the series-level elements are encoded once
    and only the four per-slice elements and the pixels per file — pydicom's generic writer spent most of a
    patient's time re-encoding the same header 100–300 times.
    """
    folder.mkdir(parents=True, exist_ok=True)
    K, J, I = volume_hu.shape
    dx, dy, dz = (float(v) for v in spacing_ijk)
    stored = (volume_hu.astype(np.int32) - RESCALE_INTERCEPT).astype("<i2")
    series = Dataset()
    series.update(base)
    series.SeriesInstanceUID = series_uid
    series.SeriesNumber = series_number
    series.SeriesDescription = description
    series.AcquisitionNumber = 1
    series.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    series.SliceThickness = _ds(thickness if thickness is not None else dz)
    series.SpacingBetweenSlices = _ds(dz)
    series.PixelSpacing = [_ds(dy), _ds(dx)]  # row spacing, column spacing
    series.Rows, series.Columns = J, I
    static = _encode_elements(series)
    headers: list[Dataset] = []
    for k in range(K):
        number = K - k
        z = float(origin_lps[2]) + k * dz
        per_slice = Dataset()
        per_slice.SOPInstanceUID = sop_uid(k)
        per_slice.InstanceNumber = number
        per_slice.ImagePositionPatient = [_ds(float(origin_lps[0])), _ds(float(origin_lps[1])), _ds(z)]
        per_slice.SliceLocation = _ds(z)
        encoded = dict(static)
        encoded.update(_encode_elements(per_slice))
        encoded[0x7FE00010] = _pixel_element(stored[k].tobytes())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = series.SOPClassUID
        meta.MediaStorageSOPInstanceUID = per_slice.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RGGAN_PHANTOM"
        fp = DicomBytesIO()
        write_file_meta_info(fp, meta, enforce_standard=True)
        body = b"".join(encoded[tag] for tag in sorted(encoded))
        (folder / f"1-{number:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + body)
        header = Dataset()
        header.update(series)
        header.update(per_slice)
        headers.append(header)
    return headers


# --- DICOM SEG --------------------------------------------------------------------------------------
def _segment_description(label: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def build_seg(
    headers: list[Dataset],
    mask: np.ndarray,
    variant: str,
    *,
    seed: int,
    patient_id: str,
    label: str,
    date: str,
    time_: str,
) -> Dataset:
    """A binary one-segment SEG over the CT `headers` (k order); `variant` is "slicer" or "epad"."""
    if variant not in SEG_DESCRIPTION:
        raise ValueError(f"unknown SEG variant {variant!r} (use {SLICER!r} or {EPAD!r})")
    with warnings.catch_warnings():
        # TCIA patient names are single-component ("R01-001"); highdicom warns about that.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=mask.astype(bool),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment_description(label)],
            series_instance_uid=uid_for(seed, patient_id, "seg-series"),
            series_number=1000 if variant == SLICER else 300,
            sop_instance_uid=uid_for(seed, patient_id, "seg"),
            instance_number=1,
            manufacturer="3D Slicer" if variant == SLICER else "ePAD",
            manufacturer_model_name="RadiogenomicGAN phantom",
            software_versions="1.0",
            device_serial_number="0",
            omit_empty_frames=(variant == EPAD),
            series_description=SEG_DESCRIPTION[variant],
            content_date=date,
            content_time=time_,
        )
    # Determinism: highdicom stamps the creation time and draws a random dimension-organisation UID.
    seg.InstanceCreationDate = date
    seg.InstanceCreationTime = time_
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time_
    dim_uid = uid_for(seed, patient_id, "seg-dimension-organisation")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = dim_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid
    if variant == EPAD:
        _move_sources_to_shared_group(seg)
    return seg


def _move_sources_to_shared_group(seg: Dataset) -> None:
    """ePAD DSO style: one shared DerivationImageSequence listing every source; none per frame."""
    sources = DicomSequence()
    derivation_code = None
    for frame in seg.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in frame:
            derivation = frame.DerivationImageSequence[0]
            derivation_code = derivation.get("DerivationCodeSequence", derivation_code)
            for src in derivation.SourceImageSequence:
                sources.append(src)
            del frame.DerivationImageSequence
    item = Dataset()
    item.SourceImageSequence = sources
    if derivation_code is not None:
        item.DerivationCodeSequence = derivation_code
    seg.SharedFunctionalGroupsSequence[0].DerivationImageSequence = DicomSequence([item])


# --- GEO table ----------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    if np.isnan(value):
        return "NA"
    if value == 0.0:
        return "0"
    return np.format_float_positional(value, trim="-")


def write_geo_table(path: Path, gene_names: Sequence[str], samples: Sequence[str], values: np.ndarray) -> None:
    """GEO-style table: tab-separated, empty first header cell, genes as rows, literal NA (gzip if .gz)."""
    lines = ["\t" + "\t".join(samples)]
    for name, row in zip(gene_names, values):
        lines.append(name + "\t" + "\t".join(_fmt(v) for v in row))
    data = ("\n".join(lines) + "\n").encode("ascii")
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename=path.stem, mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def ensure_na_rows(values: np.ndarray, na_rows: np.ndarray, seed: int) -> np.ndarray:
    """Give every NA-designated gene at least one NA among the written samples (the exact-count promise)."""
    values = values.copy()
    if values.shape[1] == 0:
        return values
    rng = np.random.default_rng([seed, 0x4A])
    for row in na_rows:
        if not np.isnan(values[row]).any():
            values[row, int(rng.integers(values.shape[1]))] = np.nan
    return values


# --- cohort -------------------------------------------------------------------------------------------
def _folder_suffix(uid: str) -> str:
    return uid.replace(".", "")[-5:]


def _seg_variants(n: int) -> list[str]:
    """First half Slicer full-frame, second half ePAD tumour-only (the real collection's order)."""
    half = (n + 1) // 2
    return [SLICER] * half + [EPAD] * (n - half)


def _resolve_ids(items: Sequence[str | int], ids: list[str]) -> set[str]:
    out = set()
    for item in items:
        out.add(ids[item] if isinstance(item, int) else str(item))
    return out


def write_cohort(
    out_dir: str | Path,
    patients: int | Sequence[PhantomPatient] = 20,
    seed: int = 0,
    *,
    size_ij: int = 256,
    slices: int | None = None,
    spacing: tuple[float, float] | None = None,
    fov: float | None = None,
    n_genes: int = 5172,
    n_na_genes: int | None = None,
    n_modules: int = 4,
    n_classes: int = 4,
    without_rna: Sequence[str | int] = (),
    without_seg: Sequence[str | int] = (),
    decoy_fraction: float = 0.35,
    seg_variants: Sequence[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    workers: int = 1,
) -> CohortSummary:
    """Generate (or take) patients and write the whole cohort; returns what was written.

    `patients` is a count (patients 0…N−1 of `seed` are generated one at a time in each of `workers`
    processes, keeping memory flat; the files do not depend on `workers`) or already generated patients.
    `without_rna` / `without_seg` take patient ids or 0-based positions.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    collection = out / COLLECTION
    collection.mkdir(parents=True, exist_ok=True)
    count = patients if isinstance(patients, int) else len(patients)
    ids = [f"R01-{i + 1:03d}" for i in range(count)] if isinstance(patients, int) else [p.patient_id for p in patients]
    no_rna = _resolve_ids(without_rna, ids)
    no_seg = _resolve_ids(without_seg, ids)
    variants = list(seg_variants) if seg_variants is not None else _seg_variants(count)
    if len(variants) != count:
        raise ValueError(f"seg_variants has {len(variants)} entries for {count} patients")

    summary = CohortSummary(
        out_dir=out,
        collection_dir=collection,
        patient_ids=[],
        rnaseq_path=out / RNASEQ_NAME,
        metadata_path=out / "metadata.csv",
        ground_truth_path=out / "ground_truth.csv",
        genes_truth_path=out / "ground_truth_genes.csv",
    )
    truth_rows: list[dict[str, object]] = []
    rna_columns: list[np.ndarray] = []
    gene_names: tuple[str, ...] = ()
    model: GeneModel | None = None
    jobs = [(n if isinstance(patients, int) else patients[n], None if ids[n] in no_seg else variants[n],
             ids[n] not in no_rna) for n in range(count)]
    write = functools.partial(_write_one, seed=seed, collection=collection, decoy_fraction=decoy_fraction,
                              generation=dict(size_ij=size_ij, slices=slices, spacing=spacing, fov=fov,
                                              n_genes=n_genes, n_na_genes=n_na_genes, n_modules=n_modules,
                                              n_classes=n_classes))
    # several processes only where patients are generated here: given ones would have to be pickled over
    with ordered_map(workers if isinstance(patients, int) else 1, count) as pool:
        for n, written in enumerate(pool.map(write, jobs)):
            pid = written.patient_id
            if written.genes_fpkm is not None:
                rna_columns.append(written.genes_fpkm)
                summary.rna_samples.append(pid)
            gene_names, model = written.gene_names, written.gene_model
            summary.patient_ids.append(pid)
            summary.seg_variant[pid] = jobs[n][1]
            summary.decoy[pid] = written.decoy
            summary.ct_series_uid[pid] = written.ct_series_uid
            summary.series += written.series
            truth_rows.append(written.truth_row)
            summary.seconds_per_patient.append(written.seconds)
            if progress is not None:
                progress(n + 1, count, pid)

    values = np.stack(rna_columns, axis=1) if rna_columns else np.zeros((len(gene_names), 0))
    if model is not None:
        values = ensure_na_rows(values, model.na_rows, seed)
        write_geo_table(summary.rnaseq_path, gene_names, summary.rna_samples, values)
        _write_genes_truth(summary.genes_truth_path, model)
    _write_csv(summary.ground_truth_path, truth_rows)
    _write_metadata(summary.metadata_path, summary.series, out)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class _WrittenPatient:
    """One patient on disk, and what the cohort's tables need from it (returned by a worker process)."""

    patient_id: str
    genes_fpkm: np.ndarray | None     # None: the patient has no RNA-seq sample
    gene_names: tuple[str, ...]
    gene_model: GeneModel
    decoy: str | None
    ct_series_uid: str
    series: list[SeriesRecord]
    truth_row: dict[str, object]
    seconds: float


def _write_one(job: tuple[int | PhantomPatient, str | None, bool], *, seed: int, collection: Path,
               decoy_fraction: float, generation: dict[str, Any]) -> _WrittenPatient:
    """Generate patient `job[0]` of `seed` (or take the given one) and write its series (SEG variant `job[1]`,
    RNA-seq sample when `job[2]`); each patient's draws are its own, so any process may write it."""
    t0 = time.perf_counter()
    source, variant, has_rna = job
    patient = generate_patient(source, seed, **generation) if isinstance(source, int) else source
    pid = patient.patient_id
    own = CohortSummary(out_dir=collection.parent, collection_dir=collection, patient_ids=[], rnaseq_path=Path(),
                        metadata_path=Path(), ground_truth_path=Path(), genes_truth_path=Path())
    decoy = _write_patient(collection, patient, variant, decoy_fraction, own)
    return _WrittenPatient(
        patient_id=pid, genes_fpkm=patient.genes_fpkm if has_rna else None, gene_names=patient.gene_names,
        gene_model=patient.gene_model, decoy=decoy, ct_series_uid=own.ct_series_uid[pid], series=own.series,
        truth_row=_truth_row(patient, variant, decoy, has_rna, own.ct_series_uid[pid]),
        seconds=time.perf_counter() - t0,
    )


def _write_patient(
    collection: Path, patient: PhantomPatient, variant: str | None, decoy_fraction: float, summary: CohortSummary
) -> str | None:
    seed, pid = patient.seed, patient.patient_id
    info = _study_info(patient)
    rng = np.random.default_rng([seed, patient.patient_index, 78])
    study_uid = uid_for(seed, pid, "study")
    frame_uid = uid_for(seed, pid, "frame-of-reference")
    study_dir = collection / pid / f"{info['folder_date']}-NA-{info['description']}-{_folder_suffix(study_uid)}"
    base = _base_ct_dataset(patient, info, study_uid, frame_uid)
    origin, spacing, _ = patient.geometry.to_lps()
    spacing = np.round(spacing, 6)

    def record(uid: str, desc: str, folder: Path, files: list[Path], modality: str, sop: str, name: str) -> None:
        summary.series.append(
            SeriesRecord(uid, study_uid, pid, info["description"], info["folder_date"], desc,
                         "3D Slicer" if desc == SEG_DESCRIPTION[SLICER] else
                         ("ePAD" if desc == SEG_DESCRIPTION[EPAD] else "RadiogenomicGAN phantom"),
                         modality, name, sop, files, folder)
        )  # fmt: skip

    # Main (thin) CT series: the one the SEG references.
    main_uid = uid_for(seed, pid, "ct-series")
    main_number = int(rng.choice([3, 4]))
    main_desc = info["main_description"]
    main_dir = study_dir / f"{main_number}.000000-{main_desc}-{_folder_suffix(main_uid)}"
    headers = write_ct_series(
        main_dir, patient.volume_hu, origin, spacing, base, series_uid=main_uid, series_number=main_number,
        description=main_desc, sop_uid=lambda k: uid_for(seed, pid, "ct", k),
    )  # fmt: skip
    summary.ct_series_uid[pid] = main_uid
    record(main_uid, main_desc, main_dir, sorted(main_dir.glob("*.dcm")), "CT", CTImageStorage, "CT Image Storage")

    # Decoy series in the same study (different UIDs, same frame of reference).
    decoy = None
    if rng.random() < decoy_fraction:
        decoy_uid = uid_for(seed, pid, "decoy-series")
        if spacing[2] < 2.4 or rng.random() < 0.5:
            factor = max(2, round(2.5 / spacing[2]))
            k_use = (patient.volume_hu.shape[0] // factor) * factor
            thick = patient.volume_hu[:k_use].reshape(-1, factor, *patient.volume_hu.shape[1:]).mean(axis=1)
            vol = np.rint(thick).astype(np.int16)
            d_origin = origin.copy()
            d_origin[2] = origin[2] + 0.5 * (factor - 1) * spacing[2]
            d_spacing = np.array([spacing[0], spacing[1], round(factor * spacing[2], 5)])
            decoy = f"CT Thick Axials {d_spacing[2]:g}mm"
            number = 2
        else:
            noise = np.random.default_rng([seed, patient.patient_index, 79]).normal(0, 60, patient.volume_hu.shape)
            vol = np.clip(patient.volume_hu + np.rint(noise), -3024, 3071).astype(np.int16)
            d_origin, d_spacing, decoy, number = origin, spacing, "1.25MM CHEST BONE PLUS", 5
        decoy_dir = study_dir / f"{number}.000000-{decoy}-{_folder_suffix(decoy_uid)}"
        write_ct_series(
            decoy_dir, vol, d_origin, d_spacing, base, series_uid=decoy_uid, series_number=number,
            description=decoy, sop_uid=lambda k: uid_for(seed, pid, "decoy", k),
        )  # fmt: skip
        record(decoy_uid, decoy, decoy_dir, sorted(decoy_dir.glob("*.dcm")), "CT", CTImageStorage, "CT Image Storage")

    if variant is not None:
        seg = build_seg(
            headers, patient.nodule_mask, variant, seed=seed, patient_id=pid, label=info["segment_label"],
            date=info["date"], time_=info["time"],
        )  # fmt: skip
        seg_name = f"{seg.SeriesNumber}.000000-{SEG_DESCRIPTION[variant]}-{_folder_suffix(seg.SeriesInstanceUID)}"
        seg_dir = study_dir / seg_name
        seg_dir.mkdir(parents=True, exist_ok=True)
        seg.save_as(seg_dir / "1-1.dcm", enforce_file_format=True)
        record(seg.SeriesInstanceUID, SEG_DESCRIPTION[variant], seg_dir, [seg_dir / "1-1.dcm"], "SEG",
               SEG_SOP_CLASS, "Segmentation Storage")  # fmt: skip
    return decoy


# --- CSV files -------------------------------------------------------------------------------------
def _truth_row(
    patient: PhantomPatient, variant: str | None, decoy: str | None, has_rna: bool, ct_uid: str
) -> dict[str, object]:
    row: dict[str, object] = {"patient_id": patient.patient_id, "module_class": patient.module_class}
    for m, value in enumerate(patient.module_activations, start=1):
        row[f"module_{m}"] = round(float(value), 6)
    for key, value in patient.phenotype.items():
        row[key] = round(float(value), 6)
    r, a, s = patient.nodule_centre_ras
    row.update(
        nodule_centre_r=round(float(r), 4), nodule_centre_a=round(float(a), 4), nodule_centre_s=round(float(s), 4),
        nodule_voxels=int(patient.nodule_mask.sum()),
        nodule_slices=" ".join(str(k) for k in patient.nodule_slices),
        has_rna=int(has_rna), has_seg=int(variant is not None), seg_variant=variant or "",
        decoy_series=decoy or "", ct_series_uid=ct_uid,
        size_ij=patient.volume_hu.shape[1], n_slices=patient.volume_hu.shape[0],
        pixel_spacing_mm=patient.acquisition["pixel_spacing_mm"],
        slice_spacing_mm=patient.acquisition["slice_spacing_mm"],
        noise_sd_hu=round(float(patient.acquisition["noise_sd_hu"] or 0.0), 3),
        padding_hu="" if patient.acquisition["padding_hu"] is None else patient.acquisition["padding_hu"],
    )  # fmt: skip
    return row


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _write_genes_truth(path: Path, model: GeneModel) -> None:
    rows = [
        {"gene": name, "module": int(m), "loading": round(float(w), 6), "has_na": int(p > 0)}
        for name, m, w, p in zip(model.gene_names, model.module_of_gene, model.loading, model.na_probability)
    ]
    _write_csv(path, rows)


def _write_metadata(path: Path, series: list[SeriesRecord], out: Path) -> None:
    """TCIA downloader's metadata.csv: one row per series, File Location relative to the download root."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METADATA_COLUMNS)
        for s in series:
            size = sum(p.stat().st_size for p in s.files)
            location = "./" + s.folder.relative_to(out).as_posix()
            writer.writerow([
                s.series_uid, COLLECTION, "YES" if s.modality == "SEG" else "NO", "", s.subject, s.study_uid,
                s.study_description, s.study_date, s.description, s.manufacturer, s.modality, s.sop_class_name,
                s.sop_class_uid, len(s.files), f"{size / 1e6:.2f} MB", location, "2019-07-08T00:00:00.000",
            ])  # fmt: skip
