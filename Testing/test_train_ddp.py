"""DistributedDataParallel on CPU: two gloo processes with per-rank batch 2 train the same weights as one
process with batch 4 (the same global batch).

Why equality holds: the sampler hands each rank a contiguous half of every global batch, the noise and
pairings of an item depend only on (seed, epoch, index), losses are batch means (so the DDP gradient
average is the global-batch gradient), and batch norm uses global statistics (`GlobalBatchNorm`, the CPU
SyncBatchNorm).

The runs are in float64. In float32 the generator's gradient is ill-conditioned here (single-process
float32 and float64 gradients already differ by ~1 %, cancellation through batch norm), and Adam's first
steps turn that rounding into ±lr moves of near-zero components, so float32 weights can differ by
~5e-4 whether or not DDP is right. In float64 the two runs agree to ~1e-14, while per-rank batch norm
(``sync_batchnorm=False``) moves them apart by ~5e-2: the tolerance below separates the two cleanly.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.dataset import make_synthetic_dataset
from training.train import training_loop

TOLERANCE = 1e-10
TINY = {
    "generator": {"base_channels": 4, "max_channels": 16, "code_dim": 8, "gene_hidden": 16, "noise_dim": 4},
    "discriminator": {"base_channels": 4, "max_channels": 16, "gene_hidden": 16},
    "tensorboard": False, "progress": False,
    "log_every": 1, "sample_every": 0, "checkpoint_every": 0,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, config: dict) -> None:
    """One rank, as torchrun would start it (environment variables), then the ordinary entry point."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    training_loop(TrainConfig.from_dict(config))


@pytest.mark.parametrize("r1", [0.0, 1.0], ids=["plain", "r1"])
def test_two_gloo_processes_match_one_process(tmp_path: Path, r1: float) -> None:
    """With R1 the D step differentiates through the gradient, so the global batch norm's all-reduce is
    differentiated twice; the weights still match one process."""
    data = make_synthetic_dataset(tmp_path / "syn.npz", patients=8, genes=64, size=32)
    common = {"data": str(data), "model": "proposed", "steps": 3, **TINY, "loss_weights": {"r1": r1}}
    previous = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        single = training_loop(TrainConfig.from_dict({**common, "out": str(tmp_path / "one"), "batch_size": 4}))
    finally:
        torch.set_num_threads(previous[0])
        torch.set_default_dtype(previous[1])
    two = {**common, "out": str(tmp_path / "two"), "batch_size": 2}
    mp.spawn(_worker, args=(_free_port(), two), nprocs=2, join=True)

    a, state_a = ckpt.load_checkpoint(single["checkpoint"])
    b, state_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert state_b["world_size"] == 2 and state_b["global_batch"] == state_a["global_batch"] == 4
    assert state_a["step"] == state_b["step"] == 3
    compared = 0
    for key, value in a.items():
        if key.startswith("model/") and value.is_floating_point():
            assert value.dtype == torch.float64, key
            assert torch.allclose(value, b[key], rtol=0, atol=TOLERANCE), (
                f"{key}: max difference {(value - b[key]).abs().max().item():.2e}"
            )
            compared += 1
        elif key.startswith("model/"):
            assert torch.equal(value, b[key]), key   # num_batches_tracked
    assert compared > 50
    # rank 0 alone wrote files
    assert (tmp_path / "two" / "proposed.safetensors").is_file()
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1


def test_detached_mode_seeking_trains_under_two_gloo_processes(tmp_path: Path) -> None:
    """The detached second draw records the global batch's statistics inside the DDP forward and re-draws with
    the raw generator: two ranks train through it, log the term and leave G's running statistics finite.
    (Not compared with one process: each rank re-draws its own first rows, so the term differs by design.)"""
    data = make_synthetic_dataset(tmp_path / "syn.npz", patients=8, genes=64, size=32)
    config = {"data": str(data), "model": "proposed", "steps": 2, **TINY, "out": str(tmp_path / "two"),
              "batch_size": 2, "loss_weights": {"mode_seeking": 1.0, "mode_seeking_detached": True}}
    mp.spawn(_worker, args=(_free_port(), config), nprocs=2, join=True)
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "g_mode_seeking" in r] == [1, 2]
    tensors, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert state["world_size"] == 2 and state["step"] == 2
    running = [value for key, value in tensors.items()
               if key.startswith("model/G/") and key.endswith(("running_mean", "running_var"))]
    assert running and all(torch.isfinite(v).all() for v in running)
