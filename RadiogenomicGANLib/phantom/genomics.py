"""Latent gene modules → module activations and an RNA-seq profile (linear FPKM, exact zeros, literal NA).

Why: the phantom needs a *known* gene→image truth, and a genome that stays put. The **biology** — gene names,
modules, loadings, co-expression, the NA and low-expression pattern — is a versioned constant
(`BIOLOGY_VERSION`), the same for every cohort seed, as a genome is; the seed draws patients only. So a model
trained on one seed's cohort reads any other seed's table, and a cohort of an unseen seed is a fair test set.

Biology 1 (at the default 5172 complete genes; smaller test tables scale every block down):

- **Image modules** 1–4 (`IMAGE_MODULE_GENES`, 140–260 genes each) drive the nodule (see `nodule`). Each
  patient belongs to one of a few classes; modules 1–3 are the class prototype (±1) plus N(0, 0.4²)
  (continuous, uncorrelated across patients); module 4 is class-free N(0, 1).
- **Expression programmes with no image effect** (`N_SILENT_MODULES` = 12, 100–200 genes each, latent N(0, 1)
  per patient): co-expression as strong as the image modules', which the image must teach the model to ignore.
- Every module gene has log2 expression ``base + loading · latent + noise`` with its correlation to the
  latent drawn in 0.4–0.7 (`MODULE_GENE_R`): single genes are weak, a module of them is strong.
- The other genes are independent: expressed genes, **low-expression** genes (about a quarter: mostly exact
  zeros) and **near-constant** genes (housekeeping-like, log2 sd 0.02–0.06: a z-score fitted on a few
  training patients explodes on them unless they are filtered). Exact zeros come from dropout of low values.

What a linear oracle reaches on it (`GenePreprocessing` fitted on training patients of seed 1, ridge regression
to each image module, scored on 200 patients of seed 2 it never saw; `Testing/benchmarks/bench_phantom_biology.py`,
genes only): with 140 training patients R² 0.91 / 0.89 / 0.93 / 0.86 for modules 1–4, and k-means (k = 4) of
the predicted modules 1–3 recovers the classes (ARI 1.00); with 44 training patients (a 64-patient cohort's
train split) R² 0.55–0.71 and ARI 0.96. k-means of the prepared genes themselves: ARI 0.60 / 0.51 — the
silent programmes blur the classes.

NA placement: the table has ``n_genes`` complete genes plus ``n_na_genes`` genes that carry at least one
``NA`` in the written cohort (`write_cohort` guarantees "at least one" over the samples it writes), plus
a few ``__``-prefixed counter rows that also carry an NA, so "drop every gene with an NA" leaves exactly
``n_genes`` rows whether or not a reader drops the ``_`` rows first. Module genes are always complete.
In ``ground_truth_genes.csv`` a gene's module is m ≥ 1 for image module m, −f for silent programme f and 0
for an independent gene.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Class prototypes for the default K = 4 modules (rows: classes, columns: modules 1..4). Module 1 → size,
# 2 → solid/ground-glass density, 3 → margin blur + spiculation, 4 → lobulation (see nodule.py).
# Columns 1–3 are orthogonal and zero-mean (Hadamard), so the modules are uncorrelated across patients and
# each phenotype is attributable to one module; module 4 has no class structure (continuous, N(0, 1)).
DEFAULT_PROTOTYPES = np.array(
    [
        [+1.0, +1.0, -1.0, 0.0],  # class 0: large, solid, sharp smooth margin
        [-1.0, +1.0, +1.0, 0.0],  # class 1: small, solid, spiculated / fuzzy
        [+1.0, -1.0, +1.0, 0.0],  # class 2: large, ground-glass, spiculated / fuzzy
        [-1.0, -1.0, -1.0, 0.0],  # class 3: small, ground-glass, sharp smooth margin
    ]
)
CLASS_FREE_SD = 1.0  # spread of a module without class structure
ACTIVATION_NOISE = 0.4  # continuous phenotypes, classes still recoverable
COUNTER_ROWS = ("__no_feature", "__ambiguous", "__alignment_not_unique")

_FAMILIES = (
    "ABCA", "ABCB", "ABCC", "ACSL", "ADAM", "ADAMTS", "AKAP", "ALDH", "ANKRD", "ANO", "ARHGAP", "ARHGEF",
    "ATP", "BTBD", "C1orf", "C2orf", "C9orf", "CACNA", "CCDC", "CD", "CDH", "CDK", "CEP", "CLDN", "COL",
    "CPNE", "CSNK", "CYP", "DCAF", "DDX", "DHX", "DNAJB", "DNAJC", "DUSP", "EIF", "ELOVL", "EPHA", "FAM",
    "FBXL", "FBXO", "FGF", "FOXO", "FOXP", "FZD", "GAB", "GALNT", "GATA", "GPR", "GRIK", "GRM", "GSTM",
    "HDAC", "HOXA", "HOXB", "HSPA", "IFIT", "IGF", "IL", "INPP", "ITGA", "ITGB", "KCNA", "KCNJ", "KIAA",
    "KIF", "KLF", "KLHL", "KRT", "LRRC", "MAP", "MAPK", "MED", "MMP", "MRPL", "MRPS", "MYO", "NDUFA",
    "NDUFB", "NOTCH", "NUP", "OR", "PAX", "PCDH", "PDE", "PLEKH", "PPP1R", "PRKC", "PSMA", "PSMB", "PTPR",
    "RAB", "RBM", "RNF", "RPL", "RPS", "SCN", "SEMA", "SERPINA", "SH3", "SLC", "SMAD", "SNX", "SOX",
    "SPATA", "STK", "SYT", "TBC1D", "TMEM", "TNF", "TRIM", "TTC", "UBE2", "USP", "VPS", "WDR", "WNT",
    "ZBTB", "ZC3H", "ZNF",
)
# Excel-mangling-prone symbols exist in real tables; keep a few so readers meet them.
_EXTRA_SYMBOLS = ("SEPT7", "MARCH5", "DEC1", "NOV", "TP53", "EGFR", "KRAS", "ALK", "STK11", "KEAP1")


BIOLOGY_VERSION = 1
IMAGE_MODULE_GENES = (220, 180, 260, 140)  # modules 1–4 at 5172 genes (scaled for smaller tables)
N_SILENT_MODULES = 12
SILENT_MODULE_GENES = (100, 200)  # range of a silent programme's size at 5172 genes
MODULE_GENE_R = (0.4, 0.7)  # correlation of one module gene's log2 expression with its module's latent
LOW_EXPRESSION_SHARE = 0.25  # of the independent genes
NEAR_CONSTANT_SHARE = 0.05  # of the independent genes
REFERENCE_GENES = 5172


@dataclass(frozen=True)
class GeneModel:
    """The phantom's biology: gene parameters shared by every patient of every cohort seed."""

    gene_names: tuple[str, ...]  # every table row, counter rows last
    module_of_gene: np.ndarray  # (G,) int: 0 = independent, m = image module m (1-based), -f = silent programme f
    loading: np.ndarray  # (G,) log2 units per unit of the driving latent
    base: np.ndarray  # (G,) log2(FPKM+1) mean
    noise_sd: np.ndarray  # (G,)
    na_probability: np.ndarray  # (G,) 0 for complete genes
    n_genes: int  # complete genes (the count after NA drop)
    n_modules: int
    n_nuisance: int  # silent programmes
    biology: int = BIOLOGY_VERSION

    @property
    def na_rows(self) -> np.ndarray:
        return np.flatnonzero(self.na_probability > 0)


