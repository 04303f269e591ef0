"""Every loss term against hand-computed values, the eroded background mask against a hand-drawn example,
and one D step + one G step with the real generators: gradient everywhere it should go and nowhere else."""

import copy
import math

import pytest
import torch
from torch import nn

from RadiogenomicGANLib.networks import GeneratorConfig, GeneratorOutput, build_generator
from training.discriminator import Discriminator, DiscriminatorConfig
from training.iteration import (
    generate_paired,
    generate_with_detached_second_draw,
    generate_with_second_draw,
    paired_batch,
)
from training.losses import (
    SPICULE_SCALE_PX,
    GANLoss,
    LossWeights,
    augment_alike,
    background_leak,
    core_contrast,
    core_term,
    drawn_mask,
    eroded_background_mask,
    frozen,
    leak_term,
    log_area_term,
    ls_term,
    masked_l1,
    mode_seeking_term,
    position_term,
    quantile_term,
    spicule_term,
    spread_term,
    thin_strand_area,
)
from training.metrics import spicule_area_mm2

# -- stubs with known scores -----------------------------------------------------------------------------


class StubDiscriminator(Discriminator):
    """Known scores: D_I = mean(x); D_IS = mean(x) + mean(m); D_ISG = D_IS + mean(code).

    Records the batch size of every encoder call, to check the loss runs each encoder once per step.
    """

    def __init__(self, gene_conditioned: bool = True) -> None:
        config = DiscriminatorConfig(
            patch_size=8, base_channels=2, max_channels=2, code_dim=4, num_genes=3, gene_hidden=2,
            gene_conditioned=gene_conditioned,
        )
        super().__init__(config)
        self.calls: list[tuple[str, int]] = []

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        self.calls.append(("image", image.shape[0]))
        return image.mean(dim=(1, 2, 3))

    def pair_features(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(("pair", image.shape[0]))
        return torch.stack([image.mean(dim=(1, 2, 3)), mask.mean(dim=(1, 2, 3))], dim=1)

    def score_image(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def score_pair(self, features: torch.Tensor) -> torch.Tensor:
        return features.sum(dim=1)

    def score_gene(self, pair_features: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return pair_features.sum(dim=1) + code.mean(dim=1)


class StubGenerator(nn.Module):
    """Only what GANLoss reads: `.config` and `encode_genes` (φ(g) = the first gene, repeated)."""

    def __init__(self, kind: str = "proposed", anchor_sd: float = 1.0) -> None:
        super().__init__()
        self.config = GeneratorConfig(
            kind=kind, num_genes=3, patch_size=8, code_dim=4, base_channels=2, max_channels=2, gene_hidden=2,
            anchor_sd=anchor_sd,
        )

    def encode_genes(self, genes: torch.Tensor) -> torch.Tensor:
        return genes[:, :1].expand(-1, 4).clone()


def _const(value: float, size: int = 8) -> torch.Tensor:
    return torch.full((1, 1, size, size), value)


def _hand_batch() -> dict[str, torch.Tensor]:
    """x = 0.5, m = 1, m̄ = 0, b = 0, φ(g) = 0.2, φ(ḡ) = −0.1 (B = 1, 8×8)."""
    return {
        "image": _const(0.5),
        "mask": _const(1.0),
        "wrong_mask": _const(0.0),
        "background": _const(0.0),
        "genes": torch.tensor([[0.2, 9.0, 9.0]]),
        "wrong_genes": torch.tensor([[-0.1, 9.0, 9.0]]),
        "patient": torch.tensor([0]),
    }


def _hand_fake() -> GeneratorOutput:
    """Gx = −0.5, Gm = 0.25 everywhere (no foreground), φ(g) = 0.2; leaves, to inspect their gradients."""
    return GeneratorOutput(
        _const(-0.5).requires_grad_(),
        _const(0.25).requires_grad_(),
        [],
        torch.full((1, 4), 0.2).requires_grad_(),
    )


# the paper's loss exactly (no consistency terms); those are checked by hand on their own below
HAND_WEIGHTS = LossWeights(d_i=2.0, d_is=3.0, d_isg=0.5, background_l1=10.0, consistency_area=0.0,
                           consistency_intensity=0.0, consistency_margin=0.0, consistency_shape=0.0)


# -- pure functions --------------------------------------------------------------------------------------


def test_ls_term_is_the_batch_mean_of_squares() -> None:
    assert ls_term(torch.tensor([0.0, 2.0]), 1.0).item() == pytest.approx(1.0)
    assert ls_term(torch.tensor([0.5, -1.0]), 0.0).item() == pytest.approx((0.25 + 1.0) / 2)


# 8×8 mask: a 2×2 nodule at rows 1–2, cols 1–2 (next to the top-left border), one pixel at (5, 6), and a
# pixel of exactly 0.5 at (7, 0), which is NOT foreground ([m > 0.5]).
def _drawn_mask() -> torch.Tensor:
    prob = torch.full((8, 8), 0.1)
    prob[1:3, 1:3] = 0.9
    prob[5, 6] = 0.7
    prob[7, 0] = 0.5
    return prob[None, None]


ERODED_3 = [
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
]
ERODED_5 = [
    [0, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
]


@pytest.mark.parametrize(("kernel", "expected"), [(3, ERODED_3), (5, ERODED_5)])
def test_eroded_background_matches_the_hand_drawn_example(kernel: int, expected: list[list[int]]) -> None:
    """Erosion shrinks the background by k//2 around every foreground pixel; the image border is
    background (row 7 and column 0 stay 1 with k = 3), and 0.5 is not foreground."""
    out = eroded_background_mask(_drawn_mask(), kernel)
    assert out.shape == (1, 1, 8, 8) and out.dtype == torch.float32
    assert out[0, 0].tolist() == [[float(v) for v in row] for row in expected]


def test_eroded_background_edge_cases() -> None:
    empty = torch.zeros(2, 1, 6, 6)
    assert eroded_background_mask(empty).eq(1).all()  # no nodule: the border is not eroded
    full = torch.ones(1, 1, 6, 6)
    assert eroded_background_mask(full).eq(0).all()
    corner = torch.zeros(1, 1, 6, 6)
    corner[0, 0, 0, 5] = 1.0
    out = eroded_background_mask(corner, 3)[0, 0]
    assert out[:2, 4:].eq(0).all() and out.sum() == 36 - 4  # only the clipped 2×2 neighbourhood goes
    assert torch.equal(eroded_background_mask(_drawn_mask(), 1)[0, 0], (_drawn_mask() <= 0.5).float()[0, 0])
    with pytest.raises(ValueError, match="odd"):
        eroded_background_mask(empty, 4)


def test_no_gradient_flows_into_the_mask_through_the_l1_weighting() -> None:
    mask_prob = _drawn_mask().requires_grad_()
    image = torch.zeros(1, 1, 8, 8, requires_grad=True)
    region = eroded_background_mask(mask_prob, 3)
    assert not region.requires_grad
    l1 = masked_l1(image, torch.ones(1, 1, 8, 8), region)
    assert l1.item() == pytest.approx(sum(map(sum, ERODED_3)) / 64)  # mean over all 64 pixels
    l1.backward()
    assert mask_prob.grad is None
    assert image.grad is not None and image.grad.abs().sum() > 0


# -- GANLoss against hand-computed values ----------------------------------------------------------------


def test_discriminator_loss_by_hand() -> None:
    d = StubDiscriminator()
    loss_fn = GANLoss(StubGenerator(), d, HAND_WEIGHTS)
    fake = _hand_fake()
    loss, logs = loss_fn.discriminator_loss(_hand_batch(), fake)
    # D_I(x) = 0.5, D_I(Gx) = −0.5
    # D_IS(x,m) = 1.5, D_IS(x,m̄) = 0.5, D_IS(Gx,Gm) = −0.25
    # D_ISG(x,m,g) = 1.7, D_ISG(x,m̄,g) = 0.7, D_ISG(x,m,ḡ) = 1.4, D_ISG(Gx,Gm,g) = −0.05
    expected_terms = {
        "d_i_real": 0.25, "d_i_fake": 0.25,
        "d_is_real": 0.25, "d_is_wrong_mask": 0.25, "d_is_fake": 0.0625,
        "d_isg_real": 0.49, "d_isg_wrong_mask": 0.49, "d_isg_wrong_gene": 1.96, "d_isg_fake": 0.0025,
    }  # fmt: skip
    for name, value in expected_terms.items():
        assert logs[name] == pytest.approx(value), name
    # 2·(0.25 + 0.25) + 3·(0.25 + 0.25 + 0.0625) + 0.5·(0.49 + 0.49 + 1.96 + 0.0025)
    assert loss.item() == pytest.approx(4.15875)
    assert logs["d_total"] == pytest.approx(4.15875)
    assert logs["d_real"] == pytest.approx(2 * 0.25 + 3 * 0.25 + 0.5 * 0.49)
    assert logs["d_fake"] == pytest.approx(2 * 0.25 + 3 * 0.0625 + 0.5 * 0.0025)
    assert logs["d_wrong"] == pytest.approx(3 * 0.25 + 0.5 * (0.49 + 1.96))
    assert logs["score_i_real"] == pytest.approx(0.5) and logs["score_i_fake"] == pytest.approx(-0.5)
    assert all(isinstance(v, float) for v in logs.values())
    # each encoder ran once, on every tuple it scores stacked: [x; Gx] and [(x,m); (x,m̄); (Gx,Gm)]
    assert d.calls == [("image", 2), ("pair", 3)]
    # the stub scores have no parameters, so the loss depends on nothing but the (detached) fake tuple
    assert not loss.requires_grad


def test_r1_penalty_by_hand() -> None:
    """R1 adds γ/2·E‖∇ₓ Σ D(x)‖²: every real score of the stub is a mean over x's 64 pixels (D_IS and D_ISG
    once each too), so the gradient is 3/64 per pixel and the penalty 64·(3/64)² = 9/64."""
    weights = LossWeights(**{**HAND_WEIGHTS.to_dict(), "r1": 2.0})
    loss, logs = GANLoss(StubGenerator(), StubDiscriminator(), weights).discriminator_loss(_hand_batch(), _hand_fake())
    assert logs["d_r1"] == pytest.approx(9 / 64)
    assert loss.item() == pytest.approx(4.15875 + 9 / 64)
    with torch.no_grad():  # no graph, no penalty (a D loss computed only to be logged)
        assert "d_r1" not in GANLoss(StubGenerator(), StubDiscriminator(), weights).discriminator_loss(
            _hand_batch(), _hand_fake())[1]


def test_generator_loss_by_hand() -> None:
    d = StubDiscriminator()
    loss_fn = GANLoss(StubGenerator(), d, HAND_WEIGHTS)
    fake = _hand_fake()
    loss, logs = loss_fn.generator_loss(_hand_batch(), fake)
    # (−0.5 − 1)² = 2.25, (−0.25 − 1)² = 1.5625, (−0.05 − 1)² = 1.1025
    assert logs["g_i"] == pytest.approx(2.25)
    assert logs["g_is"] == pytest.approx(1.5625)
    assert logs["g_isg"] == pytest.approx(1.1025)
    assert logs["g_adv"] == pytest.approx(2 * 2.25 + 3 * 1.5625 + 0.5 * 1.1025)  # 9.73875
    # Gm = 0.25 < 0.5 everywhere → the whole patch is background; |Gx − b| = 0.5
    assert logs["l1_region_fraction"] == pytest.approx(1.0)
    assert logs["g_l1"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(9.73875 + 10 * 0.5)
    # the same stacked batches as the D step (identical batch-norm statistics), fake rows kept
    assert d.calls == [("image", 2), ("pair", 3)]
    loss.backward()
    # D_ISG sees φ(g) with gradient in the G step: d/dcode of 0.5·(mean(code) + c − 1)² = 0.5·2·(−1.05)/4
    torch.testing.assert_close(fake.gene_code.grad, torch.full((1, 4), -0.2625))
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # D unfrozen again


def test_consistency_terms_by_hand() -> None:
    """Generated mask area and mean intensity inside it against the paired real slice's, with gradient."""
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=0.0, consistency_area=10.0,
                          consistency_intensity=2.0, consistency_margin=0.0, consistency_shape=0.0)
    loss_fn = GANLoss(StubGenerator(), StubDiscriminator(), weights)
    fake = _hand_fake()  # Gm = 0.25 everywhere (area 0.25), Gx = −0.5 inside
    loss, logs = loss_fn.generator_loss(_hand_batch(), fake)  # real: m = 1 (area 1), x = 0.5 inside
    assert logs["g_consistency_area"] == pytest.approx(0.75)
    assert logs["g_consistency_intensity"] == pytest.approx(1.0, abs=1e-3)
    assert loss.item() == pytest.approx(10 * 0.75 + 2 * 1.0, abs=1e-2)
    loss.backward()
    assert fake.mask.grad.sum() < 0  # a larger mask lowers the area error
    assert fake.image.grad.sum() < 0  # a brighter nodule lowers the intensity error


def test_code_phenotype_term_by_hand() -> None:
    """(φ(g)[:, :F] − phenotype)² over the batch and the F anchored coordinates; gradient into φ(g) only there;
    a batch without `phenotype` is refused by name."""
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=0.0, consistency_area=0.0,
                          consistency_intensity=0.0, code_phenotype=3.0)
    loss_fn = GANLoss(StubGenerator(), StubDiscriminator(), weights)
    fake = _hand_fake()  # φ(g) = 0.2 in all 4 coordinates
    batch = _hand_batch() | {"phenotype": torch.tensor([[1.2, -0.8]])}
    loss, logs = loss_fn.generator_loss(batch, fake)
    assert logs["g_code_phenotype"] == pytest.approx((1.0**2 + 1.0**2) / 2)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(fake.gene_code.grad, torch.tensor([[-3.0, 3.0, 0.0, 0.0]]))
    with pytest.raises(KeyError, match="phenotype"):
        loss_fn.generator_loss(_hand_batch(), _hand_fake())


def test_code_phenotype_term_targets_anchor_sd_times_the_phenotype() -> None:
    """With the generator's `anchor_sd` = 2 the anchored coordinates are pulled to 2 × the z-scored phenotype:
    a code at exactly that costs nothing, and the one at 1 × costs what the distance says."""
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=0.0, consistency_area=0.0,
                          consistency_intensity=0.0, code_phenotype=1.0)
    loss_fn = GANLoss(StubGenerator(anchor_sd=2.0), StubDiscriminator(), weights)
    batch = _hand_batch() | {"phenotype": torch.tensor([[0.1, -0.4]])}
    fake = _hand_fake()
    with torch.no_grad():
        fake.gene_code.copy_(torch.tensor([[0.2, -0.8, 5.0, 5.0]]))       # 2 × the phenotype; the rest free
    assert loss_fn.generator_loss(batch, fake)[1]["g_code_phenotype"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        fake.gene_code.copy_(torch.tensor([[0.1, -0.4, 0.0, 0.0]]))       # 1 × the phenotype
    assert loss_fn.generator_loss(batch, fake)[1]["g_code_phenotype"] == pytest.approx((0.1**2 + 0.4**2) / 2)


def _disc_slice(radius: float, blur_px: float, density: float = 1.0, size: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A disc nodule of `density` (image units above a −1 lung) whose edge is blurred over `blur_px` pixels,
    and its mask (occupancy ≥ 0.5, as the phantom draws it)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    distance = torch.hypot(yy - size / 2, xx - size / 2) - radius
    occupancy = torch.sigmoid(-distance / max(blur_px, 1e-3) * 1.7)
    return (-1 + density * occupancy)[None, None], (occupancy >= 0.5).float()[None, None]


def test_soft_margin_sharpness_falls_with_blur_and_ignores_density() -> None:
    """The margin term's measure: crisp edges score high, blurred ones low, a faint (ground-glass) nodule as
    sharp as a dense one with the same edge; it agrees with the evaluation's measure on a thresholded mask."""
    from training.losses import soft_margin_sharpness
    from training.metrics import margin_sharpness

    scores = [soft_margin_sharpness(*_disc_slice(8, blur)).item() for blur in (0.3, 1.0, 2.0, 3.0)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 2 * scores[-1]
    dense, faint = (soft_margin_sharpness(*_disc_slice(8, 1.0, density)).item() for density in (1.0, 0.3))
    assert faint == pytest.approx(dense, rel=0.15)
    evaluation = [margin_sharpness(*(t[0, 0].numpy() for t in _disc_slice(8, blur))) for blur in (0.3, 1.0, 2.0, 3.0)]
    assert evaluation == sorted(evaluation, reverse=True)


def test_soft_compactness_disc_spiky_and_empty() -> None:
    """≈ 1 for a disc whether the mask is binary or soft; clearly lower for a spiculated outline; 0 when empty."""
    from training.losses import soft_compactness

    image, disc = _disc_slice(8, 1.0)
    soft = torch.sigmoid((image + 0.5) * 20)  # a confident soft mask: ≈ 0 away from the nodule
    spiky = disc.clone()
    spiky[0, 0, 16, 2:30] = 1.0
    spiky[0, 0, 2:30, 16] = 1.0
    binary, smooth, spiculated = (soft_compactness(m).item() for m in (disc, soft, spiky))
    assert binary == pytest.approx(1.0, abs=0.15) and smooth == pytest.approx(1.0, abs=0.15)
    assert spiculated < 0.75 * binary
    assert soft_compactness(torch.zeros(1, 1, 32, 32)).item() == 0.0


def test_edge_consistency_terms_pull_towards_the_real_edge() -> None:
    """G's blurred nodule against a crisp real one: the margin term is positive, and its gradient makes the
    generated edge steeper (the image just inside the edge brighter, just outside darker)."""
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=0.0, consistency_area=0.0,
                          consistency_intensity=0.0, consistency_margin=1.0, consistency_shape=1.0)
    real_image, real_mask = _disc_slice(8, 0.3)
    fake_image, fake_mask = _disc_slice(8, 3.0)
    batch = {"background": torch.full_like(real_image, -1.0), "genes": torch.zeros(1, 3), "image": real_image,
             "mask": real_mask, "wrong_mask": torch.zeros_like(real_mask), "wrong_genes": torch.zeros(1, 3)}
    fake = GeneratorOutput(fake_image.requires_grad_(), fake_mask.requires_grad_(), [], torch.zeros(1, 4))
    loss_fn = GANLoss(StubGenerator(), StubDiscriminator(), weights)
    loss, logs = loss_fn.generator_loss(batch, fake)
    assert logs["g_consistency_margin"] > 0.2
    assert logs["g_consistency_shape"] < 0.1  # both are discs
    loss.backward()
    inside_edge, outside_edge = fake.image.grad[0, 0, 16, 16 + 7], fake.image.grad[0, 0, 16, 16 + 9]
    assert inside_edge < 0 < outside_edge  # descent raises the inner layer and lowers the outer one


def test_background_l1_uses_the_eroded_generated_mask_without_gradient() -> None:
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=10.0, erosion_kernel=3, consistency_area=0.0,
                          consistency_intensity=0.0, consistency_margin=0.0, consistency_shape=0.0)
    loss_fn = GANLoss(StubGenerator(), StubDiscriminator(), weights)
    gm = torch.full((1, 1, 8, 8), 0.1)
    gm[0, 0, 3, 3] = 0.9  # one foreground pixel: its 3×3 neighbourhood leaves the L1 region
    fake = GeneratorOutput(_const(-0.5).requires_grad_(), gm.requires_grad_(), [], torch.zeros(1, 4))
    loss, logs = loss_fn.generator_loss(_hand_batch(), fake)
    assert logs["l1_region_fraction"] == pytest.approx(55 / 64)
    assert loss.item() == pytest.approx(10 * 0.5 * 55 / 64)
    loss.backward()
    assert fake.mask.grad is None or fake.mask.grad.abs().sum() == 0
    grad = fake.image.grad[0, 0]
    assert grad[2:5, 2:5].eq(0).all() and grad[0, 0] != 0


def test_inpainting_loss_by_hand() -> None:
    """Hole L1 against the real image + D_I and D_IS; no D_ISG, no genes needed."""
    d = StubDiscriminator(gene_conditioned=False)
    weights = LossWeights(hole_l1=10.0)
    loss_fn = GANLoss(StubGenerator("inpainting"), d, weights)
    batch = _hand_batch()
    batch["mask"] = torch.zeros(1, 1, 8, 8)
    batch["mask"][0, 0, 3:5, 3:5] = 1.0  # area 4 → disc radius 1.5·√(4/π) ≈ 1.69 around (3.5, 3.5)
    hole = loss_fn.hole(batch)
    assert hole.sum().item() == 12  # offsets (±0.5, ±0.5) and (±0.5, ±1.5)/(±1.5, ±0.5)
    del batch["genes"], batch["wrong_genes"]
    gx = (0.5 - hole).requires_grad_()  # the hole filled with −0.5, the rest the real 0.5
    fake = GeneratorOutput(gx, torch.zeros(1, 1, 8, 8), [hole], None)
    loss, logs = loss_fn.generator_loss(batch, fake)
    mean_gx = (52 * 0.5 - 12 * 0.5) / 64  # D_I = D_IS = 0.3125
    assert "g_isg" not in logs
    assert logs["g_l1"] == pytest.approx(12 / 64)
    assert loss.item() == pytest.approx(2 * (mean_gx - 1) ** 2 + 10 * 12 / 64)
    d_loss, d_logs = loss_fn.discriminator_loss(batch, fake)
    assert not any(k.startswith("d_isg") for k in d_logs)
    # D_I: (0.5−1)² + 0.3125²; D_IS: (x,m) = 0.5 + 4/64 → (0.5625−1)², (x,m̄) = 0.5 → 0.5², (Gx,0) → 0.3125²
    assert d_loss.item() == pytest.approx(0.25 + mean_gx**2 + 0.4375**2 + 0.25 + mean_gx**2)


def test_loss_refuses_mismatched_networks_and_batches() -> None:
    with pytest.raises(ValueError, match="gene_conditioned=False"):
        GANLoss(StubGenerator("inpainting"), StubDiscriminator(gene_conditioned=True))
    with pytest.raises(ValueError, match="gene_conditioned=True"):
        GANLoss(StubGenerator("mcgan"), StubDiscriminator(gene_conditioned=False))
    other = Discriminator(DiscriminatorConfig(patch_size=8, base_channels=2, max_channels=2, code_dim=5))
    with pytest.raises(ValueError, match="code size"):
        GANLoss(StubGenerator(), other)
    loss_fn = GANLoss(StubGenerator(), StubDiscriminator())
    batch = _hand_batch()
    del batch["wrong_mask"]
    with pytest.raises(KeyError, match="wrong_mask"):
        loss_fn.discriminator_loss(batch, _hand_fake())


def test_loss_weights_validation_and_round_trip() -> None:
    default = LossWeights()
    assert (default.d_i, default.d_is, default.d_isg, default.background_l1) == (1.0, 1.0, 1.0, 15.0)
    assert default.erosion_kernel == 5 and default.hole_scale == 1.5
    peer = LossWeights.monai_peer()
    assert (peer.d_i, peer.d_is, peer.d_isg, peer.background_l1) == (8.0, 1.0, 10.0, 100.0)
    assert LossWeights.from_dict(peer.to_dict()) == peer
    with pytest.raises(ValueError, match="unknown"):
        LossWeights.from_dict({"lambda_l1": 3})
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(d_is=-1.0)
    with pytest.raises(ValueError, match="odd"):
        LossWeights(erosion_kernel=4)
    assert LossWeights.from_dict({"erosion_kernel": 3.0}).erosion_kernel == 3  # configs hold floats
    with pytest.raises(ValueError, match="integer"):
        LossWeights(erosion_kernel=3.5)


# -- one D step and one G step with the real generators ------------------------------------------------

SMALL_G = {"num_genes": 40, "patch_size": 16, "code_dim": 8, "noise_dim": 4, "base_channels": 4,
           "max_channels": 16, "gene_hidden": 16}  # fmt: skip


def _real_batch(batch: int = 3, size: int = 16, genes: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    masks = torch.zeros(2 * batch, 1, size, size)
    for i in range(2 * batch):
        r = 2 + i % 3
        masks[i, 0, 8 - r : 8 + r, 7 - r : 7 + r] = 1.0
    return {
        "image": torch.rand(batch, 1, size, size, generator=gen) * 2 - 1,
        "mask": masks[:batch],
        "wrong_mask": masks[batch:],
        "background": torch.rand(batch, 1, size, size, generator=gen) * 2 - 1,
        "genes": torch.randn(batch, genes, generator=gen),
        "wrong_genes": torch.randn(batch, genes, generator=gen),
        "patient": torch.arange(batch),
    }


def test_log_area_term_by_hand() -> None:
    """Areas as patch fractions plus the floor 0.005: a 4×4 real nodule in 16² (0.0625) against half its area
    and against nothing; half the area of a large nodule costs about what half of a small one does."""
    real = torch.zeros(1, 1, 16, 16)
    real[..., 4:8, 4:8] = 1.0
    half = torch.zeros(1, 1, 16, 16)
    half[..., 4:8, 4:6] = 1.0
    expected = abs(math.log((0.03125 + 0.005) / (0.0625 + 0.005)))
    assert log_area_term(half, real).item() == pytest.approx(expected, rel=1e-5)
    assert log_area_term(torch.zeros_like(real), real).item() == pytest.approx(math.log(0.0675 / 0.005), rel=1e-5)
    big_real = torch.zeros(1, 1, 16, 16)
    big_real[..., 0:16, 0:8] = 1.0
    big_half = torch.zeros(1, 1, 16, 16)
    big_half[..., 0:8, 0:8] = 1.0
    assert log_area_term(big_half, big_real).item() == pytest.approx(expected, rel=0.15)


def _assert_alone_in_the_loss(name: str, weight: float, expected: float) -> None:
    """With the adversarial, L1, area and intensity terms off, G's loss on the hand batch logs `g_<name>` =
    `expected` and totals `weight` × it."""
    weights = LossWeights(d_i=0.0, d_is=0.0, d_isg=0.0, background_l1=0.0, consistency_area=0.0,
                          consistency_intensity=0.0, **{name: weight})
    _, logs = GANLoss(StubGenerator(), StubDiscriminator(), weights).generator_loss(_hand_batch(), _hand_fake())
    assert logs[f"g_{name}"] == pytest.approx(expected)
    assert logs["g_total"] == pytest.approx(weight * expected)


def test_drawn_area_term_counts_only_what_is_drawn() -> None:
    """A faint fill whose soft area equals the real nodule's meets the log-area term but not the drawn-area
    term, which charges it as a missing nodule and pushes the fill up; a drawn copy of the real nodule costs
    nothing either way. In the G loss the term enters at its weight."""
    real = torch.zeros(1, 1, 16, 16)
    real[..., 4:8, 4:8] = 1.0
    faint = torch.full((1, 1, 16, 16), 0.0625 * 0.99, requires_grad=True)   # soft area ≈ 16 px, nothing > 0.5
    assert log_area_term(faint, real).item() < 0.02
    term = log_area_term(drawn_mask(faint), real)
    assert term.item() > 0.8 * math.log(0.0675 / 0.005)
    term.backward()
    assert (faint.grad < 0).all()    # raising the mask lowers the term
    assert log_area_term(drawn_mask(real * 0.99), real).item() < 0.01
    expected = log_area_term(drawn_mask(_hand_fake().mask), _hand_batch()["mask"]).item()
    _assert_alone_in_the_loss("consistency_drawn_area", 2.0, expected)


def test_thin_strand_area_equals_the_evaluations_count_on_binary_masks() -> None:
    """On binary masks the differentiable residue counts exactly the pixels `metrics.spicule_area_mm2` counts
    (the opening with the 3×3 cross, border as background); a soft ramp is no strand."""
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 1, 20, 20, generator=generator) < torch.linspace(0.2, 0.8, 6)[:, None, None, None])
    masks[0, 0, 4:14, 4:14] = True                          # a body with strands and specks around it
    counted = thin_strand_area(masks.float())
    expected = [spicule_area_mm2(mask[0].numpy()) for mask in masks]
    assert counted.tolist() == pytest.approx(expected)
    assert max(expected) > 0 and min(expected) >= 0
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    distance = ((rows - 11.5) ** 2 + (cols - 11.5) ** 2).sqrt()
    for edge_px in (1, 2, 4):                               # a disc of radius 8 px with a blurred edge
        blurred = ((8 - distance) / edge_px).clamp(0, 1)[None, None]
        assert thin_strand_area(blurred).item() < 0.6      # of 117–177 px: the edge is no strand


def _descend_spicule_term(start_logits: torch.Tensor, real_mask: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """The binary mask (> 0.5) after `steps` Adam steps on the spicule term alone, from sigmoid(start_logits)."""
    logits = start_logits.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        optimiser.zero_grad()
        spicule_term(torch.sigmoid(logits), real_mask).backward()
        optimiser.step()
    return torch.sigmoid(logits).detach() > 0.5


def test_spicule_term_draws_strands_for_a_spiculated_donor_and_none_for_a_smooth_one() -> None:
    """Descending the term alone on a free mask, from a soft-edged disc: against a donor with three one-pixel
    spicules the drawn outline gains about as many strand pixels as the donor has; against a smooth donor a
    spiculated start loses them. A copy of the donor costs nothing; in the G loss the term enters at its weight."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    distance = ((rows - 15.5) ** 2 + (cols - 15.5) ** 2).sqrt()
    smooth = (distance <= 7).float()[None, None]
    spiculated = smooth.clone()
    spiculated[..., 16, 23:29] = 1.0                       # three strands, one pixel wide
    spiculated[..., 2:9, 15] = 1.0
    spiculated[..., 16:18, 2:9] = 0.0
    spiculated[..., 17, 3:9] = 1.0
    strands = thin_strand_area(spiculated).item()
    assert strands >= 12 and thin_strand_area(smooth).item() == 0
    noise = 0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    grown = _descend_spicule_term((2.0 * (7 - distance) + noise)[None, None], spiculated)
    assert abs(spicule_area_mm2(grown[0, 0].numpy()) - strands) <= 2
    assert abs(int(grown.sum()) - int(smooth.sum())) <= 10   # the body kept: strands, not a new nodule
    smoothed = _descend_spicule_term(torch.where(spiculated > 0, 4.0, -4.0) + noise, smooth)
    assert spicule_area_mm2(smoothed[0, 0].numpy()) <= 2
    assert spicule_term(smooth * 0.98 + 0.01, spiculated).item() == pytest.approx(strands / SPICULE_SCALE_PX, rel=0.05)
    assert spicule_term(spiculated * 0.98 + 0.01, spiculated).item() < 0.05
    expected = spicule_term(_hand_fake().mask, _hand_batch()["mask"]).item()
    _assert_alone_in_the_loss("consistency_spicules", 2.0, expected)


def _disc(size: int, radius: float, core_radius: float = 0.0, core: float = 0.0) -> torch.Tensor:
    """(1,1,S,S) image: 0.2 inside a centred disc of `radius` px, `core` inside `core_radius` px, 0 outside."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((rows - (size - 1) / 2) ** 2 + (cols - (size - 1) / 2) ** 2).sqrt()
    image = 0.2 * (distance <= radius).float() + (core - 0.2) * (distance < core_radius).float()
    return image[None, None]


def test_core_contrast_by_hand() -> None:
    """A 10 px disc at 0.2 with a 1.0 core inside its inner half (r < 5): contrast 0.8; flat, 0; a 3 px disc
    (29 px) is below CORE_MIN_PX and does not count. The term pulls a flat nodule's middle up towards a cored
    real one's, and only through the image."""
    mask = (_disc(32, 10) > 0).float()
    cored, flat = _disc(32, 10, 5, 1.0), _disc(32, 10)
    contrast, valid = core_contrast(cored, mask)
    assert contrast.item() == pytest.approx(0.8, abs=0.02) and valid.item()
    assert core_contrast(flat, mask)[0].item() == pytest.approx(0.0, abs=1e-4)
    small = (_disc(32, 3) > 0).float()
    assert not core_contrast(_disc(32, 3), small)[1].item()
    generated = flat.clone().requires_grad_()
    soft_mask = (mask * 0.9).requires_grad_()
    term = core_term(generated, soft_mask, cored, mask)
    assert term.item() == pytest.approx(0.8, abs=0.02)
    term.backward()
    centre = generated.grad[0, 0, 15, 15]
    rim = generated.grad[0, 0, 15, 15 + 8]
    assert centre < 0 < rim
    assert soft_mask.grad is None or not soft_mask.grad.any()   # the geometry is not pushed
    assert core_term(flat, mask, _disc(32, 3, 1.5, 1.0), small).item() == 0.0   # the real one too small
    expected = core_term(_hand_fake().image, _hand_fake().mask, _hand_batch()["image"], _hand_batch()["mask"])
    _assert_alone_in_the_loss("consistency_core", 3.0, expected.item())


def test_quantile_term_by_hand() -> None:
    """A flat 0.6 disc against a real one of the same mean that is half 0.2, half 1.0 (a cored nodule): the
    soft-mask mean sees little, every decile is 0.2 or 1.0 against 0.6: 0.4 (the median may interpolate
    between the halves, so within 0.03). The gradient spreads the flat values apart; the mask is not
    pushed; identical nodules cost 0 and a real nodule below CORE_MIN_PX adds nothing."""
    mask = (_disc(32, 10) > 0).float()
    cored = _disc(32, 10, 7.07, 1.0)   # the inner disc holds about half of the pixels
    flat = 0.6 * mask
    generated = flat.clone().requires_grad_()
    soft_mask = (mask * 0.9).requires_grad_()
    term = quantile_term(generated, soft_mask, cored, mask)
    assert term.item() == pytest.approx(0.4, abs=0.03)
    term.backward()
    grad = generated.grad[0, 0][mask[0, 0] > 0]
    assert (grad > 0).any() and (grad < 0).any()              # some values pushed down, others up
    assert soft_mask.grad is None or not soft_mask.grad.any()
    assert quantile_term(cored, mask, cored, mask).item() == pytest.approx(0.0, abs=1e-6)
    small = (_disc(32, 3) > 0).float()
    assert quantile_term(flat, mask, _disc(32, 3), small).item() == 0.0
    expected = quantile_term(_hand_fake().image, _hand_fake().mask, _hand_batch()["image"], _hand_batch()["mask"])
    _assert_alone_in_the_loss("consistency_quantiles", 2.0, expected.item())


def test_background_leak_by_hand() -> None:
    """On a random textured background and a 10 px disc: an image that is 0.3 × the background + 0.1 shows it
    at slope 0.3, a copy at 1, an independent texture at ≈ 0; the term is β² and pulls the leaking image away
    from the background, never the mask. A disc below CORE_MIN_PX inside pixels adds nothing."""
    gen = torch.Generator().manual_seed(3)
    background = torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1
    other = torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1
    mask = (_disc(32, 10) > 0).float()
    assert background_leak(0.3 * background + 0.1, mask, background)[0].item() == pytest.approx(0.3, abs=1e-4)
    assert background_leak(background, mask, background)[0].item() == pytest.approx(1.0, abs=1e-4)
    assert abs(background_leak(other, mask, background)[0].item()) < 0.15
    leaking = (0.5 * background).requires_grad_()
    soft_mask = (mask * 0.9).requires_grad_()
    term = leak_term(leaking, soft_mask, background)
    assert term.item() == pytest.approx(0.25, abs=1e-3)
    term.backward()
    step = leaking - 0.1 * leaking.grad
    assert background_leak(step, mask, background)[0].item() < 0.5       # the gradient lowers the slope
    assert soft_mask.grad is None or not soft_mask.grad.any()
    small = (_disc(32, 3) > 0).float()
    assert leak_term(background, small, background).item() == 0.0
    expected = leak_term(_hand_fake().image, _hand_fake().mask, _hand_batch()["background"])
    _assert_alone_in_the_loss("background_leak", 2.0, expected.item())


def test_augment_alike_by_hand() -> None:
    """Row 0 is augmented (draw 0 < p): shifted one row down on an 8² patch (S/8 = 1, the top row replicated),
    its 4² cutout at the corner zeroed, image and mask alike; row 1 (draw 0.9 ≥ p) is untouched. Gradient
    reaches the image where the augmented copy still shows it. With p = 0 nothing changes. The loss refuses a
    batch without the draws when the augmentation is on."""
    image = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1).requires_grad_()
    mask = (image.detach() > 30).float()
    draws = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0], [0.9, 1.0, 0.5, 0.5, 0.5]])
    moved, moved_mask = augment_alike((image, mask), draws, 0.5)
    expected = torch.cat([image[0, 0, :1], image[0, 0, :-1]]).detach()
    expected[:2, :2] = 0
    assert torch.equal(moved[0, 0], expected) and torch.equal(moved[1], image[1].detach())
    assert torch.equal(moved_mask[0, 0, 2:], mask[0, 0, 1:-1]) and moved_mask[0, 0, :2, :2].sum() == 0
    moved.sum().backward()
    assert image.grad[1].eq(1).all() and image.grad[0, 0, 7].eq(0).all() and image.grad[0, 0, 3, 3] == 1
    assert all(torch.equal(a, b) for a, b in zip(augment_alike((image, mask), draws, 0.0), (image, mask)))
    with pytest.raises(ValueError, match="probability"):
        LossWeights(d_augment=1.5)
    weights = LossWeights(d_augment=0.5)
    with pytest.raises(KeyError, match="augment"):
        GANLoss(StubGenerator(), StubDiscriminator(), weights).discriminator_loss(_hand_batch(), _hand_fake())


