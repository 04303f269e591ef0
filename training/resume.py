"""What a training checkpoint holds, and how a run resumes from one bit-exactly.

A checkpoint carries G, D, the EMA G, both optimisers and every random-number state (`training.checkpoint`
writes them without pickles); the data order is not a state at all but a function of (seed, epoch, position),
recorded under "data_order". A checkpoint of another model, gene list or architecture is refused with one
message rather than half-loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .distributed import DistContext
from .iteration import Networks
from .sampling import ResumableDistributedSampler


def _modules(nets: Networks) -> tuple[tuple[str, nn.Module], ...]:
    """The networks a checkpoint stores, by their name in it."""
    return ("G", nets.generator), ("D", nets.discriminator), ("G_ema", nets.generator_ema)


def checkpoint_to_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint `--resume` names ("latest": the newest in RUN/checkpoints), or None for a fresh run —
    which is refused when RUN already holds checkpoints, so a run is never overwritten by accident."""
    ckpt_dir = out / "checkpoints"
    if not resume:
        if ckpt.latest_checkpoint(ckpt_dir) is not None:
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out"
            )
        return None
    path = ckpt.latest_checkpoint(ckpt_dir) if resume == "latest" else Path(resume)
    if path is None:
        raise ckpt.CheckpointError(f"nothing to resume: no checkpoint in {ckpt_dir}")
    return path


def checkpoint_state(nets: Networks, step: int, cfg: TrainConfig, run: dict[str, Any],
                     sampler: ResumableDistributedSampler) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything a bit-exact resume needs. The data order is not a generator state: it is a function of
    (seed, epoch, position), recorded under "data_order"."""
    tensors: dict[str, Tensor] = {}
    for name, module in _modules(nets):
        tensors.update(ckpt.module_tensors(name, module))
    optim_meta = {}
    for name, opt in (("G", nets.opt_g), ("D", nets.opt_d)):
        flat, meta = ckpt.optimizer_state(name, opt)
        tensors.update(flat)
        optim_meta[name] = meta
    rng_tensors, rng_meta = ckpt.rng_state(cuda_device=next(nets.generator.parameters()).device)
    tensors.update(rng_tensors)
    state = {
        "step": step,
        "model": nets.generator_config.kind,
        "num_genes": nets.generator_config.num_genes,
        "generator_config": nets.generator_config.to_dict(),
        "discriminator_config": nets.discriminator_config.to_dict(),
        "loss_weights": nets.loss_weights.to_dict(),
        "train_config": cfg.to_dict(),
        "optimizers": optim_meta,
        "rng": rng_meta,
        "data_order": {
            "seed": cfg.seed,
            "epoch": sampler.epoch_of(step),
            "step_in_epoch": step % sampler.steps_per_epoch,
            "steps_per_epoch": sampler.steps_per_epoch,
            "permutation": "training.dataset.epoch_permutation(n, seed, epoch)",
        },
        **run,
    }
    return tensors, state


def check_resume_fits(state: Mapping[str, Any], nets: Networks, gene_names_sha: str, path: Path) -> None:
    """A checkpoint of another model, gene count, gene list or architecture is refused with one message."""
    g_cfg = nets.generator_config
    if state.get("model") != g_cfg.kind:
        raise ckpt.CheckpointError(
            f"cannot resume: {path} is a checkpoint of model {state.get('model')!r}, this run trains {g_cfg.kind!r}"
        )
    if state.get("num_genes") != g_cfg.num_genes:
        raise ckpt.CheckpointError(
            f"cannot resume: {path} was trained with {state.get('num_genes')} genes, the dataset has "
            f"{g_cfg.num_genes}"
        )
    if state.get("gene_names_sha256") not in (None, gene_names_sha):
        raise ckpt.CheckpointError(f"cannot resume: {path} was trained on a different gene list than the dataset's")
    configs = {"generator_config": g_cfg.to_dict(), "discriminator_config": nets.discriminator_config.to_dict()}
    for key, mine in configs.items():
        theirs = state.get(key, {})
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {mine.get(k)!r}" for k in differ)
            raise ckpt.CheckpointError(f"cannot resume: {path} has another architecture ({key}: {detail})")


def restore(path: Path, nets: Networks, gene_names_sha: str, ctx: DistContext, global_batch: int) -> int:
    """Load networks, optimisers and RNG states from a checkpoint that fits this run; returns its step. A
    different global batch is allowed, with a warning: the data order then differs from an uninterrupted run."""
    tensors, state = ckpt.load_checkpoint(path)
    check_resume_fits(state, nets, gene_names_sha, path)
    for name, module in _modules(nets):
        ckpt.load_module(name, module, tensors)
    ckpt.load_optimizer("G", nets.opt_g, tensors, state["optimizers"]["G"])
    ckpt.load_optimizer("D", nets.opt_d, tensors, state["optimizers"]["D"])
    ckpt.set_rng_state(tensors, state["rng"], cuda_device=ctx.device)
    if ctx.is_main and state.get("global_batch") not in (None, global_batch):
        print(f"warning: resuming with global batch {global_batch}, the checkpoint used "
              f"{state.get('global_batch')}; the data order will differ from an uninterrupted run",
              file=sys.stderr)
    return int(state["step"])
