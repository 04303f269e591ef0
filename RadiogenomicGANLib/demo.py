"""`make demo`: the main job on the embedded default, from a fresh clone, in well under 3 minutes on 2 cores.

1. A phantom chest CT is generated in memory and written to `demo_output/phantom_ct.nrrd`.
2. The bundled demo model (`Resources/demo_model.safetensors` in a checkout, package data in a wheel: see
   `bundled.py`) is loaded and checked against its SHA-256 list. Without it the demo stops with a
   clear message: a randomly initialised model draws no nodules, and a demo that silently shows noise would
   mislead (`--random-model` exists for developing the demo itself and says so loudly on every output).
3. A small phantom cohort's gene table is written (`phantom_genes.txt`, GEO format); three donors of
   different true gene-module classes are picked from it.
4. Nodule locations are chosen automatically in the lung (5–25 mm from the pleura, away from the phantom's
   own nodule); the same locations and seed are used for every donor, so only the genes differ.
5. For each donor: the new CT, its `.seg.nrrd` and the fusion weight map are written; then a PNG panel
   (background, the three results, masks, weight maps) and the radiogenomic map (t-SNE of the cohort's gene
   codes φ(g), donors highlighted) are drawn.

The phantom biology (genome, modules) is one constant for every cohort seed, so the donors come from a cohort
the model never saw: by default the seed after the training cohort's (`phantom_seed` in the weights'
provenance, + 1); `--cohort-seed` picks another. The gene count is `phantom_genes` from the provenance, else
the biology's 5172.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from RadiogenomicGANLib.bundled import bundled_weights_path, verify_bundled
from RadiogenomicGANLib.segments import nodule_segments

DEFAULT_WEIGHTS = bundled_weights_path()
#: Bounds of the demo's knobs: a phantom of 32…1024 pixels per side; at most 16 nodules of ±20 slices.
SIZE_RANGE = (32, 1024)
MAX_NODULES = 16
MAX_HALF_SLICES = 20
# The demo CT is a patient no model was trained on: an index past the cohort, a seed apart from the cohort's
# (any offsets would do; these drew a CT whose lungs leave room for nodules at the default size). Its own
# genes are not used (the donors' are), so it draws only a few.
CT_PATIENT_OFFSET = 7
CT_SEED_OFFSET = 1000
CT_GENES = 64
DISPLAY_WINDOW = (-1350.0, 150.0)  # lung window W1500 / L−600
CROP_MM = 70.0
KEEP_OUT_MM = 15.0  # automatic points stay this far from the phantom CT's own nodule


def lung_away_from_own_nodule(lung: np.ndarray, patient: Any) -> np.ndarray:
    """The lung mask minus the phantom patient's own nodule dilated by about KEEP_OUT_MM: where automatic
    points may go, so a synthetic nodule is never placed on (or read as) the real one."""
    from scipy import ndimage

    reach = max(1, round(KEEP_OUT_MM / float(patient.geometry.spacing[0])))
    return lung & ~ndimage.binary_dilation(patient.nodule_mask, iterations=reach)


class DemoError(ValueError):
    """The demo cannot run as asked (e.g. the bundled model is missing); the message says what to do."""


@dataclass
class Donor:
    sample_id: str
    module_class: int
    profile: np.ndarray


# --- inputs ---------------------------------------------------------------------------------------------
def load_model(weights: Path | None, random_model: bool, device: str) -> tuple[Any, str]:
    """The inserter and a one-line description; refuses to run on a missing model unless asked to."""
    from RadiogenomicGANLib.insertion import NoduleInserter

    if random_model:
        return None, "RANDOMLY INITIALISED (no trained weights)"
    path = weights or DEFAULT_WEIGHTS
    if weights is not None and not path.exists():
        raise DemoError(f"--weights {path}: no such file; give the weights' .safetensors file (its .json beside it)")
    if not path.exists():
        raise DemoError(
            f"the bundled demo model {path} is not there. It is trained on the phantom cohort and exported by the "
            "project (see the README: `make demo-weights`); pass --weights FILE.safetensors to use another "
            "model. (--random-model runs the pipeline with an untrained network, for development only.)"
        )
    if weights is None:
        try:
            verify_bundled(path)
        except ValueError as error:
            raise DemoError(str(error)) from None
    inserter = NoduleInserter.from_weights(path, device=device)
    return inserter, f"{path.name} ({inserter.kind}, sha256 {str(inserter.weights_sha256)[:12]}…)"


def random_inserter(gene_names: list[str], device: str) -> Any:
    """An untrained proposed generator for the demo's own development (draws no meaningful nodule)."""
    import torch

    from RadiogenomicGANLib.genes import GenePreprocessing
    from RadiogenomicGANLib.insertion import NoduleInserter
    from RadiogenomicGANLib.networks import GeneratorConfig, build_generator
    from RadiogenomicGANLib.weights import WeightsMetadata

    config = GeneratorConfig(num_genes=len(gene_names))
    torch.manual_seed(0)
    metadata = WeightsMetadata(
        config=config, genes=GenePreprocessing(list(gene_names), np.zeros(len(gene_names)), np.ones(len(gene_names))),
        patch_size=config.patch_size,
        patch_spacing_mm=60.0 / config.patch_size, provenance={"note": "random, untrained"},
    )
    return NoduleInserter(build_generator(config).eval(), metadata, device)


