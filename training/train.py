"""Train the proposed generator or a baseline: ``python -m training.train --data FILE --model KIND --out RUN``.

The loop follows the paper (§2.3) and the authors' MC-GAN-derived practice: per iteration one generator
forward, a **D step** on the detached fake, then a **G step** re-scoring the same fake with the updated D;
Adam (β = 0.5, 0.999); an EMA of G (decay 0.999) that is sampled and exported. `training_loop` reads top to
bottom like stylegan2's: initialise, load data, construct networks, resume, print a summary, distribute,
train, done.

Runs on 1 CPU, 1 GPU or many (``torchrun --nproc_per_node N -m training.train ...``): every rank trains on
its own share of each **global batch = per-rank batch × world size**; rank 0 alone logs, samples and writes
(resuming on several nodes needs RUN on a shared file system). G and D are wrapped in
DistributedDataParallel through small "phase" modules, because the loss scores tuples through D's
sub-methods rather than D.forward. Batch norm uses global-batch statistics under DDP by default
(SyncBatchNorm on GPU, `training.distributed.GlobalBatchNorm` on CPU), so the world size does not change
what is trained; ``--no-sync-batchnorm`` keeps per-rank statistics.

Speed: channels-last memory format everywhere (``--no-channels-last`` to disable); bf16 autocast on CUDA
(``--no-amp`` to disable) and, opt-in, on CPUs with bf16 units (``--cpu-bf16``, about 2× faster there).
On a shared CPU set OMP_NUM_THREADS to the cores you really have: oversubscribed OpenMP threads wait for
each other and can make an iteration several times slower.

Reproducibility. Nothing in an iteration draws from global random state: the sample order is a function of
(seed, epoch) (`training.dataset.epoch_permutation`), every item's pairings and its generator noise are
functions of (seed, epoch, index), and the networks are initialised from the seed. So a run stopped after
step k and resumed from its checkpoint ends bit-identical (on CPU) to an uninterrupted run, and N ranks with
per-rank batch b see exactly the samples, noise and (with global batch norm) statistics of one process
with batch N·b.

Outputs in RUN: ``config.json`` (resolved options), ``checkpoints/ckpt-<step>.safetensors``,
``log.jsonl`` (scalars), ``samples/step-<step>.png`` and ``tensorboard/`` (image grids: real | generator
input | synthetic | mask | weight map, one row per fixed validation sample), and the EMA generator as
``<model>.safetensors`` + ``.json`` in the weights format.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from RadiogenomicGANLib.atomic import file_sha256
from RadiogenomicGANLib.cli_common import check_output_folder, require_optional, run_cli
from RadiogenomicGANLib.devices import DeviceError
from RadiogenomicGANLib.networks import GeneratorConfig, GeneratorOutput, build_generator

from . import checkpoint as ckpt
from .config import MODELS, ConfigError, TrainConfig, parse_override
from .dataset import DatasetError, NoduleBatchDataset, RadiogenomicDataset, epoch_permutation, load_dataset
from .discriminator import DiscriminatorConfig, build_discriminator
from .distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    convert_batchnorm,
    setup_distributed,
    teardown_distributed,
)
from .losses import GANLoss, LossWeights

_NOISE_SALT = 0x4E015E      # keeps the noise stream apart from the dataset's pairing stream
_SAMPLE_EPOCH = 2**31 - 1     # "epoch" of the fixed grid samples, never reached in training


class TrainingError(RuntimeError):
    """Training cannot go on (a loss became non-finite); the last checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------
# Data: resumable, rank-aware sample order, and per-item generator noise


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Endless (epoch, index) keys: epoch e is `epoch_permutation(n, seed, e)` cut into global batches.

    Like `DistributedSampler` it gives each rank a disjoint share, but (1) it starts at any *step*, so a
    resumed run continues mid-epoch, and (2) a rank's share of global batch t is the contiguous block
    ``[t·B + r·b, t·B + (r+1)·b)`` of the permutation, so the N per-rank batches concatenate to exactly the
    batch a single process with B = N·b draws. The ragged tail of an epoch (n mod B samples) is dropped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.global_batch = batch_size * world
        self.steps_per_epoch = size // self.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the global batch ({batch_size} per process × {world} process(es) = {self.global_batch}) is "
                f"larger than the {size} training samples; use a smaller --batch-size"
            )

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            if self.epoch_of(step) != epoch:
                epoch = self.epoch_of(step)
                order = epoch_permutation(self.size, self.seed, epoch)
            first = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.batch_size
            for index in order[first : first + self.batch_size]:
                yield epoch, int(index)
            step += 1


