"""Train the proposed generator or a baseline: ``python -m training.train --data FILE --model KIND --out RUN``.

This file is only the command line, as stylegan2-ada's ``train.py`` is: it resolves the options (defaults <
RUN/config.json on ``--resume`` < ``--config FILE`` < flags) and calls `training.training_loop.training_loop`,
where the loop, its outputs and its guarantees (bit-exact resume, DDP = one process with the global batch)
are described. Multi-GPU: ``torchrun --nproc_per_node N -m training.train ...``.

The pieces, each in a file named for it: `training.sampling` (resumable rank-aware sample order, item noise),
`training.iteration` (networks, optimisers, DDP phases, precision, EMA, one iteration), `training.resume`
(checkpoint content, resume checks), `training.snapshot` (summary table, image grids), `training.provenance`
(git commit, dataset hashes), `training.export` (weights export). `training_loop`, `training_data` and
`export_generator` are importable from here too.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from RadiogenomicGANLib.cli_common import check_output_folder, require_optional, run_cli
from RadiogenomicGANLib.devices import DeviceError
from RadiogenomicGANLib.networks import COMPOSITION_OPTIONS, GeneratorConfig

from . import checkpoint as ckpt
from .config import MODELS, VALIDATION_THREAD, ConfigError, TrainConfig, parse_override
from .dataset import DatasetError, training_data
from .discriminator import DiscriminatorConfig
from .export import export_generator
from .iteration import build_configs, ema_decay
from .losses import LossWeights
from .sampling import ResumableDistributedSampler, item_noise
from .training_loop import TrainingError, training_loop

__all__ = [
    "ResumableDistributedSampler",
    "TrainingError",
    "build_configs",
    "build_parser",
    "cli",
    "ema_decay",
    "export_generator",
    "item_noise",
    "main",
    "resolve_config",
    "training_data",
    "training_loop",
]


# ----------------------------------------------------------------------------------------------------
# Command line


# Set from --model and the dataset (`iteration.build_configs`), so not offered as overrides in the help.
_FROM_DATA = ("kind", "num_genes", "patch_size")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train the RadiogenomicGAN generator (proposed) or a baseline (mcgan, inpainting). "
        "Multi-GPU: torchrun --nproc_per_node N -m training.train ...; --batch-size is per process, "
        "so the global batch is N × batch size.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", help="dataset .npz written by python -m training.prepare")
    p.add_argument("--model", choices=MODELS, help=f"generator to train (default {d.model})")
    p.add_argument("--out", help="run folder (config.json, checkpoints/, samples/, tensorboard/, weights)")
    p.add_argument("--steps", type=int, help=f"total optimisation steps (default {d.steps})")
    p.add_argument("--config", dest="config_file", help="JSON file of options (command-line flags override it)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in RUN/checkpoints (or the one given); without "
                   "--config the options of RUN/config.json are reused")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    g.add_argument("--lr-g", type=float, help=f"generator Adam learning rate (default {d.lr_g})")
    g.add_argument("--lr-d", type=float, help=f"discriminator Adam learning rate (default {d.lr_d})")
    g.add_argument("--beta1", type=float, help=f"Adam β1 (default {d.beta1})")
    g.add_argument("--beta2", type=float, help=f"Adam β2 (default {d.beta2})")
    g.add_argument("--ema-decay", type=float, help=f"EMA decay of the exported generator (default {d.ema_decay})")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, help="ramp the EMA decay up early")
    g.add_argument("--loss-weight", action="append", metavar="NAME=VALUE",
                   help=f"override a LossWeights term ({', '.join(f.name for f in fields(LossWeights))}); "
                   "repeatable")
    g.add_argument("--generator", action="append", metavar="KEY=VALUE",
                   help="override a GeneratorConfig field ("
                   f"{', '.join(f.name for f in fields(GeneratorConfig) if f.name not in _FROM_DATA)}); repeatable")
    g.add_argument("--discriminator", action="append", metavar="KEY=VALUE",
                   help="override a DiscriminatorConfig field ("
                   f"{', '.join(f.name for f in fields(DiscriminatorConfig) if f.name not in _FROM_DATA)}); repeatable")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--gene-components", type=int, help="refit the gene preprocessing on the train patients with a "
                   "whitened PCA to this many axes (default 0: none)")
    g.add_argument("--gene-top-variance", type=int, help="keep only this many most variable genes (default 0: all)")
    g.add_argument("--gene-out-of-sample-gain", action=argparse.BooleanOptionalAction,
                   help="with --gene-components: put a patient outside the fit back on the training patients' "
                   "scale, by a gain fitted leave-one-out (default on)")
    g.add_argument("--uniform-donors", action=argparse.BooleanOptionalAction,
                   help="draw donors uniformly rather than by their slice count (default on)")
    g.add_argument("--distant-wrong-genes", action=argparse.BooleanOptionalAction,
                   help="mismatched genes ḡ from the farther half of the other patients (default on)")
    g.add_argument("--match-backgrounds", action=argparse.BooleanOptionalAction,
                   help="pair each nodule slice with a background holding about as much chest wall (default off)")
    g.add_argument("--match-share", type=float, help=f"... drawn among this fraction of the backgrounds nearest in "
                   f"chest wall (default {d.match_share})")
    g.add_argument("--match-texture", action=argparse.BooleanOptionalAction,
                   help="with --match-backgrounds: match the surroundings' texture (dense share, high-passed sd) "
                   "too, as the evaluation's surroundings-matched test does (default off)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="turn and flip every drawn patch by one of the square's 8 symmetries (default off)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast on CUDA (default on)")
    r.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast on CPU as well (about 2× faster on CPUs with AVX512-BF16/AMX; default off)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory format (default on)")
    r.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction,
                   help="batch-norm statistics over the global batch under DDP (default on)")
    r.add_argument("--deterministic", action=argparse.BooleanOptionalAction, help="deterministic cuDNN")
    r.add_argument("--num-workers", type=int, help=f"DataLoader workers per process (default {d.num_workers})")
    o = p.add_argument_group("output")
    o.add_argument("--log-every", type=int, help=f"steps between logged scalars (default {d.log_every})")
    o.add_argument("--sample-every", type=int, help=f"steps between image grids, 0 = end only ({d.sample_every})")
    o.add_argument("--checkpoint-every", type=int, help=f"0 = end only (default {d.checkpoint_every})")
    o.add_argument("--keep-checkpoints", type=int, help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    o.add_argument("--num-samples", type=int, help=f"rows of the image grid (default {d.num_samples})")
    o.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, help="TensorBoard logs (default on)")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, help="tqdm progress bar (default on)")
    o.add_argument("--validation", action=argparse.BooleanOptionalAction,
                   help="score the EMA generator on the val donors at every checkpoint and export the best "
                   "(default on; needs ≥ 3 val donors)")
    o.add_argument("--validation-thread", choices=VALIDATION_THREAD,
                   help="score each checkpoint on a thread while training goes on, same scores and choice "
                   "(default auto: on a CPU where training leaves a core idle)")
    o.add_argument("--export-name", help="stem of the exported weights (default: the model name)")
    o.add_argument("--export-generator", action="append", metavar="KEY=VALUE",
                   help="a composition option set on the exported generator only, trained without it ("
                   f"{', '.join(sorted(COMPOSITION_OPTIONS))}; e.g. edge_over_background=true); repeatable")
    o.add_argument("--provenance", action="append", metavar="KEY=VALUE",
                   help="extra entry in the exported weights' provenance, VALUE read as JSON when it parses "
                   "(e.g. phantom_seed=2026); repeatable")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """defaults < RUN/config.json (on --resume without --config) < --config FILE < command-line flags."""
    given = vars(args).copy()
    config_file = given.pop("config_file", None)
    given.pop("resume", None)
    base = TrainConfig()
    if config_file:
        base = TrainConfig.load(config_file)
    elif "resume" in vars(args) and given.get("out") and (Path(given["out"]) / "config.json").is_file():
        base = TrainConfig.load(Path(given["out"]) / "config.json")
    merged = base.to_dict()
    for section in ("loss_weight", "generator", "discriminator", "export_generator", "provenance"):
        pairs = given.pop(section, None)
        if pairs:
            target = "loss_weights" if section == "loss_weight" else section
            merged[target] = {**merged[target], **dict(parse_override(text) for text in pairs)}
    merged.update(given)
    return TrainConfig.from_dict(merged)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The training CLI; a user error prints one line and exits 2 (`cli_common`), never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m training.train " + shlex.join(argv)
    result: dict[str, Any] = {}

    def body() -> int:
        cfg = resolve_config(args).validate()
        check_output_folder(cfg.out, create=False)  # --out naming a file, or read-only: refused before any work
        if cfg.tensorboard:
            require_optional("tensorboard")
        result.update(training_loop(cfg, resume=getattr(args, "resume", None), command=command))
        return 0

    code = run_cli(body, (ConfigError, DatasetError, ckpt.CheckpointError, TrainingError, DeviceError))
    if code:
        raise SystemExit(code)
    return result


def cli() -> int:
    """Console script `radiogenomicgan-train`: `main` with an exit status instead of the run summary."""
    main()
    return 0


if __name__ == "__main__":
    main()
