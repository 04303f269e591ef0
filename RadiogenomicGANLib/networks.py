"""Generators of Xu et al. (MIDL 2019) "Correlation via synthesis", and the two baselines of its Table 1.

The file reads bottom-up like the paper's Fig. 1 (stylegan2-ada's `networks.py` layout): small named
layers, the gene mapping network (Fig. 1a right), the background encoder (Fig. 1a left), the fusion
block (Fig. 1b), the proposed generator (Fig. 1a centre); then the MC-GAN-style and inpainting baselines,
so that any weights file can hold any of the three (`GeneratorConfig.kind`).

Shared choices (DESIGN.md leaves them open):
- Resolution levels run from the patch size down to a 4×4 bottleneck (64² → 5 levels, 128² → 6); the
  channel width at a level is `min(base_channels · 2**i, max_channels)`, i = halvings from full size.
- Every generator can copy its input background to its output: the full-resolution background feature
  carries, as channel 0, the background in tanh-logit space (`atanh` of the clamped input), and the image
  head starts close to a copy of that channel. With the fusion weight W → 0 and the head at the copy, the
  image equals the background to 1e-3: the (1 − W)⊙B path is a real identity, which the background L1
  term relies on (Testing/test_networks.py checks it).
- LeakyReLU(0.2) activations, batch norm after every convolution except the heads (the paper's conv+BN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from RadiogenomicGANLib.strict_dict import StrictDict

KINDS: tuple[str, ...] = ("proposed", "mcgan", "inpainting")
BOTTLENECK = 4              # synthesis starts at 4×4 for every patch size
_LOGIT_EPS = 1e-3           # background clamp before atanh: |logit| ≤ atanh(0.999) ≈ 3.8
_WEIGHT_INIT_BIAS = -1.0    # W starts at σ(−1) ≈ 0.27: mostly background at initialisation
_MASK_INIT_BIAS = -2.0      # mask starts mostly empty, so the background L1 covers most of the patch
_INPAINT_FILL = 0.0         # value written into the erased disc (≈ −250 HU: neither air nor tissue)


# ----------------------------------------------------------------------------------------------------
# Configuration and output


@dataclass
class GeneratorConfig(StrictDict):
    """Everything needed to rebuild a generator from code; stored as the `architecture` of a weights file."""

    kind: str = "proposed"      # "proposed" | "mcgan" | "inpainting"
    num_genes: int = 5172
    patch_size: int = 64        # 64 or 128 (any power of two ≥ 8 works)
    code_dim: int = 128         # φ(g)
    noise_dim: int = 16
    # 16 → 128 channels (the bundled model's widths): 2.2 M parameters at 64², 1.36 M of them the gene
    # mapping; a training step at 128² is ≥ 5× faster than the MONAI peer's (Testing/benchmarks/bench_training.py).
    base_channels: int = 16
    max_channels: int = 128
    gene_hidden: int = 256      # hidden width of the 2-layer mapping network
    # Code-driven edge width (off at 0): the generated nodule's difference from its background is blurred by
    # a Gaussian of σ = σ₀·exp(−edge_blur_per_sd · φ(g)[edge_code_index]) pixels, σ₀ learned. Training
    # anchors that coordinate to the donor's z-scored margin sharpness (`training.losses` code-phenotype
    # term), so a sharper-margined genotype gets a narrower edge: the factor is fixed, not learned, because a
    # learned one settled on one width for every donor. Off here so that weights files written without these
    # keys load as they were trained; the recommended training setting turns it on (README, Evaluation).
    edge_blur_per_sd: float = 0.0
    edge_code_index: int = 2
    # With the edge: keep the change only inside the generator's own mask before the blur, so σ alone (not
    # a soft edge the decoder draws) sets the margin, and nothing outside the nodule ± a few σ changes.
    edge_inside_mask: bool = False
    # With the edge kept inside the mask: lay the nodule OVER the background, with its blurred mask as the alpha
    # (out = G_σ*(m·image) + (1 − G_σ*m)·background), instead of adding its blurred change (background + G_σ*(m·
    # (image − background))). Why: inside the nodule the change form keeps background − G_σ*background, the
    # background's own detail finer than σ, at full strength, and the lobes moved the change (image − background)
    # so that the background's vessels at the warped pixels showed through as well (the evaluation's
    # `interior_leak`; README round 33). Trained with it (three seeds, round 33) the leak fell from 0.28 to −0.02
    # on the unseen cohort 5 with realism, size and density level, but margin ρ fell by 0.04 and the validation
    # score by 0.04. Set on the export only (a COMPOSITION_OPTION) the same tensors lost the leak with the rest
    # level: the recommended setting and the bundled model since round 34. Off here, so weights written without
    # the key load as trained.
    edge_over_background: bool = False
    # Open the generator's own mask (a grayscale opening with the 3×3 cross, after the lobes, before the drawn
    # strands join it; before the lobes their warp still pinched thin pieces out of the outline, round 36): its parts
    # at most about 2 px wide go, exactly those `training.metrics.thin_strands` reads as strands, since a flat
    # opening commutes with the label's 0.5 threshold. Why: on one training seed half of the long strands the
    # evaluation found were thin pieces of the generator's own mask, labelled nodule where the image shows lung
    # (-101 HU against their surround; README round 35); the drawn strands are the model's strands. A
    # COMPOSITION_OPTION, set on the export. Off here, so weights files written without the key load as trained.
    open_own_mask: bool = False
    # The sd, in code units, that training's code-phenotype anchor gives the first F coordinates of φ(g)
    # (their target is anchor_sd × the donor's z-scored phenotype); the edge reads its coordinate per sd.
    # Why above 1: the 125 free coordinates hold ~40 units of variance, mostly along size and density, so
    # at sd 1 the three named axes were ~7 % of the code and its k-means clusters followed size alone.
    # 1 here, so weights files written without the key load as they were trained.
    anchor_sd: float = 1.0
    # Slice position (issue 10's 3-D coherence): the style also holds where the slice lies within its nodule,
    # t = offset from the nodule's centre / its half extent (0 centre, ±1 where it ends), as (t, √(1 − t²)) —
    # the second a sphere's relative cross-section. Training gives each real slice's own t, so the area term
    # stops asking one size of every slice of a donor; insertion gives each chosen slice its t. Trained with
    # the drawn-area term (README round 8) the slice profile's gap to the real nodules fell from 0.41 to
    # 0.20 ± 0.12 and nodules were drawn at 0.85 of their real diameter against 0.74. False here, so weights
    # files written without the key load as they were trained; the recommended setting turns it on.
    slice_position: bool = False
    # Per-pixel noise (StyleGAN's noise inputs): a standard-normal map (B,1,S,S), average-pooled to each level
    # and scaled back to unit variance, is added to the fusion blocks' object features with a learned strength
    # per channel (starting at 0). Why: the style noise is one vector per nodule, so the only pixel-level
    # randomness G had was the background it was given; inside its nodules the background's vessels showed
    # through (README round 11). Trained (three seeds, 2000 steps) the strengths stayed at 0.003–0.006: the
    # generator did not take the noise up. False here, so weights files written without the key load as before.
    pixel_noise: bool = False
    # Opaque nodule: inside the generator's own mask the image head does not see the raw background channel
    # (channel 0 × (1 − mask), the mask detached), so the nodule cannot be the background shown through. Why:
    # the background's vessel-sized structure showed through the round-10 models' nodules at slope 0.26–0.62
    # (the evaluation's `interior_leak`), and zeroing that channel inside the mask of a trained model took
    # the slope from 0.59 to −0.14. Trained with it alone (three seeds, README round 11) the slope fell from 0.49
    # to 0.14 and noise diversity rose from 0.020 to 0.024, realism and gene control level, and the validation
    # score preferred it (0.710 against 0.669): part of the recommended setting and the bundled model since
    # round 12. False here, so weights files written without the key load as they were trained.
    opaque_nodule: bool = False
    # Drawn spicules (issue 10's spiculated appearance; 0 = off): up to `spicules` thin strands (`CodeDrivenSpicules`)
    # leave the drawn mask's body outwards, each present with probability σ(k·φ(g)[spicule_code_index]/anchor_sd +
    # b₀ + its noise), so a more spiculated genotype gets more and longer strands; directions and lengths come from
    # the style noise, which a nodule's slices share. Training anchors that coordinate to the donor's real
    # thin-strand area. Why explicit strands: no mask head trained in rounds 14-16 drew strands that reach out
    # (README round 16); a term on the strand area was met by a serrated outline. Off here, so weights files
    # written without the key load as they were trained.
    spicules: int = 0
    spicule_code_index: int = 3
    # Solid strands (with `spicules`): the strands are painted after the edge blur, at one learned intensity
    # (starting at 0 HU), instead of at the nodule's mean intensity before the blur. Why: the real spicules are
    # thin solid strands whatever the nodule's density, and the blur and a ground-glass mean left the drawn ones
    # faint in the image (README round 18). Tried in round 19 (three seeds): the strands then stood out too much
    # (600 HU against the real slices' 292 on two seeds: full-strength one-pixel lines, where real spicules are
    # partial-volumed), so it is not part of the recommended setting. Off here, so older weights files load.
    spicule_solid: bool = False
    # Strands at the real strands' contrast (with `spicules`): painted after the edge blur, each strand pixel raised
    # to at least its background + Δ, Δ the training donors' real long strands' median lift over the lung beyond
    # their rim (`metrics.strand_lift_hu` since round 35; before, the evaluation's contrast over the rim, which
    # painted strands reading 0.55-0.68 of the real), calibrated at the start of training and stored with the
    # weights. Why: at the nodule's mean before the blur the strands stood out by 47-74 HU where the real ones do by
    # 292, and at one learned solid value by 226-626 HU (README round 19); a lift over the background is what the
    # real strands show, partial-volumed. Brighten only, so a strand never darkens the nodule it leaves. Tried in
    # round 24 (three seeds): the strands then read 186 HU on the unseen cohort 5 (59 before), gene control level,
    # but the matched realism test rose from 0.58 to 0.61, over its rule's limit by 0.003: not recommended.
    # Set on the export only (a COMPOSITION_OPTION, round 34, four models on cohort 11): strands 48 -> 166 HU
    # (the real 310) with gene control and realism level, but its rule asked the gap to the real strands to halve
    # (262 -> 144 HU, 0.55x): not adopted either. Calibrated on the lift and set on the export (round 35, four models
    # on cohort 19): strands 29 -> 253 HU (the real 294), the rest level: adopted, the bundle and `make demo-weights`
    # export with it. Off here, so older weights files load as they were trained.
    spicule_contrast: bool = False
    # Cap the painted strands (with `spicule_contrast`) at max(background, 0 HU): a strand crossing a vessel or the
    # chest wall merges with it, as a real one does, instead of standing Δ (414 HU on cohort 2026) over the tissue,
    # which it did on 28 % of the draws with a painted strand (round 37, cohort 29). In the lung (−810 HU) the cap is
    # far above the painted value and changes nothing. A COMPOSITION_OPTION. Round 37 missed its rule on a measure
    # that mixed strands over the lung with strands over tissue; read apart (`metrics.strand_contrast_split_hu`) on
    # four models of the unseen cohort 43, strands over tissue 348 -> 93 HU (real 9), over the lung and the rest
    # level (round 38): the bundle and `make demo-weights` export with it. Off here, so older weights files load as
    # they were exported.
    spicule_cap: bool = False
    # Drawn lobes (the phantom's module 4; off here, so weights files written without the key load as trained): the
    # nodule is warped radially so that its outline carries lobes (`CodeDrivenLobes`) whose height is one anchored
    # code coordinate (`lobe_code_index`, anchored to the donor's real `lobe_amplitude`) in that measure's units. Why
    # explicit lobes: no trained model's outline followed the true lobulation (compactness ρ −0.05 to 0.16 on three
    # unseen cohorts, README round 23).
    lobes: bool = False
    lobe_code_index: int = 4
    # The drawn heights' spread over the donors, in sd of the real measure (1: the real nodules' own spread). Why
    # above 1 can help: the generator's own outline reads lobes too (0.03 median on cohort 5), which swamp heights
    # of the real measure's sd (0.016): heights set by each donor's TRUE lobulation were read back at ρ 0.27 with
    # the truth at spread 1, 0.53 at 2 and 0.65 at 3 (the bundled model's nodules, cohort 5; README round 24). Trained
    # at 2 (three seeds, round 24) the lobes read 0.24 ± 0.09 on the unseen cohort 5 (spread 1: 0.15), at 3 (round 25)
    # 0.24 ± 0.16, under the 0.25 their rules asked: not part of the recommended setting.
    lobe_spread: float = 1.0
    # The drawn lobes replace the generator's own outline (its lobe harmonics are taken out by the same warp)
    # instead of adding to it. Why: with lobes at spread 2 and 3 (rounds 24-25) the anchored coordinate carried the
    # true lobulation at rho 0.43-0.46 on cohort 5, yet the outlines read 0.24 on average, 0.08-0.40 by seed: the
    # generator's own lobes, as high as the real ones and unrelated to the genes, stay in the outline. With them
    # divided out, at spread 1: 0.32 ± 0.13 on cohort 5, 0.45 ± 0.06 on cohort 7 (round 25; part of the recommended
    # setting and the bundled model since). Off here, so weights written without the key load as trained.
    lobe_replace_outline: bool = False
    # The strands start and end relative to the drawn outline's own radius along their direction (0.85 r_k and
    # r_k + L_k, r_k read on [mask > 0.5] as `outline_radius` reads it) instead of the mean radius R = √(area/π).
    # Why: with lobes the outline's radius varies by ±A·f(θ), so a strand leaving through a lobe's bulge was drawn
    # partly inside it and one leaving through a notch started off the body; with the lobes the thin-strand
    # spiculation read 0.43 ± 0.06 on cohort 7 where round 18's strands alone read 0.55 ± 0.03 (README round 25).
    # Tried in round 26 on top of the recommended setting (three seeds): on cohort 5 the thin strands read 0.48 ±
    # 0.10 against 0.53 ± 0.13 without it, one seed drew long strands on 45 % of the nodules (the real slices: 21 %)
    # and lost its lobulation (−0.09), and the matched realism test rose to 0.611: not part of the recommended
    # setting. Off here, so weights written without the key load as trained.
    spicules_follow_outline: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown generator kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        size = self.patch_size
        if size < 2 * BOTTLENECK or size & (size - 1):
            raise ValueError(f"patch_size must be a power of two ≥ {2 * BOTTLENECK}, got {size}")
        for name in ("num_genes", "code_dim", "base_channels", "max_channels", "gene_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.noise_dim < 0:
            raise ValueError(f"noise_dim must be ≥ 0, got {self.noise_dim}")
        if self.base_channels < 2:
            raise ValueError("base_channels must be ≥ 2 (one channel carries the raw background)")
        if not (math.isfinite(self.edge_blur_per_sd) and self.edge_blur_per_sd >= 0):
            raise ValueError(f"edge_blur_per_sd must be a finite number ≥ 0, got {self.edge_blur_per_sd}")
        if self.edge_blur_per_sd and not 0 <= self.edge_code_index < self.code_dim:
            raise ValueError(f"edge_code_index must lie in [0, code_dim={self.code_dim}), got {self.edge_code_index}")
        if self.edge_inside_mask and not self.edge_blur_per_sd:
            raise ValueError("edge_inside_mask needs the code-driven edge (edge_blur_per_sd > 0)")
        if self.edge_over_background and not self.edge_inside_mask:
            raise ValueError("edge_over_background needs the edge kept inside the mask (edge_inside_mask=true)")
        if self.edge_blur_per_sd and self.kind != "proposed":
            raise ValueError(f"edge_blur_per_sd is a setting of the proposed generator, not of {self.kind!r}")
        if not (math.isfinite(self.anchor_sd) and self.anchor_sd > 0):
            raise ValueError(f"anchor_sd must be a finite number > 0, got {self.anchor_sd}")
        for name in ("pixel_noise", "opaque_nodule"):
            if getattr(self, name) and self.kind != "proposed":
                raise ValueError(f"{name} is a setting of the proposed generator, not of {self.kind!r}")
        if self.spicules < 0:
            raise ValueError(f"spicules must be ≥ 0, got {self.spicules}")
        if self.spicules and self.kind != "proposed":
            raise ValueError(f"spicules is a setting of the proposed generator, not of {self.kind!r}")
        if self.spicules and not 0 <= self.spicule_code_index < self.code_dim:
            raise ValueError(f"spicule_code_index must lie in [0, code_dim={self.code_dim}), "
                             f"got {self.spicule_code_index}")
        if self.lobes and self.kind != "proposed":
            raise ValueError(f"lobes is a setting of the proposed generator, not of {self.kind!r}")
        if self.lobes and not 0 <= self.lobe_code_index < self.code_dim:
            raise ValueError(f"lobe_code_index must lie in [0, code_dim={self.code_dim}), got {self.lobe_code_index}")
        if not (math.isfinite(self.lobe_spread) and self.lobe_spread > 0):
            raise ValueError(f"lobe_spread must be a finite number > 0, got {self.lobe_spread}")
        if self.lobe_spread != 1.0 and not self.lobes:
            raise ValueError("lobe_spread is a setting of the drawn lobes (lobes=true)")
        if self.lobe_replace_outline and not self.lobes:
            raise ValueError("lobe_replace_outline is a setting of the drawn lobes (lobes=true)")
        for name in ("spicule_solid", "spicule_contrast"):
            if getattr(self, name) and not self.spicules:
                raise ValueError(f"{name} is a setting of the drawn spicules (spicules > 0)")
        if self.spicules_follow_outline and not self.spicules:
            raise ValueError("spicules_follow_outline is a setting of the drawn spicules (spicules > 0)")
        if self.spicule_solid and self.spicule_contrast:
            raise ValueError("spicule_solid and spicule_contrast are two ways to paint the strands: choose one")
        if self.spicule_cap and not self.spicule_contrast:
            raise ValueError("spicule_cap caps the strands that spicule_contrast paints: set spicule_contrast=true too")
        if self.open_own_mask and self.kind != "proposed":
            raise ValueError(f"open_own_mask is a setting of the proposed generator, not of {self.kind!r}")
        if self.slice_position and self.kind == "inpainting":
            raise ValueError("slice_position is a setting of the gene-conditioned generators, not of 'inpainting'")

    @property
    def resolutions(self) -> list[int]:
        """Resolution of every level, coarse → fine: [4, 8, …, patch_size]."""
        return [BOTTLENECK * 2**i for i in range(int(math.log2(self.patch_size // BOTTLENECK)) + 1)]

    def channels(self, resolution: int) -> int:
        """Channel width at a resolution level: doubles per halving from base_channels, capped."""
        halvings = int(math.log2(self.patch_size // resolution))
        return min(self.base_channels * 2**halvings, self.max_channels)

    @property
    def pixel_noise_size(self) -> int:
        """Side of the per-pixel noise map the generator takes (0 when it takes none)."""
        return self.patch_size if self.pixel_noise else 0

    @property
    def style_dim(self) -> int:
        return self.code_dim + self.noise_dim + (POSITION_FEATURES if self.slice_position else 0)


class GeneratorOutput(NamedTuple):
    image: Tensor                  # (B,1,H,W) in [-1,1]
    mask: Tensor                   # (B,1,H,W) probability in [0,1]
    weight_maps: list[Tensor]      # fusion weight map of every level, coarse→fine, each (B,1,h,w) in [0,1];
    #                                with the code-driven edge inside the mask the finest is W ⊙ mask, blurred
    #                                as the change is: where the output can differ from the background
    gene_code: Tensor | None       # φ(g) (B, code_dim); None for inpainting


# ----------------------------------------------------------------------------------------------------
# Small named layers


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class ConvBNAct(nn.Sequential):
    """conv → batch norm → LeakyReLU; the conv has no bias (batch norm would cancel it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
        # He init for LeakyReLU(0.2): unit gain per layer, so that at initialisation (batch norm running
        # stats = identity in eval mode) a signal injected at 4×4, e.g. MC-GAN's gene map, still reaches
        # the output instead of shrinking by PyTorch's default ≈ 1/√3 per layer
        nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), _act())