def cohort_genes(seed: int, patients: int, n_genes: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(gene names, sample ids, FPKM (G, S), true module class (S,)) of phantom patients 0…S−1 — genes only."""
    from RadiogenomicGANLib.phantom.genomics import draw_module_activations, gene_model, gene_profile
    from RadiogenomicGANLib.phantom.patient import patient_id_for

    model = gene_model(n_genes)
    columns, classes = [], []
    for index in range(patients):
        module_class, activations = draw_module_activations(index, seed)
        columns.append(gene_profile(model, activations, index, seed))
        classes.append(module_class)
    ids = [patient_id_for(i) for i in range(patients)]
    return list(model.gene_names), ids, np.stack(columns, axis=1), np.asarray(classes)


def pick_donors(ids: list[str], classes: np.ndarray, count: int = 3) -> list[int]:
    """The first patient of each of `count` different classes."""
    chosen: list[int] = []
    seen: set[int] = set()
    for index, module_class in enumerate(classes):
        if int(module_class) not in seen:
            seen.add(int(module_class))
            chosen.append(index)
        if len(chosen) == count:
            return chosen
    raise DemoError(f"the phantom cohort has fewer than {count} gene-module classes")


# --- figures --------------------------------------------------------------------------------------------
def _crop(volume: np.ndarray, geometry: Any, centre: np.ndarray, k: int, size_px: int = 96) -> np.ndarray:
    from RadiogenomicGANLib.patches import extract_patch

    return extract_patch(volume.astype(np.float32), geometry, centre, k, size_px, CROP_MM / size_px, order=1,
                         fill=0.0)


def _coronal_crop(volume: np.ndarray, geometry: Any, centre: np.ndarray) -> np.ndarray:
    """The CROP_MM-wide coronal section through `centre` (rows: slices k, superior up with origin='lower';
    columns: i), in voxels — shown with aspect spacing_k / spacing_i."""
    kji = np.rint(geometry.ras_to_kji([centre])[0]).astype(int)
    spacing = np.asarray(geometry.spacing_kji, dtype=np.float64)
    half_k, half_i = (int(CROP_MM / 2 / spacing[axis]) for axis in (0, 2))
    j = int(np.clip(kji[1], 0, volume.shape[1] - 1))
    ks = slice(max(0, kji[0] - half_k), min(volume.shape[0], kji[0] + half_k + 1))
    columns = slice(max(0, kji[2] - half_i), min(volume.shape[2], kji[2] + half_i + 1))
    return volume[ks, j, columns].astype(np.float32)


def draw_panel(path: Path, background: np.ndarray, geometry: Any, lung: np.ndarray, centre: np.ndarray, k: int,
               results: list[Any], donors: list[Donor], title: str) -> None:
    """Rows: CT crops (background, three donors), nodule masks, fusion weight maps, a coronal section through
    the centre (the nodule's extent across slices); plus the full slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    columns = 1 + len(results)
    figure, axes = plt.subplots(4, columns + 1, figsize=(3.0 * (columns + 1), 12.8), layout="constrained")
    low, high = DISPLAY_WINDOW
    full = axes[0, 0]
    full.imshow(background[k], cmap="gray", vmin=low, vmax=high)
    kji = geometry.ras_to_kji([centre])[0]
    half_vox = CROP_MM / 2 / geometry.spacing[:2]
    full.add_patch(Rectangle((kji[2] - half_vox[0], kji[1] - half_vox[1]), 2 * half_vox[0], 2 * half_vox[1],
                             fill=False, edgecolor="orange", linewidth=1.2))
    full.set_title(f"phantom CT, slice {k}\n(box = the crops)", fontsize=9)
    axes[1, 0].imshow(lung[k], cmap="Blues")
    axes[1, 0].set_title("lung mask (placement region)", fontsize=9)
    axes[2, 0].axis("off")
    axes[2, 0].text(0.0, 0.5, title, fontsize=8, va="center", transform=axes[2, 0].transAxes)
    axes[3, 0].axis("off")
    aspect = float(geometry.spacing_kji[0] / geometry.spacing_kji[2])
    crops = [_crop(background, geometry, centre, k)] + [_crop(r.volume_hu, geometry, centre, k) for r in results]
    labels = [None] + [_crop((r.label > 0).astype(np.float32), geometry, centre, k) for r in results]
    weights = [None] + [_crop(r.weight_map, geometry, centre, k) if r.weight_map is not None else None
                        for r in results]
    names = ["background"] + [f"{d.sample_id} (class {d.module_class})" for d in donors]
    for column in range(columns):
        ax_ct, ax_mask, ax_w = axes[0, column + 1], axes[1, column + 1], axes[2, column + 1]
        ax_ct.imshow(crops[column], cmap="gray", vmin=low, vmax=high)
        ax_ct.set_title(names[column], fontsize=9)
        ax_mask.imshow(crops[column], cmap="gray", vmin=low, vmax=high)
        if labels[column] is not None:
            ax_mask.contour(labels[column], levels=[0.5], colors=["orange"], linewidths=1.0)
            ax_mask.set_title("synthetic nodule label", fontsize=9)
        else:
            ax_mask.set_title("(no nodule)", fontsize=9)
        if weights[column] is not None:
            shown = ax_w.imshow(weights[column], cmap="magma", vmin=0.0, vmax=1.0)
            ax_w.set_title("fusion weight map W", fontsize=9)
        else:
            ax_w.imshow(np.zeros_like(crops[column]), cmap="magma", vmin=0.0, vmax=1.0)
            ax_w.set_title("(no weight map)", fontsize=9)
        ax_cor = axes[3, column + 1]
        volume = background if column == 0 else results[column - 1].volume_hu
        ax_cor.imshow(_coronal_crop(volume, geometry, centre), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                      origin="lower")
        if column:
            coronal_label = _coronal_crop((results[column - 1].label > 0).astype(np.float32), geometry, centre)
            if coronal_label.any():
                ax_cor.contour(coronal_label, levels=[0.5], colors=["orange"], linewidths=1.0)
        ax_cor.set_title("coronal, through the centre", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    if any(w is not None for w in weights):
        figure.colorbar(shown, ax=axes[2, -1], shrink=0.9, label="W")
    figure.suptitle(f"RadiogenomicGAN demo — {CROP_MM:.0f} mm crops, patient left on the right of each crop "
                    "(radiological view)", fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_map(path: Path, codes: np.ndarray, classes: np.ndarray, ids: list[str], donors: list[int],
             title: str) -> None:
    """t-SNE of φ(g) for the cohort, coloured by true module class, donors highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from RadiogenomicGANLib.radiogenomic_map import embed_2d

    embedded = embed_2d(codes, seed=0)
    figure, axis = plt.subplots(figsize=(6.4, 5.6))
    for module_class in np.unique(classes):
        chosen = classes == module_class
        axis.scatter(embedded[chosen, 0], embedded[chosen, 1], s=22, alpha=0.75, label=f"class {module_class}")
    for index in donors:
        axis.scatter(embedded[index, 0], embedded[index, 1], s=220, facecolors="none", edgecolors="black",
                     linewidths=2.0)
        axis.annotate(ids[index], embedded[index], textcoords="offset points", xytext=(8, 8), fontsize=9,
                      weight="bold")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("t-SNE 1")
    axis.set_ylabel("t-SNE 2")
    axis.legend(title="true module class", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the job --------------------------------------------------------------------------------------------
def run(out: Path, *, weights: Path | None = None, random_model: bool = False, cohort_seed: int | None = None,
        cohort_size: int = 48, nodules: int = 1, half_slices: int | None = None, seed: int = 0, size: int = 256,
        device: str = "auto") -> dict[str, Path]:
    """Run the demo into `out`; returns the written files by role. `half_slices` None (default): each nodule
    gets the slices its size spans."""
    import torch

    from RadiogenomicGANLib import genes as gene_io
    from RadiogenomicGANLib import volume_io
    from RadiogenomicGANLib.phantom import generate_patient
    from RadiogenomicGANLib.phantom.writers import write_geo_table

    started = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    inserter, model_text = load_model(weights, random_model, device)
    provenance = inserter.metadata.provenance if inserter is not None else {}
    seed_cohort = int(cohort_seed if cohort_seed is not None else int(provenance.get("phantom_seed", 0)) + 1)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    warning = ""
    if random_model:
        warning = "UNTRAINED RANDOM MODEL — nodules and map are meaningless"
        print(f"\n{'!' * 78}\nWARNING: {warning}.\nThis mode only exercises the pipeline. "
              f"Use the bundled model (drop --random-model).\n{'!' * 78}\n", file=sys.stderr)

    # 1. the phantom gene table (cohort) and the donors
    # One biology for every seed: the gene names depend on the gene count alone (5172 unless recorded).
    n_genes = int(provenance.get("phantom_genes", 5172))
    gene_names, ids, fpkm, classes = cohort_genes(seed_cohort, cohort_size, n_genes)
    table_path = out / "phantom_genes.txt"
    write_geo_table(table_path, gene_names, ids, fpkm)
    written["gene table"] = table_path
    table = gene_io.read_gene_table(table_path)
    if inserter is None:
        complete = [g for g, row in zip(gene_names, fpkm) if np.isfinite(row).all() and not g.startswith("_")]
        inserter = random_inserter(complete, device)
    metadata = inserter.metadata
    present = len(set(metadata.gene_names) & set(gene_names))
    if present < 0.9 * len(metadata.gene_names):
        raise DemoError(
            f"only {present} of the model's {len(metadata.gene_names)} genes are in the phantom gene table of "
            f"{n_genes} genes; the model was trained on another gene panel than the phantom biology (record "
            "phantom_genes in its provenance)"
        )
    donors_index = pick_donors(ids, classes)
    donors = [
        Donor(ids[i], int(classes[i]), gene_io.profile_for_model(
            table, ids[i], metadata.genes, impute=True))
        for i in donors_index
    ]
    print(f"model: {model_text}; cohort seed {seed_cohort}, donors "
          + ", ".join(f"{d.sample_id} (class {d.module_class})" for d in donors))

    # 2. the CT (a patient outside the cohort), written as NRRD
    patient = generate_patient(cohort_size + CT_PATIENT_OFFSET, seed_cohort + CT_SEED_OFFSET, size_ij=size,
                               n_genes=CT_GENES)
    volume, geometry = patient.volume_hu, patient.geometry
    ct_path = volume_io.write_volume(out / "phantom_ct.nrrd", volume, geometry)
    written["phantom CT"] = ct_path

    # 3. placement: automatic, in the lung, away from the phantom's own nodule; the same for every donor
    lung = inserter.lung_mask(volume, geometry)
    placement_lung = lung_away_from_own_nodule(lung, patient)
    first = inserter.insert(volume, geometry, donors[0].profile, auto_count=nodules, half_slices=half_slices,
                            seed=seed, lung_mask=placement_lung, return_weight_map=True,
                            gene_sample=donors[0].sample_id)
    centres, slices = first.centres_ras, first.slices

    # 4. one result per donor
    results = [first]
    for donor in donors[1:]:
        # the same centres; the slices fitted to this donor's own nodule, or the first donor's ±K
        donor_slices = [None] * len(centres) if half_slices is None else slices
        results.append(inserter.insert(volume, geometry, donor.profile, centres, slices=donor_slices, seed=seed,
                                       lung_mask=lung, return_weight_map=True,
                                       gene_sample=donor.sample_id))
    for donor, result in zip(donors, results):
        stem = f"nodule_{donor.sample_id}"
        metadata_text = {"RadiogenomicGAN_Synthetic": "true", "RadiogenomicGAN_GeneSample": donor.sample_id}
        written[f"{donor.sample_id} CT"] = volume_io.write_volume(out / f"{stem}.nrrd", result.volume_hu, geometry,
                                                                  metadata=metadata_text)
        segments = nodule_segments(len(centres), result.provenance)
        written[f"{donor.sample_id} segmentation"] = volume_io.write_segmentation(
            out / f"{stem}.seg.nrrd", result.label, geometry, segments)
        if result.weight_map is not None:
            written[f"{donor.sample_id} weight map"] = volume_io.write_volume(
                out / f"{stem}_weightmap.nrrd", result.weight_map, geometry)

    # 5. figures
    k = int(np.rint(geometry.ras_to_kji(centres[:1])[0, 0]))
    spans = "slices fitted to each nodule: " + ", ".join(str(len(r.slices[0])) for r in results) \
        if half_slices is None else f"{len(slices[0])} slices per nodule"
    title = "\n".join([
        "model:", *textwrap.wrap(model_text, 34), f"seed {seed}", *textwrap.wrap(spans, 34),
        f"centre RAS ({centres[0][0]:.0f}, {centres[0][1]:.0f}, {centres[0][2]:.0f}) mm",
        *textwrap.wrap(warning, 34),
    ])
    panel = out / "demo_panel.png"
    draw_panel(panel, volume, geometry, lung, centres[0], k, results, donors, title)
    written["panel"] = panel
    codes = _gene_codes(inserter, table, ids, metadata)
    if codes is not None:
        radiomap = out / "radiogenomic_map.png"
        map_title = f"Radiogenomic map: t-SNE of φ(g), phantom cohort ({len(ids)} patients)" + (
            f"\n{warning}" if warning else "")
        draw_map(radiomap, codes, classes, ids, donors_index, map_title)
        written["radiogenomic map"] = radiomap
    print(f"\nDemo finished in {time.perf_counter() - started:.1f} s. Files in {out}/:")
    for role, path in written.items():
        print(f"  {role:<26} {path}")
    print("Open the CTs with their .seg.nrrd in 3D Slicer (drag and drop) to browse the synthetic nodules.")
    return written


def _gene_codes(inserter: Any, table: Any, ids: list[str], metadata: Any) -> np.ndarray | None:
    """φ(g) of every cohort patient (None for the inpainting baseline, which has no gene code)."""
    import torch

    from RadiogenomicGANLib import genes as gene_io

    encode = getattr(inserter.generator, "encode_genes", None)
    if encode is None:
        return None
    profiles = np.stack([
        gene_io.profile_for_model(table, sample, metadata.genes, impute=True)
        for sample in ids
    ])
    with torch.no_grad():
        return encode(torch.from_numpy(profiles).to(inserter.device)).float().cpu().numpy()


def _half_slices(text: str) -> int | None:
    """'auto' (the slice syntax's FIT_TO_SIZE) → None (fitted to each nodule's size), else an integer K."""
    from RadiogenomicGANLib.request import FIT_TO_SIZE

    if text.strip().lower() == FIT_TO_SIZE:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer K or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m RadiogenomicGANLib.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (demo_output)")
    parser.add_argument("--weights", type=Path, default=None, help="weights (default: the bundled demo model)")
    parser.add_argument("--random-model", action="store_true",
                        help="DEVELOPMENT ONLY: an untrained network instead of the bundled model")
    parser.add_argument("--cohort-seed", type=int, default=None,
                        help="phantom cohort seed of the donors (default: the training cohort's seed + 1, a cohort the "
                        "model never saw)")
    parser.add_argument("--nodules", type=int, default=1, help="nodules per CT (default 1)")
    parser.add_argument("--half-slices", type=_half_slices, default=None, metavar="K|auto",
                        help="±K slices per nodule; default 'auto': the slices each nodule's size spans")
    parser.add_argument("--seed", type=int, default=0, help="placement and noise seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane matrix (default 256)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if not 1 <= args.nodules <= MAX_NODULES:
        parser.error(f"--nodules must be between 1 and {MAX_NODULES}")
    if args.half_slices is not None and not 0 <= args.half_slices <= MAX_HALF_SLICES:
        parser.error(f"--half-slices must be between 0 and {MAX_HALF_SLICES}")
    if not SIZE_RANGE[0] <= args.size <= SIZE_RANGE[1]:
        parser.error(f"--size must be between {SIZE_RANGE[0]} and {SIZE_RANGE[1]}")
    from RadiogenomicGANLib.cli_common import check_output_folder, run_cli
    from RadiogenomicGANLib.devices import DeviceError
    from RadiogenomicGANLib.genes import GeneTableError
    from RadiogenomicGANLib.insertion import InsertionError
    from RadiogenomicGANLib.volume_io import VolumeIOError
    from RadiogenomicGANLib.weights import WeightsError

    def body() -> int:
        check_output_folder(args.out, create=False)
        run(args.out, weights=args.weights, random_model=args.random_model, cohort_seed=args.cohort_seed,
            nodules=args.nodules, half_slices=args.half_slices, seed=args.seed, size=args.size, device=args.device)
        return 0

    return run_cli(body, (DemoError, InsertionError, DeviceError, GeneTableError, VolumeIOError, WeightsError))


if __name__ == "__main__":
    raise SystemExit(main())
