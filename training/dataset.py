"""The dataset file written by `python -m training.prepare`, and the training batches drawn from it.

One `.npz` (no pickles) holds every patch, the gene matrix and the split, so training, evaluation and the
radiogenomic map all read the same, validated arrays. Keys (see interfaces.md, "Dataset file"):

- `format_version`, `patch_size`, `patch_spacing_mm`, `hu_window`
- `nodule_images` (N,S,S) float32 [-1,1], `nodule_masks` (N,S,S) uint8, `nodule_patient`, `nodule_slice`,
  `nodule_centre_ras` — one row per axial slice with nodule present
- `background_images` (M,S,S), `background_patient`, `background_slice`, `background_centre_ras` — nodule-free
  lung patches (the generator's input)
- `patient_ids` (P,), `patient_spacing` (P,3) (i,j,k mm), `split` (P,) in {train,val,test}
- `genes` (P,D): the generator's gene input, prepared by the gene preprocessing fitted on the TRAIN patients
  (`RadiogenomicGANLib.genes.GenePreprocessing`): `gene_names` (G,), `gene_means`, `gene_stds` (G,),
  `gene_clip` (), `gene_components` (K,G) (K = 0: no projection, D = G; else D = K); optional
  `gene_out_of_sample_gain` () (default 1), applied to every patient but those the projection was fitted on;
  optional `gene_fitted_scores` (N,K): those patients' whitened scores, by which a weights file recognises them
- `table_gene_names` (T,), `table_genes_log` (P,T): log2(x+1) of every complete gene of the table, so another
  model's preprocessing (or a refit) can be applied to the same patients

Determinism (so a resumed run sees the same data): `NoduleBatchDataset` draws its random pairings (background,
wrong genes, wrong mask) from a generator seeded by `(seed, epoch, index)`, never from global state. The
training loop shuffles with a sampler seeded from `(seed, epoch)` — `epoch_permutation(n, seed, epoch)` here, or
`DistributedSampler(seed=seed)` + `set_epoch(epoch)` — and calls `dataset.set_epoch(epoch)` every epoch. Resuming
at (epoch, step) then reproduces exactly the batches an uninterrupted run would have seen, whatever the number
of DataLoader workers.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from RadiogenomicGANLib.atomic import atomic_path
from RadiogenomicGANLib.genes import GenePreprocessing, out_of_sample_gain_problem
from RadiogenomicGANLib.intensity import HU_WINDOW

if TYPE_CHECKING:
    from .config import TrainConfig

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")

REQUIRED_KEYS = (
    "format_version",
    "patch_size",
    "patch_spacing_mm",
    "hu_window",
    "nodule_images",
    "nodule_masks",
    "nodule_patient",
    "nodule_slice",
    "nodule_centre_ras",
    "background_images",
    "background_patient",
    "background_slice",
    "background_centre_ras",
    "patient_ids",
    "patient_spacing",
    "split",
    "genes",
    "gene_names",
    "gene_means",
    "gene_stds",
    "gene_clip",
    "gene_components",
    "table_gene_names",
    "table_genes_log",
)

_DTYPES: dict[str, type] = {
    "nodule_images": np.float32,
    "nodule_masks": np.uint8,
    "nodule_patient": np.int32,
    "nodule_slice": np.int32,
    "nodule_centre_ras": np.float32,
    "background_images": np.float32,
    "background_patient": np.int32,
    "background_slice": np.int32,
    "background_centre_ras": np.float32,
    "patient_spacing": np.float32,
    "genes": np.float32,
    "gene_means": np.float32,
    "gene_stds": np.float32,
    "gene_clip": np.float64,
    "gene_components": np.float32,
    "table_genes_log": np.float32,
    "hu_window": np.float32,
}


class DatasetError(ValueError):
    """A dataset file that is missing, unreadable or inconsistent; the message says which and how to fix it."""


@dataclass
class RadiogenomicDataset:
    """All arrays of one dataset file, validated, with the look-ups training and evaluation need."""

    patch_size: int
    patch_spacing_mm: float
    hu_window: np.ndarray
    nodule_images: np.ndarray
    nodule_masks: np.ndarray
    nodule_patient: np.ndarray
    nodule_slice: np.ndarray
    nodule_centre_ras: np.ndarray
    background_images: np.ndarray
    background_patient: np.ndarray
    background_slice: np.ndarray
    background_centre_ras: np.ndarray
    patient_ids: np.ndarray
    patient_spacing: np.ndarray
    split: np.ndarray
    genes: np.ndarray
    gene_names: np.ndarray
    gene_means: np.ndarray
    gene_stds: np.ndarray
    gene_clip: np.ndarray
    gene_components: np.ndarray
    table_gene_names: np.ndarray
    table_genes_log: np.ndarray
    format_version: int = FORMAT_VERSION
    source: str = ""

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def num_patients(self) -> int:
        return int(self.patient_ids.shape[0])

    @property
    def num_genes(self) -> int:
        return int(self.genes.shape[1])

    gene_fit: str = "{}"  # JSON: what the fit kept and dropped (GenePreprocessing.fitted_on); optional key
    gene_out_of_sample_gain: float = 1.0  # GenePreprocessing.out_of_sample_gain; optional key
    gene_fitted_scores: np.ndarray | None = None  # GenePreprocessing.fitted_scores; optional key

    @property
    def gene_preprocessing(self) -> GenePreprocessing:
        """The preprocessing that made `genes` (fitted on the train patients by training.prepare)."""
        return GenePreprocessing(self.gene_names.tolist(), self.gene_means, self.gene_stds, float(self.gene_clip),
                                 self.gene_components if self.gene_components.shape[0] else None,
                                 json.loads(self.gene_fit), self.gene_out_of_sample_gain, self.gene_fitted_scores)

    def genes_for(self, preprocessing: GenePreprocessing) -> np.ndarray:
        """(P, D) every patient's genes prepared by another (e.g. a model's) preprocessing, aligned by name."""
        return gene_arrays(preprocessing, self.table_gene_names.tolist(), self.table_genes_log)["genes"]

    def with_gene_preprocessing(self, preprocessing: GenePreprocessing,
                                fitted_on: np.ndarray | None = None) -> RadiogenomicDataset:
        """A copy whose `genes` (and stored preprocessing) come from `preprocessing`; `fitted_on` (patient
        indices) are the patients it was fitted on, prepared without the out-of-sample gain."""
        from dataclasses import replace

        return replace(self, **gene_arrays(preprocessing, self.table_gene_names.tolist(), self.table_genes_log,
                                           fitted_on))

    @property
    def num_nodules(self) -> int:
        return int(self.nodule_images.shape[0])

    @property
    def num_backgrounds(self) -> int:
        return int(self.background_images.shape[0])

    def nodule_position(self) -> np.ndarray:
        """(N,) float32: where each nodule slice lies within its patient's nodule, t = (k − centre) / half
        extent, the centre the middle of the patient's nodule slices and the half extent half their count —
        so ±1 lies just beyond the outer slices, where the nodule ends, and a one-slice nodule is at 0. What a
        `slice_position` generator is given with each real slice. (One extent per patient: the cohorts hold
        one nodule each.)"""
        position = np.zeros(self.num_nodules, dtype=np.float32)
        slices = self.nodule_slice.astype(np.float64)
        for patient in np.unique(self.nodule_patient):
            rows = self.nodule_patient == patient
            low, high = slices[rows].min(), slices[rows].max()
            position[rows] = (slices[rows] - (low + high) / 2) / ((high - low + 1) / 2)
        return position

    # --- split look-ups ------------------------------------------------------------------------------------
    def patients_in(self, split: str | Sequence[str]) -> np.ndarray:
        """Patient indices of one split (or several), ascending."""
        names = [split] if isinstance(split, str) else list(split)
        for name in names:
            if name not in SPLITS:
                raise DatasetError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(np.isin(self.split, names))

    def nodule_indices(self, split: str | Sequence[str]) -> np.ndarray:
        """Nodule-sample indices whose patient is in `split`."""
        return np.flatnonzero(np.isin(self.nodule_patient, self.patients_in(split)))

    def background_indices(self, split: str | Sequence[str]) -> np.ndarray:
        """Background-sample indices whose patient is in `split`."""
        return np.flatnonzero(np.isin(self.background_patient, self.patients_in(split)))

    def patient_index(self, patient_id: str) -> int:
        matches = np.flatnonzero(self.patient_ids == patient_id)
        if matches.size == 0:
            known = ", ".join(map(str, self.patient_ids[:5]))
            raise DatasetError(f"patient {patient_id!r} is not in the dataset (e.g. {known})")
        return int(matches[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Every key of the file format, ready for `write_dataset`."""
        optional = {} if self.gene_fitted_scores is None else {"gene_fitted_scores": self.gene_fitted_scores}
        return {**{key: np.asarray(getattr(self, key)) for key in REQUIRED_KEYS}, "gene_fit": np.asarray(self.gene_fit),
                "gene_out_of_sample_gain": np.float64(self.gene_out_of_sample_gain), **optional}

    def summary(self) -> str:
        """One line per split: patients, nodule slices, background slices."""
        lines = [f"{self.num_patients} patients, {self.num_genes} genes, patch {self.patch_size}px"]
        for name in SPLITS:
            lines.append(
                f"  {name:5s}: {self.patients_in(name).size} patients, {self.nodule_indices(name).size} nodule "
                f"slices, {self.background_indices(name).size} background slices"
            )
        return "\n".join(lines)