class AdaIN(nn.Module):
    """Adaptive instance normalisation (Karras et al.): per-channel scale and shift predicted from the style."""

    def __init__(self, channels: int, style_dim: int) -> None:
        super().__init__()
        self.affine = nn.Linear(style_dim, 2 * channels)
        # start near the identity style (scale 1, shift 0), as stylegan does, but not at it exactly,
        # so the style (genes and noise) already changes the output at initialisation
        nn.init.normal_(self.affine.weight, std=0.5 / math.sqrt(style_dim))
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        gamma, beta = self.affine(style)[:, :, None, None].chunk(2, dim=1)
        return F.instance_norm(x, eps=1e-5) * (1.0 + gamma) + beta


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _background_logit(background: Tensor) -> Tensor:
    """The background in tanh-logit space, so that tanh(image head) can reproduce it exactly."""
    return torch.atanh(background.clamp(-1.0 + _LOGIT_EPS, 1.0 - _LOGIT_EPS))


class ImageHead(nn.Module):
    """3×3 conv → tanh; initialised to copy channel 0 (the background logit) with a small learned rest."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)
            self.conv.weight[0, 0, 1, 1] += 1.0
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(x))


class MaskHead(nn.Module):
    """3×3 conv → sigmoid: the nodule mask probability."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.constant_(self.conv.bias, _MASK_INIT_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.conv(x))