def item_noise(seed: int, epoch: int, index: int, dim: int) -> Tensor:
    """The generator noise n of one draw, a function of (seed, epoch, index) only (worker- and rank-free)."""
    if dim == 0:
        return torch.zeros(0)
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index, _NOISE_SALT]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randn(dim, generator=generator)


class EpochItems(Dataset):
    """`NoduleBatchDataset` addressed by (epoch, index), plus the item's noise.

    The epoch travels with the key, so DataLoader workers (which hold copies of the dataset) need no
    `set_epoch` call from the main process.
    """

    def __init__(self, items: NoduleBatchDataset, noise_dim: int, seed: int) -> None:
        self.items, self.noise_dim, self.seed = items, noise_dim, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        epoch, index = key
        self.items.set_epoch(epoch)
        item = dict(self.items[index])
        item["noise"] = item_noise(self.seed, epoch, index, self.noise_dim)
        return item


def to_device(
    batch: Mapping[str, Tensor], device: torch.device, channels_last: bool, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Move a batch to the device; floating tensors to `dtype` (the networks' dtype: a run started under
    ``torch.set_default_dtype(torch.float64)`` trains in float64 end to end, which the DDP test uses)."""
    out = {}
    for key, value in batch.items():
        value = value.to(device, dtype=dtype if dtype is not None and value.is_floating_point() else None,
                         non_blocking=True)
        if channels_last and value.ndim == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Networks, optimisers and one training iteration (shared with the benchmark)


class GeneratorPhase(nn.Module):
    """G's forward as a module, so DistributedDataParallel can wrap it (the loss calls G's own methods)."""

    def __init__(self, generator: nn.Module, loss: GANLoss) -> None:
        super().__init__()
        self.generator = generator
        self._loss = [loss]  # a list: the loss object is not a submodule

    def forward(self, batch: Mapping[str, Tensor], noise: Tensor | None) -> GeneratorOutput:
        return self._loss[0].run_generator(batch, noise)


class DiscriminatorPhase(nn.Module):
    """The D-step loss as a module; GANLoss scores tuples through D's sub-methods, not D.forward, so DDP
    must wrap this call to see D's parameters used and all-reduce their gradients."""

    def __init__(self, discriminator: nn.Module, loss: GANLoss) -> None:
        super().__init__()
        self.discriminator = discriminator
        self._loss = [loss]

    def forward(self, batch: Mapping[str, Tensor], fake: GeneratorOutput) -> tuple[Tensor, dict[str, float]]:
        return self._loss[0].discriminator_loss(batch, fake)


@dataclass
class Networks:
    """Everything one training iteration touches."""

    generator: nn.Module               # raw modules (state dicts never carry a DDP prefix)
    discriminator: nn.Module
    generator_ema: nn.Module
    loss: GANLoss
    g_phase: nn.Module                 # GeneratorPhase, or its DDP wrapper
    d_phase: nn.Module                 # DiscriminatorPhase, or its DDP wrapper
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generator_config: GeneratorConfig
    discriminator_config: DiscriminatorConfig
    loss_weights: LossWeights


def build_configs(
    cfg: TrainConfig, num_genes: int, patch_size: int
) -> tuple[GeneratorConfig, DiscriminatorConfig, LossWeights]:
    """Architecture and loss configs of a run; bad override keys or values become one ConfigError."""
    try:
        g_cfg = GeneratorConfig.from_dict(
            {**cfg.generator, "kind": cfg.model, "num_genes": num_genes, "patch_size": patch_size}
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"generator options {cfg.generator}: {error}") from None
    try:
        d_cfg = DiscriminatorConfig.for_generator(g_cfg, **cfg.discriminator)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"discriminator options {cfg.discriminator}: {error}") from None
    try:
        weights = LossWeights.from_dict(cfg.loss_weights)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"loss weights {cfg.loss_weights}: {error}") from None
    return g_cfg, d_cfg, weights