# --- validation ----------------------------------------------------------------------------------------------


def _validate(arrays: dict[str, np.ndarray], source: str) -> RadiogenomicDataset:
    """Check keys, split and shapes; every failure is one DatasetError naming the file and the problem."""
    where = f"dataset file {source}" if source else "dataset"
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if "split" in missing:
        raise DatasetError(
            f"{where} has no train/val/test split (key 'split' missing); re-create it with python -m training.prepare"
        )
    if missing:
        raise DatasetError(f"{where} is missing keys: {', '.join(missing)}; re-create it with training.prepare")

    version = int(np.asarray(arrays["format_version"]))
    if version == 1:
        raise DatasetError(f"{where} was written by an older training.prepare (format 1: plain gene z-scores, "
                           "no expression filter or clip); run python -m training.prepare again")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{where} has format_version {version}; this code reads version {FORMAT_VERSION}")

    a = {key: np.asarray(arrays[key]) for key in REQUIRED_KEYS}
    for key in ("patient_ids", "split", "gene_names", "table_gene_names"):
        if a[key].dtype.kind not in "U":
            raise DatasetError(f"{where}: '{key}' must be an array of strings, got dtype {a[key].dtype}")
        a[key] = a[key].astype(str)
    size = int(a["patch_size"])
    patients = a["patient_ids"].shape[0]

    def fail(message: str) -> None:
        raise DatasetError(f"{where} is inconsistent: {message}")

    if a["split"].shape != (patients,):
        fail(f"'split' has shape {a['split'].shape}, expected ({patients},) — one entry per patient")
    bad = sorted(set(a["split"].tolist()) - set(SPLITS))
    if bad:
        fail(f"'split' holds {bad}; allowed values are {', '.join(SPLITS)}")
    if not np.any(a["split"] == "train"):
        raise DatasetError(f"{where} has no train patients in its split")
    if len(set(a["patient_ids"].tolist())) != patients:
        fail("'patient_ids' has duplicates, so a patient could sit in two splits")

    for prefix in ("nodule", "background"):
        images = a[f"{prefix}_images"]
        if images.ndim != 3 or images.shape[1:] != (size, size):
            fail(f"'{prefix}_images' has shape {images.shape}, expected (N, {size}, {size})")
        count = images.shape[0]
        for key, shape in (
            (f"{prefix}_patient", (count,)),
            (f"{prefix}_slice", (count,)),
            (f"{prefix}_centre_ras", (count, 3)),
        ):
            if a[key].shape != shape:
                fail(f"'{key}' has shape {a[key].shape}, expected {shape} to match '{prefix}_images'")
        owners = a[f"{prefix}_patient"]
        if owners.size and (owners.min() < 0 or owners.max() >= patients):
            fail(f"'{prefix}_patient' refers to patients outside 0…{patients - 1}")
    if a["nodule_masks"].shape != a["nodule_images"].shape:
        fail(f"'nodule_masks' has shape {a['nodule_masks'].shape}, expected {a['nodule_images'].shape}")
    if a["nodule_images"].shape[0] == 0:
        raise DatasetError(f"{where} holds no nodule slices")
    if a["background_images"].shape[0] == 0:
        raise DatasetError(f"{where} holds no background slices")
    if a["patient_spacing"].shape != (patients, 3):
        fail(f"'patient_spacing' has shape {a['patient_spacing'].shape}, expected ({patients}, 3)")
    if a["genes"].ndim != 2 or a["genes"].shape[0] != patients:
        fail(f"'genes' has shape {a['genes'].shape}, expected ({patients}, G)")
    genes = a["gene_names"].shape[0]
    for key in ("gene_means", "gene_stds"):
        if a[key].shape != (genes,):
            fail(f"'{key}' has shape {a[key].shape}, expected ({genes},) to match 'gene_names'")
    components = a["gene_components"]
    if components.ndim != 2 or components.shape[1] != genes:
        fail(f"'gene_components' has shape {components.shape}, expected (K, {genes})")
    inputs = components.shape[0] or genes
    if a["genes"].shape[1] != inputs:
        fail(f"'genes' has {a['genes'].shape[1]} columns, but the gene preprocessing gives {inputs}")
    if a["table_genes_log"].shape != (patients, a["table_gene_names"].shape[0]):
        fail(f"'table_genes_log' has shape {a['table_genes_log'].shape}, expected ({patients}, "
             f"{a['table_gene_names'].shape[0]}) — one row per patient, one column per table gene")
    if a["hu_window"].shape != (2,):
        fail(f"'hu_window' has shape {a['hu_window'].shape}, expected (2,)")
    if not np.all(np.isfinite(a["genes"])):
        fail("'genes' holds NaN or infinite values")
    gain = float(np.asarray(arrays.get("gene_out_of_sample_gain", 1.0)))
    if problem := out_of_sample_gain_problem(gain):
        fail(f"'gene_out_of_sample_gain' {problem}")
    fitted_scores = arrays.get("gene_fitted_scores")
    if fitted_scores is not None:
        fitted_scores = np.asarray(fitted_scores, dtype=np.float32)
        if fitted_scores.ndim != 2 or fitted_scores.shape[1] != components.shape[0] or not components.shape[0]:
            fail(f"'gene_fitted_scores' has shape {fitted_scores.shape}, expected (N, {components.shape[0]}) with "
                 "a projection ('gene_components')")

    for key, dtype in _DTYPES.items():
        a[key] = a[key].astype(dtype, copy=False)
    return RadiogenomicDataset(
        patch_size=size,
        patch_spacing_mm=float(a["patch_spacing_mm"]),
        format_version=version,
        source=source,
        gene_fit=str(np.asarray(arrays.get("gene_fit", "{}"))),
        gene_out_of_sample_gain=gain,
        gene_fitted_scores=fitted_scores,
        **{key: a[key] for key in REQUIRED_KEYS if key not in ("patch_size", "patch_spacing_mm", "format_version")},
    )


