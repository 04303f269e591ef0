"""One training iteration and everything it touches: the networks and their optimisers (with the DDP "phase"
wrappers), the precision it runs in, and the EMA of the generator. Shared by the training loop and the
training benchmark, so the benchmark times exactly what training runs.

The iteration follows the paper (§2.3) and the authors' MC-GAN-derived practice: one generator forward, a
**D step** on the detached fake, then a **G step** re-scoring the same fake with the updated D.

G and D are wrapped in DistributedDataParallel through small phase modules because the loss scores tuples
through D's sub-methods rather than D.forward: DDP must wrap the call that uses the parameters to see them
used and all-reduce their gradients.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from RadiogenomicGANLib.networks import GeneratorConfig, GeneratorOutput, build_generator

from .batch_statistics import BatchStatistics
from .config import ConfigError, TrainConfig
from .dataset import RadiogenomicDataset, donor_phenotypes, phenotype_scale
from .discriminator import DiscriminatorConfig, build_discriminator
from .distributed import DistContext, convert_batchnorm
from .losses import (
    CODE_PHENOTYPE_FEATURES,
    LOBE_PHENOTYPE_FEATURE,
    SPICULE_PHENOTYPE_FEATURE,
    GANLoss,
    LossWeights,
    SecondDraw,
    code_phenotype_features,
)

# ----------------------------------------------------------------------------------------------------
# Networks and optimisers


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

    @property
    def dtype(self) -> torch.dtype:
        """The networks' floating dtype (float64 when the run started under that default dtype)."""
        return next(self.generator.parameters()).dtype


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
    try:  # checked before training, not found out at the export after it
        GeneratorConfig.from_dict({**g_cfg.to_dict(), **cfg.export_generator})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--export-generator {cfg.export_generator}: {error}") from None
    try:
        d_cfg = DiscriminatorConfig.for_generator(g_cfg, **cfg.discriminator)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"discriminator options {cfg.discriminator}: {error}") from None
    try:
        weights = LossWeights.from_dict(cfg.loss_weights)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"loss weights {cfg.loss_weights}: {error}") from None
    if weights.mode_seeking and (g_cfg.kind == "inpainting" or g_cfg.noise_dim == 0):
        raise ConfigError(f"--loss-weight mode_seeking={weights.mode_seeking:g} asks noise to change the nodule, but "
                          f"this generator takes no noise (kind {g_cfg.kind!r}, noise_dim {g_cfg.noise_dim}): "
                          "drop mode_seeking")
    if g_cfg.anchor_sd != 1.0 and not weights.code_phenotype:
        raise ConfigError(f"--generator anchor_sd={g_cfg.anchor_sd:g} sets the sd of the code-phenotype anchor's "
                          "coordinates, which is off: add --loss-weight code_phenotype=1 or drop anchor_sd")
    # the edge width and the strands each read a code coordinate that only the anchor gives a meaning
    if g_cfg.edge_blur_per_sd:
        _check_anchored_reader("edge_blur_per_sd", "edge_code_index", g_cfg.edge_code_index, "margin",
                               CODE_PHENOTYPE_FEATURES.index("margin_sharpness"), weights)
    if g_cfg.spicules:
        _check_anchored_reader("spicules", "spicule_code_index", g_cfg.spicule_code_index, "spicule",
                               code_phenotype_features(True).index(SPICULE_PHENOTYPE_FEATURE), weights)
    if g_cfg.lobes:
        _check_anchored_reader("lobes", "lobe_code_index", g_cfg.lobe_code_index, "lobe",
                               code_phenotype_features(g_cfg.spicules, True).index(LOBE_PHENOTYPE_FEATURE), weights)
    return g_cfg, d_cfg, weights


def _check_anchored_reader(option: str, index_option: str, index: int, axis: str, anchored: int,
                           weights: LossWeights) -> None:
    """A generator part that reads an anchored code coordinate needs the anchor, and reads that coordinate."""
    if index != anchored:
        raise ConfigError(f"--generator {index_option}={index} is not the anchored {axis} coordinate; "
                          f"use {index_option}={anchored}")
    if not weights.code_phenotype:
        raise ConfigError(f"--generator {option} needs the code-phenotype anchor that gives its coordinate a "
                          "meaning: add --loss-weight code_phenotype=1")