# ----------------------------------------------------------------------------------------------------
# Gene mapping network (Fig. 1a, right) and background encoder (Fig. 1a, left)


class GeneMappingNetwork(nn.Module):
    """Exactly two FC layers, g → φ(g) (paper §2.1: chosen for interpretability of the gene code)."""

    def __init__(self, num_genes: int, hidden: int, code_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_genes, hidden)
        self.act = _act()
        self.fc2 = nn.Linear(hidden, code_dim)

    def forward(self, genes: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(genes)))


class BackgroundEncoder(nn.Module):
    """Strided convs; returns the feature of every level, fine → coarse (full size … 4×4).

    With `raw_channel`, channel 0 of the full-resolution feature is the background logit itself (see the
    module docstring); the other channels come from a 3×3 stem.
    """

    def __init__(self, config: GeneratorConfig, in_channels: int = 1, raw_channel: bool = True) -> None:
        super().__init__()
        self.raw_channel = raw_channel
        sizes = config.resolutions[::-1]                       # fine → coarse
        full = config.channels(sizes[0])
        self.stem = ConvBNAct(in_channels, full - 1 if raw_channel else full, 3)
        self.down = nn.ModuleDict({
            f"b{res}": ConvBNAct(config.channels(2 * res), config.channels(res), 3, stride=2)
            for res in sizes[1:]
        })

    def forward(self, x: Tensor) -> list[Tensor]:
        feature = self.stem(x)
        if self.raw_channel:
            feature = torch.cat([_background_logit(x[:, :1]), feature], dim=1)
        features = [feature]
        for layer in self.down.values():
            features.append(layer(features[-1]))
        return features


# ----------------------------------------------------------------------------------------------------
# Fusion block (Fig. 1b) and the proposed generator (Fig. 1a)


