"""Training speed: seconds per iteration and samples per second, by hand:
``.venv/bin/python Testing/benchmarks/bench_training.py``.

One iteration is exactly the loop's (`training.iteration.train_iteration`: G forward, D step, G step) plus the
EMA update, at batch 16, for each model at 64² and 128², default architecture, 5172 genes, on synthetic
tensors (data loading excluded), channels-last as in training. Precision: on CPU both float32 (the
default) and bf16 autocast (``--cpu-bf16``); on a GPU bf16 autocast (the default there). Device ``auto``:
the same script runs unchanged on a GPU. Reference: the MONAI peer re-implementation takes 5.5 s per
iteration at 128², batch 16, on a 2-core CPU. Median of a few timed iterations after warm-up; about
2–3 minutes on 2 idle CPU cores. Not collected by pytest; no timed assertions anywhere.

Columns: wall seconds per iteration (what a user waits), CPU seconds per iteration summed over threads,
samples per second (wall), the MONAI ratio (wall, 128² only) and the 1-minute load average. On a shared
machine (load above the core count) wall time is inflated — OpenMP threads wait for each other — so
read "CPU s/it ÷ threads" as the idle-machine estimate, or run with ``--threads 1``, where wall ≈ CPU
time once the machine is idle.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from training.config import MODELS, TrainConfig, parse_override
from training.distributed import DistContext, resolve_device
from training.iteration import autocast_for, build_configs, build_networks, train_iteration, update_ema, uses_bf16
from training.sampling import to_device

MONAI_SECONDS_128 = 5.5


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
        "noise": torch.randn(batch, noise_dim, generator=g),
    }


def bench(model: str, size: int, batch: int, genes: int, device: torch.device, warmup: int, iters: int,
          precision: str, generator: dict | None = None, discriminator: dict | None = None) -> dict:
    bf16 = precision == "bf16"
    cfg = TrainConfig(data="synthetic", out="-", model=model, batch_size=batch, amp=bf16, cpu_bf16=bf16,
                      generator=generator or {}, discriminator=discriminator or {})
    g_cfg, d_cfg, weights = build_configs(cfg, genes, size)
    nets = build_networks(cfg, g_cfg, d_cfg, weights, DistContext(device=device))
    source = to_device(synthetic_batch(batch, size, genes, g_cfg.noise_dim), device, cfg.channels_last)

    def autocast() -> object:
        return autocast_for(device, uses_bf16(cfg, device))

    times, cpu_times = [], []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = train_iteration(nets, dict(source), autocast)
        update_ema(nets.generator_ema, nets.generator, cfg.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        assert math.isfinite(logs["g_total"]) and math.isfinite(logs["d_total"])
    seconds = statistics.median(times)
    return {
        "model": model,
        "size": size,
        "g_params": sum(p.numel() for p in nets.generator.parameters()),
        "d_params": sum(p.numel() for p in nets.discriminator.parameters()),
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_times),
        "samples_per_second": batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--genes", type=int, default=5172)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"),
                        help="default: fp32 and bf16 on CPU, bf16 on GPU")
    parser.add_argument("--generator", action="append", default=[], metavar="KEY=VALUE",
                        help="GeneratorConfig override, as for training (e.g. base_channels=16); repeatable")
    parser.add_argument("--discriminator", action="append", default=[], metavar="KEY=VALUE",
                        help="DiscriminatorConfig override; repeatable")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.genes} genes; "
          f"median of {args.iters} iterations after {args.warmup} warm-up")
    g_over = dict(parse_override(text) for text in args.generator)
    d_over = dict(parse_override(text) for text in args.discriminator)
    if g_over or d_over:
        print(f"architecture overrides: generator {g_over}, discriminator {d_over}")
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    header = (f"{'model':<11}{'size':>5}{'prec':>6}{'G params':>12}{'D params':>12}{'s/iter':>9}{'CPU s/it':>10}"
              f"{'samples/s':>11}{'vs MONAI':>10}{'load':>6}")
    print(header)
    print("-" * len(header))
    for precision in precisions:
        for size in args.sizes:
            for model in args.models:
                r = bench(model, size, args.batch, args.genes, device, args.warmup, args.iters, precision,
                          g_over, d_over)
                ratio = f"{MONAI_SECONDS_128 / r['seconds']:.1f}×" if size == 128 and args.batch == 16 else "-"
                print(f"{model:<11}{size:>5}{precision:>6}{r['g_params']:>12,}{r['d_params']:>12,}"
                      f"{r['seconds']:>9.3f}{r['cpu_seconds']:>10.3f}{r['samples_per_second']:>11.1f}{ratio:>10}"
                      f"{os.getloadavg()[0]:>6.1f}", flush=True)

if __name__ == "__main__":
    main()
