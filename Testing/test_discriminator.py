"""The discriminator has the three heads of Fig. 1(c), one score per sample, and no unused branch."""

import pytest
import torch

from RadiogenomicGANLib.networks import GeneratorConfig
from training.discriminator import Discriminator, DiscriminatorConfig, build_discriminator

SMALL = {"base_channels": 4, "max_channels": 16, "code_dim": 8, "num_genes": 40, "gene_hidden": 16}


def _inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 1, size, size, generator=gen) * 2 - 1
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.7).float()
    return image, mask


@pytest.mark.parametrize("size", [16, 64, 128])
def test_every_head_gives_one_score_per_sample(size: int) -> None:
    d = Discriminator(DiscriminatorConfig(patch_size=size, **SMALL))
    image, mask = _inputs(3, size)
    out = d(image, mask, torch.randn(3, 8))
    for score in out:
        assert score is not None and score.shape == (3,)
        assert torch.isfinite(score).all()
    assert d.image_features(image).shape[-2:] == (4, 4)
    strided = [m for m in d.image_encoder if isinstance(m, torch.nn.Conv2d)]
    assert len(strided) == DiscriminatorConfig(patch_size=size).num_downsamplings
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in strided)


def test_channels_are_capped() -> None:
    d = Discriminator(DiscriminatorConfig(patch_size=128, base_channels=4, max_channels=16, code_dim=8))
    widths = [m.out_channels for m in d.pair_encoder if isinstance(m, torch.nn.Conv2d)]
    assert widths == [4, 8, 16, 16, 16]


def test_default_size_is_modest() -> None:
    """The MONAI peer's D has 6.2 M parameters; ours is about 0.65 M at the default 64² configuration."""
    n = sum(p.numel() for p in build_discriminator().parameters())
    assert 400_000 < n < 1_000_000


def test_gene_head_needs_a_code_of_the_right_size() -> None:
    d = Discriminator(DiscriminatorConfig(patch_size=16, **SMALL))
    image, mask = _inputs(2, 16)
    with pytest.raises(ValueError, match="needs `code`"):
        d(image, mask)
    with pytest.raises(ValueError, match="gene code of size 8"):
        d(image, mask, torch.randn(2, 40))


def test_independent_mapping_owns_its_mapping_and_takes_raw_genes() -> None:
    d = Discriminator(DiscriminatorConfig(patch_size=16, independent_mapping=True, **SMALL))
    assert d.mapping is not None
    assert d.mapping.fc1.in_features == 40 and d.mapping.fc2.out_features == 8
    image, mask = _inputs(2, 16)
    assert d(image, mask, torch.randn(2, 40)).d_isg.shape == (2,)
    with pytest.raises(ValueError, match="raw genes"):
        d(image, mask, torch.randn(2, 8))
    shared = Discriminator(DiscriminatorConfig(patch_size=16, **SMALL))
    assert shared.mapping is None


def test_without_gene_head_nothing_gene_related_is_allocated() -> None:
    """The inpainting baseline's D: no D_ISG parameters at all (a dead head is what the MONAI peer shipped)."""
    d = Discriminator(DiscriminatorConfig(patch_size=16, gene_conditioned=False, independent_mapping=True, **SMALL))
    assert d.mapping is None and d.gene_joint is None and d.gene_logit is None
    image, mask = _inputs(2, 16)
    assert d(image, mask).d_isg is None


def test_building_blocks_batched_equal_the_one_tuple_forward() -> None:
    """The loss stacks tuples through the building blocks; in eval mode that must equal forward per tuple."""
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(patch_size=16, **SMALL)).eval()
    x, m = _inputs(2, 16)
    gx, gm = _inputs(2, 16)
    code, wrong = torch.randn(2, 8), torch.randn(2, 8)
    pair = d.pair_features(torch.cat([x, gx]), torch.cat([m, gm]))
    d_isg = d.score_gene(torch.cat([pair, pair[:2]]), torch.cat([code, code, wrong]))
    torch.testing.assert_close(d_isg[:2], d(x, m, code).d_isg)
    torch.testing.assert_close(d_isg[2:4], d(gx, gm, code).d_isg)
    torch.testing.assert_close(d_isg[4:], d(x, m, wrong).d_isg)
    torch.testing.assert_close(d.score_image(d.image_features(torch.cat([x, gx])))[2:], d(gx, gm, code).d_i)


