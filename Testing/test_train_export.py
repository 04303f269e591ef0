"""Exporting a generator from a checkpoint: EMA or raw weights, bit for bit; a wrong dataset is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from RadiogenomicGANLib.weights import load_weights
from training import checkpoint as ckpt
from training.dataset import make_synthetic_dataset
from training.export import main as export_main
from training.train import main as train_main

TINY = [
    "--generator", "base_channels=4", "--generator", "max_channels=16", "--generator", "code_dim=8",
    "--generator", "gene_hidden=16", "--generator", "noise_dim=4",
    "--discriminator", "base_channels=4", "--discriminator", "max_channels=16", "--discriminator", "gene_hidden=16",
    "--batch-size", "4", "--no-tensorboard", "--no-progress", "--sample-every", "0", "--checkpoint-every", "2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_synthetic_dataset(root / "syn.npz", patients=8, genes=64, size=32)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(["--data", str(data), "--model", "proposed", "--out", str(root / "run"), "--steps", "4", *TINY])
    finally:
        torch.set_num_threads(previous)
    return data, root / "run"


def _state(path: Path) -> dict[str, torch.Tensor]:
    generator, _ = load_weights(path)
    return generator.state_dict()


def test_ema_export_of_the_last_checkpoint_equals_the_runs_own_export(run, tmp_path: Path) -> None:
    data, out = run
    last = ckpt.latest_checkpoint(out / "checkpoints")
    assert export_main(["--checkpoint", str(last), "--data", str(data), "--out", str(tmp_path / "ema")]) == 0
    exported, trained = _state(tmp_path / "ema.safetensors"), _state(out / "proposed.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    _, metadata = load_weights(tmp_path / "ema.safetensors")
    assert metadata.provenance["step"] == 4 and metadata.provenance["generator"] == "ema"


def test_raw_export_is_the_raw_generator_of_an_earlier_step(run, tmp_path: Path) -> None:
    data, out = run
    first = ckpt.list_checkpoints(out / "checkpoints")[0]
    assert export_main(["--checkpoint", str(first), "--data", str(data), "--out", str(tmp_path / "raw"),
                        "--raw", "--provenance", "why=ablation", "--provenance", "phantom_seed=2026"]) == 0
    tensors, state = ckpt.load_checkpoint(first)
    exported = _state(tmp_path / "raw.safetensors")
    assert all(torch.equal(exported[k], tensors[f"model/G/{k}"]) for k in exported)
    _, metadata = load_weights(tmp_path / "raw.safetensors")
    assert metadata.provenance["generator"] == "raw" and metadata.provenance["why"] == "ablation"
    assert metadata.provenance["phantom_seed"] == 2026  # JSON values, as training.train reads them
    assert metadata.provenance["step"] == state["step"] == 2


def test_a_different_dataset_is_refused(run, tmp_path: Path, capsys) -> None:
    _, out = run
    other = make_synthetic_dataset(tmp_path / "other.npz", patients=8, genes=64, size=32, seed=5)
    last = ckpt.latest_checkpoint(out / "checkpoints")
    assert export_main(["--checkpoint", str(last), "--data", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "not the dataset this checkpoint was trained on" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def _three_val_donors(folder: Path) -> Path:
    """A synthetic dataset of 9 donors, 3 of them in the val split (the fewest that validation scores)."""
    import numpy as np

    from training.dataset import _validate, load_dataset, write_dataset

    arrays = load_dataset(make_synthetic_dataset(folder / "syn.npz", patients=9, genes=32, size=32)).arrays()
    arrays["split"] = np.array(["train"] * 5 + ["val"] * 3 + ["test"])
    return write_dataset(folder / "val3.npz", **_validate(arrays, "").arrays())


def _val_rows(run: Path) -> list[dict]:
    import json

    return [row for row in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val_score" in row]


def test_validation_at_checkpoints_selects_the_export_and_the_gene_front_end_travels(tmp_path: Path) -> None:
    """With ≥ 3 val donors every checkpoint is scored; the run exports the best one's EMA (recorded in the
    provenance), `export --checkpoint RUN` finds it, and a PCA gene front-end is refitted identically."""
    import numpy as np

    from training.config import TrainConfig
    from training.dataset import load_dataset, training_data
    from training.evaluate import VALIDATION_BACKGROUNDS, VALIDATION_SEED, validation_score

    data = _three_val_donors(tmp_path)
    run = tmp_path / "run"
    train_main(["--data", str(data), "--model", "proposed", "--out", str(run), "--steps", "4",
                "--gene-components", "3", "--seed", "5", *TINY])
    scores = _val_rows(run)
    assert [s["step"] for s in scores] == [2, 4] and all(s["val_donors"] == 3 for s in scores)
    # every checkpoint of every run on the same validation draw, not one of the training seed (5 here)
    assert all(s["val_seed"] == VALIDATION_SEED and s["val_backgrounds"] == VALIDATION_BACKGROUNDS for s in scores)
    best = ckpt.best_checkpoint(run / "checkpoints")
    assert best is not None
    _, best_state = ckpt.load_checkpoint(best)
    finite = [s for s in scores if s["val_score"] is not None]
    if finite:
        assert best_state["validation"]["score"] == pytest.approx(max(s["val_score"] for s in finite))
    generator, metadata = load_weights(run / "proposed.safetensors")
    # rescoring the export (the best checkpoint's EMA) on the training data with the defaults reproduces it
    trained_on = training_data(TrainConfig(data=str(data), out=str(run), gene_components=3, seed=5))
    again_score = validation_score(generator, trained_on)
    assert again_score["score"] == pytest.approx(best_state["validation"]["score"], abs=1e-6)
    assert metadata.provenance["selected_step"] == best_state["step"]
    assert metadata.genes.output_dim == 3 and metadata.config.num_genes == 3  # the PCA front-end
    assert metadata.genes.fitted_on["components"] == 3 and metadata.genes.fitted_on["training_patients"] == 5
    # the evaluation prepares the run's own cohort with the export's preprocessing: every patient, the five it
    # was fitted on included, gets the input training gave it (before round 31 those five got the gain too)
    evaluated = load_dataset(data).genes_for(metadata.genes)
    np.testing.assert_allclose(evaluated, trained_on.genes, rtol=1e-4, atol=1e-5)
    assert metadata.genes.in_fit(trained_on.genes).sum() == 5
    assert export_main(["--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "again")]) == 0
    again, again_meta = load_weights(tmp_path / "again.safetensors")
    np.testing.assert_allclose(again_meta.genes.components, metadata.genes.components, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), generator.state_dict().values()))


def test_validation_on_a_thread_gives_the_same_scores_choice_and_tensors(tmp_path: Path) -> None:
    """Checkpoints scored on a thread while training goes on (`--validation-thread on`) against in line
    (`off`): the same scores, the same best checkpoint, every checkpoint and the export equal tensor for
    tensor; the rotation keeps its newest 2, each holding its score; the global RNGs are never drawn from."""
    import random

    import numpy as np

    from training.config import TrainConfig
    from training.dataset import training_data
    from training.evaluate import validation_score

    data = _three_val_donors(tmp_path)
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = tmp_path / mode
        train_main(["--data", str(data), "--model", "proposed", "--out", str(runs[mode]), "--steps", "6",
                    "--seed", "5", "--keep-checkpoints", "2", "--validation-thread", mode, *TINY])
    inline, threaded = ({row["step"]: row for row in _val_rows(runs[mode])} for mode in ("off", "on"))
    assert sorted(threaded) == [2, 4, 6] and threaded == inline
    for mode in runs:
        kept = [ckpt.read_state(path) for path in ckpt.list_checkpoints(runs[mode] / "checkpoints")]
        assert [state["step"] for state in kept] == [4, 6]
        assert all({"step": state["step"], **{f"val_{k}": v for k, v in state["validation"].items()}}
                   == inline[state["step"]] for state in kept)
    for name in ("ckpt-00000004.safetensors", "ckpt-00000006.safetensors", "best.safetensors"):
        (a, a_state), (b, b_state) = (ckpt.load_checkpoint(runs[mode] / "checkpoints" / name) for mode in runs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert {k: v for k, v in a_state.items() if k != "train_config"} == \
            {k: v for k, v in b_state.items() if k != "train_config"}, name   # the config names its own folder
    exported = [_state(runs[mode] / "proposed.safetensors") for mode in runs]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    # what lets the thread run beside training: the read leaves every global generator where it was
    generator, _ = load_weights(runs["on"] / "proposed.safetensors")
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    validation_score(generator, training_data(TrainConfig(data=str(data), out=str(runs["on"]), seed=5)))
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_a_run_stopped_during_a_threaded_read_scores_that_checkpoint_when_resumed(tmp_path: Path) -> None:
    """A checkpoint written before its score came in (the run stopped during the read) is scored on resume:
    logged, added to the file, and a candidate for the export like every other."""
    data = _three_val_donors(tmp_path)
    run = tmp_path / "run"
    common = ["--data", str(data), "--model", "proposed", "--out", str(run), "--seed", "5",
              "--validation-thread", "on", *TINY]
    train_main([*common, "--steps", "2"])
    path = ckpt.latest_checkpoint(run / "checkpoints")
    tensors, state = ckpt.load_checkpoint(path)
    scored = state.pop("validation")
    ckpt.save_checkpoint(run / "checkpoints", 2, tensors, state)   # as the stop left it: no score yet
    (run / "checkpoints" / ckpt.BEST_NAME).unlink()
    train_main([*common, "--steps", "4", "--resume", "latest"])
    assert ckpt.read_state(path)["validation"] == scored
    rows = [row for row in _val_rows(run) if row["step"] == 2]
    assert len(rows) == 2 and rows[0] == rows[1]   # the first run's read, and the resumed run's of the same file
    assert ckpt.read_state(run / "checkpoints" / ckpt.BEST_NAME)["step"] in (2, 4)


@pytest.mark.parametrize("form", ["same", "stem", "data"])
def test_out_may_not_overwrite_an_input(run, tmp_path: Path, capsys, form: str) -> None:
    """`--out C` with C the checkpoint once overwrote it: refused with exit 2, the inputs unchanged."""
    import hashlib

    data, out = run
    last = ckpt.latest_checkpoint(out / "checkpoints")
    target = {"same": str(last), "stem": str(last.with_suffix("")), "data": str(data.with_suffix(".safetensors"))}[form]
    if form == "data":  # an OUT whose .safetensors is the dataset file itself (dataset named *.safetensors)
        data = Path(target)
        data.write_bytes(run[0].read_bytes())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (last, data)}
    assert export_main(["--checkpoint", str(last), "--data", str(data), "--out", target]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "input" in error and len(error.strip().splitlines()) == 1, error
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (last, data)} == before


EDGE = ["--generator", "edge_blur_per_sd=0.6", "--generator", "edge_inside_mask=true",
        "--loss-weight", "code_phenotype=1"]


def test_a_run_composes_its_export_over_the_background_and_export_follows_it(tmp_path: Path) -> None:
    """`--export-generator edge_over_background=true`: the run trains and checkpoints the change form, its
    export lays the nodule over the background with the same tensors (recorded in the provenance), and
    `export --checkpoint` exports the run's composition unless `--generator` changes it."""
    data = make_synthetic_dataset(tmp_path / "syn.npz", patients=8, genes=64, size=32)
    run = tmp_path / "run"
    train_main(["--data", str(data), "--model", "proposed", "--out", str(run), "--steps", "2", *TINY, *EDGE,
                "--export-generator", "edge_over_background=true"])
    last = ckpt.latest_checkpoint(run / "checkpoints")
    tensors, state = ckpt.load_checkpoint(last)
    assert state["generator_config"]["edge_over_background"] is False          # trained in the change form
    generator, metadata = load_weights(run / "proposed.safetensors")
    assert generator.config.edge_over_background and metadata.provenance["composed_at_export"] == {
        "edge_over_background": True}
    assert all(torch.equal(v, tensors[f"model/G_ema/{k}"]) for k, v in generator.state_dict().items())
    for extra, over in (([], True), (["--generator", "edge_over_background=false"], False)):
        out = tmp_path / f"again-{over}"
        assert export_main(["--checkpoint", str(last), "--data", str(data), "--out", str(out), *extra]) == 0
        again, _ = load_weights(out)
        assert again.config.edge_over_background is over
        assert all(torch.equal(v, tensors[f"model/G_ema/{k}"]) for k, v in again.state_dict().items())


