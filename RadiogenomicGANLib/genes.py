"""Gene-expression tables: reading, NA handling, log transform, z-scoring and per-sample model profiles.

The reference table is GEO GSE103584 (`GSE103584_R01_NSCLC_RNAseq.txt(.gz)`): tab-separated, an empty first
header cell followed by sample ids (`R01-xxx`), one row per HGNC symbol, linear Cufflinks FPKM with the
literal `NA` for missing values. Dropping every gene with an NA leaves the paper's 5172 genes. The
preprocessing (`GenePreprocessing`) is log2(x + 1), a low-expression / near-constant filter, a per-gene
z-score clipped to ±5, and optionally a PCA projection — all fitted on the *training* patients only; the fit
travels with the weights so a profile chosen at inference time is prepared exactly as the training profiles
were.

Tables here are genes × samples, (G, S), float64 with NaN for NA, so a sample is a column; the preprocessing
works on samples × genes, (N, G), as the dataset stores them.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

#: Values read as missing (case-insensitive, after stripping whitespace).
NA_STRINGS = frozenset({"", "na", "nan", "n/a", "null", "none", "-"})

#: Header words that name the row-label column when samples are rows.
_SAMPLE_HEADERS = frozenset({"sample", "sample_id", "sampleid", "samples", "patient", "patient_id",
                             "subject", "subject_id", "case", "case_id", "id"})
#: Header words that name the row-label column when genes are rows.
_GENE_HEADERS = frozenset({"", "gene", "genes", "gene_id", "gene_name", "symbol", "gene_symbol", "hgnc",
                           "hgnc_symbol"})
#: What a TCIA-style subject id looks like; used only to break ties when orientation is ambiguous.
_SAMPLE_ID_PATTERN = re.compile(r"^(R01|AMC)-\d+$", re.IGNORECASE)

Orientation = Literal["auto", "genes_as_rows", "samples_as_rows"]


class GeneTableError(ValueError):
    """A gene table that cannot be used as asked; the message says what is wrong and how to fix it."""


@dataclass
class GeneTable:
    """Expression values (G genes × S samples, float64, NaN = NA) with their gene names and sample ids."""

    gene_names: list[str]
    sample_ids: list[str]
    values: np.ndarray
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.gene_names = [str(g) for g in self.gene_names]
        self.sample_ids = [str(s) for s in self.sample_ids]
        if self.values.shape != (len(self.gene_names), len(self.sample_ids)):
            raise GeneTableError(
                f"gene table values have shape {self.values.shape}, expected "
                f"({len(self.gene_names)} genes, {len(self.sample_ids)} samples)"
            )
        _refuse_duplicates(self.gene_names, "gene name", self.source)
        _refuse_duplicates(self.sample_ids, "sample id", self.source)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    def gene_index(self) -> dict[str, int]:
        return {name: row for row, name in enumerate(self.gene_names)}

    def has_sample(self, sample_id: str) -> bool:
        return str(sample_id).strip() in self._sample_lookup()

    def sample_values(self, sample_id: str) -> np.ndarray:
        """The column of one sample (G,), or GeneTableError naming a few ids that do exist."""
        lookup = self._sample_lookup()
        key = str(sample_id).strip()
        if key not in lookup:
            shown = ", ".join(self.sample_ids[:8]) + (" …" if self.num_samples > 8 else "")
            raise GeneTableError(
                f"sample '{sample_id}' is not in the gene table{_from(self.source)} "
                f"({self.num_samples} samples, e.g. {shown})"
            )
        return self.values[:, lookup[key]]

    def select_samples(self, sample_ids: Sequence[str]) -> GeneTable:
        """A table restricted to `sample_ids`, in that order (unknown ids raise GeneTableError)."""
        columns = [self.sample_values(s) for s in sample_ids]
        values = np.stack(columns, axis=1) if columns else np.zeros((self.num_genes, 0))
        return GeneTable(list(self.gene_names), [str(s).strip() for s in sample_ids], values, self.source)

    def select_genes(self, gene_names: Sequence[str]) -> GeneTable:
        """A table restricted to `gene_names`, in that order (unknown names raise GeneTableError)."""
        index = self.gene_index()
        missing = [g for g in gene_names if g not in index]
        if missing:
            raise GeneTableError(f"{len(missing)} of {len(gene_names)} genes are not in the table "
                                 f"(e.g. {', '.join(missing[:5])})")
        rows = [index[g] for g in gene_names]
        return GeneTable(list(gene_names), list(self.sample_ids), self.values[rows], self.source)

    def _sample_lookup(self) -> dict[str, int]:
        return {s.strip(): column for column, s in enumerate(self.sample_ids)}


# --- reading ---------------------------------------------------------------------------------------------
def read_gene_table(path: str | Path, *, orientation: Orientation = "auto") -> GeneTable:
    """Read a GEO text table (.txt/.txt.gz/.tsv) or a CSV into a genes × samples GeneTable.

    The delimiter is sniffed from the header line (tab, comma or semicolon). Orientation:
    - GEO text and the usual CSV have **genes as rows** and samples as columns; the first header cell is
      empty or names the gene column (`gene`, `symbol`, …).
    - A CSV may instead have **samples as rows** (first header cell `sample`, `patient`, `id`, …).
    With `orientation="auto"` the first header cell decides; if it is uninformative, the side whose labels
    look like subject ids (`R01-001`, `AMC-012`) is the sample side, and failing that the longer side is
    taken to be genes (tables hold thousands of genes and at most a few hundred samples).
    Rows whose gene name starts with `_` (HTSeq/Cufflinks counter rows such as `__no_feature`) are dropped.
    Values are floats; `NA`, empty cells and `NaN` become NaN; anything else non-numeric is an error that
    names the row and column. Duplicate gene names or sample ids are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise GeneTableError(f"gene table not found: {path}")
    rows = _read_rows(path)
    if len(rows) < 2:
        raise GeneTableError(f"gene table {path} has no data rows (need a header line and at least one row)")
    header = [cell.strip() for cell in rows[0]]
    body = [row for row in rows[1:] if any(cell.strip() for cell in row)]
    width = len(header)
    if width < 2:
        raise GeneTableError(f"gene table {path} has a single column; expected a tab- or comma-separated "
                             "table with one label column and at least one value column")
    # GEO/R write.table style: the header may lack the row-label cell, so data rows are one longer.
    if body and all(len(row) == width + 1 for row in body):
        header = ["", *header]
        width += 1
    for line, row in enumerate(body, start=2):
        if len(row) != width:
            raise GeneTableError(f"gene table {path}, line {line}: {len(row)} cells, header has {width}")

    row_labels = [row[0].strip() for row in body]
    column_labels = header[1:]
    if orientation == "auto":
        orientation = _detect_orientation(header[0], row_labels, column_labels)
    elif orientation not in ("genes_as_rows", "samples_as_rows"):
        raise GeneTableError(f"orientation must be auto, genes_as_rows or samples_as_rows, not {orientation!r}")

    values = _parse_values(body, column_labels, path)  # (rows, columns)
    if orientation == "samples_as_rows":
        gene_names, sample_ids, values = column_labels, row_labels, values.T
    else:
        gene_names, sample_ids = row_labels, column_labels

    keep = [g and not g.startswith("_") for g in gene_names]
    gene_names = [g for g, k in zip(gene_names, keep) if k]
    values = values[np.asarray(keep, dtype=bool)]
    if not gene_names:
        raise GeneTableError(f"gene table {path} has no gene rows (only empty or '_' counter rows)")
    return GeneTable(gene_names, sample_ids, values, source=str(path))


