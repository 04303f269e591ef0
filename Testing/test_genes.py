"""Gene tables: GEO parsing, NA handling, normalisation from training samples only, model profiles."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from RadiogenomicGANLib.genes import (
    GenePreprocessing,
    GeneTable,
    GeneTableError,
    drop_na_genes,
    log_transform,
    out_of_sample_gain_loo,
    profile_for_model,
    read_gene_table,
    training_patients_among,
)
from RadiogenomicGANLib.imputation import missing_gene_count


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


def test_log_transform_refuses_negative_values() -> None:
    np.testing.assert_allclose(log_transform(np.array([0.0, 1.0, 3.0])), [0.0, 1.0, 2.0])
    with pytest.raises(GeneTableError, match="negative"):
        log_transform(np.array([-2.0]))


def _trap_cohort(rng: np.random.Generator, patients: int) -> tuple[np.ndarray, list[str]]:
    """(patients, 5) log values: signal, low-expression, near-constant, mostly-zero and expressed genes."""
    signal = 5.0 + rng.normal(size=patients)
    low = np.abs(rng.normal(0.0, 0.3, size=patients))  # mean < 1: low expression
    flat = 8.0 + rng.normal(0.0, 0.01, size=patients)  # near-constant: a z-score would explode on it
    zeros = np.where(rng.random(patients) < 0.8, 0.0, 6.0)  # expressed in a few patients only
    other = 3.0 + 0.5 * rng.normal(size=patients)
    return np.stack([signal, low, flat, zeros, other], axis=1), ["SIG", "LOW", "FLAT", "ZERO", "OTHER"]


def test_preprocessing_is_fitted_on_training_patients_only() -> None:
    rng = np.random.default_rng(0)
    train, names = _trap_cohort(rng, 40)
    fitted = GenePreprocessing.fit(train, names)
    assert fitted.gene_names == ["SIG", "OTHER"]
    assert fitted.fitted_on == {"table_genes": 5, "training_patients": 40, "dropped_low_expression": 2,
                                "dropped_near_constant": 1, "dropped_by_top_variance": 0, "kept": 2}
    np.testing.assert_allclose(fitted.means, train[:, [0, 4]].mean(axis=0))
    np.testing.assert_allclose(fitted.stds, train[:, [0, 4]].std(axis=0))
    # an extreme held-out patient changes nothing that was fitted, and its inputs stay bounded
    held_out = np.array([[30.0, 9.0, 9.0, 9.0, 30.0]])
    refit = GenePreprocessing.fit(train, names)
    np.testing.assert_array_equal(refit.means, fitted.means)
    assert np.abs(fitted.transform_log(held_out[:, [0, 4]])).max() == fitted.clip == 5.0
    # without the filter and the clip the near-constant gene dominates the held-out vector (the old trap)
    naive = (np.array([[5.0, 8.03]]) - train[:, [0, 2]].mean(axis=0)) / train[:, [0, 2]].std(axis=0)
    assert abs(naive[0, 1]) > 2.0 * abs(naive[0, 0])


def test_preprocessing_top_variance_and_whitened_components() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(60, 1))
    x = 5.0 + latent @ rng.choice([-1.0, 1.0], size=(1, 30)) + 0.3 * rng.normal(size=(60, 30))
    names = [f"G{i}" for i in range(30)]
    top = GenePreprocessing.fit(x, names, top_variance=10)
    assert top.num_genes == 10 and top.fitted_on["dropped_by_top_variance"] == 20
    assert set(top.gene_names) == {names[i] for i in np.argsort(-x.std(axis=0))[:10]}
    pca = GenePreprocessing.fit(x, names, components=3)
    assert pca.output_dim == 3 and pca.components.shape == (3, 30)
    scores = pca.transform_log(x, in_sample=True)
    np.testing.assert_allclose(scores.std(axis=0, ddof=1), 1.0, rtol=1e-4)  # whitened on the training set
    np.testing.assert_allclose(pca.transform_log(x, in_sample=False), scores * pca.out_of_sample_gain, rtol=1e-5)
    assert abs(np.corrcoef(scores[:, 0], latent[:, 0])[0, 1]) > 0.95  # the first axis is the module
    assert pca.problems() == []
    broken = GenePreprocessing(["A", "A"], np.zeros(2), np.array([1.0, 0.0]), clip=float("nan"))
    assert len(broken.problems()) == 3



def test_the_fitted_patients_are_recognised_and_prepared_as_training_prepared_them() -> None:
    """The gain is for patients the fit did not see; a training patient's own profile, wherever it comes from
    (the prepared cohort, a GEO table read again, the module), gets the unscaled scores the generator learnt."""
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(30, 2))   # far more genes than training patients, as in the real cohort
    x = np.maximum(10.0 + latent @ rng.normal(size=(2, 300)) + 0.5 * rng.normal(size=(30, 300)), 1.0)  # log2 FPKM
    names = [f"G{i}" for i in range(300)]
    train, unseen = x[:20], x[20:]
    pca = GenePreprocessing.fit(train, names, components=8)
    assert pca.out_of_sample_gain > 1.5 and pca.fitted_scores.shape == (20, 8)
    mixed = np.concatenate([unseen[:3], train[7:9], unseen[3:]])
    prepared = pca.transform_log(mixed)
    np.testing.assert_allclose(prepared[3:5], pca.transform_log(train[7:9], in_sample=True), rtol=1e-6)
    outside = np.r_[0:3, 5:12]
    np.testing.assert_allclose(prepared[outside], pca.transform_log(mixed[outside], in_sample=False), rtol=1e-6)
    np.testing.assert_array_equal(pca.in_fit(pca.transform_log(mixed, in_sample=True)), [0, 0, 0, 1, 1] + [0] * 7)
    # float32 storage and a text round trip stay recognised; a nudge of one gene by 0.1 log2 units does not
    assert pca.in_fit(pca.transform_log(train.astype(np.float32).astype(np.float64), in_sample=True)).all()
    nudged = train[:1].copy()
    nudged[0, int(np.argmax(np.abs(pca.components).sum(axis=0)))] += 0.1
    assert not pca.in_fit(pca.transform_log(nudged, in_sample=True)).any()
    # read from a GEO-style table of linear FPKM in another gene order, as `insert` and the module read it
    order = np.random.default_rng(5).permutation(len(names))
    fpkm = np.exp2(np.stack([train[7], unseen[0]], axis=1)[order]) - 1.0
    table = GeneTable([names[i] for i in order], ["TRAINED", "NEW"], fpkm)
    np.testing.assert_allclose(profile_for_model(table, "TRAINED", pca), prepared[3], rtol=1e-5)
    np.testing.assert_allclose(profile_for_model(table, "NEW", pca), prepared[0], rtol=1e-5)
    assert training_patients_among(table, ["NEW", "TRAINED", None], pca) == ["TRAINED"]
    # without stored scores (files written before them) every patient gets the gain, as before
    older = GenePreprocessing(pca.gene_names, pca.means, pca.stds, pca.clip, pca.components, {}, pca.out_of_sample_gain)
    np.testing.assert_allclose(older.transform_log(train[7:9]), prepared[3:5] * pca.out_of_sample_gain, rtol=1e-5)
    wrong = GenePreprocessing(pca.gene_names, pca.means, pca.stds, pca.clip, pca.components, {},
                              pca.out_of_sample_gain, np.zeros((3, 2)))
    assert any("fitted patients' scores have shape" in problem for problem in wrong.problems())

def test_out_of_sample_gain_puts_a_new_patient_on_the_training_scale() -> None:
    """Far more genes than training patients: a new patient's whitened scores shrink towards 0 (each training
    patient's own noise lies inside the axes fitted on it). The leave-one-out gain undoes the shrinkage; a
    fit without it, or a projection fitted on too few patients to leave one out, keeps gain 1."""
    rng = np.random.default_rng(3)
    genes, modules, per_module = 1500, 3, 120
    loadings = np.zeros((modules, genes))
    for m in range(modules):
        loadings[m, m * per_module:(m + 1) * per_module] = rng.uniform(0.4, 0.7, per_module)

    def patients(n: int) -> np.ndarray:
        return 5.0 + rng.normal(size=(n, modules)) @ loadings + rng.normal(size=(n, genes))

    train, new = patients(40), patients(300)
    names = [f"G{i}" for i in range(genes)]
    pca = GenePreprocessing.fit(train, names, components=8)

    def rms(values: np.ndarray) -> float:
        return float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))

    shrunk = rms(pca.transform_log(new, in_sample=True))
    assert shrunk < 0.7 and abs(rms(pca.transform_log(train, in_sample=True)) - 1.0) < 0.05
    assert 0.8 < rms(pca.transform_log(new)) < 1.25 and pca.out_of_sample_gain > 1.4
    assert GenePreprocessing.fit(train, names, components=8, out_of_sample_gain=False).out_of_sample_gain == 1.0
    assert GenePreprocessing.fit(train[:3], names, components=2).out_of_sample_gain == 1.0
    assert GenePreprocessing.fit(train, names).out_of_sample_gain == 1.0  # no projection, no gain
    assert pca.describe() == f"8 whitened PCA axes of 1500 genes, out-of-sample gain {pca.out_of_sample_gain:.2f}"
    # a large cohort is left out in groups (50 refits, not one per patient): about the same gain
    big = patients(120)
    z = GenePreprocessing.fit(big, names).transform_log(big).astype(np.float64)
    grouped, alone = out_of_sample_gain_loo(z, 8), out_of_sample_gain_loo(z, 8, max_refits=120)
    assert grouped > 1.2 and abs(grouped / alone - 1.0) < 0.05
    for gain, problem in ((0.0, "must lie in"), (float("nan"), "must lie in"), (11.0, "must lie in")):
        assert any(problem in text for text in GenePreprocessing(names[:2], np.zeros(2), np.ones(2),
                                                                   components=np.eye(2),
                                                                   out_of_sample_gain=gain).problems())
    assert "needs a projection" in GenePreprocessing(names[:2], np.zeros(2), np.ones(2),
                                                     out_of_sample_gain=2.0).problems()[0]


def _small_table() -> GeneTable:
    return GeneTable(["A", "B", "C"], ["R01-001", "R01-002", "R01-003"],
                     np.array([[0.0, 1.0, 3.0], [7.0, 3.0, 1.0], [1.0, np.nan, 0.0]]))


def _preprocessing(names: list[str], means: list[float], stds: list[float], clip: float = 50.0) -> GenePreprocessing:
    return GenePreprocessing(names, np.array(means), np.array(stds), clip)


def test_profile_aligns_by_name_and_blends() -> None:
    table = _small_table()
    prep = _preprocessing(["B", "A"], [2.0, 1.0], [1.0, 0.5])  # model order differs from table order
    profile = profile_for_model(table, "R01-001", prep)
    assert profile.dtype == np.float32
    np.testing.assert_allclose(profile, [(3.0 - 2.0) / 1.0, (0.0 - 1.0) / 0.5])
    other = profile_for_model(table, "R01-003", prep)
    half = profile_for_model(table, "R01-001", prep, blend_with="R01-003", blend_weight=0.5)
    np.testing.assert_allclose(half, 0.5 * profile + 0.5 * other, rtol=1e-6)
    with pytest.raises(GeneTableError, match=r"\[0, 1\]"):
        profile_for_model(table, "R01-001", prep, blend_with="R01-003", blend_weight=1.5)
    clipped = profile_for_model(table, "R01-001", _preprocessing(["B", "A"], [2.0, 1.0], [0.01, 0.5], clip=5.0))
    np.testing.assert_allclose(clipped, [5.0, -2.0])


def test_profile_missing_genes_and_unknown_sample() -> None:
    table = _small_table()
    prep = _preprocessing(["A", "C", "Z"], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(GeneTableError, match=r"2 of 3 model genes are missing.*1 not in the table, 1 NA.*impute"):
        profile_for_model(table, "R01-002", prep)
    assert missing_gene_count(table, ["R01-002"], prep.gene_names) == 2  # what imputation would fill
    imputed = profile_for_model(table, "R01-002", prep, impute=True)
    np.testing.assert_allclose(imputed, [1.0, 0.0, 0.0])  # log2(1+1) = 1; missing → training mean
    with pytest.raises(GeneTableError, match=r"'R01-999' is not in the gene table.*R01-001"):
        profile_for_model(table, "R01-999", prep, impute=True)
