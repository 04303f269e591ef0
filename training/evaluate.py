"""Evaluate trained generators: the paper's Table 1, Fig. 3 and Fig. 4, and the radiogenomic map scored
against a known truth (the phantom's), with the conventional three-step pipeline as a comparator.

    python -m training.evaluate --data FILE --weights PROPOSED [--baseline W] [--inpainting W]
        [--ground-truth CSV] --out DIR [--seed S] [--device auto]

writes DIR/report.md (tables, targets reached or not, links to the figures), DIR/metrics.json (every number)
and DIR/*.png. Image synthesis is evaluated on the TEST split only (its backgrounds, nodules and genes); the
radiogenomic map (Fig. 4, clustering and regression scores) uses every patient's genes, as the paper's Fig. 4
does — the scores are also given on the test patients alone. Everything random is drawn from `--seed`.

Protocol, per section (the report repeats it next to the numbers):

- Table 1. Images in [0, 1] (the network's [-1, 1], i.e. the HU window [-1000, 500], mapped linearly);
  data_range 1 for PSNR and SSIM (Gaussian 11×11 window, σ 1.5, K1 0.01, K2 0.03, Wang et al.). *Paper
  variant*: proposed and baseline — generator input = a test background patch + the genes of a random test
  patient + noise; synthetic vs that background over the whole patch. Inpainting — input = a real test
  nodule slice with a disc of 1.5× the nodule's equivalent radius erased (`hole_from_mask`); synthetic vs the
  real slice inside that disc. *Background variant* (fairer: it asks only "was the background kept?"): the
  same images, over the pixels outside the dilated union of the generated mask and any nodule the reference
  holds (none for a background patch; the real nodule for inpainting). Per-image scores, then the mean.
- Fig. 3: seven test donors (round-robin over the true classes when the truth is given); rows = donor's
  real nodule slice (largest area), background, inpainting (disc of 1.5× the donor's radius erased from the
  background at the donor's nodule position), baseline, proposed; the same noise per column for both models.
- Fig. 4: t-SNE of raw genes, baseline code φ(g) and proposed code φ(g) for all patients; colours =
  k-means clusters of the proposed code (k = number of true classes, else 3 as in the paper) and the true
  class; example nodule images (largest slice) of each cluster.
- Scores against the truth: k-means (k = true classes) on each representation → ARI and NMI against the
  true classes; out-of-fold R² of ridge regression from each representation to each phenotype (5-fold, or
  leave-one-out below 20 patients).
- Gene control: a few fixed test backgrounds with one fixed noise each; every patient's genes swapped in;
  the generated nodule (largest component of mask > 0.5) measured (equivalent diameter in mm at the patch
  spacing, mean HU, edge-height-normalised margin sharpness); median over the backgrounds per donor; Spearman ρ
  with the donor's true diameter, solid fraction and margin blur (sharpness is expected to fall with blur:
  the *aligned* ρ flips that sign). Targets use the test donors (all donors when fewer than 8).
- Realism: classifier two-sample test (`metrics.classifier_two_sample_test`) of real test nodule patches
  against the Table-1 synthetic patches; held-out accuracy, 0.5 ideal.
- Diversity: for fixed (background, genes) pairs, mean pairwise L1 over several noises, whole patch and
  inside the union of the generated masks; 0 = the noise is ignored (mode collapse).
- Links: `training.conventional` (metagenes × hand-crafted features of the real nodules, Spearman, BH)
  against the same metagenes × the same features measured on each model's gene-controlled nodules (the
  model replaces image-feature extraction from confounded real scans by synthesis from genes alone), and
  the same with the true module activations as gene side (step 1 perfect).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from RadiogenomicGANLib.cli_common import check_output_folder, require_optional, run_cli
from RadiogenomicGANLib.devices import DeviceError, resolve_device
from RadiogenomicGANLib.intensity import unit_to_hu
from RadiogenomicGANLib.networks import hole_from_mask

from . import figures
from .conventional import (
    NUISANCE_PHENOTYPES,
    TRUE_LINKS,
    GroundTruth,
    GroundTruthError,
    association_links,
    conventional_pipeline,
    module_correlation,
    read_ground_truth,
)
from .dataset import DatasetError, RadiogenomicDataset, load_dataset
from .metrics import (
    NODULE_FEATURES,
    adjusted_rand,
    classifier_two_sample_test,
    cross_validated_r2,
    dilate,
    image_scores,
    kmeans_labels,
    largest_component,
    mean_pairwise_l1,
    nodule_features,
    normalized_mutual_info,
    spearman,
    to_unit_range,
)

MODEL_ROLES: dict[str, str] = {"inpainting": "inpainting", "baseline": "mcgan", "proposed": "proposed"}
ROLE_TITLES: dict[str, str] = {"inpainting": "In-painting", "baseline": "Baseline (MC-GAN)", "proposed": "Proposed"}
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "inpainting": {"mse": 0.0121, "ssim": 0.76, "psnr": 20.94},
    "baseline": {"mse": 0.0065, "ssim": 0.74, "psnr": 22.05},
    "proposed": {"mse": 0.0044, "ssim": 0.88, "psnr": 24.52},
}
# gene-control measure of the generated nodule ↔ the donor's true phenotype, expected sign of ρ, target?
GENE_CONTROL: tuple[tuple[str, str, str, int, bool], ...] = (
    ("size", "diameter_mm", "diameter_mm", +1, True),
    ("density", "mean_hu", "solid_fraction", +1, True),
    ("margin", "margin_sharpness", "margin_blur_mm", -1, True),
    # the literal "mean gradient magnitude on the boundary": reported, not a target, as it mostly measures
    # density (a faint ground-glass edge has a small gradient however sharp it is)
    ("margin, raw gradient", "margin_gradient", "margin_blur_mm", -1, False),
)
CONTROL_FEATURES: tuple[str, ...] = (*NODULE_FEATURES, "margin_gradient")   # NODULE_FEATURES first
TARGETS = {"ssim": 0.88, "psnr": 24.5, "ari_proposed": 0.8, "ari_raw_max": 0.3, "gene_control_rho": 0.8,
           "c2st_max": 0.65}
MIN_TEST_DONORS = 8
FIG3_DONORS = 7


class EvaluationError(ValueError):
    """Inputs the evaluation cannot use (mismatched weights and dataset, empty test split, …)."""


# ============================================================================================================
# Loading


@dataclass
class Model:
    """One loaded generator and the dataset's genes prepared for it (None for inpainting)."""

    role: str                       # "proposed" | "baseline" | "inpainting"
    generator: torch.nn.Module
    metadata: Any                   # RadiogenomicGANLib.weights.WeightsMetadata
    genes: np.ndarray | None        # (P, G_model) z-scored as the model expects
    path: str

    @property
    def noise_dim(self) -> int:
        return int(self.generator.config.noise_dim)


