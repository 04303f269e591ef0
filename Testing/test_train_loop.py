"""The training CLI end to end on a tiny synthetic dataset (CPU, seconds): every model trains with finite
losses that move and every parameter learns; a resumed run is bit-identical to an uninterrupted one; the
resolved configuration is saved; bad inputs stop with one clear message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from RadiogenomicGANLib.atomic import PARTIAL_GLOB
from RadiogenomicGANLib.networks import build_generator
from RadiogenomicGANLib.weights import load_weights
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig
from training.dataset import load_dataset, make_synthetic_dataset, write_dataset
from training.iteration import real_lobe_scale, real_strand_contrast, real_strand_share
from training.losses import CODE_PHENOTYPE_FEATURES, code_phenotype_features
from training.train import build_configs, main, training_loop

TINY = [
    "--generator", "base_channels=4", "--generator", "max_channels=16", "--generator", "code_dim=8",
    "--generator", "gene_hidden=16", "--generator", "noise_dim=4",
    "--discriminator", "base_channels=4", "--discriminator", "max_channels=16", "--discriminator", "gene_hidden=16",
    "--batch-size", "4", "--no-tensorboard", "--no-progress", "--log-every", "1", "--sample-every", "0",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two shared cores; one thread also makes CPU results reproducible run to run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 patients (6 train → 24 nodule slices, 6 steps per epoch at batch 4), 64 genes, 32×32 patches."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn.npz", patients=8, genes=64, size=32)


def run(data: Path, out: Path, model: str = "proposed", steps: int = 4, *extra: str) -> dict:
    return main(["--data", str(data), "--model", model, "--out", str(out), "--steps", str(steps), *TINY, *extra])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["proposed", "mcgan", "inpainting"])
def test_each_model_trains(data: Path, tmp_path: Path, model: str, capsys) -> None:
    out = tmp_path / model
    result = run(data, out, model, 4, "--sample-every", "2", "--provenance", "phantom_seed=2026",
                 "--provenance", "note=tiny test run")
    printed = capsys.readouterr().out
    assert "Generator" in printed and "Discriminator" in printed and "Total" in printed   # summary tables

    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    for row in log:
        assert all(np.isfinite(v) for v in row.values()), row
    for key in ("d_total", "g_total", "g_adv"):
        assert len({row[key] for row in log}) > 1, f"{key} never moved: {[row[key] for row in log]}"

    # Every parameter of G and D learned something: no dead branch, and DDP may run without
    # find_unused_parameters.
    cfg = TrainConfig.load(out / "config.json")
    g_cfg, _, _ = build_configs(cfg, 64, 32)
    torch.manual_seed(cfg.seed)
    initial_g = build_generator(g_cfg).state_dict()
    tensors, state = ckpt.load_checkpoint(result["checkpoint"])
    assert state["step"] == 4 and state["model"] == model
    frozen = [k for k, v in initial_g.items()
              if v.is_floating_point() and torch.equal(v, tensors[f"model/G/{k}"]) and "running" not in k]
    assert not frozen, f"generator tensors never updated: {frozen}"

    # The EMA generator is exported in the weights format, with the dataset's genes and provenance.
    generator, meta = load_weights(result["weights"], expected_kind=model, expected_num_genes=64)
    dataset = load_dataset(data)
    assert meta.gene_names == [str(n) for n in dataset.gene_names]
    np.testing.assert_allclose(meta.genes.means, dataset.gene_means)
    assert meta.patch_size == 32
    assert meta.provenance["steps"] == 4 and meta.provenance["seed"] == 0
    assert len(meta.provenance["dataset_sha256"]) == 64
    assert meta.provenance["command"].startswith("python -m training.train")
    assert meta.provenance["phantom_seed"] == 2026 and meta.provenance["note"] == "tiny test run"
    ema = {k: v for k, v in tensors.items() if k.startswith("model/G_ema/")}
    for key, value in generator.state_dict().items():
        assert torch.equal(value, ema[f"model/G_ema/{key}"]), key
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]


@pytest.mark.parametrize("extra", [(), ("--loss-weight", "mode_seeking=1", "--loss-weight", "mode_seeking_every=3",
                                         "--loss-weight", "d_augment=0.5",
                                         "--generator", "pixel_noise=true", "--loss-weight", "background_leak=1"),
                                   ("--loss-weight", "mode_seeking=2", "--loss-weight", "mode_seeking_detached=true",
                                    "--loss-weight", "mode_seeking_every=3"),
                                   ("--loss-weight", "mode_seeking=1", "--loss-weight", "mode_seeking_paired=true",
                                    "--loss-weight", "mode_seeking_every=3", "--loss-weight", "d_augment=0.5")])
def test_resume_is_bit_identical(data: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Stopped mid-epoch (step 3 of 6 per epoch) and resumed past the epoch boundary to step 8; also with the
    mode-seeking term, whose second draw takes its noise from the batch (lazy: on every third step, the first
    resumed one among them), DiffAugment, whose draws do too, and the per-pixel noise maps, keyed per item as
    well; with the detached second draw, whose batch-norm swap must leave no trace in the saved state; and with
    the paired one, which re-uses half of the batch (a step that draws it must not disturb the next)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(data, whole, "proposed", 8, *extra)
    run(data, split, "proposed", 3, *extra)
    resumed = main(["--out", str(split), "--resume", "--steps", "8", "--no-progress"])   # options from config.json
    a, state_a = ckpt.load_checkpoint(ckpt.latest_checkpoint(whole / "checkpoints"))
    b, state_b = ckpt.load_checkpoint(resumed["checkpoint"])
    assert state_a["step"] == state_b["step"] == 8
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    assert state_a["optimizers"] == state_b["optimizers"] and state_a["rng"] == state_b["rng"]
    assert [r["g_total"] for r in read_log(whole)] == [r["g_total"] for r in read_log(split)]
    lazy_steps = [r["step"] for r in read_log(whole) if "g_mode_seeking" in r]   # logged after 0-based 0, 3, 6
    assert lazy_steps == ([1, 4, 7] if extra else [])
    assert [r.get("g_mode_seeking") for r in read_log(whole)] == [r.get("g_mode_seeking") for r in read_log(split)]
    assert any(k.endswith("noise_strength") for k in a) == ("pixel_noise=true" in extra)


def test_resolved_config_is_saved_and_reused(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "base.json"
    TrainConfig(lr_d=1e-4, loss_weights={"background_l1": 50.0}, seed=3).save(config)
    out = tmp_path / "run"
    run(data, out, "mcgan", 2, "--config", str(config), "--loss-weight", "d_isg=2", "--keep-checkpoints", "1")
    saved = TrainConfig.load(out / "config.json")
    assert saved.model == "mcgan" and saved.steps == 2 and saved.seed == 3 and saved.lr_d == 1e-4
    assert saved.loss_weights == {"background_l1": 50.0, "d_isg": 2}
    assert saved.generator["base_channels"] == 4 and saved.batch_size == 4


def test_checkpoints_are_periodic_and_pruned(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(data, out, "proposed", 5, "--checkpoint-every", "2", "--keep-checkpoints", "2")
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-00000004.safetensors", "ckpt-00000005.safetensors"]
    assert not list((out / "checkpoints").glob(PARTIAL_GLOB))


# -- bad inputs: one clear message each ---------------------------------------------------------------


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def test_missing_dataset(tmp_path: Path, capsys) -> None:
    message = fails(["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert "dataset file not found" in message and "nope.npz" in message


def test_dataset_without_split(data: Path, tmp_path: Path, capsys) -> None:
    with np.load(data) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "split"}
    broken = tmp_path / "nosplit.npz"
    np.savez(broken, **arrays)
    message = fails(["--data", str(broken), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert "split" in message


def test_batch_larger_than_training_set(data: Path, tmp_path: Path, capsys) -> None:
    message = fails(["--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--batch-size", "32"], capsys)
    assert "larger than the 24 training samples" in message


def test_unknown_model(data: Path, tmp_path: Path, capsys) -> None:
    message = fails(["--data", str(data), "--out", str(tmp_path / "r"), "--model", "stylegan"], capsys)
    assert "invalid choice: 'stylegan'" in message
    with pytest.raises(ConfigError, match="unknown model 'stylegan'"):
        TrainConfig(data="x", out="y", model="stylegan").validate()


def test_texture_matched_backgrounds_train_and_need_the_wall_match(data: Path, tmp_path: Path, capsys) -> None:
    """--match-texture refines --match-backgrounds: refused alone; with it, a run trains and records both."""
    message = fails(["--data", str(data), "--out", str(tmp_path / "alone"), *TINY, "--match-texture"], capsys)
    assert "give --match-backgrounds with --match-texture" in message
    out = tmp_path / "matched"
    main(["--data", str(data), "--out", str(out), "--steps", "2", *TINY, "--match-backgrounds", "--match-texture",
          "--no-validation"])
    saved = TrainConfig.load(out / "config.json")
    assert saved.match_backgrounds and saved.match_texture and (out / "proposed.safetensors").exists()


@pytest.fixture(scope="module")
def proposed_run(data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proposed_run")
    torch.set_num_threads(1)
    run(data, out, "proposed", 2)
    return out


def test_resume_from_another_model(data: Path, proposed_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = ckpt.latest_checkpoint(proposed_run / "checkpoints")
    argv = ["--data", str(data), "--out", str(tmp_path / "r"), "--model", "mcgan", *TINY, "--resume", str(checkpoint)]
    message = fails(argv, capsys)
    assert "checkpoint of model 'proposed'" in message and "'mcgan'" in message


def test_resume_with_another_gene_count(proposed_run: Path, tmp_path: Path, capsys) -> None:
    other = make_synthetic_dataset(tmp_path / "g32.npz", patients=8, genes=32, size=32)
    checkpoint = ckpt.latest_checkpoint(proposed_run / "checkpoints")
    message = fails(["--data", str(other), "--out", str(tmp_path / "r"), *TINY, "--resume", str(checkpoint)], capsys)
    assert "trained with 64 genes" in message and "has 32" in message


def test_fresh_run_into_a_used_folder(data: Path, proposed_run: Path, capsys) -> None:
    message = fails(["--data", str(data), "--out", str(proposed_run), *TINY], capsys)
    assert "already holds checkpoints" in message and "--resume" in message


def test_resume_without_checkpoint(data: Path, tmp_path: Path, capsys) -> None:
    message = fails(["--data", str(data), "--out", str(tmp_path / "empty"), *TINY, "--resume"], capsys)
    assert "no checkpoint" in message


def test_bad_override_key(data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "r"), generator={"bottleneck": 8}, progress=False)
    with pytest.raises(ConfigError, match="bottleneck"):
        training_loop(cfg)


def test_code_driven_edge_needs_the_anchor_and_trains_with_it(data: Path, tmp_path: Path) -> None:
    """The edge width reads the anchored margin coordinate: refused without the anchor or on another
    coordinate, and so is an anchor sd without the anchor; with it, a run learns σ₀ and exports a generator
    that rebuilds the edge in the anchor's units."""
    edge = {"edge_blur_per_sd": 0.6}
    with pytest.raises(ConfigError, match="add --loss-weight code_phenotype=1"):
        build_configs(TrainConfig(data="x", out="y", generator=edge), 64, 32)
    with pytest.raises(ConfigError, match="anchor_sd=3 sets the sd of the code-phenotype anchor"):
        build_configs(TrainConfig(data="x", out="y", generator={"anchor_sd": 3.0}), 64, 32)
    with pytest.raises(ConfigError, match=r"edge_code_index=0 is not the anchored margin coordinate; use .*=2"):
        build_configs(TrainConfig(data="x", out="y", generator={**edge, "edge_code_index": 0},
                                  loss_weights={"code_phenotype": 1.0}), 64, 32)
    torch.set_num_threads(1)
    result = run(data, tmp_path / "edge", "proposed", 2, "--generator", "edge_blur_per_sd=0.6",
                 "--generator", "anchor_sd=3", "--loss-weight", "code_phenotype=1")
    tensors, _ = ckpt.load_checkpoint(result["checkpoint"])
    assert float(tensors["model/G/edge.log_sigma0"]) != 0.0
    generator, _ = load_weights(result["weights"], expected_kind="proposed", expected_num_genes=64)
    assert generator.config.edge_blur_per_sd == 0.6 and generator.edge is not None
    assert generator.config.anchor_sd == 3.0 and generator.edge.per_unit == pytest.approx(0.2)


