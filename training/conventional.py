"""The conventional three-step radiogenomic pipeline the paper argues against, and the truth to score it by.

Steps (paper §1): (1) metagenes by co-expression clustering, (2) hand-crafted image features of the real
nodules, (3) pairwise correlation with a multiple-testing correction. Here:

1. Hierarchical clustering (average linkage) of the genes on the correlation distance 1 − r computed over
   the TRAINING patients; the tree is cut at `max_distance` (0.8: mean within-cluster r ≥ 0.2, as single genes of a
   module correlate only ≈ 0.2–0.5 with each other), clusters of
   at least `min_genes` genes are kept (the largest `max_metagenes`), and a metagene is the mean z-score of
   its genes. Signed distance on purpose: anti-correlated genes of one module would cancel in a mean, so a
   module whose genes load with both signs yields two (anti-correlated) metagenes.
2. Per patient, from its nodule slices of the dataset: equivalent diameter of the largest slice, mean and
   standard deviation of HU, edge-height-normalised margin sharpness and compactness (area-weighted means
   over slices; `training.metrics.patient_nodule_features`).
3. Spearman ρ for every (gene unit, feature) pair, Benjamini–Hochberg over all pairs, q < α.

Scoring against the phantom truth. The phantom's documented map (RadiogenomicGANLib/phantom/nodule.py):
module 1 → diameter, 2 → solid fraction (density), 3 → margin blur and spiculation, 4 → lobulation; modules
beyond the fourth drive genes only. A feature measures a phenotype (size → diameter, mean and spread of HU →
solid fraction, margin sharpness → margin blur, compactness → spiculation and lobulation), so the TRUE links
are the (module, feature) pairs in `TRUE_LINKS`. Metagenes carry no module name: each is labelled post hoc
with the true modules of its genes (`ground_truth_genes.csv`: each module holding ≥ 25 % of the genes, module
genes ≥ 50 % in all — a metagene may carry two modules, since the phantom's class prototypes correlate
modules 1 and 3, ρ ≈ −0.76, and co-expression clustering merges their genes), or, without that file, with
the one module whose activation it correlates with best across patients (|ρ| ≥ 0.5; less reliable for the
same reason). Either way an evaluation step that uses the truth, never something the pipeline itself could
do. A significant pair counts as a recovered true link when one of its unit's modules drives the feature
((module, feature) in `TRUE_LINKS`), otherwise as a false (off-target) link; an unlabelled unit's links are
all false. Caveat stated in the report: the
features are proxies, so physics can create real but undocumented links (e.g. a blurrier margin widens the
HU spread); they count as false here because the documented map is the only truth there is.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from RadiogenomicGANLib.intensity import unit_to_hu

from .metrics import NODULE_FEATURES, benjamini_hochberg, patient_nodule_features, spearman

# module (1-based) → phenotype columns of ground_truth.csv it drives (phantom/nodule.py docstring)
PHENOTYPES_OF_MODULE: dict[int, tuple[str, ...]] = {
    1: ("diameter_mm",),
    2: ("solid_fraction",),
    3: ("margin_blur_mm", "spiculation"),
    4: ("lobulation",),
}
# hand-crafted feature → the phenotype(s) it measures
PHENOTYPES_OF_FEATURE: dict[str, tuple[str, ...]] = {
    "diameter_mm": ("diameter_mm",),
    "mean_hu": ("solid_fraction",),
    "std_hu": ("solid_fraction",),
    "margin_sharpness": ("margin_blur_mm",),
    "compactness": ("spiculation", "lobulation"),
}
TRUE_LINKS: frozenset[tuple[int, str]] = frozenset(
    (module, feature)
    for module, phenotypes in PHENOTYPES_OF_MODULE.items()
    for feature, measured in PHENOTYPES_OF_FEATURE.items()
    if set(phenotypes) & set(measured)
)

_ID_COLUMNS = ("patient_id", "PatientID", "subject_id", "sample_id", "patient")
_CLASS_COLUMNS = ("module_class", "class", "cluster")
_ACTIVATION = re.compile(r"^(?:module|activation|module_activation)_?(\d+)(?:_activation)?$", re.IGNORECASE)
# bookkeeping columns of the phantom's ground_truth.csv that are not nodule phenotypes
_NOT_PHENOTYPES = frozenset((
    "nodule_centre_r", "nodule_centre_a", "nodule_centre_s", "nodule_voxels", "nodule_slices", "has_rna",
    "has_seg", "seg_variant", "decoy_series", "ct_series_uid", "size_ij", "n_slices", "pixel_spacing_mm",
    "slice_spacing_mm", "noise_sd_hu", "padding_hu", "lung_side",
))
# phenotypes the phantom draws independently of the genes: a representation should NOT predict them
NUISANCE_PHENOTYPES = frozenset(("hu_solid", "hu_ggo", "elongation"))


class GroundTruthError(ValueError):
    """A ground-truth CSV that cannot be read or matched to the dataset's patients."""