def model_genes(data: RadiogenomicDataset, metadata: Any) -> np.ndarray:
    """The dataset's gene matrix in the model's gene order and normalisation.

    Same names and statistics (a model trained on this dataset): the matrix itself. Otherwise genes are
    aligned by name and re-standardised with the model's means/stds (undoing the dataset's z-score first);
    a model gene missing from the dataset is an error that says how many.
    """
    names = [str(n) for n in metadata.gene_names]
    data_names = [str(n) for n in data.gene_names]
    means = np.asarray(metadata.gene_means, dtype=np.float64)
    stds = np.asarray(metadata.gene_stds, dtype=np.float64)
    if names == data_names and np.allclose(means, data.gene_means, atol=1e-5) and np.allclose(
        stds, data.gene_stds, atol=1e-5
    ):
        return data.genes
    position = {name: i for i, name in enumerate(data_names)}
    missing = [n for n in names if n not in position]
    if missing:
        raise EvaluationError(
            f"{len(missing)} of the model's {len(names)} genes are not in the dataset (e.g. {missing[:3]}); "
            "evaluate with the dataset the model was trained on"
        )
    index = np.array([position[n] for n in names])
    raw = data.genes[:, index].astype(np.float64) * data.gene_stds[index] + data.gene_means[index]
    return ((raw - means) / np.maximum(stds, 1e-12)).astype(np.float32)


def load_model(role: str, path: str | Path, data: RadiogenomicDataset, device: torch.device) -> Model:
    """Load weights for a role, checking kind, patch size and genes against the dataset."""
    from RadiogenomicGANLib.weights import load_weights

    kind = MODEL_ROLES[role]
    try:
        generator, metadata = load_weights(path, expected_kind=kind)
    except ValueError as error:
        raise EvaluationError(f"--{'weights' if role == 'proposed' else role} {path}: {error}") from error
    if int(generator.config.patch_size) != data.patch_size:
        raise EvaluationError(
            f"{role} weights {path} are for {generator.config.patch_size}px patches, the dataset has "
            f"{data.patch_size}px"
        )
    if abs(float(metadata.patch_spacing_mm) - data.patch_spacing_mm) > 1e-4:
        print(f"warning: {role} weights were trained at {metadata.patch_spacing_mm} mm/px, the dataset has "
              f"{data.patch_spacing_mm} mm/px", file=sys.stderr)
    window = tuple(float(v) for v in data.hu_window)
    if tuple(float(v) for v in metadata.hu_window) != window:
        print(f"warning: {role} weights use the HU window {tuple(metadata.hu_window)}, the dataset {window}; "
              "measurements use the dataset's", file=sys.stderr)
    genes = None if kind == "inpainting" else model_genes(data, metadata)
    return Model(role, generator.to(device).eval(), metadata, genes, str(path))


# ============================================================================================================
# Generation


def seeded_noise(n: int, dim: int, seed: int, tag: int) -> np.ndarray:
    """Standard normal noise (n, dim) from (seed, tag): the same draw for every model of one noise_dim."""
    return np.random.default_rng([int(seed), 0x501E, int(tag)]).standard_normal((n, dim)).astype(np.float32)


@torch.no_grad()
def generate(model: Model, backgrounds: np.ndarray, genes: np.ndarray | None = None,
             noise: np.ndarray | None = None, holes: np.ndarray | None = None, device: torch.device | None = None,
             batch_size: int = 64, desc: str = "", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run a generator over (n,S,S) inputs in batches → (images (n,S,S) in [-1,1], masks (n,S,S) in [0,1])."""
    device = device or torch.device("cpu")
    n = backgrounds.shape[0]
    images, masks = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc or model.role, disable=not progress or n <= batch_size,
                      leave=False, file=sys.stderr):
        stop = min(n, start + batch_size)
        bg = torch.from_numpy(np.ascontiguousarray(backgrounds[start:stop, None], dtype=np.float32)).to(device)
        g = None if genes is None else torch.from_numpy(np.ascontiguousarray(genes[start:stop], dtype=np.float32))
        z = None if noise is None else torch.from_numpy(np.ascontiguousarray(noise[start:stop], dtype=np.float32))
        h = None if holes is None else torch.from_numpy(np.ascontiguousarray(holes[start:stop, None], dtype=np.float32))
        out = model.generator(bg, None if g is None else g.to(device), None if z is None else z.to(device),
                              None if h is None else h.to(device))
        images.append(out.image[:, 0].float().cpu().numpy())
        masks.append(out.mask[:, 0].float().cpu().numpy())
    return np.concatenate(images), np.concatenate(masks)


def holes_for(masks: np.ndarray, scale: float = 1.5) -> np.ndarray:
    """The inpainting hole of every mask: a disc of `scale` × its equivalent radius at its centroid."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks[:, None], dtype=np.float32))
    return hole_from_mask(tensor, scale=scale)[:, 0].numpy()


def encode(model: Model, batch_size: int = 256) -> np.ndarray:
    """φ(g) of every patient (P, code_dim)."""
    device = next(model.generator.parameters()).device
    codes = []
    with torch.no_grad():
        for start in range(0, model.genes.shape[0], batch_size):
            g = torch.from_numpy(np.ascontiguousarray(model.genes[start : start + batch_size])).to(device)
            codes.append(model.generator.encode_genes(g).float().cpu().numpy())
    return np.concatenate(codes)


def generated_features(images: np.ndarray, masks: np.ndarray, spacing_mm: float,
                       window: tuple[float, float]) -> list[dict[str, float]]:
    """Nodule features of every generated image: the largest component of mask > 0.5, HU from the window."""
    hu = unit_to_hu(images, window)
    return [nodule_features(h, largest_component(m > 0.5), spacing_mm) for h, m in zip(hu, masks)]


# ============================================================================================================
# Sections


@dataclass
class Context:
    data: RadiogenomicDataset
    models: dict[str, Model]
    truth: GroundTruth | None
    device: torch.device
    seed: int
    out: Path
    batch_size: int = 64
    max_samples: int = 256
    dilation_px: int = 3
    progress: bool = True

    @property
    def window(self) -> tuple[float, float]:
        return float(self.data.hu_window[0]), float(self.data.hu_window[1])

    def rng(self, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0xE7A1, tag])

    def largest_slice(self, patient: int) -> int | None:
        """Index of the patient's nodule slice with the largest mask area (its 'training image')."""
        idx = np.flatnonzero(self.data.nodule_patient == patient)
        if idx.size == 0:
            return None
        return int(idx[np.argmax(self.data.nodule_masks[idx].reshape(idx.size, -1).sum(axis=1))])


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    ok = array[np.isfinite(array)]
    if ok.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(ok.mean()), "std": float(ok.std()), "n": int(ok.size)}


