"""CLI: ``python -m RadiogenomicGANLib.phantom --out DIR --patients N --seed S [--size 256] ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from RadiogenomicGANLib.cli_common import check_output_folder, run_cli
from RadiogenomicGANLib.processes import default_workers

from .genomics import BIOLOGY_VERSION
from .writers import write_cohort

#: Smallest in-plane matrix the anatomy can be drawn at (the tests use 32); larger than 2048 is a typo.
SIZE_RANGE = (32, 2048)


def _parse_ids(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m RadiogenomicGANLib.phantom",
        description="Write a radiogenomic phantom cohort in the NSCLC-Radiogenomics formats "
        "(TCIA tree with DICOM CT + SEG, metadata.csv, GEO RNA-seq table, ground_truth.csv).",
    )
    parser.add_argument("--out", required=True, help="output folder (the download root)")
    parser.add_argument("--patients", type=int, default=20, help="number of patients (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed: draws the patients; same seed → same "
                        "bytes")
    parser.add_argument("--biology", type=int, default=BIOLOGY_VERSION, choices=[BIOLOGY_VERSION],
                        help=f"phantom biology (genome, modules, co-expression; default {BIOLOGY_VERSION}): the same "
                        "for every seed, so a model trained on one seed's cohort reads any other's table")
    parser.add_argument("--size", type=int, default=256, help="in-plane matrix (default 256; 512 = scanner)")
    parser.add_argument("--slices", type=int, default=None, help="slices per CT (default: cover the lungs "
                        "at a drawn 1–2.5 mm thickness)")
    parser.add_argument("--fov", type=float, default=None, help="in-plane field of view in mm (default: drawn "
                        "so the 512-equivalent pixel is 0.56–0.85 mm)")
    parser.add_argument("--spacing", type=float, nargs=2, metavar=("IN_PLANE_MM", "SLICE_MM"), default=None,
                        help="fix the voxel spacing for every patient")
    parser.add_argument("--genes", type=int, default=5172, help="genes left after dropping NA rows (default 5172; "
                        "another count is a scaled-down biology for quick tests)")
    parser.add_argument("--na-genes", type=int, default=None, help="extra genes that carry NA (default genes/2)")
    parser.add_argument("--modules", type=int, default=4, help="latent gene modules (default 4)")
    parser.add_argument("--classes", type=int, default=4, help="patient classes (clusters) (default 4)")
    parser.add_argument("--decoy-fraction", type=float, default=0.35,
                        help="share of studies with a decoy CT series (default 0.35)")
    parser.add_argument("--without-rna", type=_parse_ids, default=[], help="comma-separated ids with no RNA column")
    parser.add_argument("--without-seg", type=_parse_ids, default=[], help="comma-separated ids with no SEG")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"processes writing patients (default: the usable cores, at most 8; here "
                        f"{default_workers()}); the files are the same for any number")
    parser.add_argument("--quiet", action="store_true", help="no per-patient progress lines")
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error("--patients must be ≥ 1")
    if not SIZE_RANGE[0] <= args.size <= SIZE_RANGE[1]:
        parser.error(f"--size must be between {SIZE_RANGE[0]} and {SIZE_RANGE[1]}")
    for name in ("genes", "modules", "classes", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1")
    if args.slices is not None and args.slices < 1:
        parser.error("--slices must be ≥ 1")
    if args.na_genes is not None and args.na_genes < 0:
        parser.error("--na-genes must be ≥ 0")
    if not 0.0 <= args.decoy_fraction <= 1.0:
        parser.error("--decoy-fraction must lie in [0, 1]")
    if args.fov is not None and not args.fov > 0:
        parser.error("--fov must be > 0 mm")
    if args.spacing is not None and not all(v > 0 for v in args.spacing):
        parser.error("--spacing values must be > 0 mm")
    return run_cli(lambda: _write(args), (ValueError,))


def _write(args: argparse.Namespace) -> int:
    """Write the cohort (the body of main, under the project's one exit-code convention)."""
    check_output_folder(args.out)

    def progress(done: int, total: int, pid: str) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {pid}", file=sys.stderr, flush=True)

    summary = write_cohort(
        args.out, args.patients, args.seed, size_ij=args.size, slices=args.slices,
        spacing=tuple(args.spacing) if args.spacing else None, fov=args.fov, n_genes=args.genes,
        n_na_genes=args.na_genes, n_modules=args.modules, n_classes=args.classes,
        without_rna=args.without_rna, without_seg=args.without_seg, decoy_fraction=args.decoy_fraction,
        progress=progress, workers=args.workers,
    )  # fmt: skip
    print(summary.describe())
    print(f"biology:  {args.biology} (gene table rows identical for every seed)")
    print(f"metadata: {summary.metadata_path}\nRNA-seq:  {summary.rnaseq_path}\ntruth:    {summary.ground_truth_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