def real_strand_share(data: RadiogenomicDataset) -> tuple[list[float], float]:
    """What the drawn strands' presence is calibrated to (`CodeDrivenSpicules.calibrate_presence`): the training
    donors' anchored spicule coordinates (`donor_phenotypes`: the z-score the anchor pulls φ(g)[index] / anchor_sd
    towards) and the mean over those donors of the share of their real slices with a long strand
    (`metrics.carries_long_strand`). Deterministic, so every rank agrees."""
    from .metrics import carries_long_strand  # metrics pulls in scipy; only runs with strands need it

    donors = np.unique(data.nodule_patient[data.nodule_indices("train")])
    coordinates = donor_phenotypes(data, donors, (SPICULE_PHENOTYPE_FEATURE,))[donors, 0].tolist()
    shares = [carries_long_strand(data.nodule_masks[data.nodule_patient == donor]).mean() for donor in donors]
    return coordinates, float(np.mean(shares))


def real_strand_contrast(data: RadiogenomicDataset) -> float:
    """What strands painted at a contrast (`GeneratorConfig.spicule_contrast`) are calibrated to: the median
    `metrics.strand_lift_hu` of the training donors' real slices with a long strand, in the unit range of the
    dataset's HU window (`CodeDrivenSpicules.calibrate_contrast`). The lift over the lung beyond the strands' rim,
    not the evaluation's `strand_contrast_hu` over the rim: the painting lifts the background (the lung), and a
    lift set to the rim's reading painted strands that read 0.55-0.68 of the real ones (README round 35).
    Deterministic, so every rank agrees."""
    from RadiogenomicGANLib.intensity import unit_to_hu

    from .metrics import median_strand_contrast_hu, strand_lift_hu  # metrics pulls in scipy: only strands need it

    rows = data.nodule_indices("train")
    window = tuple(float(v) for v in data.hu_window)
    contrast_hu = median_strand_contrast_hu(unit_to_hu(data.nodule_images[rows], window), data.nodule_masks[rows],
                                            measure=strand_lift_hu)
    if not (np.isfinite(contrast_hu) and contrast_hu > 0):
        raise ConfigError("--generator spicule_contrast=true: no training donor's real slice carries a long strand "
                          "that stands out from the lung, so there is no contrast to paint the strands at")
    return 2.0 * contrast_hu / (window[1] - window[0])


def real_lobe_scale(data: RadiogenomicDataset) -> tuple[float, float]:
    """The training donors' real `metrics.lobe_amplitude` (each donor's slices, area-weighted), mean and sd as
    `donor_phenotypes` z-scores it for the anchor: what the drawn lobes turn their coordinate back with
    (`CodeDrivenLobes.calibrate`). Deterministic, so every rank agrees."""
    from .conventional import real_nodule_features  # metrics pulls in scipy; only runs with lobes need it

    donors = np.unique(data.nodule_patient[data.nodule_indices("train")])
    values = real_nodule_features(data, donors, (LOBE_PHENOTYPE_FEATURE,))
    if not np.isfinite(values).any():
        raise ConfigError("--generator lobes=true: no training donor's nodule is large enough to measure its lobes")
    mean, sd = phenotype_scale(values)
    return float(mean[0]), float(sd[0])


