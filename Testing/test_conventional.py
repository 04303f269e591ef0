"""The conventional three-step pipeline and the truth it is scored by (training/conventional.py)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from RadiogenomicGANLib.phantom.genomics import draw_module_activations, gene_model, gene_profile
from RadiogenomicGANLib.phantom.nodule import phenotype_from_modules
from training import conventional as C
from training.dataset import load_dataset, make_synthetic_dataset
from training.metrics import NODULE_FEATURES, spearman


def test_module_phenotype_map_matches_the_phantom():
    """PHENOTYPES_OF_MODULE must be what phantom/nodule.py does: move one module, see which phenotypes move."""
    base = phenotype_from_modules(np.zeros(4), np.random.default_rng(0))
    for module, expected in C.PHENOTYPES_OF_MODULE.items():
        activations = np.zeros(4)
        activations[module - 1] = 2.0
        moved = phenotype_from_modules(activations, np.random.default_rng(0))
        changed = {k for k in base if abs(moved[k] - base[k]) > 1e-9}
        assert changed == set(expected), module
    assert (1, "diameter_mm") in C.TRUE_LINKS and (2, "mean_hu") in C.TRUE_LINKS
    assert (3, "margin_sharpness") in C.TRUE_LINKS and (4, "compactness") in C.TRUE_LINKS
    assert (1, "mean_hu") not in C.TRUE_LINKS and (4, "diameter_mm") not in C.TRUE_LINKS


def _phantom_genes(seed: int = 3, patients: int = 80, n_genes: int = 1200):
    """z-scored log2 expression of complete genes, their true modules, and the activations."""
    model = gene_model(n_genes=n_genes)
    activations = np.array([draw_module_activations(i, seed)[1] for i in range(patients)])
    fpkm = np.array([gene_profile(model, activations[i], i, seed) for i in range(patients)])
    complete = ~np.isnan(fpkm).any(axis=0)
    logs = np.log2(fpkm[:, complete] + 1.0)
    z = (logs - logs.mean(axis=0)) / np.maximum(logs.std(axis=0), 1e-6)
    return z, model.module_of_gene[complete], activations


def test_metagenes_recover_the_phantom_modules():
    z, modules, activations = _phantom_genes()
    metagenes = C.co_expression_metagenes(z, max_distance=0.8, min_genes=5)
    labels = C.label_by_membership(metagenes.clusters, modules)
    assert {1, 2, 3, 4} <= {m for label in labels for m in label}
    for cluster, label in zip(metagenes.clusters, labels):
        for m in label:
            assert np.mean(modules[cluster] == m) >= 0.25
        if label:
            assert np.mean(np.isin(modules[cluster], label)) >= 0.5
    # labels from the activations agree with membership for modules 2 and 4; modules 1 and 3 are
    # anti-correlated through the class prototypes (ρ ≈ −0.76), so their genes may share a cluster
    by_activation = C.label_units(metagenes.scores(z), activations)
    agree = [a == b for a, b in zip(labels, by_activation) if a in ([2], [4])]
    assert agree and all(agree)


def test_membership_labels_by_hand():
    gene_modules = np.array([1, 1, 1, 3, 3, 3, 0, 0, -1, -1, 2, 2, 2, 2, 0])
    clusters = [np.arange(0, 6), np.array([0, 1, 2, 6, 7, 8, 9]), np.array([10, 11, 12, 13, 14]), np.array([6, 7])]
    # 1+3 half each; module 1 only 3/7 < 50 %; module 2 4/5; no module genes
    assert C.label_by_membership(clusters, gene_modules) == [[1, 3], [], [2], []]


def test_metagene_scores_are_cluster_means():
    genes = np.arange(12, dtype=float).reshape(3, 4)
    mg = C.Metagenes([np.array([0, 1]), np.array([3])], 0.5, 1)
    assert mg.scores(genes).tolist() == [[0.5, 3.0], [4.5, 7.0], [8.5, 11.0]]
    assert C.Metagenes([], 0.5, 1).scores(genes).shape == (3, 0)


def test_association_links_count_true_false_and_missed():
    rng = np.random.default_rng(0)
    n = 40
    units = rng.standard_normal((n, 3))
    features = rng.standard_normal((n, len(NODULE_FEATURES)))
    features[:, NODULE_FEATURES.index("diameter_mm")] = units[:, 0] + 0.1 * rng.standard_normal(n)   # true
    features[:, NODULE_FEATURES.index("mean_hu")] = units[:, 1] + 0.1 * rng.standard_normal(n)       # unit 1 has
    result = C.association_links(units, ["a", "b", "c"], [[1], [], [4]], features, modules_in_truth=[1, 2, 3, 4])
    assert result["n_recovered"] == 1 and result["recovered"] == [[1, "diameter_mm"]]
    assert result["n_false"] >= 1                                  # b ↔ mean_hu: b has no module
    assert result["n_significant"] == result["n_recovered"] + result["n_false"]
    assert result["n_true_links"] == len(C.TRUE_LINKS)
    assert [2, "mean_hu"] in result["missed"]
    assert len(result["pairs"]) == 3 * len(NODULE_FEATURES)
    # unit c (module 4) also tracks the diameter: false by the map, but module 4 correlates with module 1
    features[:, NODULE_FEATURES.index("compactness")] = rng.standard_normal(n)
    units[:, 2] = units[:, 0] + 0.1 * rng.standard_normal(n)
    correlation = np.eye(4)
    correlation[0, 3] = correlation[3, 0] = 0.8
    confounded = C.association_links(units, ["a", "b", "c"], [1, None, 4], features, modules_in_truth=[1, 2, 3, 4],
                                     module_correlation=correlation)   # int / None labels are accepted too
    assert confounded["n_false_via_correlated_module"] >= 1
    assert any(p["unit"] == "c" and p["feature"] == "diameter_mm" and p["via_correlated_module"]
               for p in confounded["pairs"])
    assert not any(p["unit"] == "b" and p["via_correlated_module"] for p in confounded["pairs"])
    only_module_1 = C.association_links(units, ["a", "b", "c"], [1, None, 4], features, modules_in_truth=[1])
    assert only_module_1["n_true_links"] == 1 and only_module_1["missed"] == []
    # a unit carrying modules 1 and 3 that tracks the diameter recovers 1→diameter, and is not false
    merged = C.association_links(units[:, :1], ["a"], [[3, 1]], features, modules_in_truth=[1, 2, 3, 4])
    assert merged["recovered"] == [[1, "diameter_mm"]] and merged["n_false"] == 0


def _write_truth(path, rows):
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_read_ground_truth_aligns_and_skips_bookkeeping(tmp_path):
    rows = [
        {"patient_id": "P2", "module_class": 1, "module_1": 0.5, "module_2": -1.0, "diameter_mm": 20.0,
         "nodule_slices": "3 4 5", "has_rna": 1, "hu_solid": 30.0},
        {"patient_id": "P1", "module_class": 0, "module_1": -0.5, "module_2": 1.0, "diameter_mm": 12.0,
         "nodule_slices": "7", "has_rna": 1, "hu_solid": 10.0},
    ]
    _write_truth(tmp_path / "ground_truth.csv", rows)
    _write_truth(tmp_path / "ground_truth_genes.csv", [{"gene": "A", "module": 2, "loading": 1.0, "has_na": 0},
                                                      {"gene": "B", "module": -1, "loading": 1.0, "has_na": 0}])
    truth = C.read_ground_truth(tmp_path / "ground_truth.csv", ["P1", "P2", "P3"], ["B", "A", "Z"])
    assert truth.module_class.tolist() == [0, 1, -1]
    assert truth.activations.shape == (3, 2) and truth.activations[1].tolist() == [0.5, -1.0]
    assert np.isnan(truth.activations[2]).all()
    assert set(truth.phenotypes) == {"diameter_mm", "hu_solid"}
    assert truth.num_classes == 2 and truth.num_modules == 2
    assert truth.gene_modules.tolist() == [-1, 2, 0]
    with pytest.raises(C.GroundTruthError, match="names none"):
        C.read_ground_truth(tmp_path / "ground_truth.csv", ["X1"])
    with pytest.raises(C.GroundTruthError, match="not found"):
        C.read_ground_truth(tmp_path / "missing.csv", ["P1"])


def test_read_the_phantoms_own_ground_truth(tmp_path):
    from RadiogenomicGANLib.phantom.writers import write_cohort

    summary = write_cohort(tmp_path, 2, 5, size_ij=40, slices=12, n_genes=60)
    truth = C.read_ground_truth(summary.ground_truth_path, ["R01-001", "R01-002"], ["not-a-gene"])
    assert truth.activations.shape == (2, 4)
    for phenotypes in C.PHENOTYPES_OF_MODULE.values():
        assert set(phenotypes) <= set(truth.phenotypes)
    assert not set(truth.phenotypes) & {"nodule_slices", "has_rna", "pixel_spacing_mm", "ct_series_uid"}
    assert truth.gene_modules is not None


def test_real_nodule_features_follow_the_drawn_radius(tmp_path):
    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=10, genes=8))
    features = C.real_nodule_features(data, range(data.num_patients))
    assert features.shape == (10, len(NODULE_FEATURES))
    # make_synthetic_dataset draws the disc radius from gene 0 and the density from gene 1
    assert spearman(data.genes[:, 0], features[:, NODULE_FEATURES.index("diameter_mm")])[0] > 0.8
    assert spearman(data.genes[:, 1], features[:, NODULE_FEATURES.index("mean_hu")])[0] > 0.8


def test_conventional_pipeline_runs_without_truth(tmp_path):
    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=8, genes=16))
    result = C.conventional_pipeline(data, None)
    assert result["feature_values"].shape == (8, len(NODULE_FEATURES))
    assert result["links"]["n_patients"] == 8
    assert all(m == [] for m in result["metagenes"]["modules"])