# --- file I/O ------------------------------------------------------------------------------------------------


def write_dataset(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Validate and write the arrays as one compressed `.npz` (atomically: a crash never leaves half a file).

    `format_version`, `hu_window`, and `patch_spacing_mm` default to this code's values when not given.
    """
    arrays = dict(arrays)
    arrays.setdefault("format_version", np.int64(FORMAT_VERSION))
    arrays.setdefault("hu_window", np.asarray(HU_WINDOW, dtype=np.float32))
    arrays.setdefault("patch_spacing_mm", np.float64(60.0 / int(np.asarray(arrays.get("patch_size", 64)))))
    dataset = _validate(arrays, "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: np.asarray(value) for key, value in dataset.arrays().items()}
    payload["format_version"] = np.int64(dataset.format_version)
    payload["patch_size"] = np.int64(dataset.patch_size)
    payload["patch_spacing_mm"] = np.float64(dataset.patch_spacing_mm)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, **payload)  # a stream: numpy would append ".npz" to a bare name
    return path


def load_dataset(path: str | os.PathLike) -> RadiogenomicDataset:
    """Read and validate a dataset file (never unpickles); raises DatasetError with a clear message."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path} (create it with python -m training.prepare)")
    if path.is_dir():
        raise DatasetError(f"dataset path {path} is a folder; pass the .npz file written by training.prepare")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path} is not a dataset file (.npz written by training.prepare)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path} could not be read as a dataset file: {error}") from error
    return _validate(arrays, str(path))