class FusionBlock(nn.Module):
    """One resolution level of Fig. 1b: separates object from background and lets the genes style the object.

    synthetic features x → (3×3 conv, BN, act) → (1×1 conv, BN) → 2C channels, split into
    W = σ(first C) (a weight per channel and pixel) and O = act(last C); then
    out = W ⊙ AdaIN(W ⊙ O, style) + (1 − W) ⊙ B, B the background encoder's feature at this level.

    Decisions, each to keep the (1 − W) ⊙ B path an exact pass-through:
    - AdaIN(W ⊙ O) is gated by W once more: instance norm re-inflates W ⊙ O where W ≈ 0 and the style
      shift is added everywhere, so without the gate the style would leak into the background that W
      means to keep. The normalisation statistics still come from W ⊙ O (the object), as in the paper.
    - The weight half skips the activation: a LeakyReLU before σ would squash negative logits 5× and
      make W → 0 hard to reach.
    - The second conv is 1×1 (the first already sees 3×3 context), which keeps the generator ≤ 5 M
      parameters at 64² with 5172 genes.
    - The first conv also changes the width from the previous level's (it is the "decoding" conv after
      the upsampling), so there is no separate upsampling conv.
    With `pixel_noise`, strength ⊙ n (n the level's noise map, a learned strength per channel from 0) is added to
    the object half before its activation, as StyleGAN adds its noise inputs; the weight half gets none.
    The returned weight map is the channel mean of W, (B,1,h,w) in [0,1], for visualisation.
    """

    def __init__(self, in_channels: int, channels: int, style_dim: int, pixel_noise: bool = False) -> None:
        super().__init__()
        self.noise_strength = nn.Parameter(torch.zeros(channels)) if pixel_noise else None
        self.conv1 = ConvBNAct(in_channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * channels)
        self.act = _act()
        self.adain = AdaIN(channels, style_dim)
        with torch.no_grad():
            self.norm2.bias[:channels].fill_(_WEIGHT_INIT_BIAS)

    def forward(self, x: Tensor, background: Tensor, style: Tensor, noise_map: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        weight_logit, obj = self.norm2(self.conv2(self.conv1(x))).chunk(2, dim=1)
        if self.noise_strength is not None:
            if noise_map is None:
                raise ValueError("this fusion block adds per-pixel noise: pass its noise map")
            obj = obj + self.noise_strength.to(obj.dtype)[None, :, None, None] * noise_map.to(obj.dtype)
        weight = torch.sigmoid(weight_logit)
        out = weight * self.adain(weight * self.act(obj), style) + (1.0 - weight) * background
        return out, weight.mean(dim=1, keepdim=True)


def _check_inputs(config: GeneratorConfig, background: Tensor, genes: Tensor | None, need_genes: bool) -> None:
    size = config.patch_size
    if background.ndim != 4 or background.shape[1] != 1 or background.shape[2:] != (size, size):
        raise ValueError(f"background must be (B,1,{size},{size}), got {tuple(background.shape)}")
    if not need_genes:
        return
    if genes is None:
        raise ValueError(f"the {config.kind} generator needs a gene vector (B,{config.num_genes})")
    if genes.ndim != 2 or genes.shape != (background.shape[0], config.num_genes):
        raise ValueError(f"genes must be (B={background.shape[0]}, {config.num_genes}), got {tuple(genes.shape)}")


class CodeDrivenEdge(nn.Module):
    """Blur the generated change by a per-sample Gaussian whose width one gene-code coordinate sets.

    image = background + G_σ * (image − background), σ = σ₀·exp(−k·code[:, index] / anchor_sd) px, clamped to
    [MIN_SIGMA, MAX_SIGMA]; σ₀ (learned, starts at 1 px) sets the cohort's typical edge, k (fixed) how far one
    sd of the coordinate moves it. Why blur the change and not the image: the background's own texture stays as it was.
    With `over` (and `inside_mask`) the blurred nodule is laid over the background with the blurred mask as its
    alpha, image = G_σ * (mask · image) + (1 − G_σ * mask) · background: the same outside the nodule, and inside
    it the background is covered rather than kept in its detail finer than σ.
    """

    MIN_SIGMA, MAX_SIGMA = 0.05, 3.0
    RADIUS = 9                     # 3 × MAX_SIGMA: the kernel's tail beyond is < 1 %

    def __init__(self, per_sd: float, index: int, inside_mask: bool = False, anchor_sd: float = 1.0,
                 over: bool = False) -> None:
        super().__init__()
        if over and not inside_mask:
            raise ValueError("the edge lays the nodule over the background only when kept inside the mask")
        self.index, self.inside_mask, self.over = int(index), bool(inside_mask), bool(over)
        self.per_unit = float(per_sd) / float(anchor_sd)   # the code's units are anchor_sd per sd
        self.log_sigma0 = nn.Parameter(torch.zeros(()))

    def sigma(self, code: Tensor) -> Tensor:
        """(B,) edge widths in pixels for gene codes (B, code_dim)."""
        log_sigma = self.log_sigma0 - self.per_unit * code[:, self.index].float()
        return log_sigma.exp().clamp(self.MIN_SIGMA, self.MAX_SIGMA)

    def blur(self, x: Tensor, code: Tensor) -> Tensor:
        """(B,C,H,W) maps blurred per sample by σ(code): a separable Gaussian, one group per sample and channel."""
        sigma = self.sigma(code)
        offsets = torch.arange(-self.RADIUS, self.RADIUS + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]).square())
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)          # (B, 2R+1)
        b, c, h, w = x.shape
        if c > 1:
            kernel = kernel.repeat_interleave(c, dim=0)
        r = self.RADIUS
        flat = x.reshape(1, b * c, h, w)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kernel[:, None, :, None], groups=b * c)
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
        return flat.reshape(b, c, h, w)

    def forward(self, image: Tensor, background: Tensor, code: Tensor, mask: Tensor | None = None) -> Tensor:
        """The blurred change added to the background; with `inside_mask`, the change is first × `mask`; with
        `over`, the blurred masked image laid over the background instead."""
        if self.inside_mask and mask is None:
            raise ValueError("this edge keeps the change inside the mask: pass the generator's mask")
        if self.over:   # one blur of [mask · image, mask]: the nodule's premultiplied layer and its alpha
            layer, alpha = self.blur(torch.cat([mask * image, mask], dim=1), code).split(1, dim=1)
            return (layer + (1.0 - alpha) * background).clamp(-1.0, 1.0)
        change = image - background
        if self.inside_mask:
            change = change * mask
        return (background + self.blur(change, code)).clamp(-1.0, 1.0)