def test_position_term_by_hand() -> None:
    """Real nodule at the centre (rows/cols 6–9 of 16); row 0 draws it there, row 1 in the corner (0–3) with a
    faint speck at the centre that must not count: (6/16)·√2 patch widths off, averaged over the 2 rows.
    Gradient moves weight within the corner blob towards the real nodule, nothing reaches the faint speck."""
    real = torch.zeros(2, 1, 16, 16)
    real[:, :, 6:10, 6:10] = 1.0
    drawn = torch.zeros(2, 1, 16, 16)
    drawn[0, 0, 6:10, 6:10] = 0.9
    drawn[1, 0, 0:4, 0:4] = 0.9
    drawn[1, 0, 8, 8] = 0.3
    drawn.requires_grad_()
    term = position_term(drawn, real)
    assert term.item() == pytest.approx((6 / 16) * 2 ** 0.5 / 2, rel=1e-5)
    term.backward()
    corner = drawn.grad[1, 0, 0:4, 0:4]
    assert corner[3, 3] < 0 < corner[0, 0] and drawn.grad[1, 0, 8, 8] == 0
    # nothing drawn: no term (the area term handles empty masks)
    assert position_term(torch.zeros(1, 1, 16, 16), real[:1]).item() == 0.0


def test_spread_term_by_hand() -> None:
    """Real 4×4 nodule at the centre of 16², Rg² = 2.5 px². Row 0 draws it there (0); row 1 draws it 6 rows up
    (Rg² = 2.5 + 36 px² about the real centroid); row 2 draws two 2×2 pieces 5 rows either side of the point,
    which the position term does not see (their centroid is the point; Rg² = 25.5 px²); row 3 a smaller nodule at
    the point (0: the term is one-sided, the area terms ask for size). The outermost pixels are pushed down."""
    real = torch.zeros(4, 1, 16, 16)
    real[:, :, 6:10, 6:10] = 1.0
    drawn = torch.zeros(4, 1, 16, 16)
    drawn[0, 0, 6:10, 6:10] = 0.9
    drawn[1, 0, 0:4, 6:10] = 0.9
    drawn[2, 0, 2:4, 7:9] = 0.9
    drawn[2, 0, 12:14, 7:9] = 0.9
    drawn[3, 0, 7:9, 7:9] = 0.9
    drawn.requires_grad_()
    assert position_term(drawn[2:3], real[2:3]).item() == pytest.approx(0.0, abs=1e-5)
    term = spread_term(drawn, real)
    expected = ((38.5 ** 0.5 - 2.5 ** 0.5) + (25.5 ** 0.5 - 2.5 ** 0.5)) / 16 / 4
    assert term.item() == pytest.approx(expected, rel=1e-4)
    term.backward()
    outer = torch.stack([drawn.grad[2, 0, 2, 7:9], drawn.grad[2, 0, 13, 7:9], drawn.grad[1, 0, 0, 6:8]])
    assert (outer > 0).all() and (drawn.grad[2, 0, 3, 7:9] < 0).all()   # outer rows down, inner ones up
    assert drawn.grad[0].abs().sum() == 0 and drawn.grad[3].abs().sum() == 0
    assert spread_term(torch.zeros(1, 1, 16, 16), real[:1]).item() == 0.0   # nothing drawn: the area terms' job


