"""Generators: shapes, ranges, conditioning, gradients, background pass-through and a small overfit (CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from RadiogenomicGANLib.networks import (
    KINDS,
    POSITION_GAIN,
    CodeDrivenEdge,
    FusionBlock,
    GeneMappingNetwork,
    GeneratorConfig,
    GeneratorOutput,
    build_generator,
    count_parameters,
    hole_from_mask,
    position_features,
)

GENES = 50


def small_config(kind: str, patch_size: int = 64) -> GeneratorConfig:
    """Narrow channels and few genes: the architecture of the default, at a fraction of the cost."""
    return GeneratorConfig(kind=kind, num_genes=GENES, patch_size=patch_size, code_dim=16, noise_dim=4,
                           base_channels=8, max_channels=32, gene_hidden=32)


def inputs(config: GeneratorConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = config.patch_size
    background = torch.rand(batch, 1, s, s, generator=gen) * 2 - 1
    mask = torch.zeros(batch, 1, s, s)
    mask[:, :, s // 2 - s // 8: s // 2 + s // 8, s // 2 - s // 10: s // 2 + s // 8] = 1
    return {
        "background": background,
        "genes": torch.randn(batch, config.num_genes, generator=gen),
        "noise": torch.randn(batch, config.noise_dim, generator=gen),
        "hole": hole_from_mask(mask),
    }


def run(generator: nn.Module, x: dict[str, torch.Tensor], **override: torch.Tensor | None) -> GeneratorOutput:
    args = {**x, **override}
    return generator(args["background"], args["genes"], args["noise"], hole=args["hole"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# Shapes, ranges, budget


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes_and_ranges(kind: str, size: int) -> None:
    config = small_config(kind, size)
    generator = build_generator(config).eval()
    x = inputs(config)
    with torch.no_grad():
        out = run(generator, x)
    assert isinstance(out, GeneratorOutput)
    assert out.image.shape == out.mask.shape == (2, 1, size, size)
    assert out.image.min() >= -1 and out.image.max() <= 1
    assert out.mask.min() >= 0 and out.mask.max() <= 1
    assert generator.config is config
    if kind == "inpainting":
        assert out.gene_code is None
        assert len(out.weight_maps) == 1 and torch.equal(out.weight_maps[0], x["hole"])
        outside = x["hole"] == 0
        assert torch.equal(out.image[outside], x["background"][outside]), "only the hole may change"
    else:
        assert out.gene_code.shape == (2, config.code_dim)
        sizes = [w.shape[-1] for w in out.weight_maps]
        levels = int(math.log2(size // 4)) + 1                 # 64 → 4…64 (5), 128 → 4…128 (6)
        assert sizes == [4 * 2**i for i in range(levels)], "one map per level, coarse → fine"
        for w in out.weight_maps:
            assert w.shape[:2] == (2, 1)
            assert w.min() >= 0 and w.max() <= 1


def test_default_proposed_fits_the_parameter_budget() -> None:
    """About 2.2 M parameters at 64² with 5172 genes, most of them the gene mapping (the MONAI
    re-implementation had 44 M)."""
    generator = build_generator(GeneratorConfig())
    assert count_parameters(generator) <= 2_500_000
    assert count_parameters(generator.mapping) > count_parameters(generator) / 2
    linears = [m for m in generator.mapping.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and linears[0].in_features == 5172 and linears[-1].out_features == 128
    assert sum(isinstance(m, FusionBlock) for m in generator.modules()) == 5


def test_mcgan_uses_the_same_mapping_network_and_no_adain() -> None:
    generator = build_generator(small_config("mcgan"))
    assert isinstance(generator.mapping, GeneMappingNetwork)
    assert not any(isinstance(m, FusionBlock) for m in generator.modules())
    assert not any("adain" in name for name, _ in generator.named_modules())


# ----------------------------------------------------------------------------------------------------
# Conditioning


@pytest.mark.parametrize("kind", ["proposed", "mcgan"])
def test_genes_and_noise_change_the_output(kind: str) -> None:
    config = small_config(kind)
    generator = build_generator(config).eval()
    x = inputs(config)
    with torch.no_grad():
        base = run(generator, x)
        other_genes = run(generator, x, genes=torch.randn_like(x["genes"]))
        other_noise = run(generator, x, noise=torch.randn_like(x["noise"]))
        again = run(generator, x)
    assert torch.equal(base.image, again.image), "eval mode with fixed noise is deterministic"
    for other in (other_genes, other_noise):
        assert (other.image - base.image).abs().max() > 1e-3
        assert (other.mask - base.mask).abs().max() > 1e-4
    assert not torch.allclose(other_genes.gene_code, base.gene_code)
    assert torch.equal(other_noise.gene_code, base.gene_code), "the noise does not enter φ(g)"
    assert torch.equal(generator.encode_genes(x["genes"]), base.gene_code)


def test_noise_none_draws_fresh_noise() -> None:
    config = small_config("proposed")
    generator = build_generator(config).eval()
    x = inputs(config)
    with torch.no_grad():
        first, second = run(generator, x, noise=None), run(generator, x, noise=None)
    assert (first.image - second.image).abs().max() > 1e-4


def test_inpainting_ignores_genes_and_noise() -> None:
    config = small_config("inpainting")
    generator = build_generator(config).eval()
    x = inputs(config)
    with torch.no_grad():
        base = run(generator, x)
        other = run(generator, x, genes=None, noise=None)
    assert torch.equal(base.image, other.image)


def test_bad_inputs_are_refused_with_a_message() -> None:
    for kind in ("proposed", "mcgan"):
        config = small_config(kind)
        generator = build_generator(config)
        x = inputs(config)
        with pytest.raises(ValueError, match="gene vector"):
            run(generator, x, genes=None)
        with pytest.raises(ValueError, match="genes must be"):
            run(generator, x, genes=torch.zeros(2, GENES + 1))
        with pytest.raises(ValueError, match="background must be"):
            run(generator, x, background=torch.zeros(2, 1, 32, 32))
        with pytest.raises(ValueError, match="noise must be"):
            run(generator, x, noise=torch.zeros(2, 3))
    config = small_config("inpainting")
    with pytest.raises(ValueError, match="needs `hole`"):
        run(build_generator(config), inputs(config), hole=None)


# ----------------------------------------------------------------------------------------------------
# Gradients and learning


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_receives_a_gradient(kind: str) -> None:
    """No dead branch: a random linear loss on image + mask reaches every parameter (train mode)."""
    config = small_config(kind)
    generator = build_generator(config).train()
    out = run(generator, inputs(config, batch=3))
    loss = (out.image * torch.randn_like(out.image)).sum() + (out.mask * torch.randn_like(out.mask)).sum()
    loss.backward()
    dead = [n for n, p in generator.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert dead == []


@pytest.mark.parametrize("kind", ["proposed", "mcgan"])
def test_background_pass_through_is_exact_when_weights_say_background(kind: str) -> None:
    """The (1 − W)⊙B path is an identity: W → 0 (proposed) or F → 0, σ(w) → 1 (MC-GAN) and an image head
    that reads the background-logit channel return the background to 1e-3 (training's L1 relies on it)."""
    config = small_config(kind)
    generator = build_generator(config).eval()
    with torch.no_grad():
        for name, module in generator.named_modules():
            if isinstance(module, FusionBlock):
                module.norm2.bias[: module.norm2.num_features // 2] = -40.0        # W = σ(−40) ≈ 0
            if name.startswith("blocks.") and name.endswith(".conv"):               # MC-GAN: F = 0 …
                module[1].weight.zero_()
                module[1].bias.zero_()
            if name.startswith("blocks.") and name.endswith(".gate"):               # … and σ(w) = 1
                module.weight.zero_()
                module.bias.fill_(40.0)
        generator.image_head.conv.weight.zero_()
        generator.image_head.conv.weight[0, 0, 1, 1] = 1.0
        x = inputs(config)
        out = run(generator, x)
    assert (out.image - x["background"]).abs().max() <= 1.01e-3


@pytest.mark.parametrize("kind", KINDS)
def test_small_overfit_reduces_reconstruction_error(kind: str) -> None:
    """Four fixed (background, genes, noise) → target patches (the background with a solid disc at 0.35,
    ≈ +12 HU, pasted in); 200 Adam steps (lr 2e-3, β 0.5/0.999) on L1 alone, small config, seeded, one
    thread. The L1 to the targets must fall ≥ 5× for proposed and MC-GAN (observed 11–22× over seeds 0–2)
    and ≥ 4× for inpainting (observed 6–10×: it must memorise the erased context as well), measured in
    the hole for inpainting, the only place it can change. Errors are measured in train mode, the mode
    the steps ran in."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = small_config(kind)
    generator = build_generator(config).train()
    n, s = 4, config.patch_size
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    background = (nn.functional.avg_pool2d(torch.randn(n, 1, s, s), 9, 1, 4) * 3 - 0.7).clamp(-1, 1)
    masks = torch.stack([((yy - 32 - 3 * i) ** 2 + (xx - 30 + 2 * i) ** 2 <= (6 + 2 * i) ** 2).float()
                         for i in range(n)])[:, None]
    target = background * (1 - masks) + 0.35 * masks
    x = {"background": background, "genes": torch.randn(n, GENES), "noise": torch.randn(n, config.noise_dim),
         "hole": hole_from_mask(masks)}
    region = x["hole"] if kind == "inpainting" else torch.ones_like(target)

    def error() -> float:
        with torch.no_grad():
            return float(((run(generator, x).image - target).abs() * region).sum() / region.sum())

    optimiser = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    before = error()
    for _ in range(200):
        loss = (run(generator, x).image - target).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = error()
    factor = 4 if kind == "inpainting" else 5
    assert after * factor <= before, f"L1 {before:.4f} → {after:.4f}, less than {factor}×"


# ----------------------------------------------------------------------------------------------------
# Config and hole


def test_config_round_trip_and_refusals() -> None:
    config = GeneratorConfig(kind="mcgan", patch_size=128, num_genes=10)
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GeneratorConfig keys"):
        GeneratorConfig.from_dict({**config.to_dict(), "embed_dim": 3})
    with pytest.raises(ValueError, match="unknown generator kind"):
        GeneratorConfig(kind="stylegan")
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig(patch_size=96)


def test_slice_position_enters_the_style_and_changes_the_slice() -> None:
    """With `slice_position` the style holds (t, √(1 − t²)): another t gives another slice, no t is the centre,
    a wrong shape is refused; weights files written before the key load without it."""
    config = GeneratorConfig(kind="proposed", num_genes=10, patch_size=16, code_dim=4, noise_dim=2,
                             base_channels=4, max_channels=8, gene_hidden=8, slice_position=True)
    assert config.style_dim == 4 + 2 + 2
    g = build_generator(config).eval()
    background, genes, noise = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 10), torch.randn(2, 2)
    centre = g(background, genes, noise, position=torch.zeros(2))
    end = g(background, genes, noise, position=torch.full((2,), 0.9))
    assert not torch.allclose(centre.image, end.image)
    torch.testing.assert_close(g(background, genes, noise).image, centre.image)
    with pytest.raises(ValueError, match="position must be"):
        g(background, genes, noise, position=torch.zeros(2, 1))
    torch.testing.assert_close(position_features(torch.tensor([0.0, 0.6, -1.5])),
                               POSITION_GAIN * torch.tensor([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    written_before = {k: v for k, v in config.to_dict().items() if k != "slice_position"}
    assert GeneratorConfig.from_dict(written_before).slice_position is False
    with pytest.raises(ValueError, match="slice_position"):
        GeneratorConfig(kind="inpainting", slice_position=True)


def test_pixel_noise_starts_silent_then_varies_the_object_only() -> None:
    """With `pixel_noise` every fusion block has a per-channel strength starting at 0, so at first the map
    changes nothing; with strengths on, another map gives another image, while where W says background the
    output is still the background. Each level's map keeps unit variance. A wrong shape is refused, no map
    draws one, and weights files written before the key load without it."""
    from RadiogenomicGANLib.networks import level_noise

    config = GeneratorConfig(**{**small_config("proposed", 16).to_dict(), "pixel_noise": True})
    assert config.pixel_noise_size == 16 and small_config("proposed").pixel_noise_size == 0
    g = build_generator(config).eval()
    x = inputs(config)
    first, second = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(g(**x, pixel_noise=first).image, g(**x, pixel_noise=second).image)
        for block in g.blocks.values():
            block.noise_strength.fill_(1.0)
        assert not torch.allclose(g(**x, pixel_noise=first).image, g(**x, pixel_noise=second).image)
        assert g(**x).image.shape == (2, 1, 16, 16)                       # drawn when not given
        for block in g.blocks.values():
            block.norm2.bias[: block.norm2.num_features // 2] = -40.0     # W ≈ 0: background everywhere
        g.image_head.conv.weight.zero_()
        g.image_head.conv.weight[0, 0, 1, 1] = 1.0
        assert (g(**x, pixel_noise=first).image - x["background"]).abs().max() <= 1.01e-3
    with pytest.raises(ValueError, match="pixel_noise must be"):
        g(**x, pixel_noise=torch.randn(2, 1, 8, 8))
    big = torch.randn(4, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    for res in (256, 64, 16):
        level = level_noise(big, res)
        assert level.shape[-1] == res and level.std().item() == pytest.approx(1, abs=0.05)
    written_before = {k: v for k, v in config.to_dict().items() if k != "pixel_noise"}
    assert GeneratorConfig.from_dict(written_before).pixel_noise is False
    assert not any("noise_strength" in k for k in build_generator(small_config("proposed")).state_dict())
    with pytest.raises(ValueError, match="pixel_noise"):
        GeneratorConfig(kind="mcgan", pixel_noise=True)


@pytest.mark.parametrize("opaque", [False, True])
def test_opaque_nodule_hides_the_raw_background_inside_the_mask_only(opaque: bool) -> None:
    """With W → 0 and an image head that copies the raw background channel: where the mask is 1, an opaque
    nodule's head no longer sees the background (image 0), a see-through one copies it; where the mask is 0
    both copy it. The setting is the proposed generator's only, and older weights files load without it."""
    config = GeneratorConfig(**{**small_config("proposed", 16).to_dict(), "opaque_nodule": opaque})
    g = build_generator(config).eval()
    x = inputs(config)
    with torch.no_grad():
        for block in g.blocks.values():
            block.norm2.bias[: block.norm2.num_features // 2] = -40.0
        g.image_head.conv.weight.zero_()
        g.image_head.conv.weight[0, 0, 1, 1] = 1.0
        g.mask_head.conv.weight.zero_()
        for bias, inside in ((40.0, True), (-40.0, False)):
            g.mask_head.conv.bias.fill_(bias)
            image = run(g, x).image
            if inside and opaque:
                assert image.abs().max() <= 1e-6
            else:
                assert (image - x["background"]).abs().max() <= 1.01e-3
    assert GeneratorConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "opaque_nodule"}
                                     ).opaque_nodule is False
    with pytest.raises(ValueError, match="opaque_nodule"):
        GeneratorConfig(kind="inpainting", opaque_nodule=True)


def test_opaque_nodule_keeps_the_gradient_channels_last() -> None:
    """The opaque nodule is a product: it leaves every channel but the raw background's bit-for-bit unchanged
    and scales that one by 1 − mask; and in a channels-last generator the gradient reaching the finest block's
    batch norm stays channels-last — batch norm's fast backward. The slicing-and-concatenation it replaced
    handed that norm a plain-layout gradient, which made a 128² training step ~20 % slower."""
    from RadiogenomicGANLib.networks import _opaque_keep

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 8, 8, generator=gen)
    mask = torch.rand(2, 1, 8, 8, generator=gen)
    out = features * _opaque_keep(mask, 5)
    assert torch.equal(out[:, 1:], features[:, 1:])
    assert torch.equal(out[:, :1], features[:, :1] * (1.0 - mask))

    config = GeneratorConfig(**{**small_config("proposed", 32).to_dict(), "opaque_nodule": True})
    g = build_generator(config).to(memory_format=torch.channels_last)
    layouts = []
    finest_norm = list(g.blocks.values())[-1].norm2
    finest_norm.register_full_backward_hook(
        lambda module, grad_in, grad_out: layouts.append(grad_out[0].is_contiguous(memory_format=torch.channels_last)))
    x = inputs(config)
    output = run(g, {**x, "background": x["background"].contiguous(memory_format=torch.channels_last)})
    (output.image.square().sum() + output.mask.sum()).backward()
    assert layouts == [True]