def table1(ctx: Context) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Table 1 in both variants; also returns the synthetic test images for the realism test."""
    data = ctx.data
    test_patients = data.patients_in("test")
    backgrounds = data.background_indices("test")
    nodules = data.nodule_indices("test")
    rng = ctx.rng(1)
    n_bg = min(backgrounds.size, ctx.max_samples)
    chosen_bg = backgrounds[rng.permutation(backgrounds.size)[:n_bg]]
    donors = rng.choice(test_patients, size=n_bg)
    n_nod = min(nodules.size, ctx.max_samples)
    chosen_nod = nodules[rng.permutation(nodules.size)[:n_nod]]
    results: dict[str, Any] = {}
    synthetic: dict[str, dict[str, np.ndarray]] = {}
    for role, model in ctx.models.items():
        if role == "inpainting":
            reference = data.nodule_images[chosen_nod]
            nodule_masks = data.nodule_masks[chosen_nod] > 0
            holes = holes_for(nodule_masks.astype(np.float32))
            images, masks = generate(model, reference, holes=holes, device=ctx.device, batch_size=ctx.batch_size,
                                     desc="Table 1 inpainting", progress=ctx.progress)
            paper_regions = holes > 0.5
        else:
            reference = data.background_images[chosen_bg]
            nodule_masks = np.zeros(reference.shape, dtype=bool)
            noise = seeded_noise(n_bg, model.noise_dim, ctx.seed, 1)
            images, masks = generate(model, reference, model.genes[donors], noise, device=ctx.device,
                                     batch_size=ctx.batch_size, desc=f"Table 1 {role}", progress=ctx.progress)
            paper_regions = [None] * n_bg
        paper, background = [], []
        fractions = []
        for i in tqdm(range(images.shape[0]), desc=f"Table 1 {role} scores", leave=False, file=sys.stderr,
                      disable=not ctx.progress):
            paper.append(image_scores(images[i], reference[i], paper_regions[i]))
            region = ~dilate((masks[i] > 0.5) | nodule_masks[i], ctx.dilation_px)
            fractions.append(float(region.mean()))
            background.append(image_scores(images[i], reference[i], region))
        results[role] = {
            "paper": {k: _summary([s[k] for s in paper]) for k in ("mse", "ssim", "psnr")},
            "background": {k: _summary([s[k] for s in background]) for k in ("mse", "ssim", "psnr")},
            "background_region_fraction": _summary(fractions)["mean"],
            "generated_mask_fraction": float((masks > 0.5).mean()),
            "n": int(images.shape[0]),
            "reference": "real nodule slice (disc erased)" if role == "inpainting" else "test background patch",
        }
        synthetic[role] = {"images": images, "masks": masks}
    return results, synthetic


def pick_donors(ctx: Context, count: int = FIG3_DONORS) -> list[int]:
    """Test patients with nodule slices; round-robin over the true classes when known, else in seeded order."""
    candidates = [int(p) for p in ctx.data.patients_in("test") if ctx.largest_slice(int(p)) is not None]
    order = ctx.rng(3).permutation(len(candidates))
    candidates = [candidates[i] for i in order]
    if ctx.truth is None:
        return candidates[:count]
    by_class: dict[int, list[int]] = {}
    for p in candidates:
        by_class.setdefault(int(ctx.truth.module_class[p]), []).append(p)
    chosen: list[int] = []
    while len(chosen) < count and any(by_class.values()):
        for cls in sorted(by_class):
            if by_class[cls] and len(chosen) < count:
                chosen.append(by_class[cls].pop(0))
    return chosen


def figure3(ctx: Context) -> dict:
    """The paper's Fig. 3 on test donors and test backgrounds."""
    data = ctx.data
    donors = pick_donors(ctx)
    if not donors:
        return {"path": None, "note": "no test patient has nodule slices"}
    backgrounds = data.background_indices("test")
    chosen = backgrounds[ctx.rng(4).permutation(backgrounds.size)[: len(donors)]]
    if chosen.size < len(donors):       # fewer backgrounds than donors: reuse them
        chosen = np.resize(chosen, len(donors))
    bg = data.background_images[chosen]
    donor_slices = [ctx.largest_slice(p) for p in donors]
    donor_images = data.nodule_images[donor_slices]
    rows: list[tuple[str, list]] = [("donor", list(donor_images)), ("background", list(bg))]
    skipped = []
    for role in ("inpainting", "baseline", "proposed"):
        model = ctx.models.get(role)
        if model is None:
            skipped.append(role)
            continue
        if role == "inpainting":
            holes = holes_for((data.nodule_masks[donor_slices] > 0).astype(np.float32))
            images, _ = generate(model, bg, holes=holes, device=ctx.device, progress=False)
        else:
            noise = seeded_noise(len(donors), model.noise_dim, ctx.seed, 3)
            images, _ = generate(model, bg, model.genes[donors], noise, device=ctx.device, progress=False)
        rows.append((ROLE_TITLES[role].split(" ")[0].lower(), list(images)))
    titles = [str(data.patient_ids[p]) for p in donors]
    if ctx.truth is not None:
        titles = [f"{t}\nclass {int(ctx.truth.module_class[p])}" for t, p in zip(titles, donors)]
    path = figures.sample_grid(ctx.out / "fig3_samples.png", rows, titles,
                               "Fig. 3: donor genes (columns) synthesised into test backgrounds")
    return {"path": path.name, "donors": [str(data.patient_ids[p]) for p in donors], "skipped_rows": skipped}


def representations(ctx: Context) -> dict[str, np.ndarray]:
    """Raw genes and the gene codes φ(g) of the models that have one, for every patient."""
    reps = {"raw genes": ctx.data.genes.astype(np.float64)}
    for role in ("baseline", "proposed"):
        if role in ctx.models:
            reps[f"{role} code"] = encode(ctx.models[role]).astype(np.float64)
    return reps


def _tsne(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = features.shape[0]
    if n < 3:
        return np.zeros((n, 2))
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    # exact gradients below 1000 points: O(n²) but several times faster than Barnes–Hut at cohort sizes
    method = "exact" if n <= 1000 else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method=method).fit_transform(features)


