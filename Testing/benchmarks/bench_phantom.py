"""Benchmark: write a phantom cohort (default 20 patients at 256² in-plane) and print where the time goes.

Target (issue 3): 20 patients at 256×256 in under a minute on 2 cores. Prints total seconds, seconds per
patient (generation vs. writing), slices per patient and bytes on disk. Not collected by pytest.

    .venv/bin/python Testing/benchmarks/bench_phantom.py [--patients 20] [--size 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from RadiogenomicGANLib.phantom import generate_patient, write_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes", type=int, default=5172)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the cohort")
    args = parser.parse_args()

    load0 = os.getloadavg()[0]  # the machine is shared: wall time depends on what else runs
    # Generation alone, on a few patients (memory only).
    n_gen = min(5, args.patients)
    gen_times, slices = [], []
    for i in range(n_gen):
        t0 = time.perf_counter()
        p = generate_patient(i, args.seed, size_ij=args.size, n_genes=args.genes)
        gen_times.append(time.perf_counter() - t0)
        slices.append(p.volume_hu.shape[0])

    out = args.keep or Path(tempfile.mkdtemp(prefix="bench_phantom_"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = write_cohort(out, args.patients, args.seed, size_ij=args.size, n_genes=args.genes)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        n_files = sum(1 for f in out.rglob("*.dcm"))
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)

    per = summary.seconds_per_patient
    mean_gen = statistics.mean(gen_times)
    print(f"phantom cohort: {args.patients} patients, {args.size}x{args.size} in-plane, {args.genes} genes, "
          f"cpus={os.cpu_count()}")
    print(f"  total write_cohort     : {total:6.1f} s wall, {cpu:.1f} s CPU of this process "
          f"(target < 60 s for 20 patients at 256²); load average before/after: {load0:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"  per patient (gen+write): mean {statistics.mean(per):.2f} s, median {statistics.median(per):.2f} s, "
          f"max {max(per):.2f} s")
    print(f"  per patient generation : mean {mean_gen:.2f} s over {n_gen} patients "
          f"(slices {min(slices)}-{max(slices)}, mean {np.mean(slices):.0f})")
    print(f"  writing share          : {max(0.0, 1 - mean_gen / statistics.mean(per)):.0%} of per-patient time")
    print(f"  output                 : {n_files} DICOM files, {size / 1e6:.0f} MB")
    print(f"  {summary.describe()}")


if __name__ == "__main__":
    main()
