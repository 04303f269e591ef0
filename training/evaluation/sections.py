"""The evaluation's sections (protocol v2): each a function Context → Section (its numbers, its paragraph of
the report, and its keys of the flat summary), registered by name in `SECTIONS`, as stylegan2-ada's
`metric_main` registers its metrics.

Everything is computed on the held-out donors of `Context.split`, and every section that can be gamed runs
the negative controls beside the models (a generator that copies its background; the proposed model fed
another donor's genes), so the report itself shows that the metric can fail.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from RadiogenomicGANLib.intensity import unit_to_hu
from RadiogenomicGANLib.radiogenomic_map import embed_2d

from .. import figures
from ..conventional import NUISANCE_PHENOTYPES, association_links, conventional_pipeline, module_correlation
from ..conventional import TRUE_LINKS as _TRUE_LINKS
from ..conventional import real_nodule_features as _real_features
from ..losses import background_leak, code_phenotype_features
from ..metrics import (
    CORE_MIN_PX,
    LONG_STRAND_PX,
    NODULE_FEATURES,
    STRAND_SURROUND_PX,
    STRAND_TISSUE_HU,
    TISSUE_HU,
    adjusted_rand,
    carries_long_strand,
    centroid_offset_mm,
    classifier_two_sample_test,
    cross_validated_r2,
    dilate,
    image_scores,
    kmeans_labels,
    largest_component,
    mean_pairwise_l1,
    median_strand_contrast_hu,
    normalized_mutual_info,
    placement,
    spearman,
    strand_contrast_hu,
    strand_contrast_lung_hu,
    strand_over_tissue_hu,
    to_unit_range,
)
from ..surroundings import LUNG_ONLY, central_crop, match_surroundings, texture_pair, wall_fraction
from .context import (
    ROLE_TITLES,
    Context,
    Model,
    encode,
    generate,
    generated_features,
    holes_for,
    seeded_noise,
    shifted_code,
)

# Real nodule slices lie 0.9 mm (median) from their patch's centre and well-placed models' inserted labels 3 mm
# at the 90th percentile; round 6's models drew theirs 9.6 mm away (median) over existing tissue (README round 7).
MISPLACED_MM = 5.0

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "inpainting": {"mse": 0.0121, "ssim": 0.76, "psnr": 20.94},
    "baseline": {"mse": 0.0065, "ssim": 0.74, "psnr": 22.05},
    "proposed": {"mse": 0.0044, "ssim": 0.88, "psnr": 24.52},
}
# gene-control measure of the generated nodule ↔ the donor's true phenotype, expected sign of ρ, summary key
GENE_CONTROL: tuple[tuple[str, str, str, int, str | None], ...] = (
    ("size", "diameter_mm", "diameter_mm", +1, "size_rho"),
    ("density", "mean_hu", "solid_fraction", +1, "density_rho"),
    ("margin", "margin_sharpness", "margin_blur_mm", -1, "margin_rho"),
    ("lobulation (compactness)", "compactness", "lobulation", -1, None),
    ("lobulation", "lobe_amplitude", "lobulation", +1, "lobulation_rho"),
    ("spiculation", "spicule_area_mm2", "spiculation", +1, "spiculation_rho"),
    ("long strands", "long_strand_area_mm2", "spiculation", +1, "long_strand_rho"),
)
CONTROL_FEATURES: tuple[str, ...] = (*NODULE_FEATURES, "margin_gradient", "core_contrast_hu",
                                     "lobe_amplitude", "spicule_area_mm2", "long_strand_area_mm2",
                                     "strand_contrast_hu", "strand_contrast_lung_hu",
                                     "strand_over_tissue_hu")  # NODULE_FEATURES first


@dataclass
class Section:
    """One section's result: numbers for metrics.json, lines for report.md, keys for the flat summary."""

    metrics: dict[str, Any]
    markdown: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for the report: n/a for None/NaN, fixed digits for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def _mean(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else float("nan")


def _nanmedian(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """np.nanmedian without the all-NaN or empty warning (a donor whose every generated mask is empty → NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=axis)


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, seed: int, resamples: int = 1000) -> tuple[float, float]:
    """95 % percentile interval of Spearman ρ over donors resampled with replacement (NaN when undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.size < 4 or not np.isfinite(spearman(x[ok], y[ok])[0]):  # undefined ρ has no interval either
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, 0xB007])
    draws = []
    for _ in range(resamples):
        pick = ok[rng.integers(ok.size, size=ok.size)]
        rho = spearman(x[pick], y[pick])[0]
        draws.append(rho if np.isfinite(rho) else 0.0)  # a constant resample carries no rank information
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


# ============================================================================================================
# Table 1


def table1(ctx: Context) -> Section:
    """The paper's Table 1 (whole patch vs the input background), the same on images that hold a drawn nodule,
    the background-only variant, and the empty-mask rate — for every model and the copy control."""
    data = ctx.data
    rng = ctx.rng(1)
    backgrounds = ctx.backgrounds
    n_bg = min(backgrounds.size, int(ctx.option("max_samples")))
    chosen_bg = backgrounds[rng.permutation(backgrounds.size)[:n_bg]]
    donors = rng.choice(ctx.donors, size=n_bg)
    nodules = ctx.nodule_slices()
    chosen_nod = nodules[rng.permutation(nodules.size)[: min(nodules.size, int(ctx.option("max_samples")))]]
    results: dict[str, Any] = {}
    models = [*ctx.models.values(), *[c for c in ctx.controls if c.role == "copy"]]
    for model in models:
        if model.role == "inpainting":
            reference = data.nodule_images[chosen_nod]
            holes = holes_for((data.nodule_masks[chosen_nod] > 0).astype(np.float32))
            excluded = (data.nodule_masks[chosen_nod] > 0) | (holes > 0.5)  # the real nodule and the erased disc
            images, masks = generate(model, reference, holes=holes, device=ctx.device, batch_size=ctx.batch_size,
                                     desc="Table 1 inpainting", progress=ctx.progress)
            paper_regions: list[np.ndarray | None] = list(holes > 0.5)
        else:
            reference = data.background_images[chosen_bg]
            excluded = np.zeros(reference.shape, dtype=bool)
            noise = seeded_noise(n_bg, model.noise_dim, ctx.seed, 1)
            images, masks = generate(model, reference, model.genes[donors], noise, device=ctx.device,
                                     batch_size=ctx.batch_size, desc=f"Table 1 {model.role}", progress=ctx.progress)
            paper_regions = [None] * n_bg
        drawn = (masks > 0.5).reshape(masks.shape[0], -1).any(axis=1)
        paper = [image_scores(images[i], reference[i], paper_regions[i]) for i in range(images.shape[0])]
        background = [image_scores(images[i], reference[i], ~dilate((masks[i] > 0.5) | excluded[i],
                                                                     int(ctx.option("dilation_px"))))
                      for i in range(images.shape[0])]
        entry = {"n": int(images.shape[0]), "empty_mask_fraction": float(1.0 - drawn.mean()),
                 "n_with_nodule": int(drawn.sum())}
        for name, scores, rows in (("paper", paper, np.ones_like(drawn)), ("with_nodule", paper, drawn),
                                   ("background", background, np.ones_like(drawn))):
            entry[name] = {k: _mean([s[k] for s, keep in zip(scores, rows) if keep]) for k in ("mse", "ssim", "psnr")}
        results[model.role] = entry
    lines = ["## Table 1: synthesis quality", "",
             "*Paper*: the whole patch against the input background (input: a held-out background + a held-out "
             "donor's genes + seeded noise); in-painting inside its erased disc of 1.5× the nodule's radius. "
             "*With a nodule*: the same, over the images whose generated mask holds a nodule (a generator that "
             "draws nothing scores perfectly on the paper variant and has no image here). *Background*: outside the "
             "generated (and real) nodule and the in-painting disc, dilated "
             f"{ctx.option('dilation_px')} px. Images in [0, 1] (HU window), data range 1.", "",
             "| method | n | empty masks | MSE | SSIM | PSNR | SSIM / PSNR with a nodule (n) | SSIM / PSNR (bg) | "
             "paper MSE / SSIM / PSNR |", "|---|---|---|---|---|---|---|---|---|"]
    for role, e in results.items():
        paper_row = PAPER_TABLE1.get(role)
        reference = f"{paper_row['mse']} / {paper_row['ssim']} / {paper_row['psnr']}" if paper_row else "–"
        lines.append(f"| {ROLE_TITLES[role]} | {e['n']} | {fmt(e['empty_mask_fraction'], 2)} | "
                     f"{fmt(e['paper']['mse'], 4)} | {fmt(e['paper']['ssim'])} | {fmt(e['paper']['psnr'], 2)} | "
                     f"{fmt(e['with_nodule']['ssim'])} / {fmt(e['with_nodule']['psnr'], 2)} ({e['n_with_nodule']}) | "
                     f"{fmt(e['background']['ssim'])} / {fmt(e['background']['psnr'], 2)} | {reference} |")
    lines.append("")
    summary = {}
    if "proposed" in results:
        summary = {"ssim_paper": results["proposed"]["paper"]["ssim"],
                   "psnr_paper": results["proposed"]["paper"]["psnr"]}
    return Section(results, lines, summary)


# ============================================================================================================
# Gene control (with noise diversity and the empty-mask rate, from the same generations)


def gene_control_generations(ctx: Context, model: Model) -> dict[str, Any]:
    """Every donor's genes on the same `backgrounds` × `noises` inputs; per-image features and per-donor
    diversity across noises (computed donor by donor, so memory stays one donor's images). A model that reads
    the slice position draws the nodule's centre slice (t = 0)."""
    data, donors = ctx.data, ctx.donors
    n_bg, n_noise = int(ctx.option("backgrounds")), int(ctx.option("noises"))
    pool = ctx.backgrounds
    chosen = pool[ctx.rng(5).permutation(pool.size)[:n_bg]]
    if chosen.size < n_bg:
        chosen = np.resize(chosen, n_bg)
    noise = seeded_noise(n_noise, model.noise_dim, ctx.seed, 5)
    inputs_bg = np.repeat(data.background_images[chosen], n_noise, axis=0)       # (bg·noise, S, S)
    inputs_noise = np.tile(noise, (n_bg, 1))
    features = np.full((donors.size, n_bg * n_noise, len(CONTROL_FEATURES)), np.nan)
    where = np.full((donors.size, n_bg * n_noise, 3), np.nan)     # metrics.placement of every draw
    background_hu = np.repeat(unit_to_hu(data.background_images[chosen], ctx.window), n_noise, axis=0)
    diversity = np.full(donors.size, np.nan)
    for row, donor in enumerate(tqdm(donors, desc=f"gene control {model.role}", leave=False, file=sys.stderr,
                                     disable=not ctx.progress)):
        genes = np.repeat(model.genes[donor][None], inputs_bg.shape[0], axis=0)
        images, masks = generate(model, inputs_bg, genes, inputs_noise, device=ctx.device,
                                 batch_size=ctx.batch_size, progress=False)
        feats = generated_features(images, masks, data.patch_spacing_mm, ctx.window)
        features[row] = [[f[name] for name in CONTROL_FEATURES] for f in feats]
        where[row] = [placement(largest_component(m > 0.5), bg, data.patch_spacing_mm)
                      for m, bg in zip(masks, background_hu)]
        spreads = []
        for b in range(n_bg):
            group = slice(b * n_noise, (b + 1) * n_noise)
            union = dilate((masks[group] > 0.5).any(axis=0), int(ctx.option("dilation_px")))
            if union.any() and n_noise > 1:
                spreads.append(mean_pairwise_l1(to_unit_range(images[group]), union))
        diversity[row] = _mean(spreads)
    diameter = features[:, :, CONTROL_FEATURES.index("diameter_mm")]
    per_donor = _nanmedian(np.where(diameter[:, :, None] > 0, features, np.nan), axis=1)
    per_donor[:, CONTROL_FEATURES.index("diameter_mm")] = np.median(diameter, axis=1)  # empty draws count as 0
    return {"features": features, "per_donor": per_donor, "empty": diameter == 0, "diversity": diversity,
            "placement": where, "backgrounds": int(n_bg), "noises": int(n_noise)}


def misplaced_fraction(offsets_mm: np.ndarray) -> float:
    """The share of draws whose nodule centroid lies more than `MISPLACED_MM` from the point (the patch centre);
    an empty draw (NaN offset) is not misplaced, the empty-mask rate charges it. A median offset hides a model
    that draws most nodules at the point and a third of them beside it (README, round 29)."""
    offsets = np.asarray(offsets_mm, dtype=np.float64)
    return float(np.mean(np.where(np.isfinite(offsets), offsets, 0.0) > MISPLACED_MM)) if offsets.size else math.nan


def placement_summary(where: np.ndarray) -> dict[str, float]:
    """Of the drawn (non-empty) nodules: median centroid distance from the patch centre (mm), and the share
    lying mostly (> 50 %) on tissue the background already had — for the draws and for centred discs of the
    same areas (where a nodule at the point would lie); and of all draws, the share drawn off the point."""
    drawn = where[np.isfinite(where[..., 0])]
    misplaced = misplaced_fraction(where[..., 0])
    if drawn.size == 0:
        return {"mask_offset_mm": float("nan"), "misplaced_fraction": misplaced,
                "mask_on_tissue_fraction": float("nan"), "mask_on_tissue_centred": float("nan")}
    return {"mask_offset_mm": float(np.median(drawn[:, 0])), "misplaced_fraction": misplaced,
            "mask_on_tissue_fraction": float(np.mean(drawn[:, 1] > 0.5)),
            "mask_on_tissue_centred": float(np.mean(drawn[:, 2] > 0.5))}


def size_calibration(per_donor: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Median over donors of generated / real diameter, over all donors and over the quarter with the
    smallest real nodules (`per_donor` and `real` in CONTROL_FEATURES columns)."""
    column = CONTROL_FEATURES.index("diameter_mm")
    real_d, generated = real[:, column], per_donor[:, column]
    ok = np.isfinite(real_d) & (real_d > 0) & np.isfinite(generated)
    if not ok.any():
        return {"size_ratio": float("nan"), "size_ratio_small": float("nan")}
    ratio, real_d = generated[ok] / real_d[ok], real_d[ok]
    small = real_d <= np.quantile(real_d, 0.25)
    return {"size_ratio": float(np.median(ratio)), "size_ratio_small": float(np.median(ratio[small]))}


def long_strand_share(features: np.ndarray) -> float:
    """Of the drawn (non-empty) nodules, the share with at least one long strand (`metrics.long_strand_area_mm2`
    > 0): whether spicules are drawn at all, which a ρ over donors cannot say when none are (ρ undefined)."""
    diameter = features[:, :, CONTROL_FEATURES.index("diameter_mm")]
    strands = features[:, :, CONTROL_FEATURES.index("long_strand_area_mm2")]
    drawn = diameter > 0
    return float((strands[drawn] > 0).mean()) if drawn.any() else float("nan")


def real_long_strand_share(ctx: Context) -> float:
    """The same share over the donors' real nodule slices."""
    return _mean(carries_long_strand(ctx.data.nodule_masks[ctx.nodule_slices()]).astype(float).tolist())


#: the strands' contrast measures (`metrics`) by their CONTROL_FEATURES name: over the whole surround, over the
#: lung only, over the tissue they cross
STRAND_MEASURES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "strand_contrast_hu": strand_contrast_hu, "strand_contrast_lung_hu": strand_contrast_lung_hu,
    "strand_over_tissue_hu": strand_over_tissue_hu}


def strand_contrast(features: np.ndarray, name: str = "strand_contrast_hu") -> float:
    """Median of one of STRAND_MEASURES over every drawn nodule where it is defined, whatever its donor (few
    donors' nodules carry a strand, so a median per donor would rest on a handful)."""
    return float(_nanmedian(features[:, :, CONTROL_FEATURES.index(name)]))


def real_strand_contrast(ctx: Context, name: str = "strand_contrast_hu") -> float:
    """The same over the donors' real nodule slices."""
    rows = ctx.nodule_slices()
    hu = unit_to_hu(ctx.data.nodule_images[rows], ctx.window)
    return median_strand_contrast_hu(hu, ctx.data.nodule_masks[rows], measure=STRAND_MEASURES[name])


def core_calibration(per_donor: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """The nodule's core (`metrics.core_contrast_hu`): the median over donors of the generated core contrast
    (each donor's median over its draws) and of the real one (area-weighted over the donor's slices), and
    Spearman ρ between the two over the donors."""
    column = CONTROL_FEATURES.index("core_contrast_hu")
    generated, measured = per_donor[:, column], real[:, column]
    return {"core_contrast_hu": float(_nanmedian(generated)), "core_contrast_real_hu": float(_nanmedian(measured)),
            "core_rho": spearman(generated, measured)[0]}


def real_nodule_offsets_mm(ctx: Context) -> np.ndarray:
    """Centroid distance of each of the donors' real nodule slices from its patch centre (mm): the natural
    spread of where a nodule's slice sits when the patch is centred on the nodule."""
    return np.asarray([centroid_offset_mm(m > 0, ctx.data.patch_spacing_mm)
                       for m in ctx.data.nodule_masks[ctx.nodule_slices()]], dtype=np.float64)


def real_within_nodule_variation(ctx: Context) -> float:
    """The real counterpart of noise diversity: mean pairwise L1 between a donor's nodule slices next to its
    largest one (±2 slices), inside their dilated union — how much one real nodule varies slice to slice."""
    values = []
    for donor in ctx.donors:
        idx = np.flatnonzero(ctx.data.nodule_patient == donor)
        if idx.size < 2:
            continue
        centre = int(np.argmax(ctx.data.nodule_masks[idx].reshape(idx.size, -1).sum(axis=1)))
        near = idx[max(0, centre - 2) : centre + 3]
        union = dilate((ctx.data.nodule_masks[near] > 0).any(axis=0), int(ctx.option("dilation_px")))
        values.append(mean_pairwise_l1(to_unit_range(ctx.data.nodule_images[near]), union))
    return _mean(values)


def gene_control(ctx: Context) -> Section:
    """Held-out donors' genes on fixed held-out backgrounds × noises; the generated nodule measured; Spearman ρ
    of the per-donor median with the donor's true phenotype and its bootstrap 95 % interval over donors."""
    truth = ctx.truth
    donors = ctx.donors
    models = [*ctx.gene_models(), *ctx.controls]
    real = _real_features(ctx.data, donors, CONTROL_FEATURES)
    results: dict[str, Any] = {}
    for model in models:
        gens = gene_control_generations(ctx, model)
        ctx.cache[f"gene_control/{model.role}"] = gens
        entry: dict[str, Any] = {"empty_mask_fraction": float(gens["empty"].mean()),
                                 "noise_diversity": _mean(gens["diversity"]),
                                 "long_strand_fraction": long_strand_share(gens["features"]),
                                 **{name: strand_contrast(gens["features"], name) for name in STRAND_MEASURES},
                                 **placement_summary(gens["placement"]),
                                 **size_calibration(gens["per_donor"], real),
                                 **core_calibration(gens["per_donor"], real), "rho": {}}
        for label, feature, phenotype, sign, _key in GENE_CONTROL:
            column = CONTROL_FEATURES.index(feature)
            generated = gens["per_donor"][:, column]
            row: dict[str, Any] = {"feature": feature, "phenotype": phenotype, "expected_sign": sign}
            if truth is not None and phenotype in truth.phenotypes:
                target = truth.phenotypes[phenotype][donors]
                rho, p, n = spearman(generated, target)
                low, high = bootstrap_spearman(generated, target, ctx.seed, int(ctx.option("bootstrap")))
                row.update(aligned_rho=sign * rho, p=p, n=n,
                           aligned_ci95=sorted([sign * low, sign * high]) if np.isfinite(low) else [None, None])
            # against the donor's own real nodule (no truth needed: the score training can use on real data)
            real_rho = spearman(generated, real[:, column])[0]
            row["rho_vs_real_nodule"] = real_rho  # the same measure on both sides: expected > 0
            entry["rho"][label] = row
        results[model.role] = entry
    # the ceiling of each measure: the donors' own real nodules measured the same way against the truth
    ceiling: dict[str, float] = {}
    if truth is not None:
        for label, feature, phenotype, sign, _key in GENE_CONTROL:
            if phenotype in truth.phenotypes:
                measured = real[:, CONTROL_FEATURES.index(feature)]
                ceiling[label] = sign * spearman(measured, truth.phenotypes[phenotype][donors])[0]
    real_variation = real_within_nodule_variation(ctx)
    real_offsets = real_nodule_offsets_mm(ctx)
    real_offset, real_misplaced = float(_nanmedian(real_offsets)), misplaced_fraction(real_offsets)
    real_strands = real_long_strand_share(ctx)
    real_contrasts = {name: real_strand_contrast(ctx, name) for name in STRAND_MEASURES}
    real_contrast = real_contrasts["strand_contrast_hu"]
    metrics = {"donors": int(donors.size), "backgrounds": int(ctx.option("backgrounds")),
               "noises": int(ctx.option("noises")), "models": results,
               "real_within_nodule_l1": real_variation, "real_nodule_offset_mm": real_offset,
               "real_nodule_misplaced_fraction": real_misplaced,
               "real_long_strand_fraction": real_strands,
               **{f"real_{name}": value for name, value in real_contrasts.items()},
               "real_nodules_aligned_rho": ceiling}
    lines = ["## Gene control (held-out donors)", "",
             f"{donors.size} held-out donors ({ctx.split} split); each donor's genes on the same "
             f"{ctx.option('backgrounds')} held-out backgrounds × {ctx.option('noises')} noises; the generated nodule "
             "(largest component of mask > 0.5) measured: equivalent diameter (mm; an empty mask counts as 0), mean "
             "HU, margin sharpness (1/mm, falls as blur rises), compactness, the outline's lobes (harmonics 3–8 of "
             "the radius around the body without its strands, over the mean radius, less a rasterised disc's), the "
             "area of thin strands (mm²: what an "
             "opening with the 3×3 cross removes; spicules) and of the strands of at least "
             f"{LONG_STRAND_PX} px (spicules that reach out, not the teeth of a serrated outline); the median over "
             "the donor's draws. "
             "*Aligned ρ* = Spearman ρ with the donor's true phenotype × its expected sign; 95 % interval by "
             f"bootstrap over donors ({ctx.option('bootstrap')} resamples). Controls: a generator that copies its "
             "background (no nodule: ρ undefined), and the proposed model fed another held-out donor's genes "
             "(must give ρ ≈ 0).", "",
             "*ρ vs the donor's real nodule*: the same measure on the donor's own real nodule slices (no truth "
             "needed; what the training's validation score uses).", "",
             "| model | measure ↔ truth | aligned ρ | 95 % interval | ρ vs the donor's real nodule | empty masks |",
             "|---|---|---|---|---|---|"]
    for role, entry in results.items():
        for label, row in entry["rho"].items():
            ci = row.get("aligned_ci95", [None, None])
            lines.append(f"| {ROLE_TITLES[role]} | {label}: {row['feature']} ↔ {row['phenotype']} | "
                         f"{fmt(row.get('aligned_rho'), 2)} | [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}] | "
                         f"{fmt(row['rho_vs_real_nodule'], 2)} | "
                         f"{fmt(entry['empty_mask_fraction'], 3)} |")
    lines += [f"| Real nodules of the donors (the measure's ceiling) | {label} | {fmt(rho, 2)} | | | |"
              for label, rho in ceiling.items()]
    lines += ["", "**Noise diversity**: mean pairwise L1 ([0, 1] units) between the images of one donor and "
              "background made with different noises, inside their dilated masks (0 = the noise is ignored); the "
              f"real counterpart, a real nodule's neighbouring slices: {fmt(real_variation, 4)}.", "",
              "| model | noise diversity |", "|---|---|"]
    lines += [f"| {ROLE_TITLES[r]} | {fmt(e['noise_diversity'], 4)} |" for r, e in results.items()]
    lines += ["", "**Spicules drawn**: the share of drawn nodules with at least one long strand, and how the "
              "strands stand out in the image: their mean HU minus that of the pixels within "
              f"{STRAND_SURROUND_PX} px of them outside the mask (median over the nodules with a strand), and "
              "that contrast split by what the strands run through: the lung, or tissue (a vessel or the chest "
              f"wall in the surround, > {STRAND_TISSUE_HU:.0f} HU away from the nodule's rim), where a real spicule "
              "merges with what it crosses and reads ≈ 0. The donors' real nodule slices: "
              f"{fmt(real_strands, 2)} with a long strand; contrast {fmt(real_contrast, 0)}, over the lung "
              f"{fmt(real_contrasts['strand_contrast_lung_hu'], 0)}, over tissue "
              f"{fmt(real_contrasts['strand_over_tissue_hu'], 0)} HU (n/a: no real strand touches tissue). A pooled "
              "median, not a measure of gene control: the control with another donor's genes reads the same draws.",
              "",
              "| model | with a long strand | strand contrast (HU) | over the lung (HU) | over tissue (HU) |",
              "|---|---|---|---|---|"]
    lines += [f"| {ROLE_TITLES[r]} | {fmt(e['long_strand_fraction'], 3)} | {fmt(e['strand_contrast_hu'], 0)} | "
              f"{fmt(e['strand_contrast_lung_hu'], 0)} | {fmt(e['strand_over_tissue_hu'], 0)} |"
              for r, e in results.items()]
    lines += ["", "**Where the nodule is drawn** (the drawn masks' largest components): the median distance of its "
              "centroid from the patch centre, where it was asked for; the share of draws whose centroid lies more "
              f"than {MISPLACED_MM:g} mm from it (*off the point*; an empty draw is not counted off); and the share "
              "of drawn nodules lying mostly (> 50 %) "
              f"on tissue the background already had (> {TISSUE_HU:.0f} HU: vessel, chest wall, mediastinum) — a mask "
              "laid over existing tissue passes the size and density measures without drawing a nodule. *Centred*: "
              "the same share for discs of the same areas at the centre, where a nodule at the point would lie. The "
              f"donors' real nodule slices lie {fmt(real_offset, 2)} mm from their patch centre (median), "
              f"{fmt(real_misplaced, 3)} of them more than {MISPLACED_MM:g} mm.", "",
              "| model | centroid offset (mm) | off the point | on existing tissue | centred discs on tissue |",
              "|---|---|---|---|---|"]
    lines += [f"| {ROLE_TITLES[r]} | {fmt(e['mask_offset_mm'], 2)} | {fmt(e['misplaced_fraction'], 3)} | "
              f"{fmt(e['mask_on_tissue_fraction'], 3)} | {fmt(e['mask_on_tissue_centred'], 3)} |"
              for r, e in results.items()]
    lines += ["", "**Size calibration**: each donor's generated diameter (median over its draws, an empty draw "
              "counting 0) over its real nodule's (the largest slice's), median over the donors and over the "
              "quarter of donors with the smallest real nodules — ρ cannot see a model that draws every nodule "
              "at half its size.", "", "| model | generated / real diameter | smallest quarter |", "|---|---|---|"]
    lines += [f"| {ROLE_TITLES[r]} | {fmt(e['size_ratio'], 2)} | {fmt(e['size_ratio_small'], 2)} |"
              for r, e in results.items()]
    real_core = next(iter(results.values()))["core_contrast_real_hu"] if results else float("nan")
    lines += ["", "**The nodule's core**: mean HU of the mask's inner half (within R/2 of its centroid) minus its "
              "outer half — a solid core in a ground-glass nodule is positive, a flat nodule ≈ 0 (nodules under "
              f"{CORE_MIN_PX} px do not count). Median over the donors; the donors' real nodules: "
              f"{fmt(real_core, 0)} HU. *ρ*: over the donors, against the donor's real nodule.", "",
              "| model | core contrast (HU) | ρ vs the donor's real nodule |", "|---|---|---|"]
    lines += [f"| {ROLE_TITLES[r]} | {fmt(e['core_contrast_hu'], 0)} | {fmt(e['core_rho'], 2)} |"
              for r, e in results.items()]
    lines.append("")
    if truth is not None and "proposed" in results:
        path = _gene_control_figure(ctx, ctx.cache["gene_control/proposed"]["per_donor"])
        metrics["figure"] = path
        lines += [f"![gene control]({path})", ""]
    summary: dict[str, Any] = {}
    if "proposed" in results:
        proposed = results["proposed"]
        for _label, _feature, _phenotype, _sign, key in GENE_CONTROL:
            if key is not None:
                row = proposed["rho"][_label]
                summary[key] = row.get("aligned_rho", float("nan"))
                if key == "size_rho":
                    summary["size_rho_ci95"] = row.get("aligned_ci95", [None, None])
        summary["empty_mask_fraction"] = proposed["empty_mask_fraction"]
        summary["noise_diversity"] = proposed["noise_diversity"]
        summary["long_strand_fraction"] = proposed["long_strand_fraction"]
        summary["long_strand_fraction_real"] = real_strands
        for name in STRAND_MEASURES:   # e.g. strand_contrast_hu, strand_contrast_real_hu
            summary[name] = proposed[name]
            summary[name.replace("_hu", "_real_hu")] = real_contrasts[name]
        summary["misplaced_fraction_real"] = real_misplaced
        for key in ("mask_offset_mm", "misplaced_fraction", "mask_on_tissue_fraction", "mask_on_tissue_centred",
                    "size_ratio", "size_ratio_small", "core_contrast_hu", "core_contrast_real_hu", "core_rho"):
            summary[key] = proposed[key]
    return Section(metrics, lines, summary)


# |t| bins of the slice profile's table: where a slice lies within its nodule, 0 at the centre, 1 where it ends
PROFILE_BINS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
PROFILE_BACKGROUNDS = 4


def _binned(position: np.ndarray, values: np.ndarray) -> list[float]:
    """Mean of `values` per |position| bin of PROFILE_BINS (NaN for an empty bin)."""
    which = np.clip(np.digitize(np.abs(position), PROFILE_BINS) - 1, 0, len(PROFILE_BINS) - 2)
    return [float(values[which == b].mean()) if (which == b).any() else float("nan")
            for b in range(len(PROFILE_BINS) - 1)]


@dataclass(frozen=True)
class ProfileDraw:
    """What the slice profile draws: the real slices of each held-out donor (rows into the nodule arrays, donors
    without a drawn real nodule left out), their places t, their real area fractions, and the backgrounds."""

    slices: list[np.ndarray]
    position: np.ndarray       # t of every row in `rows`
    real: np.ndarray           # real area / the donor's largest real area, per row
    backgrounds: np.ndarray    # indices of the held-out backgrounds drawn on

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate(self.slices) if self.slices else np.zeros(0, dtype=int)


def profile_draw(ctx: Context, backgrounds: int = PROFILE_BACKGROUNDS) -> ProfileDraw:
    """The donors' real slices and `backgrounds` held-out backgrounds for `profile_gap`."""
    data = ctx.data
    area = data.nodule_masks.reshape(data.num_nodules, -1).astype(bool).sum(axis=1).astype(np.float64)
    pool = ctx.backgrounds
    chosen = pool[ctx.rng(7).permutation(pool.size)[:backgrounds]]
    slices = [np.flatnonzero(data.nodule_patient == donor) for donor in ctx.donors]
    slices = [rows for rows in slices if rows.size and area[rows].max() > 0]
    real = np.concatenate([area[rows] / area[rows].max() for rows in slices]) if slices else np.zeros(0)
    rows = np.concatenate(slices) if slices else np.zeros(0, dtype=int)
    return ProfileDraw(slices, data.nodule_position()[rows], real, chosen)


def profile_gap(ctx: Context, model: Model, draw: ProfileDraw) -> dict[str, Any]:
    """`model` draws each donor's slices at their places t (one noise): each slice's area (mask > 0.5, mean over
    the backgrounds) as a fraction of the donor's largest; `gap` = mean |generated − real| fraction over the
    slices of donors it drew at all, `profile` = the fractions per |t| bin."""
    data = ctx.data
    backgrounds = data.background_images[draw.backgrounds]
    n_bg = backgrounds.shape[0]
    noise = seeded_noise(1, model.noise_dim, ctx.seed, 7)
    positions = np.split(draw.position, np.cumsum([rows.size for rows in draw.slices])[:-1])  # per donor
    generated = []
    for rows, position in zip(draw.slices, positions):
        donor = int(data.nodule_patient[rows[0]])
        inputs = np.tile(backgrounds, (rows.size, 1, 1))
        genes = np.repeat(model.genes[donor][None], inputs.shape[0], axis=0)
        _, masks = generate(model, inputs, genes, np.repeat(noise, inputs.shape[0], axis=0), device=ctx.device,
                            batch_size=ctx.batch_size, progress=False,
                            positions=np.repeat(position, n_bg).astype(np.float32))
        drawn = (masks > 0.5).reshape(rows.size, n_bg, -1).sum(axis=2).mean(axis=1)
        generated.append(drawn / drawn.max() if drawn.max() > 0 else np.full(rows.size, np.nan))
    fraction = np.concatenate(generated) if generated else np.zeros(0)
    finite = np.isfinite(fraction)
    gap = float(np.mean(np.abs(fraction[finite] - draw.real[finite]))) if finite.any() else float("nan")
    return {"reads_position": bool(getattr(model.generator.config, "slice_position", False)),
            "profile": _binned(draw.position[finite], fraction[finite]) if finite.any() else [], "gap": gap,
            "donors_drawn_empty": int(sum(np.isnan(g).all() for g in generated))}


def slice_profile(ctx: Context) -> Section:
    """3-D coherence at the patch level: each held-out donor's genes, one noise, a few backgrounds, a slice
    drawn at the place t of each of the donor's real nodule slices (0 at the nodule's centre, ±1 where it
    ends). Each slice's area (mask > 0.5, mean over the backgrounds) as a fraction of the donor's largest,
    against the same fraction of the real slice at that t: `slice_profile_error` is the mean absolute gap over
    all slices. A generator that does not read the position draws every slice alike (fraction 1) and fails
    by the real nodules' taper."""
    draw = profile_draw(ctx)
    real_profile = _binned(draw.position, draw.real)
    header = " | ".join(f"\\|t\\| {a:g}–{b:g}" for a, b in itertools.pairwise(PROFILE_BINS))  # escaped: a table
    lines = ["## 3-D coherence: the slice profile", "",
             f"Each held-out donor's genes on {draw.backgrounds.size} held-out backgrounds, one noise, a slice drawn "
             "at the place t of each of the donor's real nodule slices (t: 0 at the nodule's centre, ±1 where it "
             "ends; what insertion gives each chosen slice to a model that reads it). Area (mask > 0.5) as a "
             "fraction of the donor's largest slice, mean per |t| bin; *gap*: mean |generated − real| fraction "
             f"over {draw.rows.size} slices of {len(draw.slices)} donors. A model that does not read the position "
             "draws every slice alike (1 throughout). This is the generator alone: insertion also clips each slice "
             "to a sphere's cross-section (`shape_3d`).", "",
             f"| model | reads the position | {header} | gap |",
             "|---|---|" + "---|" * (len(PROFILE_BINS)),
             "| real nodules | | " + " | ".join(fmt(v, 2) for v in real_profile) + " | |"]
    results: dict[str, Any] = {}
    for model in ctx.gene_models():
        result = results[model.role] = profile_gap(ctx, model, draw)
        lines.append(f"| {ROLE_TITLES[model.role]} | {'yes' if result['reads_position'] else 'no'} | "
                     + " | ".join(fmt(v, 2) for v in result["profile"]) + f" | {fmt(result['gap'], 3)} |")
    lines.append("")
    metrics = {"bins": list(PROFILE_BINS), "real_profile": real_profile, "models": results}
    summary = {"slice_profile_error": results["proposed"]["gap"]} if "proposed" in results else {}
    return Section(metrics, lines, summary)


CODE_SHIFTS: tuple[float, ...] = (-2.0, 0.0, 2.0)   # in training-donor sd (anchor_sd code units each)
CODE_SWEEP_DONORS = 16


def code_axes(ctx: Context) -> Section:
    """The anchored axes of φ(g) (training's code-phenotype term, `losses.code_phenotype_features`): does
    each follow the held-out donors' true phenotype, and does the generator read it? Each axis is moved by
    −2, 0 and +2 sd with everything else fixed (up to 16 donors on the gene-control backgrounds, one noise
    each), and the generated feature's median reported beside the real donors' spread. A generator that
    ignores an axis gives the same number three times; the anchor-only model of round 3 did so for the margin."""
    model = next((m for m in ctx.gene_models() if m.role == "proposed"), None)
    trained_with = (model.metadata.provenance.get("loss_weights") or {}) if model is not None else {}
    title = ["## Anchored gene-code axes", ""]
    if model is None or not float(trained_with.get("code_phenotype") or 0):
        return Section({"anchored": False}, [*title, "The proposed model was trained without the code-phenotype "
                                             "anchor: its gene code has no named axes.", ""])
    data, donors = ctx.data, ctx.donors
    codes = encode(model, donors)
    anchor_sd = float(getattr(model.generator.config, "anchor_sd", 1.0))  # code units per training-donor sd
    swept = donors[np.linspace(0, donors.size - 1, min(CODE_SWEEP_DONORS, donors.size)).astype(int)]
    n_bg = int(ctx.option("backgrounds"))
    chosen = np.resize(ctx.backgrounds[ctx.rng(7).permutation(ctx.backgrounds.size)[:n_bg]], n_bg)
    noise = seeded_noise(n_bg, model.noise_dim, ctx.seed, 7)
    real = _real_features(data, donors, CONTROL_FEATURES)
    axes: dict[str, Any] = {}
    anchored = code_phenotype_features(getattr(model.generator.config, "spicules", 0),
                                       getattr(model.generator.config, "lobes", False))
    for index, feature in enumerate(anchored):
        label, _feature, phenotype, sign, _key = next(row for row in GENE_CONTROL if row[1] == feature)
        entry: dict[str, Any] = {"index": index, "measure": label, "aligned_rho_with_truth": None}
        if ctx.truth is not None and phenotype in ctx.truth.phenotypes:
            target = ctx.truth.phenotypes[phenotype][donors]
            entry["aligned_rho_with_truth"] = sign * spearman(codes[:, index], target)[0]
        sweep = []
        for shift in CODE_SHIFTS:
            per_donor = np.full(swept.size, np.nan)
            with shifted_code(model.generator, index, shift * anchor_sd):
                for row, donor in enumerate(swept):
                    genes = np.repeat(model.genes[donor][None], n_bg, axis=0)
                    images, masks = generate(model, data.background_images[chosen], genes, noise, device=ctx.device,
                                             batch_size=ctx.batch_size, progress=False)
                    values = [f[feature] for f in generated_features(images, masks, data.patch_spacing_mm, ctx.window)]
                    per_donor[row] = _nanmedian(np.asarray(values, dtype=np.float64), axis=0)
            sweep.append(float(_nanmedian(per_donor, axis=0)))
        entry["sweep"] = dict(zip([f"{shift:+g}" for shift in CODE_SHIFTS], sweep))
        entry["real_p10_p90"] = [float(v) for v in np.nanpercentile(real[:, CONTROL_FEATURES.index(feature)], [10, 90])]
        axes[feature] = entry
    lines = [*title, f"φ(g)[i] for i = 0…{len(anchored) - 1} was pulled towards the donor's real nodule "
             f"feature, z-scored over the training donors (× {anchor_sd:g}, the anchor's sd in code units). "
             "*ρ with the truth*: Spearman of the coordinate with the held-out donors' true phenotype × its "
             "expected sign. *Sweep*: the coordinate moved by "
             f"{', '.join(f'{v:+g}' for v in CODE_SHIFTS)} sd, all else fixed ({swept.size} donors × {n_bg} "
             "backgrounds), the generated feature's median; beside it the 10th–90th percentiles of the real donors' "
             "nodules as the gene-control table measures them (size: the largest slice; the rest area-weighted).", "",
             "| axis | measure | ρ with the truth | generated at " + " / ".join(f"{v:+g}" for v in CODE_SHIFTS)
             + " sd | real donors (10–90 %) |", "|---|---|---|---|---|"]
    for feature, entry in axes.items():
        low, high = entry["real_p10_p90"]
        sweep = " / ".join(fmt(v, 3) for v in entry["sweep"].values())
        lines.append(f"| {entry['index']}: {feature} | {entry['measure']} | {fmt(entry['aligned_rho_with_truth'], 2)} "
                     f"| {sweep} | {fmt(low, 3)}–{fmt(high, 3)} |")
    lines.append("")
    return Section({"anchored": True, "anchor_sd": anchor_sd, "shifts_sd": list(CODE_SHIFTS),
                    "donors": int(swept.size), "backgrounds": n_bg, "axes": axes}, lines)


def _gene_control_figure(ctx: Context, per_donor: np.ndarray) -> str:
    panels = []
    for label, feature, phenotype, sign, key in GENE_CONTROL:
        if key is None or phenotype not in ctx.truth.phenotypes:
            continue
        x = ctx.truth.phenotypes[phenotype][ctx.donors]
        y = per_donor[:, CONTROL_FEATURES.index(feature)]
        rho = spearman(x, y)[0]
        panels.append({"x": x, "y": y, "xlabel": f"donor's true {phenotype}", "ylabel": f"generated {feature}",
                       "title": f"{label}: ρ = {fmt(rho, 2)} ({'expected > 0' if sign > 0 else 'expected < 0'})",
                       "colour": np.maximum(ctx.truth.module_class[ctx.donors], 0) % 10})
    return figures.scatter_panels(ctx.out / "gene_control.png", panels,
                                  f"Gene control, {ctx.donors.size} held-out donors (proposed)").name


# ============================================================================================================
# Radiogenomic map (Fig. 4, ARI against the truth with its linear-probe ceiling and the raw-gene baseline)


def linear_probe_modules(ctx: Context, genes: np.ndarray) -> np.ndarray | None:
    """Module activations of the donors predicted linearly from their genes: ridge fitted on the dataset's
    training patients (split val/test), or out-of-fold over the donors themselves (split all, a cohort the
    model never saw). The ceiling a gene code can be compared with."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    truth = ctx.truth
    if truth is None or truth.activations is None:
        return None
    donors = ctx.donors
    alphas = np.logspace(-2, 5, 22)
    train = ctx.data.patients_in("train") if ctx.split != "all" else np.array([], dtype=np.int64)
    train = train[np.isfinite(truth.activations[train]).all(axis=1)] if train.size else train
    if train.size >= 8:
        model = RidgeCV(alphas=alphas).fit(genes[train], truth.activations[train])
        return model.predict(genes[donors])
    folds = KFold(min(5, donors.size), shuffle=True, random_state=ctx.seed)
    return cross_val_predict(RidgeCV(alphas=alphas), genes[donors], truth.activations[donors], cv=folds)


def radiogenomic_map(ctx: Context) -> Section:
    """Fig. 4 on the held-out donors and, with the truth, ARI/NMI of k-means (k = true classes) on φ(g), on
    the model's prepared genes, and on a linear probe's predicted modules; cross-validated R² of φ(g)."""
    truth, donors = ctx.truth, ctx.donors
    gene_source = ctx.models.get("proposed") or ctx.models.get("baseline")
    reps: dict[str, np.ndarray] = {}
    if gene_source is not None:
        reps["raw genes (prepared)"] = gene_source.genes[donors].astype(np.float64)
    for model in ctx.gene_models():
        reps[f"{model.role} code"] = encode(model, donors).astype(np.float64)
    if not reps:
        return Section({}, [], {})
    known = truth is not None and truth.num_classes > 1
    k = truth.num_classes if known else 3
    main = "proposed code" if "proposed code" in reps else list(reps)[-1]
    clusters = kmeans_labels(reps[main], k, ctx.seed)
    embeddings = [(name, embed_2d(values, ctx.seed)) for name, values in reps.items()]
    colourings = [(f"k-means of the {main}", clusters)]
    if known:
        colourings.append(("true module class", truth.module_class[donors]))
    examples = []
    for cluster in range(int(clusters.max()) + 1):
        slices = [ctx.largest_slice(int(p)) for p in donors[clusters == cluster]]
        examples.append((cluster, list(ctx.data.nodule_images[[s for s in slices if s is not None][:5]])))
    path = figures.tsne_figure(ctx.out / "fig4_tsne.png", embeddings, colourings, examples,
                               f"Fig. 4: t-SNE of {donors.size} held-out donors ({ctx.split})")
    metrics: dict[str, Any] = {"figure": path.name, "k": k, "cluster_of": main, "donors": int(donors.size)}
    lines = ["## Fig. 4: radiogenomic map (held-out donors)", "", f"![Fig. 4]({path.name})", "",
             f"t-SNE of the {donors.size} held-out donors' prepared genes and gene codes φ(g); colours: k-means "
             f"(k = {k}) of the {main}" + ("; second row: the true module class." if known else "."), ""]
    summary: dict[str, Any] = {}
    if not known:
        return Section(metrics, lines, summary)
    classes = truth.module_class[donors]
    scores: dict[str, Any] = {}
    probe = linear_probe_modules(ctx, gene_source.genes) if gene_source is not None else None
    candidates = dict(reps)
    if probe is not None:
        candidates["linear probe of the genes (ceiling)"] = probe
    for name, values in candidates.items():
        labels = kmeans_labels(values, k, ctx.seed)
        entry = {"ari": adjusted_rand(classes, labels), "nmi": normalized_mutual_info(classes, labels)}
        if not name.startswith("linear probe"):
            targets = dict(truth.phenotypes)
            if truth.activations is not None:
                targets.update({f"module_{m + 1}": truth.activations[:, m] for m in range(truth.num_modules)})
            entry["r2"] = {t: cross_validated_r2(values, y[donors], ctx.seed) for t, y in targets.items()}
        scores[name] = entry
    metrics["scores"] = scores
    lines += [f"k-means with k = {k} (the number of true classes) against the true module classes of the held-out "
              "donors. The linear probe predicts the module activations from the prepared genes "
              + ("(ridge fitted on the dataset's training patients)" if ctx.split != "all" else
                 "(ridge, out-of-fold over the donors: no training patient of the model is in this cohort)")
              + " and clusters those: what a simple map reaches.", "",
              "| representation | ARI | NMI |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(e['ari'], 2)} | {fmt(e['nmi'], 2)} |" for name, e in scores.items()]
    r2_names = [n for n in scores if "r2" in scores[n]]
    if r2_names:
        columns = list(scores[r2_names[0]]["r2"])
        lines += ["", "Cross-validated R² (ridge, 5-fold over the held-out donors) of each true phenotype from each "
                  "representation; nuisance phenotypes (not gene-driven) should stay ≤ 0: "
                  f"{', '.join(sorted(NUISANCE_PHENOTYPES & set(columns))) or 'none'}.", "",
                  "| representation | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {n} | " + " | ".join(fmt(scores[n]["r2"][c], 2) for c in columns) + " |" for n in r2_names]
    lines.append("")
    summary = {"ari": scores.get("proposed code", {}).get("ari", float("nan")),
               "ari_linear_probe": scores.get("linear probe of the genes (ceiling)", {}).get("ari", float("nan")),
               "ari_raw_genes": scores.get("raw genes (prepared)", {}).get("ari", float("nan"))}
    return Section(metrics, lines, summary)


# ============================================================================================================
# Realism: classifier two-sample test, many critics, donor-grouped, central crops


def _quartiles(values: np.ndarray) -> dict[str, float | int]:
    """Median, quartiles and count of the finite values (NaN for none)."""
    finite = values[np.isfinite(values)]
    q25, median, q75 = np.percentile(finite, [25, 50, 75]) if finite.size else (math.nan,) * 3
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "measured": int(finite.size)}


def interior_leak(images: np.ndarray, masks: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """Per generated image (n,S,S), how much of its background's structure shows through the drawn nodule:
    the slope β of `losses.background_leak` (1 = seen unchanged, 0 = replaced as a real nodule replaces the
    lung); NaN where the mask's inside is too small to measure."""
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]
               for a in (images, masks, backgrounds)]
    slope, counted = background_leak(*tensors)
    return np.where(counted.numpy(), slope.numpy(), np.nan)


