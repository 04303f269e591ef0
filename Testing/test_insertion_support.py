"""Shared fixtures for the insertion and CLI tests: a tiny generator whose mask is a known disc.

A randomly initialised generator draws no nodule (its mask head starts near 0), so the tests wrap the real,
randomly initialised network: its image and weight maps pass through untouched, but the mask is a disc of
fixed radius at the patch centre and the image inside the disc is lifted to soft tissue (plus a noise term,
so seeds and per-nodule noise are observable). Every code path of the real generator still runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RadiogenomicGANLib.networks import GeneratorConfig, GeneratorOutput, build_generator

NUM_GENES = 24


def small_config(kind: str = "proposed", num_genes: int = NUM_GENES) -> GeneratorConfig:
    return GeneratorConfig(
        kind=kind, num_genes=num_genes, patch_size=64, code_dim=8, noise_dim=4, base_channels=4, max_channels=16,
        gene_hidden=8,
    )


class DiscMaskGenerator(nn.Module):
    """The real generator, with a disc mask of `radius_px` and a soft-tissue disc painted into the image."""

    def __init__(self, inner: nn.Module, radius_px: float = 6.0) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.radius_px = radius_px
        self.seen_noise: list[torch.Tensor] = []

    def encode_genes(self, genes: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_genes(genes)

    def disc(self, background: torch.Tensor) -> torch.Tensor:
        """(B,1,S,S) the centred disc of `radius_px`, as the mask of every patch."""
        size = background.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        centre = (size - 1) / 2
        disc = (((yy - centre) ** 2 + (xx - centre) ** 2) <= self.radius_px**2).to(background)[None, None]
        return disc.expand(background.shape[0], 1, size, size)

    def forward(self, background, genes, noise=None, hole=None) -> GeneratorOutput:  # type: ignore[no-untyped-def]
        out = self.inner(background, genes, noise, hole=hole)
        disc = self.disc(background)
        lift = 0.33 if noise is None else 0.33 + 0.05 * noise[:, :1, None, None]
        if noise is not None:
            self.seen_noise.append(noise.detach().clone())
        image = out.image * (1 - disc) + lift * disc
        return GeneratorOutput(image, disc, out.weight_maps, out.gene_code)


def make_metadata(config: GeneratorConfig, gene_names: list[str] | None = None):  # type: ignore[no-untyped-def]
    """A WeightsMetadata for a freshly built generator (gene statistics 0/1)."""
    from RadiogenomicGANLib.genes import GenePreprocessing
    from RadiogenomicGANLib.weights import WeightsMetadata

    names = gene_names or [f"GENE{g}" for g in range(config.num_genes)]
    return WeightsMetadata(
        config=config,
        genes=GenePreprocessing(list(names), np.zeros(config.num_genes), np.ones(config.num_genes)),
        patch_size=config.patch_size,
        patch_spacing_mm=60.0 / config.patch_size,
        provenance={"note": "random test model"},
    )


def make_generator(kind: str = "proposed", seed: int = 0, num_genes: int = NUM_GENES) -> nn.Module:
    torch.manual_seed(seed)
    return build_generator(small_config(kind, num_genes)).eval()
