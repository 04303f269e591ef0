"""The insertion path checked where users meet it: whole phantom CTs, automatic lung points, many donors.

    python -m training.insertion_check --out DIR [--weights W] [--cts 3] [--points 8] [--donors 8]

For each of `--cts` phantom CTs (patients of a cohort the model never saw, with lung texture and vessels)
the inserter's own automatic placement picks `--points` lung locations away from the phantom's own nodule;
the first `--donors` donors of that cohort are each inserted at the same points with the same seed. Per
nodule it measures what reached the CT:

* whether it got a label at all (an empty label: nothing was drawn in the lung at that point);
* the distance of the label's centroid from the requested point (mm, in the slice plane);
* the share of the label on tissue the CT already had (> −500 HU: vessel, wall), beside the share a ball of
  the same volume at the point would cover — what a nodule drawn at the point, ignoring vessels, would take in.

Why: the patch evaluation (`training.evaluate`) measures the generator's masks in its patches; a mask laid over
chest wall passes it, and the insertion's lung clip then leaves no nodule at the point. Summaries are given
by the donor's true gene-module class, because the smaller classes are the ones that fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from .metrics import TISSUE_HU


def label_placement(label: np.ndarray, volume_hu: np.ndarray, lung: np.ndarray, centre_kji: np.ndarray,
                    slices: list[int], spacing_kji: tuple[float, float, float]) -> dict[str, float]:
    """One inserted nodule: voxel count, in-plane distance (mm) of its centroid from the requested point,
    share of it on tissue the input already had, the same share for a ball of its volume at the point
    (on its slices, inside the lung), and `slice_spread_mm`. NaNs but the count for an empty label."""
    voxels = int(np.count_nonzero(label))
    if voxels == 0:
        return {"voxels": 0, "offset_mm": float("nan"), "tissue_share": float("nan"),
                "ball_tissue_share": float("nan"), "slice_spread_mm": float("nan")}
    spacing = np.asarray(spacing_kji, dtype=np.float64)
    centroid = np.array(ndimage.center_of_mass(label))
    offset = float(np.hypot(*((centroid - centre_kji)[1:] * spacing[1:])))
    spread = slice_spread_mm(label, centroid, spacing)
    tissue = volume_hu > TISSUE_HU
    radius_mm = (3.0 * voxels * spacing.prod() / (4.0 * np.pi)) ** (1.0 / 3.0)
    reach = np.ceil(radius_mm / spacing).astype(int) + 1
    low = np.maximum(np.round(centre_kji).astype(int) - reach, 0)
    high = np.minimum(np.round(centre_kji).astype(int) + reach + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij")
    distance = np.sqrt(((k - centre_kji[0]) * spacing[0]) ** 2 + ((j - centre_kji[1]) * spacing[1]) ** 2
                       + ((i - centre_kji[2]) * spacing[2]) ** 2)
    ball = (distance <= radius_mm) & np.isin(k, slices) & lung[box]
    return {"voxels": voxels, "offset_mm": offset, "tissue_share": float(tissue[label].mean()),
            "ball_tissue_share": float(tissue[box][ball].mean()) if ball.any() else float("nan"),
            "slice_spread_mm": spread}


def slice_spread_mm(label: np.ndarray, centroid_kji: np.ndarray, spacing_kji: np.ndarray) -> float:
    """How far the label's slices wander in-plane: the area-weighted RMS distance (mm) of each slice's centroid
    from the whole label's. 0 for a nodule whose slices are stacked on one axis (a sphere, a cylinder); what
    makes a coronal or sagittal view jagged or sheared. Each slice is drawn on its own background, so a
    generator that moves the nodule away from nearby tissue can move it differently on every slice."""
    areas, offsets = [], []
    for k in np.flatnonzero(label.any(axis=(1, 2))):
        rows, cols = np.nonzero(label[k])
        areas.append(rows.size)
        offsets.append(np.hypot((rows.mean() - centroid_kji[1]) * spacing_kji[1],
                                (cols.mean() - centroid_kji[2]) * spacing_kji[2]))
    return float(np.sqrt(np.average(np.square(offsets), weights=areas)))


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Empty-label rate; of the drawn ones: median and 90th-percentile offset, the share mostly (> 50 %) on
    existing tissue, the same share for the balls, and the median and 90th percentile of the slice spread."""
    drawn = [r for r in rows if r["voxels"] > 0]
    out: dict[str, float] = {"nodules": len(rows), "empty_label_fraction": 1.0 - len(drawn) / max(len(rows), 1)}
    if drawn:
        offsets = np.array([r["offset_mm"] for r in drawn])
        out |= {"offset_mm_median": float(np.median(offsets)), "offset_mm_p90": float(np.percentile(offsets, 90)),
                "mostly_on_tissue": float(np.mean([r["tissue_share"] > 0.5 for r in drawn])),
                "ball_mostly_on_tissue": float(np.nanmean([r["ball_tissue_share"] > 0.5 for r in drawn]))}
        spreads = np.array([r["slice_spread_mm"] for r in drawn])
        out |= {"slice_spread_mm_median": float(np.median(spreads)),
                "slice_spread_mm_p90": float(np.percentile(spreads, 90))}
    return out


