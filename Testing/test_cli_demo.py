"""`make demo` (RadiogenomicGANLib.demo): clear failure without the bundled model, every output with one."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest
import torch
from test_insertion_support import make_metadata

from RadiogenomicGANLib import demo
from RadiogenomicGANLib.networks import GeneratorConfig, build_generator

torch.set_num_threads(1)


def test_missing_bundled_model_is_a_clear_failure(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(demo, "DEFAULT_WEIGHTS", tmp_path / "Resources" / "demo_model.safetensors")
    assert demo.main(["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "demo_model.safetensors is not there" in error and "--weights" in error
    assert not (tmp_path / "out").exists()
    # a model of one's own that is not there is named as such, not as the bundled one
    assert demo.main(["--out", str(tmp_path / "out"), "--weights", str(tmp_path / "mine")]) == 2
    error = capsys.readouterr().err
    assert f"--weights {tmp_path / 'mine'}: no such file" in error and "the bundled demo model" not in error
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A small untrained model over the complete genes of the 64-gene (test-sized) phantom biology."""
    from RadiogenomicGANLib.phantom.genomics import gene_model
    from RadiogenomicGANLib.weights import save_weights

    model = gene_model(64)
    names = [g for g, p in zip(model.gene_names, model.na_probability) if p == 0 and not g.startswith("_")]
    config = GeneratorConfig(num_genes=len(names), code_dim=8, noise_dim=4, base_channels=4, max_channels=16,
                             gene_hidden=8)
    torch.manual_seed(0)
    metadata = make_metadata(config, names)
    metadata.provenance = {"phantom_seed": 0, "phantom_genes": 64}
    return save_weights(tmp_path_factory.mktemp("demo_model") / "demo_model", build_generator(config).eval(),
                        metadata)


def test_demo_writes_every_output(tmp_path, tiny_weights) -> None:  # type: ignore[no-untyped-def]
    written = demo.run(tmp_path, weights=tiny_weights, cohort_size=12, size=128, device="cpu")
    for role in ("gene table", "phantom CT", "panel", "radiogenomic map"):
        assert written[role].exists() and written[role].stat().st_size > 0, role
    segmentations = sorted(tmp_path.glob("nodule_*.seg.nrrd"))
    volumes = [p for p in tmp_path.glob("nodule_*.nrrd") if not p.name.endswith((".seg.nrrd", "_weightmap.nrrd"))]
    assert len(segmentations) == 3 and len(volumes) == 3 and len(list(tmp_path.glob("*_weightmap.nrrd"))) == 3
    _, header = nrrd.read(str(segmentations[0]), index_order="C")
    assert header["Segment0_Name"] == "Synthetic nodule 1"
    ct, _ = nrrd.read(str(written["phantom CT"]), index_order="C")
    new, _ = nrrd.read(str(volumes[0]), index_order="C")
    assert ct.shape == new.shape and ct.dtype == new.dtype
    assert (tmp_path / "demo_panel.png").read_bytes()[:4] == b"\x89PNG"
    for path in segmentations:   # the untrained model may draw nothing; what it draws is one run of slices
        label, _ = nrrd.read(str(path), index_order="C")
        spanned = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
        assert spanned.tolist() == list(range(spanned[0], spanned[-1] + 1)) if spanned.size else True


def test_half_slices_option() -> None:
    import argparse

    assert demo._half_slices("auto") is None and demo._half_slices(" AUTO ") is None and demo._half_slices("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="an integer K or 'auto'"):
        demo._half_slices("three")


def test_random_model_mode_warns_loudly(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a smaller random network than the default one, for speed
    def small(gene_names, device):  # type: ignore[no-untyped-def]
        from RadiogenomicGANLib.insertion import NoduleInserter

        config = GeneratorConfig(num_genes=len(gene_names), code_dim=8, noise_dim=4, base_channels=4,
                                 max_channels=16, gene_hidden=8)
        return NoduleInserter(build_generator(config).eval(), make_metadata(config, gene_names), device)

    monkeypatch.setattr(demo, "random_inserter", small)
    demo.run(tmp_path, random_model=True, cohort_size=8, size=128, device="cpu")
    assert "UNTRAINED RANDOM MODEL" in capsys.readouterr().err
    assert (tmp_path / "demo_panel.png").exists() and (tmp_path / "radiogenomic_map.png").exists()
