"""The three-headed discriminator of Fig. 1(c): D_I, D_IS and D_ISG.

Built like the authors' MC-GAN-derived code (and MC-GAN / StackGAN before it):

* an **image encoder** x → 4×4 features → D_I;
* an **image+segmentation encoder** (x, m concatenated as two channels) → 4×4 features → D_IS;
* the second encoder's features, concatenated with the gene code broadcast over the 4×4 grid, go through
  conv 3×3, batch norm, leaky ReLU → D_ISG (the paper: "combined with gene code φ(g) and further encoded
  via convolution, batch normalization, and leaky ReLU").

Encoders are stacks of 4×4 stride-2 convolutions (no norm on the first, batch norm after the others,
leaky ReLU 0.2), channels doubling from `base_channels` up to `max_channels`, until 4×4. Every head ends
with a 4×4 *valid* convolution to a single number, so each head outputs **one scalar per sample**, shape
(B,), with no sigmoid (least-squares GAN). A scalar rather than a patch map because the patch is already
a small, nodule-centred 60 mm crop: the heads judge the whole nodule/mask/gene tuple, as in MC-GAN.

With ``image_view_px`` = K > 0, D_I judges only the nodule and a K-pixel rim (air elsewhere). Why: the paper's
backgrounds lie 5–25 mm from the lung boundary, so 94 % of their 64-px patches hold chest wall against 13–17 %
of the real nodule slices (`training.surroundings`); with the whole patch D_I told real from generated from
the first hundred steps on (round 9's default, seed 3: D_I 0.91–0.97 on real patches against 0.03–0.08 on
generated ones throughout training), by the wall the generator must leave alone, and gave it nothing to learn
about the nodule. Measured (three seeds, README round 10): D_I still separated them (0.89–0.98 against
0.02–0.11), gene control level, realism unchanged (lung-only C2ST 0.74 ± 0.01 on the unseen cohort): off.

With ``gene_head="projection"`` (Miyato & Koyama 2018) D_ISG is instead ψ(h) + ⟨E·code, pool(h)⟩, h the
pair features through the same conv 3×3, batch norm, leaky ReLU: the code enters as an inner product with
the image's features, a term D cannot ignore by down-weighting the broadcast channels (issue 10).

The gene code `code` is, by default, the generator's φ(g) — the D step detaches it (as the authors' own code did),
so D never trains the generator's mapping network. With ``independent_mapping=True`` D owns its own
two-layer mapping network (a separate instance of the generator's `GeneMappingNetwork`) and `code` is the
raw z-scored gene vector (ablation).

The lower-level methods (`image_features`, `pair_features`, `score_*`, `gene_code`) let the loss batch the
real, mismatched and fake tuples through each encoder once and reuse the (x, m) features for both the
matched-gene and the mismatched-gene D_ISG terms; `forward` is the one-tuple convenience.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from RadiogenomicGANLib.networks import GeneMappingNetwork
from RadiogenomicGANLib.strict_dict import StrictDict

_SLOPE = 0.2  # leaky ReLU slope of DCGAN/MC-GAN discriminators
GENE_HEADS: tuple[str, ...] = ("concat", "projection")


@dataclass
class DiscriminatorConfig(StrictDict):
    """Architecture of the discriminator (stored with training checkpoints)."""

    patch_size: int = 64
    base_channels: int = 16     # as the generator: 0.65 M parameters at 64² (the MONAI peer's D: 6.2 M)
    max_channels: int = 128
    code_dim: int = 128
    independent_mapping: bool = False
    num_genes: int = 5172
    gene_hidden: int = 256
    # False drops D_ISG (and any mapping network) entirely: the inpainting baseline has no genes, and a
    # head that is allocated but never trained is a dead branch.
    gene_conditioned: bool = True
    gene_head: str = "concat"   # "concat" (the paper: code broadcast and concatenated) | "projection"
    # 0: D_I sees the whole patch (the paper). K > 0: D_I sees the nodule — its mask > 0.5 grown by K px — and
    # air elsewhere, so it cannot reject a generated patch by the chest wall of its background (module docstring)
    image_view_px: int = 0

    def __post_init__(self) -> None:
        size = self.patch_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"patch_size must be a power of two >= 8, got {size}")
        if self.gene_head not in GENE_HEADS:
            raise ValueError(f"unknown gene_head {self.gene_head!r}; expected one of {', '.join(GENE_HEADS)}")
        for name in ("base_channels", "max_channels", "code_dim", "num_genes", "gene_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= int(self.image_view_px) < size:
            raise ValueError(f"image_view_px must be between 0 and the patch size, got {self.image_view_px}")

    @property
    def num_downsamplings(self) -> int:
        """Stride-2 convolutions from the patch size down to 4×4."""
        return int(math.log2(self.patch_size // 4))

    @classmethod
    def for_generator(cls, generator_config: Any, **overrides: Any) -> DiscriminatorConfig:
        """The discriminator matching a `GeneratorConfig` (patch size, code size, genes, kind)."""
        values: dict[str, Any] = {
            "patch_size": generator_config.patch_size,
            "code_dim": generator_config.code_dim,
            "num_genes": generator_config.num_genes,
            "gene_hidden": generator_config.gene_hidden,
            "gene_conditioned": generator_config.kind != "inpainting",
        }
        values.update(overrides)
        return cls(**values)


class DiscriminatorOutput(NamedTuple):
    """Raw least-squares scores, one per sample, shape (B,). `d_isg` is None without the gene head."""

    d_i: Tensor
    d_is: Tensor
    d_isg: Tensor | None


def square_dilation(mask: Tensor, radius_px: int) -> Tensor:
    """Grey dilation by a (2r+1)² square (max-pool; outside the image never counts as foreground). Here for
    D_I's nodule view; the losses use it too (they import this module, not the other way round)."""
    return nn.functional.max_pool2d(mask, 2 * radius_px + 1, stride=1, padding=radius_px)


