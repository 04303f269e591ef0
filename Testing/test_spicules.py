"""The generator's drawn spicules (`networks.CodeDrivenSpicules`): strands that reach out, as many as the anchored
gene-code coordinate asks for, moved by the noise, none on an empty nodule; off, the generator is as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from RadiogenomicGANLib.networks import CodeDrivenSpicules, GeneratorConfig, build_generator
from training.metrics import long_strand_area_mm2

SIZE, INDEX, ANCHOR_SD = 64, 3, 3.0


def _disc(batch: int, radius: float = 6.0) -> torch.Tensor:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    disc = ((rows - 32) ** 2 + (cols - 30) ** 2 < radius**2).astype(np.float32)
    return torch.from_numpy(disc)[None, None].repeat(batch, 1, 1, 1)


def _code(batch: int, sd: float) -> torch.Tensor:
    code = torch.zeros(batch, 16)
    code[:, INDEX] = sd * ANCHOR_SD
    return code


def _long_strands(mask: torch.Tensor) -> list[float]:
    return [long_strand_area_mm2(m) for m in (mask[:, 0] > 0.5).numpy()]


def test_strands_follow_the_anchored_coordinate_and_reach_out() -> None:
    torch.manual_seed(0)
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    disc, noise = _disc(32), torch.randn(32, 16)
    image = torch.zeros_like(disc)
    areas = {}
    for sd in (-3.0, 0.0, 3.0):
        _, mask, _ = spicules(image, disc, _code(32, sd), noise)
        assert torch.all(mask >= disc)                      # a union: the body is kept
        areas[sd] = float(np.mean(_long_strands(mask)))
    assert areas[-3.0] < 0.5 < areas[3.0]
    assert areas[-3.0] < areas[0.0] < areas[3.0]
    # what is added lies outside the body, reaching out from it
    _, mask, _ = spicules(image, disc, _code(32, 3.0), noise)
    added = (mask > 0.5) & (disc == 0)
    rows, cols = torch.nonzero(added[:, 0], as_tuple=True)[1:]
    assert float(torch.sqrt((rows - 32.0) ** 2 + (cols - 30.0) ** 2).max()) > 6.0 + 3.0


def test_strands_take_the_nodule_value_and_none_grow_on_an_empty_nodule() -> None:
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    disc = _disc(4)
    image = torch.where(disc > 0, torch.tensor(0.4), torch.tensor(-0.8))
    new_image, mask, _ = spicules(image, disc, _code(4, 3.0), torch.randn(4, 16))
    strand = (mask > 0.5) & (disc == 0)
    assert strand.any() and torch.allclose(new_image[strand], torch.tensor(0.4))
    _, empty, _ = spicules(image, torch.zeros_like(disc), _code(4, 3.0), torch.randn(4, 16))
    assert float(empty.detach().max()) == 0.0


def test_noise_moves_the_strands_and_the_same_noise_repeats_them() -> None:
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    disc, code = _disc(2), _code(2, 2.0)
    first = spicules(torch.zeros_like(disc), disc, code, torch.randn(2, 16))[1]
    other = spicules(torch.zeros_like(disc), disc, code, torch.randn(2, 16))[1]
    noise = torch.randn(2, 16)
    same = [spicules(torch.zeros_like(disc), disc, code, noise)[1] for _ in range(2)]
    assert not torch.equal(first > 0.5, other > 0.5)
    assert torch.equal(same[0], same[1])                 # a nodule's slices share their noise, so their strands


def test_gradient_reaches_the_presence_and_the_code() -> None:
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    code = _code(4, 1.0).requires_grad_(True)
    _, mask, _ = spicules(torch.zeros(4, 1, SIZE, SIZE), _disc(4), code, torch.randn(4, 16))
    mask.sum().backward()
    assert float(spicules.presence_bias.grad) > 0 and float(spicules.log_length0.grad) > 0
    assert float(code.grad[:, INDEX].sum()) > 0 and float(code.grad[:, :INDEX].abs().sum()) == 0


def test_off_the_generator_is_unchanged_and_on_it_draws_from_its_own_noise() -> None:
    base = dict(num_genes=32, patch_size=32, base_channels=4, max_channels=8, noise_dim=16, anchor_sd=ANCHOR_SD)
    torch.manual_seed(5)
    plain = build_generator(GeneratorConfig(**base))
    torch.manual_seed(5)
    spiculated = build_generator(GeneratorConfig(**base, spicules=6))
    shared = plain.state_dict()
    extra = set(spiculated.state_dict()) - set(shared)
    assert extra == {"spicules.presence_bias", "spicules.log_length0"}   # projections are rebuilt, not stored
    assert all(torch.equal(shared[k], spiculated.state_dict()[k]) for k in shared)   # same initialisation
    background, genes = torch.zeros(2, 1, 32, 32), torch.randn(2, 32)
    torch.manual_seed(1)
    drawn = spiculated.eval()(background, genes)
    torch.manual_seed(1)
    again = spiculated(background, genes, noise=torch.randn(2, 16))
    assert torch.equal(drawn.mask, again.mask) and torch.equal(drawn.image, again.image)


class _FixedMask(torch.nn.Module):
    """A mask head that draws the same disc whatever it is given."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mask[: features.shape[0]] + 0 * features[:, :1]


