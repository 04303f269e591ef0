"""Gene tables: GEO parsing, NA handling, normalisation from training samples only, model profiles."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from RadiogenomicGANLib.genes import (
    GeneTable,
    GeneTableError,
    drop_na_genes,
    fit_normalisation,
    log_transform,
    profile_for_model,
    read_gene_table,
)


def _write_geo(path: Path, genes: list[str], samples: list[str], values: np.ndarray) -> Path:
    """GEO GSE103584 layout: empty first header cell, tab-separated, literal NA."""
    lines = ["\t" + "\t".join(samples)]
    for gene, row in zip(genes, values):
        lines.append(gene + "\t" + "\t".join("NA" if np.isnan(v) else f"{v:g}" for v in row))
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def _geo_like(rng: np.random.Generator, genes: int, samples: int, complete: int):
    names = [f"GENE{g}" for g in range(genes)]
    ids = [f"R01-{s + 1:03d}" for s in range(samples)]
    values = rng.gamma(0.6, 8.0, size=(genes, samples))
    values[rng.random(values.shape) < 0.3] = 0.0  # many exact zeros, like Cufflinks FPKM
    incomplete = rng.choice(genes, size=genes - complete, replace=False)
    for g in incomplete:  # every incomplete gene gets 1..3 NAs
        values[g, rng.choice(samples, size=rng.integers(1, 4), replace=False)] = np.nan
    return names, ids, values


def test_geo_gz_parse_gives_exact_gene_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names, ids, values = _geo_like(rng, genes=300, samples=12, complete=172)
    path = _write_geo(tmp_path / "GSE_RNAseq.txt.gz", [*names, "__no_feature", "__ambiguous"], ids,
                      np.vstack([values, np.ones((2, 12))]))
    table = read_gene_table(path)
    assert table.num_genes == 300 and table.sample_ids == ids  # '_' counter rows dropped
    assert np.isnan(table.values).sum() == np.isnan(values).sum()
    np.testing.assert_allclose(table.values[~np.isnan(values)], values[~np.isnan(values)], rtol=1e-5)
    complete = drop_na_genes(table)
    assert complete.num_genes == 172
    assert not np.isnan(complete.values).any()


def test_csv_orientations_agree(tmp_path: Path) -> None:
    genes, samples = ["A", "B", "C"], ["R01-001", "R01-002"]
    values = np.array([[1.0, 2.0], [3.0, np.nan], [0.0, 5.0]])
    rows = tmp_path / "genes_rows.csv"
    rows.write_text("gene,R01-001,R01-002\nA,1,2\nB,3,NA\nC,0,5\n")
    cols = tmp_path / "samples_rows.csv"
    cols.write_text("sample,A,B,C\nR01-001,1,3,0\nR01-002,2,,5\n")
    unlabelled = tmp_path / "unlabelled.csv"  # corner cell says nothing: subject ids decide
    unlabelled.write_text("x,A,B,C\nR01-001,1,3,0\nR01-002,2,NA,5\n")
    for path in (rows, cols, unlabelled):
        table = read_gene_table(path)
        assert table.gene_names == genes and table.sample_ids == samples, path.name
        np.testing.assert_array_equal(table.values, values)
    forced = read_gene_table(cols, orientation="genes_as_rows")
    assert forced.gene_names == samples


def test_all_na_table_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_geo(tmp_path / "na.txt", ["A", "B"], ["R01-001", "R01-002"], np.full((2, 2), np.nan))
    table = read_gene_table(path)
    with pytest.raises(GeneTableError, match="no gene left after dropping genes with NA"):
        drop_na_genes(table)


def test_duplicates_and_garbage_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.txt"
    dup.write_text("\tR01-001\nA\t1\nA\t2\nB\t3\n")
    with pytest.raises(GeneTableError, match=r"duplicate gene names.*'A' ×2"):
        read_gene_table(dup)
    bad = tmp_path / "bad.txt"
    bad.write_text("\tR01-001\tR01-002\nA\t1\tabc\n")
    with pytest.raises(GeneTableError, match="'abc' in row 'A', column 'R01-002'"):
        read_gene_table(bad)
    with pytest.raises(GeneTableError, match="not found"):
        read_gene_table(tmp_path / "absent.txt")


def test_normalisation_uses_training_samples_only() -> None:
    log_values = log_transform(np.array([[0.0, 1.0, 3.0, 1000.0], [2.0, 2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(log_values[0, :3], [0.0, 1.0, 2.0])
    means, stds = fit_normalisation(log_values[:, :3])  # the 4th sample is a test patient
    np.testing.assert_allclose(means, [1.0, np.log2(3.0)])
    assert stds[0] == pytest.approx(np.std([0.0, 1.0, 2.0]))
    assert stds[1] > 0  # constant gene: floored, never a division by zero
    with pytest.raises(GeneTableError, match="negative"):
        log_transform(np.array([-2.0]))


def _small_table() -> GeneTable:
    return GeneTable(["A", "B", "C"], ["R01-001", "R01-002", "R01-003"],
                     np.array([[0.0, 1.0, 3.0], [7.0, 3.0, 1.0], [1.0, np.nan, 0.0]]))


def test_profile_aligns_by_name_and_blends() -> None:
    table = _small_table()
    names = ["B", "A"]  # model order differs from table order
    means, stds = np.array([2.0, 1.0]), np.array([1.0, 0.5])
    profile = profile_for_model(table, "R01-001", names, means, stds)
    assert profile.dtype == np.float32
    np.testing.assert_allclose(profile, [(3.0 - 2.0) / 1.0, (0.0 - 1.0) / 0.5])
    other = profile_for_model(table, "R01-003", names, means, stds)
    half = profile_for_model(table, "R01-001", names, means, stds, blend_with="R01-003", blend_weight=0.5)
    np.testing.assert_allclose(half, 0.5 * profile + 0.5 * other, rtol=1e-6)
    with pytest.raises(GeneTableError, match=r"\[0, 1\]"):
        profile_for_model(table, "R01-001", names, means, stds, blend_with="R01-003", blend_weight=1.5)


def test_profile_missing_genes_and_unknown_sample() -> None:
    table = _small_table()
    names = ["A", "C", "Z"]
    means, stds = np.zeros(3), np.ones(3)
    with pytest.raises(GeneTableError, match=r"2 of 3 model genes are missing.*1 not in the table, 1 NA.*impute"):
        profile_for_model(table, "R01-002", names, means, stds)
    imputed = profile_for_model(table, "R01-002", names, means, stds, impute=True)
    np.testing.assert_allclose(imputed, [1.0, 0.0, 0.0])  # log2(1+1) = 1; missing → training mean
    with pytest.raises(GeneTableError, match=r"'R01-999' is not in the gene table.*R01-001"):
        profile_for_model(table, "R01-999", names, means, stds, impute=True)