def test_mode_seeking_term_by_hand() -> None:
    """A 4×4 nodule that differs by 0.4 (0.2 in [0, 1] units) between two draws; the region is the union
    dilated by 3 px (10×10); noise distance one typical unit, then two."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:10, 6:10] = 1.0
    image = torch.zeros(1, 1, 16, 16, requires_grad=True)
    other = (0.4 * mask).requires_grad_()
    z = torch.zeros(1, 4)
    typical = torch.full((1, 4), 2 / torch.pi ** 0.5)      # E|z − z′| for independent standard normals
    difference = 0.2 * 16 / (100 + 1e-3)
    term = mode_seeking_term(image, mask, other, mask, z, typical, target=0.045)
    assert term.item() == pytest.approx(1 - difference / 0.045, rel=1e-4)
    term.backward()
    assert other.grad[mask.bool()].lt(0).all() and other.grad[~mask.bool()].abs().sum() < 0.3 * other.grad.abs().sum()
    # twice the noise distance asks for twice the difference; beyond the target nothing is asked
    assert mode_seeking_term(image, mask, other, mask, z, 2 * typical, 0.045).item() == pytest.approx(
        1 - difference / 2 / 0.045, rel=1e-4)
    assert mode_seeking_term(image, mask, other, mask, z, typical, target=0.03).item() == 0.0
    # identical draws score 1; two empty masks score 1 and pull on nothing
    assert mode_seeking_term(image, mask, image, mask, z, typical, 0.045).item() == pytest.approx(1.0)
    empty = torch.zeros_like(mask)
    flat = torch.zeros(1, 1, 16, 16, requires_grad=True)
    mode_seeking_term(flat, empty, other, empty, z, typical, 0.045).backward()
    assert not flat.grad.any()


def test_mode_seeking_g_step_compares_two_noises_for_the_same_inputs() -> None:
    """The second draw is G on the first half of the batch with the noise of the row before; its term enters
    L_G with its weight and reaches G; the inpainting baseline (no noise) is refused by the config."""
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="proposed", **SMALL_G)).eval()   # eval: no batch statistics
    with torch.no_grad():
        g.mask_head.conv.bias.fill_(3.0)   # a drawn mask: the term compares the draws inside it
    d = Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4))
    weights = LossWeights(mode_seeking=2.0)
    loss_fn = GANLoss(g, d, weights)
    assert loss_fn.seeks_modes and not GANLoss(g, d).seeks_modes
    batch, noise = _real_batch(4), torch.randn(4, 4)
    fake, second = generate_with_second_draw(loss_fn.run_generator, batch, noise)
    torch.testing.assert_close(fake.image, loss_fn.run_generator(batch, noise).image)
    first_rows = {k: v[:2] for k, v in batch.items()}
    torch.testing.assert_close(second.output.image, loss_fn.run_generator(first_rows, noise[[3, 0]]).image)
    torch.testing.assert_close(second.other_noise, noise[[3, 0]])
    with_term, logs = loss_fn.generator_loss(batch, fake, second)
    without, plain = loss_fn.generator_loss(batch, fake)
    assert "g_mode_seeking" not in plain and 0.0 <= logs["g_mode_seeking"] <= 1.0
    assert with_term.item() == pytest.approx(without.item() + 2.0 * logs["g_mode_seeking"], rel=1e-5)
    g.zero_grad()
    mode_seeking_term(fake.image[:2], fake.mask[:2], second.output.image, second.output.mask, second.noise,
                      second.other_noise, 10.0).backward()    # a high target: the hinge is active
    assert any(_nonzero(p) for p in g.parameters())
    # lazy: every third step only, at three times the weight
    lazy = GANLoss(g, d, LossWeights(mode_seeking=2.0, mode_seeking_every=3))
    assert [lazy.seeks_modes_at(step) for step in range(7)] == [True, False, False, True, False, False, True]
    assert all(loss_fn.seeks_modes_at(step) for step in range(3))
    lazy_loss, lazy_logs = lazy.generator_loss(batch, fake, second)
    assert lazy_loss.item() == pytest.approx(without.item() + 6.0 * lazy_logs["g_mode_seeking"], rel=1e-5)


def test_detached_second_draw_costs_no_graph_and_leaves_the_batch_statistics_alone() -> None:
    """`mode_seeking_detached`: the main draw is G's plain training forward, the second one (first half, noise of
    the row before) has no graph, G's running statistics end as after the main forward alone, and the term's
    gradient still reaches G through the main draw."""
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="proposed", **SMALL_G)).train()
    with torch.no_grad():
        g.mask_head.conv.bias.fill_(3.0)
    d = Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4))
    loss_fn = GANLoss(g, d, LossWeights(mode_seeking=2.0, mode_seeking_detached=True))
    batch, noise = _real_batch(4), torch.randn(4, 4)
    plain_g = copy.deepcopy(g)
    expected = GANLoss(plain_g, d).run_generator(batch, noise)
    fake, second = generate_with_detached_second_draw(loss_fn.run_generator, g, loss_fn.run_generator, batch, noise)
    torch.testing.assert_close(fake.image, expected.image)
    torch.testing.assert_close(second.other_noise, noise[[3, 0]])
    assert second.output.image.shape[0] == 2 and not second.output.image.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(g.buffers(), plain_g.buffers()))
    assert not torch.allclose(second.output.image, fake.image[:2])   # other noise, another nodule
    g.zero_grad()
    loss, logs = loss_fn.generator_loss(batch, fake, second)
    without, _ = loss_fn.generator_loss(batch, fake)
    assert 0.0 <= logs["g_mode_seeking"] <= 1.0
    assert loss.item() == pytest.approx(without.item() + 2.0 * logs["g_mode_seeking"], rel=1e-5)
    mode_seeking_term(fake.image[:2], fake.mask[:2], second.output.image, second.output.mask, second.noise,
                      second.other_noise, 10.0).backward()
    assert any(_nonzero(p) for p in g.parameters())
    with pytest.raises(ValueError, match="true or false"):
        LossWeights(mode_seeking_detached=1)


def test_paired_second_draw_is_the_batch_second_half() -> None:
    """`mode_seeking_paired`: rows [2, 4) of a 5-row batch become rows [0, 2) again (reals, wrong pairings and
    genes included) but keep their own augmentation; the odd last row stays itself; layouts stay channels-last.
    G's output for that batch is the main draw and its rows [2, 4) the second draw, with their own noise, so
    the two halves differ, and the term's gradient reaches G through both."""
    torch.manual_seed(0)
    batch = _real_batch(5)
    batch["augment"] = torch.rand(5, 2, 4)
    batch["background"] = batch["background"].contiguous(memory_format=torch.channels_last)
    paired = paired_batch(batch)
    for key, value in batch.items():
        expected = value if key == "augment" else value[[0, 1, 0, 1, 4]]
        assert torch.equal(paired[key], expected), key
    assert paired["background"].is_contiguous(memory_format=torch.channels_last)
    g = build_generator(GeneratorConfig(kind="proposed", **SMALL_G)).eval()
    with torch.no_grad():
        g.mask_head.conv.bias.fill_(3.0)
    d = Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4))
    loss_fn = GANLoss(g, d, LossWeights(mode_seeking=2.0, mode_seeking_paired=True))
    noise = torch.randn(5, 4)
    scored, fake, second = generate_paired(loss_fn.run_generator, batch, noise)
    assert torch.equal(scored["genes"], paired["genes"])
    torch.testing.assert_close(fake.image, loss_fn.run_generator(paired, noise).image)
    torch.testing.assert_close(second.output.image, fake.image[2:4])
    assert torch.equal(second.noise, noise[:2]) and torch.equal(second.other_noise, noise[2:4])
    assert not torch.allclose(fake.image[:2], fake.image[2:4])   # same inputs, other noise
    loss, logs = loss_fn.generator_loss(scored, fake, second)
    without, _ = loss_fn.generator_loss(scored, fake)
    assert loss.item() == pytest.approx(without.item() + 2.0 * logs["g_mode_seeking"], rel=1e-5)
    g.zero_grad()
    mode_seeking_term(fake.image[:2], fake.mask[:2], second.output.image, second.output.mask, second.noise,
                      second.other_noise, 10.0).backward()
    assert any(_nonzero(p) for p in g.parameters())
    one_row = {key: value[:1] for key, value in batch.items()}
    assert generate_paired(loss_fn.run_generator, one_row, noise[:1])[2] is None
    with pytest.raises(ValueError, match="turn on one of them"):
        LossWeights(mode_seeking=1.0, mode_seeking_detached=True, mode_seeking_paired=True)