def radiogenomic_map(ctx: Context, reps: dict[str, np.ndarray]) -> dict:
    """Fig. 4 (t-SNE of every representation for all patients) and, with the truth, ARI/NMI and R²."""
    truth = ctx.truth
    k = truth.num_classes if truth is not None and truth.num_classes > 1 else 3
    main = "proposed code" if "proposed code" in reps else list(reps)[-1]
    clusters = kmeans_labels(reps[main], k, ctx.seed)
    embeddings = []
    for name, values in tqdm(reps.items(), desc="t-SNE", leave=False, file=sys.stderr, disable=not ctx.progress):
        embeddings.append((name, _tsne(values, ctx.seed)))
    colourings = [(f"k-means of the {main}", clusters)]
    if truth is not None:
        colourings.append(("true module class", truth.module_class))
    examples = []
    for cluster in range(int(clusters.max()) + 1):
        patients = np.flatnonzero(clusters == cluster)
        slices = [ctx.largest_slice(int(p)) for p in patients]
        slices = [s for s in slices if s is not None][:5]
        examples.append((cluster, list(ctx.data.nodule_images[slices])))
    path = figures.tsne_figure(ctx.out / "fig4_tsne.png", embeddings, colourings, examples,
                               f"Fig. 4: t-SNE of all {ctx.data.num_patients} patients")
    result: dict[str, Any] = {"path": path.name, "patients": "all", "k": k, "cluster_of": main,
                              "cluster_sizes": np.bincount(clusters).tolist()}
    if truth is None:
        return result
    known = truth.module_class >= 0
    test = np.zeros_like(known)
    test[ctx.data.patients_in("test")] = True
    scores: dict[str, Any] = {}
    for name, values in reps.items():
        entry: dict[str, Any] = {}
        for subset, rows in (("all", known), ("test", known & test)):
            if rows.sum() >= 2 * k:
                labels = kmeans_labels(values[rows], k, ctx.seed)
                entry[f"ari_{subset}"] = adjusted_rand(truth.module_class[rows], labels)
                entry[f"nmi_{subset}"] = normalized_mutual_info(truth.module_class[rows], labels)
            else:
                entry[f"ari_{subset}"] = entry[f"nmi_{subset}"] = float("nan")
        targets = dict(truth.phenotypes)
        if truth.activations is not None:
            for m in range(truth.num_modules):
                targets[f"module_{m + 1}"] = truth.activations[:, m]
        entry["r2"] = {t: cross_validated_r2(values[known], y[known], ctx.seed)
                       for t, y in tqdm(targets.items(), desc=f"R² {name}", leave=False, file=sys.stderr,
                                        disable=not ctx.progress)}
        scores[name] = entry
    result["scores"] = scores
    result["n_patients"] = int(known.sum())
    result["n_test_patients"] = int((known & test).sum())
    return result


def gene_control(ctx: Context, n_backgrounds: int = 4) -> dict:
    """Fixed backgrounds and noise, every patient's genes swapped in, generated nodules measured."""
    data = ctx.data
    backgrounds = data.background_indices("test")
    chosen = backgrounds[ctx.rng(5).permutation(backgrounds.size)[:n_backgrounds]]
    donors = np.arange(data.num_patients)
    result: dict[str, Any] = {"backgrounds": int(chosen.size), "donors": int(donors.size), "models": {}}
    per_donor: dict[str, np.ndarray] = {}
    for role in ("baseline", "proposed"):
        model = ctx.models.get(role)
        if model is None:
            continue
        noise_bg = seeded_noise(chosen.size, model.noise_dim, ctx.seed, 5)
        size = data.patch_size
        bg = np.repeat(data.background_images[chosen][None], donors.size, axis=0).reshape(-1, size, size)
        genes = np.repeat(model.genes[donors], chosen.size, axis=0)
        noise = np.tile(noise_bg, (donors.size, 1))
        images, masks = generate(model, bg, genes, noise, device=ctx.device, batch_size=ctx.batch_size,
                                 desc=f"gene control {role}", progress=ctx.progress)
        feats = generated_features(images, masks, data.patch_spacing_mm, ctx.window)
        table = np.array([[f[name] for name in CONTROL_FEATURES] for f in feats]).reshape(
            donors.size, chosen.size, len(CONTROL_FEATURES))
        empty = np.array([f["diameter_mm"] == 0 for f in feats])
        per_donor[role] = _nanmedian(table, axis=1)
        result["models"][role] = {"empty_mask_fraction": float(empty.mean()),
                                  "feature_spread_across_donors": {
                                      name: float(np.nanstd(per_donor[role][:, j])) if np.isfinite(
                                          per_donor[role][:, j]).any() else float("nan")
                                      for j, name in enumerate(CONTROL_FEATURES)}}
    result["per_donor"] = per_donor
    return result


def _nanmedian(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmedian without the all-NaN warning (a donor whose every generated mask is empty → NaN)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=axis)


def gene_control_scores(ctx: Context, control: dict, real_features: np.ndarray) -> dict:
    """Spearman ρ of each gene-control measure with the donor's true phenotype, for every model and for the
    real nodules (the measure's own ceiling); over the test donors and over all donors."""
    truth = ctx.truth
    test = np.zeros(ctx.data.num_patients, dtype=bool)
    test[ctx.data.patients_in("test")] = True
    sources = {role: values for role, values in control["per_donor"].items()}
    sources["real nodules"] = real_features
    scores: dict[str, Any] = {}
    for source, values in sources.items():
        entry = {}
        for label, feature, phenotype, sign, is_target in GENE_CONTROL:
            if phenotype not in truth.phenotypes:
                continue
            column = values[:, CONTROL_FEATURES.index(feature)]
            y = truth.phenotypes[phenotype]
            row = {"feature": feature, "phenotype": phenotype, "expected_sign": sign, "target": is_target}
            for subset, rows in (("test", test), ("all", np.ones_like(test))):
                rho, p, n = spearman(column[rows], y[rows])
                row[f"rho_{subset}"], row[f"p_{subset}"], row[f"n_{subset}"] = rho, p, n
                row[f"aligned_rho_{subset}"] = sign * rho
            entry[label] = row
        scores[source] = entry
    return scores


def realism(ctx: Context, synthetic: dict[str, dict[str, np.ndarray]], seconds: float) -> dict:
    """Classifier two-sample test of real test nodules against each model's Table-1 images."""
    real = ctx.data.nodule_images[ctx.data.nodule_indices("test")]
    roles = [r for r in ("inpainting", "baseline", "proposed") if r in synthetic]
    results = {}
    for role in roles:
        bar = tqdm(total=40, desc=f"C2ST {role}", leave=False, file=sys.stderr, disable=not ctx.progress)

        def tick(epoch: int, total: int, bar: tqdm = bar) -> None:
            bar.update(1)

        results[role] = classifier_two_sample_test(real, synthetic[role]["images"], seed=ctx.seed,
                                                   max_seconds=seconds / max(1, len(roles)), max_epochs=40,
                                                   progress=tick)
        bar.close()
    return results


