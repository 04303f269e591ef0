"""The radiogenomic map (the paper's Fig. 4): a cohort's learned gene codes φ(g), embedded in 2D by t-SNE.

One implementation for the Slicer module, `make demo` and `training.evaluate`, so the demo's PNG, the Slicer
plot and the evaluation figure of one cohort are the same picture. Decisions:

- Perplexity (n − 1) / 3, capped at 30: t-SNE needs perplexity < n, and cohorts are small (130 RNA-seq
  samples in NSCLC-Radiogenomics), so the cap only matters for large ones.
- The exact method up to 1000 points: O(n²) but several times faster than Barnes–Hut at cohort sizes,
  whose set-up dominates for a few dozen points; PCA initialisation and a fixed seed make it repeatable.
- Fewer than 3 points give zeros: no neighbourhood to preserve (callers that need a map check the count).

`python -m RadiogenomicGANLib.radiogenomic_map --genes TABLE --out MAP.csv [--weights W]` writes the map of a
table's samples as CSV (sample, x, y, code…); the Slicer module runs it as a background process.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_SAMPLES = 3
EXACT_UP_TO = 1000
MAX_PERPLEXITY = 30.0


class MapError(ValueError):
    """The map cannot be drawn as asked (a model without a gene code, too few usable samples)."""


@dataclass
class RadiogenomicMap:
    """Sample ids, their gene codes φ(g) (S, code_dim) and t-SNE coordinates (S, 2); `skipped` lacked genes."""

    sample_ids: list[str]
    codes: np.ndarray
    xy: np.ndarray
    skipped: list[str]


def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, d) features → (n, 2) t-SNE coordinates, with the perplexity and method above."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    count = features.shape[0]
    if count < MIN_SAMPLES:
        return np.zeros((count, 2))
    perplexity = float(min(MAX_PERPLEXITY, max(1.0, (count - 1) / 3.0)))
    method = "exact" if count <= EXACT_UP_TO else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=int(seed))
    return tsne.fit_transform(features)


def gene_codes(generator: Any, profiles: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """φ(g) of (S, genes) aligned profiles; MapError for a model without a gene code (inpainting)."""
    import torch

    encode = getattr(generator, "encode_genes", None)
    if encode is None:
        raise MapError("this model has no gene code; the map needs the proposed or MC-GAN model")
    with torch.no_grad():
        codes = encode(torch.from_numpy(np.asarray(profiles, dtype=np.float32)).to(device))
    return codes.float().cpu().numpy()


def cohort_map(inserter: Any, table: Any, impute: bool = False, seed: int = 0) -> RadiogenomicMap:
    """The map of every sample of a gene table whose profile the model can use (missing genes: skipped)."""
    from RadiogenomicGANLib.genes import GeneTableError, profile_for_model

    metadata = inserter.metadata
    ids: list[str] = []
    profiles: list[np.ndarray] = []
    skipped: list[str] = []
    for sample in table.sample_ids:
        try:
            profiles.append(profile_for_model(table, sample, metadata.genes, impute=impute))
            ids.append(sample)
        except GeneTableError:
            skipped.append(sample)
    if skipped:
        logging.warning("radiogenomic map: %d samples lack model genes and are left out", len(skipped))
    if len(ids) < MIN_SAMPLES:
        hint = " (try imputing missing genes)" if skipped else ""
        raise MapError(f"the radiogenomic map needs at least {MIN_SAMPLES} usable samples, the table has "
                       f"{len(ids)}{hint}")
    codes = gene_codes(inserter.generator, np.stack(profiles), inserter.device)
    return RadiogenomicMap(ids, codes, embed_2d(codes, seed), skipped)


def write_map_csv(path: str | Path, result: RadiogenomicMap) -> None:
    """sample, x, y, code_0…: one row per sample."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "x", "y", *[f"code_{c}" for c in range(result.codes.shape[1])]])
        for sample, (x, y), code in zip(result.sample_ids, result.xy, result.codes):
            writer.writerow([sample, f"{x:.6g}", f"{y:.6g}", *[f"{v:.6g}" for v in code]])


def read_map_csv(path: str | Path) -> RadiogenomicMap:
    """The inverse of `write_map_csv` (skipped samples are not recorded)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    ids = [row[0] for row in rows]
    xy = np.array([[float(row[1]), float(row[2])] for row in rows]).reshape(-1, 2)
    codes = np.array([[float(v) for v in row[3:]] for row in rows]).reshape(len(rows), -1)
    return RadiogenomicMap(ids, codes, xy, [])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: the map of a gene table's samples as CSV. Bad input: exit 2 with one line."""
    from RadiogenomicGANLib.request import RequestError, default_weights, load_inserter, read_table

    parser = argparse.ArgumentParser(prog="python -m RadiogenomicGANLib.radiogenomic_map", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--genes", required=True, type=Path, help="gene table (GEO text, .txt.gz or CSV)")
    parser.add_argument("--out", required=True, type=Path, help="CSV to write (sample, x, y, code…)")
    parser.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled demo model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--impute-missing-genes", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        inserter = load_inserter(args.weights or default_weights(), args.device)
        result = cohort_map(inserter, read_table(args.genes), args.impute_missing_genes, args.seed)
        write_map_csv(args.out, result)
    except (MapError, RequestError, ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote the radiogenomic map of {len(result.sample_ids)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