class CodeDrivenSpicules(nn.Module):
    """Draw up to K thin strands from the drawn mask's body outwards, their presence set by one gene-code coordinate.

    Strand k leaves the mask's centroid c in direction u_k, starts inside the body (at 0.85 R, R = √(area/π), or
    with `follow_outline` the outline's own radius r_k along u_k) and ends L_k beyond it. Its map is a_k ·
    exp(−d²/2w²) · [start < along < R + L_k] (soft ends), d the distance to the ray, w = WIDTH_PX: above the mask's
    0.5 threshold a line 1–2 px wide, which the evaluation's opening removes and counts as a long strand. a_k =
    σ(k·code[index]/anchor_sd + b₀ + NOISE_GAIN·z_k) (× the slice's relative cross-section √(1 − t²) with a slice
    position): more strands where the genotype is more spiculated. L_k = exp(ℓ₀ +
    LENGTH_PER_SD·code[index]/anchor_sd) · (0.6 + 0.8 v_k). u_k, z_k, v_k are fixed projections of the style noise
    (a nodule's slices share it), so noise moves the strands. b₀ and ℓ₀ are learned; k is fixed, as the edge's
    factor is, so that the genes keep their say. The geometry (c, R) is the drawn mask's ([m > 0.5]: the soft mask's
    faint fill would pull c towards the patch centre and inflate R, so that strands started outside the body, as
    they did in the first runs, README round 17) and carries no gradient. The strands join the mask as a union and
    take the nodule's mean intensity in the image (fully wherever the mask's 0.5 threshold keeps them), before the
    edge blur — or, after it (`paint_after_edge`), one learned solid value (`solid`) or the background raised by the
    real strands' contrast (`contrast`, `calibrate_contrast`).
    """

    PER_SD = 1.5          # logit of a strand's presence per sd of the anchored coordinate
    LENGTH_PER_SD = 0.2   # log length per sd
    NOISE_GAIN = 1.5      # logit spread of the strands' presence between draws
    WIDTH_PX = 0.5        # Gaussian half-width of a strand's profile
    START = 0.85          # strands start at START · R from the centroid, inside the body
    END_SOFTNESS_PX = 0.5
    MIN_AREA_PX = 4.0     # below this drawn area no strands (an empty nodule grows none)
    _PROJECTION_SEED = 20261204

    ZERO_HU = 1.0 / 3.0       # 0 HU in the unit range of the (−1000, 500) HU window
    SOLID_START = ZERO_HU     # a solid strand's start
    CONTRAST_START = 292.0 * 2.0 / 1500.0   # cohort 5's real strands' 292 HU over the lung, in unit range

    def __init__(self, count: int, index: int, noise_dim: int, anchor_sd: float = 1.0, solid: bool = False,
                 contrast: bool = False, follow_outline: bool = False, cap: bool = False) -> None:
        super().__init__()
        if solid and contrast:
            raise ValueError("the strands are painted at a solid value or at a contrast over the background, not both")
        if cap and not contrast:
            raise ValueError("the cap applies to strands painted at a contrast over the background (contrast=True)")
        self.cap = bool(cap)   # `GeneratorConfig.spicule_cap`
        self.count, self.index = int(count), int(index)
        self.follow_outline = bool(follow_outline)   # `GeneratorConfig.spicules_follow_outline`
        self.per_unit = 1.0 / float(anchor_sd)
        self.presence_bias = nn.Parameter(torch.tensor(-1.0))       # b₀: few strands at the cohort's mean
        self.log_length0 = nn.Parameter(torch.tensor(math.log(5.0)))  # ℓ₀: 5 px (≈ 5 mm at 64²)
        # `GeneratorConfig.spicule_solid`: one learned intensity for every strand, painted by `paint_after_edge`
        self.solid_value = nn.Parameter(torch.tensor(self.SOLID_START)) if solid else None
        # `GeneratorConfig.spicule_contrast`: the real strands' contrast over the lung (unit range; saved with the
        # weights, set by `calibrate_contrast`), painted by `paint_after_edge`
        if contrast:
            self.register_buffer("contrast", torch.tensor(self.CONTRAST_START))
        else:
            self.contrast = None
        # Fixed projections of the noise (own generator: the global RNG, and so every other layer's
        # initialisation, stays as it is without the module). Without noise the strands fan out evenly.
        rng = torch.Generator().manual_seed(self._PROJECTION_SEED)
        self.register_buffer("projection", torch.randn(max(noise_dim, 1), 4 * self.count, generator=rng)
                             / math.sqrt(max(noise_dim, 1)), persistent=False)
        angles = 2 * math.pi * torch.arange(self.count) / self.count
        self.register_buffer("even_directions", torch.stack([angles.cos(), angles.sin()], dim=1), persistent=False)

    @torch.no_grad()
    def calibrate_presence(self, coordinates: Sequence[float], share: float) -> float:
        """Set and return b₀ such that the expected share of nodules with at least one strand drawn equals `share`
        (clipped to [0.001, 0.999]) for donors whose anchored coordinate, in sd, is `coordinates`, each donor
        weighing the same. Strand k is drawn where σ(logit) passes the label's ½, so with probability
        p_k = Φ((k·c + b₀) / (NOISE_GAIN · s_k)) over the noise, s_k its jitter's sd (its projection's norm, for
        N(0, 1) noise), and a nodule carries one with 1 − Π(1 − p_k). Why: b₀ learns slowly (−1 → −1.2 to −1.3
        in 2000 steps), and from −1 the strands were drawn on half the nodules where 21 % of the real slices have
        one (README round 17): the start decides how often."""
        if len(coordinates) == 0:
            raise ValueError("calibrating the strands' presence needs at least one donor")
        target = min(max(float(share), 1e-3), 1.0 - 1e-3)
        jitter_sd = self.projection[:, 2 * self.count: 3 * self.count].double().norm(dim=0)     # (K,)
        scaled = self.PER_SD * torch.as_tensor(coordinates, dtype=torch.float64)[:, None]      # (D, 1)
        normal = torch.distributions.Normal(0.0, 1.0)

        def expected_share(bias: float) -> float:
            absent = 1.0 - normal.cdf((scaled + bias) / (self.NOISE_GAIN * jitter_sd))   # (D, K)
            return float((1.0 - absent.prod(dim=1)).mean())

        low, high = -40.0, 40.0    # the share rises with b₀: bisect
        for _ in range(60):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if expected_share(middle) < target else (low, middle)
        self.presence_bias.fill_(0.5 * (low + high))
        return self.presence_bias.item()

    @property
    def paints_after_edge(self) -> bool:
        """Whether the strands are painted after the edge blur (`paint_after_edge`) rather than in `forward`."""
        return self.solid_value is not None or self.contrast is not None

    @torch.no_grad()
    def calibrate_contrast(self, unit: float) -> None:
        """Set the contrast over the background, in unit range (2 / 1500 per HU in the default window), that the
        strands are painted at: the training donors' real strands' (`training.iteration.real_strand_contrast`)."""
        if self.contrast is None:
            raise RuntimeError("calibrate_contrast needs a module built with contrast=True")
        if not (math.isfinite(unit) and unit > 0):
            raise ValueError(f"the strands' contrast must be a finite number > 0, got {unit}")
        self.contrast.fill_(float(unit))

    def strand_parameters(self, code: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(B,K,2) unit directions (row, column), (B,K) presence logits and (B,K) lengths in pixels."""
        batch, k = code.shape[0], self.count
        coordinate = code[:, self.index].float() * self.per_unit
        if noise is not None and noise.shape[1] > 0:
            drawn = noise.float() @ self.projection[: noise.shape[1]]             # (B, 4K), ≈ N(0, 1) each
            direction = drawn[:, : 2 * k].reshape(batch, k, 2)
            direction = direction / direction.norm(dim=2, keepdim=True).clamp_min(1e-6)
            jitter, spread = drawn[:, 2 * k: 3 * k], torch.sigmoid(drawn[:, 3 * k:])
        else:
            direction = self.even_directions.expand(batch, k, 2)
            jitter = torch.zeros(batch, k, device=code.device)
            spread = torch.full((batch, k), 0.5, device=code.device)
        logit = self.PER_SD * coordinate[:, None] + self.presence_bias + self.NOISE_GAIN * jitter
        length = torch.exp(self.log_length0 + self.LENGTH_PER_SD * coordinate)[:, None] * (0.6 + 0.8 * spread)
        return direction, logit, length

    def strands(self, mask: Tensor, code: Tensor, noise: Tensor | None, position: Tensor | None = None) -> Tensor:
        """(B,1,H,W) the union of the strands' maps, in [0, 1]."""
        h, w = mask.shape[-2:]
        direction, logit, length = self.strand_parameters(code, noise)
        rows = torch.arange(h, device=mask.device, dtype=torch.float32)
        cols = torch.arange(w, device=mask.device, dtype=torch.float32)
        area, centre_r, centre_c = _drawn_centroid(mask)   # the soft mask's faint fill would move c and inflate R
        with torch.no_grad():
            radius = (area / math.pi).sqrt()
            present = (area / self.MIN_AREA_PX).clamp(max=1.0)
            dr = rows[None, :, None] - centre_r[:, None, None]                      # (B,H,1)
            dc = cols[None, None, :] - centre_c[:, None, None]                      # (B,1,W)
        amplitude = torch.sigmoid(logit) * present[:, None]
        if position is not None:
            amplitude = amplitude * relative_cross_section(position.float())[:, None]
        along = dr[:, None] * direction[..., 0, None, None] + dc[:, None] * direction[..., 1, None, None]
        across = dr[:, None] * direction[..., 1, None, None] - dc[:, None] * direction[..., 0, None, None]
        if self.follow_outline:   # each strand from the outline's own radius along its direction
            radius = outline_radius(mask, centre_r, centre_c, direction.detach().float())
        else:
            radius = radius[:, None].expand_as(length)
        start = (self.START * radius)[..., None, None]
        end = radius[..., None, None] + length[..., None, None]
        soft = self.END_SOFTNESS_PX
        profile = (torch.exp(-0.5 * (across / self.WIDTH_PX).square())
                   * torch.sigmoid((along - start) / soft) * torch.sigmoid((end - along) / soft))
        union = 1.0 - torch.prod(1.0 - amplitude[..., None, None] * profile, dim=1)   # (B,H,W)
        return union[:, None].to(mask.dtype)

    def forward(self, image: Tensor, mask: Tensor, code: Tensor, noise: Tensor | None,
                position: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The image with the strands at the nodule's mean intensity (unchanged where `paint_after_edge` paints
        them later), the mask with the strands joined, and the strands' map."""
        strand = self.strands(mask, code, noise, position)
        joined = 1.0 - (1.0 - mask) * (1.0 - strand)
        if self.paints_after_edge:
            return image, joined, strand
        inside = _drawn_pixels(mask).to(image.dtype)
        area = inside.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        value = (image.detach() * inside).sum(dim=(2, 3), keepdim=True) / area
        return self._paint(image, strand, value), joined, strand

    @staticmethod
    def _paint(image: Tensor, strand: Tensor, value: Tensor) -> Tensor:
        fill = (2.0 * strand).clamp(max=1.0)   # where the strand passes the mask's threshold, the image is nodule
        return image + fill * (value - image)

    def paint_after_edge(self, image: Tensor, background: Tensor, strand: Tensor) -> Tensor:
        """The image with the strands painted after the edge blur, so they stay sharp: at the learned solid value,
        or raised to at least the background + the calibrated contrast (never darkened: a strand leaving a
        brighter nodule keeps the nodule's value), with `cap` that target at most max(background, 0 HU)."""
        if self.solid_value is not None:
            return self._paint(image, strand, self.solid_value.to(image.dtype))
        if self.contrast is None:
            raise RuntimeError("paint_after_edge needs a module built with solid=True or contrast=True")
        target = (background + self.contrast.to(image.dtype)).clamp(max=1.0)   # the window's top
        if self.cap:   # over tissue (≥ 0 HU) the strand merges with it; in the lung the cap lies far above
            target = torch.minimum(target, background.clamp(min=self.ZERO_HU))
        return self._paint(image, strand, torch.maximum(image, target))


class CodeDrivenLobes(nn.Module):
    """Warp the drawn nodule radially so that its outline carries lobes whose height one gene-code coordinate sets.

    Around the drawn mask's centroid c the output at radius r and angle θ takes the nodule's change (image −
    background) and its mask from radius r / (1 + A·f(θ)): an outline r = R moves to R·(1 + A·f(θ)).
    f = Σ_k w_k cos(kθ + φ_k) over k = 3…8, scaled to unit RMS, w_k = exp(−k²/16)·(½ + σ(z_k)) — the spectrum of
    the phantom's lobes, bumps about 0.35 rad wide — and w_k's jitter z_k and the phases φ_k fixed projections of
    the style noise, which a nodule's slices share. A = clamp(mean + spread · sd · code[index] / anchor_sd, 0,
    MAX_AMPLITUDE) (`spread` 1 unless `GeneratorConfig.lobe_spread` widens it):
    the coordinate, which training anchors to the donor's z-scored real `metrics.lobe_amplitude`, turned back into
    that measure's units with the training donors' mean and sd (`calibrate`; stored with the weights), since
    `lobe_amplitude` reads ≈ A for such an outline. No learned parameter, as the edge's and the strands' factors are
    fixed, so that the genes keep their say. The geometry (c, the drawn area) is [mask > 0.5]'s and carries no
    gradient; a drawn area under MIN_AREA_PX gets no lobes. The background is not moved: only the change is.
    With `replace_outline` the drawn outline's own lobes h(θ) (its radius's harmonics 3–8 over the mean radius, read
    as `metrics.lobe_amplitude` reads them, no gradient) are divided out by the same warp: r = R·(1 + h(θ)) moves to
    R·(1 + A·f(θ)), so the outline's lobes are the drawn ones alone.
    """

    HARMONICS = (3, 4, 5, 6, 7, 8)
    SPECTRUM_WIDTH = 16.0     # w_k ∝ exp(−k² / SPECTRUM_WIDTH): a von Mises bump with κ = 8
    MAX_AMPLITUDE = 0.4       # with f's peaks at ≈ 2, the outline stays at radii ≥ 0.2 R
    MIN_FACTOR = 0.2
    MIN_AREA_PX = 4.0
    OUTLINE_RAYS = 128        # the own outline read as `metrics.lobe_amplitude` reads it: rays, step, harmonics
    MAX_OWN_LOBE = 0.5        # |h(θ)| capped, so that 1 + h stays ≥ ½ on a ragged outline
    _PROJECTION_SEED = 20261205

    def __init__(self, index: int, noise_dim: int, anchor_sd: float = 1.0, spread: float = 1.0,
                 replace_outline: bool = False) -> None:
        super().__init__()
        self.index = int(index)
        self.per_unit = 1.0 / float(anchor_sd)
        self.spread = float(spread)
        self.replace_outline = bool(replace_outline)
        count = len(self.HARMONICS)
        # the training donors' real lobe_amplitude, mean and sd (`calibrate`); saved with the weights
        self.register_buffer("amplitude_mean", torch.tensor(0.05))
        self.register_buffer("amplitude_sd", torch.tensor(0.03))
        rng = torch.Generator().manual_seed(self._PROJECTION_SEED)   # own generator: the global RNG is untouched
        self.register_buffer("projection", torch.randn(max(noise_dim, 1), 2 * count, generator=rng)
                             / math.sqrt(max(noise_dim, 1)), persistent=False)
        self.register_buffer("harmonics", torch.tensor(self.HARMONICS, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def calibrate(self, mean: float, sd: float) -> None:
        """Set the real measure's mean and sd over the training donors, which the anchor's z-score used."""
        if not (math.isfinite(mean) and math.isfinite(sd) and sd >= 0):
            raise ValueError(f"lobe calibration needs a finite mean and sd ≥ 0, got {mean}, {sd}")
        self.amplitude_mean.fill_(float(mean))
        self.amplitude_sd.fill_(float(sd))

    def amplitude(self, code: Tensor) -> Tensor:
        """(B,) lobe heights A, relative to the radius, for gene codes (B, code_dim)."""
        value = self.amplitude_mean + self.spread * self.amplitude_sd * code[:, self.index].float() * self.per_unit
        return value.clamp(0.0, self.MAX_AMPLITUDE)

    def profile(self, theta: Tensor, noise: Tensor | None) -> Tensor:
        """f(θ) for angles (B,H,W): unit RMS over θ."""
        batch, count = theta.shape[0], len(self.HARMONICS)
        if noise is not None and noise.shape[1] > 0:
            drawn = noise.float() @ self.projection[: noise.shape[1]]              # (B, 2K), ≈ N(0, 1) each
            jitter, phase = drawn[:, :count], math.pi * drawn[:, count:]
        else:
            jitter = torch.zeros(batch, count, device=theta.device)
            phase = torch.zeros(batch, count, device=theta.device)
        weight = torch.exp(-self.harmonics.square() / self.SPECTRUM_WIDTH) * (0.5 + torch.sigmoid(jitter))
        weight = weight / (0.5 * weight.square().sum(dim=1, keepdim=True)).sqrt()     # unit RMS
        waves = torch.cos(self.harmonics[None, :, None, None] * theta[:, None] + phase[..., None, None])
        return (weight[..., None, None] * waves).sum(dim=1)

    def forward(self, image: Tensor, mask: Tensor, background: Tensor, code: Tensor, noise: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        """The image and mask with the nodule warped to its lobed outline."""
        h, w = mask.shape[-2:]
        rows = torch.arange(h, device=mask.device, dtype=torch.float32)[None, :, None]
        cols = torch.arange(w, device=mask.device, dtype=torch.float32)[None, None, :]
        area, centre_r, centre_c = _drawn_centroid(mask)
        with torch.no_grad():
            present = (area >= self.MIN_AREA_PX).float()
            dr = rows - centre_r[:, None, None]
            dc = cols - centre_c[:, None, None]
            theta = torch.atan2(dr, dc)
        height = self.amplitude(code) * present
        factor = (1.0 + height[:, None, None] * self.profile(theta, noise)).clamp_min(self.MIN_FACTOR)
        if self.replace_outline:
            factor = factor / (1.0 + self.own_lobes(mask, centre_r, centre_c, theta) * present[:, None, None])
        source_r = centre_r[:, None, None] + dr / factor
        source_c = centre_c[:, None, None] + dc / factor
        grid = torch.stack([source_c * (2.0 / max(w - 1, 1)) - 1.0, source_r * (2.0 / max(h - 1, 1)) - 1.0], dim=-1)
        stacked = torch.cat([image - background, mask], dim=1)
        warped = F.grid_sample(stacked, grid.to(stacked.dtype), mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        return background + warped[:, :1], warped[:, 1:]

    @torch.no_grad()
    def own_lobes(self, mask: Tensor, centre_r: Tensor, centre_c: Tensor, theta: Tensor) -> Tensor:
        """h(θ) at angles (B,H,W): the drawn outline's harmonics 3–8 relative to its mean radius, its radius along
        each of OUTLINE_RAYS rays from the centroid being where [mask > 0.5]'s bilinear occupancy first falls
        under ½ (the rays and steps of `metrics.lobe_amplitude`)."""
        rays = 2.0 * math.pi * torch.arange(self.OUTLINE_RAYS, device=mask.device) / self.OUTLINE_RAYS
        directions = torch.stack([rays.sin(), rays.cos()], dim=1).expand(mask.shape[0], -1, -1)
        radius = outline_radius(mask, centre_r, centre_c, directions)                              # (B, rays)
        mean = radius.mean(dim=1, keepdim=True)
        spectrum = torch.fft.rfft(radius / mean.clamp_min(1e-6), dim=1) * (2.0 / self.OUTLINE_RAYS)
        harmonics = self.harmonics.to(theta.dtype)
        picked = spectrum[:, harmonics.long()]                                                    # (B, K)
        waves = harmonics[None, :, None, None] * theta[:, None]
        own = (picked.real[..., None, None] * torch.cos(waves) - picked.imag[..., None, None] * torch.sin(waves))
        own = own.sum(dim=1) * (mean[:, :, None] > 0)
        return own.clamp(-self.MAX_OWN_LOBE, self.MAX_OWN_LOBE)


OUTLINE_STEP_PX = 0.25   # the step along a ray of `outline_radius`, as `metrics.lobe_amplitude` steps


@torch.no_grad()
def outline_radius(mask: Tensor, centre_r: Tensor, centre_c: Tensor, directions: Tensor) -> Tensor:
    """(B, K) the drawn outline's distance from (centre_r, centre_c) along unit `directions` (B, K, 2) (row,
    column): where [mask > 0.5]'s bilinear occupancy, sampled every OUTLINE_STEP_PX, first falls under ½ (the
    patch's size where it never does). No gradient."""
    h, w = mask.shape[-2:]
    steps = torch.arange(0.0, float(max(h, w)), OUTLINE_STEP_PX, device=mask.device)
    sample_r = centre_r[:, None, None] + steps[None, None, :] * directions[..., 0, None]        # (B, K, steps)
    sample_c = centre_c[:, None, None] + steps[None, None, :] * directions[..., 1, None]
    grid = torch.stack([sample_c * (2.0 / max(w - 1, 1)) - 1.0, sample_r * (2.0 / max(h - 1, 1)) - 1.0], dim=-1)
    occupancy = F.grid_sample(_drawn_pixels(mask).float(), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=True)[:, 0]
    outside = occupancy < 0.5
    first = torch.where(outside.any(dim=2), outside.float().argmax(dim=2), steps.numel() - 1)
    return steps[first]


def _cross_neighbours(x: Tensor) -> Tensor:
    """(5, B, C, H, W): each pixel and its four edge neighbours, 0 beyond the border (scipy's border_value)."""
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    return torch.stack([padded[..., 1:h + 1, 1:w + 1], padded[..., :h, 1:w + 1], padded[..., 2:, 1:w + 1],
                        padded[..., 1:h + 1, :w], padded[..., 1:h + 1, 2:]])


def open_with_cross(mask: Tensor) -> Tensor:
    """Grayscale opening of a (B,1,H,W) soft mask with the 3×3 cross: [result > t] equals the binary opening of
    [mask > t] for every threshold t (flat morphology commutes with thresholds), so the label loses exactly its
    parts at most about 2 px wide (`training.metrics.thin_strands`)."""
    eroded = _cross_neighbours(mask).amin(dim=0)
    return _cross_neighbours(eroded).amax(dim=0)


def _drawn_pixels(mask: Tensor) -> Tensor:
    """[mask > 0.5], detached: the pixels the label keeps."""
    return mask.detach() > 0.5


@torch.no_grad()
def _drawn_centroid(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B,) the drawn area ([mask > 0.5], pixels) and its centroid's row and column; no gradient."""
    h, w = mask.shape[-2:]
    rows = torch.arange(h, device=mask.device, dtype=torch.float32)
    cols = torch.arange(w, device=mask.device, dtype=torch.float32)
    weight = _drawn_pixels(mask).float()[:, 0]
    area = weight.sum(dim=(1, 2))
    centre_r = (weight.sum(dim=2) * rows).sum(dim=1) / area.clamp_min(1e-6)
    centre_c = (weight.sum(dim=1) * cols).sum(dim=1) / area.clamp_min(1e-6)
    return area, centre_r, centre_c


def relative_cross_section(position: Tensor) -> Tensor:
    """√(1 − t²) of slice positions t (clamped to [−1, 1]): a sphere's cross-section relative to its centre's."""
    return (1.0 - position.clamp(-1.0, 1.0).square()).clamp_min(0.0).sqrt()


POSITION_FEATURES = 2  # (t, √(1 − t²)) of the slice position t
# The features' scale in the style, where the anchored code coordinates have sd 3 (`anchor_sd`) and the free
# ones more: at 1 the trained generators drew the same area at every t (slice profile gap 0.40 against 0.41
# for generators without the input; three seeds on the unseen cohort, README round 8), as if they could not
# hear the position among the code. 3 was set after seeing that, on the same cohort.
POSITION_GAIN = 3.0


def position_features(position: Tensor) -> Tensor:
    """(B,) slice positions t (clamped to [−1, 1]) → (B, 2) POSITION_GAIN · (t, √(1 − t²))."""
    return POSITION_GAIN * torch.stack([position.clamp(-1.0, 1.0), relative_cross_section(position)], dim=1)


def _style(config: GeneratorConfig, code: Tensor, noise: Tensor | None, position: Tensor | None = None) -> Tensor:
    """style = [φ(g), n] (+ the slice position's features with `slice_position`; the centre, t = 0, when not
    given); n ~ N(0, I) when not given."""
    batch = code.shape[0]
    if noise is None:
        noise = torch.randn(batch, config.noise_dim, device=code.device, dtype=code.dtype)
    if noise.shape != (batch, config.noise_dim):
        raise ValueError(f"noise must be (B={batch}, {config.noise_dim}), got {tuple(noise.shape)}")
    parts = [code, noise.to(code.dtype)]
    if config.slice_position:
        if position is None:
            position = torch.zeros(batch, device=code.device, dtype=code.dtype)
        if position.shape != (batch,):
            raise ValueError(f"position must be (B={batch},), got {tuple(position.shape)}")
        parts.append(position_features(position.to(code.dtype)))
    return torch.cat(parts, dim=1)


def level_noise(pixel_noise: Tensor, resolution: int) -> Tensor:
    """The (B,1,S,S) standard-normal map average-pooled to `resolution` and scaled back to unit variance."""
    factor = pixel_noise.shape[-1] // resolution
    return F.avg_pool2d(pixel_noise, factor) * factor if factor > 1 else pixel_noise


class ProposedGenerator(nn.Module):
    """Fig. 1a: background encoder + gene mapping network + a fusion block at every level, 4×4 → full size."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.mapping = GeneMappingNetwork(config.num_genes, config.gene_hidden, config.code_dim)
        self.encoder = BackgroundEncoder(config)
        self.blocks = nn.ModuleDict()
        previous = config.channels(BOTTLENECK)                  # synthesis starts from the bottleneck feature
        for res in config.resolutions:
            self.blocks[f"b{res}"] = FusionBlock(previous, config.channels(res), config.style_dim, config.pixel_noise)
            previous = config.channels(res)
        self.image_head = ImageHead(previous)
        self.mask_head = MaskHead(previous)
        self.edge = (CodeDrivenEdge(config.edge_blur_per_sd, config.edge_code_index, config.edge_inside_mask,
                                    config.anchor_sd, config.edge_over_background)
                     if config.edge_blur_per_sd else None)
        self.spicules = (CodeDrivenSpicules(config.spicules, config.spicule_code_index, config.noise_dim,
                                            config.anchor_sd, config.spicule_solid, config.spicule_contrast,
                                            config.spicules_follow_outline, config.spicule_cap)
                         if config.spicules else None)
        self.lobes = (CodeDrivenLobes(config.lobe_code_index, config.noise_dim, config.anchor_sd, config.lobe_spread,
                                      config.lobe_replace_outline) if config.lobes else None)

    def encode_genes(self, genes: Tensor) -> Tensor:
        """φ(g) for a batch of z-scored gene vectors (B,G) → (B, code_dim); the radiogenomic map uses it."""
        return self.mapping(genes)

    def forward(self, background: Tensor, genes: Tensor | None, noise: Tensor | None = None,
                hole: Tensor | None = None, position: Tensor | None = None, pixel_noise: Tensor | None = None
                ) -> GeneratorOutput:
        """`pixel_noise` (B,1,S,S) for a `pixel_noise` generator; drawn from the global RNG when not given."""
        _check_inputs(self.config, background, genes, need_genes=True)
        code = self.encode_genes(genes)
        if noise is None and (self.spicules is not None or self.lobes is not None):   # as the style reads it
            noise = torch.randn(code.shape[0], self.config.noise_dim, device=code.device, dtype=code.dtype)
        style = _style(self.config, code, noise, position)
        if self.config.pixel_noise:
            if pixel_noise is None:
                pixel_noise = torch.randn_like(background)
            if pixel_noise.shape != background.shape:
                raise ValueError(f"pixel_noise must be {tuple(background.shape)}, got {tuple(pixel_noise.shape)}")
        features = self.encoder(background)[::-1]               # coarse → fine
        x = features[0]
        weight_maps = []
        for i, (res, block) in enumerate(zip(self.config.resolutions, self.blocks.values(), strict=True)):
            if i > 0:
                x = _upsample(x)
            x, weight = block(x, features[i], style,
                              level_noise(pixel_noise, res) if self.config.pixel_noise else None)
            weight_maps.append(weight)
        mask = self.mask_head(x)
        if self.config.opaque_nodule:   # the raw background channel is not offered inside the nodule
            x = x * _opaque_keep(mask.detach(), x.shape[1])
        image = self.image_head(x)
        if self.lobes is not None:   # laid over the background, the nodule's own image moves, not its change
            image, mask = self.lobes(image, mask, torch.zeros_like(background) if self.config.edge_over_background
                                     else background, code, noise)
        if self.config.open_own_mask:   # after the lobes, whose warp can pinch the outline into thin pieces
            mask = open_with_cross(mask)
        strand = None
        if self.spicules is not None:
            image, mask, strand = self.spicules(image, mask, code, noise,
                                                position if self.config.slice_position else None)
        if self.edge is not None:
            image = self.edge(image, background, code, mask)
            if self.edge.inside_mask:   # the finest map then shows where the output can differ from the input
                weight_maps[-1] = self.edge.blur(weight_maps[-1] * mask, code)
        if strand is not None and self.spicules.paints_after_edge:
            image = self.spicules.paint_after_edge(image, background, strand)
            weight_maps[-1] = torch.maximum(weight_maps[-1], strand.to(weight_maps[-1].dtype))
        return GeneratorOutput(image, mask, weight_maps, code)


def _opaque_keep(mask: Tensor, channels: int) -> Tensor:
    """(B, C, S, S) factors: 1 − mask for channel 0 (the raw background), exactly 1 for the others.
    A product rather than slicing and concatenating channels: the gradient then keeps the feature map's
    channels-last layout, and batch norm's backward its fast path (the concatenation cost ~20 % of a step)."""
    first_channel = torch.zeros(1, channels, 1, 1, dtype=mask.dtype, device=mask.device)
    first_channel[:, 0] = 1.0
    return 1.0 - mask * first_channel


# ----------------------------------------------------------------------------------------------------
# Baseline 1: MC-GAN-style (Park et al. 2018)


class MCGANBlock(nn.Module):
    """MC-GAN's synthesis block, no AdaIN: F = conv(x); out = F + B · σ(w), w = 1×1 conv(F).

    σ(w) weighs the *background* (MC-GAN's "switch"), per channel; its channel mean is the returned map.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(in_channels, channels, 3)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.conv(x)
        switch = torch.sigmoid(self.gate(feature))
        return feature + background * switch, switch.mean(dim=1, keepdim=True)


class MCGANGenerator(nn.Module):
    """Gene code (same 2-FC mapping, so Fig. 4 compares like with like) + noise → a 4×4 base map, combined
    with the background bottleneck feature; then MC-GAN synthesis blocks up to full size."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        bottleneck = config.channels(BOTTLENECK)
        self.mapping = GeneMappingNetwork(config.num_genes, config.gene_hidden, config.code_dim)
        self.encoder = BackgroundEncoder(config)
        self.base = nn.Linear(config.style_dim, bottleneck * BOTTLENECK * BOTTLENECK)
        self.base_norm = nn.Sequential(nn.BatchNorm2d(bottleneck), _act())
        self.combine = ConvBNAct(2 * bottleneck, bottleneck, 1)   # 1×1: the next block's conv is 3×3
        self.blocks = nn.ModuleDict()
        previous = bottleneck
        for res in config.resolutions:
            self.blocks[f"b{res}"] = MCGANBlock(previous, config.channels(res))
            previous = config.channels(res)
        self.image_head = ImageHead(previous)
        self.mask_head = MaskHead(previous)

    def encode_genes(self, genes: Tensor) -> Tensor:
        """φ(g) for a batch of z-scored gene vectors (B,G) → (B, code_dim)."""
        return self.mapping(genes)

    def forward(self, background: Tensor, genes: Tensor | None, noise: Tensor | None = None,
                hole: Tensor | None = None, position: Tensor | None = None) -> GeneratorOutput:
        _check_inputs(self.config, background, genes, need_genes=True)
        code = self.encode_genes(genes)
        style = _style(self.config, code, noise, position)
        features = self.encoder(background)[::-1]
        base = self.base(style).view(style.shape[0], -1, BOTTLENECK, BOTTLENECK)
        x = self.combine(torch.cat([self.base_norm(base), features[0]], dim=1))
        weight_maps = []
        for i, block in enumerate(self.blocks.values()):
            if i > 0:
                x = _upsample(x)
            x, switch = block(x, features[i])
            weight_maps.append(switch)
        return GeneratorOutput(self.image_head(x), self.mask_head(x), weight_maps, code)


# ----------------------------------------------------------------------------------------------------
# Baseline 2: inpainting (Jin et al. 2018, 2D on the same slices)


def hole_from_mask(mask: Tensor, scale: float = 1.5, default_radius: float | None = None) -> Tensor:
    """Disc of `scale` × the mask's equivalent radius sqrt(area/π), centred at the mask centroid.

    mask (B,1,H,W) (thresholded at 0.5) → (B,1,H,W) float {0,1}. An empty mask gives a disc of
    `default_radius` pixels (H/8 when None) at the patch centre.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B,1,H,W), got {tuple(mask.shape)}")
    _, _, height, width = mask.shape
    binary = (mask > 0.5).to(torch.float32)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=mask.device),
                            torch.arange(width, dtype=torch.float32, device=mask.device), indexing="ij")
    area = binary.sum(dim=(1, 2, 3))
    safe = area.clamp(min=1.0)
    cy = torch.where(area > 0, (binary[:, 0] * yy).sum(dim=(1, 2)) / safe, torch.full_like(area, (height - 1) / 2))
    cx = torch.where(area > 0, (binary[:, 0] * xx).sum(dim=(1, 2)) / safe, torch.full_like(area, (width - 1) / 2))
    fallback = height / 8.0 if default_radius is None else float(default_radius)
    radius = torch.where(area > 0, scale * torch.sqrt(area / math.pi), torch.full_like(area, fallback))
    dist2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return (dist2 <= (radius**2)[:, None, None]).to(mask.dtype)[:, None]


class InpaintingGenerator(nn.Module):
    """U-Net on [background with the hole set to 0, hole]; the result is composited so that only the hole
    changes: background · (1 − hole) + generated · hole. No gene input (gene_code None, weight_maps [hole])."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BackgroundEncoder(config, in_channels=2, raw_channel=False)
        self.bottleneck = ConvBNAct(config.channels(BOTTLENECK), config.channels(BOTTLENECK), 3)
        self.decoder = nn.ModuleDict({
            f"b{res}": ConvBNAct(config.channels(res // 2) + config.channels(res), config.channels(res), 3)
            for res in config.resolutions[1:]
        })
        self.image_head = ImageHead(config.channels(config.patch_size))
        self.mask_head = MaskHead(config.channels(config.patch_size))

    def forward(self, background: Tensor, genes: Tensor | None = None, noise: Tensor | None = None,
                hole: Tensor | None = None, position: Tensor | None = None) -> GeneratorOutput:
        """`position` is accepted for a common signature and ignored: the hole sits on a real slice."""
        _check_inputs(self.config, background, genes, need_genes=False)
        if hole is None:
            raise ValueError("the inpainting generator needs `hole` (B,1,H,W), 1 = erased disc; "
                             "make it with hole_from_mask(mask)")
        if hole.shape != background.shape:
            raise ValueError(f"hole must have the background's shape {tuple(background.shape)}, "
                             f"got {tuple(hole.shape)}")
        hole = hole.to(background.dtype)
        erased = background * (1.0 - hole) + _INPAINT_FILL * hole
        skips = self.encoder(torch.cat([erased, hole], dim=1))[::-1]   # coarse → fine
        x = self.bottleneck(skips[0])
        for skip, layer in zip(skips[1:], self.decoder.values()):
            x = layer(torch.cat([_upsample(x), skip], dim=1))
        generated = self.image_head(x)
        image = background * (1.0 - hole) + generated * hole
        return GeneratorOutput(image, self.mask_head(x), [hole], None)


# ----------------------------------------------------------------------------------------------------
# Entry points


_BUILDERS: dict[str, type[nn.Module]] = {
    "proposed": ProposedGenerator,
    "mcgan": MCGANGenerator,
    "inpainting": InpaintingGenerator,
}


def build_generator(config: GeneratorConfig) -> nn.Module:
    """The generator that `config.kind` names, freshly initialised."""
    return _BUILDERS[config.kind](config)


# GeneratorConfig fields that change how a trained generator composes its output, not what it learned, so they may
# be switched on a trained generator (`with_composition`, at export). Why: trained with the laid-over nodule the
# margin and the placement got worse (round 33), while the same tensors composed over lost nothing and lost the
# interior leak (round 34). `spicule_contrast` paints the drawn strands after the edge at a contrast calibrated on
# the training donors' real strands (nothing learned); switched on it needs that contrast (`strand_contrast`).
# `open_own_mask` removes the thin pieces the lobe warp pinches out of the generator's own mask, and `spicule_cap`
# keeps the painted strands from standing over tissue (no parameter either).
COMPOSITION_OPTIONS: frozenset[str] = frozenset({"edge_over_background", "spicule_contrast", "open_own_mask",
                                                 "spicule_cap"})


def with_composition(generator: nn.Module, *, strand_contrast: float | None = None, **options: Any) -> nn.Module:
    """A copy of a trained `generator` with COMPOSITION_OPTIONS changed and every learned tensor kept (eval mode).

    `strand_contrast` (unit range, `training.iteration.real_strand_contrast`) is required when `spicule_contrast`
    is switched on and refused otherwise. Raises ValueError for any other field (it would change or orphan
    learned tensors) and for a combination the config refuses (e.g. edge_over_background without
    edge_inside_mask)."""
    other = sorted(set(options) - COMPOSITION_OPTIONS)
    if other:
        raise ValueError(f"{', '.join(other)} cannot be changed on a trained generator; only "
                         f"{', '.join(sorted(COMPOSITION_OPTIONS))} can (the rest would change its tensors)")
    composed = build_generator(GeneratorConfig.from_dict({**generator.config.to_dict(), **options}))
    switched_on = composed.config.spicule_contrast and not generator.config.spicule_contrast
    if switched_on != (strand_contrast is not None):
        raise ValueError("spicule_contrast switched on needs the training donors' real strand contrast to paint at "
                         "(strand_contrast), and only then is one given")
    state = generator.state_dict()
    if not composed.config.spicule_contrast:
        state.pop("spicules.contrast", None)         # the strands are painted as trained: no contrast to keep
    missing, _ = composed.load_state_dict(state, strict=not switched_on)
    if missing != (["spicules.contrast"] if switched_on else []):
        raise ValueError(f"the composed generator lacks trained tensors: {missing}")
    if switched_on:
        composed.spicules.calibrate_contrast(float(strand_contrast))
    return composed.to(next(generator.parameters()).device).eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(module: nn.Module) -> str:
    """A table of parameters per top-level child (stylegan's printed summary), for logs and benchmarks."""
    rows = [(name, count_parameters(child)) for name, child in module.named_children()]
    rows.append(("total", count_parameters(module)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {count:>12,}" for name, count in rows)
