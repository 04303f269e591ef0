"""What every evaluation section shares: the loaded models, the held-out donors, and how images are generated.

A model's genes are always prepared from the dataset's stored log2 values with the MODEL's own fitted
preprocessing (`RadiogenomicDataset.genes_for`), so a model is scored on a cohort it never saw exactly as
`insert` would prepare that cohort's table. Negative controls are models too: a generator that copies its
background, and the proposed model fed another donor's genes — every metric must score them badly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from RadiogenomicGANLib.intensity import unit_to_hu
from RadiogenomicGANLib.networks import GeneratorOutput, hole_from_mask

from ..conventional import GroundTruth
from ..dataset import DatasetError, RadiogenomicDataset
from ..metrics import largest_component, nodule_features

MODEL_ROLES: dict[str, str] = {"inpainting": "inpainting", "baseline": "mcgan", "proposed": "proposed"}
ROLE_TITLES: dict[str, str] = {"inpainting": "In-painting", "baseline": "Baseline (MC-GAN)", "proposed": "Proposed",
                               "copy": "Control: copies its background",
                               "shuffled": "Control: proposed, another donor's genes",
                               "pasted": "Control: the real nodules pasted on the backgrounds"}
CONTROL_ROLES = ("copy", "shuffled")


class EvaluationError(ValueError):
    """Inputs the evaluation cannot use (mismatched weights and dataset, empty split, …)."""


@dataclass
class Model:
    """One generator and every dataset patient's genes prepared for it (None for inpainting)."""

    role: str                       # "proposed" | "baseline" | "inpainting" | a control role
    generator: nn.Module
    metadata: Any                   # RadiogenomicGANLib.weights.WeightsMetadata (None for the copy control)
    genes: np.ndarray | None        # (P, D) the model's input for every patient of the dataset
    path: str

    @property
    def noise_dim(self) -> int:
        return int(self.generator.config.noise_dim)

    @property
    def title(self) -> str:
        return ROLE_TITLES.get(self.role, self.role)


def load_model(role: str, path: str | Path, data: RadiogenomicDataset, device: torch.device) -> Model:
    """Load weights for a role, checking kind, patch size and genes against the dataset."""
    from RadiogenomicGANLib.weights import load_weights

    kind = MODEL_ROLES[role]
    try:
        generator, metadata = load_weights(path, expected_kind=kind)
    except ValueError as error:
        raise EvaluationError(f"--{'weights' if role == 'proposed' else role} {path}: {error}") from error
    if int(generator.config.patch_size) != data.patch_size:
        raise EvaluationError(f"{role} weights {path} are for {generator.config.patch_size}px patches, the dataset "
                              f"has {data.patch_size}px")
    if abs(float(metadata.patch_spacing_mm) - data.patch_spacing_mm) > 1e-4:
        print(f"warning: {role} weights were trained at {metadata.patch_spacing_mm} mm/px, the dataset has "
              f"{data.patch_spacing_mm} mm/px", file=sys.stderr)
    genes = None
    if kind != "inpainting":
        try:
            genes = data.genes_for(metadata.genes)
        except DatasetError as error:
            raise EvaluationError(f"{role} weights {path}: {error}") from error
    return Model(role, generator.to(device).eval(), metadata, genes, str(path))


class CopyBackground(nn.Module):
    """Negative control: returns its background unchanged with an empty mask — draws no nodule at all."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def forward(self, background: torch.Tensor, genes: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                hole: torch.Tensor | None = None, position: torch.Tensor | None = None,
                pixel_noise: torch.Tensor | None = None) -> GeneratorOutput:
        empty = torch.zeros_like(background)
        return GeneratorOutput(image=background, mask=empty, weight_maps=[empty], gene_code=None)


def negative_controls(proposed: Model, donors: np.ndarray, seed: int) -> list[Model]:
    """The copy-background generator, and the proposed model with the donors' genes permuted among them."""
    copy = Model("copy", CopyBackground(proposed.generator.config), None, proposed.genes, "(negative control)")
    shuffled_genes = proposed.genes.copy()
    order = np.random.default_rng([seed, 0x5F1E]).permutation(donors.size)
    if donors.size > 1:
        order = np.roll(order, 1) if np.any(order == np.arange(donors.size)) else order  # nobody keeps their own
    shuffled_genes[donors] = proposed.genes[donors[order]]
    shuffled = Model("shuffled", proposed.generator, proposed.metadata, shuffled_genes, proposed.path)
    return [copy, shuffled]


# ============================================================================================================
# Generation


# Patches per generator call. On CPU a bigger batch is slower per patch, not faster: the bundled model at 64²
# takes 7.5-7.8 ms a patch in batches of 16-64 and 13-14 ms in 128-320 (one thread; bench_generators.py), as
# the activations outgrow the caches. The outputs do not depend on it (row-keyed noise; a test checks).
GENERATION_BATCH = 32


def seeded_noise(n: int, dim: int, seed: int, tag: int) -> np.ndarray:
    """Standard normal noise (n, dim) from (seed, tag): the same draw for every model of one noise_dim."""
    return np.random.default_rng([int(seed), 0x501E, int(tag)]).standard_normal((n, dim)).astype(np.float32)


def row_pixel_noise(start: int, stop: int, size: int) -> torch.Tensor:
    """(stop − start, 1, size, size) per-pixel noise maps keyed by the row's index alone, so an evaluation draws
    the same maps whatever its batch size and whatever the global RNG did before."""
    return torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(0x91C5 * 1_000_003 + row))
                        for row in range(start, stop)])


