"""Weights files: save → load is bit-identical, and every way a file can be wrong is refused clearly."""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import RadiogenomicGANLib.weights as weights_module
from RadiogenomicGANLib.atomic import PARTIAL_GLOB
from RadiogenomicGANLib.genes import GenePreprocessing
from RadiogenomicGANLib.networks import KINDS, GeneratorConfig, build_generator, hole_from_mask
from RadiogenomicGANLib.weights import (
    FORMAT_VERSION,
    WeightsError,
    WeightsMetadata,
    load_weights,
    save_weights,
    weights_paths,
)

GENES = 12


def small_config(kind: str = "proposed", **changes: float | bool) -> GeneratorConfig:
    params = {"kind": kind, "num_genes": GENES, "code_dim": 8, "noise_dim": 4, "base_channels": 4,
              "max_channels": 16, "gene_hidden": 16, **changes}
    return GeneratorConfig(**params)


def metadata_for(config: GeneratorConfig) -> WeightsMetadata:
    rng = np.random.default_rng(0)
    genes = GenePreprocessing([f"GENE{i}" for i in range(config.num_genes)],
                              rng.normal(size=config.num_genes).astype(np.float32),
                              rng.uniform(0.5, 2, size=config.num_genes).astype(np.float32), clip=4.5,
                              fitted_on={"kept": config.num_genes})
    return WeightsMetadata(config=config, genes=genes, patch_size=config.patch_size, patch_spacing_mm=0.9375,
                           provenance={"dataset": "phantom", "epochs": 3, "ema": 0.999})


def trained_like(config: GeneratorConfig) -> torch.nn.Module:
    """A generator whose batch-norm running stats are no longer the defaults (they must round-trip too)."""
    torch.manual_seed(0)
    generator = build_generator(config).train()
    s = config.patch_size
    with torch.no_grad():
        generator(torch.rand(3, 1, s, s) * 2 - 1, torch.randn(3, config.num_genes),
                  hole=hole_from_mask(torch.zeros(3, 1, s, s)))
    return generator.eval()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    config = small_config()
    return save_weights(tmp_path / "model", trained_like(config), metadata_for(config))


def rewrite_json(saved: Path, **changes: object) -> None:
    json_path = saved.with_suffix(".json")
    record = json.loads(json_path.read_text())
    record.update(changes)
    json_path.write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize(("kind", "changes"), [(kind, {}) for kind in KINDS]
                         + [("proposed", {"edge_blur_per_sd": 0.6, "edge_inside_mask": True}),
                            ("proposed", {"edge_blur_per_sd": 0.6, "edge_inside_mask": True,
                                          "edge_over_background": True})])
def test_save_then_load_gives_bit_identical_outputs(tmp_path: Path, kind: str, changes: dict) -> None:
    config = small_config(kind, **changes)
    generator = trained_like(config)
    if generator.config.edge_blur_per_sd:      # a learned edge width that is not the initial one
        with torch.no_grad():
            generator.edge.log_sigma0.fill_(0.4)
    metadata = metadata_for(config)
    path = save_weights(tmp_path / "sub" / f"{kind}.safetensors", generator, metadata)
    assert path == tmp_path / "sub" / f"{kind}.safetensors" and path.with_suffix(".json").is_file()
    assert not list(path.parent.glob(PARTIAL_GLOB)), "no temporary files left"

    loaded, meta = load_weights(tmp_path / "sub" / kind, expected_kind=kind, expected_num_genes=GENES)
    assert not loaded.training and loaded.config == config and meta.kind == kind
    assert meta.gene_names == metadata.gene_names and meta.provenance == metadata.provenance
    np.testing.assert_array_equal(meta.genes.means, metadata.genes.means)
    np.testing.assert_array_equal(meta.genes.stds, metadata.genes.stds)
    assert meta.genes.clip == 4.5 and meta.genes.components is None and meta.genes.fitted_on == {"kept": GENES}
    assert meta.hu_window == (-1000.0, 500.0) and meta.patch_size == 64 and meta.patch_spacing_mm == 0.9375
    assert meta.format_version == FORMAT_VERSION

    torch.manual_seed(1)
    x = (torch.rand(2, 1, 64, 64) * 2 - 1, torch.randn(2, GENES), torch.randn(2, config.noise_dim))
    hole = hole_from_mask(torch.zeros(2, 1, 64, 64))
    with torch.no_grad():
        before, after = generator(*x, hole=hole), loaded(*x, hole=hole)
    assert torch.equal(before.image, after.image) and torch.equal(before.mask, after.mask)
    for a, b in zip(before.weight_maps, after.weight_maps):
        assert torch.equal(a, b)
    # any of the three spellings names the same pair of files
    assert weights_paths(path) == weights_paths(path.with_suffix(".json")) == weights_paths(path.with_suffix(""))


