"""Headless command line: `python -m RadiogenomicGANLib insert ...` — the module's insertion, from files.

The same `NoduleInserter` as the Slicer module does the work. Everything that can be checked is checked
before anything is written (output suffixes and folders, weights, gene table and sample, the CT, centres,
slices, lung), outputs are written to hidden temporary files and renamed only when all of them are complete,
so a failed or cancelled run leaves no partial output; temporary files a killed run left for the same
outputs are removed. Bad input — including an output that cannot be written or that would land on an input —
exits with status 2 and one clear line (`cli_common` holds the convention every CLI of the project shares).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from RadiogenomicGANLib import request as request_path
from RadiogenomicGANLib.atomic import check_writable, partial_path, remove_abandoned_partials
from RadiogenomicGANLib.bundled import bundled_weights_path, verify_bundled
from RadiogenomicGANLib.cli_common import EXIT_CANCELLED, EXIT_USER_ERROR, UserError, check_not_an_input, run_cli
from RadiogenomicGANLib.insertion import InsertionCancelled, InsertionError
from RadiogenomicGANLib.segments import empty_nodule_note, nodule_segments

DEFAULT_WEIGHTS = bundled_weights_path()
EXIT_BAD_INPUT = EXIT_USER_ERROR
#: No CT has this many slices; a longer --slices range or ±K is a typo, refused before any list is built.
MAX_SLICES = request_path.MAX_SLICES
#: More threads than this only oversubscribe the CPU (and a typo like 100000 would try to start them all).
MAX_THREADS = 4 * (os.cpu_count() or 1)


class CLIError(UserError):
    """Bad command-line input (exit status 2)."""


# --- parsing --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m RadiogenomicGANLib",
        description="RadiogenomicGAN: gene-controlled synthetic lung nodules in CT volumes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    insert = commands.add_parser(
        "insert",
        help="insert synthetic nodules into a CT and write the new volume and its segmentation",
        description="Insert synthetic nodules driven by a gene-expression profile into a CT volume. The input is "
        "never modified; new files are written.",
    )
    source = insert.add_argument_group("inputs")
    source.add_argument("--ct", required=True, type=Path, metavar="FILE_OR_DICOM_DIR",
                        help="CT volume (.nrrd, .nii, .nii.gz, .mha) or DICOM folder")
    source.add_argument("--series-uid", help="the CT series to use when the DICOM folder holds several")
    source.add_argument("--genes", required=True, type=Path, help="gene table (GEO text, .txt.gz or CSV)")
    source.add_argument("--sample", required=True, help="sample id whose profile drives the nodule")
    source.add_argument("--blend-with", help="second sample id: the profile becomes a blend of the two")
    source.add_argument("--blend-weight", type=float, default=0.5, help="weight of --blend-with in [0, 1] (0.5)")
    source.add_argument("--impute-missing-genes", action="store_true",
                        help="set genes the table lacks to the training mean instead of failing")
    source.add_argument("--weights", type=Path, default=None,
                        help=f"model weights .safetensors (default: the bundled demo model {DEFAULT_WEIGHTS.name})")

    where = insert.add_argument_group("where (one of)")
    placement = where.add_mutually_exclusive_group(required=True)
    placement.add_argument("--center-ras", action="append", metavar="X,Y,Z",
                           help="nodule centre in RAS mm (repeat for several nodules)")
    placement.add_argument("--auto", type=int, metavar="N", help="place N nodules automatically in the lung")
    where.add_argument("--slices", action="append", metavar="SPEC",
                       help="slices of a centre: '±K' (or '+-K') around its slice, 'auto' (every slice the "
                       "nodule's size spans), or a list like '10,11,12' or '10-14'; once for all centres or once "
                       "per --center-ras")
    where.add_argument("--half-slices", type=int, default=None,
                       help="±K slices around each centre (default: every slice the nodule's size spans, as "
                       "'--slices auto')")
    where.add_argument("--allow-outside-lung", action="store_true", help="accept centres outside the lung mask")

    run = insert.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for the generator (default: torch's); 1 is fastest on a busy shared machine")

    outputs = insert.add_argument_group("outputs")
    outputs.add_argument("--out-volume", required=True, type=Path, help="new CT (.nrrd, .nii, .nii.gz, .mha)")
    outputs.add_argument("--out-segmentation", required=True, type=Path, help="nodule segmentation (.seg.nrrd)")
    outputs.add_argument("--out-weight-map", type=Path, help="fusion weight map volume (optional)")
    outputs.add_argument("--out-dicom-seg", type=Path, help="DICOM SEG of the nodules (DICOM input only)")
    outputs.add_argument("--quiet", action="store_true", help="no progress bar")
    outputs.add_argument("--progress-lines", action="store_true",
                         help="progress as 'PROGRESS <fraction> <message>' lines on stdout (for the Slicer module)")
    return parser


def parse_centre(text: str) -> np.ndarray:
    """'X,Y,Z' (commas or spaces) → (3,) RAS mm."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        values = np.zeros(0)
    if values.shape != (3,) or not np.isfinite(values).all():
        raise CLIError(f"--center-ras {text!r}: expected three numbers X,Y,Z in RAS mm")
    return values