def _encoder(in_channels: int, config: DiscriminatorConfig) -> tuple[nn.Sequential, int]:
    """4×4 stride-2 convs from patch_size to 4×4; returns the module and its output channels."""
    layers: list[nn.Module] = []
    channels = in_channels
    for level in range(config.num_downsamplings):
        out = min(config.base_channels * 2**level, config.max_channels)
        first = level == 0
        layers.append(nn.Conv2d(channels, out, 4, stride=2, padding=1, bias=first))
        if not first:  # no norm on the input layer (DCGAN convention; keeps input statistics)
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.LeakyReLU(_SLOPE, inplace=True))
        channels = out
    return nn.Sequential(*layers), channels


def _logit(channels: int) -> nn.Conv2d:
    """4×4 valid conv of the 4×4 feature grid to one number per sample."""
    return nn.Conv2d(channels, 1, 4, stride=1, padding=0)


class Discriminator(nn.Module):
    """D_I, D_IS and D_ISG of Fig. 1(c); see the module docstring."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        self.image_encoder, channels = _encoder(1, config)
        self.pair_encoder, _ = _encoder(2, config)
        self.image_logit = _logit(channels)
        self.pair_logit = _logit(channels)
        self.mapping: GeneMappingNetwork | None = None
        self.gene_joint: nn.Sequential | None = None
        self.gene_logit: nn.Conv2d | None = None
        self.gene_embed: nn.Linear | None = None
        if config.gene_conditioned:
            if config.independent_mapping:
                self.mapping = GeneMappingNetwork(config.num_genes, config.gene_hidden, config.code_dim)
            projection = config.gene_head == "projection"
            if projection:
                self.gene_embed = nn.Linear(config.code_dim, channels, bias=False)
            self.gene_joint = nn.Sequential(
                nn.Conv2d(channels + (0 if projection else config.code_dim), channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.LeakyReLU(_SLOPE, inplace=True),
            )
            self.gene_logit = _logit(channels)

    # -- building blocks, used by the loss to batch tuples -------------------------------------------
    def gene_code(self, code: Tensor) -> Tensor:
        """The code D_ISG sees: φ(g) as given, or D's own mapping of raw genes (independent_mapping)."""
        if self.gene_joint is None:
            raise RuntimeError("this discriminator has no gene head (gene_conditioned=False)")
        if self.mapping is not None:
            if code.shape[-1] != self.config.num_genes:
                raise ValueError(
                    f"independent_mapping expects raw genes ({self.config.num_genes}), got {code.shape[-1]}"
                )
            return self.mapping(code)
        if code.shape[-1] != self.config.code_dim:
            raise ValueError(f"expected a gene code of size {self.config.code_dim}, got {code.shape[-1]}")
        return code

    def image_view(self, image: Tensor, mask: Tensor) -> Tensor:
        """What D_I sees of (image, mask): the image itself, or with `image_view_px` = K only the mask > 0.5
        grown by K px (a (2K+1)² square), air (−1) elsewhere. The region carries no gradient: neither G's mask
        nor its background outside the region can move D_I."""
        k = int(self.config.image_view_px)
        if k == 0:
            return image
        with torch.no_grad():
            region = square_dilation((mask > 0.5).to(image.dtype), k)
        return image * region + (region - 1)

    def image_features(self, image: Tensor) -> Tensor:
        """Image encoder: (N,1,S,S) → (N,C,4,4)."""
        return self.image_encoder(image)

    def pair_features(self, image: Tensor, mask: Tensor) -> Tensor:
        """Image+segmentation encoder: (N,1,S,S) ×2 → (N,C,4,4)."""
        return self.pair_encoder(torch.cat([image, mask], dim=1))

    def score_image(self, features: Tensor) -> Tensor:
        """D_I from image features, (N,)."""
        return self.image_logit(features).flatten()

    def score_pair(self, features: Tensor) -> Tensor:
        """D_IS from pair features, (N,)."""
        return self.pair_logit(features).flatten()

    def score_gene(self, pair_features: Tensor, code: Tensor) -> Tensor:
        """D_ISG from pair features and D's code (already through `gene_code`), (N,)."""
        assert self.gene_joint is not None and self.gene_logit is not None
        if self.gene_embed is not None:                                  # projection
            joint = self.gene_joint(pair_features)
            projected = (self.gene_embed(code.to(joint.dtype)) * joint.mean(dim=(2, 3))).sum(dim=1)
            return self.gene_logit(joint).flatten() + projected
        grid = code[:, :, None, None].expand(-1, -1, *pair_features.shape[-2:])
        return self.gene_logit(self.gene_joint(torch.cat([pair_features, grid], dim=1))).flatten()

    # -- one tuple ------------------------------------------------------------------------------------
    def forward(self, image: Tensor, mask: Tensor, code: Tensor | None = None) -> DiscriminatorOutput:
        """Scores of one (image, mask, code) tuple per sample; `code` is required with the gene head."""
        d_i = self.score_image(self.image_features(self.image_view(image, mask)))
        pair = self.pair_features(image, mask)
        d_is = self.score_pair(pair)
        d_isg = None
        if self.gene_joint is not None:
            if code is None:
                raise ValueError("the gene-conditioned discriminator needs `code`")
            d_isg = self.score_gene(pair, self.gene_code(code))
        return DiscriminatorOutput(d_i, d_is, d_isg)


def build_discriminator(config: DiscriminatorConfig | None = None) -> Discriminator:
    """Factory mirroring `build_generator`."""
    return Discriminator(config or DiscriminatorConfig())
