"""Process-group plumbing for ``torchrun``: one rank per device, gloo on CPU, NCCL on GPU.

A plain ``python -m training.train`` is a world of one and touches no process group, so the same loop runs
on a laptop, one GPU or many. Batch norm under DDP: by default the statistics are computed over the
**global** batch (``torch.nn.SyncBatchNorm`` on CUDA; on CPU, where PyTorch's SyncBatchNorm refuses to
run, `GlobalBatchNorm` below all-reduces the per-channel sums with an autograd-aware all-reduce). Then a run
on N ranks with per-rank batch b trains the same model as one process with batch N·b, up to float
rounding — the property the tests check — instead of normalising with tiny per-rank batches.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from RadiogenomicGANLib.devices import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable value)
    backend: str | None = None   # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_preference: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group that ``torchrun`` (or a test) describes through RANK/WORLD_SIZE/MASTER_* env vars.

    Without those variables (or with WORLD_SIZE=1) this is a no-op single-process context.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_preference, local_rank)
    if world <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group (safe on a single-process context). No barrier here: after an error on one
    rank the others would wait in it until the timeout; a finished loop synchronises before returning.
    The garbage collector runs first, so objects in reference cycles that hold the group (DDP wrappers the
    caller has dropped) go before it."""
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's decision, for every rank (e.g. 'stop: a loss went non-finite')."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def all_reduce_mean(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Mean of scalar logs over ranks, so rank 0's log describes the global batch."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed)
    packed /= ctx.world_size
    return dict(zip(keys, packed.tolist()))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # through apply, so a double backward (the D step's R1 penalty) differentiates this all-reduce too
        return _AllReduceSum.apply(grad)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the batches of all ranks (CPU/gloo SyncBatchNorm).

    Sums of x and x² (in float64, so the one-pass variance loses nothing) and the element count are
    all-reduced by a differentiable all-reduce whose backward all-reduces the gradients: each rank's
    input gets the gradient of the *whole* objective with respect to the shared statistics, exactly as
    SyncBatchNorm does. Outside training or without a process group it is plain batch norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._plain(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x64 = input.double()
        count = torch.full((1,), input.numel() / channels, dtype=torch.float64, device=input.device)
        stats = _AllReduceSum.apply(torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        inv_std = torch.rsqrt(var + self.eps)
        out = (x64 - mean.view(shape)) * inv_std.view(shape)
        out = out.to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _plain(self, input: Tensor) -> Tensor:
        """nn.BatchNorm's own path (eval mode, or a world of one)."""
        return super().forward(input)


def convert_batchnorm(module: nn.Module, device: torch.device, double_backward: bool = False) -> nn.Module:
    """Swap every BatchNorm for its global-batch version (SyncBatchNorm on CUDA, GlobalBatchNorm on CPU, and on
    CUDA too when the loss differentiates a gradient: SyncBatchNorm has no double backward, pytorch#61222).

    State-dict keys are unchanged, so checkpoints and exported weights do not depend on the world size.
    """
    if device.type == "cuda" and not double_backward:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:  # the same Parameter objects: optimisers built before the swap stay valid
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
