"""`training.batch_statistics`: a no-grad forward normalised with an earlier training forward's batch statistics."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from RadiogenomicGANLib.networks import GeneratorConfig, build_generator
from training.batch_statistics import BatchStatistics
from training.distributed import convert_batchnorm

SMALL_G = {"num_genes": 40, "patch_size": 16, "code_dim": 8, "noise_dim": 4, "base_channels": 4,
           "max_channels": 16, "gene_hidden": 16}  # fmt: skip


@pytest.mark.parametrize("momentum", [0.1, None])
def test_recorded_statistics_are_the_batch_mean_and_biased_variance(momentum: float | None) -> None:
    """Recovered from the running update: what `torch.var_mean` of the layer's input gives, also for the
    cumulative average (momentum None) after earlier batches."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum)
    net = nn.Sequential(conv, norm).train()
    net(torch.randn(4, 2, 9, 9) * 3 + 1)   # running statistics away from their initial values
    x = torch.randn(5, 2, 9, 9) * 2 - 1
    statistics = BatchStatistics(net)
    with statistics.record():
        net(x)
    var, mean = torch.var_mean(conv(x).detach(), dim=(0, 2, 3), correction=0)
    (recorded_mean, recorded_var), = statistics.statistics
    torch.testing.assert_close(recorded_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorded_var, var, atol=1e-5, rtol=1e-5)


def test_reuse_draws_the_batch_rows_again_and_leaves_no_trace() -> None:
    """The generator's first rows re-drawn inside `reuse()` with the same inputs equal the training forward's
    rows (a training-mode forward of those rows alone does not); the running statistics, the layers' mode and
    the main forward's graph are as they were."""
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="proposed", slice_position=True, **SMALL_G)).train()
    background, genes = torch.rand(6, 1, 16, 16) * 2 - 1, torch.randn(6, 40)
    noise, position = torch.randn(6, 4), torch.linspace(-0.8, 0.8, 6)
    statistics = BatchStatistics(g)
    with statistics.record():
        main = g(background, genes, noise, position=position)
    running = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in statistics.layers]
    with torch.no_grad(), statistics.reuse():
        again = g(background[:3], genes[:3], noise[:3], position=position[:3])
    torch.testing.assert_close(again.image, main.image[:3], atol=1e-4, rtol=0)
    torch.testing.assert_close(again.mask, main.mask[:3], atol=1e-4, rtol=0)
    for layer, (mean, var, tracked) in zip(statistics.layers, running):
        assert layer.training and int(layer.num_batches_tracked) == tracked
        assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    main.image.sum().backward()   # the graph's saved buffers were not overwritten
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in g.parameters())
    with torch.no_grad():
        alone = g(background[:3], genes[:3], noise[:3], position=position[:3])
    assert (alone.image - main.image[:3]).abs().max() > 1e-3


def test_misuse_is_refused_by_name() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    statistics = BatchStatistics(net)
    with pytest.raises(RuntimeError, match="no statistics recorded"), statistics.reuse():
        pass
    with pytest.raises(RuntimeError, match="more than once"), statistics.record():
        net(torch.randn(2, 1, 5, 5))
        net(torch.randn(2, 1, 5, 5))
    net.eval()
    with pytest.raises(RuntimeError, match="training mode"), statistics.record():
        net(torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="no running statistics"):
        BatchStatistics(nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)))


def _global_worker(rank: int, port: int, inputs: torch.Tensor, out: str) -> None:
    """One of two ranks: half of `inputs` through a global-batch conv+BN net, the recovered statistics saved."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = convert_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), torch.device("cpu")).train()
        statistics = BatchStatistics(net)
        with statistics.record():
            net(inputs.chunk(2)[rank])
        torch.save(statistics.statistics, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_recorded_statistics_are_global_in_a_distributed_run(tmp_path: Path) -> None:
    """Two gloo ranks, each with half the batch: each recovers the whole batch's statistics (the count the
    running variance was unbiased with is the global one)."""
    inputs = torch.randn(6, 2, 7, 7) * 2 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_worker, args=(port, inputs, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    var, mean = torch.var_mean(conv(inputs).detach(), dim=(0, 2, 3), correction=0)
    for rank in (0, 1):
        (recorded_mean, recorded_var), = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(recorded_mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recorded_var, var, atol=1e-5, rtol=1e-5)