def test_edge_settings_are_refused_where_they_cannot_work() -> None:
    with pytest.raises(ValueError, match="edge_blur_per_sd must be a finite number ≥ 0"):
        GeneratorConfig(edge_blur_per_sd=-0.5)
    with pytest.raises(ValueError, match="edge_code_index must lie in"):
        GeneratorConfig(code_dim=8, edge_blur_per_sd=0.5, edge_code_index=8)
    with pytest.raises(ValueError, match="not of 'mcgan'"):
        GeneratorConfig(kind="mcgan", edge_blur_per_sd=0.5)
    with pytest.raises(ValueError, match="edge_inside_mask needs the code-driven edge"):
        GeneratorConfig(edge_inside_mask=True)
    with pytest.raises(ValueError, match="edge_over_background needs the edge kept inside the mask"):
        GeneratorConfig(edge_blur_per_sd=0.6, edge_over_background=True)
    with pytest.raises(ValueError, match="only when kept inside the mask"):
        CodeDrivenEdge(0.6, 0, over=True)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="anchor_sd must be a finite number > 0"):
            GeneratorConfig(anchor_sd=bad)


def test_code_driven_edge_reads_its_coordinate_in_anchor_sd_units() -> None:
    """An edge for codes anchored at sd 3 gives the code 3·z the width the sd-1 edge gives z, and the
    generator builds its edge with the config's anchor_sd (a file without the key: sd 1)."""
    code = torch.zeros(3, 8)
    code[:, 2] = torch.tensor([-2.0, 0.5, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(CodeDrivenEdge(0.6, 2, anchor_sd=3.0).sigma(3.0 * code),
                                   CodeDrivenEdge(0.6, 2).sigma(code))
    config = GeneratorConfig(num_genes=4, patch_size=16, code_dim=8, base_channels=2, max_channels=4,
                             gene_hidden=4, edge_blur_per_sd=0.6, anchor_sd=3.0)
    assert build_generator(config).edge.per_unit == pytest.approx(0.2)
    old = {k: v for k, v in config.to_dict().items() if k != "anchor_sd"}
    assert GeneratorConfig.from_dict(old).anchor_sd == 1.0


# ----------------------------------------------------------------------------------------------------
# Code-driven edge width


def rise_width(profile: torch.Tensor) -> int:
    """Pixels over which a rising edge profile climbs from 10 % to 90 % of its height."""
    height = profile[-1]
    return int(((profile > 0.1 * height) & (profile < 0.9 * height)).sum())


def test_code_driven_edge_widens_as_the_margin_coordinate_falls() -> None:
    """A square change of +0.5 on a textured background; coordinate −2, 0, +2 on the anchored margin axis
    (z-scored sharpness): σ = exp(∓1.2) px, clamped to 3 px; the edge's 10–90 % rise narrows in that order,
    the change's total is kept (a normalised kernel), and far from the square the output is the background."""
    edge = CodeDrivenEdge(per_sd=0.6, index=2)
    background = (torch.rand(1, 1, 64, 64) * 0.4 - 0.6).expand(3, 1, 64, 64)
    image = background.clone()
    image[:, :, 20:44, 20:44] += 0.5
    code = torch.zeros(3, 8)
    code[:, 2] = torch.tensor([-2.0, 0.0, 2.0])
    with torch.no_grad():
        sigma = edge.sigma(code)
        out = edge(image, background, code)
    torch.testing.assert_close(sigma, torch.tensor([3.0, 1.0, math.exp(-1.2)]))
    change = out - background
    widths = [rise_width(change[i, 0, 32, 8:33]) for i in range(3)]
    assert widths[0] > widths[1] > widths[2] >= 0, widths
    torch.testing.assert_close(change.sum(dim=(1, 2, 3)), torch.full((3,), 0.5 * 24 * 24), rtol=1e-4, atol=0)
    far = torch.ones(64, 64, dtype=torch.bool)
    far[20 - 10:44 + 10, 20 - 10:44 + 10] = False
    assert torch.equal(out[:, 0][:, far], background[:, 0][:, far])
    # the sharpest width is almost no blur: the square's border pixel loses 0.4 % to its outside neighbour
    torch.testing.assert_close(change[2, 0, 32, 20:44], torch.full((24,), 0.5), atol=3e-3, rtol=0)


def test_edge_inside_mask_keeps_only_the_masked_change() -> None:
    """With `inside_mask` the change is × the mask before the blur: a change over the whole patch leaves the
    output equal to the background beyond the mask plus the kernel's reach, and equal to the change deep
    inside; without the mask it is refused."""
    edge = CodeDrivenEdge(per_sd=0.6, index=0, inside_mask=True)
    background = torch.rand(2, 1, 64, 64) * 0.4 - 0.6
    image = background + 0.3                                       # changed everywhere
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 24:40, 24:40] = 1.0
    code = torch.zeros(2, 4)
    with torch.no_grad():
        out = edge(image, background, code, mask)
    reach = 24 - CodeDrivenEdge.RADIUS, 40 + CodeDrivenEdge.RADIUS
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[reach[0]:reach[1], reach[0]:reach[1]] = False
    assert torch.equal(out[:, 0][:, outside], background[:, 0][:, outside])
    torch.testing.assert_close(out[:, :, 30:34, 30:34] - background[:, :, 30:34, 30:34],
                               torch.full((2, 1, 4, 4), 0.3), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="pass the generator's mask"):
        edge(image, background, code)


def test_edge_over_background_covers_the_background_where_the_change_form_shows_its_detail() -> None:
    """An even nodule (0.2) on a background with vessel-sized stripes, σ = 3 px (a blurred margin): added as a
    blurred change the stripes finer than σ stay inside the nodule (the evaluation's `interior_leak` well above
    0); laid over the background they are covered (leak ≈ 0), the centre even. Both forms leave the background
    unchanged beyond the kernel's reach and put the nodule's value in its centre on average."""
    from training.evaluation.sections import interior_leak

    columns = torch.arange(64.0)
    background = (0.15 * torch.sin(columns * 2.0 * math.pi / 5.0) - 0.6).expand(2, 1, 64, 64).clone()
    rows, cols = torch.meshgrid(columns, columns, indexing="ij")
    mask = (((rows - 32) ** 2 + (cols - 32) ** 2) <= 14.0**2).float().expand(2, 1, 64, 64)
    image = torch.full_like(background, 0.2)
    code = torch.full((2, 4), -10.0)                              # σ at its 3 px clamp
    outputs = {}
    for over in (False, True):
        edge = CodeDrivenEdge(per_sd=0.6, index=0, inside_mask=True, over=over)
        with torch.no_grad():
            outputs[over] = edge(image, background, code, mask)
        reach = torch.ones(64, 64, dtype=torch.bool)
        reach[32 - 14 - edge.RADIUS:32 + 15 + edge.RADIUS, 32 - 14 - edge.RADIUS:32 + 15 + edge.RADIUS] = False
        assert torch.equal(outputs[over][:, 0][:, reach], background[:, 0][:, reach])
        centre = outputs[over][:, 0, 28:37, 28:37]          # the change form's centre: 0.2 + the stripes' detail
        torch.testing.assert_close(centre.mean(dim=(1, 2)), torch.full((2,), 0.2), atol=0.02, rtol=0)
        assert (centre.std() < 1e-3) == over
    leak = {over: np.nanmedian(interior_leak(out[:, 0].numpy(), mask[:, 0].numpy(), background[:, 0].numpy()))
            for over, out in outputs.items()}
    assert leak[False] > 0.5 and abs(leak[True]) < 0.05, leak


def test_edge_over_background_moves_the_lobed_nodule_not_its_change() -> None:
    """With lobes and the edge laid over the background, the lobes warp the generator's image itself (given a
    zero background), so the background under a lobe is not added back into the nodule; without it, the change."""
    config = GeneratorConfig(**{**small_config("proposed").to_dict(), "edge_blur_per_sd": 0.6,
                                "edge_inside_mask": True, "lobes": True})
    for over in (False, True):
        generator = build_generator(dataclasses.replace(config, edge_over_background=over)).eval()
        seen: list[torch.Tensor] = []
        generator.lobes.register_forward_hook(lambda module, args, result, into=seen: into.append(args[2]))
        x = inputs(generator.config, batch=2)
        with torch.no_grad():
            run(generator, x)
        assert torch.equal(seen[0], torch.zeros_like(x["background"]) if over else x["background"])


def test_edge_inside_mask_weight_map_shows_where_the_output_can_change() -> None:
    """With the edge inside the mask the finest weight map is W ⊙ mask blurred like the change: never above
    the blurred mask (W ≤ 1), and where the mask is ≈ 0 (bias −30) nothing is shown and nothing changes."""
    config = GeneratorConfig(**{**small_config("proposed").to_dict(), "edge_blur_per_sd": 0.6,
                                "edge_inside_mask": True})
    generator = build_generator(config).eval()
    x = inputs(config, batch=2)
    with torch.no_grad():
        out = run(generator, x)
        blurred_mask = generator.edge.blur(out.mask, out.gene_code)
        assert (out.weight_maps[-1] <= blurred_mask + 1e-6).all()
        assert out.weight_maps[-1].shape == out.mask.shape and len(out.weight_maps) == len(config.resolutions)
        generator.mask_head.conv.bias.fill_(-30.0)
        empty = run(generator, x)
    assert empty.weight_maps[-1].max() < 1e-6
    assert (empty.image - x["background"]).abs().max() < 1e-5


def test_code_driven_edge_learns_through_sigma0_and_the_coordinate() -> None:
    """The generator with the edge inside its mask: σ₀, the gene mapping and the mask head receive gradient
    from a loss on the image alone."""
    config = GeneratorConfig(**{**small_config("proposed").to_dict(), "edge_blur_per_sd": 0.6,
                                "edge_inside_mask": True})
    generator = build_generator(config).train()
    assert generator.edge is not None and build_generator(small_config("proposed")).edge is None
    out = run(generator, inputs(config, batch=3))
    (out.image * torch.randn_like(out.image)).sum().backward()
    assert generator.edge.log_sigma0.grad is not None and generator.edge.log_sigma0.grad.abs() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in generator.mapping.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in generator.mask_head.parameters())


