"""The phantom in memory: anatomy truth, acquisition ranges, and a gene→phenotype map that is learnable.

Why: the phantom is the project's ground truth for the paper's claim; if the nodule did not follow the
modules, or the lung truth were wrong, every downstream score would be meaningless.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from RadiogenomicGANLib.phantom import generate_patient
from RadiogenomicGANLib.phantom.genomics import (
    COUNTER_ROWS,
    draw_module_activations,
    gene_model,
    gene_profile,
    prototypes,
)
from RadiogenomicGANLib.phantom.nodule import phenotype_from_modules

SMALL = {"size_ij": 64, "slices": 32, "n_genes": 120}


@pytest.fixture(scope="module")
def patients():
    return [generate_patient(i, 3, **SMALL) for i in range(30)]


def test_fields_and_types(patients) -> None:
    p = patients[0]
    assert p.patient_id == "R01-001" and patients[29].patient_id == "R01-030"
    assert p.volume_hu.dtype == np.int16 and p.volume_hu.shape == (32, 64, 64)
    for mask in (p.lung_mask, p.nodule_mask, p.body_mask):
        assert mask.dtype == bool and mask.shape == p.volume_hu.shape
    assert p.module_activations.shape == (4,)
    assert p.genes_fpkm.shape == (len(p.gene_names),)
    for key in ("diameter_mm", "solid_fraction", "margin_blur_mm", "spiculation", "lobulation"):
        assert key in p.phenotype


def test_acquisition_is_axial_anisotropic_and_body_sized() -> None:
    in_plane, thick = [], []
    for i in range(12):
        p = generate_patient(i, 8, size_ij=32, n_genes=60)
        _origin, spacing, direction = p.geometry.to_lps()
        np.testing.assert_allclose(direction, np.eye(3))
        in_plane.append(spacing[0] * 32 / 512)
        thick.append(spacing[2])
        assert spacing[0] == spacing[1]
        assert 280 <= spacing[0] * 32 <= 440  # a body-sized field of view even on a 32² matrix
    assert min(in_plane) >= 0.56 and max(in_plane) <= 0.85
    assert set(thick) <= {1.0, 1.25, 1.5, 2.0, 2.5} and len(set(thick)) > 1
    fixed = generate_patient(0, 8, size_ij=32, spacing=(10.0, 7.5), slices=20, n_genes=60)
    np.testing.assert_allclose(fixed.geometry.spacing, [10.0, 10.0, 7.5])
    assert fixed.volume_hu.shape == (20, 32, 32)
    fov = generate_patient(0, 8, size_ij=32, fov=350.0, n_genes=60)
    assert fov.geometry.spacing[0] == pytest.approx(350.0 / 32, abs=1e-5)


def test_nodule_inside_one_lung_and_lungs_separate(patients) -> None:
    for p in patients:
        assert p.nodule_mask.any()
        assert not (p.nodule_mask & ~p.lung_mask).any()
        labels, n = ndimage.label(p.lung_mask)
        sizes = np.bincount(labels.ravel())[1:]
        big = np.argsort(sizes)[::-1][:2] + 1
        assert n >= 2 and sizes[big[1] - 1] > 0.3 * sizes[big[0] - 1]
        touching = ndimage.binary_dilation(labels == big[0]) & (labels == big[1])
        assert not touching.any()
        centre = np.round(p.geometry.ras_to_kji(p.nodule_centre_ras)[0]).astype(int)
        assert p.nodule_mask[tuple(centre)]


def test_hu_values_are_chest_like() -> None:
    p = generate_patient(1, 4, size_ij=128, slices=40, n_genes=60)
    hu = p.volume_hu.astype(float)
    lung = p.lung_mask & ~ndimage.binary_dilation(p.nodule_mask, iterations=2)
    assert -900 < np.median(hu[lung]) < -780
    outside = ~p.body_mask & (hu > -1500)
    assert -1050 < np.median(hu[outside]) < -900
    assert (hu >= 400).sum() > 100  # ribs and spine
    assert ((hu > -150) & (hu < -50) & p.body_mask).sum() > 1000  # fat
    solid = p.phenotype["solid_fraction"] > 0.5
    mean_nod = hu[p.nodule_mask].mean()
    assert (mean_nod > -450) if solid else (mean_nod < -300)


def test_phenotype_follows_the_modules(patients) -> None:
    a = np.array([p.module_activations for p in patients])
    ph = {k: np.array([p.phenotype[k] for p in patients]) for k in patients[0].phenotype}
    assert stats.spearmanr(a[:, 0], ph["diameter_mm"])[0] > 0.7
    assert stats.spearmanr(a[:, 0], ph["volume_mm3"])[0] > 0.7  # the image, not only the parameter
    assert stats.spearmanr(a[:, 1], ph["solid_fraction"])[0] > 0.7
    assert stats.spearmanr(a[:, 2], ph["margin_blur_mm"])[0] > 0.7
    assert stats.spearmanr(a[:, 2], ph["spiculation"])[0] > 0.7
    assert stats.spearmanr(a[:, 3], ph["lobulation"])[0] > 0.7
    assert abs(stats.spearmanr(a[:, 3], ph["diameter_mm"])[0]) < 0.6
    assert ph["diameter_mm"].min() >= 10 and ph["diameter_mm"].max() <= 40


def test_classes_are_balanced_clusters_and_modules_uncorrelated(patients) -> None:
    classes = np.array([p.module_class for p in patients])
    assert np.bincount(classes, minlength=4).min() >= 6
    a = np.array([p.module_activations for p in patients])
    structured = np.any(prototypes(4, 4) != 0, axis=0)  # modules 1-3 follow the class, module 4 is free
    assert structured.tolist() == [True, True, True, False]
    s = a[:, structured]
    centroids = np.array([s[classes == c].mean(axis=0) for c in range(4)])
    nearest = np.argmin(((s[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == classes).mean() > 0.9
    rho = stats.spearmanr(a)[0]
    off_diagonal = np.abs(rho[~np.eye(4, dtype=bool)])
    assert off_diagonal.max() < 0.5  # each phenotype is attributable to one module


def _genes_only(seed: int, patients: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2(FPKM+1) (P, G), activations (P, 4)) of the full biology, without drawing any image."""
    model = gene_model()
    activations = np.array([draw_module_activations(i, seed)[1] for i in range(patients)])
    fpkm = np.array([gene_profile(model, activations[i], i, seed) for i in range(patients)])
    return np.log2(fpkm + 1.0), activations