def test_json_sidecar_is_readable_and_complete(saved: Path) -> None:
    record = json.loads(saved.with_suffix(".json").read_text())
    assert record["format_version"] == FORMAT_VERSION and record["kind"] == "proposed"
    assert GeneratorConfig.from_dict(record["architecture"]) == small_config()
    assert record["hu_window"] == [-1000.0, 500.0] and len(record["gene_names"]) == GENES
    assert len(record["safetensors_sha256"]) == 64


def test_save_refuses_inconsistent_metadata(tmp_path: Path) -> None:
    config = small_config()
    generator = build_generator(config)
    two_genes = GenePreprocessing(["A", "B"], np.zeros(2), np.ones(2))
    with pytest.raises(WeightsError, match="gives 2 inputs to a generator that takes"):
        save_weights(tmp_path / "m", generator, WeightsMetadata(**{**vars(metadata_for(config)), "genes": two_genes}))
    unusable = GenePreprocessing(["A"] * GENES, np.zeros(GENES), np.zeros(GENES))
    with pytest.raises(WeightsError, match=r"not unique.*must be > 0"):
        save_weights(tmp_path / "m", generator, WeightsMetadata(**{**vars(metadata_for(config)), "genes": unusable}))
    with pytest.raises(WeightsError, match=r"differs from metadata\.config"):
        save_weights(tmp_path / "m", generator, metadata_for(small_config(num_genes=GENES + 1)))
    with pytest.raises(WeightsError, match="JSON-serialisable"):
        save_weights(tmp_path / "m", generator, WeightsMetadata(**{**vars(metadata_for(config)),
                                                                     "provenance": {"x": object()}}))
    assert not list(tmp_path.iterdir()), "a refused save writes nothing"


# ----------------------------------------------------------------------------------------------------
# Refusals


def test_missing_files(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(WeightsError, match="no weights file"):
        load_weights(tmp_path / "absent")
    saved.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match=r"model\.json is missing"):
        load_weights(saved)
    json_only = tmp_path / "other.json"
    json_only.write_text("{}")
    with pytest.raises(WeightsError, match=r"sidecar other\.json is there"):
        load_weights(json_only)


def test_pickle_and_zip_checkpoints_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))          # unpickling would create the marker file

    blob = pickle.dumps(Payload(), protocol=4)
    for name in ("model.pt", "model.ckpt", "model.safetensors"):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(WeightsError, match=r"pickle.*refused"):
            load_weights(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "model.pth", "w") as archive:     # torch.save's format
        archive.writestr("archive/data.pkl", blob)
    with pytest.raises(WeightsError, match=r"zip archive.*refused"):
        load_weights(tmp_path / "model.pth")
    assert not marker.exists()


def test_no_module_of_ours_can_unpickle() -> None:
    """weights.py (and networks.py) neither import pickle nor call torch.load."""
    for module_file in (Path(weights_module.__file__), Path(weights_module.__file__).with_name("networks.py")):
        tree = ast.parse(module_file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in {"pickle", "dill", "joblib"} for n in names), module_file
            if isinstance(node, ast.Attribute) and node.attr == "load":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), module_file


def test_not_safetensors_at_all(tmp_path: Path, saved: Path) -> None:
    saved.write_bytes(b"hello, not weights")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(saved)


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(saved)


def test_flipped_byte_inside_tensor_data(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0x01                               # inside the last tensor's data, header intact
    saved.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt: its SHA-256 differs"):
        load_weights(saved)


def test_bad_json(saved: Path) -> None:
    json_path = saved.with_suffix(".json")
    json_path.write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(saved)
    json_path.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="JSON object"):
        load_weights(saved)
    json_path.write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "proposed"}))
    with pytest.raises(WeightsError, match="lacks the keys"):
        load_weights(saved)


def test_format_1_weights_are_refused_with_what_to_do(saved: Path) -> None:
    rewrite_json(saved, format_version=1)
    with pytest.raises(WeightsError, match=r"format-1 weights.*plain z-scores.*training\.export"):
        load_weights(saved)


def test_projected_preprocessing_round_trips(tmp_path: Path) -> None:
    config = small_config(num_genes=3)
    rng = np.random.default_rng(2)
    genes = GenePreprocessing.fit(5.0 + rng.normal(size=(20, 12)), [f"G{i}" for i in range(12)], components=3)
    generator = build_generator(config)
    path = save_weights(tmp_path / "pca", generator, WeightsMetadata(config=config, genes=genes, patch_size=64,
                                                                    patch_spacing_mm=0.9375))
    _, meta = load_weights(path)
    np.testing.assert_allclose(meta.genes.components, genes.components, rtol=1e-6)
    assert meta.genes.output_dim == 3 and meta.gene_names == genes.gene_names
    assert meta.genes.out_of_sample_gain == genes.out_of_sample_gain