STRAND_GENERATOR = dict(num_genes=32, patch_size=64, base_channels=4, max_channels=8, noise_dim=16,
                        anchor_sd=ANCHOR_SD, spicules=8, edge_blur_per_sd=0.6, edge_inside_mask=True)


def _blended_beside(batch: int, contrast: float | None = None, **painting: bool) -> tuple:
    """A generator with a way of painting the strands after the edge (`painting`; `contrast` calibrated when given)
    and one that blends them before it, built alike, drawing the same disc with strands on every nodule: the
    painted generator, both outputs on a lung background (−0.8), and the disc, genes and noise."""
    torch.manual_seed(5)
    blended = build_generator(GeneratorConfig(**STRAND_GENERATOR)).eval()
    torch.manual_seed(5)
    painted = build_generator(GeneratorConfig(**STRAND_GENERATOR, **painting)).eval()
    added = set(painted.state_dict()) - set(blended.state_dict())
    assert added == ({"spicules.contrast"} if painting.get("spicule_contrast") else {"spicules.solid_value"})
    if contrast is not None:
        painted.spicules.calibrate_contrast(contrast)
    disc, genes, noise = _disc(batch), torch.randn(batch, 32), torch.randn(batch, 16)
    for generator in (blended, painted):
        generator.mask_head = _FixedMask(disc)
        with torch.no_grad():                       # strands on every nodule
            generator.spicules.presence_bias.fill_(8.0)
    background = torch.full((batch, 1, SIZE, SIZE), -0.8)
    return painted, blended(background, genes, noise), painted(background, genes, noise), disc, genes, noise


def test_solid_strands_are_painted_sharp_after_the_edge_at_their_own_value() -> None:
    """With `spicule_solid` the strands keep the learned value (0 HU at the start) after the edge blur, whatever
    the nodule's intensity; the label is the same as without it, and the value learns from the image."""
    solid, plain, sharp, disc, genes, noise = _blended_beside(2, spicule_solid=True)
    assert torch.equal(plain.mask, sharp.mask)
    strand = solid.spicules.strands(disc, solid.encode_genes(genes), noise) > 0.5
    assert (strand & (disc == 0)).any()
    assert torch.allclose(sharp.image[strand], torch.tensor(CodeDrivenSpicules.SOLID_START))
    assert not torch.allclose(plain.image[strand], torch.tensor(CodeDrivenSpicules.SOLID_START), atol=0.05)
    sharp.image[strand].sum().backward()
    assert float(solid.spicules.solid_value.grad) > 0


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="spicules must be ≥ 0"):
        GeneratorConfig(spicules=-1)
    with pytest.raises(ValueError, match="spicule_code_index must lie in"):
        GeneratorConfig(code_dim=3, spicules=4)
    with pytest.raises(ValueError, match="spicules is a setting of the proposed generator"):
        GeneratorConfig(kind="mcgan", spicules=4)
    with pytest.raises(ValueError, match="spicule_solid is a setting of the drawn spicules"):
        GeneratorConfig(spicule_solid=True)
    with pytest.raises(ValueError, match="spicules_follow_outline is a setting of the drawn spicules"):
        GeneratorConfig(spicules_follow_outline=True)