def build_networks(
    cfg: TrainConfig, g_cfg: GeneratorConfig, d_cfg: DiscriminatorConfig, weights: LossWeights, ctx: DistContext,
    strand_share: tuple[list[float], float] | None = None, lobe_scale: tuple[float, float] | None = None,
    strand_contrast: float | None = None
) -> Networks:
    """G, D and EMA G on the device, optimisers, and (N > 1 ranks) the DDP wrappers. Seeds torch first.
    `strand_share` (`real_strand_share`) calibrates the drawn strands' starting presence, `strand_contrast`
    (`real_strand_contrast`) the contrast they are painted at and `lobe_scale` (`real_lobe_scale`) the drawn
    lobes' height, EMA included."""
    torch.manual_seed(cfg.seed)
    generator = build_generator(g_cfg)
    if strand_share is not None:
        generator.spicules.calibrate_presence(*strand_share)
    if strand_contrast is not None:
        generator.spicules.calibrate_contrast(strand_contrast)
    if lobe_scale is not None:
        generator.lobes.calibrate(*lobe_scale)
    discriminator = build_discriminator(d_cfg)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)   # plain BN: this is what is exported
    if ctx.distributed and cfg.sync_batchnorm:
        generator = convert_batchnorm(generator, ctx.device)
        discriminator = convert_batchnorm(discriminator, ctx.device, double_backward=weights.r1 > 0)
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