def test_the_out_of_sample_gain_round_trips_and_older_files_load_without_it(tmp_path: Path) -> None:
    config = small_config(num_genes=3)
    genes = GenePreprocessing([f"G{i}" for i in range(4)], np.zeros(4), np.ones(4), components=np.eye(3, 4),
                              out_of_sample_gain=2.5)
    metadata = WeightsMetadata(config=config, genes=genes, patch_size=64, patch_spacing_mm=0.9375)
    path = save_weights(tmp_path / "gain", build_generator(config), metadata)
    assert load_weights(path)[1].genes.out_of_sample_gain == 2.5
    profile = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(load_weights(path)[1].genes.transform_log(profile), [[2.5, 5.0, 7.5]])
    rewrite_json(path, gene_out_of_sample_gain=1.0)     # an edited gain changes every new patient's input
    with pytest.raises(WeightsError, match="changed after export"):
        load_weights(path)
    record = json.loads(path.with_suffix(".json").read_text())
    del record["gene_out_of_sample_gain"]
    path.with_suffix(".json").write_text(json.dumps(record))
    drop_json_checksum(path)                             # as written before the gain existed
    assert load_weights(path)[1].genes.out_of_sample_gain == 1.0


def test_the_fitted_patients_scores_round_trip_so_a_training_profile_is_prepared_without_the_gain(
        tmp_path: Path) -> None:
    config = small_config(num_genes=3)
    fitted = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], dtype=np.float32)
    genes = GenePreprocessing([f"G{i}" for i in range(4)], np.zeros(4), np.ones(4), components=np.eye(3, 4),
                              out_of_sample_gain=2.5, fitted_scores=fitted)
    path = save_weights(tmp_path / "fitted", build_generator(config),
                        WeightsMetadata(config=config, genes=genes, patch_size=64, patch_spacing_mm=0.9375))
    loaded = load_weights(path)[1].genes
    np.testing.assert_array_equal(loaded.fitted_scores, fitted)
    profiles = np.array([[1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 3.1, 9.0]])   # a fitted patient, and one beside it
    np.testing.assert_allclose(loaded.transform_log(profiles), [[1.0, 2.0, 3.0], [2.5, 5.0, 7.75]])


def test_unknown_format_version(saved: Path) -> None:
    rewrite_json(saved, format_version=FORMAT_VERSION + 1)
    with pytest.raises(WeightsError, match=f"reads version {FORMAT_VERSION} only"):
        load_weights(saved)


def test_unknown_and_unexpected_kind(saved: Path) -> None:
    with pytest.raises(WeightsError, match="of kind 'proposed', but kind 'mcgan' was expected"):
        load_weights(saved, expected_kind="mcgan")
    rewrite_json(saved, kind="stylegan3")
    with pytest.raises(WeightsError, match="unknown model kind 'stylegan3'"):
        load_weights(saved)


def test_wrong_gene_count(saved: Path) -> None:
    with pytest.raises(WeightsError, match="trained on 12 genes, but 5172 were expected"):
        load_weights(saved, expected_num_genes=5172)
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, gene_names=record["gene_names"][:-1])
    with pytest.raises(WeightsError, match=r"gene means have shape \(12,\), expected \(11,\)"):
        load_weights(saved)


def test_architecture_mismatch_shapes(saved: Path) -> None:
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, architecture={**record["architecture"], "base_channels": 8})
    with pytest.raises(WeightsError, match="differ in shape or dtype from the JSON's architecture"):
        load_weights(saved)


def test_architecture_mismatch_keys(saved: Path) -> None:
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, kind="mcgan", architecture={**record["architecture"], "kind": "mcgan"})
    with pytest.raises(WeightsError, match="another architecture than its JSON describes"):
        load_weights(saved)


def test_architecture_this_code_cannot_build(saved: Path) -> None:
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, architecture={**record["architecture"], "embed_dim": 512})
    with pytest.raises(WeightsError, match=r"cannot be built by this code.*embed_dim"):
        load_weights(saved)
    rewrite_json(saved, architecture={**record["architecture"], "kind": "mcgan"})
    with pytest.raises(WeightsError, match="kind 'proposed' but the architecture says 'mcgan'"):
        load_weights(saved)


