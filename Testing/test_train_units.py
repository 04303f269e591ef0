"""Pieces of the training package on their own: the configuration's JSON round trip, checkpoint files,
optimiser and RNG state through safetensors+JSON, the resumable rank-aware sampler, global batch norm."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from RadiogenomicGANLib.atomic import PARTIAL_GLOB, partial_path
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig, parse_override
from training.distributed import GlobalBatchNorm, convert_batchnorm
from training.train import ResumableDistributedSampler, build_parser, ema_decay, item_noise, resolve_config

# -- configuration ------------------------------------------------------------------------------------


def test_config_round_trips(tmp_path: Path) -> None:
    cfg = TrainConfig(
        data="d.npz", model="mcgan", out="run", steps=7, batch_size=3, lr_g=1e-4, amp=False,
        loss_weights={"d_isg": 10.0}, generator={"base_channels": 8}, discriminator={"independent_mapping": True},
    )
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.load(cfg.save(tmp_path / "c.json")) == cfg


def test_config_refuses_unknown_keys_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown training option.*'lr'"):
        TrainConfig.from_dict({"lr": 0.1})
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        TrainConfig.from_dict({"steps": "10"})
    with pytest.raises(ConfigError, match="'amp' must be true or false"):
        TrainConfig.from_dict({"amp": 1})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="set by the run"):
        TrainConfig(data="d", out="o", generator={"num_genes": 3}).validate()
    with pytest.raises(ConfigError, match=r"provenance key\(s\) \['steps'\]"):
        TrainConfig(data="d", out="o", provenance={"steps": 1}).validate()
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(data="d", out="o", batch_size=0).validate()


def test_cli_precedence(tmp_path: Path) -> None:
    """defaults < --config FILE < flags; repeated KEY=VALUE overrides merge into the file's."""
    TrainConfig(seed=5, lr_g=1e-3, generator={"base_channels": 8, "code_dim": 16}).save(tmp_path / "c.json")
    args = build_parser().parse_args(
        ["--config", str(tmp_path / "c.json"), "--data", "d", "--out", "o", "--lr-g", "2e-3",
         "--generator", "code_dim=32", "--no-amp", "--augment"]
    )
    cfg = resolve_config(args)
    assert (cfg.seed, cfg.lr_g, cfg.amp, cfg.data, cfg.augment) == (5, 2e-3, False, "d", True)
    assert cfg.generator == {"base_channels": 8, "code_dim": 32}
    assert parse_override("independent-mapping=true") == ("independent_mapping", True)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("code_dim")


def test_help_lists_every_option_from_the_configs_themselves() -> None:
    """The help's lists of loss terms and architecture keys come from the dataclasses, so a new one shows up."""
    from dataclasses import fields

    from RadiogenomicGANLib.networks import GeneratorConfig
    from training.discriminator import DiscriminatorConfig
    from training.losses import LossWeights

    text = " ".join(build_parser().format_help().split())
    for config in (GeneratorConfig, DiscriminatorConfig, LossWeights):
        for f in fields(config):
            assert f.name in text or f.name in ("kind", "num_genes", "patch_size"), f.name


def test_ema_warmup() -> None:
    cfg = TrainConfig()
    assert ema_decay(cfg, 0) == pytest.approx(0.1)
    assert ema_decay(cfg, 100_000) == 0.999
    assert ema_decay(TrainConfig(ema_warmup=False), 0) == 0.999


# -- checkpoints --------------------------------------------------------------------------------------


def test_checkpoint_save_is_atomic_and_pruned(tmp_path: Path) -> None:
    partial_path(tmp_path / "ckpt-00000001.safetensors").write_bytes(b"half a file from a crash")
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert list(tmp_path.glob(PARTIAL_GLOB)) == []
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000002.safetensors", "ckpt-00000003.safetensors"]
    tensors, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state == {"step": 3} and torch.equal(tensors["x"], torch.full((2,), 3.0))


def test_best_checkpoint_keeps_the_highest_score_and_ties_go_to_the_later(tmp_path: Path) -> None:
    kept = []
    for step, score in enumerate([0.5, 0.7, float("nan"), 0.7, 0.6, None], start=1):
        state = {"step": step, "validation": {"score": score}}
        path = ckpt.save_checkpoint(tmp_path, step, {"x": torch.zeros(1)}, state, keep=10)
        kept.append(ckpt.keep_if_best(path, score))
    assert kept == [True, True, False, True, False, False]
    _, state = ckpt.load_checkpoint(ckpt.best_checkpoint(tmp_path))
    assert state["step"] == 4