def test_projection_head_adds_the_code_as_an_inner_product() -> None:
    """gene_head="projection": D_ISG(h, c) − D_ISG(h, 0) = ⟨E·c, mean over the grid of h⟩; the paper's
    head has no such split. Every parameter of the projection head learns."""
    d = Discriminator(DiscriminatorConfig(gene_head="projection", **SMALL)).eval()   # fixed batch-norm stats
    image, mask = _inputs(3, 64)
    code = torch.randn(3, 8)
    with torch.no_grad():
        pair = d.pair_features(image, mask)
        expected = (d.gene_embed(code) * d.gene_joint(pair).mean(dim=(2, 3))).sum(dim=1)
        difference = d.score_gene(pair, code) - d.score_gene(pair, torch.zeros_like(code))
    torch.testing.assert_close(difference, expected)
    assert difference.abs().min() > 0
    out = d.train()(image, mask, code)
    (out.d_isg.sum() + out.d_is.sum() + out.d_i.sum()).backward()
    dead = [n for n, p in d.named_parameters() if p.grad is None or not p.grad.abs().max() > 0]
    assert dead == []
    concat = Discriminator(DiscriminatorConfig(**SMALL))
    assert concat.gene_embed is None and concat.gene_joint[0].in_channels == 16 + 8
    assert d.gene_joint[0].in_channels == 16


def test_nodule_view_hides_the_background_from_d_i_only() -> None:
    """image_view_px = 3: D_I's score does not move when pixels beyond the mask's 3-px square rim change (a chest
    wall in the background), does move with a change inside it, and no gradient reaches the image outside the
    rim or the mask; D_IS still sees the whole patch. With 0 (the paper) D_I sees everything."""
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(patch_size=16, image_view_px=3, **SMALL)).eval()
    image = torch.full((1, 1, 16, 16), -0.75)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:9, 6:9] = 0.9
    walled, near = image.clone(), image.clone()
    walled[..., :, 13:] = 0.1          # tissue beyond the rim (columns 6−3 … 8+3 are inside)
    near[..., 7, 11] = 0.1             # inside the rim
    with torch.no_grad():
        base, wall_out, near_out = (d(x, mask, torch.zeros(1, 8)) for x in (image, walled, near))
    assert torch.equal(base.d_i, wall_out.d_i) and not torch.equal(base.d_i, near_out.d_i)
    assert not torch.equal(base.d_is, wall_out.d_is)
    x, m = image.clone().requires_grad_(), mask.clone().requires_grad_()
    d(x, m, torch.zeros(1, 8)).d_i.sum().backward()
    assert x.grad[..., :, 12:].abs().max() == 0 and x.grad[..., 6:9, 6:9].abs().max() > 0
    assert m.grad is None or not m.grad.any()
    whole = Discriminator(DiscriminatorConfig(patch_size=16, **SMALL)).eval()
    with torch.no_grad():
        assert not torch.equal(whole(image, mask, torch.zeros(1, 8)).d_i, whole(walled, mask, torch.zeros(1, 8)).d_i)
    with pytest.raises(ValueError, match="image_view_px"):
        DiscriminatorConfig(patch_size=16, image_view_px=16)


def test_config_round_trip_and_refusals() -> None:
    config = DiscriminatorConfig(patch_size=128, independent_mapping=True)
    assert DiscriminatorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        DiscriminatorConfig.from_dict({"patch_size": 64, "ndf": 3})
    with pytest.raises(ValueError, match="power of two"):
        DiscriminatorConfig(patch_size=48)
    with pytest.raises(ValueError, match="code_dim"):
        DiscriminatorConfig(code_dim=0)
    with pytest.raises(ValueError, match="unknown gene_head 'film'"):
        DiscriminatorConfig(gene_head="film")


def test_config_for_generator_matches_it() -> None:
    gen = GeneratorConfig(kind="mcgan", num_genes=40, patch_size=128, code_dim=8, gene_hidden=16)
    config = DiscriminatorConfig.for_generator(gen, base_channels=8)
    assert (config.patch_size, config.code_dim, config.num_genes, config.gene_hidden) == (128, 8, 40, 16)
    assert config.gene_conditioned and config.base_channels == 8
    inpainting = DiscriminatorConfig.for_generator(GeneratorConfig(kind="inpainting"))
    assert not inpainting.gene_conditioned