def test_an_export_option_that_would_change_tensors_or_cannot_compose_is_refused_before_training(
        tmp_path: Path, capsys) -> None:
    data = make_synthetic_dataset(tmp_path / "syn.npz", patients=8, genes=64, size=32)
    for option, message in (("base_channels=8", "composition options only"),
                            ("edge_over_background=true", "needs the edge kept inside the mask")):
        with pytest.raises(SystemExit) as stop:
            train_main(["--data", str(data), "--model", "proposed", "--out", str(tmp_path / "run"), "--steps", "2",
                        *TINY, "--export-generator", option])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_are_written_again_with_a_composition_option_changed(tmp_path: Path, capsys) -> None:
    """`export --weights W --generator edge_over_background=true`: every tensor, the gene preprocessing and the
    provenance kept, the option changed, the source named by its SHA-256; the output lays the nodule over the
    background as a generator built with the option does. Anything else, or no change, is refused, W intact."""
    import hashlib
    import json

    from RadiogenomicGANLib.networks import build_generator

    data = make_synthetic_dataset(tmp_path / "syn.npz", patients=8, genes=64, size=32)
    train_main(["--data", str(data), "--model", "proposed", "--out", str(tmp_path / "run"), "--steps", "2", *TINY,
                *EDGE])
    source = tmp_path / "run" / "proposed.safetensors"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "over"
    assert export_main(["--weights", str(source), "--out", str(out), "--generator", "edge_over_background=true"]) == 0
    (before, _), (after, after_meta) = load_weights(source), load_weights(out)
    assert not before.config.edge_over_background and after.config.edge_over_background
    assert all(torch.equal(before.state_dict()[k], v) for k, v in after.state_dict().items())
    records = [json.loads(path.with_suffix(".json").read_text()) for path in (source, out.with_suffix(".json"))]
    for record in records:   # what may differ: the option, the record of the source, the .safetensors' hash
        record["architecture"].pop("edge_over_background")   # (its header holds the JSON's own hash)
        record["provenance"].pop("recomposed_from", None)
        record.pop("safetensors_sha256")
    assert records[0] == records[1]
    assert after_meta.provenance["recomposed_from"] == {"weights": str(source), "safetensors_sha256": digest,
                                                        "changed": {"edge_over_background": True}}
    again = tmp_path / "again"    # re-composed once more: the earlier record is kept inside the new one
    assert export_main(["--weights", str(out), "--out", str(again), "--generator", "edge_over_background=false"]) == 0
    assert load_weights(again)[1].provenance["recomposed_from"]["recomposed_from"] == \
        after_meta.provenance["recomposed_from"]
    built = build_generator(after.config).eval()
    built.load_state_dict(before.state_dict())
    genes = torch.randn(2, after.config.num_genes)
    background = torch.rand(2, 1, 32, 32) * 2 - 1
    noise = torch.randn(2, after.config.noise_dim)
    with torch.no_grad():
        composed, reference, change = (g(background, genes, noise).image for g in (after, built, before.eval()))
    assert torch.equal(composed, reference) and not torch.equal(composed, change)
    capsys.readouterr()
    for extra, message in (([], "give --generator"), (["--generator", "base_channels=8"], "cannot be changed"),
                           (["--generator", "edge_over_background=true", "--out", str(source)], "overwrite")):
        arguments = ["--weights", str(source), "--out", str(tmp_path / "x"), *extra]
        assert export_main(arguments) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest and not (tmp_path / "x.safetensors").exists()
