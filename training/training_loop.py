"""The training loop: `training_loop` reads top to bottom like stylegan2-ada's — initialise, load data,
construct networks, resume, print a summary, distribute, train, done. The per-step bookkeeping (scalars,
image grids, checkpoints with their validation score, the export) lives in the small helpers below it.

Runs on 1 CPU, 1 GPU or many (``torchrun --nproc_per_node N -m training.train ...``): every rank trains on
its own share of each **global batch = per-rank batch × world size**; rank 0 alone logs, samples and writes
(resuming on several nodes needs RUN on a shared file system). Batch norm uses global-batch statistics under
DDP by default (SyncBatchNorm on GPU, `training.distributed.GlobalBatchNorm` on CPU), so the world size does
not change what is trained; ``--no-sync-batchnorm`` keeps per-rank statistics.

Speed: channels-last memory format everywhere (``--no-channels-last`` to disable); bf16 autocast on CUDA
(``--no-amp`` to disable) and, opt-in, on CPUs with bf16 units (``--cpu-bf16``, about 2× faster there).
On a shared CPU set OMP_NUM_THREADS to the cores you really have: oversubscribed OpenMP threads wait for
each other and can make an iteration several times slower.
With glibc, freed tensor memory is kept for reuse instead of being unmapped and faulted in again each step
(`RadiogenomicGANLib.devices.keep_freed_memory`: the recommended setting's CPU step up to 12 % faster at 128²,
3 % at 64², values unchanged).

Reproducibility. Nothing in an iteration draws from global random state (`training.sampling`), and the
networks are initialised from the seed. So a run stopped after step k and resumed from its checkpoint ends
bit-identical (on CPU) to an uninterrupted run, and N ranks with per-rank batch b see exactly the samples,
noise and (with global batch norm) statistics of one process with batch N·b.

Outputs in RUN: ``config.json`` (resolved options), ``checkpoints/ckpt-<step>.safetensors`` (with the EMA
generator's validation score, the best one kept as ``best.safetensors``), ``log.jsonl`` (scalars and
validation scores), ``samples/step-<step>.png`` and ``tensorboard/`` (image grids: real | generator input |
synthetic | mask | weight map, one row per fixed validation sample), and the EMA generator of the
best-validated checkpoint (else of the last step) as ``<model>.safetensors`` + ``.json`` in the weights format.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from RadiogenomicGANLib.devices import keep_freed_memory
from RadiogenomicGANLib.processes import usable_cores

from . import checkpoint as ckpt
from .config import TrainConfig
from .dataset import NoduleBatchDataset, RadiogenomicDataset, training_data
from .distributed import DistContext, all_reduce_mean, barrier, setup_distributed, teardown_distributed
from .export import compose, export_generator
from .iteration import (
    Networks,
    build_configs,
    build_networks,
    ema_decay,
    precision_context,
    real_lobe_scale,
    real_strand_contrast,
    real_strand_share,
    train_iteration,
    update_ema,
)
from .losses import code_phenotype_features
from .provenance import run_provenance, run_record
from .resume import checkpoint_state, checkpoint_to_resume, restore
from .sampling import ResumableDistributedSampler, to_device, training_batches
from .snapshot import fixed_samples, network_summaries, sample_grid, save_png


class TrainingError(RuntimeError):
    """Training cannot go on (a loss became non-finite); the last checkpoint is kept."""


def training_loop(cfg: TrainConfig, *, resume: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says; `resume` is a checkpoint path or "latest" (RUN/checkpoints). Returns a summary
    (final step, last logged losses, paths). Raises ConfigError/DatasetError/CheckpointError on bad input."""
    cfg.validate()

    # Initialise.
    ctx = setup_distributed(cfg.device)
    nets: Networks | None = None
    validator: CheckpointValidation | None = None
    try:
        out = Path(cfg.out)
        ckpt_dir = out / "checkpoints"
        seed_and_configure_torch(cfg, ctx.device)
        resume_path = checkpoint_to_resume(resume, out)

        # Load data.
        data = training_data(cfg)
        g_cfg, d_cfg, weights = build_configs(cfg, data.num_genes, data.patch_size)
        train_items = NoduleBatchDataset(data, "train", seed=cfg.seed, uniform_donors=cfg.uniform_donors,
                                         distant_wrong_genes=cfg.distant_wrong_genes, augment=cfg.augment,
                                         match_backgrounds=cfg.match_backgrounds, match_share=cfg.match_share,
                                         match_texture=cfg.match_texture,
                                         phenotype_features=(code_phenotype_features(g_cfg.spicules, g_cfg.lobes)
                                                             if weights.code_phenotype else ()))
        probe = ResumableDistributedSampler(len(train_items), cfg.batch_size, cfg.seed, 0, ctx.rank, ctx.world_size)

        # Construct networks (drawn strands start as often as the training donors' real slices carry one and, with
        # spicule_contrast, stand out as far as theirs; drawn lobes read their coordinate in the donors' units; a
        # resumed run takes all of it from the checkpoint).
        strands = real_strand_share(data) if g_cfg.spicules and resume_path is None else None
        lobe_scale = real_lobe_scale(data) if g_cfg.lobes and resume_path is None else None
        contrast = real_strand_contrast(data) if g_cfg.spicule_contrast and resume_path is None else None
        if cfg.export_generator.get("spicule_contrast") and not g_cfg.spicule_contrast:
            real_strand_contrast(data)     # what the export will paint the strands at: refused now, not after training
        nets = build_networks(cfg, g_cfg, d_cfg, weights, ctx, strand_share=strands, lobe_scale=lobe_scale,
                              strand_contrast=contrast)
        run = run_record(cfg, ctx, probe.global_batch, data.gene_names)

        # Resume.
        start_step = 0
        if resume_path is not None:
            start_step = restore(resume_path, nets, run["gene_names_sha256"], ctx, probe.global_batch)
        samples = fixed_samples(data, cfg, g_cfg.noise_dim, g_cfg.pixel_noise_size) if ctx.is_main else {}
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")

        # Print a summary.
        if ctx.is_main:
            print(data.summary())
            print(f"model {g_cfg.kind}, device {ctx.device}, world size {ctx.world_size}, global batch "
                  f"{probe.global_batch} ({cfg.batch_size} per process), {probe.steps_per_epoch} "
                  f"steps per epoch, steps {start_step} → {cfg.steps}")
            print(network_summaries(nets, samples, ctx.device))
            if strands:
                print(f"drawn strands: presence bias starts at {nets.generator.spicules.presence_bias.item():.2f},"
                      f" for strands on {strands[1]:.0%} of the nodules, as on the training donors' real slices"
                      + ("; each from the outline's own radius along it" if g_cfg.spicules_follow_outline else ""))
            if contrast:
                low, high = (float(v) for v in data.hu_window)
                print(f"drawn strands painted {contrast * (high - low) / 2:.0f} HU over the lung, the median contrast "
                      "of the training donors' real strands")
            if lobe_scale:
                print(f"drawn lobes: height {lobe_scale[0]:.3f} + {g_cfg.lobe_spread:g} × {lobe_scale[1]:.3f} × the "
                      "anchored coordinate (sd) of the radius, the training donors' real lobe amplitude"
                      + (", in place of the generator's own outline" if g_cfg.lobe_replace_outline else ""))

        # Distribute (the DDP wrappers were built with the networks); then the data loader for this rank.
        sampler, loader = training_batches(train_items, cfg, ctx, start_step, g_cfg.noise_dim,
                                           g_cfg.pixel_noise_size)
        autocast = precision_context(cfg, ctx)
        provenance = run_provenance(cfg, ctx, run, g_cfg.kind, weights, command)
        validating = cfg.validation and g_cfg.kind != "inpainting" and data.patients_in("val").size >= 3
        log = RunLog(cfg, ctx, out, start_step, g_cfg.kind, sampler.global_batch)
        if validating and ctx.is_main:
            validator = CheckpointValidation(data, log, validation_in_background(cfg, ctx))
            if resume_path is not None and resume_path.parent.resolve() == ckpt_dir.resolve() \
                    and "validation" not in ckpt.read_state(resume_path):
                # the run stopped while this checkpoint's score was being read on the thread
                validator.record(start_step, resume_path, validator.score(nets.generator_ema), written=False)

        # Train.
        step = start_step
        iterator = iter(loader) if step < cfg.steps else iter(())
        try:
            while step < cfg.steps:
                batch = to_device(next(iterator), ctx.device, cfg.channels_last, nets.dtype)
                logs = train_iteration(nets, batch, autocast, step)
                check_finite(logs, step, ckpt_dir)
                update_ema(nets.generator_ema, nets.generator, ema_decay(cfg, step))
                step += 1
                log.add(step, logs)
                if validator is not None:
                    validator.poll()
                if ctx.is_main and due(step, cfg.sample_every):
                    write_samples(step, nets, samples, ctx.device, out, log)
                if ctx.is_main and due(step, cfg.checkpoint_every):
                    save(step, nets, cfg, run, sampler, validator)
        finally:
            del iterator
            log.close_progress()

        # Done.
        result: dict[str, Any] = {"step": step, "logs": log.last, "out": str(out)}
        if ctx.is_main:
            if ckpt.latest_checkpoint(ckpt_dir) != ckpt.checkpoint_path(ckpt_dir, step):
                save(step, nets, cfg, run, sampler, validator)
            if validator is not None:
                validator.finish()
            if not due(step, cfg.sample_every):
                write_samples(step, nets, samples, ctx.device, out, log)
            result["weights"] = str(export_weights(step, nets, cfg, data, validating, provenance))
            result["checkpoint"] = str(ckpt.latest_checkpoint(ckpt_dir))
            log.close()
        barrier(ctx)
        return result
    finally:
        # The DDP wrappers hold the process group in reference cycles: collected at interpreter exit, after
        # the group is gone, a gloo rank once died with "terminate called" (a two-rank test under load).
        if validator is not None:
            validator.close()
        del nets
        teardown_distributed(ctx)