def training_data(cfg: TrainConfig) -> RadiogenomicDataset:
    """The dataset as a run trains on it: with `gene_components` / `gene_top_variance`, the gene
    preprocessing is refitted on the train patients (the exported weights carry that refit). The export CLI
    calls it too, so an earlier checkpoint is exported with the refit its run used."""
    data = load_dataset(cfg.data)
    if cfg.gene_components or cfg.gene_top_variance:
        train = data.patients_in("train")
        refit = GenePreprocessing.fit(data.table_genes_log[train], data.table_gene_names.tolist(),
                                      top_variance=cfg.gene_top_variance, components=cfg.gene_components,
                                      out_of_sample_gain=cfg.gene_out_of_sample_gain)
        data = data.with_gene_preprocessing(refit, fitted_on=train)
    return data


# --- training batches ----------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch, a pure function of (seed, epoch) — what a resumed run must replay."""
    return np.random.default_rng([int(seed), int(epoch), 0x5A17]).permutation(n)


def square_symmetry(patch: torch.Tensor, which: int) -> torch.Tensor:
    """One of the 8 symmetries of the square applied to the last two axes: `which` // 2 quarter turns, then a
    left-right flip when `which` is odd (0 = unchanged)."""
    turned = torch.rot90(patch, which // 2, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if which % 2 else turned.contiguous()


class NoduleBatchDataset(Dataset):
    """Training tuples of one split, per the batch contract (interfaces.md, "Training batch contract").

    Item `index` is the `index`-th nodule slice of the split; the default collate stacks items into a batch
    of `image` (1,S,S), `mask` (1,S,S) {0,1}, `genes` (G,), `background` (1,S,S) — a random background patch of
    the SAME split, `wrong_genes` (G,) — genes of another patient, `wrong_mask` (1,S,S) — the mask of a nodule
    slice of another patient (of the same split when it has one), `patient` int64, `position` () float32 — the
    slice's place within its nodule (`RadiogenomicDataset.nodule_position`). The random choices come from
    `numpy.random.default_rng((seed, epoch, index))`, so they are reproducible and worker-independent.

    `uniform_donors`: item `index` is instead a slice of a donor drawn uniformly (then one of its slices), so a
    patient with 40 nodule slices is not seen 10× as often as one with 4 — the gene map is learned per patient,
    not per slice. `distant_wrong_genes`: ḡ comes from the farther half of the other patients (Euclidean
    distance of the gene vectors), so "wrong genes" are clearly wrong rather than a near-twin's.
    `match_backgrounds`: the background paired with a nodule slice is drawn among the `match_share` (10 %) of
    the split's backgrounds whose share of chest wall (`surroundings.wall_fraction`) is nearest that slice's, instead of
    from all of them: the paper's backgrounds lie near the pleura and real nodules in open lung, so D_I could
    reject every generated patch by its wall alone and push G to erase the wall. With `match_texture` the pool
    is the backgrounds nearest in wall share and in the surroundings' texture together
    (`surroundings.texture_pair`: dense share, high-passed sd; each in units of its spread,
    `surroundings.match_surroundings`):
    without the wall the backgrounds' lung near the pleura still holds more vessels and texture than the lung
    around the phantom's nodules, and D_I can tell the two by it.
    `augment`: each drawn patch — the nodule slice with its mask, the background, the wrong mask — is turned by
    one of the 8 flips and quarter turns of the square, drawn independently (image and mask together), so the
    discriminator of a small cohort sees 8× as many distinct real patches. Axial lung patches have no upright.
    `phenotype_features`: each item also carries `phenotype` (F,) — the donor's real nodule measured by these
    `metrics.nodule_features` (over all its slices of the split, as the evaluation measures a real nodule),
    z-scored over the split's donors (an unmeasurable value, e.g. the margin of a tiny nodule, becomes 0, the
    mean). It is the target of the loss's code-phenotype term (`losses.LossWeights.code_phenotype`).
    """

    def __init__(self, data: RadiogenomicDataset, split: str | Sequence[str] = "train", seed: int = 0, *,
                 uniform_donors: bool = False, distant_wrong_genes: bool = False, augment: bool = False,
                 match_backgrounds: bool = False, match_share: float = 0.1, match_texture: bool = False,
                 phenotype_features: Sequence[str] = ()) -> None:
        self.data = data
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        self.uniform_donors = bool(uniform_donors)
        self.augment = bool(augment)
        self.nodules = data.nodule_indices(split)
        self.backgrounds = data.background_indices(split)
        if self.nodules.size == 0:
            raise DatasetError(f"split {split!r} holds no nodule slices")
        if self.backgrounds.size == 0:
            raise DatasetError(f"split {split!r} holds no background slices")
        if data.num_patients < 2:
            raise DatasetError("wrong-gene pairs need at least two patients in the dataset")
        patients = data.patients_in(split)
        # Wrong genes: another patient of the split, or of the whole dataset when the split holds only one.
        self._gene_pool = patients if patients.size >= 2 else np.arange(data.num_patients)
        self._wrong_pool: dict[int, np.ndarray] = {}
        for patient in np.unique(data.nodule_patient[self.nodules]):
            others = self._gene_pool[self._gene_pool != patient]
            if distant_wrong_genes and others.size >= 2:
                distance = np.linalg.norm(data.genes[others] - data.genes[patient], axis=1)
                others = others[distance >= np.median(distance)]
            self._wrong_pool[int(patient)] = others
        self._matched_pool = self._matched_backgrounds(match_share, match_texture) if match_backgrounds else None
        # Wrong masks: nodule slices of the split by patient, for "another patient" draws.
        self._patients_with_nodules = np.unique(data.nodule_patient[self.nodules])
        self._images = torch.from_numpy(np.ascontiguousarray(data.nodule_images[:, None]))
        self._masks = torch.from_numpy(np.ascontiguousarray(data.nodule_masks[:, None].astype(np.float32)))
        self._backgrounds = torch.from_numpy(np.ascontiguousarray(data.background_images[:, None]))
        self._genes = torch.from_numpy(np.ascontiguousarray(data.genes))
        self._positions = torch.from_numpy(data.nodule_position())
        self._phenotypes = donor_phenotypes(data, self._patients_with_nodules, phenotype_features) \
            if phenotype_features else None

    def set_epoch(self, epoch: int) -> None:
        """Change the pairings drawn for every item (call once per epoch, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.nodules.size)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0…{len(self) - 1}")
        rng = self._rng(index)
        if self.uniform_donors:
            donor = self._patients_with_nodules[rng.integers(self._patients_with_nodules.size)]
            slices = self.nodules[self.data.nodule_patient[self.nodules] == donor]
            sample = int(slices[rng.integers(slices.size)])
        else:
            sample = int(self.nodules[index])
        patient = int(self.data.nodule_patient[sample])
        pool = self.backgrounds if self._matched_pool is None else self._matched_pool[sample]
        background = int(pool[rng.integers(pool.size)])
        others = self._wrong_pool[patient]
        wrong_patient = int(others[rng.integers(others.size)])
        wrong_mask = self._draw_wrong_mask(rng, sample, patient)
        item = {
            "image": self._images[sample],
            "mask": self._masks[sample],
            "genes": self._genes[patient],
            "background": self._backgrounds[background],
            "wrong_genes": self._genes[wrong_patient],
            "wrong_mask": self._masks[wrong_mask],
            "patient": torch.tensor(patient, dtype=torch.int64),
            "position": self._positions[sample],
        }
        if self._phenotypes is not None:
            item["phenotype"] = self._phenotypes[patient]
        if self.augment:  # drawn after every other choice, so runs without it keep their exact draws
            nodule_turn, background_turn, wrong_turn = (int(t) for t in rng.integers(8, size=3))
            item["image"], item["mask"] = (square_symmetry(item[k], nodule_turn) for k in ("image", "mask"))
            item["background"] = square_symmetry(item["background"], background_turn)
            item["wrong_mask"] = square_symmetry(item["wrong_mask"], wrong_turn)
        return item

    def _matched_backgrounds(self, share: float, texture: bool = False) -> dict[int, np.ndarray]:
        """For each nodule slice of the split, the backgrounds (indices) whose wall fraction is nearest its own:
        a window of ⌈share × backgrounds⌉ (at least 16) around its rank among the sorted backgrounds; with
        `texture`, the as many backgrounds nearest in wall fraction and surroundings texture together."""
        from .surroundings import match_surroundings, texture_pair, wall_fraction

        window = tuple(float(v) for v in self.data.hu_window)
        background_images = self.data.background_images[self.backgrounds]
        nodule_images, nodule_masks = self.data.nodule_images[self.nodules], self.data.nodule_masks[self.nodules]
        background_wall = wall_fraction(background_images, window)
        nodule_wall = wall_fraction(nodule_images, window, nodule_masks)
        width = min(self.backgrounds.size, max(16, int(np.ceil(share * self.backgrounds.size))))
        if texture:
            nodule_texture, background_texture = texture_pair(nodule_images, nodule_masks, background_images,
                                                              window, self.data.patch_size)
            wanted, offered = np.c_[nodule_wall, nodule_texture], np.c_[background_wall, background_texture]
            nearest = match_surroundings(wanted, offered, np.random.default_rng([self.seed, 0x7E47]), width)
            return {int(sample): self.backgrounds[row] for sample, row in zip(self.nodules, nearest)}
        order = np.argsort(background_wall, kind="stable")
        ranked, walls = self.backgrounds[order], background_wall[order]
        pools = {}
        for sample, wall in zip(self.nodules, nodule_wall):
            start = int(np.clip(np.searchsorted(walls, wall) - width // 2, 0, ranked.size - width))
            pools[int(sample)] = ranked[start : start + width]
        return pools

    def _draw_wrong_mask(self, rng: np.random.Generator, sample: int, patient: int) -> int:
        """A nodule slice of another patient when there is one (a neighbouring slice of the same nodule is
        nearly the same mask, a poor negative); else another slice of the split."""
        other_patients = self._patients_with_nodules[self._patients_with_nodules != patient]
        if other_patients.size:
            chosen = other_patients[rng.integers(other_patients.size)]
            pool = self.nodules[self.data.nodule_patient[self.nodules] == chosen]
        else:
            pool = self.nodules[self.nodules != sample]
            if pool.size == 0:
                pool = self.nodules
        return int(pool[rng.integers(pool.size)])


def phenotype_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F,) mean and sd over the donors (rows) of each feature of `values` (D, F), NaN skipped: the z-score of
    `donor_phenotypes`, which a generator part that turns an anchored coordinate back into units must share."""
    finite = np.isfinite(values)
    count = np.maximum(finite.sum(axis=0), 1)
    mean = np.where(finite, values, 0).sum(axis=0) / count
    centred = np.where(finite, values - mean, 0.0)
    return mean, np.sqrt((centred**2).sum(axis=0) / count)


def donor_phenotypes(data: RadiogenomicDataset, donors: np.ndarray, names: Sequence[str]) -> torch.Tensor:
    """(P, F) float32, row p = donor p's real nodule features `names` z-scored over `donors` (other rows and
    unmeasurable values 0). A feature constant over the donors is centred only."""
    from .conventional import real_nodule_features  # conventional imports metrics only; kept lazy for start-up

    values = real_nodule_features(data, donors, names)
    mean, scale = phenotype_scale(values)
    centred = np.where(np.isfinite(values), values - mean, 0.0)
    table = np.zeros((data.num_patients, len(names)), dtype=np.float32)
    table[donors] = centred / np.where(scale > 0, scale, 1.0)
    return torch.from_numpy(table)


# --- a tiny synthetic dataset for tests ------------------------------------------------------------------------


def make_synthetic_dataset(
    path: str | os.PathLike, patients: int = 8, genes: int = 64, size: int = 64, seed: int = 0
) -> Path:
    """Write a small valid dataset of drawn discs on noisy lung-like backgrounds.

    For tests of training and evaluation that must not wait for the phantom. The disc radius and density
    follow genes 0 and 1, so a model can in principle learn a gene→image link. Split: the last two patients
    are val and test (when there are at least four), the rest train.
    """
    if patients < 2:
        raise ValueError("a synthetic dataset needs at least two patients")
    rng = np.random.default_rng(seed)
    table_log = (5.0 + rng.normal(size=(patients, genes))).astype(np.float32)  # expressed, variable genes
    names = [f"GENE{g:04d}" for g in range(genes)]
    split = np.array(["train"] * patients, dtype="<U5")
    if patients >= 4:
        split[-2], split[-1] = "val", "test"
    preprocessing = GenePreprocessing.fit(table_log[split == "train"], names, clip=50.0)
    gene_matrix = preprocessing.transform_log(table_log)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    spacing_mm = 60.0 / size
    nodule_images, nodule_masks, nodule_patient, nodule_slice, nodule_centres = [], [], [], [], []
    background_images, background_patient, background_slice, background_centres = [], [], [], []

    def lung_texture() -> np.ndarray:
        noise = rng.normal(0.0, 0.03, size=(size, size)).astype(np.float32)
        return np.float32(-0.75) + noise  # ≈ −840 HU in the [-1000, 500] window

    for p in range(patients):
        radius_mm = 8.0 + 3.0 * np.tanh(gene_matrix[p, 0] if genes else 0.0)
        density = 0.05 + 0.1 * np.tanh(gene_matrix[p, 1] if genes > 1 else 0.0)
        centre_ras = rng.uniform(-50, 50, size=3).astype(np.float32)
        for s in range(4):
            r_px = max(radius_mm * (1.0 - 0.15 * abs(s - 1.5)) / spacing_mm, 2.0)
            cy, cx = (size - 1) / 2 + rng.normal(0, 1), (size - 1) / 2 + rng.normal(0, 1)
            disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= r_px**2
            image = lung_texture()
            image[disc] = density + rng.normal(0.0, 0.03, size=int(disc.sum()))
            nodule_images.append(np.clip(image, -1, 1))
            nodule_masks.append(disc.astype(np.uint8))
            nodule_patient.append(p)
            nodule_slice.append(10 + s)
            nodule_centres.append(centre_ras)
        for s in range(6):
            background_images.append(np.clip(lung_texture(), -1, 1))
            background_patient.append(p)
            background_slice.append(5 + s)
            background_centres.append(centre_ras + np.float32(30.0))
    return write_dataset(
        path,
        patch_size=np.int64(size),
        patch_spacing_mm=np.float64(spacing_mm),
        nodule_images=np.asarray(nodule_images, dtype=np.float32),
        nodule_masks=np.asarray(nodule_masks, dtype=np.uint8),
        nodule_patient=np.asarray(nodule_patient, dtype=np.int32),
        nodule_slice=np.asarray(nodule_slice, dtype=np.int32),
        nodule_centre_ras=np.asarray(nodule_centres, dtype=np.float32),
        background_images=np.asarray(background_images, dtype=np.float32),
        background_patient=np.asarray(background_patient, dtype=np.int32),
        background_slice=np.asarray(background_slice, dtype=np.int32),
        background_centre_ras=np.asarray(background_centres, dtype=np.float32),
        patient_ids=np.array([f"SYN-{p:03d}" for p in range(patients)]),
        patient_spacing=np.tile(np.array([0.7, 0.7, 1.25], dtype=np.float32), (patients, 1)),
        split=split,
        **gene_arrays(preprocessing, names, table_log),
    )


def gene_arrays(preprocessing: GenePreprocessing, table_gene_names: Sequence[str],
                table_genes_log: np.ndarray, fitted_on: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The dataset's gene keys for (P, T) log2(x+1) table values and a preprocessing fitted on them; the
    patients `fitted_on` (indices) are prepared in-sample, every other one with the out-of-sample gain."""
    components = preprocessing.components if preprocessing.components is not None else np.zeros(
        (0, preprocessing.num_genes))
    position = {str(name): i for i, name in enumerate(table_gene_names)}
    missing = [g for g in preprocessing.gene_names if g not in position]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {preprocessing.num_genes} genes the model reads are not in this dataset's gene "
            f"table (e.g. {', '.join(missing[:3])}): the model and the cohort come from different gene panels")
    columns = np.array([position[g] for g in preprocessing.gene_names], dtype=np.int64)
    values = np.asarray(table_genes_log)[:, columns]
    genes = preprocessing.transform_log(values)
    if fitted_on is not None and len(fitted_on):
        genes[fitted_on] = preprocessing.transform_log(values[fitted_on], in_sample=True)
    return {
        "genes": genes,
        "gene_names": np.array(preprocessing.gene_names),
        "gene_means": preprocessing.means.astype(np.float32),
        "gene_stds": preprocessing.stds.astype(np.float32),
        "gene_clip": np.float64(preprocessing.clip),
        "gene_components": components.astype(np.float32),
        "table_gene_names": np.array([str(g) for g in table_gene_names]),
        "gene_fit": json.dumps(preprocessing.fitted_on, sort_keys=True),
        "gene_out_of_sample_gain": np.float64(preprocessing.out_of_sample_gain),
        "gene_fitted_scores": preprocessing.fitted_scores,
        "table_genes_log": np.asarray(table_genes_log, dtype=np.float32),
    }
