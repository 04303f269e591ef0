"""Export a generator from any training checkpoint in the weights format the module loads.

`python -m training.train` exports, with `export_generator`, the EMA generator of its best-validated checkpoint
(else of its last step); this exports any other step (GAN training on small cohorts can degrade late, so the
best samples may be mid-run) or the raw, non-EMA generator (the EMA ablation). Gene names and the gene
preprocessing come from the checkpoint's dataset file, which must be the one the run trained on (its SHA-256 is
checked), refitted as the run did (`training.dataset.training_data`).
`--checkpoint RUN` (or RUN/checkpoints) picks the checkpoint with the best validation score that the run
recorded (`best.safetensors`), else the latest.

`--generator KEY=VALUE` sets a composition option (`networks.COMPOSITION_OPTIONS`: how the trained generator
composes its output, nothing it learned) on the exported generator; a checkpoint is otherwise exported with the
run's own `--export-generator` options. `--weights W` instead of `--checkpoint` writes an exported model again
with such an option changed, every learned tensor kept (how the bundled model got its laid-over nodule); it takes
`--data` only to calibrate `spicule_contrast` on the training donors.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from RadiogenomicGANLib.atomic import file_sha256
from RadiogenomicGANLib.cli_common import check_output_file, run_cli, same_file
from RadiogenomicGANLib.networks import COMPOSITION_OPTIONS, GeneratorConfig, build_generator, with_composition
from RadiogenomicGANLib.weights import WeightsError, load_weights, save_weights, weights_paths

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, parse_override
from .dataset import DatasetError, RadiogenomicDataset, training_data
from .iteration import real_strand_contrast


class ExportError(ValueError):
    """The checkpoint and dataset cannot be exported together; the message says why."""


def export_generator(
    generator: nn.Module, data: RadiogenomicDataset, path: Path, provenance: dict[str, Any]
) -> Path:
    """A generator (the EMA one at the end of training) in the weights format, with the dataset's fitted gene
    preprocessing and provenance."""
    from RadiogenomicGANLib.weights import WeightsMetadata

    generator = copy.deepcopy(generator).to("cpu", memory_format=torch.contiguous_format).eval()
    metadata = WeightsMetadata(
        config=generator.config,
        genes=data.gene_preprocessing,
        hu_window=(float(data.hu_window[0]), float(data.hu_window[1])),
        patch_size=int(data.patch_size),
        patch_spacing_mm=float(data.patch_spacing_mm),
        provenance=provenance,
    )
    return Path(save_weights(path, generator, metadata))


def export_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path, *, raw: bool = False,
                      provenance: dict[str, Any] | None = None, composition: dict[str, Any] | None = None) -> Path:
    """Write OUT.safetensors + OUT.json from the EMA (default) or raw generator of `checkpoint`, with the
    composition options the run exported with, updated by `composition`.

    Refused before anything is read: an OUT whose .safetensors or .json would overwrite the checkpoint or the
    dataset (`--out C` with C the checkpoint once replaced it).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    for target in weights_paths(out):
        for source, option in ((checkpoint, "--checkpoint"), (data, "--data")):
            if same_file(target, source):
                raise ExportError(f"--out {out} would write {target}, which is the {option} input: choose another "
                                  "name")
    check_output_file(weights_paths(out)[0])
    tensors, state = ckpt.load_checkpoint(checkpoint)
    data = Path(data)
    dataset, run_config = trained_on(data, state, "this checkpoint")
    generator = build_generator(GeneratorConfig.from_dict(state["generator_config"]))
    ckpt.load_module("G" if raw else "G_ema", generator, tensors)
    composition = {**run_config.export_generator, **(composition or {})}
    if composition:
        generator = compose(generator, composition, dataset)
    record = {
        "exported_from": str(checkpoint),
        "step": int(state["step"]),
        "generator": "raw" if raw else "ema",
        "dataset": str(data),
        "dataset_sha256": state.get("dataset_sha256"),
        "train_config": state.get("train_config"),
        "loss_weights": state.get("loss_weights"),
        **({"validation": state["validation"]} if "validation" in state else {}),
        **({"composed_at_export": composition} if composition else {}),
        **(provenance or {}),
    }
    return export_generator(generator, dataset, Path(out), record)