def test_hole_from_mask_is_a_disc_of_one_and_a_half_equivalent_radii() -> None:
    mask = torch.zeros(2, 1, 64, 64)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mask[0, 0] = ((yy - 20) ** 2 + (xx - 40) ** 2 <= 36).float()     # radius-6 disc at (20, 40)
    hole = hole_from_mask(mask)
    assert hole.shape == mask.shape and set(hole.unique().tolist()) <= {0.0, 1.0}
    area = float(mask[0].sum())
    expected = math.pi * (1.5 * math.sqrt(area / math.pi)) ** 2                     # = 2.25 × area
    assert abs(float(hole[0].sum()) - expected) / expected < 0.1
    assert hole[0, 0, 20, 40] == 1 and hole[0, 0, 20, 40 + 8] == 1 and hole[0, 0, 20, 40 + 11] == 0
    assert (hole[0] >= mask[0]).all(), "the hole covers the nodule"
    # empty mask: a default disc (radius H/8) at the centre
    assert hole[1, 0, 32, 32] == 1 and hole[1, 0, 0, 0] == 0
    assert abs(float(hole[1].sum()) - math.pi * 8**2) / (math.pi * 8**2) < 0.1


def test_with_composition_changes_only_how_the_trained_tensors_compose() -> None:
    """A trained generator composed over the background at export: the same tensors, the output of a generator
    built with the option; an option that would change tensors, or a refused combination, is a ValueError."""
    from RadiogenomicGANLib.networks import with_composition

    config = GeneratorConfig(**{**small_config("proposed").to_dict(), "edge_blur_per_sd": 0.6,
                                "edge_inside_mask": True, "lobes": True})
    trained = build_generator(config).eval()
    composed = with_composition(trained, edge_over_background=True)
    assert composed.config == dataclasses.replace(config, edge_over_background=True) and not composed.training
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in composed.state_dict().items())
    built = build_generator(composed.config).eval()
    built.load_state_dict(trained.state_dict())
    x = inputs(config, batch=2)
    with torch.no_grad():
        assert torch.equal(run(composed, x).image, run(built, x).image)
        assert not torch.equal(run(composed, x).image, run(trained, x).image)
    with pytest.raises(ValueError, match="base_channels cannot be changed on a trained generator"):
        with_composition(trained, base_channels=8)
    plain = build_generator(small_config("proposed"))
    with pytest.raises(ValueError, match="needs the edge kept inside the mask"):
        with_composition(plain, edge_over_background=True)