def check(inserter: Any, *, cohort_seed: int, cts: int, points: int, donors: int, size: int = 256,
          half_slices: int | None = 2, progress: bool = True) -> dict[str, Any]:
    """Insert `donors` donors at `points` automatic points in each of `cts` phantom CTs; per-nodule rows and
    summaries overall and by true class. Every donor takes the first donor's ±`half_slices` slices; with
    `half_slices` None each donor's nodules get the slices their own size spans (the module's default)."""
    from RadiogenomicGANLib import genes as gene_io
    from RadiogenomicGANLib.demo import cohort_genes, lung_away_from_own_nodule
    from RadiogenomicGANLib.phantom import generate_patient
    from RadiogenomicGANLib.phantom.writers import write_geo_table

    n_genes = int(inserter.metadata.provenance.get("phantom_genes", 5172))
    names, ids, fpkm, classes = cohort_genes(cohort_seed, max(donors, 8), n_genes)
    with tempfile.TemporaryDirectory() as folder:
        table_path = Path(folder) / "genes.txt"
        write_geo_table(table_path, names, ids, fpkm)
        table = gene_io.read_gene_table(table_path)
    profiles = [gene_io.profile_for_model(table, ids[d], inserter.metadata.genes, impute=True) for d in range(donors)]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=cts * donors, desc="insertion check", disable=not progress, file=sys.stderr)
    for ct in range(cts):
        # CTs of patients outside the donor cohort (indices past it), one seed per check
        patient = generate_patient(1000 + ct, cohort_seed + 2000, size_ij=size, n_genes=64)
        volume, geometry = patient.volume_hu, patient.geometry
        lung = inserter.lung_mask(volume, geometry)
        first = None
        for d, profile in enumerate(profiles):
            if first is None:
                result = first = inserter.insert(volume, geometry, profile, auto_count=points, seed=ct,
                                                 half_slices=half_slices,
                                                 lung_mask=lung_away_from_own_nodule(lung, patient))
            else:
                slices = first.slices if half_slices is not None else [None] * len(first.slices)
                result = inserter.insert(volume, geometry, profile, first.centres_ras, slices=slices, seed=ct,
                                         lung_mask=lung)
            centres_kji = np.asarray(geometry.ras_to_kji(first.centres_ras)).reshape(-1, 3)
            for n, centre in enumerate(centres_kji):
                measured = label_placement(result.label == n + 1, volume, lung, centre, result.slices[n],
                                           geometry.spacing_kji)
                rows.append({"ct": ct, "donor": ids[d], "module_class": int(classes[d]), "nodule": n, **measured})
            bar.update()
    bar.close()
    by_class = {int(c): summarise([r for r in rows if r["module_class"] == c])
                for c in sorted({r["module_class"] for r in rows})}
    return {"cohort_seed": cohort_seed, "cts": cts, "points": points, "donors": donors,
            "slices": "fitted to each nodule" if half_slices is None else f"±{half_slices}",
            "overall": summarise(rows), "by_class": by_class, "rows": rows}


