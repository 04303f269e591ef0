"""Re-using one training-mode forward's batch-norm statistics in a later no-grad forward.

The cheap mode-seeking draw (`LossWeights.mode_seeking_detached`) runs G a second time, without a graph, on
some rows of the batch with other noise. In training mode batch norm would normalise those rows with their own
statistics, so the two draws would differ by the statistics as well as by the noise, and the term would reward
the wrong thing. Here the second forward is normalised with exactly the statistics the main forward used.

They are recovered from the running-statistics update the main forward already made (running ← (1 − f)·running
+ f·batch, the variance unbiased over the layer's element count), so the main forward does no extra work and its
result is unchanged; under the global-batch layers of a distributed run (`training.distributed`) the update holds
the global statistics, so the recovery does too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import GlobalBatchNorm


def _elements_per_channel(layer: _BatchNorm, batch_input: Tensor) -> int:
    """The count the layer's unbiased variance divides by: N·H·W, summed over the ranks for the global-batch
    layers (SyncBatchNorm, GlobalBatchNorm) of a distributed run."""
    count = batch_input.numel() // batch_input.shape[1]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if isinstance(layer, nn.SyncBatchNorm | GlobalBatchNorm) and distributed:
        count *= torch.distributed.get_world_size()   # the sampler gives every rank the same batch size
    return count


class BatchStatistics:
    """The per-channel mean and (biased) variance every batch-norm layer of `module` normalised with in the
    forward run inside `record()`; `reuse()` makes those layers normalise with them instead of their own."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        untracked = [m for m in self.layers if not m.track_running_stats]
        if untracked:
            raise ValueError(f"{len(untracked)} batch-norm layer(s) keep no running statistics, so the batch "
                             "statistics of a forward cannot be recovered from them")
        self.statistics: list[tuple[Tensor, Tensor]] = []

    @contextmanager
    def record(self) -> Iterator[None]:
        """Recover, after the forward run inside, the statistics each layer used (the layers must be training)."""
        before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in self.layers]
        counts: dict[int, int] = {}
        hooks = [m.register_forward_pre_hook(lambda layer, args, i=i: counts.__setitem__(
            i, _elements_per_channel(layer, args[0]))) for i, m in enumerate(self.layers)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        missing = [i for i, m in enumerate(self.layers) if i not in counts or not m.training]
        if missing:
            raise RuntimeError(f"{len(missing)} batch-norm layer(s) did not run in training mode inside record()")
        self.statistics = []
        with torch.no_grad():
            self._recover(before, counts)

    def _recover(self, before: list[tuple[Tensor, Tensor, int]], counts: dict[int, int]) -> None:
        for i, (layer, (mean_before, var_before, tracked_before)) in enumerate(zip(self.layers, before)):
            if int(layer.num_batches_tracked) != tracked_before + 1:
                raise RuntimeError("a batch-norm layer ran more than once inside record()")
            factor = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
            mean = (layer.running_mean - (1.0 - factor) * mean_before) / factor
            unbiased = (layer.running_var - (1.0 - factor) * var_before) / factor
            n = counts[i]
            self.statistics.append((mean, unbiased * ((n - 1) / n)))

    @contextmanager
    def reuse(self) -> Iterator[None]:
        """Inside, the layers normalise with the recorded statistics (in eval mode, the recorded tensors standing
        in for their running buffers) and leave their running statistics untouched. For no-grad forwards. The
        buffers are swapped, not overwritten: the main forward's graph holds them for its backward."""
        if len(self.statistics) != len(self.layers):
            raise RuntimeError("no statistics recorded: run a training-mode forward inside record() first")
        saved = [(m.running_mean, m.running_var, m.training) for m in self.layers]
        try:
            for layer, (mean, var) in zip(self.layers, self.statistics):
                layer.running_mean, layer.running_var = mean, var
                layer.train(False)
            yield
        finally:
            for layer, (mean, var, training) in zip(self.layers, saved):
                layer.running_mean, layer.running_var = mean, var
                layer.train(training)