def _strand_reach(mask: torch.Tensor, centre_row: float) -> float:
    """How far below `centre_row` the label reaches in the strand's column (30)."""
    rows = torch.nonzero(mask[0, 0, :, 30] > 0.5)[:, 0]
    return float(rows.max()) - centre_row


def test_following_the_outline_starts_each_strand_at_its_own_radius() -> None:
    # a disc of radius 6 with a lobe bulging to radius 11 straight down, where the one strand (no noise: the
    # even directions, the first pointing down the rows) leaves
    body = _disc(1)
    body[0, 0, 32:44, 28:33] = 1.0
    area_radius = float(torch.sqrt(body.sum() / np.pi))
    centre_row = float((body[0, 0].sum(dim=1) * torch.arange(SIZE)).sum() / body.sum())
    lobe_tip = 43.5 - centre_row    # the outline's radius straight down: half-way past the lobe's last row
    plain = CodeDrivenSpicules(1, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    following = CodeDrivenSpicules(1, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD, follow_outline=True)
    following.load_state_dict(plain.state_dict())
    code = _code(1, 3.0)
    length = float(plain.strand_parameters(code, None)[2].detach())
    image = torch.zeros_like(body)
    reach = {name: _strand_reach(module(image, body, code, None)[1], centre_row) for name, module in
             (("plain", plain), ("following", following))}
    # from the mean radius the strand's first pixels lie inside the lobe; from the lobe's tip it reaches L beyond
    assert abs(reach["plain"] - (area_radius + length)) <= 1.0, reach
    assert abs(reach["following"] - (lobe_tip + length)) <= 1.0, reach
    assert reach["following"] - reach["plain"] > 2.0, reach
    # on a disc the outline's radius is the mean radius: the same strands, to a pixel
    disc = _disc(1)
    assert abs(_strand_reach(plain(image, disc, code, None)[1], 32.0)
               - _strand_reach(following(image, disc, code, None)[1], 32.0)) <= 1.0


def test_a_faint_fill_does_not_move_the_strands() -> None:
    """The geometry is the drawn mask's: a soft mask's faint fill elsewhere (0.3, under the 0.5 threshold) leaves the
    strands where they were; read from the soft mask it pulled them off the body."""
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    disc, code, noise = _disc(4), _code(4, 3.0), torch.randn(4, 16)
    fill = torch.zeros_like(disc)
    fill[..., :, 40:] = 0.3
    clean = spicules.strands(disc, code, noise)
    assert torch.equal(spicules.strands(torch.maximum(disc, fill), code, noise), clean)


@pytest.mark.parametrize("share", [0.05, 0.21, 0.6])
def test_the_calibrated_presence_draws_strands_on_the_asked_share(share: float) -> None:
    """`calibrate_presence` predicts how often the module itself draws a strand (its noise projections included):
    over donors with skewed coordinates and many noises, the share of nodules with at least one strand drawn
    (logit > 0, where σ passes the label's ½) is the one asked for."""
    torch.manual_seed(1)
    coordinates = np.random.default_rng(0).gamma(2.0, 0.7, size=64) - 1.4     # skewed like spicule areas
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD)
    bias = spicules.calibrate_presence(coordinates.tolist(), share)
    assert spicules.presence_bias.item() == bias
    code = torch.zeros(64 * 200, 16)
    code[:, INDEX] = torch.from_numpy(np.repeat(coordinates, 200)).float() * ANCHOR_SD
    _, logit, _ = spicules.strand_parameters(code, torch.randn(code.shape[0], 16))
    assert float((logit > 0).any(dim=1).float().mean()) == pytest.approx(share, abs=0.02)
    assert spicules.calibrate_presence(coordinates.tolist(), share / 2) < bias
    with pytest.raises(ValueError, match="at least one donor"):
        spicules.calibrate_presence([], share)