#: The one slice syntax and plan of the request path (RadiogenomicGANLib.request), shared with the module.
parse_slices = request_path.parse_slice_spec
plan_slices = request_path.plan_slices


# --- the insert command ---------------------------------------------------------------------------------
def run_insert(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything, insert, write all outputs atomically; returns a summary for printing."""
    from RadiogenomicGANLib import volume_io

    # 1. outputs: suffixes and folders, before any work.
    volume_io.check_output_path(args.out_volume)
    volume_io.check_output_path(args.out_segmentation, (volume_io.SEG_SUFFIX,))
    if args.out_weight_map is not None:
        volume_io.check_output_path(args.out_weight_map)
    if args.out_dicom_seg is not None:
        if args.out_dicom_seg.is_dir() or not args.out_dicom_seg.parent.exists():
            raise CLIError(f"--out-dicom-seg {args.out_dicom_seg}: not a file in an existing folder")
        if args.ct.is_file() and not args.ct.name.lower().endswith(".dcm"):
            raise CLIError("--out-dicom-seg needs a DICOM input series (--ct DICOM_FOLDER) to reference")
    options = {"--out-volume": args.out_volume, "--out-segmentation": args.out_segmentation,
               "--out-weight-map": args.out_weight_map, "--out-dicom-seg": args.out_dicom_seg}
    finals = [p for p in options.values() if p]
    if len({p.resolve() for p in finals}) != len(finals):
        raise CLIError("two outputs have the same path")
    for option, path in options.items():
        # a file of the input, or anywhere in an input DICOM folder (a new file there joins the series)
        if path is not None:
            check_not_an_input(path, [args.ct, args.genes, args.weights], option)
    for folder in {(p.parent if str(p.parent) else Path(".")) for p in finals}:
        check_writable(folder)  # a read-only folder fails now, not after the generator has run
    if args.auto is not None and args.auto < 1:
        raise CLIError("--auto N needs N ≥ 1")
    if args.half_slices is not None and not 0 <= args.half_slices <= MAX_SLICES // 2:
        raise CLIError(f"--half-slices must be between 0 and {MAX_SLICES // 2}, got {args.half_slices}")
    centres = np.stack([parse_centre(c) for c in args.center_ras]) if args.center_ras else None

    if not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed must be between 0 and 2**63 − 1, got {args.seed}")
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise CLIError(f"--threads must be between 1 and {MAX_THREADS} (4 × this machine's CPUs)")
        import torch

        torch.set_num_threads(args.threads)

    # 2. the request: the same path as the Slicer module (RadiogenomicGANLib.request).
    if args.weights is None:
        try:
            weights = verify_bundled(DEFAULT_WEIGHTS)
        except ValueError as error:
            raise CLIError(str(error)) from None
    else:
        weights = args.weights
    request = request_path.InsertionRequest(
        sample=args.sample, gene_table=args.genes, blend_with=args.blend_with, blend_weight=args.blend_weight,
        impute_missing_genes=args.impute_missing_genes, weights=weights, device=args.device, centres_ras=centres,
        auto_count=args.auto or 0, slices=tuple(args.slices or ()), half_slices=args.half_slices, seed=args.seed,
        allow_outside_lung=args.allow_outside_lung, weight_map=args.out_weight_map is not None,
        input_name=_input_name(args.ct))
    loaded = volume_io.read_volume(args.ct, series_uid=args.series_uid)
    if args.series_uid is not None and loaded.source != "dicom":
        raise CLIError(f"--series-uid picks a series of a DICOM folder; {args.ct.name} is a {loaded.source} file")
    if args.out_dicom_seg is not None and loaded.source != "dicom":
        raise CLIError("--out-dicom-seg needs a DICOM input series (--ct DICOM_FOLDER) to reference")
    cache = request_path.ResourceCache()
    plan = request_path.make_plan(request, loaded.geometry, cache)
    sample = plan.gene_sample
    imputed = plan.provenance.get("imputed_genes")
    if imputed:
        print(f"note: {imputed} of {len(plan.inserter.metadata.gene_names)} model genes were missing and set to the "
              "training mean (recorded as imputed_genes in the provenance)", file=sys.stderr)
    for note in request_path.training_sample_notes(plan.provenance):
        print(f"note: {note}", file=sys.stderr)

    # 3. insert (validates the CT, centres, slices and lung before the generator runs).
    with _ProgressBar(args.quiet, args.progress_lines) as progress:
        result = request_path.execute(plan, loaded.array, loaded.geometry, progress, cache)

    # 4. outputs: staged beside their targets, renamed together at the end.
    segments = nodule_segments(len(result.centres_ras), result.provenance)
    provenance_text = _provenance_text(result.provenance)
    staged: list[tuple[Path, Path]] = []
    remove_abandoned_partials(finals)
    try:
        target = partial_path(args.out_volume)
        staged.append((target, args.out_volume))
        volume_io.write_volume(target, result.volume_hu, loaded.geometry,
                               metadata={"RadiogenomicGAN_Provenance": provenance_text})
        target = partial_path(args.out_segmentation)
        staged.append((target, args.out_segmentation))
        volume_io.write_segmentation(target, result.label, loaded.geometry, segments)
        if args.out_weight_map is not None and result.weight_map is not None:
            target = partial_path(args.out_weight_map)
            staged.append((target, args.out_weight_map))
            volume_io.write_volume(target, result.weight_map, loaded.geometry)
        if args.out_dicom_seg is not None:
            target = partial_path(args.out_dicom_seg)
            staged.append((target, args.out_dicom_seg))
            volume_io.write_dicom_seg(target, result.label, loaded, segments, result.provenance)
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            if temporary.exists():
                temporary.unlink()
    voxels = [int((result.label == n + 1).sum()) for n in range(len(result.centres_ras))]
    return {"result": result, "outputs": [final for _, final in staged], "voxels": voxels, "sample": sample}


def _input_name(path: Path) -> str:
    """The input's name as the provenance records it: the file name without its volume suffix."""
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _provenance_text(provenance: dict[str, Any]) -> str:
    import json

    return json.dumps(provenance, separators=(",", ":"), default=str)


class _ProgressBar:
    """A tqdm bar driven by the inserter's (fraction, message) callback, or machine-readable lines."""

    def __init__(self, quiet: bool, lines: bool = False) -> None:
        self.quiet = quiet
        self.lines = lines
        self.bar: Any = None

    def __enter__(self) -> Any:
        if self.lines:
            def line(fraction: float, message: str) -> bool:
                print(f"PROGRESS {fraction:.3f} {message}", flush=True)
                return True

            return line
        if self.quiet:
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=100, unit="%", desc="Inserting", file=sys.stderr, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

        def update(fraction: float, message: str) -> bool:
            self.bar.n = round(100 * fraction)
            self.bar.set_postfix_str(message)
            self.bar.refresh()
            return True

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means 'bad input' (exit 2), imported lazily so --help stays fast."""
    errors: list[type[BaseException]] = [CLIError, InsertionError, request_path.RequestError]
    for module, name in (
        ("RadiogenomicGANLib.bundled", "BundledModelError"),
        ("RadiogenomicGANLib.devices", "DeviceError"),
        ("RadiogenomicGANLib.imputation", "ImputationError"),
        ("RadiogenomicGANLib.volume_io", "VolumeIOError"),
        ("RadiogenomicGANLib.genes", "GeneTableError"),
        ("RadiogenomicGANLib.dicom_io", "DicomError"),
        ("RadiogenomicGANLib.weights", "WeightsError"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """'--center-ras -12.5,30,4' → '--center-ras=-12.5,30,4': argparse takes '-12.5,…' for an option."""
    joined: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item in ("--center-ras", "--slices") and index + 1 < len(items) and items[index + 1].startswith("-"):
            joined.append(f"{item}={items[index + 1]}")
            index += 2
            continue
        joined.append(item)
        index += 1
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m RadiogenomicGANLib insert ...`: exit 0, 2 (bad input, one line on stderr) or 130."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    if args.command != "insert":
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT

    def body() -> int:
        try:
            summary = run_insert(args)
        except InsertionCancelled:
            print("cancelled: no output written", file=sys.stderr)
            return EXIT_CANCELLED
        _print_summary(summary)
        return 0

    return run_cli(body, _bad_input_errors(), interrupted="interrupted: no output written")


def insert_main() -> int:
    """Console script `radiogenomicgan-insert ...` = `python -m RadiogenomicGANLib insert ...`."""
    return main(["insert", *sys.argv[1:]])


def _print_summary(summary: dict[str, Any]) -> None:
    result = summary["result"]
    print(f"Inserted {len(result.centres_ras)} synthetic nodule(s) for {summary['sample']} "
          f"(seed {result.provenance['seed']}, {result.provenance['model_kind']} model, "
          f"{result.provenance['device']}):")
    fitted = result.provenance["slices_fitted_to_size"]
    for n, (centre, ks, voxels) in enumerate(zip(result.centres_ras, result.slices, summary["voxels"]), start=1):
        print(f"  nodule {n}: RAS ({centre[0]:.1f}, {centre[1]:.1f}, {centre[2]:.1f}) mm, "
              f"slices {ks[0]}–{ks[-1]}{' (fitted to its size)' if fitted[n - 1] else ''}, {voxels} labelled voxels")
    note = empty_nodule_note([n for n, voxels in enumerate(summary["voxels"], start=1) if voxels == 0])
    if note:
        print(f"warning: {note}", file=sys.stderr)
    for path in summary["outputs"]:
        print(f"  wrote {path}")