def test_load_refuses_foreign_and_damaged_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="not a RadiogenomicGAN training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "weights.safetensors")
    path = ckpt.save_checkpoint(tmp_path / "c", 1, {"x": torch.zeros(100)}, {})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing.safetensors")


def _adam_after_steps(model: nn.Module, steps: int) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 3)).square().sum().backward()
        opt.step()
    return opt


def test_optimizer_state_round_trip_continues_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    b = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt_a = _adam_after_steps(a, 3)
    tensors, meta = ckpt.optimizer_state("A", opt_a)
    tensors.update(ckpt.module_tensors("A", a))
    path = ckpt.save_checkpoint(tmp_path, 3, tensors, {"opt": meta})
    loaded, state = ckpt.load_checkpoint(path)
    ckpt.load_module("A", b, loaded)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.5, betas=(0.9, 0.9))   # hyper-parameters come from the file
    ckpt.load_optimizer("A", opt_b, loaded, state["opt"])
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["betas"] == (0.5, 0.999)
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(torch.ones(2, 3)).square().sum().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.load_module("A", nn.Linear(3, 4), loaded)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()   # leaves a cached Gaussian in NumPy's legacy state
    tensors, meta = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, 1, tensors, {"rng": meta})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    loaded, state = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(loaded, state["rng"])
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


# -- data order ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_batches_concatenate_to_the_single_process_batch(world: int) -> None:
    def draws(sampler: ResumableDistributedSampler, count: int) -> list[tuple[int, int]]:
        it = iter(sampler)
        return [next(it) for _ in range(count)]

    steps, batch = 7, 6                      # 25 // 6 = 4 steps per epoch: crosses an epoch boundary
    single = draws(ResumableDistributedSampler(25, batch, seed=1), batch * steps)
    per_rank = batch // world
    ranks = [
        draws(ResumableDistributedSampler(25, per_rank, 1, 0, rank, world), per_rank * steps) for rank in range(world)
    ]
    merged = [key for t in range(steps) for r in range(world) for key in ranks[r][t * per_rank : (t + 1) * per_rank]]
    assert merged == single
    assert {epoch for epoch, _ in single} == {0, 1}
    assert len({index for epoch, index in single if epoch == 0}) == 24          # no repeat within an epoch
    assert draws(ResumableDistributedSampler(25, batch, 1, start_step=5), 12) == single[30:42]


def test_sampler_refuses_a_batch_larger_than_the_data() -> None:
    with pytest.raises(ConfigError, match=r"global batch \(4 per process × 2 process\(es\) = 8\) is larger than"):
        ResumableDistributedSampler(7, 4, 0, world=2)


def test_item_noise_depends_only_on_its_key() -> None:
    assert torch.equal(item_noise(0, 1, 2, 16), item_noise(0, 1, 2, 16))
    assert not torch.equal(item_noise(0, 1, 2, 16), item_noise(0, 2, 2, 16))
    assert not torch.equal(item_noise(0, 1, 2, 16), item_noise(1, 1, 2, 16))
    assert item_noise(0, 0, 0, 0).shape == (0,)
    from training.sampling import item_augment

    assert torch.equal(item_augment(0, 1, 2), item_augment(0, 1, 2)) and item_augment(0, 1, 2).shape == (2, 5)
    assert not torch.equal(item_augment(0, 1, 2), item_augment(0, 1, 3))
    assert not torch.equal(item_augment(0, 1, 2)[0, :4], item_noise(0, 1, 2, 4))   # a stream of its own
    from training.sampling import item_pixel_noise

    assert torch.equal(item_pixel_noise(0, 1, 2, 8), item_pixel_noise(0, 1, 2, 8))
    assert item_pixel_noise(0, 1, 2, 8).shape == (1, 8, 8)
    assert not torch.equal(item_pixel_noise(0, 1, 2, 8), item_pixel_noise(0, 1, 3, 8))
    assert not torch.equal(item_pixel_noise(0, 1, 2, 8).flatten()[:4], item_noise(0, 1, 2, 4))


# -- batch norm ---------------------------------------------------------------------------------------


def test_global_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 2),
                        nn.BatchNorm1d(2))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_batchnorm(net, torch.device("cpu"))
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 2
    assert list(converted.state_dict()) == list(reference)          # same keys: checkpoints don't care
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 2),
                          nn.BatchNorm1d(2))
    plain.load_state_dict(reference)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(converted(x), plain(x))                        # train mode, no process group
    converted.eval()
    plain.eval()
    assert torch.equal(converted(x), plain(x))