@pytest.mark.parametrize(("every", "message"), [(0, "at least 1"), (2.5, "must be an integer")])
def test_mode_seeking_interval_is_a_positive_whole_number(every: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossWeights(mode_seeking=1.0, mode_seeking_every=every)
    assert LossWeights(mode_seeking_every=2.0).mode_seeking_every == 2   # from a JSON config of floats


def _nonzero(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("kind", "independent"), [("proposed", False), ("proposed", True), ("mcgan", False), ("inpainting", False)]
)
def test_one_d_step_and_one_g_step_reach_every_parameter(kind: str, independent: bool) -> None:
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind=kind, **SMALL_G))
    dcfg = DiscriminatorConfig.for_generator(g.config, base_channels=4, max_channels=16,
                                             independent_mapping=independent)  # fmt: skip
    d = Discriminator(dcfg)
    loss_fn = GANLoss(g, d)
    batch = _real_batch()

    # D step: every D parameter learns (its own mapping too, with the switch); nothing reaches G,
    # in particular not G's mapping network (φ(g) detached)
    fake = loss_fn.run_generator(batch)
    d_loss, d_logs = loss_fn.discriminator_loss(batch, fake)
    d_loss.backward()
    dead = [n for n, p in d.named_parameters() if not _nonzero(p)]
    assert not dead, f"D parameters without gradient in the D step: {dead}"
    assert all(p.grad is None for p in g.parameters())
    assert (d.mapping is not None) == independent
    assert ("d_isg_wrong_gene" in d_logs) == (kind != "inpainting")

    # G step: every G parameter learns; D is frozen for the step and unfrozen after
    d.zero_grad(set_to_none=True)
    fake = loss_fn.run_generator(batch)
    g_loss, g_logs = loss_fn.generator_loss(batch, fake)
    g_loss.backward()
    dead = [n for n, p in g.named_parameters() if not _nonzero(p)]
    assert not dead, f"G parameters without gradient in the G step: {dead}"
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())
    l1_weight = LossWeights().hole_l1 if kind == "inpainting" else LossWeights().background_l1
    consistency = 0.0 if kind == "inpainting" else (
        sum(getattr(LossWeights(), f"consistency_{term}") * g_logs.get(f"g_consistency_{term}", 0.0)
            for term in ("area", "intensity", "margin", "shape")))
    assert g_logs["g_total"] == pytest.approx(g_logs["g_adv"] + l1_weight * g_logs["g_l1"] + consistency, rel=1e-5)