def report(result: dict[str, Any], model_text: str) -> list[str]:
    def number(value: Any, digits: int = 2) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    lines = [f"# Insertion check: {model_text}", "",
             f"{result['cts']} phantom CTs × {result['points']} automatic points × {result['donors']} donors of the "
             f"unseen cohort of seed {result['cohort_seed']}, slices {result['slices']}. *Empty*: no label reached the "
             "CT. Of the drawn ones: "
             "the label centroid's distance from the requested point (mm, in-plane; median and 90th percentile), "
             f"the share lying mostly (> 50 %) on tissue the CT already had (> {TISSUE_HU:.0f} HU), that share "
             "for a ball of the same volume at the point, and the slice spread: how far the nodule's slices wander "
             "in-plane (area-weighted RMS distance of each slice's centroid from the nodule's, mm; 0 for slices "
             "stacked on one axis, as a sphere's; median and 90th percentile).", "",
             "| donors | nodules | empty | offset median (mm) | offset p90 (mm) | mostly on tissue "
             "| ball at the point | slice spread median (mm) | slice spread p90 (mm) |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = [("all", result["overall"])] + [(f"class {c}", s) for c, s in result["by_class"].items()]
    for name, s in groups:
        lines.append(f"| {name} | {s['nodules']} | {number(s['empty_label_fraction'], 3)} | "
                     f"{number(s.get('offset_mm_median'))} | {number(s.get('offset_mm_p90'))} | "
                     f"{number(s.get('mostly_on_tissue'), 3)} | {number(s.get('ball_mostly_on_tissue'), 3)} | "
                     f"{number(s.get('slice_spread_mm_median'))} | {number(s.get('slice_spread_mm_p90'))} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.insertion_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and metrics.json")
    parser.add_argument("--weights", type=Path, default=None, help="weights (default: the bundled demo model)")
    parser.add_argument("--cohort-seed", type=int, default=None,
                        help="donor cohort seed (default: the training cohort's seed + 1, as the demo)")
    parser.add_argument("--cts", type=int, default=3, help="phantom CTs (default 3)")
    parser.add_argument("--points", type=int, default=8, help="automatic points per CT (default 8)")
    parser.add_argument("--donors", type=int, default=8, help="donors, the cohort's first ones (default 8)")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane matrix (default 256)")
    parser.add_argument("--fit-slices", action="store_true",
                        help="each nodule on the slices its size spans (the module's default) instead of ±2")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("cts", "points", "donors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1")
    from RadiogenomicGANLib.cli_common import check_output_folder, run_cli
    from RadiogenomicGANLib.demo import DemoError, load_model
    from RadiogenomicGANLib.insertion import InsertionError
    from RadiogenomicGANLib.weights import WeightsError

    def body() -> int:
        check_output_folder(args.out, create=True)
        started = time.perf_counter()
        inserter, model_text = load_model(args.weights, False, "cpu")
        seed = args.cohort_seed
        if seed is None:
            seed = int(inserter.metadata.provenance.get("phantom_seed", 0)) + 1
        result = check(inserter, cohort_seed=seed, cts=args.cts, points=args.points, donors=args.donors,
                       size=args.size, half_slices=None if args.fit_slices else 2, progress=not args.no_progress)
        lines = report(result, model_text)
        (args.out / "report.md").write_text("\n".join(lines))
        (args.out / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
        print("\n".join(lines))
        print(f"{len(result['rows'])} nodules in {time.perf_counter() - started:.0f} s; {args.out}/report.md")
        return 0

    return run_cli(body, (DemoError, InsertionError, WeightsError))


if __name__ == "__main__":
    raise SystemExit(main())