def _gene_symbols(count: int, rng: np.random.Generator) -> list[str]:
    """Unique HGNC-like symbols (family prefix + number [+ letter])."""
    names: list[str] = list(_EXTRA_SYMBOLS[: max(0, min(len(_EXTRA_SYMBOLS), count // 20))])
    seen = set(names)
    letters = ["", "", "", "A", "B", "L", "P1", "-AS1"]
    while len(names) < count:
        need = count - len(names)
        fam = rng.choice(_FAMILIES, size=2 * need + 16)
        num = rng.integers(1, 100, size=fam.size)
        suf = rng.choice(letters, size=fam.size)
        for f, n, s in zip(fam, num, suf):
            name = f"{f}{n}{s}"
            if name not in seen:
                seen.add(name)
                names.append(name)
                if len(names) == count:
                    break
    order = rng.permutation(count)
    return [names[i] for i in order]


def _latent_sd(n_modules: int, n_classes: int = 4) -> np.ndarray:
    """Population sd of each image module's activation (prototype spread + activation noise)."""
    table = prototypes(n_modules, n_classes)
    spread = np.where(np.all(table == 0.0, axis=0), CLASS_FREE_SD, ACTIVATION_NOISE)
    return np.sqrt((table**2).mean(axis=0) + spread**2)


@lru_cache(maxsize=8)
def gene_model(
    n_genes: int = REFERENCE_GENES,
    n_na_genes: int | None = None,
    n_modules: int = 4,
    *,
    biology: int = BIOLOGY_VERSION,
) -> GeneModel:
    """The biology for a table of `n_genes` complete genes (cached); independent of any cohort seed.

    Block sizes scale with ``n_genes / 5172`` (at least 5 genes per module), so a small test table keeps the
    same proportions: modules, silent programmes, low-expression and near-constant genes.
    """
    if biology != BIOLOGY_VERSION:
        raise ValueError(f"phantom biology {biology} is not known; this version writes biology {BIOLOGY_VERSION}")
    if n_na_genes is None:
        n_na_genes = max(3, n_genes // 2)
    rng = np.random.default_rng([BIOLOGY_VERSION, 0xB10, n_genes, n_na_genes, n_modules])
    scale = n_genes / REFERENCE_GENES
    sizes = [IMAGE_MODULE_GENES[(m - 1) % len(IMAGE_MODULE_GENES)] for m in range(1, n_modules + 1)]
    per_module = [max(5, round(s * scale)) for s in sizes]
    per_silent = [max(5, round(s * scale)) for s in rng.integers(*SILENT_MODULE_GENES, size=N_SILENT_MODULES,
                                                                   endpoint=True)]
    while sum(per_module) + sum(per_silent) > 0.55 * n_genes and per_silent:  # tiny tables: fewer programmes
        per_silent.pop()
    if sum(per_module) > n_genes:
        raise ValueError(f"n_genes={n_genes} is too small for {n_modules} modules of ≥ 5 genes")

    n_rows = n_genes + n_na_genes
    total = n_rows + len(COUNTER_ROWS)
    module_of = np.zeros(total, dtype=np.int64)
    complete = rng.permutation(n_genes)  # complete genes come first before the final shuffle
    cursor = 0
    for label, count in [(m, c) for m, c in enumerate(per_module, 1)] + [(-f, c) for f, c in enumerate(per_silent, 1)]:
        module_of[complete[cursor : cursor + count]] = label
        cursor += count
    independent = complete[cursor:]
    n_low = round(LOW_EXPRESSION_SHARE * independent.size)
    n_flat = round(NEAR_CONSTANT_SHARE * independent.size)
    low, flat = independent[:n_low], independent[n_low : n_low + n_flat]

    base = np.where(rng.random(total) < 0.15, rng.uniform(-1.5, 1.5, total), rng.uniform(1.0, 9.0, total))
    noise_sd = rng.uniform(0.2, 0.9, total)
    base[low] = rng.uniform(-2.5, 0.6, low.size)
    base[flat] = rng.uniform(5.0, 10.0, flat.size)
    noise_sd[flat] = rng.uniform(0.02, 0.06, flat.size)
    loading = np.zeros(total)
    driven = np.flatnonzero(module_of != 0)
    base[driven] = rng.uniform(3.0, 8.0, driven.size)  # expressed, so the signal survives log2(x+1)
    noise_sd[driven] = rng.uniform(0.3, 0.7, driven.size)
    r = rng.uniform(*MODULE_GENE_R, driven.size)
    latent_sd = np.ones(total)
    image = module_of[driven] > 0
    latent_sd[driven[image]] = _latent_sd(n_modules)[module_of[driven[image]] - 1]
    # corr(gene, latent) = r  ⇔  |loading| · sd(latent) = noise_sd · r / √(1 − r²)
    loading[driven] = (rng.choice([-1.0, 1.0], driven.size) * noise_sd[driven] * r / np.sqrt(1.0 - r**2)
                       / latent_sd[driven])
    na_prob = np.zeros(total)
    na_prob[n_genes:] = rng.uniform(0.05, 0.9, size=total - n_genes)
    counters = slice(n_rows, total)  # HTSeq-like read counts, not FPKM; large values
    base[counters] = rng.uniform(17.0, 21.0, size=len(COUNTER_ROWS))
    noise_sd[counters] = 0.3

    names = _gene_symbols(n_rows, rng) + list(COUNTER_ROWS)
    # Shuffle gene rows (not the counter rows) so modules and NA genes are scattered through the table.
    order = np.concatenate([rng.permutation(n_rows), np.arange(n_rows, total)])
    return GeneModel(
        gene_names=tuple(names),
        module_of_gene=module_of[order],
        loading=loading[order],
        base=base[order],
        noise_sd=noise_sd[order],
        na_probability=na_prob[order],
        n_genes=n_genes,
        n_modules=n_modules,
        n_nuisance=len(per_silent),
    )


def prototypes(n_modules: int, n_classes: int) -> np.ndarray:
    """Class prototypes (n_classes, n_modules): the documented table for 4×4, else Hadamard columns.

    For other shapes, the zero-mean columns of the Sylvester–Hadamard matrix give (for a power-of-two class
    count) uncorrelated modules; modules beyond the available columns are class-free (zero column).
    """
    if n_modules == 4 and n_classes == 4:
        return DEFAULT_PROTOTYPES.copy()
    size = 1
    while size < max(2, n_classes):
        size *= 2
    hadamard = np.array([[1.0]])
    while hadamard.shape[0] < size:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    columns = hadamard[:n_classes, 1 : min(size, n_modules + 1)]
    table = np.zeros((n_classes, n_modules))
    table[:, : columns.shape[1]] = columns
    return table


def module_class_of(patient_index: int, seed: int, n_classes: int) -> int:
    """Balanced classes: each block of n_classes consecutive patients holds every class once."""
    block, slot = divmod(patient_index, n_classes)
    return int(np.random.default_rng([seed, 0xC1A55, block]).permutation(n_classes)[slot])


def draw_module_activations(
    patient_index: int, seed: int, n_modules: int = 4, n_classes: int = 4
) -> tuple[int, np.ndarray]:
    """(class, activations): prototype of the patient's class + noise (N(0, 1) for class-free modules)."""
    cls = module_class_of(patient_index, seed, n_classes)
    rng = np.random.default_rng([seed, 0xAC7, patient_index])
    table = prototypes(n_modules, n_classes)
    spread = np.where(np.all(table == 0.0, axis=0), CLASS_FREE_SD, ACTIVATION_NOISE)
    return cls, table[cls] + spread * rng.standard_normal(n_modules)


def gene_profile(model: GeneModel, activations: np.ndarray, patient_index: int, seed: int) -> np.ndarray:
    """Linear FPKM vector (G,) float64 with exact zeros and NaN where the table will say ``NA``."""
    rng = np.random.default_rng([seed, 0x9E7E, patient_index])
    total = len(model.gene_names)
    nuisance = rng.standard_normal(max(1, model.n_nuisance))
    latent = np.zeros(total)
    m = model.module_of_gene
    for k in range(1, model.n_modules + 1):
        latent[m == k] = activations[k - 1] if k <= activations.size else 0.0
    for f in range(1, model.n_nuisance + 1):
        latent[m == -f] = nuisance[f - 1]
    log_expr = model.base + model.loading * latent + model.noise_sd * rng.standard_normal(total)
    fpkm = np.exp2(log_expr) - 1.0
    # Exact zeros: low expression drops out (like unobserved transcripts), more often the lower it is.
    dropout = rng.random(total) < 1.0 / (1.0 + np.exp(3.0 * (log_expr - 0.8)))
    fpkm[(fpkm <= 0.0) | dropout] = 0.0
    fpkm = np.round(fpkm, 4)  # the precision the GEO writer uses, so memory and file agree
    counters = np.isin(np.asarray(model.gene_names), COUNTER_ROWS)
    fpkm[counters] = np.round(fpkm[counters])
    fpkm[rng.random(total) < model.na_probability] = np.nan
    return fpkm