# ----------------------------------------------------------------------------------------------------
# Initialise


def seed_and_configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Seed Python, NumPy and torch from the run's seed; cuDNN autotuning unless --deterministic, TF32 on; freed
    memory kept for reuse (`keep_freed_memory`)."""
    keep_freed_memory()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------
# Per-step bookkeeping


def due(step: int, every: int) -> bool:
    """Whether a periodic action (every `every` steps; 0 = never during training) falls on `step`."""
    return bool(every) and step % every == 0


def check_finite(logs: dict[str, float], step: int, ckpt_dir: Path) -> None:
    """Stop at the first non-finite D or G loss, before it reaches the EMA or a checkpoint."""
    if not (math.isfinite(logs["d_total"]) and math.isfinite(logs["g_total"])):
        raise TrainingError(
            f"non-finite loss at step {step + 1} (D {logs['d_total']}, G {logs['g_total']}); lower the "
            f"learning rates or check the data; the last checkpoint in {ckpt_dir} is intact"
        )


class RunLog:
    """The run's scalars: losses averaged over the steps since the last entry (every rank takes part in the
    average), written by rank 0 to ``RUN/log.jsonl``, TensorBoard and the progress bar."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, out: Path, start_step: int, kind: str,
                 global_batch: int) -> None:
        self.cfg, self.ctx, self.path, self.global_batch = cfg, ctx, out / "log.jsonl", global_batch
        self.writer = None
        if ctx.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step or None)
        self.progress = None
        if ctx.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=cfg.steps, initial=start_step, desc=f"train {kind}", dynamic_ncols=True)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}   # per key: a lazy term is logged on its own steps only
        self.last: dict[str, float] = {}
        self.tick, self.tick_step = time.perf_counter(), start_step

    def add(self, step: int, logs: dict[str, float]) -> None:
        """Count one finished step's losses; on a logging step (and the last) write their means."""
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self._write_means(step)
        if self.progress is not None:
            self.progress.update(1)

    def _write_means(self, step: int) -> None:
        means = all_reduce_mean(self.ctx, {k: v / self.counts[k] for k, v in self.sums.items()})
        self.sums, self.counts = {}, {}
        per_step = (time.perf_counter() - self.tick) / max(1, step - self.tick_step)
        self.tick, self.tick_step = time.perf_counter(), step
        self.last = means
        if not self.ctx.is_main:
            return
        timing = {"sec_per_step": per_step, "samples_per_sec": self.global_batch / per_step,
                  "ema_decay": ema_decay(self.cfg, step - 1)}
        self.append({"step": step, **means, **timing})
        self.scalars("loss", means, step)
        self.scalars("timing", timing, step)
        if self.progress is not None:
            self.progress.set_postfix(d=f"{means['d_total']:.3f}", g=f"{means['g_total']:.3f}",
                                      l1=f"{means['g_l1']:.4f}", refresh=False)

    def append(self, entry: dict[str, Any]) -> None:
        """One line of ``log.jsonl``."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_samples(step: int, nets: Networks, samples: dict[str, Tensor], device: torch.device, out: Path,
                  log: RunLog) -> None:
    """The image grid of the fixed samples at `step`: ``RUN/samples/step-<step>.png`` and TensorBoard."""
    grid = sample_grid(nets, samples, device)
    save_png(grid, out / "samples" / f"step-{step:08d}.png")
    log.image("samples/real|input|synthetic|mask|weight", grid, step)


def save(step: int, nets: Networks, cfg: TrainConfig, run: dict[str, Any], sampler: ResumableDistributedSampler,
         validator: CheckpointValidation | None) -> Path:
    """A checkpoint at `step`, its EMA generator scored on the val donors by `validator` (None: not validating)."""
    tensors, state = checkpoint_state(nets, step, cfg, run, sampler)
    directory = Path(cfg.out) / "checkpoints"
    if validator is None:
        return ckpt.save_checkpoint(directory, step, tensors, state, keep=cfg.keep_checkpoints)
    validator.finish()   # the previous checkpoint's score first: the rotation below may remove that checkpoint
    if validator.background:
        path = ckpt.save_checkpoint(directory, step, tensors, state, keep=cfg.keep_checkpoints)
        validator.start(step, path, nets.generator_ema)
    else:
        state["validation"] = validator.score(nets.generator_ema)
        path = ckpt.save_checkpoint(directory, step, tensors, state, keep=cfg.keep_checkpoints)
        validator.record(step, path, state["validation"], written=True)
    return path


def validation_in_background(cfg: TrainConfig, ctx: DistContext) -> bool:
    """``--validation-thread``: on, off, or auto — on a CPU whose training processes leave a core idle for it
    (torch's threads × processes below the usable cores), where the read then costs training nothing."""
    if cfg.validation_thread != "auto":
        return cfg.validation_thread == "on"
    return ctx.device.type == "cpu" and torch.get_num_threads() * ctx.world_size < usable_cores()


class CheckpointValidation:
    """The validation score of each checkpoint: into the checkpoint, ``log.jsonl`` (``val_*``) and TensorBoard;
    the checkpoint is kept as the best when no earlier one scored higher (ties go to the later) — the export
    is chosen on it. One draw for every run and seed (`validation_score`'s fixed seed).

    With `background`, checkpoint k is scored on a thread while training goes on, and the score is added to
    its file at the first step after it is in, at the latest before the next checkpoint is written and before
    the export. Why: on a 2-core machine training at one thread per process (``make demo-weights``), each read
    stopped training for ~30 s of a 250-step interval while the other core idled. The thread scores a copy of
    the EMA generator taken at step k, and the evaluation draws from its own seeded generators, never the
    global ones, so the scores, the choice and every trained tensor equal those of reading in line."""

    def __init__(self, data: RadiogenomicDataset, log: RunLog, background: bool) -> None:
        self.data, self.log, self.background = data, log, background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="validation") if background else None
        self._pending: tuple[int, Path, Future] | None = None

    def score(self, generator: nn.Module) -> dict[str, Any]:
        from .evaluate import validation_score

        return validation_score(generator, self.data, split="val")

    def start(self, step: int, path: Path, generator: nn.Module) -> None:
        """Score checkpoint `path` (step `step`) on the thread, from a copy of `generator` as it is now."""
        assert self._pool is not None and self._pending is None
        self._pending = (step, path, self._pool.submit(self.score, copy.deepcopy(generator)))

    def poll(self) -> None:
        """Record the pending score if it is in (called every step, so it shows about when it is read)."""
        if self._pending is not None and self._pending[2].done():
            self.finish()

    def finish(self) -> None:
        """Wait for the pending score, if any, and record it (a failure on the thread is raised here)."""
        if self._pending is not None:
            step, path, future = self._pending
            self._pending = None
            self.record(step, path, future.result(), written=False)

    def record(self, step: int, path: Path, validation: dict[str, Any], *, written: bool) -> None:
        """Log `validation`, add it to checkpoint `path` unless already `written` there, keep it if best."""
        self.log.append({"step": step, **{f"val_{k}": v for k, v in validation.items()}})
        if validation["score"] is not None:
            self.log.scalars("validation", {"score": validation["score"]}, step)
        if not written:
            ckpt.record_validation(path, validation)
        ckpt.keep_if_best(path, validation["score"])

    def close(self) -> None:
        """Stop the thread (after its current read: a running read cannot be interrupted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def export_weights(step: int, nets: Networks, cfg: TrainConfig, data: RadiogenomicDataset, validating: bool,
                   provenance: dict[str, Any]) -> Path:
    """The run's weights: the EMA generator of the best-validated checkpoint when the run validated, else
    of the last step — chosen on the validation split, never on the last step alone."""
    provenance = {
        **cfg.provenance,
        **provenance,
        "steps": step,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    exported = nets.generator_ema
    best = ckpt.best_checkpoint(Path(cfg.out) / "checkpoints") if validating else None
    if best is not None:
        best_tensors, best_state = ckpt.load_checkpoint(best)
        exported = copy.deepcopy(nets.generator_ema)
        ckpt.load_module("G_ema", exported, best_tensors)
        provenance.update(selected_step=int(best_state["step"]), selected_by="validation score (val split)",
                          validation=best_state["validation"])
    if cfg.export_generator:
        exported = compose(exported, cfg.export_generator, data)
        provenance["composed_at_export"] = dict(cfg.export_generator)
    return export_generator(exported, data, Path(cfg.out) / cfg.weights_name, provenance)
