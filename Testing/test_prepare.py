"""`training.prepare` end to end on a phantom cohort, and the paper's sampling rules it must keep."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from RadiogenomicGANLib.genes import GenePreprocessing, drop_na_genes, log_transform, read_gene_table
from RadiogenomicGANLib.lungmask import boundary_distance_mm, compute_lung_mask
from RadiogenomicGANLib.patches import extract_patch
from RadiogenomicGANLib.phantom import generate_patient
from RadiogenomicGANLib.phantom.writers import write_cohort
from training.dataset import load_dataset
from training.prepare import main, parse_fractions, patient_rng, patient_samples, prepare, split_patients


@dataclass
class Prepared:
    root: Path
    rnaseq: Path
    report: object
    out: Path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """9 phantom patients: 6 good, one without RNA, one without SEG, one with a truncated CT file."""
    root = tmp_path_factory.mktemp("cohort")
    summary = write_cohort(
        root, 9, 0, size_ij=64, slices=60, n_genes=40, without_rna=["R01-007"], without_seg=["R01-008"]
    )
    for folder in (root / "NSCLC Radiogenomics" / "R01-009").glob("*/*"):
        files = sorted(folder.glob("*.dcm"))
        if len(files) > 1:  # every CT series of R01-009 loses the end of one file
            files[len(files) // 2].write_bytes(files[len(files) // 2].read_bytes()[:300])
    out = root / "dataset.npz"
    report = prepare(root, summary.rnaseq_path, out, progress=False, background_vois=3, slices_per_voi=10)
    return Prepared(root, summary.rnaseq_path, report, out)


def test_end_to_end_uses_the_good_patients_and_says_why_others_are_skipped(prepared: Prepared) -> None:
    report = prepared.report
    assert report.used == [f"R01-00{n}" for n in range(1, 7)]
    reasons = {s.patient_id: (s.stage, s.reason) for s in report.skipped}
    assert reasons["R01-007"][0] == "genes" and "no RNA-seq sample" in reasons["R01-007"][1]
    assert reasons["R01-008"][0] == "scan" and "no SEG" in reasons["R01-008"][1]
    assert "unreadable DICOM" in reasons["R01-009"][1]
    text = report.describe()
    kept = report.gene_filter["kept"]
    for needle in ("6 of 9 used", "3 skipped", "nodule slices", "background slices",
                   f"genes: {kept} model inputs of 40 complete genes", "low-expression", "near-constant"):
        assert needle in text

    data = load_dataset(prepared.out)
    assert data.patch_size == 64 and data.num_genes == kept < 40 and list(data.patient_ids) == report.used
    assert data.table_genes_log.shape == (6, 40)
    assert data.gene_preprocessing.fitted_on == report.gene_filter  # the fit's record travels to the weights
    assert np.all(data.nodule_masks.reshape(data.num_nodules, -1).any(axis=1))
    assert data.nodule_images.min() >= -1 and data.nodule_images.max() <= 1
    for p in range(data.num_patients):  # every patient contributes nodule slices and backgrounds
        assert (data.nodule_patient == p).any() and (data.background_patient == p).any()
    assert np.isfinite(data.nodule_centre_ras).all() and np.all(data.patient_spacing > 0)
    # provenance: the nodule slices of a patient lie around its nodule centre
    for p in range(data.num_patients):
        slices = data.nodule_slice[data.nodule_patient == p]
        assert slices.max() - slices.min() <= 60 / data.patient_spacing[p, 2] + 1


def test_two_worker_processes_write_the_same_dataset(prepared: Prepared, tmp_path: Path) -> None:
    """Patients read and cut in 2 spawned processes: every array of the file, the skips (a truncated CT among
    them, met inside a worker) and the notes are those of one process."""
    out = tmp_path / "two.npz"
    report = prepare(prepared.root, prepared.rnaseq, out, progress=False, background_vois=3, slices_per_voi=10,
                     workers=2)
    assert report.used == prepared.report.used and report.skipped == prepared.report.skipped
    assert report.warnings == prepared.report.warnings
    with np.load(prepared.out) as one, np.load(out) as two:
        assert sorted(one.files) == sorted(two.files)
        for name in one.files:
            assert np.array_equal(one[name], two[name]), name


def test_no_split_leak_and_train_only_gene_statistics(prepared: Prepared) -> None:
    data = load_dataset(prepared.out)
    groups = {name: set(data.patient_ids[data.patients_in(name)]) for name in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert set().union(*groups.values()) == set(data.patient_ids)
    assert all(groups.values())
    # genes: NA genes dropped, log2(x+1), the preprocessing fitted on the TRAIN patients only
    table = drop_na_genes(read_gene_table(prepared.rnaseq))
    assert list(data.table_gene_names) == table.gene_names
    train_ids = sorted(groups["train"])
    logs = log_transform(table.select_samples(train_ids).values).T
    expected = GenePreprocessing.fit(logs, table.gene_names)
    assert list(data.gene_names) == expected.gene_names and data.num_genes < len(table.gene_names)
    np.testing.assert_allclose(data.gene_means, expected.means, rtol=1e-5, atol=1e-5)
    train_rows = data.genes[data.patients_in("train")]
    np.testing.assert_allclose(train_rows.mean(axis=0), 0.0, atol=1e-3)  # clipping moves no training mean much
    assert np.abs(data.genes).max() <= data.gene_clip


def test_background_centres_are_5_to_25_mm_inside_and_patches_never_touch_the_nodule() -> None:
    for index in (0, 3):
        patient = generate_patient(index, 0, size_ij=96, n_genes=40)
        spacing = patient.geometry.spacing_kji
        lung = compute_lung_mask(patient.volume_hu, spacing)
        samples = patient_samples(
            patient.patient_id,
            patient.volume_hu,
            patient.geometry,
            patient.nodule_mask,
            patient_rng(0, patient.patient_id),
            background_vois=4,
            slices_per_voi=20,
            lung_mask=lung,
        )
        assert len(samples.background_images) > 0 and len(samples.nodule_images) > 0
        distance = boundary_distance_mm(lung & ~patient.nodule_mask, spacing)
        nodule = patient.nodule_mask.astype(np.float32)
        for centre_ras, k in zip(samples.background_centres, samples.background_slices):
            kji = np.round(patient.geometry.ras_to_kji(centre_ras)[0]).astype(int)
            assert 5.0 <= distance[tuple(kji)] <= 25.0
            assert abs(k - kji[0]) * spacing[0] <= 30.0 + 1e-6  # inside the 60 mm VOI
            touch = extract_patch(nodule, patient.geometry, centre_ras, int(k), 64, 60 / 64, order=1, fill=0.0)
            assert touch.max() == 0.0
        # nodule patches: the mask is present in each, and the slices are those with nodule
        present = set(np.flatnonzero(patient.nodule_mask.any(axis=(1, 2))).tolist())
        assert set(samples.nodule_slices.tolist()) <= present
        again = patient_samples(
            patient.patient_id,
            patient.volume_hu,
            patient.geometry,
            patient.nodule_mask,
            patient_rng(0, patient.patient_id),
            background_vois=4,
            slices_per_voi=20,
            lung_mask=lung,
        )
        np.testing.assert_array_equal(samples.background_images, again.background_images)


def test_split_is_deterministic_and_patient_level() -> None:
    ids = [f"R01-{n:03d}" for n in range(1, 21)]
    a = split_patients(ids, (0.7, 0.15, 0.15), seed=3)
    assert a == split_patients(list(reversed(ids)), (0.7, 0.15, 0.15), seed=3)
    assert sorted(a.values()).count("train") == 14 and list(a.values()).count("val") == 3
    assert a != split_patients(ids, (0.7, 0.15, 0.15), seed=4)
    small = split_patients(ids[:3], (0.7, 0.15, 0.15), seed=0)
    assert sorted(small.values()) == ["test", "train", "val"]
    assert parse_fractions("7,1.5,1.5") == pytest.approx((0.7, 0.15, 0.15))
    with pytest.raises(ValueError, match="three"):
        parse_fractions("0.8,0.2")


def test_cli_reports_bad_inputs_clearly(prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--cohort", str(tmp_path / "missing"), "--rnaseq", str(prepared.rnaseq), "--out", "x.npz"])
    assert "cohort folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cohort", str(prepared.root), "--rnaseq", str(prepared.rnaseq), "--out", "x", "--split", "1,2"])
    with pytest.raises(SystemExit):
        main(["--cohort", str(prepared.root), "--rnaseq", str(prepared.rnaseq), "--out", "x", "--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err
    # an all-NA gene table: every patient is skipped for its genes, then one clear error
    all_na = tmp_path / "all_na.txt.gz"
    with gzip.open(prepared.rnaseq, "rt") as source:
        header = source.readline().rstrip("\n").split("\t")
        genes = [line.split("\t", 1)[0] for line in source]
    with gzip.open(all_na, "wt") as target:
        target.write("\t".join(header) + "\n")
        for gene in genes:
            target.write("\t".join([gene] + ["NA"] * (len(header) - 1)) + "\n")
    code = main(["--cohort", str(prepared.root), "--rnaseq", str(all_na), "--out", str(tmp_path / "o.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable patient" in err and "only NA values" in err
    assert not (tmp_path / "o.npz").exists()
