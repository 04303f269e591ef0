"""Cohort scanning on a TCIA-style tree: the SEG picks the CT series, every bad patient is skipped with why."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures_dicom import nodule_mask, small_volume, write_ct, write_seg

from RadiogenomicGANLib.genes import GeneTable
from training.cohort import (
    LoadedPatient,
    SkippedPatient,
    load_patient,
    match_rna,
    scan_cohort,
    try_load_patient,
)

SHAPE = (6, 20, 16)
MASK = nodule_mask(SHAPE, range(1, 4), centre=(10, 8), radius=3.5)
STUDY = "01-01-2000-NA-CT CHEST WO-12345"


@dataclass
class Cohort:
    root: Path           # the folder above "NSCLC Radiogenomics"
    volumes: dict[str, np.ndarray]


def _series(patient: Path, name: str) -> Path:
    return patient / STUDY / name


def _build(root: Path, scratch: Path) -> Cohort:
    collection = root / "NSCLC Radiogenomics"
    volumes: dict[str, np.ndarray] = {}

    def patient(pid: str) -> Path:
        return collection / pid

    # R01-001: Slicer-style SEG; a second CT series whose name sorts first must NOT be chosen.
    p = patient("R01-001")
    write_ct(_series(p, "1.000000-THIN LUNG WINDOW-11111"), small_volume(SHAPE, seed=9), patient_id="R01-001",
             description="THIN LUNG WINDOW")
    ct = write_ct(_series(p, "3.000000-CT Thick Axials 2.5mm-22222"), small_volume(SHAPE, seed=1),
                  patient_id="R01-001", description="CT Thick Axials 2.5mm")
    write_seg(_series(p, "1000.000000-3D Slicer segmentation result-33333") / "1-1.dcm", ct, MASK)
    volumes["R01-001"] = ct.volume_hu
    # R01-002: ePAD-style SEG (tumour frames only, source UIDs in the shared group).
    p = patient("R01-002")
    ct = write_ct(_series(p, "2.000000-CT-1"), small_volume(SHAPE, seed=2), patient_id="R01-002")
    write_seg(_series(p, "300.000000-ePAD Generated DSO-2") / "1-1.dcm", ct, MASK, variant="epad")
    volumes["R01-002"] = ct.volume_hu
    # R01-003: duplicate referenced UIDs and a highdicom KeyError: the pydicom fallback reads it.
    p = patient("R01-003")
    ct = write_ct(_series(p, "2.000000-CT-1"), small_volume(SHAPE, seed=3), patient_id="R01-003")
    write_seg(_series(p, "1000.000000-3D Slicer segmentation result-3") / "1-1.dcm", ct, MASK,
              duplicate_references=True, highdicom_key_error=True)
    volumes["R01-003"] = ct.volume_hu
    # R01-009: no SEG at all.
    write_ct(_series(patient("R01-009"), "2.000000-CT-1"), small_volume((3, 8, 8)), patient_id="R01-009")
    # R01-010: the SEG references a series that was not downloaded.
    p = patient("R01-010")
    gone = write_ct(scratch / "elsewhere", small_volume(SHAPE), patient_id="R01-010")
    write_seg(_series(p, "1000.000000-seg-1") / "1-1.dcm", gone, MASK)
    write_ct(_series(p, "2.000000-CT other-1"), small_volume(SHAPE), patient_id="R01-010")
    # R01-011: the SEG was drawn on a PET series.
    p = patient("R01-011")
    pet = write_ct(_series(p, "4.000000-PET AC-1"), small_volume(SHAPE), patient_id="R01-011", modality="PT")
    write_seg(_series(p, "1000.000000-seg-1") / "1-1.dcm", pet, MASK)
    # R01-012: garbage file with a .dcm name inside the CT series folder.
    p = patient("R01-012")
    ct = write_ct(_series(p, "2.000000-CT-1"), small_volume(SHAPE), patient_id="R01-012")
    write_seg(_series(p, "1000.000000-seg-1") / "1-1.dcm", ct, MASK)
    (ct.folder / "1-999.dcm").write_bytes(b"\x00\x01garbage" * 40)
    # R01-013: a CT slice truncated in its pixel data.
    p = patient("R01-013")
    ct = write_ct(_series(p, "2.000000-CT-1"), small_volume(SHAPE), patient_id="R01-013")
    write_seg(_series(p, "1000.000000-seg-1") / "1-1.dcm", ct, MASK)
    data = ct.files[-1].read_bytes()
    ct.files[-1].write_bytes(data[:-64])
    # R01-014: SEG names the right series UID, but the CT on disk sits 200 mm away (fails at load time).
    p = patient("R01-014")
    drawn = write_ct(scratch / "drawn_on", small_volume(SHAPE), patient_id="R01-014")
    write_seg(_series(p, "1000.000000-seg-1") / "1-1.dcm", drawn, MASK)
    write_ct(_series(p, "2.000000-CT-1"), small_volume(SHAPE), patient_id="R01-014",
             series_uid=drawn.series_uid, origin_lps=(-10.0, -20.0, 150.0))
    (collection.parent / "metadata.csv").write_text("Series UID,Subject ID,Modality,File Location\n")
    (collection / "R01-001" / "notes.txt").write_text("not DICOM\n")
    return Cohort(root, volumes)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return _build(tmp_path_factory.mktemp("tcia"), tmp_path_factory.mktemp("scratch"))


def _hashes(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_scan_chooses_referenced_ct_and_explains_every_skip(cohort: Cohort) -> None:
    before = _hashes(cohort.root)
    progress: list[str] = []
    scans, skipped = scan_cohort(cohort.root, progress=lambda done, total, pid: progress.append(pid))
    assert [s.patient_id for s in scans] == ["R01-001", "R01-002", "R01-003", "R01-014"]
    assert len(progress) == 9
    first = scans[0]
    assert first.series_description == "CT Thick Axials 2.5mm" and len(first.ct_files) == SHAPE[0]
    reasons = {s.patient_id: s.reason for s in skipped}
    assert set(reasons) == {"R01-009", "R01-010", "R01-011", "R01-012", "R01-013"}
    assert "no SEG" in reasons["R01-009"]
    assert "not present in the patient's folder" in reasons["R01-010"]
    assert "non-CT series (PT" in reasons["R01-011"]
    assert "unreadable DICOM file" in reasons["R01-012"] and "1-999.dcm" in reasons["R01-012"]
    assert "truncated" in reasons["R01-013"]
    assert _hashes(cohort.root) == before  # scanning never writes


def test_inner_collection_folder_as_root(cohort: Cohort) -> None:
    scans, skipped = scan_cohort(cohort.root / "NSCLC Radiogenomics")
    assert [s.patient_id for s in scans] == ["R01-001", "R01-002", "R01-003", "R01-014"]
    assert {s.patient_id for s in skipped} == {"R01-009", "R01-010", "R01-011", "R01-012", "R01-013"}


def test_load_gives_volume_and_exact_mask(cohort: Cohort) -> None:
    scans, _ = scan_cohort(cohort.root / "NSCLC Radiogenomics")
    for scan in scans[:3]:
        loaded = load_patient(scan)
        assert isinstance(loaded, LoadedPatient)
        np.testing.assert_array_equal(loaded.volume_hu, cohort.volumes[scan.patient_id])
        np.testing.assert_array_equal(loaded.nodule_mask, MASK)
        assert loaded.geometry.spacing == pytest.approx([0.7, 0.8, 2.5])
    failed = try_load_patient(scans[3])  # R01-014: SEG frames match no slice of the CT on disk
    assert isinstance(failed, SkippedPatient) and failed.stage == "load"
    assert "matching no slice" in failed.reason


def test_match_rna_skips_patients_without_a_sample(cohort: Cohort) -> None:
    scans, _ = scan_cohort(cohort.root / "NSCLC Radiogenomics")
    values = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, np.nan]])
    table = GeneTable(["A", "B"], ["R01-001", "R01-003", "R01-014"], values)
    kept, skipped = match_rna(scans, table)
    assert [s.patient_id for s in kept] == ["R01-001", "R01-003"]
    reasons = {s.patient_id: s.reason for s in skipped}
    assert "no RNA-seq sample 'R01-002'" in reasons["R01-002"]
    assert "only NA" in reasons["R01-014"]
    assert all(s.stage == "genes" for s in skipped)


# --- end to end on the phantom cohort (real on-disk formats, known truth) --------------------------------
PHANTOM = {"patients": 4, "seed": 3, "size_ij": 64, "slices": 40, "n_genes": 200}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):  # -> CohortSummary
    from RadiogenomicGANLib.phantom import writers
    return writers.write_cohort(
        tmp_path_factory.mktemp("phantom"), PHANTOM["patients"], PHANTOM["seed"], size_ij=PHANTOM["size_ij"],
        slices=PHANTOM["slices"], n_genes=PHANTOM["n_genes"], seg_variants=["slicer", "epad", "epad", "slicer"],
        without_rna=["R01-002"], without_seg=["R01-004"], decoy_fraction=1.0,
    )  # fmt: skip


def test_phantom_both_seg_variants_give_exactly_the_nodule(phantom) -> None:  # type: ignore[no-untyped-def]
    from RadiogenomicGANLib.phantom import generate_patient

    scans, skipped = scan_cohort(phantom.out_dir)
    assert [s.patient_id for s in scans] == ["R01-001", "R01-002", "R01-003"]
    assert [(s.patient_id, s.stage) for s in skipped] == [("R01-004", "scan")]
    assert "no SEG" in skipped[0].reason
    for index, scan in enumerate(scans):
        assert scan.series_uid == phantom.ct_series_uid[scan.patient_id]  # not the decoy series
        truth = generate_patient(index, PHANTOM["seed"], size_ij=PHANTOM["size_ij"], slices=PHANTOM["slices"],
                                 n_genes=PHANTOM["n_genes"])
        loaded = load_patient(scan)
        np.testing.assert_array_equal(loaded.volume_hu, truth.volume_hu)
        np.testing.assert_allclose(loaded.geometry.ijk_to_ras, truth.geometry.ijk_to_ras, atol=1e-4)
        assert loaded.nodule_mask.any()
        np.testing.assert_array_equal(loaded.nodule_mask, truth.nodule_mask, err_msg=scan.patient_id)
    assert {phantom.seg_variant[s.patient_id] for s in scans} == {"slicer", "epad"}


def test_phantom_geo_table_and_rna_join(phantom) -> None:  # type: ignore[no-untyped-def]
    from RadiogenomicGANLib.genes import drop_na_genes, read_gene_table

    table = read_gene_table(phantom.rnaseq_path)
    assert table.sample_ids == ["R01-001", "R01-003", "R01-004"]
    assert drop_na_genes(table).num_genes == PHANTOM["n_genes"]  # the exact count after the NA drop
    scans, _ = scan_cohort(phantom.collection_dir)
    kept, skipped = match_rna(scans, table)
    assert [s.patient_id for s in kept] == ["R01-001", "R01-003"]
    assert [s.patient_id for s in skipped] == ["R01-002"] and "no RNA-seq sample" in skipped[0].reason


def test_phantom_damaged_copy_skips_with_reasons(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(phantom.out_dir, root)
    collection = root / phantom.collection_dir.name
    # R01-001: the referenced CT series was not downloaded; R01-002: one of its CT slices is cut short;
    # R01-003: a garbage .dcm sits in its CT folder.
    series = {s.patient_id: s for s in scan_cohort(collection)[0]}
    relative = {pid: s.ct_files[0].parent.relative_to(collection) for pid, s in series.items()}
    shutil.rmtree(collection / relative["R01-001"])
    victim = sorted((collection / relative["R01-002"]).glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:-500])
    (collection / relative["R01-003"] / "1-999.dcm").write_bytes(b"garbage" * 100)
    scans, skipped = scan_cohort(root)
    assert scans == []
    reasons = {s.patient_id: s.reason for s in skipped}
    assert "not present in the patient's folder" in reasons["R01-001"]
    assert "truncated" in reasons["R01-002"]
    assert "1-999.dcm" in reasons["R01-003"] and "corrupt DICOM file" in reasons["R01-003"]
    assert "no SEG" in reasons["R01-004"]