def diversity(ctx: Context, n_inputs: int = 16, n_noises: int = 8) -> tuple[dict, list]:
    """Mean pairwise L1 across noises for fixed inputs (whole patch and inside the union of the masks)."""
    data = ctx.data
    rng = ctx.rng(6)
    backgrounds = data.background_indices("test")
    nodules = data.nodule_indices("test")
    # one draw of inputs shared by every model, so the strips of the figure compare like with like
    chosen_bg = backgrounds[rng.permutation(backgrounds.size)[:n_inputs]]
    donors = rng.choice(data.patients_in("test"), size=chosen_bg.size)
    chosen_nod = nodules[rng.permutation(nodules.size)[:n_inputs]]
    results, strips = {}, []
    for role, model in ctx.models.items():
        if role == "inpainting":
            base = data.nodule_images[chosen_nod]
            holes = np.repeat(holes_for((data.nodule_masks[chosen_nod] > 0).astype(np.float32)), n_noises, axis=0)
            images, masks = generate(model, np.repeat(base, n_noises, axis=0), holes=holes, device=ctx.device,
                                     batch_size=ctx.batch_size, desc="diversity inpainting", progress=ctx.progress)
        else:
            noise = seeded_noise(chosen_bg.size * n_noises, model.noise_dim, ctx.seed, 6)
            images, masks = generate(model, np.repeat(data.background_images[chosen_bg], n_noises, axis=0),
                                     np.repeat(model.genes[donors], n_noises, axis=0), noise, device=ctx.device,
                                     batch_size=ctx.batch_size, desc=f"diversity {role}", progress=ctx.progress)
        count = images.shape[0] // n_noises
        images = images.reshape(count, n_noises, *images.shape[1:])
        masks = masks.reshape(count, n_noises, *masks.shape[1:])
        whole, inside = [], []
        for stack, mstack in zip(images, masks):
            unit = to_unit_range(stack)
            whole.append(mean_pairwise_l1(unit))
            union = dilate((mstack > 0.5).any(axis=0), ctx.dilation_px)
            inside.append(mean_pairwise_l1(unit, union) if union.any() else float("nan"))
        results[role] = {"l1_patch": _summary(whole), "l1_nodule_region": _summary(inside), "inputs": count,
                         "noises": n_noises,
                         "note": "ignores noise by design (deterministic)" if role == "inpainting" else ""}
        strips.append((ROLE_TITLES[role].split(" ")[0].lower(), list(images[0])))
    return results, strips


def links(ctx: Context, conventional: dict, control: dict | None, alpha: float) -> dict:
    """Module→phenotype links of the conventional pipeline and of each model's gene-controlled nodules."""
    units = conventional["units"]
    patients = conventional["patients"]
    truth = ctx.truth
    modules = list(range(1, truth.num_modules + 1)) if truth is not None and truth.num_modules else None
    correlation = module_correlation(truth, patients)
    rows: dict[str, Any] = {"conventional (metagenes × real-nodule features)": conventional["links"]}
    image_sides = {}
    if control is not None:
        for role, values in control["per_donor"].items():
            image_sides[role] = values[patients][:, : len(NODULE_FEATURES)]
    for role, values in image_sides.items():
        rows[f"{role} (metagenes × gene-controlled nodule features)"] = association_links(
            units["values"], units["names"], units["modules"], values, NODULE_FEATURES, alpha=alpha,
            modules_in_truth=modules, module_correlation=correlation)
    if truth is not None and truth.activations is not None:
        activations = truth.activations[patients]
        names = [f"module_{m + 1}" for m in range(truth.num_modules)]
        labels = [[m] for m in range(1, truth.num_modules + 1)]
        rows["oracle step 1: true activations × real-nodule features"] = association_links(
            activations, names, labels, conventional["feature_values"], NODULE_FEATURES, alpha=alpha,
            modules_in_truth=modules, module_correlation=correlation)
        for role, values in image_sides.items():
            rows[f"oracle step 1: true activations × {role} gene-controlled features"] = association_links(
                activations, names, labels, values, NODULE_FEATURES, alpha=alpha, modules_in_truth=modules,
                module_correlation=correlation)
    return rows


# ============================================================================================================
# Targets, report, JSON


def targets(metrics: dict) -> list[dict]:
    """Each target of the issue: value(s), threshold, reached (True/False) or None when not checkable."""
    found: list[dict] = []
    t1 = metrics.get("table1", {})
    if "proposed" in t1:
        paper = {role: t1[role]["paper"] for role in t1}
        others = [r for r in ("inpainting", "baseline") if r in paper]
        if others:
            losses = [
                f"{metric.upper()} {_fmt(paper['proposed'][metric]['mean'], 4)} vs {r} "
                f"{_fmt(paper[r][metric]['mean'], 4)}"
                for r in others for metric in ("mse", "ssim", "psnr")
                if not _better(metric, paper["proposed"][metric]["mean"], paper[r][metric]["mean"])
            ]
            found.append({"target": f"proposed beats {' and '.join(others)} on MSE, SSIM and PSNR (Table 1, "
                                    "paper variant)", "value": "; ".join(losses) if losses else "better on all",
                          "reached": not losses,
                          "note": "" if len(others) == 2 else "not every baseline was given"})
        ssim_value = paper["proposed"]["ssim"]["mean"]
        psnr_value = paper["proposed"]["psnr"]["mean"]
        found.append({"target": f"proposed SSIM ≥ {TARGETS['ssim']}", "value": ssim_value,
                      "reached": _ge(ssim_value, TARGETS["ssim"])})
        found.append({"target": f"proposed PSNR ≥ {TARGETS['psnr']} dB", "value": psnr_value,
                      "reached": _ge(psnr_value, TARGETS["psnr"])})
    scores = metrics.get("radiogenomic_map", {}).get("scores")
    if scores:
        ari_p = scores.get("proposed code", {}).get("ari_all", float("nan"))
        ari_r = scores.get("raw genes", {}).get("ari_all", float("nan"))
        found.append({"target": f"ARI of the proposed code ≥ {TARGETS['ari_proposed']} (all patients)",
                      "value": ari_p, "reached": _ge(ari_p, TARGETS["ari_proposed"])})
        found.append({"target": f"ARI of the raw genes ≤ {TARGETS['ari_raw_max']} (all patients)", "value": ari_r,
                      "reached": None if not np.isfinite(ari_r) else bool(ari_r <= TARGETS["ari_raw_max"])})
    control = metrics.get("gene_control", {}).get("scores", {}).get("proposed")
    if control:
        subset = metrics["gene_control"].get("target_subset", "test")
        values = {label: row[f"aligned_rho_{subset}"] for label, row in control.items() if row.get("target", True)}
        reached = all(_ge(v, TARGETS["gene_control_rho"]) for v in values.values()) if values else None
        found.append({"target": f"gene-control aligned ρ ≥ {TARGETS['gene_control_rho']} for "
                                f"{', '.join(values)} ({subset} donors)",
                      "value": ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()), "reached": reached})
    c2st = metrics.get("realism", {}).get("proposed")
    if c2st:
        acc = c2st["accuracy"]
        found.append({"target": f"C2ST accuracy of the proposed model ≤ {TARGETS['c2st_max']}", "value": acc,
                      "reached": None if not np.isfinite(acc) else bool(acc <= TARGETS["c2st_max"])})
    return found


def _better(metric: str, proposed: float | None, other: float | None) -> bool:
    """Strictly better (lower MSE, higher SSIM and PSNR); a missing value is never better."""
    if proposed is None or other is None or not (np.isfinite(proposed) and np.isfinite(other)):
        return False
    return proposed < other if metric == "mse" else proposed > other


