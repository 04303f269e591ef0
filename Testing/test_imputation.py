"""--impute-missing-genes: counted per sample (the worse of a blend), capped at half of the model's genes."""

from __future__ import annotations

from pathlib import Path

import pytest

from RadiogenomicGANLib.genes import read_gene_table
from RadiogenomicGANLib.imputation import MAX_IMPUTED_FRACTION, ImputationError, check_imputation, missing_gene_count


@pytest.fixture
def table(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "genes.txt"
    path.write_text("\tS1\tS2\nG1\t1.0\t2.0\nG2\tNA\t3.0\nG3\t4.0\tNA\nG4\t5.0\tNA\n")
    return read_gene_table(path)


def test_counts_absent_and_na_genes_per_sample(table) -> None:  # type: ignore[no-untyped-def]
    model = ["G1", "G2", "G3", "G4", "G5"]          # G5 is not in the table at all
    assert missing_gene_count(table, ["S1"], model) == 2            # G2 (NA), G5
    assert missing_gene_count(table, ["S2"], model) == 3            # G3, G4 (NA), G5
    assert missing_gene_count(table, ["S1", "S2"], model) == 3      # a blend: the worse of the two
    assert missing_gene_count(table, ["S1", None], model) == 2
    assert missing_gene_count(table, ["nobody"], model) == 0        # unknown samples: named elsewhere


def test_refuses_more_than_half(table) -> None:  # type: ignore[no-untyped-def]
    assert MAX_IMPUTED_FRACTION == 0.5
    assert check_imputation(table, ["S1"], ["G1", "G2", "G3", "G4", "G5"], allowed=True) == 2   # 40 %
    with pytest.raises(ImputationError, match="3 of 5 model genes \\(60 %\\)"):
        check_imputation(table, ["S2"], ["G1", "G2", "G3", "G4", "G5"], allowed=True)
    assert check_imputation(table, ["S2"], ["G1", "G2", "G3", "G4", "G5"], allowed=False) == 0  # off: no count
