"""Training speed beside the MONAI peer, by hand: ``.venv/bin/python Testing/benchmarks/bench_training.py``.

One iteration is exactly the loop's (`training.iteration.train_iteration`: G forward, D step, G step) plus
the EMA update, at batch 16, for each model at 64² and 128², default architecture, 5172 genes, on synthetic
tensors (data loading excluded), channels-last as in training. Precision: on CPU both float32 (the
default) and bf16 autocast (``--cpu-bf16``); on a GPU bf16 autocast (the default there). Device ``auto``:
the same script runs unchanged on a GPU.

The reference is measured, not quoted: at 128² the same process times a stand-in for the MONAI RGGAN peer's
step (`monai_peer.py`: its published network sizes and its GanTrainer iteration, float32 as it ran), and the
"vs MONAI" column is the peer's seconds per iteration divided by ours. Every runner at a size is warmed up,
then timed round-robin (one iteration of each per round), so a change of load on a shared machine hits all
of them alike; medians of the rounds. Not collected by pytest; no timed assertions anywhere.
`--loss-weight r1=1`, `--variant-generator KEY=VALUE` and `--variant-discriminator KEY=VALUE` also time each
model with those changes together, round-robin beside the default (the cost of an optional term or layer).
Each runner counts its own steps as the loop does, so a lazy term (``mode_seeking_every=K``) is computed on
every K-th timed step; its median then lies between the two kinds of step, and the FLOP column counts the
first step, one with the term.

Columns: FLOPs per iteration (convolutions and matrix products, counted on the first, untimed iteration), wall
seconds per iteration (what a user waits), CPU seconds per iteration summed over threads, achieved GFLOP/s,
samples per second (wall), the MONAI ratio (128² only), the ratio against the 3.74 s the peer itself took
in issue 10 (128², batch 16, CPU only: the lower estimate, which issue 10's ≥ 5× is judged on) and the
1-minute load average. On a shared machine
(load above the core count) wall times are inflated — OpenMP threads wait for each other — so compare the
ratio, not the seconds, across runs. The FLOP columns show what the stand-in is: the peer's step is ~1.1
TFLOP at 128², batch 16, and runs at a higher FLOP rate than ours (wide convolutions at 8²–16²), so the wall
ratio is smaller than the FLOP ratio.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from monai_peer import PeerStep
from torch.utils.flop_counter import FlopCounterMode

from RadiogenomicGANLib.devices import keep_freed_memory
from training.config import MODELS, TrainConfig, parse_override
from training.distributed import DistContext
from training.iteration import autocast_for, build_configs, build_networks, train_iteration, update_ema, uses_bf16
from training.sampling import to_device

PEER_SIZE = 128   # the peer's architecture is built for 128² patches only
# The peer's own step as issue 10 measured it on this 2-core CPU class (128², batch 16, float32): the stand-in
# has run 1.6–2× slower than that here under glibc's own malloc (its 25–50 MB blocks faulted in afresh every
# step) and 1.3× with freed memory kept (`keep_freed_memory`, as training runs), so the ratio against this
# figure is the lower estimate.
PEER_QUOTED_SECONDS = 3.74


def synthetic_batch(batch: int, size: int, genes: int, noise_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of the training contract: noisy lung-like patches, a disc nodule, random genes."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = torch.empty(batch).uniform_(size / 16, size / 6, generator=g)
    disc = ((rows - size / 2) ** 2 + (cols - size / 2) ** 2)[None] <= radius[:, None, None] ** 2
    mask = disc.float()[:, None]
    lung = -0.75 + 0.03 * torch.randn(batch, 1, size, size, generator=g)
    return {
        "image": torch.where(mask > 0, torch.full_like(lung, 0.05), lung),
        "mask": mask,
        "genes": torch.randn(batch, genes, generator=g),
        "background": -0.75 + 0.03 * torch.randn(batch, 1, size, size, generator=g),
        "wrong_genes": torch.randn(batch, genes, generator=g),
        "wrong_mask": mask.roll(1, dims=0),
        "patient": torch.arange(batch),
        "phenotype": torch.randn(batch, 3, generator=g),
        "noise": torch.randn(batch, noise_dim, generator=g),
        "augment": torch.rand(batch, 2, 5, generator=g),   # the discriminator's augmentation draws
        "position": torch.empty(batch).uniform_(-1, 1, generator=g),   # read by a slice_position generator
        "pixel_noise": torch.randn(batch, 1, size, size, generator=g),  # read by a pixel_noise generator
    }


def our_step(model: str, size: int, batch: int, genes: int, device: torch.device, precision: str,
             generator: dict, discriminator: dict, variant: dict[str, dict] | None = None
             ) -> tuple[Callable[[], dict[str, float]], dict]:
    """One training iteration of ours (plus the EMA update) on a fixed batch, and the networks' sizes.
    `variant` ({"loss_weights", "generator", "discriminator"}: overrides) is added on top of the arguments."""
    bf16 = precision == "bf16"
    variant = variant or {}
    cfg = TrainConfig(data="synthetic", out="-", model=model, batch_size=batch, amp=bf16, cpu_bf16=bf16,
                      generator={**generator, **variant.get("generator", {})},
                      discriminator={**discriminator, **variant.get("discriminator", {})},
                      loss_weights=variant.get("loss_weights", {}))
    g_cfg, d_cfg, weights = build_configs(cfg, genes, size)
    nets = build_networks(cfg, g_cfg, d_cfg, weights, DistContext(device=device))
    source = to_device(synthetic_batch(batch, size, genes, g_cfg.noise_dim), device, cfg.channels_last)

    def autocast() -> object:
        return autocast_for(device, uses_bf16(cfg, device))

    count = itertools.count()   # the loop's step, so a lazy term is timed as often as training computes it

    def step() -> dict[str, float]:
        logs = train_iteration(nets, dict(source), autocast, next(count))
        update_ema(nets.generator_ema, nets.generator, cfg.ema_decay)
        return logs

    changed = [key for overrides in variant.values() for key in overrides]
    info = {"model": model + ("+" + ",".join(changed) if changed else ""), "precision": precision,
            "g_params": sum(p.numel() for p in nets.generator.parameters()),
            "d_params": sum(p.numel() for p in nets.discriminator.parameters())}
    return step, info


def peer_step(batch: int, device: torch.device) -> tuple[Callable[[], dict[str, float]], dict]:
    """The MONAI peer's iteration (float32, as it ran), and its networks' sizes."""
    step = PeerStep(batch, device)
    info = {"model": "MONAI peer", "precision": "fp32",
            "g_params": sum(p.numel() for p in step.g.parameters()),
            "d_params": sum(p.numel() for p in step.d.parameters())}
    return step, info


def count_flops(step: Callable[[], dict[str, float]]) -> int:
    """FLOPs of one iteration (convolutions and matrix products, what dominates); the run is a warm-up too."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_round_robin(steps: list[Callable[[], dict[str, float]]], device: torch.device, warmup: int,
                     iters: int) -> list[tuple[float, float]]:
    """(median wall s, median CPU s) per step: `warmup` untimed iterations each, then `iters` rounds."""
    def once(step: Callable[[], dict[str, float]]) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert math.isfinite(logs["g_total"]) and math.isfinite(logs["d_total"])
        return time.perf_counter() - start, time.process_time() - cpu_start

    for step in steps:
        for _ in range(warmup):
            once(step)
    rounds = [[once(step) for step in steps] for _ in range(iters)]
    return [(statistics.median(r[i][0] for r in rounds), statistics.median(r[i][1] for r in rounds))
            for i in range(len(steps))]


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--genes", type=int, default=5172)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations after the FLOP-counting one")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"),
                        help="default: fp32 and bf16 on CPU, bf16 on GPU")
    parser.add_argument("--no-peer", action="store_true", help="skip the MONAI peer (no ratio printed)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave glibc's malloc as it is (training keeps freed memory: keep_freed_memory)")
    parser.add_argument("--generator", action="append", default=[], metavar="KEY=VALUE",
                        help="GeneratorConfig override, as for training (e.g. base_channels=32); repeatable")
    parser.add_argument("--discriminator", action="append", default=[], metavar="KEY=VALUE",
                        help="DiscriminatorConfig override; repeatable")
    parser.add_argument("--loss-weight", action="append", default=[], metavar="NAME=VALUE",
                        help="also time each model with these loss weights (e.g. r1=1), beside the default; "
                             "repeatable")
    parser.add_argument("--variant-generator", action="append", default=[], metavar="KEY=VALUE",
                        help="generator setting of that variant (e.g. edge_blur_per_sd=0.6); repeatable")
    parser.add_argument("--variant-discriminator", action="append", default=[], metavar="KEY=VALUE",
                        help="discriminator setting of that variant (e.g. gene_head=projection); repeatable")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False if args.system_allocator else keep_freed_memory()   # as training does
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.genes} genes; "
          f"median of {args.iters} round-robin iterations after a FLOP-counting run and {args.warmup} warm-up; "
          f"freed memory {'kept for reuse' if kept else 'as the C library does'}")
    g_over = dict(parse_override(text) for text in args.generator)
    d_over = dict(parse_override(text) for text in args.discriminator)
    variant = {name: dict(parse_override(text) for text in texts) for name, texts in (
        ("loss_weights", args.loss_weight), ("generator", args.variant_generator),
        ("discriminator", args.variant_discriminator)) if texts}
    variants = [None, variant] if variant else [None]
    if g_over or d_over:
        print(f"architecture overrides: generator {g_over}, discriminator {d_over}")
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    header = (f"{'model':<14}{'size':>5}{'prec':>6}{'G params':>12}{'D params':>12}{'GFLOP/it':>10}{'s/iter':>9}"
              f"{'CPU s/it':>10}{'GFLOP/s':>9}{'samples/s':>11}{'vs MONAI':>10}{'vs 3.74 s':>11}{'load':>6}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        runners = [our_step(model, size, args.batch, args.genes, device, precision, g_over, d_over, variant)
                   for precision in precisions for model in args.models for variant in variants]
        with_peer = size == PEER_SIZE and not args.no_peer
        if with_peer:
            runners.insert(0, peer_step(args.batch, device))
        flops = [count_flops(step) for step, _ in runners]
        timings = time_round_robin([step for step, _ in runners], device, args.warmup, args.iters)
        peer_seconds = timings[0][0] if with_peer else None
        for (_, info), flop, (seconds, cpu_seconds) in zip(runners, flops, timings):
            ratio = f"{peer_seconds / seconds:.1f}×" if peer_seconds is not None else "-"
            quoted = size == PEER_SIZE and args.batch == 16 and device.type == "cpu"
            lower = f"{PEER_QUOTED_SECONDS / seconds:.1f}×" if quoted and info["model"] != "MONAI peer" else "-"
            print(f"{info['model']:<14}{size:>5}{info['precision']:>6}{info['g_params']:>12,}{info['d_params']:>12,}"
                  f"{flop / 1e9:>10.0f}{seconds:>9.3f}{cpu_seconds:>10.3f}{flop / 1e9 / seconds:>9.0f}"
                  f"{args.batch / seconds:>11.1f}{ratio:>10}{lower:>11}{os.getloadavg()[0]:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