def _ge(value: float, threshold: float) -> bool | None:
    return None if value is None or not np.isfinite(value) else bool(value >= threshold)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.{digits}f}"
    return str(value)


def _ms(entry: dict, digits: int = 3) -> str:
    if entry["mean"] is None or not math.isfinite(entry["mean"]):
        return "n/a"
    return f"{_fmt(entry['mean'], digits)} ± {_fmt(entry['std'], digits)}"


def jsonable(value: Any) -> Any:
    """numpy → Python, non-finite floats → None (strict JSON), tuples → lists, arrays dropped if large."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(metrics: dict, out: Path) -> Path:
    """report.md: every table of the evaluation, the targets, the protocol in short, links to the figures."""
    lines: list[str] = ["# RadiogenomicGAN evaluation", ""]
    info = metrics["inputs"]
    lines += [
        f"Dataset `{info['data']}`: {info['patients']} patients ({info['test_patients']} test), "
        f"{info['test_nodules']} test nodule slices, {info['test_backgrounds']} test background patches, "
        f"patch {info['patch_size']} px at {info['patch_spacing_mm']:.4g} mm/px. Seed {info['seed']}, device "
        f"{info['device']}. Models: " + ", ".join(f"{ROLE_TITLES[r]} `{p}`" for r, p in info["models"].items())
        + "." + (f" Ground truth `{info['ground_truth']}`." if info.get("ground_truth") else " No ground truth given."),
        "",
        "Intensity scaling: images in [0, 1] = the network range [-1, 1] (HU window [-1000, 500]) mapped "
        "linearly; MSE in (window width)² units; PSNR and SSIM with data_range 1; SSIM with a Gaussian 11×11 "
        "window, σ 1.5, K1 0.01, K2 0.03 (Wang et al. 2004), whole-patch SSIM averaged over the window-covered "
        "interior (as skimage), region SSIM = mean of the SSIM map over the region; PSNR per image (capped at "
        "100 dB), then averaged.",
        "",
    ]
    # --- targets
    lines += ["## Targets", "", "| target | value | reached |", "|---|---|---|"]
    for t in metrics["targets"]:
        reached = "not checkable" if t["reached"] is None else ("**yes**" if t["reached"] else "no")
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']}{note} | {_fmt(t['value'])} | {reached} |")
    lines.append("")
    # --- Table 1
    t1 = metrics["table1"]
    lines += ["## Table 1: synthesis quality", "",
              "*Paper variant*: proposed and baseline — synthetic vs the input test background over the whole "
              "patch (input: background + genes of a random test patient + seeded noise); in-painting — synthetic "
              "vs the real test nodule slice inside the erased disc of 1.5× the nodule's equivalent radius. "
              f"*Background variant*: outside the union of the generated mask (> 0.5) and the reference's nodule, "
              f"dilated by {metrics['inputs']['dilation_px']} px (what a user needs: the background is kept).", "",
              "| method | n | MSE | SSIM | PSNR (dB) | MSE (bg) | SSIM (bg) | PSNR (bg) | bg fraction | "
              "paper MSE / SSIM / PSNR |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for role in ("inpainting", "baseline", "proposed"):
        if role not in t1:
            lines.append(f"| {ROLE_TITLES[role]} | – | not given | | | | | | | "
                         f"{PAPER_TABLE1[role]['mse']} / {PAPER_TABLE1[role]['ssim']} / {PAPER_TABLE1[role]['psnr']} |")
            continue
        e = t1[role]
        p, b = e["paper"], e["background"]
        lines.append(
            f"| {ROLE_TITLES[role]} | {e['n']} | {_ms(p['mse'], 4)} | {_ms(p['ssim'])} | {_ms(p['psnr'], 2)} | "
            f"{_ms(b['mse'], 4)} | {_ms(b['ssim'])} | {_ms(b['psnr'], 2)} | {_fmt(e['background_region_fraction'], 2)}"
            f" | {PAPER_TABLE1[role]['mse']} / {PAPER_TABLE1[role]['ssim']} / {PAPER_TABLE1[role]['psnr']} |")
    lines += ["", "In-painting composites its output outside the disc, so its background variant is near-perfect by "
              "construction; the disc boundary (its weak point, paper §3) is inside the paper variant's region.", ""]
    # --- figures
    f3 = metrics["figure3"]
    lines += ["## Fig. 3: samples", ""]
    if f3.get("path"):
        skipped = f3.get("skipped_rows") or []
        lines += [f"![Fig. 3]({f3['path']})", "",
                  f"Donors (test patients): {', '.join(f3['donors'])}. Rows: donor's real nodule slice (largest), "
                  "test background, in-painting (disc of 1.5× the donor's radius erased from the background), "
                  "baseline, proposed; one seeded noise per column, shared by both gene-conditioned models."
                  + (f" Rows left out (model not given): {', '.join(skipped)}." if skipped else ""), ""]
    else:
        lines += [f"Not drawn: {f3.get('note')}.", ""]
    rmap = metrics["radiogenomic_map"]
    lines += ["## Fig. 4: radiogenomic map", "", f"![Fig. 4]({rmap['path']})", "",
              f"t-SNE of all {metrics['inputs']['patients']} patients' raw genes and gene codes φ(g); colours: "
              f"k-means (k = {rmap['k']}) of the {rmap['cluster_of']} (sizes {rmap['cluster_sizes']})"
              + ("; second row: the true module class" if "scores" in rmap else "")
              + "; below, the largest nodule slice of up to five patients per cluster.", ""]
    # --- scores vs truth
    if "scores" in rmap:
        scores = rmap["scores"]
        lines += ["## Scores against the truth", "",
                  f"k-means with k = {rmap['k']} (the number of true classes) on each representation, against the "
                  f"true module classes: all {rmap['n_patients']} patients and the {rmap['n_test_patients']} test "
                  "patients alone (n/a below 2k patients).", "",
                  "| representation | ARI (all) | NMI (all) | ARI (test) | NMI (test) |", "|---|---|---|---|---|"]
        for name, e in scores.items():
            lines.append(f"| {name} | {_fmt(e['ari_all'])} | {_fmt(e['nmi_all'])} | {_fmt(e['ari_test'])} | "
                         f"{_fmt(e['nmi_test'])} |")
        targets_r2 = list(next(iter(scores.values()))["r2"])
        lines += ["", "Cross-validated R² (ridge on standardised features, penalty by inner CV; 5-fold, or "
                  "leave-one-out below 20 patients; all patients) of each true phenotype and module activation. "
                  f"Nuisance phenotypes (not gene-driven, should stay ≤ 0): "
                  f"{', '.join(sorted(NUISANCE_PHENOTYPES & set(targets_r2))) or 'none in the truth'}.", "",
                  "| representation | " + " | ".join(targets_r2) + " |", "|---|" + "---|" * len(targets_r2)]
        for name, e in scores.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(e["r2"][t], 2) for t in targets_r2) + " |")
        lines.append("")
    # --- gene control
    gc = metrics.get("gene_control")
    if gc:
        lines += ["## Gene control", "",
                  f"{gc['backgrounds']} fixed test backgrounds, one fixed noise each; the genes of each of the "
                  f"{gc['donors']} patients swapped in; the generated nodule (largest component of mask > 0.5) "
                  "measured: equivalent diameter (mm, patch spacing), mean HU inside, margin sharpness = slope "
                  "across the mask edge (inner minus outer boundary layer, per mm) ÷ the edge's height (twice the "
                  "layers' mean above the ring 3–5 px outside), ≈ 1/edge width in 1/mm, 1/spacing for a perfect "
                  "step, blind to density and to a solid core; median over the backgrounds. "
                  "Margin sharpness should fall as the true margin blur rises: *aligned ρ* = ρ × expected sign. "
                  "'real nodules' = the same measures on the donors' real nodule slices (the measures' ceiling).", ""]
        for role, info_role in gc["models"].items():
            lines.append(f"- {role}: {100 * info_role['empty_mask_fraction']:.1f} % of generated masks empty.")
        if gc.get("scores"):
            lines += ["", "| source | measure ↔ truth | aligned ρ (test) | n | aligned ρ (all) | n |",
                      "|---|---|---|---|---|---|"]
            for source, entry in gc["scores"].items():
                for label, row in entry.items():
                    label = label if row.get("target", True) else f"{label} (not a target)"
                    lines.append(f"| {source} | {label}: {row['feature']} ↔ {row['phenotype']} | "
                                 f"{_fmt(row['aligned_rho_test'])} | {row['n_test']} | {_fmt(row['aligned_rho_all'])} "
                                 f"| {row['n_all']} |")
            subset = gc.get("target_subset", "test")
            lines += ["", "Targets use the test donors." if subset == "test" else
                      f"Targets use all donors (fewer than {MIN_TEST_DONORS} test donors; training donors' genes "
                      "were seen in training)."]
        if gc.get("path"):
            lines += ["", f"![gene control]({gc['path']})"]
        lines.append("")
    # --- realism and diversity
    if metrics.get("realism"):
        lines += ["## Realism: classifier two-sample test", "",
                  "A small CNN (3 strided convs, ~6 k parameters) trained on half of the real test nodule patches "
                  "and half of the model's Table-1 patches, accuracy on the other halves (0.5 = indistinguishable; "
                  "training stops at a CPU time budget, so this is a lower bound on what a stronger critic finds).",
                  "", "| method | accuracy | ± s.e. | train / test patches | epochs |", "|---|---|---|---|---|"]
        for role, e in metrics["realism"].items():
            lines.append(f"| {ROLE_TITLES[role]} | {_fmt(e['accuracy'])} | {_fmt(e['stderr'])} | "
                         f"{e['n_train']} / {e['n_test']} | {e['epochs']} |")
        lines.append("")
    if metrics.get("diversity"):
        lines += ["## Diversity across noise (mode collapse)", "",
                  "Fixed (test background, test genes); mean pairwise L1 in [0,1] units between the images made "
                  "with different noises; whole patch and inside the dilated union of their masks.", "",
                  "| method | L1 whole patch | L1 nodule region | inputs × noises | note |", "|---|---|---|---|---|"]
        for role, e in metrics["diversity"].items():
            lines.append(f"| {ROLE_TITLES[role]} | {_ms(e['l1_patch'], 4)} | {_ms(e['l1_nodule_region'], 4)} | "
                         f"{e['inputs']} × {e['noises']} | {e['note']} |")
        if metrics.get("diversity_figure"):
            lines += ["", f"![diversity]({metrics['diversity_figure']})"]
        lines.append("")
    # --- conventional pipeline and links
    conv = metrics.get("conventional")
    if conv:
        mg = conv["metagenes"]
        lines += ["## Module → phenotype links: conventional pipeline vs synthesis", "",
                  f"Step 1: {conv['n_metagenes']} metagenes (average-linkage clustering of the genes on 1 − r over "
                  f"the training patients, cut at {mg['max_distance']}, ≥ {mg['min_genes']} genes; metagene = mean "
                  f"z-score; sizes {mg['sizes']}; post-hoc module labels "
                  f"[{', '.join('+'.join(map(str, m)) or '–' for m in mg['modules'])}], by {mg['labelled_by']}). "
                  "Step 2: hand-crafted features of each patient's real nodule slices (diameter of the largest "
                  "slice; area-weighted mean HU, HU spread, margin sharpness, compactness). Step 3: Spearman ρ, "
                  f"Benjamini–Hochberg over all pairs, q < {metrics['inputs']['alpha']}. The model rows replace "
                  "step 2 by the same features measured on the nodules each model generates from the patient's "
                  "genes (gene control, fixed backgrounds and noise); the oracle rows replace step 1 by the true "
                  "activations. True links (phantom's documented map, module → feature): "
                  + ", ".join(f"{m}→{f}" for m, f in sorted(TRUE_LINKS)) + ". A significant pair counts as a "
                  "recovered link when one of its metagene's modules drives the feature, else as false (so do all "
                  "links of a metagene without a module); "
                  "real physical side effects (e.g. blur widening the HU spread) count as false too.", "",
                  "| approach | patients | significant | true links recovered | false links (via a correlated "
                  "module) | missed |", "|---|---|---|---|---|---|"]
        for name, e in metrics["links"].items():
            missed = ", ".join(f"{m}→{f}" for m, f in e["missed"]) or "none"
            lines.append(f"| {name} | {e['n_patients']} | {e['n_significant']} | {e['n_recovered']} / "
                         f"{e['n_true_links']} | {e['n_false']} ({e['n_false_via_correlated_module']}) | {missed} |")
        corr = conv.get("module_correlation")
        if corr is not None:
            pairs = [(i + 1, j + 1, corr[i][j]) for i in range(len(corr)) for j in range(i + 1, len(corr))
                     if corr[i][j] is not None and abs(corr[i][j]) >= 0.5]
            lines += ["", "The true module activations are correlated through the class prototypes"
                      + (": " + ", ".join(f"modules {a} and {b} ρ = {_fmt(r, 2)}" for a, b, r in pairs)
                         if pairs else " (no pair with |ρ| ≥ 0.5)")
                      + ". A correlational method cannot tell a driven link from one that runs through a "
                      "correlated module, whatever its gene side; those false links are counted in brackets."]
        lines.append("")
    lines += ["## Files", "", "- `metrics.json`: every number above (and per-pair link statistics).",
              f"- Time: {metrics['inputs']['seconds']:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ============================================================================================================
# Driver


def evaluate(args: argparse.Namespace) -> dict:
    """Run every section and write report.md, metrics.json and the figures; returns the metrics."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _evaluate(args)
    finally:
        torch.set_num_threads(threads)