def build_networks(
    cfg: TrainConfig, g_cfg: GeneratorConfig, d_cfg: DiscriminatorConfig, weights: LossWeights, ctx: DistContext
) -> Networks:
    """G, D and EMA G on the device, optimisers, and (N > 1 ranks) the DDP wrappers. Seeds torch first."""
    torch.manual_seed(cfg.seed)
    generator = build_generator(g_cfg)
    discriminator = build_discriminator(d_cfg)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)   # plain BN: this is what is exported
    if ctx.distributed and cfg.sync_batchnorm:
        generator = convert_batchnorm(generator, ctx.device)
        discriminator = convert_batchnorm(discriminator, ctx.device)
    memory = torch.channels_last if cfg.channels_last else torch.preserve_format
    for net in (generator, discriminator, generator_ema):
        net.to(ctx.device, memory_format=memory)
    try:
        loss = GANLoss(generator, discriminator, weights)
    except ValueError as error:
        raise ConfigError(f"generator and discriminator do not fit together: {error}") from None
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=betas)
    g_phase: nn.Module = GeneratorPhase(generator, loss)
    d_phase: nn.Module = DiscriminatorPhase(discriminator, loss)
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # broadcast_buffers=False: BN statistics are global (or deliberately per rank), never rank 0's.
        g_phase = nn.parallel.DistributedDataParallel(g_phase, device_ids=ids, broadcast_buffers=False)
        d_phase = nn.parallel.DistributedDataParallel(d_phase, device_ids=ids, broadcast_buffers=False)
    return Networks(
        generator, discriminator, generator_ema, loss, g_phase, d_phase, opt_g, opt_d, g_cfg, d_cfg, weights
    )


def _dtype(nets: Networks) -> torch.dtype:
    return next(nets.generator.parameters()).dtype


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """EMA decay at a step (0-based): the configured decay, ramped up early when `ema_warmup`."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for parameters and float buffers (BN statistics); ints copied."""
    source = model.state_dict()
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            value.lerp_(source[key].to(value.dtype), 1.0 - decay)
        else:
            value.copy_(source[key])