@dataclass
class GroundTruth:
    """Per-patient truth aligned to a dataset's patients (rows = dataset patient indices)."""

    patient_ids: list[str]
    module_class: np.ndarray                    # (P,) int, -1 where unknown
    activations: np.ndarray | None              # (P, K) module activations, NaN where unknown
    phenotypes: dict[str, np.ndarray] = field(default_factory=dict)   # name → (P,) float, NaN where unknown
    known: np.ndarray | None = None             # (P,) bool, the patients the CSV names
    gene_modules: np.ndarray | None = None      # (G,) module of each dataset gene (0 none, < 0 nuisance)

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.module_class[self.module_class >= 0]).size)

    @property
    def num_modules(self) -> int:
        return 0 if self.activations is None else int(self.activations.shape[1])


def read_ground_truth(path: str | Path, patient_ids: Sequence[str],
                      gene_names: Sequence[str] | None = None) -> GroundTruth:
    """Read a per-patient truth CSV (the phantom's ground_truth.csv) and align it to `patient_ids`.

    Columns: a patient id (`patient_id`), `module_class`, module activations (`module_1`…, `activation_1`…
    or `module1_activation`…), and any other numeric column as a phenotype (the phantom's bookkeeping
    columns excepted). Patients missing from the CSV get NaN / class -1; a CSV naming none of the dataset's
    patients is an error. A `ground_truth_genes.csv` (gene, module) beside it, as the phantom writes, gives
    each of `gene_names` its true module (used to label metagenes by membership).
    """
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground-truth CSV not found: {path}")
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise GroundTruthError(f"{path} holds no rows")
    columns = list(rows[0].keys())
    id_column = next((c for c in _ID_COLUMNS if c in columns), None)
    if id_column is None:
        raise GroundTruthError(f"{path} has no patient id column (one of {', '.join(_ID_COLUMNS)}); has {columns}")
    class_column = next((c for c in _CLASS_COLUMNS if c in columns), None)
    if class_column is None:
        raise GroundTruthError(f"{path} has no module class column (one of {', '.join(_CLASS_COLUMNS)})")
    activation_columns = sorted(
        ((int(m.group(1)), c) for c in columns if (m := _ACTIVATION.match(c)) is not None), key=lambda t: t[0]
    )
    by_id = {row[id_column].strip(): row for row in rows}
    ids = [str(p) for p in patient_ids]
    known = np.array([p in by_id for p in ids])
    if not known.any():
        raise GroundTruthError(
            f"{path} names none of the dataset's patients (CSV e.g. {list(by_id)[:3]}, dataset e.g. {ids[:3]})"
        )

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else float("nan")
        except ValueError:
            return float("nan")

    classes = np.array([int(number(by_id[p][class_column])) if p in by_id else -1 for p in ids], dtype=np.int64)
    activations = None
    if activation_columns:
        activations = np.array(
            [[number(by_id[p][c]) if p in by_id else np.nan for _, c in activation_columns] for p in ids]
        )
    skip = {id_column, class_column} | {c for _, c in activation_columns} | _NOT_PHENOTYPES
    phenotypes: dict[str, np.ndarray] = {}
    for column in columns:
        if column in skip:
            continue
        values = np.array([number(by_id[p].get(column)) if p in by_id else np.nan for p in ids])
        if np.isfinite(values).any():
            phenotypes[column] = values
    gene_modules = None
    genes_path = path.with_name("ground_truth_genes.csv")
    if gene_names is not None and genes_path.is_file():
        gene_modules = read_gene_modules(genes_path, gene_names)
    return GroundTruth(ids, classes, activations, phenotypes, known, gene_modules)