def _evaluate(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = load_dataset(args.data)
    except DatasetError as error:
        raise EvaluationError(str(error)) from error
    if data.patients_in("test").size == 0:
        raise EvaluationError(f"{args.data} has no test patients; evaluation runs on the test split only")
    if data.nodule_indices("test").size == 0 or data.background_indices("test").size == 0:
        raise EvaluationError(f"{args.data}: the test split holds no nodule or no background slices")
    device = resolve_device(args.device)
    paths = {"inpainting": args.inpainting, "baseline": args.baseline, "proposed": args.weights}  # paper order
    models = {role: load_model(role, path, data, device) for role, path in paths.items() if path}
    truth = None
    if args.ground_truth:
        try:
            truth = read_ground_truth(args.ground_truth, data.patient_ids, data.gene_names)
        except GroundTruthError as error:
            raise EvaluationError(str(error)) from error
    progress = not args.no_progress
    ctx = Context(data, models, truth, device, args.seed, out, args.batch_size, args.max_samples, args.dilation_px,
                  progress)
    metrics: dict[str, Any] = {"inputs": {
        "data": str(args.data), "patients": data.num_patients, "test_patients": int(data.patients_in("test").size),
        "test_nodules": int(data.nodule_indices("test").size),
        "test_backgrounds": int(data.background_indices("test").size),
        "patch_size": data.patch_size, "patch_spacing_mm": data.patch_spacing_mm, "seed": args.seed,
        "device": str(device), "models": {r: m.path for r, m in models.items()},
        "ground_truth": str(args.ground_truth) if args.ground_truth else None, "dilation_px": args.dilation_px,
        "alpha": args.alpha, "intensity_scaling": "[0,1] = ([-1,1] + 1) / 2; HU window "
        f"[{ctx.window[0]:g}, {ctx.window[1]:g}]; data_range 1",
    }}

    metrics["table1"], synthetic = table1(ctx)
    metrics["figure3"] = figure3(ctx)
    reps = representations(ctx)
    metrics["radiogenomic_map"] = radiogenomic_map(ctx, reps)

    all_patients = np.arange(data.num_patients)
    from .conventional import real_nodule_features

    real_features = real_nodule_features(data, all_patients, CONTROL_FEATURES)
    control = None
    if any(r in models for r in ("baseline", "proposed")):
        control = gene_control(ctx, args.gene_control_backgrounds)
        gc: dict[str, Any] = {k: v for k, v in control.items() if k != "per_donor"}
        gc["per_donor_features"] = {role: {name: values[:, j] for j, name in enumerate(CONTROL_FEATURES)}
                                    for role, values in control["per_donor"].items()}
        if truth is not None:
            gc["scores"] = gene_control_scores(ctx, control, real_features)
            gc["target_subset"] = "test" if data.patients_in("test").size >= MIN_TEST_DONORS else "all"
            gc["path"] = gene_control_figure(ctx, control, real_features)
        metrics["gene_control"] = gc

    metrics["realism"] = realism(ctx, synthetic, args.c2st_seconds)
    metrics["diversity"], strips = diversity(ctx, args.diversity_inputs, args.diversity_noises)
    if strips:
        metrics["diversity_figure"] = figures.sample_grid(
            out / "diversity.png", strips, [f"noise {i + 1}" for i in range(args.diversity_noises)],
            "One input, different noises").name

    conv = conventional_pipeline(data, truth, np.unique(data.nodule_patient), alpha=args.alpha)
    metrics["conventional"] = {k: v for k, v in conv.items() if k not in ("units", "feature_values", "patients")}
    correlation = module_correlation(truth, conv["patients"])
    metrics["conventional"]["module_correlation"] = None if correlation is None else correlation.tolist()
    metrics["links"] = links(ctx, conv, control, args.alpha)
    metrics["targets"] = targets(metrics)
    metrics["inputs"]["seconds"] = time.monotonic() - start
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False))
    write_report(metrics, out)
    return metrics