def test_inpainting_generator_gets_the_real_slice_with_the_nodule_hole() -> None:
    """Decision 9's fair comparison: inpainting erases the disc over the real nodule of x and refills it,
    so everything outside the 1.5 × radius disc is the real image."""
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="inpainting", **SMALL_G))
    loss_fn = GANLoss(g, Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4)))
    batch = _real_batch()
    fake = loss_fn.run_generator(batch)
    hole = loss_fn.hole(batch)
    assert hole.sum() > batch["mask"].sum()  # the disc covers the nodule with margin
    outside = hole == 0
    torch.testing.assert_close(fake.image[outside], batch["image"][outside])
    assert fake.gene_code is None


def test_noise_is_passed_through() -> None:
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="proposed", **SMALL_G)).eval()
    loss_fn = GANLoss(g, Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4)))
    batch = _real_batch()
    noise = torch.randn(3, 4)
    a = loss_fn.run_generator(batch, noise).image
    b = loss_fn.run_generator(batch, noise).image
    c = loss_fn.run_generator(batch, torch.randn(3, 4)).image
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_slice_position_reaches_the_generator_in_both_draws() -> None:
    """A `slice_position` generator draws each row at its real slice's place (the batch's `position`), in the
    main draw and in the mode-seeking second draw; a batch without positions is refused by name."""
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(kind="proposed", slice_position=True, **SMALL_G)).eval()
    loss_fn = GANLoss(g, Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4)))
    batch = {**_real_batch(batch=4), "position": torch.tensor([0.0, 0.5, -0.5, 0.9])}
    noise = torch.randn(4, 4)
    expected = g(batch["background"], batch["genes"], noise, position=batch["position"]).image
    torch.testing.assert_close(loss_fn.run_generator(batch, noise).image, expected)
    assert not torch.allclose(g(batch["background"], batch["genes"], noise).image, expected)
    _, second = generate_with_second_draw(loss_fn.run_generator, batch, noise)
    again = g(batch["background"][:2], batch["genes"][:2], noise[[3, 0]], position=batch["position"][:2]).image
    torch.testing.assert_close(second.output.image, again)
    del batch["position"]
    with pytest.raises(KeyError, match="position"):
        loss_fn.run_generator(batch, noise)