@torch.no_grad()
def generate(model: Model, backgrounds: np.ndarray, genes: np.ndarray | None = None,
             noise: np.ndarray | None = None, holes: np.ndarray | None = None, device: torch.device | None = None,
             batch_size: int = GENERATION_BATCH, desc: str = "", progress: bool = True,
             positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a generator over (n,S,S) inputs in batches → (images (n,S,S) in [-1,1], masks (n,S,S) in [0,1]);
    `positions` (n,) slice positions, given only to a generator that reads them (others draw the same slice
    wherever it lies); a `pixel_noise` generator gets `row_pixel_noise` maps."""
    reads_position = positions is not None and bool(getattr(model.generator.config, "slice_position", False))
    pixel_size = int(getattr(model.generator.config, "pixel_noise_size", 0))
    device = device or torch.device("cpu")
    n = backgrounds.shape[0]
    images, masks = [], []

    def tensor(array: np.ndarray | None, start: int, stop: int, channel: bool = False) -> torch.Tensor | None:
        if array is None:
            return None
        part = array[start:stop, None] if channel else array[start:stop]
        return torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).to(device)

    for start in tqdm(range(0, n, batch_size), desc=desc or model.role, disable=not progress or n <= batch_size,
                      leave=False, file=sys.stderr):
        stop = min(n, start + batch_size)
        inputs = (tensor(backgrounds, start, stop, True), tensor(genes, start, stop), tensor(noise, start, stop),
                  tensor(holes, start, stop, True))
        extra = {"position": tensor(positions, start, stop)} if reads_position else {}
        if pixel_size:
            extra["pixel_noise"] = row_pixel_noise(start, stop, pixel_size).to(device)
        out = model.generator(*inputs, **extra)
        images.append(out.image[:, 0].float().cpu().numpy())
        masks.append(out.mask[:, 0].float().cpu().numpy())
    return np.concatenate(images), np.concatenate(masks)


@contextmanager
def shifted_code(generator: nn.Module, index: int, shift: float) -> Iterator[None]:
    """Inside the block the generator's gene code has φ(g)[:, index] + shift (a forward hook on its mapping
    network, so everything downstream — the style, the code-driven edge — sees the moved code)."""
    def hook(_module: nn.Module, _inputs: Any, code: torch.Tensor) -> torch.Tensor:
        moved = code.clone()
        moved[:, index] += shift
        return moved

    handle = generator.mapping.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def holes_for(masks: np.ndarray, scale: float = 1.5) -> np.ndarray:
    """The inpainting hole of every mask: a disc of `scale` × its equivalent radius at its centroid."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks[:, None], dtype=np.float32))
    return hole_from_mask(tensor, scale=scale)[:, 0].numpy()


def encode(model: Model, patients: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """φ(g) of the given patients (n, code_dim)."""
    device = next(model.generator.parameters()).device
    genes = model.genes[patients]
    codes = []
    with torch.no_grad():
        for start in range(0, genes.shape[0], batch_size):
            g = torch.from_numpy(np.ascontiguousarray(genes[start : start + batch_size])).to(device)
            codes.append(model.generator.encode_genes(g).float().cpu().numpy())
    return np.concatenate(codes)


def generated_features(images: np.ndarray, masks: np.ndarray, spacing_mm: float,
                       window: tuple[float, float]) -> list[dict[str, float]]:
    """Nodule features of every generated image: the largest component of mask > 0.5, HU from the window."""
    hu = unit_to_hu(images, window)
    return [nodule_features(h, largest_component(m > 0.5), spacing_mm) for h, m in zip(hu, masks)]


# ============================================================================================================
# Context


@dataclass
class Context:
    """Everything a section reads; `cache` holds what one section computes and another reuses."""

    data: RadiogenomicDataset
    models: dict[str, Model]
    truth: GroundTruth | None
    device: torch.device
    seed: int
    out: Path
    split: str                              # "val" | "test" | "all"
    options: dict[str, Any] = field(default_factory=dict)
    controls: list[Model] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        return self.options[name]

    @property
    def progress(self) -> bool:
        return bool(self.options.get("progress", True))

    @property
    def batch_size(self) -> int:
        return int(self.options.get("batch_size", GENERATION_BATCH))

    @property
    def window(self) -> tuple[float, float]:
        return float(self.data.hu_window[0]), float(self.data.hu_window[1])

    @property
    def donors(self) -> np.ndarray:
        """The held-out patients that are scored: those of the split (all patients for "all") with a nodule."""
        if "donors" not in self.cache:
            pool = (np.arange(self.data.num_patients) if self.split == "all" else self.data.patients_in(self.split))
            self.cache["donors"] = np.array([p for p in pool if (self.data.nodule_patient == p).any()], dtype=np.int64)
        return self.cache["donors"]

    @property
    def backgrounds(self) -> np.ndarray:
        """Background patches of the held-out patients (never a training patient's)."""
        if self.split == "all":
            return np.arange(self.data.num_backgrounds)
        return self.data.background_indices(self.split)

    def nodule_slices(self) -> np.ndarray:
        """Real nodule slices of the donors."""
        return np.flatnonzero(np.isin(self.data.nodule_patient, self.donors))

    def gene_models(self) -> list[Model]:
        """The gene-conditioned models in report order (baseline, proposed)."""
        return [self.models[r] for r in ("baseline", "proposed") if r in self.models]

    def rng(self, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0xE7A1, tag])

    def largest_slice(self, patient: int) -> int | None:
        """Index of the patient's nodule slice with the largest mask area (its 'training image')."""
        idx = np.flatnonzero(self.data.nodule_patient == patient)
        if idx.size == 0:
            return None
        return int(idx[np.argmax(self.data.nodule_masks[idx].reshape(idx.size, -1).sum(axis=1))])