def gene_control_figure(ctx: Context, control: dict, real_features: np.ndarray) -> str:
    """Scatter of each gene-control measure against the donor's true phenotype (proposed model, else the
    baseline), coloured by the true class."""
    role = "proposed" if "proposed" in control["per_donor"] else "baseline"
    values = control["per_donor"][role]
    panels = []
    for label, feature, phenotype, sign, is_target in GENE_CONTROL:
        if phenotype not in ctx.truth.phenotypes or not is_target:
            continue
        x = ctx.truth.phenotypes[phenotype]
        y = values[:, CONTROL_FEATURES.index(feature)]
        rho = spearman(x, y)[0]
        expected = "expected > 0" if sign > 0 else "expected < 0"
        panels.append({"x": x, "y": y, "xlabel": f"donor's true {phenotype}", "ylabel": f"generated {feature}",
                       "title": f"{label}: ρ = {_fmt(rho, 2)} (all donors, {expected})",
                       "colour": np.maximum(ctx.truth.module_class, 0) % 10})
    return figures.scatter_panels(ctx.out / "gene_control.png", panels, f"Gene control ({role})").name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset .npz written by training.prepare")
    p.add_argument("--weights", required=True, help="proposed generator weights (NAME or NAME.safetensors)")
    p.add_argument("--baseline", help="MC-GAN-style baseline weights")
    p.add_argument("--inpainting", help="inpainting baseline weights")
    p.add_argument("--ground-truth", help="per-patient truth CSV (the phantom's ground_truth.csv)")
    p.add_argument("--out", required=True, help="output folder for report.md, metrics.json and figures")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=256, help="test images per model for Table 1 (default 256)")
    p.add_argument("--dilation-px", type=int, default=3, help="mask dilation of the background variant (px)")
    p.add_argument("--gene-control-backgrounds", type=int, default=4)
    p.add_argument("--c2st-seconds", type=float, default=60.0, help="CPU budget of the realism test, all models")
    p.add_argument("--diversity-inputs", type=int, default=16)
    p.add_argument("--diversity-noises", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate of the link tests")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The evaluation CLI: exit 0, or 2 with one line for a user error (`cli_common`), never a traceback."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_output_folder(args.out, create=False)
        require_optional("skimage")  # nodule perimeters (training.metrics)
        _print_summary(args, evaluate(args))
        return 0

    return run_cli(body, (EvaluationError, DeviceError))


def _print_summary(args: argparse.Namespace, metrics: dict) -> None:
    out = Path(args.out)
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'} in {metrics['inputs']['seconds']:.0f} s")
    for t in metrics["targets"]:
        state = "n/a" if t["reached"] is None else ("reached" if t["reached"] else "not reached")
        print(f"  {t['target']}: {_fmt(t['value'])} — {state}")


if __name__ == "__main__":
    sys.exit(main())