def _detached(fake: GeneratorOutput) -> GeneratorOutput:
    return fake._replace(
        image=fake.image.detach(),
        mask=fake.mask.detach(),
        weight_maps=[w.detach() for w in fake.weight_maps],
        gene_code=None if fake.gene_code is None else fake.gene_code.detach(),
    )


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA unless --no-amp; on CPU only with --cpu-bf16 (fast where the CPU has bf16 units)."""
    return (device.type == "cuda" and cfg.amp) or (device.type == "cpu" and cfg.cpu_bf16)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast (no loss scaling needed for bf16; weights and optimiser stay float32), or nothing."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_iteration(nets: Networks, batch: dict[str, Tensor], autocast: Callable[[], AbstractContextManager]
                    ) -> dict[str, float]:
    """One iteration: G forward; D step on the detached fake; G step re-scoring the fake with the updated D."""
    noise = batch.pop("noise", None)
    if nets.generator_config.kind == "inpainting":
        noise = None
    with autocast():
        fake = nets.g_phase(batch, noise)

    # D step.
    nets.opt_d.zero_grad(set_to_none=True)
    with autocast():
        d_loss, d_logs = nets.d_phase(batch, _detached(fake))
    d_loss.backward()
    nets.opt_d.step()

    # G step (D frozen inside generator_loss).
    nets.opt_g.zero_grad(set_to_none=True)
    with autocast():
        g_loss, g_logs = nets.loss.generator_loss(batch, fake)
    g_loss.backward()
    nets.opt_g.step()
    return {**d_logs, **g_logs}


# ----------------------------------------------------------------------------------------------------
# Summary table, image grids, provenance


def summary_table(name: str, module: nn.Module, run: Callable[[], Any]) -> str:
    """stylegan2-style table: one row per top-level child (ModuleDicts/Lists opened one level) with its
    parameters, buffers and output shape from one eval-mode forward (`run`), which changes no state."""
    rows: list[tuple[str, str, int, int, str]] = []
    shapes: dict[str, str] = {}
    handles = []
    children: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            children.extend((f"{child_name}.{n}", c) for n, c in child.named_children())
        else:
            children.append((child_name, child))

    def hook(key: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:  # must return None: keeps the output
            shapes.setdefault(key, _describe(output))

        return record

    for child_name, child in children:
        handles.append(child.register_forward_hook(hook(child_name)))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            run()
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    for child_name, child in children:
        params = sum(p.numel() for p in child.parameters())
        buffers = sum(b.numel() for b in child.buffers())
        rows.append((child_name, type(child).__name__, params, buffers, shapes.get(child_name, "-")))
    total = sum(p.numel() for p in module.parameters())
    total_buffers = sum(b.numel() for b in module.buffers())
    header = ("Module", "Class", "Parameters", "Buffers", "Output shape")
    body = [(n, c, f"{p:,}", f"{b:,}", s) for n, c, p, b, s in rows]
    footer = ("Total", type(module).__name__, f"{total:,}", f"{total_buffers:,}", "")
    widths = [max(len(r[i]) for r in [header, *body, footer]) for i in range(5)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in (2, 3) else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([f"{name}", line(header), rule, *map(line, body), rule, line(footer)])


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return str(list(output.shape))
    if isinstance(output, (list, tuple)) and output:
        inner = _describe(output[0])
        return f"{type(output).__name__}[{len(output)}] of {inner}" if len(output) > 1 else inner
    return type(output).__name__


def fixed_samples(data: RadiogenomicDataset, cfg: TrainConfig, noise_dim: int) -> dict[str, Tensor]:
    """`num_samples` evenly spaced validation items (training items when there is no val nodule) with fixed
    pairings and noise: the rows of every image grid, comparable across steps."""
    split = "val" if data.nodule_indices("val").size else "train"
    items = EpochItems(NoduleBatchDataset(data, split, seed=cfg.seed), noise_dim, cfg.seed)
    picks = np.unique(np.linspace(0, len(items) - 1, cfg.num_samples).round().astype(int))
    return default_collate([items[(_SAMPLE_EPOCH, int(i))] for i in picks])


@torch.no_grad()
def sample_grid(nets: Networks, samples: dict[str, Tensor], device: torch.device) -> Tensor:
    """(1, H, W) grid in [0, 1]: one row per sample; columns real | generator input | synthetic | mask |
    finest fusion weight map, all from the EMA generator in eval mode."""
    batch = to_device(samples, device, channels_last=False, dtype=_dtype(nets))
    noise = batch.pop("noise")
    kind = nets.generator_config.kind
    ema_loss = GANLoss(nets.generator_ema, nets.discriminator, nets.loss_weights)
    fake = ema_loss.run_generator(batch, None if kind == "inpainting" else noise)
    size = batch["image"].shape[-1]
    if kind == "inpainting":
        hole = ema_loss.hole(batch)
        given = batch["image"] * (1 - hole) - hole
    else:
        given = batch["background"]
    weight = fake.weight_maps[-1] if fake.weight_maps else torch.zeros_like(fake.mask)
    weight = nn.functional.interpolate(weight.float(), size=(size, size), mode="nearest")
    columns = [
        (batch["image"].float() + 1) / 2,
        (given.float() + 1) / 2,
        (fake.image.float() + 1) / 2,
        fake.mask.float(),
        weight,
    ]
    pad = 2
    rows = []
    for i in range(batch["image"].shape[0]):
        cells = [nn.functional.pad(c[i, 0].clamp(0, 1), (pad, pad, pad, pad), value=1.0) for c in columns]
        rows.append(torch.cat(cells, dim=1))
    return torch.cat(rows, dim=0)[None].cpu()


def save_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (suffix -dirty with local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _gene_names_sha(names: np.ndarray) -> str:
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def training_data(cfg: TrainConfig) -> RadiogenomicDataset:
    """The dataset as this run trains on it: with `gene_components` / `gene_top_variance`, the gene
    preprocessing is refitted on the train patients (the exported weights carry that refit)."""
    data = load_dataset(cfg.data)
    if cfg.gene_components or cfg.gene_top_variance:
        from RadiogenomicGANLib.genes import GenePreprocessing

        train = data.patients_in("train")
        refit = GenePreprocessing.fit(data.table_genes_log[train], data.table_gene_names.tolist(),
                                      top_variance=cfg.gene_top_variance, components=cfg.gene_components)
        data = data.with_gene_preprocessing(refit)
    return data


def export_generator(
    generator: nn.Module, data: RadiogenomicDataset, path: Path, provenance: dict[str, Any]
) -> Path:
    """A generator (the EMA one at the end of training) in the weights format, with the dataset's fitted gene
    preprocessing and provenance."""
    from RadiogenomicGANLib.weights import WeightsMetadata, save_weights

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


# ----------------------------------------------------------------------------------------------------
# Checkpoint state


def checkpoint_state(nets: Networks, step: int, cfg: TrainConfig, run: dict[str, Any],
                     sampler: ResumableDistributedSampler) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything a bit-exact resume needs. The data order is not a generator state: it is a function of
    (seed, epoch, position), recorded under "data_order"."""
    tensors: dict[str, Tensor] = {}
    for name, module in (("G", nets.generator), ("D", nets.discriminator), ("G_ema", nets.generator_ema)):
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


