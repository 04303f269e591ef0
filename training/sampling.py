"""What each rank draws, step by step: a resumable, rank-aware sample order, per-item generator noise, and the
data loader that serves them.

Nothing here reads global random state. The order of epoch e is `epoch_permutation(n, seed, e)`; an item's
pairings and noise are functions of (seed, epoch, index). So a run resumed at step k draws exactly what an
uninterrupted run draws from step k on, and N ranks with per-rank batch b together draw the batch of one
process with batch N·b — whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import ConfigError, TrainConfig
from .dataset import NoduleBatchDataset, epoch_permutation
from .distributed import DistContext

_NOISE_SALT = 0x4E015E      # keeps the noise stream apart from the dataset's pairing stream
_AUGMENT_SALT = 0xA06E47    # and the discriminator's augmentation draws apart from both
_PIXEL_NOISE_SALT = 0x91C5E1  # and the generator's per-pixel noise maps apart from all three


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


def _item_generator(seed: int, epoch: int, index: int, salt: int) -> torch.Generator:
    """A torch generator keyed by (seed, epoch, index) and a stream's salt only (worker- and rank-free)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index, salt]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def item_noise(seed: int, epoch: int, index: int, dim: int) -> Tensor:
    """The generator noise n of one draw, a function of (seed, epoch, index) only (worker- and rank-free)."""
    if dim == 0:
        return torch.zeros(0)
    return torch.randn(dim, generator=_item_generator(seed, epoch, index, _NOISE_SALT))


def item_augment(seed: int, epoch: int, index: int) -> Tensor:
    """(2, 5) uniform [0, 1) draws of one item for the discriminator's augmentation (`losses.augment_alike`),
    row 0 for the real tuple and row 1 for the generated one; a function of (seed, epoch, index) only."""
    return torch.rand(2, 5, generator=_item_generator(seed, epoch, index, _AUGMENT_SALT))


def item_pixel_noise(seed: int, epoch: int, index: int, size: int) -> Tensor:
    """(1, size, size) standard-normal per-pixel noise map of one draw, a function of (seed, epoch, index) only."""
    return torch.randn(1, size, size, generator=_item_generator(seed, epoch, index, _PIXEL_NOISE_SALT))


class EpochItems(Dataset):
    """`NoduleBatchDataset` addressed by (epoch, index), plus the item's noise and augmentation draws (and its
    per-pixel noise map, "pixel_noise", when `pixel_noise_size` > 0).

    The epoch travels with the key, so DataLoader workers (which hold copies of the dataset) need no
    `set_epoch` call from the main process.
    """

    def __init__(self, items: NoduleBatchDataset, noise_dim: int, seed: int, pixel_noise_size: int = 0) -> None:
        self.items, self.noise_dim, self.seed, self.pixel_noise_size = items, noise_dim, seed, pixel_noise_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        epoch, index = key
        self.items.set_epoch(epoch)
        item = dict(self.items[index])
        item["noise"] = item_noise(self.seed, epoch, index, self.noise_dim)
        item["augment"] = item_augment(self.seed, epoch, index)
        if self.pixel_noise_size:
            item["pixel_noise"] = item_pixel_noise(self.seed, epoch, index, self.pixel_noise_size)
        return item


def training_batches(
    items: NoduleBatchDataset, cfg: TrainConfig, ctx: DistContext, start_step: int, noise_dim: int,
    pixel_noise_size: int = 0,
) -> tuple[ResumableDistributedSampler, DataLoader]:
    """This rank's sampler (from `start_step` on) and the loader of its per-rank batches."""
    sampler = ResumableDistributedSampler(len(items), cfg.batch_size, cfg.seed, start_step, ctx.rank, ctx.world_size)
    loader = DataLoader(
        EpochItems(items, noise_dim, cfg.seed, pixel_noise_size),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        # Only seeds worker processes' global RNGs, which no item uses (items are keyed by epoch and index).
        generator=torch.Generator().manual_seed((cfg.seed * 1_000_003 + start_step) % 2**63),
    )
    return sampler, loader


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