def _read_rows(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise GeneTableError(f"cannot read gene table {path}: {error}") from error
    first_line = text.split("\n", 1)[0]
    delimiter = max(("\t", ",", ";"), key=first_line.count)
    if first_line.count(delimiter) == 0:
        delimiter = "\t"
    return list(csv.reader(io.StringIO(text), delimiter=delimiter))


def _detect_orientation(corner: str, row_labels: list[str], column_labels: list[str]) -> Orientation:
    corner_key = corner.strip().strip('"').lower()
    if corner_key in _SAMPLE_HEADERS:
        return "samples_as_rows"
    if corner_key in _GENE_HEADERS:
        return "genes_as_rows"

    def id_fraction(labels: list[str]) -> float:
        return sum(bool(_SAMPLE_ID_PATTERN.match(x)) for x in labels) / max(len(labels), 1)

    rows_ids, columns_ids = id_fraction(row_labels), id_fraction(column_labels)
    if rows_ids != columns_ids and max(rows_ids, columns_ids) >= 0.5:
        return "samples_as_rows" if rows_ids > columns_ids else "genes_as_rows"
    return "genes_as_rows" if len(row_labels) >= len(column_labels) else "samples_as_rows"


def _parse_values(body: list[list[str]], column_labels: list[str], path: Path) -> np.ndarray:
    flat = ["nan" if cell.strip().lower() in NA_STRINGS else cell for row in body for cell in row[1:]]
    try:
        return np.array(flat, dtype=np.float64).reshape(len(body), len(column_labels))
    except ValueError:
        for row in body:
            for c, cell in enumerate(row[1:]):
                if cell.strip().lower() in NA_STRINGS:
                    continue
                try:
                    float(cell)
                except ValueError:
                    raise GeneTableError(
                        f"gene table {path}: value {cell.strip()!r} in row '{row[0].strip()}', column "
                        f"'{column_labels[c]}' is neither a number nor NA"
                    ) from None
        raise


def _refuse_duplicates(labels: list[str], what: str, source: str) -> None:
    counts = Counter(labels)
    duplicated = [name for name, n in counts.items() if n > 1]
    if duplicated:
        shown = ", ".join(f"'{d}' ×{counts[d]}" for d in duplicated[:5])
        raise GeneTableError(
            f"duplicate {what}s in the gene table{_from(source)}: {shown}"
            f"{' …' if len(duplicated) > 5 else ''} ({len(duplicated)} duplicated); names must be unique "
            f"so profiles can be aligned by {what}"
        )


def _from(source: str) -> str:
    return f" {source}" if source else ""


# --- preprocessing ---------------------------------------------------------------------------------------
def drop_na_genes(table: GeneTable) -> GeneTable:
    """Keep only genes measured in every sample (the paper's 5172 on GSE103584)."""
    complete = ~np.isnan(table.values).any(axis=1)
    if not complete.any():
        raise GeneTableError(
            f"no gene left after dropping genes with NA{_from(table.source)}: each of the "
            f"{table.num_genes} genes has an NA in at least one of the {table.num_samples} samples "
            "(is the table all NA, or is one sample column empty?)"
        )
    names = [g for g, keep in zip(table.gene_names, complete) if keep]
    return GeneTable(names, list(table.sample_ids), table.values[complete], table.source)


def log_transform(values: np.ndarray) -> np.ndarray:
    """log2(x + 1) of linear FPKM (NaN stays NaN); negative values mean the input is not linear FPKM."""
    values = np.asarray(values, dtype=np.float64)
    if np.nanmin(values, initial=0.0) < 0:
        raise GeneTableError(
            f"log2(x+1) expects linear FPKM ≥ 0, but the table has negative values (min "
            f"{np.nanmin(values):.3g}); it may already be log-transformed or z-scored"
        )
    return np.log2(values + 1.0)


#: Defaults of the fitted gene preprocessing (DESIGN decision 3). A gene is dropped when, over the TRAINING
#: patients, its mean log2(FPKM+1) is below `MIN_MEAN_LOG2` (low expression: FPKM < 1), it is exactly 0 in more
#: than `MAX_ZERO_FRACTION` of them, or its sd is below `MIN_STD_LOG2` (near-constant). Why: such genes carry
#: no signal in a cohort of tens of patients, but a z-score fitted on them turns tiny differences of an unseen
#: patient into |z| > 100 that swamp the whole vector (seen on the phantom; real GEO FPKM tables have the same
#: trap). `Z_CLIP` bounds what is left, so one odd gene cannot dominate a profile.
MIN_MEAN_LOG2 = 1.0
MAX_ZERO_FRACTION = 0.5
MIN_STD_LOG2 = 0.1
Z_CLIP = 5.0
#: The largest out-of-sample gain a preprocessing may carry (a fit on very few patients is capped here).
MAX_OUT_OF_SAMPLE_GAIN = 10.0
#: How close (every whitened score) a profile must come to a fitted patient's to be prepared as that patient.
FITTED_MATCH_TOLERANCE = 1e-3
#: Refits the out-of-sample gain may cost: beyond this many training patients they are left out in groups.
MAX_GAIN_REFITS = 50


@dataclass
class GenePreprocessing:
    """Linear FPKM of named genes → the generator's gene input, fitted on training patients only.

    Steps: align by name → log2(x + 1) → z-score with the training mean/sd → clip to ±`clip` → optionally
    project on `components` (K × G rows; whitened principal axes of the training z-scores). The output has
    `output_dim` values: K with a projection, else G. Everything here travels with the weights, so `insert`,
    `evaluate` and the module prepare a profile exactly as training did.

    `out_of_sample_gain` multiplies the projection of a patient the fit did not see. With far more genes than
    training patients, each training patient's own noise lies inside the principal axes fitted on it, so its
    whitened scores have sd 1 while a new patient's are shrunk towards 0 (sd ≈ 0.36–0.39 on the phantom with
    44 training patients): the generator would see every new patient as an average one. The gain, fitted by
    leave-one-out (`out_of_sample_gain_loo`), puts a new patient back on the training patients' scale.
    The patients the fit was made on must not get it: the generator learnt their unscaled scores, and the gain
    pushes them far out (rms 2.8 where training saw 1: the bundled model of round 29 drew nothing for two of
    cohort 2026's training donors so scaled). `fitted_scores` keeps their in-sample scores, so that
    `transform_log` recognises such a profile wherever it comes from (evaluation, `insert`, the module).
    """

    gene_names: list[str]
    means: np.ndarray  # (G,) log2(x+1) training mean
    stds: np.ndarray  # (G,) training sd, > 0
    clip: float = Z_CLIP
    components: np.ndarray | None = None  # (K, G) or None
    fitted_on: dict[str, int] = field(default_factory=dict, compare=False)  # what the fit kept and dropped
    out_of_sample_gain: float = 1.0  # × the projection of a patient outside the fit (1: none)
    # (N_fit, K) the whitened scores of the patients the fit was made on; None: none recognised (older files)
    fitted_scores: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.gene_names = [str(g) for g in self.gene_names]
        self.means = np.asarray(self.means, dtype=np.float64)
        self.stds = np.asarray(self.stds, dtype=np.float64)
        self.clip = float(self.clip)
        self.out_of_sample_gain = float(self.out_of_sample_gain)
        if self.components is not None:
            self.components = np.asarray(self.components, dtype=np.float64)
            if self.components.shape[0] == 0:
                self.components = None
        if self.fitted_scores is not None:
            self.fitted_scores = np.asarray(self.fitted_scores, dtype=np.float32)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    @property
    def output_dim(self) -> int:
        return self.num_genes if self.components is None else int(self.components.shape[0])

    def describe(self) -> str:
        """What the generator reads, in a few words (for reports): the genes, the projection and its gain."""
        if self.components is None:
            return f"{self.num_genes} z-scored genes"
        return (f"{self.output_dim} whitened PCA axes of {self.num_genes} genes, out-of-sample gain "
                f"{self.out_of_sample_gain:.2f}")

    def problems(self) -> list[str]:
        """What is inconsistent (empty when usable): shapes, finiteness, positivity, unique names."""
        found = []
        count = self.num_genes
        if len(set(self.gene_names)) != count:
            found.append("gene names are not unique (profiles are aligned by name)")
        for label, values in (("means", self.means), ("stds", self.stds)):
            if values.shape != (count,):
                found.append(f"gene {label} have shape {values.shape}, expected ({count},), one per gene")
            elif not np.all(np.isfinite(values)):
                found.append(f"gene {label} hold NaN or Inf")
        if self.stds.shape == (count,) and np.any(self.stds <= 0):
            found.append("gene stds must be > 0 (z-scoring divides by them)")
        if not (math.isfinite(self.clip) and self.clip > 0):
            found.append(f"gene clip must be a finite number > 0, got {self.clip}")
        if self.components is not None:
            if self.components.ndim != 2 or self.components.shape[1] != count:
                found.append(f"gene components have shape {self.components.shape}, expected (K, {count})")
            elif not np.all(np.isfinite(self.components)):
                found.append("gene components hold NaN or Inf")
        if self.fitted_scores is not None:
            if self.components is None or self.fitted_scores.ndim != 2 or (
                    self.fitted_scores.shape[1] != self.components.shape[0]):
                found.append(f"fitted patients' scores have shape {self.fitted_scores.shape}, expected (N, K) with "
                             "K the gene components")
            elif not np.all(np.isfinite(self.fitted_scores)):
                found.append("fitted patients' scores hold NaN or Inf")
        gain_problem = out_of_sample_gain_problem(self.out_of_sample_gain)
        if gain_problem:
            found.append(f"the out-of-sample gain {gain_problem}")
        elif self.components is None and self.out_of_sample_gain != 1.0:
            found.append("an out-of-sample gain other than 1 needs a projection (gene components)")
        return found

    def transform_log(self, log_values: np.ndarray, *, in_sample: bool | None = None) -> np.ndarray:
        """(N, G) log2(x+1) values in this object's gene order → (N, output_dim) float32.

        NaN marks a gene to impute: it becomes 0 after z-scoring, the training mean ("no information").
        `in_sample`: True, the rows are patients the fit was made on, so the out-of-sample gain is not applied;
        False, every row gets it; None, a row gets it unless its scores are a fitted patient's (`in_fit`).
        """
        log_values = np.asarray(log_values, dtype=np.float64)
        z = (log_values - self.means) / self.stds
        z = np.clip(np.nan_to_num(z, nan=0.0), -self.clip, self.clip)
        if self.components is not None:
            z = z @ self.components.T
            fitted = np.full(z.shape[0], bool(in_sample)) if in_sample is not None else self.in_fit(z)
            z = np.where(fitted[:, None], z, z * self.out_of_sample_gain)
        return z.astype(np.float32)

    def in_fit(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: which rows of unscaled whitened `scores` (N, K) are a fitted patient's, every score within
        FITTED_MATCH_TOLERANCE (two distinct patients are never that close on all K axes; float32 storage and
        a table read from text instead of the prepared cohort differ by ~1e-5)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.fitted_scores is None or self.fitted_scores.size == 0:
            return np.zeros(scores.shape[0], dtype=bool)
        gaps = np.abs(scores[:, None, :] - self.fitted_scores[None].astype(np.float64)).max(axis=2)
        return gaps.min(axis=1) <= FITTED_MATCH_TOLERANCE

    @classmethod
    def fit(
        cls,
        train_log_values: np.ndarray,
        gene_names: Sequence[str],
        *,
        min_mean_log2: float = MIN_MEAN_LOG2,
        max_zero_fraction: float = MAX_ZERO_FRACTION,
        min_std_log2: float = MIN_STD_LOG2,
        clip: float = Z_CLIP,
        top_variance: int = 0,
        components: int = 0,
        out_of_sample_gain: bool = True,
    ) -> GenePreprocessing:
        """Fit on (N_train, G_all) log2(x+1) values of the TRAINING patients only (no NaN).

        `top_variance` > 0 keeps only that many most variable of the genes that pass the filters;
        `components` > 0 adds a whitened PCA projection to that many axes of the clipped training z-scores,
        with its leave-one-out out-of-sample gain unless `out_of_sample_gain` is False.
        """
        x = np.asarray(train_log_values, dtype=np.float64)
        names = [str(g) for g in gene_names]
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != len(names):
            raise GeneTableError(f"fitting the gene preprocessing needs (training patients ≥ 1, {len(names)} "
                                 f"genes) log values, got shape {x.shape}")
        if np.isnan(x).any():
            raise GeneTableError("fitting the gene preprocessing got NA values; call drop_na_genes first")
        means, stds = x.mean(axis=0), x.std(axis=0)
        low = (means < min_mean_log2) | ((x == 0).mean(axis=0) > max_zero_fraction)
        flat = ~low & (stds < min_std_log2)
        keep = ~(low | flat)
        if top_variance and keep.sum() > top_variance:
            ranked = np.argsort(-np.where(keep, stds, -1.0), kind="stable")[:top_variance]
            keep = np.zeros_like(keep)
            keep[np.sort(ranked)] = True
        if not keep.any():
            raise GeneTableError(
                f"no gene passes the expression filter (of {len(names)}: {int(low.sum())} low-expression, "
                f"{int(flat.sum())} near-constant over {x.shape[0]} training patients); is the table linear FPKM?"
            )
        kept = np.flatnonzero(keep)
        result = cls([names[i] for i in kept], means[kept], stds[kept], clip,
                     fitted_on={"table_genes": len(names), "training_patients": int(x.shape[0]),
                                "dropped_low_expression": int(low.sum()), "dropped_near_constant": int(flat.sum()),
                                "dropped_by_top_variance": int((~low & ~flat).sum() - kept.size),
                                "kept": int(kept.size)})
        if components:
            z = result.transform_log(x[:, kept]).astype(np.float64)
            k = min(int(components), *z.shape)
            _, result.components = whitened_principal_axes(z, k)
            result.fitted_on["components"] = k
            if out_of_sample_gain:
                result.out_of_sample_gain = out_of_sample_gain_loo(z, k)
            result.fitted_scores = (z @ result.components.T).astype(np.float32)
        return result


def whitened_principal_axes(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row mean (G,), (k, G) principal axes of z's centred rows, each divided by its sd over the rows):
    a centred row projected on them has unit variance per axis over the fitted rows."""
    mean = z.mean(axis=0)
    _, singular, axes = np.linalg.svd(z - mean, full_matrices=False)
    scale = singular[:k] / math.sqrt(max(1, z.shape[0] - 1))
    return mean, axes[:k] / np.maximum(scale, 1e-8)[:, None]


def out_of_sample_gain_problem(gain: float) -> str:
    """What is wrong with an out-of-sample gain (the end of a sentence naming it), '' when it is usable."""
    if math.isfinite(gain) and 0 < gain <= MAX_OUT_OF_SAMPLE_GAIN:
        return ""
    return f"must lie in (0, {MAX_OUT_OF_SAMPLE_GAIN:g}], got {gain}"


def out_of_sample_gain_loo(z: np.ndarray, components: int, max_refits: int = MAX_GAIN_REFITS) -> float:
    """1 / the rms whitened score of a training patient left out of the PCA fit of the others.

    Each patient is projected on the `components` whitened principal axes of a refit without it, in that
    fit's own basis (the norm does not depend on how nearly equal axes rotate between fits). A patient the
    final fit never saw is shrunk as much, so dividing by this rms puts it back on the training scale. Up to
    `max_refits` patients each one is left out alone; beyond, patient i is left out with the others of group
    i mod `max_refits` (a large cohort then costs `max_refits` SVDs, not one per patient).
    1.0 when there are too few patients to leave one out (fewer than 4).
    """
    z = np.asarray(z, dtype=np.float64)
    n = z.shape[0]
    groups = np.arange(n) % max(1, min(n, int(max_refits)))
    held_most = int(np.bincount(groups).max())
    k = min(int(components), n - held_most - 1)
    if n < 4 or k < 1:
        return 1.0
    squares = np.empty(n)
    for group in np.unique(groups):
        held = groups == group
        mean, whitened = whitened_principal_axes(z[~held], k)
        squares[held] = np.mean((whitened @ (z[held] - mean).T) ** 2, axis=0)
    rms = math.sqrt(float(squares.mean()))
    return float(np.clip(1.0 / max(rms, 1e-8), 1.0, MAX_OUT_OF_SAMPLE_GAIN))


def profile_for_model(
    table: GeneTable,
    sample_id: str,
    preprocessing: GenePreprocessing,
    *,
    impute: bool = False,
    blend_with: str | None = None,
    blend_weight: float = 0.0,
) -> np.ndarray:
    """The model input for one sample: float32 (output_dim,) prepared by the model's fitted `preprocessing`.

    `table` holds linear FPKM as read from disk (any gene order, extra genes ignored). Genes the model needs
    but the table lacks (or has as NA for this sample) are an error unless `impute=True`, which sets them to
    the training mean (z = 0, "no information"). With `blend_with`, the profile is
    (1 − w)·p(sample_id) + w·p(blend_with) with w = `blend_weight` in [0, 1], blended in the model's input
    space (every step after the log is linear or a clip, so a blend of two real profiles stays in range).
    """
    if not 0.0 <= float(blend_weight) <= 1.0:
        raise GeneTableError(f"blend weight must be in [0, 1], got {blend_weight}")
    profile = preprocessing.transform_log(_aligned_log(table, sample_id, preprocessing.gene_names, impute)[None])[0]
    if blend_with is not None:
        other = preprocessing.transform_log(_aligned_log(table, blend_with, preprocessing.gene_names, impute)[None])[0]
        weight = float(blend_weight)
        profile = (1.0 - weight) * profile + weight * other
    return profile.astype(np.float32)


def training_patients_among(table: GeneTable, samples: Sequence[str | None], preprocessing: GenePreprocessing,
                            *, impute: bool = False) -> list[str]:
    """The `samples` (None skipped) whose profiles are patients the model's gene front-end was fitted on, so
    that `profile_for_model` prepares them as training did (`GenePreprocessing.in_fit`): their nodules show
    what the model learnt for a patient it trained on, not how it carries over to a new one."""
    named = [str(sample) for sample in samples if sample]
    if preprocessing.components is None or preprocessing.fitted_scores is None or not named:
        return []
    log_values = np.stack([_aligned_log(table, sample, preprocessing.gene_names, impute) for sample in named])
    fitted = preprocessing.in_fit(preprocessing.transform_log(log_values, in_sample=True))
    return [sample for sample, seen in zip(named, fitted, strict=True) if seen]


def aligned_values(table: GeneTable, sample_id: str, gene_names: Sequence[str]) -> np.ndarray:
    """One sample's values (G,) in the order of `gene_names`; NaN where the table lacks the gene or says NA."""
    column = table.sample_values(sample_id)
    index = table.gene_index()
    rows = np.array([index.get(str(g), -1) for g in gene_names])
    present = rows >= 0
    raw = np.full(len(gene_names), np.nan)
    raw[present] = column[rows[present]]
    return raw


def _aligned_log(table: GeneTable, sample_id: str, gene_names: list[str], impute: bool) -> np.ndarray:
    """log2(x+1) of one sample aligned to `gene_names`; NaN where missing (only when `impute`)."""
    raw = aligned_values(table, sample_id, gene_names)
    missing = np.isnan(raw)
    if missing.any() and not impute:
        absent = sum(1 for g in gene_names if g not in table.gene_index())
        na = int(missing.sum()) - absent
        examples = ", ".join([g for g, m in zip(gene_names, missing) if m][:5])
        raise GeneTableError(
            f"{int(missing.sum())} of {len(gene_names)} model genes are missing for sample '{sample_id}' "
            f"({absent} not in the table, {na} NA; e.g. {examples}); allow imputation to fill them with the "
            "training mean (--impute-missing-genes on the command line, impute=True in Python)"
        )
    out = np.full(len(gene_names), np.nan)
    out[~missing] = log_transform(raw[~missing])
    return out