def test_contrast_strands_stand_out_from_the_lung_as_calibrated_and_never_darken_the_nodule() -> None:
    """With `spicule_contrast` the strands are painted after the edge blur at the background + the calibrated
    contrast, which `metrics.strand_contrast_hu` reads back; where the nodule is brighter it stays as it was; the
    label is the same as without it, the contrast is stored with the weights, and the presence learns from the
    image."""
    from RadiogenomicGANLib.intensity import unit_to_hu
    from training.metrics import strand_contrast_hu

    contrast_hu = 300.0
    painted, plain, sharp, disc, genes, noise = _blended_beside(4, spicule_contrast=True,
                                                                contrast=contrast_hu * 2 / 1500)
    rebuilt = build_generator(GeneratorConfig(**STRAND_GENERATOR, spicule_contrast=True))
    rebuilt.spicules.load_state_dict(painted.spicules.state_dict())    # the contrast travels with the weights
    assert float(rebuilt.spicules.contrast) == pytest.approx(0.4)
    assert torch.equal(plain.mask, sharp.mask)
    strand = painted.spicules.strands(disc, painted.encode_genes(genes), noise) > 0.5
    outside = strand & (disc == 0)
    assert outside.any()
    assert torch.allclose(sharp.image[outside], torch.tensor(-0.8 + 0.4), atol=1e-5)
    read = [strand_contrast_hu(unit_to_hu(i[0].detach().numpy()), m[0].detach().numpy() > 0.5)
            for i, m in zip(sharp.image, sharp.mask)]
    assert 0.7 * contrast_hu < np.nanmedian(read) < 1.05 * contrast_hu       # partial pixels beside the line
    (sharp.image * (disc == 0)).sum().backward()          # the partial pixels beside the line carry it
    assert painted.spicules.presence_bias.grad is not None and float(painted.spicules.presence_bias.grad) != 0


def test_painting_at_a_contrast_only_brightens() -> None:
    spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD, contrast=True)
    spicules.calibrate_contrast(0.4)
    background = torch.full((1, 1, 8, 8), -0.8)
    background[..., :, 6:] = 0.9                     # bright tissue: the target is held at the window's top
    image = background.clone()
    image[..., 2:5, 2:5] = 0.5                       # a nodule brighter than the lung + the contrast
    strand = torch.zeros_like(image)
    strand[..., 3, :] = 1.0                          # one strand across the nodule, the lung and the tissue
    out = spicules.paint_after_edge(image, background, strand)
    assert torch.equal(out[..., 3, 2:5], image[..., 3, 2:5])            # the nodule is not darkened
    assert torch.allclose(out[..., 3, :2], torch.tensor(-0.4))          # the lung is raised by the contrast
    assert torch.allclose(out[..., 3, 6:], torch.tensor(1.0))           # never past the window
    assert torch.equal(out[..., 4:, :2], image[..., 4:, :2])            # off the strand nothing changes
    with pytest.raises(ValueError, match="finite number > 0"):
        spicules.calibrate_contrast(float("nan"))
    with pytest.raises(RuntimeError, match="calibrate_contrast needs"):
        CodeDrivenSpicules(8, INDEX, noise_dim=16).calibrate_contrast(0.4)
    with pytest.raises(ValueError, match="choose one"):
        GeneratorConfig(spicules=4, spicule_solid=True, spicule_contrast=True)
    with pytest.raises(ValueError, match="spicule_contrast is a setting of the drawn spicules"):
        GeneratorConfig(spicule_contrast=True)