def pasted_nodules(nodule_images: np.ndarray, nodule_masks: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
    """Real nodules laid on other backgrounds: each real image inside its mask grown by 1 px (the nodule's
    blurred edge comes along), the background elsewhere — what a generator that drew the real nodule itself
    would give on those backgrounds."""
    grown = ndimage.binary_dilation(nodule_masks > 0, structure=np.ones((1, 3, 3), dtype=bool))
    return np.where(grown, nodule_images, backgrounds).astype(np.float32)


def _texture_sentence(texture: dict[str, Any]) -> str:
    """The surroundings-matched test's inputs in words: real, offered and matched surroundings."""
    if not texture:
        return "no lung-only crops to match."
    said = {stat: ", ".join(f"{fmt(texture[f'{who}_{stat}'], 3)} {who.replace('_', ' ')}"
                            for who in ("real", "lung_only_backgrounds", "matched_backgrounds"))
            for stat in ("dense_share", "highpass_sd")}
    return (f"dense share {said['dense_share']}; texture sd {said['highpass_sd']} "
            f"({texture['distinct_backgrounds']} distinct backgrounds). What is left is the nodule.")


def realism(ctx: Context) -> Section:
    """C2ST of real held-out nodule slices against each model's images, over `c2st_runs` critic seeds, with
    the real-vs-real floor and the copy-background control; then again with both sides restricted to patches
    whose central crop is all lung (`surroundings.wall_fraction`), which takes the chest wall out of the test.
    Each generated image is drawn with the genes of one sampled real slice's donor and, for a model that reads
    the slice position, at that slice's place t in its nodule. On the lung-only backgrounds it also measures
    how much of the background's structure shows through each drawn nodule (`interior_leak`). Both tests are
    repeated with the real nodules themselves pasted on the same backgrounds (`pasted_nodules`): the floor a
    perfect nodule could reach there, which the backgrounds alone hold above 0.5."""
    data = ctx.data
    crop = int(ctx.option("c2st_crop"))
    samples = int(ctx.option("c2st_samples"))
    runs = int(ctx.option("c2st_runs"))
    epochs = int(ctx.option("c2st_epochs"))
    window = ctx.window
    nodules = ctx.nodule_slices()
    rng = ctx.rng(7)
    real_idx = nodules[rng.permutation(nodules.size)[:samples]]
    real = central_crop(data.nodule_images[real_idx], crop)
    real_groups = data.nodule_patient[real_idx]
    backgrounds = ctx.backgrounds
    bg_idx = backgrounds[rng.integers(backgrounds.size, size=samples)]
    real_wall = wall_fraction(data.nodule_images[real_idx], window, data.nodule_masks[real_idx], crop)
    background_wall = wall_fraction(data.background_images[backgrounds], window, crop=crop)
    open_backgrounds = backgrounds[background_wall <= LUNG_ONLY]
    matched_bg = (open_backgrounds[rng.integers(open_backgrounds.size, size=samples)] if open_backgrounds.size
                  else np.zeros(0, dtype=np.int64))
    real_open = real_wall <= LUNG_ONLY
    # each lung-only real crop against the lung-only background whose surroundings are most like its own (dense
    # share, texture): the backgrounds lie near the pleura, the real nodules deep in the lung, and the real
    # nodules pasted on unmatched backgrounds were still told apart (round 11: 0.64). Its own stream, so the
    # draws above and below are those of earlier rounds.
    open_idx = real_idx[real_open]
    alike_bg = np.zeros(0, dtype=np.int64)
    texture: dict[str, Any] = {}
    if open_backgrounds.size and open_idx.size:
        wanted, offered = texture_pair(data.nodule_images[open_idx], data.nodule_masks[open_idx],
                                       data.background_images[open_backgrounds], window, crop)
        chosen = match_surroundings(wanted, offered, ctx.rng(8))[:, 0]
        alike_bg = open_backgrounds[chosen]
        texture = {f"{name}_{stat}": float(np.nanmean(values[:, k])) for name, values in
                   (("real", wanted), ("lung_only_backgrounds", offered), ("matched_backgrounds", offered[chosen]))
                   for k, stat in enumerate(("dense_share", "highpass_sd"))}
        texture["distinct_backgrounds"] = int(np.unique(alike_bg).size)
    # each generated image is the counterpart of one real slice (cycled: the split may hold fewer): that slice's
    # donor's genes, at its place in the nodule. Donors drawn uniformly instead gave the synthetic side more
    # small nodules than the slice-weighted real side, where a large nodule has many slices.
    positions = data.nodule_position()
    fake_positions = np.resize(positions[real_idx], samples)
    donors = np.resize(real_groups, samples)
    fakes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    matched: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    alike: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    draws = ((bg_idx, donors, fake_positions, fakes), (matched_bg, donors, fake_positions, matched),
             (alike_bg, real_groups[real_open], positions[open_idx], alike))
    leaks: dict[str, np.ndarray] = {}
    for model in [*ctx.models.values(), *[c for c in ctx.controls if c.role == "copy"]]:
        if model.role == "inpainting":
            holes = holes_for((data.nodule_masks[real_idx] > 0).astype(np.float32))
            images, _ = generate(model, data.nodule_images[real_idx], holes=holes, device=ctx.device,
                                 batch_size=ctx.batch_size, desc="C2ST inpainting", progress=ctx.progress)
            fakes[model.role] = (central_crop(images, crop), real_groups + 1_000_000)
            continue
        noise = seeded_noise(samples, model.noise_dim, ctx.seed, 7)
        for chosen, who, where, into in draws:
            if chosen.size == 0:
                continue
            images, masks = generate(model, data.background_images[chosen], model.genes[who], noise[: chosen.size],
                                     device=ctx.device, batch_size=ctx.batch_size, desc=f"C2ST {model.role}",
                                     progress=ctx.progress, positions=where)
            into[model.role] = (central_crop(images, crop), data.background_patient[chosen] + 1_000_000)
            if into is matched:
                leaks[model.role] = interior_leak(images, masks, data.background_images[chosen])

    def repeated(first: np.ndarray, first_groups: np.ndarray, second: np.ndarray, second_groups: np.ndarray,
                 label: str) -> dict[str, Any]:
        accuracies, collapsed = [], 0
        for run in tqdm(range(runs), desc=f"C2ST {label}", leave=False, file=sys.stderr, disable=not ctx.progress):
            result = classifier_two_sample_test(first, second, seed=ctx.seed * 1000 + run, epochs=epochs,
                                                real_groups=first_groups, fake_groups=second_groups)
            accuracies.append(result["accuracy"])
            collapsed += int(result["collapsed"])
        values = np.asarray(accuracies)
        return {"median": float(np.nanmedian(values)), "q25": float(np.nanpercentile(values, 25)),
                "q75": float(np.nanpercentile(values, 75)), "min": float(np.nanmin(values)),
                "max": float(np.nanmax(values)), "runs": runs, "collapsed_critics": collapsed,
                "accuracies": accuracies}

    sources = np.resize(real_idx, samples)          # the real slices, cycled as the donors are
    for chosen, real_slices, into in ((bg_idx, sources, fakes), (matched_bg, sources, matched),
                                      (alike_bg, open_idx, alike)):
        if chosen.size:
            pasted = pasted_nodules(data.nodule_images[real_slices], data.nodule_masks[real_slices],
                                    data.background_images[chosen])
            into["pasted"] = (central_crop(pasted, crop), data.background_patient[chosen] + 1_000_000)
    results = {role: repeated(real, real_groups, images, groups, role) for role, (images, groups) in fakes.items()}
    results_matched = {role: repeated(real[real_open], real_groups[real_open], images, groups, f"{role}, lung only")
                       for role, (images, groups) in matched.items()} if real_open.sum() >= 8 else {}
    results_alike = {role: repeated(real[real_open], real_groups[real_open], images, groups,
                                    f"{role}, surroundings matched")
                     for role, (images, groups) in alike.items()} if real_open.sum() >= 8 else {}
    # real vs real: the donors split in two halves, labelled as if one half were synthetic
    halves = rng.permutation(np.unique(real_groups))
    second = np.isin(real_groups, halves[: halves.size // 2])
    floor = repeated(real[~second], real_groups[~second], real[second], real_groups[second], "real vs real")
    leak = {role: _quartiles(v) for role, v in leaks.items()}
    metrics = {"models": results, "lung_only": results_matched, "surroundings_matched": results_alike,
               "real_vs_real": floor, "crop_px": crop, "interior_leak": leak, "surroundings": texture,
               "samples_per_class": int(real.shape[0]), "epochs": epochs,
               "wall": {"real_with_wall": float(np.mean(~real_open)),
                        "backgrounds_with_wall": float(np.mean(background_wall > LUNG_ONLY)),
                        "lung_only_backgrounds": int(open_backgrounds.size)}}
    lines = ["## Realism: classifier two-sample test", "",
             f"A small CNN learns real held-out nodule slices against each model's images ({real.shape[0]} per class, "
             f"central {crop}×{crop} px; each image drawn with the genes of one real slice's donor, at its place in "
             f"the nodule), {epochs} epochs, "
             f"{runs} critics (seeds); each critic's train and test halves are split by donor (real) and by "
             "background patient (synthetic), so memorising a patient does not help. Balanced accuracy on the test "
             "half: 0.5 = indistinguishable. *Real vs real*: the donors split in two halves — the floor a critic "
             "reaches on two samples of the same distribution.", "",
             f"**Position confound**: {fmt(100 * np.mean(background_wall > LUNG_ONLY), 0)} % of the held-out "
             f"backgrounds' central crops hold chest wall or mediastinum (> {LUNG_ONLY:.0%} of the crop in large "
             f"dense components), against {fmt(100 * np.mean(~real_open), 0)} % of the real nodule crops, so a "
             "critic can tell a generated patch by its surroundings alone. The *lung only* rows repeat the test "
             f"with both sides restricted to crops without wall ({open_backgrounds.size} backgrounds, "
             f"{int(real_open.sum())} real crops): what is left is the nodule and the texture. The *pasted* rows lay "
             "the real nodules themselves on the same backgrounds, in both tests: the floor a perfect nodule could "
             "reach there.", "",
             "**Surroundings matched**: without the wall the lung still differs — the backgrounds lie near the "
             "pleura, the real nodules deeper, and a critic tells the real nodules pasted on lung-only backgrounds "
             "from the real crops. The *surroundings matched* rows give each lung-only real crop the lung-only "
             "background whose surroundings (share of dense pixels and high-passed texture outside the nodule) "
             "are most like its own, the nodule drawn with that crop's donor's genes at its place: "
             + _texture_sentence(texture), "",
             "| images | median | interquartile | min–max | collapsed critics |", "|---|---|---|---|---|"]
    rows = [*((ROLE_TITLES.get(role, role), e) for role, e in results.items()),
            *((f"{ROLE_TITLES.get(role, role)}, lung only", e) for role, e in results_matched.items()),
            *((f"{ROLE_TITLES.get(role, role)}, surroundings matched", e) for role, e in results_alike.items()),
            ("real vs real", floor)]
    for title, e in rows:
        lines.append(f"| {title} | {fmt(e['median'], 2)} | {fmt(e['q25'], 2)}–{fmt(e['q75'], 2)} | "
                     f"{fmt(e['min'], 2)}–{fmt(e['max'], 2)} | {e['collapsed_critics']} of {e['runs']} |")
    lines.append("")
    if leak:
        lines += ["**Background through the nodule** (lung-only backgrounds): the slope β of the drawn nodule's "
                  "band-pass (vessel-sized structure) on its background's, inside the mask; 1 = the background "
                  "shows through unchanged, 0 = the nodule replaces the lung as a real one does.", "",
                  "| images | median β | interquartile | nodules measured |", "|---|---|---|---|"]
        lines += [f"| {ROLE_TITLES.get(role, role)} | {fmt(e['median'], 2)} | {fmt(e['q25'], 2)}–{fmt(e['q75'], 2)} "
                  f"| {e['measured']} |" for role, e in leak.items()]
        lines.append("")
    summary = {"c2st_runs": runs, "c2st_real_vs_real": floor["median"]}
    if "proposed" in results:
        summary["c2st_median"] = results["proposed"]["median"]
    nan = float("nan")
    summary["c2st_lung_only"] = results_matched.get("proposed", {}).get("median", nan)
    summary["c2st_lung_only_copy"] = results_matched.get("copy", {}).get("median", nan)
    summary["c2st_pasted"] = results.get("pasted", {}).get("median", nan)
    summary["c2st_lung_only_pasted"] = results_matched.get("pasted", {}).get("median", nan)
    summary["c2st_matched"] = results_alike.get("proposed", {}).get("median", nan)
    summary["c2st_matched_copy"] = results_alike.get("copy", {}).get("median", nan)
    summary["c2st_matched_pasted"] = results_alike.get("pasted", {}).get("median", nan)
    summary["interior_leak"] = leak.get("proposed", {}).get("median", nan)
    return Section(metrics, lines, summary)


# ============================================================================================================
# Fig. 3 and module → phenotype links


def figure3(ctx: Context, count: int = 7) -> Section:
    """The paper's Fig. 3 on held-out donors and backgrounds (round-robin over the true classes when known)."""
    data = ctx.data
    candidates = [int(p) for p in ctx.donors[ctx.rng(3).permutation(ctx.donors.size)]]
    donors: list[int] = []
    if ctx.truth is not None:
        by_class: dict[int, list[int]] = {}
        for p in candidates:
            by_class.setdefault(int(ctx.truth.module_class[p]), []).append(p)
        while len(donors) < min(count, len(candidates)):
            for cls in sorted(by_class):
                if by_class[cls] and len(donors) < count:
                    donors.append(by_class[cls].pop(0))
    else:
        donors = candidates[:count]
    if not donors:
        return Section({"path": None}, ["## Fig. 3", "", "Not drawn: no held-out donor has nodule slices.", ""])
    pool = ctx.backgrounds
    chosen = np.resize(pool[ctx.rng(4).permutation(pool.size)[: len(donors)]], len(donors))
    bg = data.background_images[chosen]
    donor_slices = [ctx.largest_slice(p) for p in donors]
    rows: list[tuple[str, list]] = [("donor", list(data.nodule_images[donor_slices])), ("background", list(bg))]
    for role in ("inpainting", "baseline", "proposed"):
        model = ctx.models.get(role)
        if model is None:
            continue
        if role == "inpainting":
            holes = holes_for((data.nodule_masks[donor_slices] > 0).astype(np.float32))
            images, _ = generate(model, bg, holes=holes, device=ctx.device, progress=False)
        else:
            noise = seeded_noise(len(donors), model.noise_dim, ctx.seed, 3)
            images, _ = generate(model, bg, model.genes[donors], noise, device=ctx.device, progress=False)
        rows.append((role, list(images)))
    titles = [str(data.patient_ids[p]) for p in donors]
    if ctx.truth is not None:
        titles = [f"{t}\nclass {int(ctx.truth.module_class[p])}" for t, p in zip(titles, donors)]
    path = figures.sample_grid(ctx.out / "fig3_samples.png", rows, titles,
                               "Fig. 3: held-out donors' genes (columns) synthesised into held-out backgrounds")
    lines = ["## Fig. 3: samples", "", f"![Fig. 3]({path.name})", "",
             "Rows: the donor's real nodule slice (largest), a held-out background, then each model on that "
             "background with the donor's genes (in-painting: a disc of 1.5× the donor's radius erased); one seeded "
             "noise per column.", ""]
    return Section({"path": path.name, "donors": [str(data.patient_ids[p]) for p in donors]}, lines)


def links(ctx: Context) -> Section:
    """Module→phenotype links: the conventional three-step pipeline on the donors' real nodules against the
    same metagenes × the features of each model's gene-controlled nodules (needs gene control first)."""
    truth, donors = ctx.truth, ctx.donors
    alpha = float(ctx.option("alpha"))
    conv = conventional_pipeline(ctx.data, truth, donors, alpha=alpha)
    units = conv["units"]
    modules = list(range(1, truth.num_modules + 1)) if truth is not None and truth.num_modules else None
    correlation = module_correlation(truth, conv["patients"])
    rows: dict[str, Any] = {"conventional (metagenes × real-nodule features)": conv["links"]}
    for model in ctx.gene_models():
        gens = ctx.cache.get(f"gene_control/{model.role}")
        if gens is None:
            continue
        values = gens["per_donor"][:, : len(NODULE_FEATURES)]
        rows[f"{model.role} (metagenes × gene-controlled nodule features)"] = association_links(
            units["values"], units["names"], units["modules"], values, NODULE_FEATURES, alpha=alpha,
            modules_in_truth=modules, module_correlation=correlation)
    metrics = {"n_metagenes": conv["n_metagenes"], "metagene_sizes": conv["metagenes"]["sizes"], "links": rows}
    lines = ["## Module → phenotype links: conventional pipeline vs synthesis", "",
             f"Step 1: {conv['n_metagenes']} co-expression metagenes of the dataset's training patients; step 2: "
             "hand-crafted features of each held-out donor's real nodule slices; step 3: Spearman ρ with "
             f"Benjamini–Hochberg, q < {alpha}. The model rows replace step 2 by the same features of the nodules "
             "each model generates from the donor's genes. True links: "
             + ", ".join(f"{m}→{f}" for m, f in sorted(_TRUE_LINKS)) + ".", "",
             "| approach | donors | significant | true links recovered | false links | missed |",
             "|---|---|---|---|---|---|"]
    for name, e in rows.items():
        missed = ", ".join(f"{m}→{f}" for m, f in e["missed"]) or "none"
        lines.append(f"| {name} | {e['n_patients']} | {e['n_significant']} | {e['n_recovered']} of "
                     f"{e['n_true_links']} | {e['n_false']} | {missed} |")
    lines.append("")
    return Section(metrics, lines)


#: name → section, in the order they run (gene control before links, which reuses its generations)
SECTIONS: dict[str, Callable[[Context], Section]] = {
    "table1": table1,
    "gene_control": gene_control,
    "code_axes": code_axes,
    "slice_profile": slice_profile,
    "radiogenomic_map": radiogenomic_map,
    "realism": realism,
    "figure3": figure3,
    "links": links,
}