def test_mode_seeking_needs_noise() -> None:
    for kind, generator in (("inpainting", {}), ("proposed", {"noise_dim": 0})):
        with pytest.raises(ConfigError, match=r"takes no noise .* drop mode_seeking"):
            build_configs(TrainConfig(data="x", out="y", model=kind, generator=generator,
                                      loss_weights={"mode_seeking": 1.0}), 64, 32)


def test_tensorboard_and_progress_bar(data: Path, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(["--data", str(data), "--out", str(out), "--steps", "2", *TINY, "--tensorboard", "--progress"])
    assert "train proposed" in capsys.readouterr().err                      # the tqdm bar
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"loss/d_total", "loss/g_total", "loss/g_l1", "timing/sec_per_step"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["samples/real|input|synthetic|mask|weight"]


def test_non_finite_loss_stops_with_a_clear_error(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import training.training_loop as train_module  # where the loop looks train_iteration up

    real = train_module.train_iteration

    def diverging(*args, **kwargs):
        logs = real(*args, **kwargs)
        return {**logs, "g_total": float("nan")}

    monkeypatch.setattr(train_module, "train_iteration", diverging)
    out = tmp_path / "run"
    message = fails(["--data", str(data), "--out", str(out), "--steps", "3", *TINY], capsys)
    assert "non-finite loss at step 1" in message
    assert not (out / "proposed.safetensors").exists()


def test_drawn_lobes_need_the_anchor_and_train_with_the_donors_units(data: Path, tmp_path: Path) -> None:
    """The lobes read the anchored lobe coordinate (after the spicule one when both are drawn): refused without the
    anchor or on another coordinate; with it the anchor holds the real lobe amplitude last, and the exported
    generator turns its coordinate back with the training donors' mean and sd of that measure."""
    with pytest.raises(ConfigError, match="lobes needs the code-phenotype anchor"):
        build_configs(TrainConfig(data="x", out="y", generator={"lobes": True, "lobe_code_index": 3}), 64, 32)
    with pytest.raises(ConfigError, match=r"lobe_code_index=4 is not the anchored lobe coordinate; use .*=3"):
        build_configs(TrainConfig(data="x", out="y", generator={"lobes": True},
                                  loss_weights={"code_phenotype": 1.0}), 64, 32)
    assert code_phenotype_features(6, True) == (*CODE_PHENOTYPE_FEATURES, "spicule_area_mm2", "lobe_amplitude")
    assert code_phenotype_features(0, True) == (*CODE_PHENOTYPE_FEATURES, "lobe_amplitude")
    torch.set_num_threads(1)
    result = run(data, tmp_path / "lobes", "proposed", 2, "--generator", "spicules=6", "--generator", "lobes=true",
                 "--loss-weight", "code_phenotype=1")
    generator, _ = load_weights(result["weights"], expected_kind="proposed", expected_num_genes=64)
    assert generator.config.lobes and generator.config.lobe_code_index == 4
    mean, sd = real_lobe_scale(load_dataset(data))
    assert np.isfinite(mean) and sd > 0
    assert float(generator.lobes.amplitude_mean) == pytest.approx(mean)
    assert float(generator.lobes.amplitude_sd) == pytest.approx(sd)


def test_strands_painted_at_a_contrast_train_with_the_donors_real_contrast(data: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """With spicule_contrast the exported generator paints its strands at the training donors' real strands'
    median lift over the lung (`metrics.strand_lift_hu`), in the unit range of the data's window; without a real
    strand to read, the run is refused with one message."""
    flags = ("--generator", "spicules=6", "--generator", "spicule_contrast=true", "--loss-weight", "code_phenotype=1")
    message = fails(["--data", str(data), "--out", str(tmp_path / "none"), "--steps", "2", *TINY, *flags], capsys)
    assert "no training donor's real slice carries a long strand" in message
    stranded = _stranded(data, tmp_path / "stranded.npz")
    torch.set_num_threads(1)
    result = run(stranded, tmp_path / "contrast", "proposed", 2, *flags)
    generator, _ = load_weights(result["weights"], expected_kind="proposed", expected_num_genes=64)
    assert generator.config.spicule_contrast
    expected = real_strand_contrast(load_dataset(stranded))
    assert 150 < expected * 750 < 210
    assert float(generator.spicules.contrast) == pytest.approx(expected)


def _stranded(data: Path, out: Path) -> Path:
    """`data` with a 7-px strand 200 HU over the lung added to every real nodule slice (a long strand to read)."""
    arrays = dict(np.load(data))
    for image, mask in zip(arrays["nodule_images"], arrays["nodule_masks"]):
        rows, cols = np.nonzero(mask > 0)
        row, start = int(np.median(rows)), int(cols.max()) + 1
        mask[row, start:start + 7] = 1
        image[row, start:start + 7] = image[row - 2, start:start + 7] + 200 * 2 / 1500
    return write_dataset(out, **arrays)


def test_strands_painted_at_a_contrast_on_the_export_only(data: Path, tmp_path: Path, capsys) -> None:
    """`--export-generator spicule_contrast=true`: trained as drawn, exported painting its strands at the training
    donors' real contrast (every learned tensor the checkpoint's); refused before training without a real strand
    to read; `export --weights` does the same given the training dataset, and asks for it otherwise."""
    from training import checkpoint as ckpt
    from training.export import main as export_main

    flags = ("--generator", "spicules=6", "--loss-weight", "code_phenotype=1",
             "--export-generator", "spicule_contrast=true")
    message = fails(["--data", str(data), "--out", str(tmp_path / "none"), "--steps", "2", *TINY, *flags], capsys)
    assert "no training donor's real slice carries a long strand" in message
    assert not (tmp_path / "none" / "checkpoints").exists()
    stranded = _stranded(data, tmp_path / "stranded.npz")
    torch.set_num_threads(1)
    result = run(stranded, tmp_path / "contrast", "proposed", 2, *flags)
    tensors, state = ckpt.load_checkpoint(result["checkpoint"])
    assert not state["generator_config"]["spicule_contrast"]
    generator, metadata = load_weights(result["weights"], expected_kind="proposed", expected_num_genes=64)
    expected = real_strand_contrast(load_dataset(stranded))
    assert generator.config.spicule_contrast and float(generator.spicules.contrast) == pytest.approx(expected)
    assert metadata.provenance["composed_at_export"] == {"spicule_contrast": True}
    learned = {k: v for k, v in generator.state_dict().items() if k != "spicules.contrast"}
    assert all(torch.equal(v, tensors[f"model/G_ema/{k}"]) for k, v in learned.items())
    # the same from an exported model drawn as trained: needs the dataset the strands are read on
    plain = tmp_path / "plain"
    assert export_main(["--weights", result["weights"], "--out", str(plain), "--generator",
                        "spicule_contrast=false"]) == 0
    capsys.readouterr()
    again = ["--weights", str(plain), "--out", str(tmp_path / "again"), "--generator", "spicule_contrast=true"]
    assert export_main(again) == 2 and "give --data" in capsys.readouterr().err
    assert export_main([*again, "--data", str(stranded)]) == 0
    repainted, _ = load_weights(tmp_path / "again")
    assert float(repainted.spicules.contrast) == pytest.approx(expected)
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in repainted.state_dict().items())


def test_drawn_spicules_need_the_anchor_and_train_with_it(data: Path, tmp_path: Path) -> None:
    """The strands read the anchored spicule coordinate: refused without the anchor or on another coordinate;
    with it, the anchor holds four features (the fourth the real spicule area) and a run learns the strands'
    presence and length and exports a generator that rebuilds them."""
    spicules = {"spicules": 6}
    with pytest.raises(ConfigError, match="spicules needs the code-phenotype anchor"):
        build_configs(TrainConfig(data="x", out="y", generator=spicules), 64, 32)
    with pytest.raises(ConfigError, match=r"spicule_code_index=2 is not the anchored spicule coordinate; use .*=3"):
        build_configs(TrainConfig(data="x", out="y", generator={**spicules, "spicule_code_index": 2},
                                  loss_weights={"code_phenotype": 1.0}), 64, 32)
    assert code_phenotype_features(6) == (*CODE_PHENOTYPE_FEATURES, "spicule_area_mm2")
    torch.set_num_threads(1)
    result = run(data, tmp_path / "spicules", "proposed", 2, "--generator", "spicules=6",
                 "--loss-weight", "code_phenotype=1")
    tensors, _ = ckpt.load_checkpoint(result["checkpoint"])
    assert float(tensors["model/G/spicules.log_length0"]) != pytest.approx(math.log(5.0))
    generator, _ = load_weights(result["weights"], expected_kind="proposed", expected_num_genes=64)
    assert generator.config.spicules == 6 and generator.spicules is not None
    # the presence started where the training donors' real strand share puts it, and was learned from there
    learned = float(tensors["model/G/spicules.presence_bias"])
    calibrated = generator.spicules.calibrate_presence(*real_strand_share(load_dataset(data)))
    assert learned != calibrated and learned == pytest.approx(calibrated, abs=0.01)