def read_gene_modules(path: str | Path, gene_names: Sequence[str]) -> np.ndarray | None:
    """(G,) true module of each gene of `gene_names` from a (gene, module) CSV; 0 for genes it lacks.
    None when the file has no such columns."""
    with Path(path).open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or "gene" not in rows[0] or "module" not in rows[0]:
        return None
    table = {row["gene"]: int(float(row["module"] or 0)) for row in rows}
    return np.array([table.get(str(name), 0) for name in gene_names], dtype=np.int64)


# ============================================================================================================
# Step 1: co-expression metagenes


@dataclass
class Metagenes:
    """Gene clusters (indices into the gene axis) found on the training patients."""

    clusters: list[np.ndarray]
    max_distance: float
    min_genes: int

    def scores(self, genes: np.ndarray) -> np.ndarray:
        """(P, M) metagene values: mean z-score of each cluster's genes."""
        genes = np.asarray(genes, dtype=np.float64)
        if not self.clusters:
            return np.zeros((genes.shape[0], 0))
        return np.stack([genes[:, idx].mean(axis=1) for idx in self.clusters], axis=1)


def co_expression_metagenes(train_genes: np.ndarray, max_distance: float = 0.8, min_genes: int = 5,
                            max_metagenes: int = 40) -> Metagenes:
    """Average-linkage clustering of the genes on 1 − Pearson r over the training patients (module doc)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    x = np.asarray(train_genes, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"co-expression needs (patients ≥ 3, genes), got {x.shape}")
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    variable = np.flatnonzero(norms > 1e-12)
    if variable.size < 2:
        return Metagenes([], max_distance, min_genes)
    unit = (centred[:, variable] / norms[variable]).astype(np.float32)
    corr = unit.T @ unit                                  # (G', G') Pearson r, float32 to bound memory
    np.clip(corr, -1.0, 1.0, out=corr)
    distance = 1.0 - corr
    del corr
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False).astype(np.float64)
    del distance
    tree = linkage(condensed, method="average")
    labels = fcluster(tree, t=max_distance, criterion="distance")
    clusters = [variable[labels == c] for c in np.unique(labels)]
    clusters = [c for c in clusters if c.size >= min_genes]
    clusters.sort(key=lambda c: (-c.size, int(c[0])))
    return Metagenes(clusters[:max_metagenes], max_distance, min_genes)


def label_by_membership(clusters: Sequence[np.ndarray], gene_modules: np.ndarray, min_share: float = 0.5,
                        min_each: float = 0.25) -> list[list[int]]:
    """Post-hoc module labels (1-based) of every gene cluster: the true modules that each hold at least
    `min_each` of its genes, provided module genes hold at least `min_share` of it; [] otherwise (nuisance-
    driven or noise clusters). Several labels are normal: genes of correlated modules are co-expressed, so
    co-expression clustering merges them (the phantom's modules 1 and 3, ρ ≈ −0.76, share clusters)."""
    labels: list[list[int]] = []
    for cluster in clusters:
        modules = gene_modules[np.asarray(cluster)]
        if np.mean(modules > 0) < min_share:
            labels.append([])
            continue
        values, counts = np.unique(modules[modules > 0], return_counts=True)
        labels.append([int(v) for v, c in zip(values, counts) if c >= min_each * modules.size])
    return labels


def label_units(unit_values: np.ndarray, activations: np.ndarray, min_abs_rho: float = 0.5) -> list[list[int]]:
    """Post-hoc module label (1-based) of every gene unit: [the true module whose activation it correlates
    with best across patients] if |Spearman ρ| ≥ `min_abs_rho`, else []."""
    labels: list[list[int]] = []
    for u in range(unit_values.shape[1]):
        rhos = [abs(spearman(unit_values[:, u], activations[:, k])[0]) for k in range(activations.shape[1])]
        rhos = [r if np.isfinite(r) else 0.0 for r in rhos]
        best = int(np.argmax(rhos)) if rhos else 0
        labels.append([best + 1] if rhos and rhos[best] >= min_abs_rho else [])
    return labels


def _as_modules(label: int | Sequence[int] | None) -> tuple[int, ...]:
    if label is None:
        return ()
    if isinstance(label, (int, np.integer)):
        return (int(label),)
    return tuple(int(m) for m in label)


# ============================================================================================================
# Step 2: hand-crafted features of the real nodules


def real_nodule_features(data, patients: Sequence[int],  # data: RadiogenomicDataset
                         names: Sequence[str] = NODULE_FEATURES) -> np.ndarray:
    """(P, F) features (`names`, of `metrics.nodule_features`) of each patient's real nodule slices; NaN
    for a patient without slices."""
    window = tuple(float(v) for v in data.hu_window)
    rows = []
    for p in patients:
        idx = np.flatnonzero(data.nodule_patient == p)
        if idx.size == 0:
            rows.append([np.nan] * len(names))
            continue
        hu = unit_to_hu(data.nodule_images[idx], window)
        features = patient_nodule_features(hu, data.nodule_masks[idx] > 0, float(data.patch_spacing_mm))
        rows.append([features[name] for name in names])
    return np.asarray(rows, dtype=np.float64)


# ============================================================================================================
# Step 3: correlation with BH correction, scored against the truth


def association_links(unit_values: np.ndarray, unit_names: Sequence[str],
                      unit_modules: Sequence[int | Sequence[int] | None],
                      features: np.ndarray, feature_names: Sequence[str] = NODULE_FEATURES,
                      alpha: float = 0.05, true_links: frozenset[tuple[int, str]] = TRUE_LINKS,
                      modules_in_truth: Sequence[int] | None = None,
                      module_correlation: np.ndarray | None = None, correlated_at: float = 0.5) -> dict:
    """Spearman ρ of every (unit, feature) pair across patients, BH q-values over all pairs, and the
    significant pairs scored against `true_links` (see the module docstring). A unit carries zero, one or
    several module labels; a pair is true when one of its modules drives the feature (and credits each such
    (module, feature) link).

    `modules_in_truth` limits the true links that could be recovered to the modules the truth has (all of
    `true_links` when None). `module_correlation` (K×K, e.g. Spearman of the true activations) lets the
    false links be split: `n_false_via_correlated_module` counts those whose module correlates
    (|ρ| ≥ `correlated_at`) with a module that does drive the feature — a correlational method cannot tell
    those apart from driven links, whatever its gene side. Returns a JSON-ready dict: `pairs` (unit, module,
    feature, rho, p, q, significant, true), `recovered` (sorted true links found), `missed`,
    `n_true_links`, `n_recovered`, `n_significant`, `n_false` (significant pairs that are not true links),
    `n_false_via_correlated_module`, `alpha`, `n_patients`.
    """
    unit_values = np.asarray(unit_values, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    pairs = []
    for u, name in enumerate(unit_names):
        for f, feature in enumerate(feature_names):
            rho, p, n = spearman(unit_values[:, u], features[:, f])
            pairs.append({"unit": str(name), "modules": list(_as_modules(unit_modules[u])), "feature": feature,
                          "rho": rho, "p": p, "n": n})
    q = benjamini_hochberg([pair["p"] for pair in pairs])
    for pair, qv in zip(pairs, q):
        pair["q"] = float(qv)
        pair["significant"] = bool(np.isfinite(qv) and qv < alpha)
        pair["true"] = any((m, pair["feature"]) in true_links for m in pair["modules"])
    candidates = true_links if modules_in_truth is None else {
        link for link in true_links if link[0] in set(modules_in_truth)
    }
    candidates = {link for link in candidates if link[1] in set(feature_names)}
    k = 0 if module_correlation is None else module_correlation.shape[0]
    for pair in pairs:
        pair["via_correlated_module"] = False
        if pair["significant"] and not pair["true"] and k:
            drivers = [m for m, f in true_links if f == pair["feature"]]
            pair["via_correlated_module"] = any(
                0 < a <= k and 0 < b <= k and abs(module_correlation[a - 1, b - 1]) >= correlated_at
                for a in pair["modules"] for b in drivers)
    recovered = sorted({(m, pair["feature"]) for pair in pairs if pair["significant"] and pair["true"]
                        for m in pair["modules"] if (m, pair["feature"]) in true_links})
    return {
        "pairs": pairs,
        "recovered": [list(link) for link in recovered],
        "missed": [list(link) for link in sorted(candidates - set(recovered))],
        "n_true_links": len(candidates),
        "n_recovered": len(recovered),
        "n_significant": int(sum(pair["significant"] for pair in pairs)),
        "n_false": int(sum(pair["significant"] and not pair["true"] for pair in pairs)),
        "n_false_via_correlated_module": int(sum(pair["via_correlated_module"] for pair in pairs)),
        "alpha": alpha,
        "n_patients": int(unit_values.shape[0]),
    }


def metagene_units(data, truth: GroundTruth | None, patients: Sequence[int], max_distance: float = 0.8,
                   min_genes: int = 5) -> dict:
    """Step 1 on the dataset: metagenes from the training patients, their values for `patients`, and their
    post-hoc module labels when the truth has activations. JSON-ready except `values` (P, M)."""
    train = data.patients_in("train")
    metagenes = co_expression_metagenes(data.genes[train], max_distance=max_distance, min_genes=min_genes)
    values = metagenes.scores(data.genes[np.asarray(patients)])
    labels: list[list[int]] = [[] for _ in range(values.shape[1])]
    labelled_by = "none (no truth)"
    if truth is not None and truth.gene_modules is not None and values.shape[1]:
        labels = label_by_membership(metagenes.clusters, truth.gene_modules)
        labelled_by = ("the true modules of the cluster's genes (ground_truth_genes.csv): each holding ≥ 25 %, "
                       "module genes ≥ 50 % in all")
    elif truth is not None and truth.activations is not None and values.shape[1]:
        labels = label_units(values, truth.activations[np.asarray(patients)])
        labelled_by = "best |Spearman ρ| with the true module activations, ≥ 0.5"
    return {
        "values": values,
        "names": [f"MG{i + 1}" for i in range(values.shape[1])],
        "sizes": [int(c.size) for c in metagenes.clusters],
        "modules": labels,
        "labelled_by": labelled_by,
        "max_distance": max_distance,
        "min_genes": min_genes,
    }


def module_correlation(truth: GroundTruth | None, patients: Sequence[int]) -> np.ndarray | None:
    """Spearman correlation (K×K) of the true module activations over `patients` (None without them)."""
    if truth is None or truth.activations is None or truth.num_modules == 0:
        return None
    from scipy.stats import spearmanr

    values = truth.activations[np.asarray(patients)]
    values = values[np.isfinite(values).all(axis=1)]
    if values.shape[0] < 3:
        return None
    if truth.num_modules == 1:
        return np.ones((1, 1))
    return np.atleast_2d(spearmanr(values).statistic)


def conventional_pipeline(data, truth: GroundTruth | None, patients: Sequence[int] | None = None,
                          alpha: float = 0.05) -> dict:
    """All three steps on `patients` (default: every patient with nodule slices); links scored when the
    truth is given. Returns a JSON-ready dict (metagene sizes and labels, features, link counts)."""
    if patients is None:
        patients = np.unique(data.nodule_patient)
    patients = np.asarray(patients)
    units = metagene_units(data, truth, patients)
    features = real_nodule_features(data, patients)
    modules_in_truth = range(1, (truth.num_modules if truth is not None else 0) + 1)
    links = association_links(units["values"], units["names"], units["modules"], features, NODULE_FEATURES,
                              alpha=alpha, modules_in_truth=list(modules_in_truth) if truth else None,
                              module_correlation=module_correlation(truth, patients))
    return {
        "metagenes": {k: v for k, v in units.items() if k != "values"},
        "n_metagenes": len(units["names"]),
        "features": NODULE_FEATURES,
        "links": links,
        "units": units,
        "feature_values": features,
        "patients": patients,
    }
