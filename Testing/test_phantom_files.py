"""The phantom cohort on disk, read back by independent readers (SimpleITK, highdicom, pydicom, plain text).

Why: the project's own readers are tested against these files, so the files must first be shown to carry
exactly the geometry, HU values, masks and gene counts the phantom intended — judged by third-party code.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from RadiogenomicGANLib.geometry import LPS_TO_RAS, VolumeGeometry
from RadiogenomicGANLib.phantom import generate_patient, write_cohort
from RadiogenomicGANLib.phantom.genomics import COUNTER_ROWS
from RadiogenomicGANLib.phantom.writers import EPAD, SEG_SOP_CLASS, SLICER

SEED = 11
N_GENES = 200
OPTIONS = {"size_ij": 96, "slices": 36, "n_genes": N_GENES}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("phantom")
    patients = [generate_patient(i, SEED, **OPTIONS) for i in range(5)]
    summary = write_cohort(
        out, patients, SEED, without_rna=["R01-002"], without_seg=["R01-005"], decoy_fraction=0.6
    )
    return out, {p.patient_id: p for p in patients}, summary


def _truth(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "ground_truth.csv", newline="") as f:
        return {row["patient_id"]: row for row in csv.DictReader(f)}


def _seg_files(out: Path) -> dict[str, Path]:
    return {p.parts[-4]: p for p in (out / "NSCLC Radiogenomics").glob("*/*/*/1-1.dcm")}


def _series_dir(summary, uid: str) -> Path:
    return next(s.folder for s in summary.series if s.series_uid == uid)


# --- CT ----------------------------------------------------------------------------------------------
def test_simpleitk_reads_the_intended_geometry_and_hu(cohort) -> None:
    _out, patients, summary = cohort
    for pid, patient in patients.items():
        folder = _series_dir(summary, summary.ct_series_uid[pid])
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), summary.ct_series_uid[pid])
        assert len(files) == patient.volume_hu.shape[0]
        image = sitk.ReadImage(files)
        origin, spacing, direction = patient.geometry.to_lps()
        np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-4)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), patient.volume_hu)


def test_ct_headers_are_realistic(cohort) -> None:
    _out, patients, summary = cohort
    for pid, patient in patients.items():
        folder = _series_dir(summary, summary.ct_series_uid[pid])
        ds = pydicom.dcmread(folder / "1-001.dcm")
        assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.PatientID == pid and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        # 1-001 is the most superior slice: readers must sort by position, not by file name.
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(patient.geometry.to_lps()[0][2] + (
            patient.volume_hu.shape[0] - 1) * patient.geometry.spacing[2], abs=1e-3)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(patient.geometry.spacing[2], abs=1e-5)


def test_decoy_series_share_the_study_but_not_the_seg_reference(cohort) -> None:
    _out, _patients, summary = cohort
    decoys = [pid for pid, d in summary.decoy.items() if d]
    assert decoys, "fixture should hold at least one decoy series"
    for pid in decoys:
        uids = {s.series_uid for s in summary.series if s.subject == pid and s.modality == "CT"}
        assert len(uids) == 2
        studies = {s.study_uid for s in summary.series if s.subject == pid}
        assert len(studies) == 1


# --- SEG ---------------------------------------------------------------------------------------------
def _place(kji_float: np.ndarray) -> np.ndarray:
    kji = np.rint(kji_float)
    np.testing.assert_allclose(kji, kji_float, atol=1e-3)  # frames land exactly on CT voxels
    return kji.astype(int)


def _mask_via_highdicom(seg_path: Path, geometry: VolumeGeometry, shape: tuple[int, ...]) -> np.ndarray:
    seg = hd.seg.segread(seg_path)
    volume = seg.get_volume(combine_segments=True)
    idx = np.argwhere(volume.array > 0)
    lps = np.c_[idx, np.ones(len(idx))] @ volume.affine.T
    kji = _place(geometry.ras_to_kji(lps[:, :3] @ LPS_TO_RAS.T))
    mask = np.zeros(shape, bool)
    mask[tuple(kji.T)] = True
    return mask


def _mask_via_pydicom(seg_path: Path, geometry: VolumeGeometry, shape: tuple[int, ...]) -> np.ndarray:
    ds = pydicom.dcmread(seg_path)
    rows, cols, frames = ds.Rows, ds.Columns, int(ds.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
    pixels = bits[: frames * rows * cols].reshape(frames, rows, cols).astype(bool)
    mask = np.zeros(shape, bool)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos_lps = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = _place(geometry.ras_to_kji(LPS_TO_RAS @ pos_lps))[0]
        assert k[1] == 0 and k[2] == 0
        mask[k[0]] |= pixels[f]
    return mask


def test_both_seg_variants_decode_to_the_nodule_mask(cohort) -> None:
    out, patients, summary = cohort
    segs = _seg_files(out)
    assert set(segs) == {"R01-001", "R01-002", "R01-003", "R01-004"}  # R01-005 has none
    seen = set()
    for pid, path in segs.items():
        patient = patients[pid]
        shape = patient.volume_hu.shape
        assert patient.nodule_mask.any()
        np.testing.assert_array_equal(_mask_via_highdicom(path, patient.geometry, shape), patient.nodule_mask)
        np.testing.assert_array_equal(_mask_via_pydicom(path, patient.geometry, shape), patient.nodule_mask)
        seen.add(summary.seg_variant[pid])
    assert seen == {SLICER, EPAD}


def test_seg_variants_have_the_real_structure(cohort) -> None:
    out, patients, summary = cohort
    for pid, path in _seg_files(out).items():
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SEG_SOP_CLASS and ds.SegmentationType == "BINARY"
        assert len(ds.SegmentSequence) == 1
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == summary.ct_series_uid[pid]
        shared = ds.SharedFunctionalGroupsSequence[0]
        n_slices = patients[pid].volume_hu.shape[0]
        if summary.seg_variant[pid] == SLICER:
            assert int(ds.NumberOfFrames) == n_slices
            assert all("DerivationImageSequence" in f for f in ds.PerFrameFunctionalGroupsSequence)
            assert "DerivationImageSequence" not in shared
        else:
            assert int(ds.NumberOfFrames) == patients[pid].nodule_slices.size < n_slices
            assert not any("DerivationImageSequence" in f for f in ds.PerFrameFunctionalGroupsSequence)
            assert len(shared.DerivationImageSequence[0].SourceImageSequence) == int(ds.NumberOfFrames)


# --- GEO table, metadata, truth ----------------------------------------------------------------------
def test_geo_table_plain_parse_gives_the_exact_gene_count(cohort) -> None:
    out, patients, _summary = cohort
    with gzip.open(out / "GSE103584_R01_NSCLC_RNAseq.txt.gz", "rt") as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t")
    assert header[0] == ""
    samples = header[1:]
    assert samples == ["R01-001", "R01-003", "R01-004", "R01-005"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows)
    names = [r[0] for r in rows]
    assert len(set(names)) == len(names)
    assert set(COUNTER_ROWS) <= set(names)
    complete = [r for r in rows if "NA" not in r[1:]]
    assert len(complete) == N_GENES
    assert len([r for r in complete if not r[0].startswith("_")]) == N_GENES
    values = np.array([[float(v) for v in r[1:]] for r in complete])
    assert (values >= 0).all() and (values == 0).any()
    # The file holds exactly the in-memory profiles (NaN = NA).
    by_name = {r[0]: r[1:] for r in rows}
    for column, pid in enumerate(samples):
        p = patients[pid]
        for name, value in zip(p.gene_names[:50], p.genes_fpkm[:50]):
            text = by_name[name][column]
            if text == "NA":
                continue  # write_cohort may add an NA so that every NA gene keeps one
            assert float(text) == value


def test_metadata_csv_points_at_every_series(cohort) -> None:
    out, patients, _summary = cohort
    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in ("Subject ID", "Study UID", "Series Description", "Modality", "SOP Class UID", "File Location"):
        assert column in rows[0]
    assert {r["Subject ID"] for r in rows} == set(patients)
    assert sum(r["Modality"] == "SEG" for r in rows) == 4
    for r in rows:
        folder = out / r["File Location"]
        assert folder.is_dir()
        assert len(list(folder.glob("*.dcm"))) == int(r["Number of Images"])
        assert folder.parts[-4] == "NSCLC Radiogenomics" and folder.parts[-3] == r["Subject ID"]


def test_ground_truth_csv_matches_the_patients(cohort) -> None:
    out, patients, _summary = cohort
    truth = _truth(out)
    assert set(truth) == set(patients)
    for pid, row in truth.items():
        p = patients[pid]
        assert int(row["module_class"]) == p.module_class
        np.testing.assert_allclose([float(row[f"module_{m + 1}"]) for m in range(4)], p.module_activations, atol=1e-5)
        centre = [float(row[f"nodule_centre_{c}"]) for c in "ras"]
        np.testing.assert_allclose(centre, p.nodule_centre_ras, atol=1e-3)
        assert row["has_rna"] == ("0" if pid == "R01-002" else "1")
        assert row["has_seg"] == ("0" if pid == "R01-005" else "1")
        assert float(row["diameter_mm"]) == pytest.approx(p.phenotype["diameter_mm"], abs=1e-5)


def test_same_seed_same_bytes_from_one_process_or_two(tmp_path: Path) -> None:
    kwargs = {"size_ij": 40, "slices": 12, "n_genes": 60, "decoy_fraction": 1.0,
              "seg_variants": [SLICER, EPAD, SLICER], "without_rna": ["R01-002"], "without_seg": ["R01-003"]}
    a = write_cohort(tmp_path / "a", 3, 5, **kwargs)
    b = write_cohort(tmp_path / "b", 3, 5, workers=2, **kwargs)   # patients written by 2 spawned processes
    for name in ("patient_ids", "seg_variant", "decoy", "rna_samples", "ct_series_uid"):
        assert getattr(a, name) == getattr(b, name), name
    assert [s.series_uid for s in a.series] == [s.series_uid for s in b.series]
    files_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel


def test_cli_writes_a_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from RadiogenomicGANLib.phantom.__main__ import main

    argv = ["--out", str(tmp_path), "--patients", "2", "--seed", "3", "--size", "32", "--slices", "8",
            "--genes", "40", "--without-rna", "R01-002", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "2 patients" in capsys.readouterr().out
    assert (tmp_path / "metadata.csv").is_file() and (tmp_path / "ground_truth.csv").is_file()
    with gzip.open(tmp_path / "GSE103584_R01_NSCLC_RNAseq.txt.gz", "rt") as f:
        assert f.readline().rstrip("\n").split("\t") == ["", "R01-001"]
    assert len(list(tmp_path.glob("NSCLC Radiogenomics/*/*/*/1-1.dcm"))) == 2


def test_two_seeds_write_gene_tables_with_identical_rows(tmp_path: Path) -> None:
    """One biology: a model trained on one seed's cohort can read any other seed's table."""
    from RadiogenomicGANLib.genes import drop_na_genes, read_gene_table
    from RadiogenomicGANLib.phantom.__main__ import main

    tables = []
    for seed in (5, 11):
        out = tmp_path / f"seed{seed}"
        argv = ["--out", str(out), "--patients", "3", "--seed", str(seed), "--size", "32", "--slices", "8",
                "--genes", "60", "--biology", "1", "--quiet"]  # fmt: skip
        assert main(argv) == 0
        tables.append(read_gene_table(out / "GSE103584_R01_NSCLC_RNAseq.txt.gz"))
    assert tables[0].gene_names == tables[1].gene_names
    assert drop_na_genes(tables[0]).gene_names == drop_na_genes(tables[1]).gene_names
    assert not np.array_equal(tables[0].values, tables[1].values, equal_nan=True)  # the patients differ
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--biology", "2"])