def test_tensors_from_another_export_are_caught_by_the_hash(tmp_path: Path, saved: Path) -> None:
    config = small_config(base_channels=8)
    other = save_weights(tmp_path / "other", build_generator(config), metadata_for(config))
    saved.write_bytes(other.read_bytes())
    with pytest.raises(WeightsError, match=r"SHA-256|truncated|longer"):
        load_weights(saved)


# ----------------------------------------------------------------------------------------------------
# The JSON is data from outside: types, ranges and a checksum (issue 11, defects 6 and 10)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"safetensors_bytes": "12"}, "safetensors_bytes must be a positive integer"),
        ({"safetensors_bytes": 1.5}, "safetensors_bytes must be a positive integer"),
        ({"safetensors_sha256": 7}, "safetensors_sha256 must be 64"),
        ({"hu_window": [-1e30, 1e30]}, "hu_window must be"),
        ({"hu_window": [0, 1]}, "at least 10 HU wide"),
        ({"patch_spacing_mm": 1e-9}, "patch_spacing_mm must lie in"),
        ({"patch_size": True}, "patch_size must be an integer"),
        ({"gene_out_of_sample_gain": "2"}, "gene_out_of_sample_gain must be a number"),
        ({"gene_out_of_sample_gain": 2.0}, "gain other than 1 needs a projection"),
        ({"gene_out_of_sample_gain": -1}, r"out-of-sample gain must lie in \(0, 10\]"),
    ],
)
def test_implausible_json_values_are_refused(saved: Path, changes: dict, message: str) -> None:
    rewrite_json(saved, **changes)
    with pytest.raises(WeightsError, match=message):
        load_weights(saved)


def test_an_edited_json_is_caught_by_its_checksum(saved: Path) -> None:
    """Reversed gene names are self-consistent (same count, unique) yet misalign every gene: only a checksum
    over the JSON can tell. The tensors file's header carries it."""
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, gene_names=record["gene_names"][::-1])
    with pytest.raises(WeightsError, match="changed after export"):
        load_weights(saved)
    rewrite_json(saved, gene_names=record["gene_names"], hu_window=[-1000.0, 400.0])
    with pytest.raises(WeightsError, match="changed after export"):
        load_weights(saved)
    rewrite_json(saved, hu_window=record["hu_window"])
    load_weights(saved)  # restored: loads again (formatting of the JSON does not matter, its content does)


def test_files_exported_before_the_json_checksum_still_load(tmp_path: Path) -> None:
    """A tensors file without json_sha256 in its header (exported before the check) loads as before."""
    config = small_config()
    path = save_weights(tmp_path / "old", trained_like(config), metadata_for(config))
    drop_json_checksum(path)
    load_weights(path)


def drop_json_checksum(path: Path) -> None:
    """Rewrite the tensors file without json_sha256 in its header, as exported before the check, and point
    the JSON at the new file."""
    import hashlib

    import safetensors.torch

    tensors = safetensors.torch.load(path.read_bytes())
    data = safetensors.torch.save(tensors, metadata={"format": "radiogenomicgan-weights", "format_version": "1"})
    path.write_bytes(data)
    rewrite_json(path, safetensors_sha256=hashlib.sha256(data).hexdigest(), safetensors_bytes=len(data))


def test_a_huge_architecture_is_refused_before_it_is_allocated(saved: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """gene_hidden 1e6 once built a 20 GB network before any tensor was checked: the shapes are now compared
    on the meta device, and a real network is built only for tensors that fit it."""
    import RadiogenomicGANLib.weights as module

    real_build = module.build_generator
    built_for_real: list[int] = []

    def build(config):  # type: ignore[no-untyped-def]
        model = real_build(config)
        if next(model.parameters()).device.type != "meta":
            built_for_real.append(config.gene_hidden)
        return model

    monkeypatch.setattr(module, "build_generator", build)
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, architecture={**record["architecture"], "gene_hidden": 1_000_000})
    with pytest.raises(WeightsError, match="differ in shape"):
        load_weights(saved)
    assert built_for_real == []


@pytest.mark.parametrize("value", [16.5, "16", True])
def test_a_non_integer_width_is_refused_by_name(saved: Path, value: object) -> None:
    record = json.loads(saved.with_suffix(".json").read_text())
    rewrite_json(saved, architecture={**record["architecture"], "base_channels": value})
    with pytest.raises(WeightsError, match="'base_channels' must be an integer"):
        load_weights(saved)


def test_a_pickle_with_another_suffix_is_named_as_such(tmp_path: Path) -> None:
    """`--weights x.pt` once said 'not found: x.pt.safetensors'; it must say the file is a pickle and refuse."""
    from RadiogenomicGANLib.insertion import InsertionError, NoduleInserter

    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(InsertionError, match="Python pickle"):
        NoduleInserter.from_weights(path, device="cpu")
