"""Generator cost on this CPU, by hand: `.venv/bin/python Testing/benchmarks/bench_generators.py`.

For the three generators at 64² and 128² (default config, 5172 genes): parameters, FLOPs per patch
(torch.utils.flop_counter: convolutions and matrix products, i.e. what dominates; element-wise ops are not
counted), CPU latency for one patch and for a batch of 16 (eval, no_grad, median of several runs),
training-step time at batch 16 (forward + backward of a simple L1 + mask loss + Adam step), and how much
of a plain float32 matmul's FLOP/s each of these achieves, the matmul measured in the same run (so the
ratio is comparable across machines; re-measured before every row, as the load on a shared machine
drifts). Then the bundled demo model's time per patch against the batch it runs in (what
`training.evaluation.context.GENERATION_BATCH` is chosen from) and whether its output depends on the batch,
and what opening its own mask (`open_own_mask`, round 36) costs it.
One thread by default (`--threads`), because oversubscribed OpenMP threads on a shared machine
give erratic figures. Prints a table; takes about 2–3 minutes on an idle core.
Not collected by pytest (file name `bench_*.py`); no timed assertions anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from RadiogenomicGANLib.networks import (
    KINDS,
    GeneratorConfig,
    build_generator,
    count_parameters,
    hole_from_mask,
)

BATCH = 16


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 1024, repeats: int = 7) -> float:
    """Reference: a plain float32 n×n matmul (2n³ FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, warmup=2)


