"""What a run shows of itself: the stylegan2-style summary table of every network, and the image grids of
fixed validation samples written at every sampling step (``RUN/samples/step-<step>.png`` and TensorBoard).

The grid's rows are the same samples, pairings and noise at every step, so grids are comparable across steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from .config import TrainConfig
from .dataset import NoduleBatchDataset, RadiogenomicDataset
from .iteration import Networks
from .losses import GANLoss
from .sampling import EpochItems, to_device

_SAMPLE_EPOCH = 2**31 - 1     # "epoch" of the fixed grid samples, never reached in training

# ----------------------------------------------------------------------------------------------------
# Summary table


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


def network_summaries(nets: Networks, samples: dict[str, Tensor], device: torch.device) -> str:
    """The summary tables of the (EMA) generator and the discriminator, run on two of the fixed samples."""
    g_cfg, d_cfg = nets.generator_config, nets.discriminator_config
    two = to_device({k: v[:2] for k, v in samples.items()}, device, channels_last=False, dtype=nets.dtype)
    noise2 = None if g_cfg.kind == "inpainting" else two["noise"]
    ema_loss = GANLoss(nets.generator_ema, nets.discriminator, nets.loss_weights)
    generator = summary_table("Generator", nets.generator_ema, lambda: ema_loss.run_generator(two, noise2))
    with torch.no_grad():
        fake2 = ema_loss.run_generator(two, noise2)
    code = None
    if d_cfg.gene_conditioned:
        code = two["genes"] if d_cfg.independent_mapping else fake2.gene_code
    discriminator = summary_table("Discriminator", nets.discriminator,
                                  lambda: nets.discriminator(fake2.image, fake2.mask, code))
    return f"{generator}\n{discriminator}"


# ----------------------------------------------------------------------------------------------------
# Image grids


def fixed_samples(data: RadiogenomicDataset, cfg: TrainConfig, noise_dim: int, pixel_noise_size: int = 0
                  ) -> dict[str, Tensor]:
    """`num_samples` evenly spaced validation items (training items when there is no val nodule) with fixed
    pairings and noise: the rows of every image grid, comparable across steps."""
    split = "val" if data.nodule_indices("val").size else "train"
    items = EpochItems(NoduleBatchDataset(data, split, seed=cfg.seed), noise_dim, cfg.seed, pixel_noise_size)
    picks = np.unique(np.linspace(0, len(items) - 1, cfg.num_samples).round().astype(int))
    return default_collate([items[(_SAMPLE_EPOCH, int(i))] for i in picks])


@torch.no_grad()
def sample_grid(nets: Networks, samples: dict[str, Tensor], device: torch.device) -> Tensor:
    """(1, H, W) grid in [0, 1]: one row per sample; columns real | generator input | synthetic | mask |
    finest fusion weight map, all from the EMA generator in eval mode."""
    batch = to_device(samples, device, channels_last=False, dtype=nets.dtype)
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
    """A (1, H, W) image in [0, 1] as an 8-bit greyscale PNG (folders created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)