def test_capped_strands_merge_with_tissue_and_stay_as_painted_in_the_lung() -> None:
    """`spicule_cap`: a painted strand stands at most max(background, 0 HU) — over a vessel or the chest wall it
    merges with the tissue instead of standing the contrast over it — while in the lung it is painted as uncapped;
    the nodule is still never darkened. Without the contrast's painting there is nothing to cap: refused."""
    from RadiogenomicGANLib.intensity import unit_to_hu
    from RadiogenomicGANLib.networks import with_composition

    background = torch.full((1, 1, 8, 8), -0.75)     # lung, ≈ −810 HU
    background[..., :, 4:6] = 0.4                     # a vessel, +50 HU
    background[..., :, 6:] = -0.6                     # a fainter lung, ≈ −700 HU
    image = background.clone()
    image[..., 0:2, 0:2] = 0.5                        # a nodule brighter than anything painted
    strand = torch.zeros_like(image)
    strand[..., 1, :] = 1.0                           # one strand across the nodule, lung, tissue and lung
    lifted = unit_to_hu(background.numpy())[0, 0, 1]
    painted = {}
    for cap in (False, True):
        spicules = CodeDrivenSpicules(8, INDEX, noise_dim=16, anchor_sd=ANCHOR_SD, contrast=True, cap=cap)
        spicules.calibrate_contrast(414.0 * 2 / 1500)
        painted[cap] = unit_to_hu(spicules.paint_after_edge(image, background, strand).numpy())[0, 0, 1]
    assert np.allclose(painted[True][2:4], lifted[2:4] + 414, atol=0.1)          # lung: the full lift, as uncapped
    assert np.allclose(painted[True][6:], painted[False][6:]) and np.allclose(painted[True][:4], painted[False][:4])
    assert np.allclose(painted[True][4:6], lifted[4:6], atol=0.1)                 # tissue: merged, not +414 HU
    assert np.allclose(painted[False][4:6], lifted[4:6] + 414, atol=0.1)          # (uncapped it stood over it)
    assert np.allclose(painted[True][:2], 125.0, atol=0.1)                        # the nodule kept (0.5 = 125 HU)
    with pytest.raises(ValueError, match="set spicule_contrast=true too"):
        GeneratorConfig(spicules=4, spicule_cap=True)
    trained = build_generator(GeneratorConfig(**STRAND_GENERATOR, spicule_contrast=True)).eval()
    capped = with_composition(trained, spicule_cap=True)                          # a composition option
    assert capped.spicules.cap and not trained.spicules.cap
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in capped.state_dict().items())


def test_painting_at_a_contrast_can_be_switched_on_a_trained_generator() -> None:
    """`with_composition(spicule_contrast=True, strand_contrast=Δ)` on a generator trained drawing its strands:
    every learned tensor kept, the strands then painted as a generator built with the option and calibrated to Δ
    paints them; switched off again, the original output. Without Δ, or with Δ and nothing to switch, refused."""
    from RadiogenomicGANLib.networks import with_composition

    torch.manual_seed(5)
    trained = build_generator(GeneratorConfig(**STRAND_GENERATOR)).eval()
    painted = with_composition(trained, spicule_contrast=True, strand_contrast=0.4)
    built = build_generator(GeneratorConfig(**STRAND_GENERATOR, spicule_contrast=True)).eval()
    built.load_state_dict({**trained.state_dict(), "spicules.contrast": torch.tensor(0.4)})
    back = with_composition(painted, spicule_contrast=False)
    disc, genes, noise = _disc(2), torch.randn(2, 32), torch.randn(2, 16)
    for generator in (painted, built, trained, back):   # the same disc with strands on every nodule
        generator.mask_head = _FixedMask(disc)
        with torch.no_grad():
            generator.spicules.presence_bias.fill_(8.0)
    background = torch.full((2, 1, SIZE, SIZE), -0.8)
    with torch.no_grad():
        outputs = [g(background, genes, noise).image for g in (painted, built, trained, back)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[3])
    assert not torch.equal(outputs[0], outputs[2])                     # the strands are painted otherwise
    assert float(painted.spicules.contrast) == pytest.approx(0.4) and back.spicules.contrast is None
    for options in ({"spicule_contrast": True}, {"strand_contrast": 0.4}):
        with pytest.raises(ValueError, match="needs the training donors' real strand contrast"):
            with_composition(trained, **options)