def test_opening_the_own_mask_removes_exactly_what_the_evaluation_reads_as_thin_strands() -> None:
    """`open_with_cross` thresholded at the label's 0.5 is scipy's binary opening with the 3×3 cross of the
    thresholded mask (the evaluation's `thin_strands`), border included; it never raises the mask."""
    from scipy import ndimage

    from RadiogenomicGANLib.networks import open_with_cross
    from training.metrics import thin_strands

    gen = torch.Generator().manual_seed(3)
    soft = torch.sigmoid(4 * torch.randn(4, 1, 24, 24, generator=gen))     # ragged: many thin pieces
    soft[0, 0, 10, 2:20] = 0.9                                              # a 1-px line into the border's reach
    soft[0, 0, 0, :] = 0.8
    opened = open_with_cross(soft)
    assert bool((opened <= soft).all())
    cross = ndimage.generate_binary_structure(2, 1)
    for m, o in zip(soft[:, 0].numpy() > 0.5, opened[:, 0].numpy() > 0.5, strict=True):
        assert np.array_equal(o, ndimage.binary_opening(m, structure=cross))
        assert not thin_strands(o).any() and thin_strands(m).any()


def test_open_own_mask_is_a_composition_option_that_drops_the_masks_thin_pieces() -> None:
    """Switched on a trained generator (`with_composition`): same tensors; a mask head that draws a disc with a
    1-px tail keeps the disc and loses the tail, in the label and in the image (composed over)."""
    from RadiogenomicGANLib.networks import with_composition

    config = GeneratorConfig(**{**small_config("proposed").to_dict(), "edge_blur_per_sd": 0.6,
                                "edge_inside_mask": True, "edge_over_background": True})
    trained = build_generator(config).eval()
    drawn = torch.zeros(1, 1, 64, 64)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    drawn[0, 0][(rows - 32) ** 2 + (cols - 32) ** 2 <= 36] = 0.95          # a disc of radius 6
    drawn[0, 0, 32, 38:50] = 0.95                                          # and a 1-px tail
    trained.mask_head.forward = lambda x: drawn.expand(x.shape[0], -1, -1, -1)
    opened = with_composition(trained, open_own_mask=True)
    opened.mask_head.forward = trained.mask_head.forward
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in opened.state_dict().items())
    x = inputs(config, batch=1)
    with torch.no_grad():
        before, after = run(trained, x), run(opened, x)
    assert bool((before.mask[0, 0, 32, 40:50] > 0.5).all()) and not bool((after.mask[0, 0, 32, 40:50] > 0.5).any())
    assert torch.equal(after.mask[0, 0, 26:39, 26:39] > 0.5, before.mask[0, 0, 26:39, 26:39] > 0.5)
    assert torch.allclose(after.image[0, 0, 30:35, 44:50], x["background"][0, 0, 30:35, 44:50], atol=1e-3)
    with pytest.raises(ValueError, match="open_own_mask is a setting of the proposed generator"):
        GeneratorConfig(kind="mcgan", open_own_mask=True)