@pytest.mark.parametrize("kind", ["proposed", "inpainting"])
def test_g_step_scores_the_fake_with_the_d_steps_batch_statistics(kind: str) -> None:
    """D's batch norm (train mode) must see the same batch in both steps: the G step's fake scores equal the
    D step's, so G cannot fool D through batch statistics alone (a fake-only batch would shift them)."""
    torch.manual_seed(1)
    g = build_generator(GeneratorConfig(kind=kind, **SMALL_G))
    d = Discriminator(DiscriminatorConfig.for_generator(g.config, base_channels=4, max_channels=16))
    loss_fn = GANLoss(g, d)
    batch = _real_batch()
    fake = loss_fn.run_generator(batch)
    _, d_logs = loss_fn.discriminator_loss(batch, fake)
    _, g_logs = loss_fn.generator_loss(batch, fake)
    # LS terms of the same fake scores: D_I(Gx)² in the D step, (D_I(Gx) − 1)² in the G step
    with torch.no_grad():
        scores_d = loss_fn._score_tuples(batch, fake, g_step=False)
        with frozen(d):
            scores_g = loss_fn._score_tuples(batch, fake, g_step=True)
    for name in scores_d:
        torch.testing.assert_close(scores_g[name], scores_d[name])
    assert d_logs["d_i_fake"] == pytest.approx(float((scores_d["i_fake"] ** 2).mean()), rel=1e-5)
    assert g_logs["g_i"] == pytest.approx(float(((scores_g["i_fake"] - 1) ** 2).mean()), rel=1e-5)