def inputs(config: GeneratorConfig, batch: int) -> tuple[torch.Tensor, ...]:
    s = config.patch_size
    mask = torch.zeros(batch, 1, s, s)
    mask[:, :, s // 2 - s // 8: s // 2 + s // 8, s // 2 - s // 8: s // 2 + s // 8] = 1
    return (torch.rand(batch, 1, s, s) * 2 - 1, torch.randn(batch, config.num_genes),
            torch.randn(batch, config.noise_dim), hole_from_mask(mask), mask)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(kind: str, size: int, repeats: int) -> dict[str, float]:
    config = GeneratorConfig(kind=kind, patch_size=size)
    generator = build_generator(config)
    bg1, genes1, noise1, hole1, _ = inputs(config, 1)
    bg, genes, noise, hole, mask = inputs(config, BATCH)

    def forward(b: torch.Tensor, g: torch.Tensor, n: torch.Tensor, h: torch.Tensor):
        return generator(b, g, n, hole=h)

    def loss_of(out) -> torch.Tensor:
        return (out.image - bg).abs().mean() + torch.nn.functional.binary_cross_entropy(out.mask, mask)

    generator.eval()
    with torch.no_grad():
        flops_patch = count_flops(lambda: forward(bg1, genes1, noise1, hole1))
        one = median_seconds(lambda: forward(bg1, genes1, noise1, hole1), repeats=2 * repeats)
        batch = median_seconds(lambda: forward(bg, genes, noise, hole), repeats=repeats)

    generator.train()
    optimiser = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss_of(forward(bg, genes, noise, hole)).backward()
        optimiser.step()

    # FLOPs are linear in the batch (batch norm and element-wise ops are not counted): count one patch
    flops_train = BATCH * count_flops(lambda: (generator(bg1, genes1, noise1, hole=hole1).image - bg1)
                                      .abs().mean().backward())
    step = median_seconds(train_step, repeats=repeats)
    return {"params": count_parameters(generator), "flops": flops_patch, "one": one, "batch": batch,
            "step": step, "flops_batch": flops_patch * BATCH, "flops_train": flops_train}


def per_patch_by_batch(batches: tuple[int, ...] = (8, 16, 32, 64, 128, 320), repeats: int = 3) -> None:
    """The bundled model (eval, no_grad): seconds per patch at each batch size, and the largest difference of
    its output from batch 8's (the evaluation relies on it being nil)."""
    from pathlib import Path

    from RadiogenomicGANLib.weights import load_weights

    path = Path(__file__).resolve().parents[2] / "Resources" / "demo_model"
    generator, _ = load_weights(path)
    generator.eval()
    config = generator.config
    largest = max(batches)
    background, genes, noise, hole, _ = inputs(config, largest)
    position = torch.linspace(-1, 1, largest)

    def run(start: int, stop: int) -> torch.Tensor:
        extra = {"position": position[start:stop]} if config.slice_position else {}
        return generator(background[start:stop], genes[start:stop], noise[start:stop], hole=hole[start:stop],
                         **extra).image

    with torch.no_grad():
        reference = torch.cat([run(start, start + 8) for start in range(0, largest, 8)])
        print(f"\nbundled model at {config.patch_size}², per patch by batch (eval, median of {repeats}):")
        for n in batches:
            seconds = median_seconds(lambda n=n: run(0, n), repeats=repeats)
            difference = float((run(0, n) - reference[:n]).abs().max())
            print(f"  batch {n:>4}: {seconds / n * 1e3:6.1f} ms/patch   max |output − batch 8's| {difference:.1e}",
                  flush=True)


def opening_cost(batch: int = 32, repeats: int = 5) -> None:
    """The bundled model as exported against the same tensors with `open_own_mask` off (round 36): seconds per
    patch, the two timed alternately so that a drifting load touches both alike."""
    from pathlib import Path

    from RadiogenomicGANLib.networks import with_composition
    from RadiogenomicGANLib.weights import load_weights

    exported, _ = load_weights(Path(__file__).resolve().parents[2] / "Resources" / "demo_model")
    if not exported.config.open_own_mask:
        print("\nthe bundled model does not open its own mask: no opening to time")
        return
    models = {"exported (opened)": exported.eval(), "not opened": with_composition(exported, open_own_mask=False)}
    background, genes, noise, hole, _ = inputs(exported.config, batch)
    extra = {"position": torch.linspace(-1, 1, batch)} if exported.config.slice_position else {}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(median_seconds(lambda m=model: m(background, genes, noise, hole=hole, **extra),
                                                  repeats=1))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nbundled model at {exported.config.patch_size}², batch {batch}, the own mask's opening "
          f"(median of {repeats}):")
    for name, seconds in medians.items():
        print(f"  {name:<18} {seconds / batch * 1e3:6.2f} ms/patch   "
              f"{seconds / medians['not opened']:.3f}× not opened", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable figures on a shared machine; 0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    reference = matmul_flops_per_second()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 1024² matmul: "
          f"{reference / 1e9:.1f} GFLOP/s (reference for the 'of matmul' columns)")
    header = (f"{'generator':<11} {'size':>4} {'params':>10} {'GFLOP/patch':>11} {'1 patch':>9} "
              f"{'batch 16':>9} {'train 16':>9} {'fwd/matmul':>10} {'train/matmul':>12} {'matmul':>7}")
    print(header)
    print("-" * len(header))
    for size in (64, 128):
        for kind in KINDS:
            local = matmul_flops_per_second()      # re-measured per row: the machine's load drifts
            r = bench(kind, size, args.repeats)
            fwd_ratio = r["flops_batch"] / r["batch"] / local
            train_ratio = r["flops_train"] / r["step"] / local
            print(f"{kind:<11} {size:>4} {r['params'] / 1e6:>9.2f}M {r['flops'] / 1e9:>11.3f} "
                  f"{r['one'] * 1e3:>7.1f}ms {r['batch'] * 1e3:>7.0f}ms {r['step'] * 1e3:>7.0f}ms "
                  f"{fwd_ratio:>10.2f} {train_ratio:>12.2f} {local / 1e9:>4.1f}GF/s", flush=True)
    print(f"(latencies: eval, no_grad, median of {args.repeats}–{2 * args.repeats} runs; train 16 = forward "
          "+ backward + Adam; ratios = achieved FLOP/s ÷ matmul FLOP/s, FLOPs of convs/matmuls only, "
          "train FLOPs counted over forward+backward; matmul = the reference re-measured just before the "
          f"row; total {time.perf_counter() - start:.0f} s)")
    per_patch_by_batch(repeats=args.repeats)
    opening_cost()


if __name__ == "__main__":
    main()