def recompose_weights(weights: str | Path, out: str | Path, composition: dict[str, Any],
                      provenance: dict[str, Any] | None = None, data: str | Path | None = None) -> Path:
    """Write exported weights `weights` again as OUT with the composition options `composition` changed: the
    same tensors, gene preprocessing and provenance, plus a record of the source and the change. `data`, the
    dataset the model trained on, is needed to switch `spicule_contrast` on (its training donors' strands)."""
    if not composition:
        raise ExportError("--weights writes a model again with a composition option changed: give --generator "
                          f"KEY=VALUE ({', '.join(sorted(COMPOSITION_OPTIONS))})")
    source, target = weights_paths(weights), weights_paths(out)
    if any(same_file(t, s) for t in target for s in source):
        raise ExportError(f"--out {out} would overwrite the --weights input: choose another name")
    check_output_file(target[0])
    generator, metadata = load_weights(weights)
    dataset = trained_on(data, metadata.provenance, str(weights))[0] if data is not None else None
    generator = compose(generator, composition, dataset)
    record = {
        **metadata.provenance,
        # a file re-composed before keeps that record inside this one: the lineage back to the trained export
        "recomposed_from": {"weights": str(source[0]), "safetensors_sha256": file_sha256(source[0]),
                            "changed": dict(composition),
                            **({"recomposed_from": metadata.provenance["recomposed_from"]}
                               if "recomposed_from" in metadata.provenance else {})},
        **(provenance or {}),
    }
    return Path(save_weights(out, generator, replace(metadata, config=generator.config, provenance=record)))


def trained_on(data: str | Path, record: dict[str, Any], what: str) -> tuple[RadiogenomicDataset, TrainConfig]:
    """`data` as the run that wrote `record` (a checkpoint's state, or an exported model's provenance) trained on
    it, and that run's config: refused unless its SHA-256 is the recorded one, the gene preprocessing refitted as
    the run did (`training_data`; a config this version cannot read falls back to the defaults)."""
    expected = record.get("dataset_sha256")
    if expected and file_sha256(data) != expected:
        raise ExportError(f"{data} is not the dataset {what} was trained on (SHA-256 differs); pass that file "
                          f"({record.get('dataset', 'path unknown')})")
    try:
        run_config = TrainConfig.from_dict(record.get("train_config") or {})
    except ConfigError:
        run_config = TrainConfig()
    return training_data(replace(run_config, data=str(data))), run_config


def compose(generator: nn.Module, composition: dict[str, Any], data: RadiogenomicDataset | None) -> nn.Module:
    """`networks.with_composition`; strands switched to `spicule_contrast` are calibrated on `data`'s training
    donors as training calibrates them (`iteration.real_strand_contrast`). A refusal is an ExportError."""
    contrast = None
    if composition.get("spicule_contrast") and not generator.config.spicule_contrast:
        if data is None:
            raise ExportError("--generator spicule_contrast=true paints the strands at the training donors' real "
                              "strands' lift over the lung: give --data, the dataset the model trained on")
        contrast = real_strand_contrast(data)
    try:
        return with_composition(generator, strand_contrast=contrast, **composition)
    except ValueError as error:
        raise ExportError(f"--generator: {error}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given; for a run folder (or its checkpoints/), the best-validated one, else the
    latest."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = ckpt.best_checkpoint(folder) or ckpt.latest_checkpoint(folder)
    if found is None:
        raise ckpt.CheckpointError(f"no checkpoint in {folder}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="RUN/checkpoints/ckpt-<step>.safetensors, or RUN for the "
                        "best-validated checkpoint")
    source.add_argument("--weights", help="an exported model (NAME or NAME.safetensors) to write again with "
                        "--generator's composition option changed")
    parser.add_argument("--data", help="the dataset .npz the run trained on (with --weights: only to switch "
                        "spicule_contrast on)")
    parser.add_argument("--out", required=True, help="output weights path (NAME or NAME.safetensors)")
    parser.add_argument("--raw", action="store_true", help="export the raw generator instead of its EMA")
    parser.add_argument("--generator", action="append", default=[], metavar="KEY=VALUE",
                        help="a composition option of the exported generator "
                        f"({', '.join(sorted(COMPOSITION_OPTIONS))}; e.g. edge_over_background=true); repeatable")
    parser.add_argument("--provenance", action="append", default=[], metavar="KEY=VALUE",
                        help="extra provenance entries (repeatable)")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.data:
        parser.error("--checkpoint needs --data, the dataset .npz the run trained on")
    if args.weights and args.raw:
        parser.error("--weights takes no --raw: it writes an exported model again")

    def body() -> int:
        extra = dict(parse_override(item) for item in args.provenance)  # as training.train reads --provenance
        composition = dict(parse_override(item) for item in args.generator)
        if args.weights:
            path = recompose_weights(args.weights, args.out, composition, provenance=extra, data=args.data)
        else:
            path = export_checkpoint(args.checkpoint, args.data, args.out, raw=args.raw, provenance=extra,
                                     composition=composition)
        print(f"wrote {path} and {path.with_suffix('.json')}")
        return 0

    return run_cli(body, (ckpt.CheckpointError, ConfigError, DatasetError, ExportError, WeightsError))


if __name__ == "__main__":
    sys.exit(main())
