"""Gene-expression tables: reading, NA handling, log transform, z-scoring and per-sample model profiles.

The reference table is GEO GSE103584 (`GSE103584_R01_NSCLC_RNAseq.txt(.gz)`): tab-separated, an empty first
header cell followed by sample ids (`R01-xxx`), one row per HGNC symbol, linear Cufflinks FPKM with the
literal `NA` for missing values. Dropping every gene with an NA leaves the paper's 5172 genes. The paper's
preprocessing is log2(x + 1) followed by a per-gene z-score whose statistics come from the *training*
patients only; the same statistics travel with the weights so a profile chosen at inference time is
normalised exactly as the training profiles were.

All arrays here are genes × samples, (G, S), float64 with NaN for NA, so a sample is a column.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

#: Values read as missing (case-insensitive, after stripping whitespace).
NA_STRINGS = frozenset({"", "na", "nan", "n/a", "null", "none", "-"})

#: Floor on a gene's training standard deviation (log2 units): a gene that is (nearly) constant in the
#: training patients would otherwise turn tiny test-time differences into huge z-scores.
STD_FLOOR = 1e-2

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


def fit_normalisation(log_values: np.ndarray, *, std_floor: float = STD_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std (population, floored) of log2(x+1) values (G, S_train) of TRAINING samples only.

    Fitting on training patients only keeps validation/test profiles out of the normalisation (no leak).
    """
    log_values = np.asarray(log_values, dtype=np.float64)
    if log_values.ndim != 2 or log_values.shape[1] == 0:
        raise GeneTableError(f"fit_normalisation expects (genes, training samples) with ≥ 1 sample, got "
                             f"shape {log_values.shape}")
    if np.isnan(log_values).any():
        raise GeneTableError("fit_normalisation got NA values; call drop_na_genes first")
    means = log_values.mean(axis=1)
    stds = np.maximum(log_values.std(axis=1), std_floor)
    return means, stds


def normalise(log_values: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """z-score (G,) or (G, S) log values with given statistics."""
    log_values = np.asarray(log_values, dtype=np.float64)
    means, stds = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    if log_values.ndim == 2:
        means, stds = means[:, None], stds[:, None]
    return (log_values - means) / stds


def profile_for_model(
    table: GeneTable,
    sample_id: str,
    gene_names: Sequence[str],
    means: np.ndarray,
    stds: np.ndarray,
    *,
    impute: bool = False,
    blend_with: str | None = None,
    blend_weight: float = 0.0,
) -> np.ndarray:
    """The model input for one sample: float32 (G,) aligned to the model's `gene_names`, log2(x+1), z-scored.

    `table` holds linear FPKM as read from disk (any gene order, extra genes ignored). Genes the model needs
    but the table lacks (or has as NA for this sample) are an error unless `impute=True`, which sets them to
    0 after z-scoring — the training mean, i.e. "no information". With `blend_with`, the profile is
    (1 − w)·z(sample_id) + w·z(blend_with) with w = `blend_weight` in [0, 1], blended in the normalised space
    the generator was trained in.
    """
    gene_names = [str(g) for g in gene_names]
    means = np.asarray(means, dtype=np.float64)
    stds = np.asarray(stds, dtype=np.float64)
    if means.shape != (len(gene_names),) or stds.shape != (len(gene_names),):
        raise GeneTableError(f"means/stds have shapes {means.shape}/{stds.shape}, expected "
                             f"({len(gene_names)},) like the model's gene names")
    if not 0.0 <= float(blend_weight) <= 1.0:
        raise GeneTableError(f"blend weight must be in [0, 1], got {blend_weight}")
    profile = _single_profile(table, sample_id, gene_names, means, stds, impute)
    if blend_with is not None:
        other = _single_profile(table, blend_with, gene_names, means, stds, impute)
        weight = float(blend_weight)
        profile = (1.0 - weight) * profile + weight * other
    return profile.astype(np.float32)


def _single_profile(table: GeneTable, sample_id: str, gene_names: list[str], means: np.ndarray,
                    stds: np.ndarray, impute: bool) -> np.ndarray:
    column = table.sample_values(sample_id)
    index = table.gene_index()
    rows = np.array([index.get(g, -1) for g in gene_names])
    present = rows >= 0
    raw = np.full(len(gene_names), np.nan)
    raw[present] = column[rows[present]]
    missing = np.isnan(raw)
    if missing.any() and not impute:
        absent = int((~present).sum())
        na = int(missing.sum()) - absent
        examples = ", ".join(g for g, m in zip(gene_names, missing) if m)
        examples = ", ".join(examples.split(", ")[:5])
        raise GeneTableError(
            f"{int(missing.sum())} of {len(gene_names)} model genes are missing for sample '{sample_id}' "
            f"({absent} not in the table, {na} NA; e.g. {examples}); allow imputation to fill them with the "
            "training mean (--impute-missing-genes on the command line, impute=True in Python)"
        )
    z = np.zeros(len(gene_names))
    z[~missing] = normalise(log_transform(raw[~missing]), means[~missing], stds[~missing])
    return z