# ----------------------------------------------------------------------------------------------------
# The training loop


def training_loop(cfg: TrainConfig, *, resume: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says; `resume` is a checkpoint path or "latest" (RUN/checkpoints). Returns a summary
    (final step, last logged losses, paths). Raises ConfigError/DatasetError/CheckpointError on bad input."""
    cfg.validate()

    # Initialise.
    ctx = setup_distributed(cfg.device)
    try:
        return _train(cfg, ctx, resume, command)
    finally:
        teardown_distributed(ctx)


def _train(cfg: TrainConfig, ctx: DistContext, resume: str | None, command: str | None) -> dict[str, Any]:
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    on_cuda = ctx.device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume_path: Path | None = None
    if resume:
        resume_path = ckpt.latest_checkpoint(ckpt_dir) if resume == "latest" else Path(resume)
        if resume_path is None:
            raise ckpt.CheckpointError(f"nothing to resume: no checkpoint in {ckpt_dir}")
    elif ckpt.latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue it, or choose another --out")

    # Load data.
    data = training_data(cfg)
    train_items = NoduleBatchDataset(data, "train", seed=cfg.seed, uniform_donors=cfg.uniform_donors,
                                     distant_wrong_genes=cfg.distant_wrong_genes)
    sampler_probe = ResumableDistributedSampler(len(train_items), cfg.batch_size, cfg.seed, 0, ctx.rank, ctx.world_size)
    g_cfg, d_cfg, weights = build_configs(cfg, data.num_genes, data.patch_size)

    # Construct networks.
    nets = build_networks(cfg, g_cfg, d_cfg, weights, ctx)
    gene_sha = _gene_names_sha(data.gene_names)

    # Resume.
    start_step = 0
    if resume_path is not None:
        tensors, state = ckpt.load_checkpoint(resume_path)
        check_resume_fits(state, nets, gene_sha, resume_path)
        for name, module in (("G", nets.generator), ("D", nets.discriminator), ("G_ema", nets.generator_ema)):
            ckpt.load_module(name, module, tensors)
        ckpt.load_optimizer("G", nets.opt_g, tensors, state["optimizers"]["G"])
        ckpt.load_optimizer("D", nets.opt_d, tensors, state["optimizers"]["D"])
        ckpt.set_rng_state(tensors, state["rng"], cuda_device=ctx.device)
        start_step = int(state["step"])
        if ctx.is_main and state.get("global_batch") not in (None, sampler_probe.global_batch):
            print(f"warning: resuming with global batch {sampler_probe.global_batch}, the checkpoint used "
                  f"{state.get('global_batch')}; the data order will differ from an uninterrupted run",
                  file=sys.stderr)

    dataset_sha = file_sha256(cfg.data) if ctx.is_main else ""
    run_info = {
        "world_size": ctx.world_size,
        "global_batch": sampler_probe.global_batch,
        "dataset": str(Path(cfg.data).resolve()),
        "dataset_sha256": dataset_sha,
        "gene_names_sha256": gene_sha,
    }
    samples = fixed_samples(data, cfg, g_cfg.noise_dim) if ctx.is_main else {}
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")

    # Print a summary.
    if ctx.is_main:
        two = to_device({k: v[:2] for k, v in samples.items()}, ctx.device, channels_last=False, dtype=_dtype(nets))
        noise2 = None if g_cfg.kind == "inpainting" else two["noise"]
        ema_loss = GANLoss(nets.generator_ema, nets.discriminator, weights)
        print(data.summary())
        print(f"model {g_cfg.kind}, device {ctx.device}, world size {ctx.world_size}, global batch "
              f"{sampler_probe.global_batch} ({cfg.batch_size} per process), {sampler_probe.steps_per_epoch} "
              f"steps per epoch, steps {start_step} → {cfg.steps}")
        print(summary_table("Generator", nets.generator_ema, lambda: ema_loss.run_generator(two, noise2)))
        with torch.no_grad():
            fake2 = ema_loss.run_generator(two, noise2)
        code = None
        if d_cfg.gene_conditioned:
            code = two["genes"] if d_cfg.independent_mapping else fake2.gene_code
        print(summary_table("Discriminator", nets.discriminator,
                            lambda: nets.discriminator(fake2.image, fake2.mask, code)))
        del two, fake2, code

    # Distribute (the DDP wrappers were built with the networks); then the data loader for this rank.
    sampler = ResumableDistributedSampler(
        len(train_items), cfg.batch_size, cfg.seed, start_step, ctx.rank, ctx.world_size
    )
    loader = DataLoader(
        EpochItems(train_items, g_cfg.noise_dim, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=on_cuda,
        persistent_workers=cfg.num_workers > 0,
        # Only seeds worker processes' global RNGs, which no item uses (items are keyed by epoch and index).
        generator=torch.Generator().manual_seed((cfg.seed * 1_000_003 + start_step) % 2**63),
    )
    use_amp = uses_bf16(cfg, ctx.device)
    if use_amp and ctx.device.type == "cpu" and ctx.is_main and not _cpu_has_bf16():
        print("warning: --cpu-bf16 on a CPU without native bf16 support is emulated and slow", file=sys.stderr)
    channels_last = cfg.channels_last
    writer = None
    if ctx.is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step if start_step else None)
    progress = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=start_step, desc=f"train {g_cfg.kind}", dynamic_ncols=True)
    provenance_base = {
        "command": command or "training.training_loop(...)",
        "seed": cfg.seed,
        "model": g_cfg.kind,
        "dataset": run_info["dataset"],
        "dataset_sha256": dataset_sha,
        "git_commit": git_commit() if ctx.is_main else None,
        "torch": torch.__version__,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "global_batch": sampler_probe.global_batch,
        "train_config": cfg.to_dict(),
        "loss_weights": weights.to_dict(),
    }

    def emit_samples(step: int) -> None:
        grid = sample_grid(nets, samples, ctx.device)
        save_png(grid, out / "samples" / f"step-{step:08d}.png")
        if writer is not None:
            writer.add_image("samples/real|input|synthetic|mask|weight", grid, step)

    validating = cfg.validation and g_cfg.kind != "inpainting" and data.patients_in("val").size >= 3

    def save(step: int) -> Path:
        tensors, state = checkpoint_state(nets, step, cfg, run_info, sampler)
        if validating:
            from .evaluate import validation_score

            state["validation"] = validation_score(nets.generator_ema, data, split="val", seed=cfg.seed)
            with open(out / "log.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in state["validation"].items()}})
                             + "\n")
            if writer is not None and state["validation"]["score"] is not None:
                writer.add_scalar("validation/score", state["validation"]["score"], step)
        path = ckpt.save_checkpoint(ckpt_dir, step, tensors, state, keep=cfg.keep_checkpoints)
        if validating:
            ckpt.keep_if_best(path, state["validation"]["score"])
        return path

    # Train.
    step = start_step
    sums: dict[str, float] = {}
    count = 0
    last_logs: dict[str, float] = {}
    tick = time.perf_counter()
    tick_step = step
    iterator = iter(loader) if step < cfg.steps else iter(())
    autocast = lambda: autocast_for(ctx.device, use_amp)  # noqa: E731
    try:
        while step < cfg.steps:
            batch = to_device(next(iterator), ctx.device, channels_last, _dtype(nets))
            logs = train_iteration(nets, batch, autocast)
            if not (math.isfinite(logs["d_total"]) and math.isfinite(logs["g_total"])):
                raise TrainingError(
                    f"non-finite loss at step {step + 1} (D {logs['d_total']}, G {logs['g_total']}); lower the "
                    f"learning rates or check the data; the last checkpoint in {ckpt_dir} is intact"
                )
            update_ema(nets.generator_ema, nets.generator, ema_decay(cfg, step))
            step += 1
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                means = all_reduce_mean(ctx, {k: v / count for k, v in sums.items()})
                sums, count = {}, 0
                elapsed = time.perf_counter() - tick
                per_step = elapsed / max(1, step - tick_step)
                tick, tick_step = time.perf_counter(), step
                last_logs = means
                if ctx.is_main:
                    timing = {"sec_per_step": per_step, "samples_per_sec": sampler.global_batch / per_step,
                              "ema_decay": ema_decay(cfg, step - 1)}
                    with open(out / "log.jsonl", "a") as handle:
                        handle.write(json.dumps({"step": step, **means, **timing}) + "\n")
                    if writer is not None:
                        for key, value in means.items():
                            writer.add_scalar(f"loss/{key}", value, step)
                        for key, value in timing.items():
                            writer.add_scalar(f"timing/{key}", value, step)
                    if progress is not None:
                        progress.set_postfix(d=f"{means['d_total']:.3f}", g=f"{means['g_total']:.3f}",
                                             l1=f"{means['g_l1']:.4f}", refresh=False)
            if progress is not None:
                progress.update(1)
            if ctx.is_main and cfg.sample_every and step % cfg.sample_every == 0:
                emit_samples(step)
            if ctx.is_main and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(step)
    finally:
        del iterator
        if progress is not None:
            progress.close()

    # Done.
    result: dict[str, Any] = {"step": step, "logs": last_logs, "out": str(out)}
    if ctx.is_main:
        if ckpt.latest_checkpoint(ckpt_dir) != ckpt.checkpoint_path(ckpt_dir, step):
            save(step)
        if not (cfg.sample_every and step % cfg.sample_every == 0):
            emit_samples(step)
        provenance = {
            **cfg.provenance,
            **provenance_base,
            "steps": step,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        exported = nets.generator_ema
        best = ckpt.best_checkpoint(ckpt_dir) if validating else None
        if best is not None:  # the export is chosen on the validation split, never on the last step alone
            best_tensors, best_state = ckpt.load_checkpoint(best)
            exported = copy.deepcopy(nets.generator_ema)
            ckpt.load_module("G_ema", exported, best_tensors)
            provenance.update(selected_step=int(best_state["step"]), selected_by="validation score (val split)",
                              validation=best_state["validation"])
        result["weights"] = str(export_generator(exported, data, out / cfg.weights_name, provenance))
        result["checkpoint"] = str(ckpt.latest_checkpoint(ckpt_dir))
        if writer is not None:
            writer.close()
    barrier(ctx)
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


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
                   help="override a LossWeights term (d_i, d_is, d_isg, background_l1, hole_l1, erosion_kernel, "
                   "hole_scale, consistency_area, consistency_intensity); repeatable")
    g.add_argument("--generator", action="append", metavar="KEY=VALUE",
                   help="override a GeneratorConfig field (code_dim, noise_dim, base_channels, max_channels, "
                   "gene_hidden); repeatable")
    g.add_argument("--discriminator", action="append", metavar="KEY=VALUE",
                   help="override a DiscriminatorConfig field (base_channels, max_channels, "
                   "independent_mapping, ...); repeatable")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--gene-components", type=int, help="refit the gene preprocessing on the train patients with a "
                   "whitened PCA to this many axes (default 0: none)")
    g.add_argument("--gene-top-variance", type=int, help="keep only this many most variable genes (default 0: all)")
    g.add_argument("--uniform-donors", action=argparse.BooleanOptionalAction,
                   help="draw donors uniformly rather than by their slice count (default on)")
    g.add_argument("--distant-wrong-genes", action=argparse.BooleanOptionalAction,
                   help="mismatched genes ḡ from the farther half of the other patients (default on)")
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
    o.add_argument("--export-name", help="stem of the exported weights (default: the model name)")
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
    for section in ("loss_weight", "generator", "discriminator", "provenance"):
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