# ----------------------------------------------------------------------------------------------------
# EMA and precision


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


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA unless --no-amp; on CPU only with --cpu-bf16 (fast where the CPU has bf16 units)."""
    return (device.type == "cuda" and cfg.amp) or (device.type == "cpu" and cfg.cpu_bf16)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 units (elsewhere bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast (no loss scaling needed for bf16; weights and optimiser stay float32), or nothing."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def precision_context(cfg: TrainConfig, ctx: DistContext) -> Callable[[], AbstractContextManager]:
    """The run's autocast, as a factory of fresh contexts (one per forward); warns once (rank 0) when bf16
    was asked for on a CPU that would only emulate it."""
    use_bf16 = uses_bf16(cfg, ctx.device)
    if use_bf16 and ctx.device.type == "cpu" and ctx.is_main and not cpu_has_bf16():
        print("warning: --cpu-bf16 on a CPU without native bf16 support is emulated and slow", file=sys.stderr)
    return lambda: autocast_for(ctx.device, use_bf16)


# ----------------------------------------------------------------------------------------------------
# One iteration


def _each_tensor(output: GeneratorOutput, function: Callable[[Tensor], Tensor]) -> GeneratorOutput:
    """`output` with `function` applied to every tensor it holds (the gene code may be None)."""
    return output._replace(
        image=function(output.image),
        mask=function(output.mask),
        weight_maps=[function(w) for w in output.weight_maps],
        gene_code=None if output.gene_code is None else function(output.gene_code),
    )


def _detached(fake: GeneratorOutput) -> GeneratorOutput:
    return _each_tensor(fake, Tensor.detach)


def _rows(output: GeneratorOutput, rows: slice) -> GeneratorOutput:
    return _each_tensor(output, lambda tensor: tensor[rows])


def _second_draw_inputs(batch: Mapping[str, Tensor], noise: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The inputs of the batch's first half again, with the noise (and per-pixel noise map) of the row before:
    a valid independent draw from no extra random numbers, so resume stays bit-exact."""
    rows = max(1, noise.shape[0] // 2)
    inputs = {key: batch[key][:rows] for key in ("background", "genes", "position") if key in batch}
    if "pixel_noise" in batch:   # the second draw takes the row before's noise map too: another whole draw
        inputs["pixel_noise"] = batch["pixel_noise"].roll(1, dims=0)[:rows]
    return inputs, noise.roll(1, dims=0)[:rows]


def generate_with_second_draw(g_phase: Callable[..., GeneratorOutput], batch: Mapping[str, Tensor], noise: Tensor
                              ) -> tuple[GeneratorOutput, SecondDraw]:
    """G's output for the batch and, in the same forward of the stacked rows (DDP allows one forward per
    backward), the second draw of `_second_draw_inputs`; the mode-seeking gradient reaches both draws."""
    n = noise.shape[0]
    inputs, other_noise = _second_draw_inputs(batch, noise)
    stacked = {key: torch.cat([batch[key], value]) for key, value in inputs.items()}
    both = g_phase(stacked, torch.cat([noise, other_noise]))
    return _rows(both, slice(0, n)), SecondDraw(_rows(both, slice(n, None)), noise[: len(other_noise)], other_noise)


# Per-row batch entries that belong to one draw rather than to the sample: a paired batch keeps each row's own.
DRAW_KEYS = ("pixel_noise", "augment")


def paired_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The batch with rows [h, 2h) replaced by rows [0, h), h = half its rows (an odd last row stays itself),
    except the draw's own entries (`DRAW_KEYS`): each sample of the first half twice, with two draws. Slices and
    a concatenation, not an index, so 4-D entries keep their channels-last layout."""
    rows = len(next(iter(batch.values())))
    half = rows // 2

    def pair(value: Tensor) -> Tensor:
        return torch.cat([value[:half], value[:half], value[2 * half :]])

    return {key: value if key in DRAW_KEYS else pair(value) for key, value in batch.items()}


def generate_paired(g_phase: Callable[..., GeneratorOutput], batch: Mapping[str, Tensor], noise: Tensor
                    ) -> tuple[dict[str, Tensor], GeneratorOutput, SecondDraw | None]:
    """The paired batch (`paired_batch`), G's output for it, and its second half as the second draw of the
    first (rows [h, 2h) against [0, h), each row's own noise): no generator rows beyond the batch's. The
    returned batch is the one both steps score. No second draw for a batch of one row."""
    batch = paired_batch(batch)
    fake = g_phase(batch, noise)
    half = noise.shape[0] // 2
    if half == 0:
        return batch, fake, None
    return batch, fake, SecondDraw(_rows(fake, slice(half, 2 * half)), noise[:half], noise[half : 2 * half])


def generate_with_detached_second_draw(g_phase: Callable[..., GeneratorOutput], generator: nn.Module,
                                       run_generator: Callable[..., GeneratorOutput], batch: Mapping[str, Tensor],
                                       noise: Tensor) -> tuple[GeneratorOutput, SecondDraw]:
    """G's output for the batch, then the second draw of `_second_draw_inputs` in a forward without a graph,
    normalised with the main forward's batch statistics (`BatchStatistics`): it costs a forward of half the
    rows instead of a forward and backward, and the mode-seeking gradient reaches the main draw only (half the
    stacked form's, in expectation)."""
    statistics = BatchStatistics(generator)
    with statistics.record():
        fake = g_phase(batch, noise)
    inputs, other_noise = _second_draw_inputs(batch, noise)
    with torch.no_grad(), statistics.reuse():
        other = run_generator(inputs, other_noise)
    return fake, SecondDraw(other, noise[: len(other_noise)], other_noise)


def train_iteration(nets: Networks, batch: dict[str, Tensor], autocast: Callable[[], AbstractContextManager],
                    step: int = 0) -> dict[str, float]:
    """One iteration (0-based `step`): G forward; D step on the detached fake; G step re-scoring the fake with the
    updated D. The step only says whether the lazy mode-seeking term is due; with the paired draw
    (`mode_seeking_paired`) both steps score the paired batch."""
    noise = batch.pop("noise", None)
    if nets.generator_config.kind == "inpainting":
        noise = None
    second = None
    with autocast():
        if noise is None or not nets.loss.seeks_modes_at(step):
            fake = nets.g_phase(batch, noise)
        elif nets.loss.weights.mode_seeking_paired:
            batch, fake, second = generate_paired(nets.g_phase, batch, noise)
        elif nets.loss.weights.mode_seeking_detached:
            fake, second = generate_with_detached_second_draw(nets.g_phase, nets.generator,
                                                              nets.loss.run_generator, batch, noise)
        else:
            fake, second = generate_with_second_draw(nets.g_phase, batch, noise)

    # D step.
    nets.opt_d.zero_grad(set_to_none=True)
    with autocast():
        d_loss, d_logs = nets.d_phase(batch, _detached(fake))
    d_loss.backward()
    nets.opt_d.step()

    # G step (D frozen inside generator_loss).
    nets.opt_g.zero_grad(set_to_none=True)
    with autocast():
        g_loss, g_logs = nets.loss.generator_loss(batch, fake, second)
    g_loss.backward()
    nets.opt_g.step()
    return {**d_logs, **g_logs}
