"""The generator's drawn lobes (`networks.CodeDrivenLobes`): an outline whose lobes are as high as the anchored
gene-code coordinate says in the real measure's units, moved by the noise, the background never moved; off, the
generator is as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from RadiogenomicGANLib.networks import CodeDrivenLobes, GeneratorConfig, build_generator
from training.metrics import lobe_amplitude

SIZE, INDEX, ANCHOR_SD, NOISE = 64, 4, 3.0, 16


def _nodule(batch: int, radius: float = 12.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(background, image, soft mask): a soft disc of +0.8 on a textured background."""
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    soft = torch.sigmoid(2.0 * (radius - torch.hypot(rows - 31.6, cols - 32.3)))[None, None].repeat(batch, 1, 1, 1)
    background = (-0.8 + 0.1 * torch.sin(rows / 3.0) * torch.cos(cols / 5.0))[None, None].repeat(batch, 1, 1, 1)
    return background, background + 0.8 * soft, soft


def _code(sds: list[float]) -> torch.Tensor:
    code = torch.zeros(len(sds), 16)
    code[:, INDEX] = torch.tensor(sds) * ANCHOR_SD
    return code


def _noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, NOISE, generator=torch.Generator().manual_seed(seed))


def test_the_lobes_are_as_high_as_the_coordinate_says_in_the_measures_units() -> None:
    """With the training donors' mean 0.06 and sd 0.03, coordinates at −2 / 0 / +1 / +2 sd ask for lobes of 0 / 0.06 /
    0.09 / 0.12 of the radius; `metrics.lobe_amplitude` reads them back within 0.02, in order; the area stays."""
    lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD)
    lobes.calibrate(0.06, 0.03)
    code = _code([-2.0, 0.0, 1.0, 2.0])
    assert torch.allclose(lobes.amplitude(code), torch.tensor([0.0, 0.06, 0.09, 0.12]))
    background, image, mask = _nodule(4)
    _, warped = lobes(image, mask, background, code, _noise(4))
    read = [lobe_amplitude(m) for m in (warped[:, 0] > 0.5).numpy()]
    assert read == sorted(read)
    assert read == pytest.approx([0.0, 0.06, 0.09, 0.12], abs=0.02)
    areas = (warped[:, 0] > 0.5).sum(dim=(1, 2)).float()
    assert torch.allclose(areas, (mask[:, 0] > 0.5).sum(dim=(1, 2)).float(), rtol=0.03)


def test_a_wider_spread_scales_the_heights_about_the_mean() -> None:
    """lobe_spread 2: the same coordinates ask for heights twice as far from the donors' mean (clamped at 0), which
    the measure reads back; the spread travels in the architecture, and a bad one is refused."""
    lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD, spread=2.0)
    lobes.calibrate(0.06, 0.03)
    code = _code([-2.0, 0.0, 1.0])
    assert torch.allclose(lobes.amplitude(code), torch.tensor([0.0, 0.06, 0.12]))
    background, image, mask = _nodule(3)
    _, warped = lobes(image, mask, background, code, _noise(3))
    read = [lobe_amplitude(m) for m in (warped[:, 0] > 0.5).numpy()]
    assert read == pytest.approx([0.0, 0.06, 0.12], abs=0.02)
    config = GeneratorConfig(num_genes=32, patch_size=32, base_channels=4, max_channels=8, noise_dim=NOISE,
                             lobes=True, lobe_spread=2.0)
    assert build_generator(GeneratorConfig.from_dict(config.to_dict())).lobes.spread == 2.0
    with pytest.raises(ValueError, match="lobe_spread must be a finite number > 0"):
        GeneratorConfig(lobes=True, lobe_spread=0.0)
    with pytest.raises(ValueError, match="lobe_spread is a setting of the drawn lobes"):
        GeneratorConfig(lobe_spread=2.0)


