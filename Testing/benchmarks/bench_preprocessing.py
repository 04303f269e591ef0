"""Benchmark: seconds per patient for the paper's preprocessing of a 512×512×300 CT, and for the lung mask alone.

Target (issue 3, item 6): under 5 s per patient on 2 cores. The CTs are phantom patients generated in memory
(512×512 in-plane at their drawn 0.56–0.85 mm pixels, 300 slices over the lungs ± 15 mm), so the figures
cover the image work of `training.prepare` — lung mask, nodule VOI slices, background VOI sampling and patch
cutting — without the DICOM decoding; `--dicom` also writes one patient as a TCIA-style DICOM series and
times reading it back (`training.cohort.load_patient`). `--cohort N` additionally writes an N-patient phantom
cohort (at `--cohort-size`, default 256) and runs `python -m training.prepare` on it, printing its summary.
Each figure is the median of `--repeats` runs. Not collected by pytest; no timed assertions.

    .venv/bin/python Testing/benchmarks/bench_preprocessing.py [--patients 2] [--repeats 3] [--dicom]
        [--cohort 20 --cohort-size 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_seconds(fn, repeats: int) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    """(median wall s, median CPU s of this process, last result). On a shared machine the wall time
    includes waiting for a core; the CPU time is what an idle core would take (the work is single-threaded)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_patients(patients: int, repeats: int, size: int, slices: int, dicom: bool) -> None:
    from RadiogenomicGANLib.lungmask import compute_lung_mask
    from RadiogenomicGANLib.phantom import generate_patient
    from training.prepare import patient_rng, patient_samples

    print(f"{'patient':8s} {'shape':>15s} {'spacing k,j,i mm':>18s} {'lung mask s':>12s} {'(CPU)':>6s} {'Dice':>6s} "
          f"{'prepare s':>10s} {'(CPU)':>6s} {'nodule':>7s} {'backgr.':>7s}")  # fmt: skip
    mask_times, prepare_times, mask_cpu, prepare_cpu = [], [], [], []
    for index in range(patients):
        patient = generate_patient(index, 0, size_ij=size, slices=slices, n_genes=64)
        spacing = patient.geometry.spacing_kji
        mask_seconds, mask_cpu_s, mask = _median_seconds(
            lambda p=patient: compute_lung_mask(p.volume_hu, p.geometry.spacing_kji), repeats
        )
        truth = patient.lung_mask
        dice = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())

        def run(p=patient):  # type: ignore[no-untyped-def]
            return patient_samples(p.patient_id, p.volume_hu, p.geometry, p.nodule_mask, patient_rng(0, p.patient_id))

        prepare_seconds, prepare_cpu_s, samples = _median_seconds(run, repeats)
        mask_times.append(mask_seconds)
        prepare_times.append(prepare_seconds)
        mask_cpu.append(mask_cpu_s)
        prepare_cpu.append(prepare_cpu_s)
        print(f"{patient.patient_id:8s} {'×'.join(map(str, patient.volume_hu.shape)):>15s} "
              f"{', '.join(f'{s:.2f}' for s in spacing):>18s} {mask_seconds:12.2f} {mask_cpu_s:6.2f} {dice:6.3f} "
              f"{prepare_seconds:10.2f} {prepare_cpu_s:6.2f} {len(samples.nodule_images):7d} "
              f"{len(samples.background_images):7d}")  # fmt: skip
        if dicom and index == 0:
            bench_dicom(patient)
        del patient, mask, samples
    load = os.getloadavg()[0]
    print(f"\nmedian over patients, wall (CPU): lung mask {statistics.median(mask_times):.2f} s "
          f"({statistics.median(mask_cpu):.2f} s); preprocessing, lung mask included, DICOM decoding excluded "
          f"{statistics.median(prepare_times):.2f} s ({statistics.median(prepare_cpu):.2f} s) per patient; "
          f"target < 5 s. Peak RSS {_rss_mb():.0f} MB; {os.cpu_count()} CPUs, load average {load:.1f} "
          f"(wall ≫ CPU means the cores were shared)")  # fmt: skip


def bench_dicom(patient) -> None:  # type: ignore[no-untyped-def]
    from RadiogenomicGANLib.phantom.writers import write_cohort
    from training.cohort import load_patient, scan_cohort

    with tempfile.TemporaryDirectory() as folder:
        write_cohort(folder, [patient], 0, decoy_fraction=0.0)
        scans, _ = scan_cohort(folder)
        start = time.perf_counter()
        loaded = load_patient(scans[0])
        seconds = time.perf_counter() - start
        same = np.array_equal(loaded.volume_hu, patient.volume_hu)
        print(
            f"  (DICOM read of that patient, {len(scans[0].ct_files)} CT files + SEG: {seconds:.2f} s; "
            f"voxels identical to the phantom: {same})"
        )


def bench_cohort(patients: int, size: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "RadiogenomicGANLib.phantom", "--out", str(root / "cohort"),
                        "--patients", str(patients), "--seed", "0", "--size", str(size), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        written = time.perf_counter() - start
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "training.prepare", "--cohort", str(root / "cohort"), "--rnaseq",
             str(root / "cohort" / "GSE103584_R01_NSCLC_RNAseq.txt.gz"), "--out", str(root / "dataset.npz"),
             "--quiet"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        print(
            f"\n{patients}-patient phantom cohort at {size}²: written in {written:.1f} s; "
            f"python -m training.prepare took {seconds:.1f} s ({seconds / patients:.2f} s per patient, "
            f"DICOM reading included). Its summary:\n"
        )
        print(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--dicom", action="store_true", help="also time reading one patient back from DICOM")
    parser.add_argument("--cohort", type=int, default=0, help="also run training.prepare on an N-patient cohort")
    parser.add_argument("--cohort-size", type=int, default=256)
    args = parser.parse_args()
    if args.patients > 0:
        bench_patients(args.patients, args.repeats, args.size, args.slices, args.dicom)
    if args.cohort > 0:
        bench_cohort(args.cohort, args.cohort_size)


if __name__ == "__main__":
    main()
