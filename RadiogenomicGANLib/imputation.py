"""How much of a gene profile `--impute-missing-genes` may invent, and the count the provenance records.

Imputation sets a model gene the table lacks (or holds as NA for the sample) to the training mean: "no
information". A few such genes are harmless; once most of them are, the profile says more about the training
cohort than about the sample — and it once happened silently for 91–100 % of a profile. So imputing more than
`MAX_IMPUTED_FRACTION` of the model's genes is refused, and the count goes into the output's provenance.
Independent of how profiles are normalised (`genes.profile_for_model`): it only counts what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from RadiogenomicGANLib.genes import aligned_values

#: Beyond half of the model's genes, the imputed profile is mostly the training mean.
MAX_IMPUTED_FRACTION = 0.5


class ImputationError(ValueError):
    """Too much of the profile would be imputed (a user error); the message says how much."""


def missing_gene_count(table: Any, samples: Sequence[str | None], gene_names: Sequence[str]) -> int:
    """The most model genes missing (absent or NA) for any of `samples` (a blend has two); unknown samples
    count 0 here — the profile code names them."""
    worst = 0
    for sample in samples:
        if sample is None:
            continue
        try:
            values = aligned_values(table, sample, gene_names)
        except (KeyError, ValueError):
            continue
        worst = max(worst, int(np.isnan(values).sum()))
    return worst


def check_imputation(table: Any, samples: Sequence[str | None], gene_names: Sequence[str], allowed: bool) -> int:
    """The number of genes that will be imputed (0 when imputation is off: the profile code then refuses any
    gap); raises ImputationError when it would exceed MAX_IMPUTED_FRACTION of the model's genes."""
    if not allowed:
        return 0
    count = missing_gene_count(table, samples, gene_names)
    share = count / max(len(gene_names), 1)
    if share > MAX_IMPUTED_FRACTION:
        raise ImputationError(
            f"{count} of {len(gene_names)} model genes ({100 * share:.0f} %) are missing from the gene table; "
            f"imputing more than {100 * MAX_IMPUTED_FRACTION:.0f} % would make the profile mostly the training "
            "mean: use a table with the model's genes")
    return count