def test_biology_is_one_genome_for_every_seed() -> None:
    assert gene_model().gene_names == gene_model(5172).gene_names  # one constant, whatever the call
    first, second = generate_patient(0, 5, **SMALL), generate_patient(0, 11, **SMALL)
    assert first.gene_names == second.gene_names
    np.testing.assert_array_equal(first.gene_model.module_of_gene, second.gene_model.module_of_gene)
    np.testing.assert_array_equal(first.gene_model.na_probability, second.gene_model.na_probability)
    assert not np.array_equal(first.module_activations, second.module_activations)  # patients differ
    with pytest.raises(ValueError, match="biology 2 is not known"):
        gene_model(biology=2)


def test_module_genes_are_weak_alone_and_strong_together() -> None:
    model = gene_model()
    logs, activations = _genes_only(4, 160)
    for m in range(1, 5):
        genes = np.flatnonzero(model.module_of_gene == m)
        assert 100 <= genes.size <= 300
        r = np.array([abs(stats.pearsonr(logs[:, g], activations[:, m - 1])[0]) for g in genes])
        assert 0.35 < np.median(r) < 0.7  # drawn 0.4–0.7; sampling noise over 160 patients
        signed = logs[:, genes] * np.sign(model.loading[genes])
        assert stats.spearmanr(signed.mean(axis=1), activations[:, m - 1])[0] > 0.9
    silent = sorted(set(model.module_of_gene[model.module_of_gene < 0].tolist()))
    assert 10 <= len(silent) <= 20
    complete = model.na_probability == 0
    independent = complete & (model.module_of_gene == 0)
    assert independent.sum() > 0.4 * model.n_genes
    zero_share = (logs[:, independent] == 0).mean(axis=0)
    assert 0.2 < (zero_share > 0.5).mean() < 0.45  # a realistic share of mostly-zero (low-expression) genes
    near_constant = (logs[:, independent].std(axis=0) < 0.1).sum()
    assert near_constant > 50  # the trap a z-score without a filter falls into


def test_gene_vector_format() -> None:
    model = gene_model(300, 50)
    assert len(model.gene_names) == 300 + 50 + len(COUNTER_ROWS)
    assert len(set(model.gene_names)) == len(model.gene_names)
    assert model.gene_names[-len(COUNTER_ROWS) :] == COUNTER_ROWS
    assert ((model.na_probability > 0).sum()) == 50 + len(COUNTER_ROWS)
    assert (model.na_probability[model.module_of_gene > 0] == 0).all()
    p = generate_patient(0, 2, size_ij=32, slices=8, n_genes=300, n_na_genes=50)
    finite = p.genes_fpkm[np.isfinite(p.genes_fpkm)]
    assert (finite >= 0).all() and (finite == 0).any()
    assert np.isnan(p.genes_fpkm[model.na_probability == 0]).sum() == 0


def test_deterministic_and_independent_of_image_size() -> None:
    a = generate_patient(4, 9, size_ij=48, slices=16, n_genes=80)
    b = generate_patient(4, 9, size_ij=48, slices=16, n_genes=80)
    np.testing.assert_array_equal(a.volume_hu, b.volume_hu)
    np.testing.assert_array_equal(a.nodule_mask, b.nodule_mask)
    np.testing.assert_array_equal(a.genes_fpkm, b.genes_fpkm)
    c = generate_patient(4, 9, size_ij=64, slices=20, n_genes=80)
    np.testing.assert_array_equal(a.module_activations, c.module_activations)
    assert a.phenotype["solid_fraction"] == c.phenotype["solid_fraction"]
    np.testing.assert_array_equal(a.genes_fpkm, c.genes_fpkm)
    other = generate_patient(4, 10, size_ij=48, slices=16, n_genes=80)
    assert not np.array_equal(a.module_activations, other.module_activations)


def test_phenotype_map_is_monotone_in_each_module() -> None:
    rng_values = []
    for level in (-1.5, 0.0, 1.5):
        ph = phenotype_from_modules(np.full(4, level), np.random.default_rng(0))
        rng_values.append(ph)
    for key in ("diameter_mm", "solid_fraction", "margin_blur_mm", "spiculation", "lobulation"):
        assert rng_values[0][key] < rng_values[1][key] < rng_values[2][key]
    cls, act = draw_module_activations(0, 0)
    assert 0 <= cls < 4 and act.shape == (4,)
