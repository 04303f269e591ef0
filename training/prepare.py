"""`python -m training.prepare`: a TCIA-style cohort + GEO RNA-seq table → one dataset file, as in the paper.

Xu et al. 2019, section 3, in millimetres from each CT's IJK→RAS geometry:

- Nodules: a 60 mm VOI centred at each nodule (centroid of each connected part of the SEG mask); every axial
  slice of the VOI with nodule present gives an image patch (HU → [-1, 1]) and its mask patch.
- Backgrounds: the lung mask (`RadiogenomicGANLib.lungmask`) with the nodule excluded; VOI centres 5–25 mm
  from that mask's boundary (exact distance, in mm) and clear of the nodule by half a patch (+ one voxel)
  in-plane and half a VOI along k, so no background patch touches the nodule (each is also checked);
  `--slices-per-voi` random slices (20) of each 60 mm VOI, without replacement.
- Genes: the table's genes with an NA in any sample dropped, log2(x+1), then `GenePreprocessing` fitted on
  the TRAIN patients only (low-expression and near-constant genes dropped, z-score clipped to ±5). The file
  also keeps every complete gene's log2 values, so a model's own preprocessing can be applied to this cohort.
- Split: patient-level, deterministic in `--seed` (a seeded permutation of the sorted used patient ids, cut at
  the given fractions); no patient is in two splits (asserted).

A patient without RNA, without a usable SEG/CT, with unreadable files, or whose image gives no nodule slice is
skipped with its reason and the run goes on; the closing summary lists them. Random draws for a patient come
from (seed, patient id), so a patient's samples do not depend on which other patients are in the cohort.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from RadiogenomicGANLib.cli_common import check_not_an_input, check_output_file, run_cli
from RadiogenomicGANLib.genes import (
    GenePreprocessing,
    GeneTableError,
    drop_na_genes,
    log_transform,
    read_gene_table,
)
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.intensity import HU_WINDOW, hu_to_unit
from RadiogenomicGANLib.lungmask import LungMaskError, compute_lung_mask
from RadiogenomicGANLib.patches import extract_patch
from RadiogenomicGANLib.placement import PlacementError, sample_lung_centres
from RadiogenomicGANLib.processes import default_workers, ordered_map

from .dataset import SPLITS, gene_arrays, write_dataset

if TYPE_CHECKING:
    from .cohort import PatientScan

VOI_MM = 60.0
MIN_NODULE_MM3 = 10.0  # connected parts of a SEG smaller than this are annotation specks, not nodules


class PatientSkip(Exception):
    """This patient cannot contribute; the message is the reason shown in the summary."""


@dataclass
class PatientSamples:
    """Everything one patient contributes to the dataset file (patches in [-1, 1], provenance)."""

    patient_id: str
    spacing_ijk: np.ndarray
    nodule_images: np.ndarray
    nodule_masks: np.ndarray
    nodule_slices: np.ndarray
    nodule_centres: np.ndarray
    background_images: np.ndarray
    background_slices: np.ndarray
    background_centres: np.ndarray
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Skipped:
    patient_id: str
    stage: str
    reason: str


@dataclass
class PrepareReport:
    """What `prepare` did, for the closing summary and for tests."""

    out: Path
    used: list[str]
    skipped: list[Skipped]
    split: dict[str, str]
    nodule_slices: dict[str, int]
    background_slices: dict[str, int]
    genes: int
    genes_in_table: int
    gene_filter: dict[str, int]
    warnings: list[str]
    seconds: float
    seconds_per_patient: float

    def describe(self) -> str:
        total = len(self.used) + len(self.skipped)
        lines = [f"patients: {len(self.used)} of {total} used, {len(self.skipped)} skipped"]
        for skip in self.skipped:
            lines.append(f"  skipped {skip.patient_id} ({skip.stage}): {skip.reason}")
        counts = {name: sum(s == name for s in self.split.values()) for name in SPLITS}
        lines.append("split (patients): " + ", ".join(f"{name} {counts[name]}" for name in SPLITS))

        def by_split(numbers: dict[str, int]) -> str:
            return f"{sum(numbers.values())} (" + ", ".join(f"{n} {numbers[n]}" for n in SPLITS) + ")"

        lines.append(f"nodule slices: {by_split(self.nodule_slices)}")
        lines.append(f"background slices: {by_split(self.background_slices)}")
        lines.append(
            f"genes: {self.gene_filter.get('kept', self.genes)} model inputs of {self.genes} complete genes "
            f"({self.genes_in_table} in the table; genes with NA dropped; log2(x+1); "
            f"{self.gene_filter.get('dropped_low_expression', 0)} low-expression and "
            f"{self.gene_filter.get('dropped_near_constant', 0)} near-constant genes dropped; z-scored and "
            f"clipped with the {counts['train']} train patients)"
        )
        for warning in self.warnings:
            lines.append(f"  note: {warning}")
        lines.append(
            f"wrote {self.out} in {self.seconds:.1f} s ({self.seconds_per_patient:.2f} s of image work per used "
            "patient, DICOM reading aside)"
        )
        return "\n".join(lines)


# --- one patient ---------------------------------------------------------------------------------------------


def patient_rng(seed: int, patient_id: str) -> np.random.Generator:
    """Random draws for one patient, independent of the other patients in the cohort."""
    return np.random.default_rng([int(seed), zlib.crc32(patient_id.encode("utf-8"))])


def _nodule_parts(nodule_mask: np.ndarray, spacing_kji: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centroid kji, slices present) of each connected part of the SEG mask big enough to be a nodule.

    The largest part is always kept; labelling runs on the mask's bounding box (a full 512² CT is slow).
    """
    present = np.argwhere(nodule_mask.any(axis=(1, 2)))
    if present.size == 0:
        return []
    rows = np.flatnonzero(nodule_mask.any(axis=(0, 2)))
    cols = np.flatnonzero(nodule_mask.any(axis=(0, 1)))
    low = np.array([present.min(), rows.min(), cols.min()])
    box = nodule_mask[present.min() : present.max() + 1, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    labels, count = ndimage.label(box, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    voxel_mm3 = float(np.prod(spacing_kji))
    keep = [n + 1 for n in np.argsort(sizes)[::-1] if sizes[n] * voxel_mm3 >= MIN_NODULE_MM3]
    keep = keep or [int(np.argmax(sizes)) + 1]
    parts = []
    for label in keep:
        points = np.argwhere(labels == label) + low
        parts.append((points.mean(axis=0), np.unique(points[:, 0])))
    return parts


def _slice_patch(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    centre_ras: np.ndarray,
    k: int,
    size: int,
    pixel_mm: float,
    fill: float,
) -> np.ndarray:
    """`extract_patch` reading only slice k (bilinear). The patch frame depends on the centre's projection
    along k, not on k itself, so a one-slice view with index 0 gives the same patch without converting
    the whole volume (masks are bool; extract_patch would cast all of it to float32 first)."""
    plane = np.asarray(volume[k : k + 1], dtype=np.float32)
    return extract_patch(plane, geometry, centre_ras, 0, size, pixel_mm, order=1, fill=fill)


def patient_samples(
    patient_id: str,
    volume_hu: np.ndarray,
    geometry: VolumeGeometry,
    nodule_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int = 64,
    voi_mm: float = VOI_MM,
    background_vois: int = 5,
    slices_per_voi: int = 20,
    min_mm: float = 5.0,
    max_mm: float = 25.0,
    min_separation_mm: float = 20.0,
    lung_mask: np.ndarray | None = None,
) -> PatientSamples:
    """Nodule and background patches of one CT (the paper's section 3); raises PatientSkip with the reason."""
    start = time.perf_counter()
    volume = np.asarray(volume_hu)
    nodule = np.asarray(nodule_mask, dtype=bool)
    if volume.ndim != 3 or nodule.shape != volume.shape:
        raise PatientSkip(f"CT shape {volume.shape} and nodule mask shape {nodule.shape} differ")
    spacing_kji = np.asarray(geometry.spacing_kji)
    pixel_mm = voi_mm / size
    half_voi_slices = int(np.floor(voi_mm / 2 / spacing_kji[0] + 1e-9))
    warnings: list[str] = []

    # nodules: every slice of the 60 mm VOI with nodule present
    parts = _nodule_parts(nodule, spacing_kji)
    if not parts:
        raise PatientSkip("the nodule mask is empty")
    n_images, n_masks, n_slices, n_centres = [], [], [], []
    for centre_kji, present in parts:
        centre_ras = geometry.kji_to_ras(centre_kji)[0]
        centre_k = round(float(centre_kji[0]))
        for k in present[np.abs(present - centre_k) <= half_voi_slices]:
            # as extract_mask_patch: bilinear, then ≥ 0.5
            mask = _slice_patch(nodule, geometry, centre_ras, int(k), size, pixel_mm, 0.0) >= 0.5
            if not mask.any():  # a sliver thinner than half a patch pixel: no mask to learn from
                continue
            image = _slice_patch(volume, geometry, centre_ras, int(k), size, pixel_mm, -1000.0)
            n_images.append(hu_to_unit(image))
            n_masks.append(mask.astype(np.uint8))
            n_slices.append(int(k))
            n_centres.append(centre_ras)
    if not n_images:
        raise PatientSkip("no axial slice shows the nodule at patch resolution")

    # backgrounds: VOI centres 5–25 mm from the boundary of (lung − nodule), patches clear of the nodule
    b_images, b_slices, b_centres = [], [], []
    if background_vois > 0:
        try:
            lung = compute_lung_mask(volume, spacing_kji) if lung_mask is None else np.asarray(lung_mask, bool)
            clear_in_plane = (size - 1) / 2 * pixel_mm
            margins = (voi_mm / 2, clear_in_plane + spacing_kji[1], clear_in_plane + spacing_kji[2])
            centres = sample_lung_centres(
                lung,
                spacing_kji,
                background_vois,
                rng,
                min_mm=min_mm,
                max_mm=max_mm,
                exclude_mask=nodule,
                exclude_margin_mm=margins,
                min_separation_mm=min_separation_mm,
                allow_fewer=True,
            )
        except (LungMaskError, PlacementError) as error:
            warnings.append(f"{patient_id}: no background VOI ({error})")
            centres = np.zeros((0, 3), dtype=np.int64)
        if 0 < len(centres) < background_vois:
            warnings.append(f"{patient_id}: only {len(centres)} of {background_vois} background VOIs fit")
        dropped = 0
        nodule_on_slice = nodule.any(axis=(1, 2))
        for centre in centres:
            centre_ras = geometry.kji_to_ras(centre)[0]
            low, high = max(0, centre[0] - half_voi_slices), min(volume.shape[0], centre[0] + half_voi_slices + 1)
            slices = np.arange(low, high)
            chosen = np.sort(rng.choice(slices, size=min(slices_per_voi, slices.size), replace=False))
            for k in chosen:
                if nodule_on_slice[k]:  # never touches with the margins above; checked as a guarantee
                    touch = _slice_patch(nodule, geometry, centre_ras, int(k), size, pixel_mm, 0.0)
                    if touch.max() > 0:
                        dropped += 1
                        continue
                image = _slice_patch(volume, geometry, centre_ras, int(k), size, pixel_mm, -1000.0)
                b_images.append(hu_to_unit(image))
                b_slices.append(int(k))
                b_centres.append(centre_ras)
        if dropped:
            warnings.append(f"{patient_id}: {dropped} background slices dropped because they touched the nodule")

    empty = np.zeros((0, size, size), dtype=np.float32)
    return PatientSamples(
        patient_id=patient_id,
        spacing_ijk=np.asarray(geometry.spacing, dtype=np.float32),
        nodule_images=np.asarray(n_images, dtype=np.float32),
        nodule_masks=np.asarray(n_masks, dtype=np.uint8),
        nodule_slices=np.asarray(n_slices, dtype=np.int32),
        nodule_centres=np.asarray(n_centres, dtype=np.float32).reshape(-1, 3),
        background_images=np.asarray(b_images, dtype=np.float32) if b_images else empty,
        background_slices=np.asarray(b_slices, dtype=np.int32),
        background_centres=np.asarray(b_centres, dtype=np.float32).reshape(-1, 3),
        warnings=warnings,
        seconds=time.perf_counter() - start,
    )


def _cut_patient(scan: PatientScan, *, seed: int, size: int, background_vois: int, slices_per_voi: int
                 ) -> PatientSamples | Skipped:
    """Read one patient and cut its patches, any failure turned into a Skipped so that a run goes on."""
    from .cohort import SkippedPatient, try_load_patient

    loaded = try_load_patient(scan)
    if isinstance(loaded, SkippedPatient):
        return Skipped(loaded.patient_id, "load", loaded.reason)
    try:
        return patient_samples(loaded.patient_id, loaded.volume_hu, loaded.geometry, loaded.nodule_mask,
                               patient_rng(seed, loaded.patient_id), size=size, background_vois=background_vois,
                               slices_per_voi=slices_per_voi)
    except PatientSkip as error:
        return Skipped(loaded.patient_id, "image", str(error))
    except Exception as error:  # one odd patient must not stop the run
        return Skipped(loaded.patient_id, "image", f"unexpected error: {type(error).__name__}: {error}")


# --- split ---------------------------------------------------------------------------------------------------


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' → fractions of train/val/test (normalised to sum 1)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--split must be three numbers like 0.7,0.15,0.15, got {text!r}") from error
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or values[0] <= 0:
        raise ValueError(f"--split must be three fractions ≥ 0 with train > 0, got {text!r}")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def split_patients(patient_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Deterministic patient-level split: a seeded permutation of the sorted ids, cut at the fractions.

    Val and test each get at least one patient when a non-zero fraction is asked and at least three
    patients exist; train always keeps at least one.
    """
    ids = sorted(patient_ids)
    n = len(ids)
    order = np.random.default_rng([int(seed), 0x5B17]).permutation(n)
    counts = [round(f * n) for f in fractions[1:]]
    for index, fraction in enumerate(fractions[1:]):
        if fraction > 0 and counts[index] == 0 and n >= 3:
            counts[index] = 1
    while sum(counts) > n - 1 and sum(counts) > 0:  # keep a train patient
        counts[int(np.argmax(counts))] -= 1
    n_val, n_test = counts
    assignment: dict[str, str] = {}
    for rank, index in enumerate(order):
        split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        assignment[ids[index]] = split
    groups = [{p for p, s in assignment.items() if s == name} for name in SPLITS]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == n, "a patient is in two splits"
    return assignment


# --- the whole cohort ------------------------------------------------------------------------------------------


def prepare(
    cohort: str | Path,
    rnaseq: str | Path,
    out: str | Path,
    *,
    size: int = 64,
    seed: int = 0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    background_vois: int = 5,
    slices_per_voi: int = 20,
    progress: bool = True,
    workers: int = 1,
) -> PrepareReport:
    """Build the dataset file; raises ValueError (GeneTableError, …) when nothing usable is left. `workers`
    processes read and cut the patients (each patient's draws are its own, so the file does not depend on it)."""
    from .cohort import match_rna, scan_cohort

    start = time.perf_counter()
    fractions = tuple(float(f) for f in split)
    table = read_gene_table(rnaseq)
    genes_in_table = table.num_genes

    scan_bar = tqdm(desc="scan", unit="patient", file=sys.stderr, disable=not progress, leave=False)

    def on_scan(done: int, total: int, patient_id: str) -> None:
        scan_bar.total = total
        scan_bar.update(1)

    scans, scan_skips = scan_cohort(cohort, progress=on_scan)
    scan_bar.close()
    skipped = [Skipped(s.patient_id, s.stage, s.reason) for s in scan_skips]
    warnings = [f"{s.patient_id}: {w}" for s in scans for w in s.warnings]
    scans, rna_skips = match_rna(scans, table)
    skipped += [Skipped(s.patient_id, s.stage, s.reason) for s in rna_skips]

    samples: list[PatientSamples] = []
    bar = tqdm(total=len(scans), desc="prepare", unit="patient", file=sys.stderr, disable=not progress)
    cut = functools.partial(_cut_patient, seed=seed, size=size, background_vois=background_vois,
                            slices_per_voi=slices_per_voi)
    with ordered_map(workers, len(scans)) as pool:
        for scan, result in zip(scans, pool.map(cut, scans)):   # in the scans' order, whatever the workers
            bar.set_postfix_str(scan.patient_id)
            bar.update(1)
            if isinstance(result, Skipped):
                skipped.append(result)
                continue
            warnings += result.warnings
            samples.append(result)
    bar.close()
    skipped.sort(key=lambda s: s.patient_id)
    if not samples:
        reasons = "; ".join(f"{s.patient_id}: {s.reason}" for s in skipped[:5])
        raise ValueError(f"no usable patient in {cohort} ({len(skipped)} skipped: {reasons})")
    if not any(len(s.background_images) for s in samples):
        raise ValueError("no background slice could be cut from any patient (see the notes above)")

    samples.sort(key=lambda s: s.patient_id)
    ids = [s.patient_id for s in samples]
    assignment = split_patients(ids, fractions, seed)

    # genes: NA genes dropped over the table's non-empty samples; the preprocessing fitted on train patients only
    non_empty = [sid for sid, col in zip(table.sample_ids, table.values.T) if not np.isnan(col).all()]
    complete = drop_na_genes(table.select_samples(non_empty))
    table_log = log_transform(complete.select_samples(ids).values).T  # (P, G)
    train_rows = np.array([assignment[pid] == "train" for pid in ids])
    preprocessing = GenePreprocessing.fit(table_log[train_rows], complete.gene_names)

    def stack(name: str) -> np.ndarray:
        return np.concatenate([getattr(s, name) for s in samples], axis=0)

    def owners(name: str) -> np.ndarray:
        return np.concatenate([np.full(len(getattr(s, name)), n, dtype=np.int32) for n, s in enumerate(samples)])

    split_array = np.array([assignment[pid] for pid in ids])
    out = write_dataset(
        out,
        patch_size=np.int64(size),
        patch_spacing_mm=np.float64(VOI_MM / size),
        hu_window=np.asarray(HU_WINDOW, dtype=np.float32),
        nodule_images=stack("nodule_images"),
        nodule_masks=stack("nodule_masks"),
        nodule_patient=owners("nodule_images"),
        nodule_slice=stack("nodule_slices"),
        nodule_centre_ras=stack("nodule_centres"),
        background_images=stack("background_images"),
        background_patient=owners("background_images"),
        background_slice=stack("background_slices"),
        background_centre_ras=stack("background_centres"),
        patient_ids=np.array(ids),
        patient_spacing=np.stack([s.spacing_ijk for s in samples]).astype(np.float32),
        split=split_array,
        **gene_arrays(preprocessing, complete.gene_names, table_log),
    )
    count = {name: {} for name in ("nodule", "background")}
    for name in SPLITS:
        members = [s for s in samples if assignment[s.patient_id] == name]
        count["nodule"][name] = sum(len(s.nodule_images) for s in members)
        count["background"][name] = sum(len(s.background_images) for s in members)
    return PrepareReport(
        out=Path(out),
        used=ids,
        skipped=skipped,
        split=assignment,
        nodule_slices=count["nodule"],
        background_slices=count["background"],
        genes=len(complete.gene_names),
        genes_in_table=genes_in_table,
        gene_filter=dict(preprocessing.fitted_on),
        warnings=warnings,
        seconds=time.perf_counter() - start,
        seconds_per_patient=float(np.mean([s.seconds for s in samples])),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.prepare",
        description="Turn an NSCLC-Radiogenomics-style cohort (TCIA DICOM tree with SEGs) and a GEO RNA-seq "
        "table into one dataset file of nodule and background patches, genes and a patient-level split.",
    )
    parser.add_argument("--cohort", required=True, help="download root (the folder holding the patient folders)")
    parser.add_argument("--rnaseq", required=True, help="GEO table, e.g. GSE103584_R01_NSCLC_RNAseq.txt.gz")
    parser.add_argument("--out", required=True, help="dataset file to write (.npz)")
    parser.add_argument("--size", type=int, default=64, help="patch size in pixels over 60 mm (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the background draws")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--background-vois", type=int, default=5, help="background VOIs per patient (default 5)")
    parser.add_argument("--slices-per-voi", type=int, default=20, help="random slices per background VOI (20)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"processes reading and cutting patients (default: the usable cores, at most 8; here "
                        f"{default_workers()}); the file is the same for any number")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        fractions = parse_fractions(args.split)
    except ValueError as error:
        parser.error(str(error))
    if args.size < 8:
        parser.error("--size must be at least 8")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.background_vois < 1 or args.slices_per_voi < 1:
        parser.error("--background-vois and --slices-per-voi must be at least 1")
    if not Path(args.cohort).is_dir():
        parser.error(f"cohort folder not found: {args.cohort}")
    if not Path(args.rnaseq).is_file():
        parser.error(f"RNA-seq table not found: {args.rnaseq}")
    return run_cli(lambda: _run(args, fractions), (GeneTableError, ValueError))


def _run(args: argparse.Namespace, fractions: tuple[float, float, float]) -> int:
    """Check where the dataset goes (never onto an input, nor into the cohort read as input), then prepare."""
    check_output_file(args.out)
    check_not_an_input(args.out, [args.rnaseq, args.cohort], "--out")
    report = prepare(
        args.cohort,
        args.rnaseq,
        args.out,
        size=args.size,
        seed=args.seed,
        split=fractions,
        background_vois=args.background_vois,
        slices_per_voi=args.slices_per_voi,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(report.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