def _lobed_nodule(batch: int, height: float = 0.12, harmonic: int = 5) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(background, image, soft mask): a nodule whose own outline carries lobes r = 12·(1 + height·cos(kθ))."""
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    theta = torch.atan2(rows - 31.6, cols - 32.3)
    outline = 12.0 * (1.0 + height * torch.cos(harmonic * theta + 0.3))
    soft = torch.sigmoid(2.0 * (outline - torch.hypot(rows - 31.6, cols - 32.3)))[None, None].repeat(batch, 1, 1, 1)
    background = torch.full_like(soft, -0.8)
    return background, background + 0.8 * soft, soft


def test_replacing_the_outline_takes_the_generators_own_lobes_out() -> None:
    """With `replace_outline` a nodule drawn with its own lobes (the measure reads 0.078) comes out with the drawn
    lobes alone: none asked → the measure reads ≈ 0 (without: 0.078 stay); 0.09 asked → ≈ 0.09, as on a disc
    (without: the two add up); a disc, which has no lobes of its own, is drawn as without it. The setting travels
    in the architecture and is refused without drawn lobes."""
    def read(replace: bool, height: float, nodule: tuple) -> list[float]:
        lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD, replace_outline=replace)
        lobes.calibrate(height, 0.0)
        background, image, mask = nodule
        _, warped = lobes(image, mask, background, _code([0.0, 0.0]), _noise(2))
        return [lobe_amplitude(m) for m in (warped[:, 0] > 0.5).numpy()]

    lobed, disc = _lobed_nodule(2), _nodule(2)
    assert lobe_amplitude((lobed[2][0, 0] > 0.5).numpy()) == pytest.approx(0.078, abs=0.005)
    assert read(False, 0.0, lobed) == pytest.approx([0.078, 0.078], abs=0.005)
    assert max(read(True, 0.0, lobed)) < 0.01
    on_disc = read(False, 0.09, disc)
    assert read(True, 0.09, lobed) == pytest.approx(on_disc, abs=0.01)
    assert min(read(False, 0.09, lobed)) > max(on_disc) + 0.015
    assert read(True, 0.09, disc) == pytest.approx(on_disc, abs=0.005)
    config = GeneratorConfig(num_genes=32, patch_size=32, base_channels=4, max_channels=8, noise_dim=NOISE,
                             lobes=True, lobe_replace_outline=True)
    assert build_generator(GeneratorConfig.from_dict(config.to_dict())).lobes.replace_outline
    with pytest.raises(ValueError, match="lobe_replace_outline is a setting of the drawn lobes"):
        GeneratorConfig(lobe_replace_outline=True)


def test_only_the_nodule_moves_and_flat_lobes_change_nothing() -> None:
    """The warp moves the change, never the background: far from the nodule the image is the background; with a
    height of 0 image and mask come back as they were; an empty nodule grows none."""
    lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD)
    lobes.calibrate(0.2, 0.0)
    background, image, mask = _nodule(2)
    warped_image, warped_mask = lobes(image, mask, background, _code([0.0, 0.0]), _noise(2))
    far = (warped_mask < 1e-4) & (mask < 1e-4)
    assert torch.allclose(warped_image[far], background[far], atol=1e-4)
    assert not torch.allclose(warped_mask, mask, atol=0.1)
    lobes.calibrate(0.0, 0.0)
    same_image, same_mask = lobes(image, mask, background, _code([0.0, 0.0]), _noise(2))
    assert torch.allclose(same_image, image, atol=1e-5) and torch.allclose(same_mask, mask, atol=1e-5)
    lobes.calibrate(0.2, 0.0)
    empty = torch.zeros_like(mask)
    out_image, out_mask = lobes(background, empty, background, _code([0.0, 0.0]), _noise(2))
    assert torch.equal(out_mask, empty) and torch.allclose(out_image, background)


def test_noise_turns_the_lobes_and_the_same_noise_repeats_them() -> None:
    lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD)
    lobes.calibrate(0.12, 0.0)
    background, image, mask = _nodule(2)
    code = _code([0.0, 0.0])
    _, first = lobes(image, mask, background, code, _noise(2, seed=1))
    _, again = lobes(image, mask, background, code, _noise(2, seed=1))
    _, other = lobes(image, mask, background, code, _noise(2, seed=2))
    assert torch.equal(first, again)
    assert ((first > 0.5) != (other > 0.5)).sum() > 20


def test_gradient_reaches_the_code_and_the_nodule() -> None:
    lobes = CodeDrivenLobes(INDEX, NOISE, ANCHOR_SD)
    lobes.calibrate(0.06, 0.03)
    background, image, mask = _nodule(2)
    code = _code([0.0, 1.0]).requires_grad_(True)
    image.requires_grad_(True)
    warped_image, warped_mask = lobes(image, mask, background, code, _noise(2))
    (warped_mask.sum() + warped_image.sum()).backward()
    assert code.grad[:, INDEX].abs().min() > 0 and image.grad.abs().sum() > 0


def test_off_the_generator_is_unchanged_and_the_calibration_is_stored_with_the_weights() -> None:
    base = dict(num_genes=32, patch_size=32, base_channels=4, max_channels=8, noise_dim=NOISE, anchor_sd=ANCHOR_SD)
    torch.manual_seed(5)
    plain = build_generator(GeneratorConfig(**base))
    torch.manual_seed(5)
    lobed = build_generator(GeneratorConfig(**base, lobes=True))
    shared = plain.state_dict()
    assert set(lobed.state_dict()) - set(shared) == {"lobes.amplitude_mean", "lobes.amplitude_sd"}
    assert all(torch.equal(shared[k], lobed.state_dict()[k]) for k in shared)   # same initialisation
    lobed.lobes.calibrate(0.07, 0.02)
    rebuilt = build_generator(GeneratorConfig(**base, lobes=True))
    rebuilt.load_state_dict(lobed.state_dict())
    assert float(rebuilt.lobes.amplitude_mean) == pytest.approx(0.07)
    assert float(rebuilt.lobes.amplitude_sd) == pytest.approx(0.02)
    background, genes = torch.zeros(2, 1, 32, 32), torch.randn(2, 32)
    torch.manual_seed(1)
    drawn = lobed.eval()(background, genes)
    torch.manual_seed(1)
    again = lobed(background, genes, noise=torch.randn(2, NOISE))
    assert torch.equal(drawn.mask, again.mask) and torch.equal(drawn.image, again.image)


def test_config_and_calibration_checks() -> None:
    with pytest.raises(ValueError, match="lobe_code_index must lie in"):
        GeneratorConfig(code_dim=3, lobes=True)
    with pytest.raises(ValueError, match="lobes is a setting of the proposed generator"):
        GeneratorConfig(kind="mcgan", lobes=True)
    with pytest.raises(ValueError, match="lobe calibration needs"):
        CodeDrivenLobes(INDEX, NOISE).calibrate(float("nan"), 0.1)
    assert np.isfinite(CodeDrivenLobes(INDEX, NOISE).amplitude(_code([0.0])).item())
