"""The one request path (RadiogenomicGANLib.request) and the one radiogenomic map (radiogenomic_map).

Both front ends (CLI, module Logic) go through these functions, so their rules are tested once here: the
slice syntax, the gene-sample label, what needs a gene table, the CPU fallback after a GPU out-of-memory
error, the cache that keeps one model, and the t-SNE every map uses.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_insertion_support import NUM_GENES, make_generator, make_metadata, small_config

from RadiogenomicGANLib import radiogenomic_map as rmap
from RadiogenomicGANLib import request as rq
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.phantom.writers import write_geo_table
from RadiogenomicGANLib.weights import save_weights

torch.set_num_threads(1)
SAMPLES = ["S1", "S2", "S3", "S4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A small phantom CT, a 4-sample gene table, and proposed + inpainting weights."""
    from RadiogenomicGANLib.phantom import generate_patient

    root = tmp_path_factory.mktemp("request")
    patients = [generate_patient(n, 7, size_ij=96, slices=20, spacing=(2.5, 4.0), n_genes=64) for n in range(4)]
    values = np.stack([p.genes_fpkm for p in patients], axis=1)
    write_geo_table(root / "genes.txt", patients[0].gene_names, SAMPLES, values)
    complete = [g for g, row in zip(patients[0].gene_names, values) if np.isfinite(row).all()][:NUM_GENES]
    save_weights(root / "proposed", make_generator(), make_metadata(small_config(), complete))
    save_weights(root / "inpainting", make_generator("inpainting"), make_metadata(small_config("inpainting"), complete))
    return {"patient": patients[0], "genes": root / "genes.txt", "proposed": root / "proposed.safetensors",
            "inpainting": root / "inpainting.safetensors"}


def _lung_centre(patient) -> np.ndarray:  # type: ignore[no-untyped-def]
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(patient.lung_mask, sampling=patient.geometry.spacing_kji)
    distance[:3] = distance[-3:] = 0
    return patient.geometry.kji_to_ras([np.unravel_index(np.argmax(distance), distance.shape)])[0]


# --- slices and labels ----------------------------------------------------------------------------------------
def test_one_slice_syntax() -> None:
    parse = rq.parse_slice_spec
    assert parse("±2") == 2 and parse("+-3") == 3 and parse("+/-1") == 1 and parse(" ± 4 ") == 4
    assert parse("40, 41, 45-47") == [40, 41, 45, 46, 47] == parse("40 41 45..47") == parse("40,41,45:47")
    assert parse("45 - 47") == [45, 46, 47]
    assert parse("auto") is None and parse(" Auto ") is None   # fitted to the nodule's size
    for bad in ("4-x", "7-3", "a", "", "±", "1;2"):
        with pytest.raises(rq.RequestError):
            parse(bad)
    assert rq.split_slice_specs("1-2; 5") == ["1-2", "5"] and rq.split_slice_specs("  ") == []
    with pytest.raises(rq.RequestError):
        rq.split_slice_specs("1;;2")


def test_plan_slices_per_centre_or_for_all() -> None:
    geometry = VolumeGeometry.from_spacing([1.0, 1.0, 2.0])
    centres = np.array([[0, 0, 10.0], [0, 0, 2.0]])
    assert rq.plan_slices(["±1", "7,8"], centres, geometry, 2) == [[4, 5, 6], [7, 8]]
    assert rq.plan_slices([[3, 4]], centres, geometry, 2) == [[3, 4], [3, 4]]
    assert rq.plan_slices(None, centres[:1], geometry, 1) == [[4, 5, 6]]
    assert rq.plan_slices(["auto", "7,8"], centres, geometry, 2) == [None, [7, 8]]
    assert rq.plan_slices([None], centres, geometry, 2) == [None, None]
    assert rq.plan_slices(None, centres, geometry, None) == [None, None]   # no spec, no half width: fitted
    with pytest.raises(rq.RequestError, match="3 slice specs for 2 centres"):
        rq.plan_slices(["1", "2", "3"], centres, geometry, 2)


def test_gene_sample_label_is_one_format() -> None:
    assert rq.gene_sample_label("R01-023") == "R01-023"
    assert rq.gene_sample_label("R01-023", "R01-040", 0.25) == "R01-023 (0.75) + R01-040 (0.25)"
    assert rq.gene_sample_label("A", None, 0.9) == "A"


# --- plans ------------------------------------------------------------------------------------------------------
def test_plan_validates_before_running(files) -> None:  # type: ignore[no-untyped-def]
    geometry = files["patient"].geometry
    base = dict(sample="S2", gene_table=files["genes"], weights=files["proposed"], device="cpu")
    centre = _lung_centre(files["patient"])
    with pytest.raises(rq.RequestError, match="not both"):
        rq.make_plan(rq.InsertionRequest(**base, centres_ras=[centre], auto_count=1), geometry)
    with pytest.raises(rq.RequestError, match="automatic count"):
        rq.make_plan(rq.InsertionRequest(**base), geometry)
    with pytest.raises(rq.RequestError, match="only be one"):
        rq.make_plan(rq.InsertionRequest(**base, auto_count=1, slices=("3,4",)), geometry)
    with pytest.raises(rq.RequestError, match="blend weight"):
        rq.make_plan(rq.InsertionRequest(**base, auto_count=1, blend_with="S3", blend_weight=2.0), geometry)
    with pytest.raises(rq.RequestError, match="weights file not found"):
        rq.make_plan(rq.InsertionRequest(**{**base, "weights": files["genes"].with_name("nope.safetensors")},
                                         auto_count=1), geometry)
    plan = rq.make_plan(rq.InsertionRequest(**base, auto_count=2, slices=("±1",), blend_with="S3",
                                            blend_weight=0.25, input_name="chest"), geometry)
    assert plan.centres is None and plan.half_slices == 1 and plan.profile.shape == (NUM_GENES,)
    assert plan.gene_sample == "S2 (0.75) + S3 (0.25)"
    assert plan.provenance == {"gene_table": "genes.txt", "impute_missing_genes": False, "imputed_genes": 0,
                               "gene_samples_in_training": [], "input_volume": "chest"}
    assert rq.make_plan(rq.InsertionRequest(**base, auto_count=1, slices=("auto",)), geometry).half_slices is None
    assert rq.make_plan(rq.InsertionRequest(**base, auto_count=1), geometry).half_slices is None   # the default
    assert rq.make_plan(rq.InsertionRequest(**base, centres_ras=[centre]), geometry).slices == [None]
    fitted = rq.run(rq.InsertionRequest(**base, centres_ras=[centre], slices=("auto",)), files["patient"].volume_hu,
                    geometry)
    assert fitted.provenance["slices_fitted_to_size"] == [True]


def test_a_training_patients_profile_is_prepared_as_in_training_and_named_in_the_provenance(
        files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Weights whose gene front-end was fitted on P1-P6: P2 (a training patient) enters the generator with
    its in-sample scores and is named in the provenance; P8 (a new patient) gets the out-of-sample gain."""
    from RadiogenomicGANLib.genes import GenePreprocessing
    from RadiogenomicGANLib.weights import WeightsMetadata

    rng = np.random.default_rng(3)
    log = np.maximum(6.0 + rng.normal(size=(8, 1)) @ rng.normal(size=(1, 80)) + rng.normal(size=(8, 80)), 1.0)
    genes, samples = [f"G{g}" for g in range(80)], [f"P{p}" for p in range(1, 9)]
    write_geo_table(tmp_path / "cohort.txt", genes, samples, np.exp2(log.T) - 1.0)
    front = GenePreprocessing.fit(log[:6], genes, components=2)
    assert front.out_of_sample_gain > 1.0
    weights = save_weights(tmp_path / "fitted", make_generator(num_genes=2),
                           WeightsMetadata(config=small_config(num_genes=2), genes=front, patch_size=64,
                                           patch_spacing_mm=60.0 / 64))
    base = dict(gene_table=tmp_path / "cohort.txt", weights=weights, device="cpu", auto_count=1)
    trained = rq.make_plan(rq.InsertionRequest(**base, sample="P2"), files["patient"].geometry)
    assert trained.provenance["gene_samples_in_training"] == ["P2"]
    assert [note.split(" is ")[0] for note in rq.training_sample_notes(trained.provenance)] == ["sample P2"]
    np.testing.assert_allclose(trained.profile, front.transform_log(log[1:2], in_sample=True)[0], rtol=1e-4)
    new = rq.make_plan(rq.InsertionRequest(**base, sample="P8"), files["patient"].geometry)
    assert new.provenance["gene_samples_in_training"] == [] and rq.training_sample_notes(new.provenance) == []
    np.testing.assert_allclose(new.profile, front.transform_log(log[7:8], in_sample=False)[0], rtol=1e-4)


def test_gene_table_is_needed_by_gene_models_only(files) -> None:  # type: ignore[no-untyped-def]
    patient = files["patient"]
    centre = _lung_centre(patient)
    with pytest.raises(rq.RequestError, match="needs a gene table"):
        rq.make_plan(rq.InsertionRequest(sample=None, weights=files["proposed"], device="cpu",
                                         centres_ras=[centre]), patient.geometry)
    request = rq.InsertionRequest(sample=None, weights=files["inpainting"], device="cpu", centres_ras=[centre],
                                  half_slices=0)
    result = rq.run(request, patient.volume_hu, patient.geometry)
    assert result.provenance["model_kind"] == "inpainting" and result.provenance["gene_table"] is None
    assert result.slices == [[int(np.rint(patient.geometry.ras_to_kji([centre])[0, 0]))]]


def test_out_of_memory_on_auto_falls_back_to_the_cpu(files) -> None:  # type: ignore[no-untyped-def]
    """A GPU inserter that runs out of memory (simulated: no GPU here) is replaced by the CPU one, once."""
    patient = files["patient"]
    cache = rq.ResourceCache()
    request = rq.InsertionRequest(sample="S1", gene_table=files["genes"], weights=files["proposed"], device="auto",
                                  centres_ras=[_lung_centre(patient)], half_slices=0, seed=3)
    plan = rq.make_plan(request, patient.geometry, cache)
    calls: list[str] = []

    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("gpu")
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    plan.inserter = types.SimpleNamespace(device=torch.device("cuda"), insert=out_of_memory)
    result = rq.execute(plan, patient.volume_hu, patient.geometry, cache=cache)
    assert calls == ["gpu"] and result.provenance["device"] == "cpu" and plan.inserter.device.type == "cpu"
    expected = rq.run(request, patient.volume_hu, patient.geometry, cache=cache)
    assert np.array_equal(result.volume_hu, expected.volume_hu)

    for device, error in (("cuda", "CUDA out of memory"), ("auto", "CUDA error: device-side assert")):
        plan = rq.make_plan(rq.InsertionRequest(**{**request.__dict__, "device": "cpu"}), patient.geometry, cache)
        plan.request = rq.InsertionRequest(**{**request.__dict__, "device": device})

        def failing(*args, message=error, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError(message)

        plan.inserter = types.SimpleNamespace(device=torch.device("cuda"), insert=failing)
        with pytest.raises(RuntimeError, match=error):  # an explicit GPU, or another error: no silent fallback
            rq.execute(plan, patient.volume_hu, patient.geometry, cache=cache)


def test_cache_keeps_one_model_and_notices_a_new_file(files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = rq.ResourceCache()
    first = cache.inserter(files["proposed"], "cpu")
    assert cache.inserter(files["proposed"], "cpu") is first
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(files["proposed"].read_bytes())
    copy.with_suffix(".json").write_bytes(files["proposed"].with_suffix(".json").read_bytes())
    other = cache.inserter(copy, "cpu")
    assert other is not first and cache.inserter(copy, "cpu") is other
    os.utime(copy, (1.0, 1.0))  # the file changed on disk: reloaded
    assert cache.inserter(copy, "cpu") is not other
    assert cache.gene_table(files["genes"]) is cache.gene_table(files["genes"])
    cache.release()
    assert cache.inserter(copy, "cpu") is not other


# --- the radiogenomic map ---------------------------------------------------------------------------------------
def test_embed_2d_is_repeatable_and_keeps_clusters_apart() -> None:
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(0, 0.1, (12, 8)), rng.normal(5, 0.1, (12, 8))])
    xy = rmap.embed_2d(codes, seed=4)
    assert xy.shape == (24, 2) and np.array_equal(xy, rmap.embed_2d(codes, seed=4))
    a, b = xy[:12], xy[12:]
    between = np.linalg.norm(a.mean(0) - b.mean(0))
    within = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
    assert between > 2 * within
    assert np.array_equal(rmap.embed_2d(codes[:2]), np.zeros((2, 2)))


def test_cohort_map_cli_writes_the_same_map(files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "map.csv"
    assert rmap.main(["--genes", str(files["genes"]), "--out", str(out), "--weights", str(files["proposed"]),
                      "--device", "cpu", "--seed", "2"]) == 0
    written = rmap.read_map_csv(out)
    direct = rmap.cohort_map(rq.load_inserter(files["proposed"], "cpu"), rq.read_table(files["genes"]), seed=2)
    assert written.sample_ids == SAMPLES == direct.sample_ids
    np.testing.assert_allclose(written.xy, direct.xy, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(written.codes, direct.codes, rtol=1e-4, atol=1e-5)
    assert rmap.main(["--genes", str(files["genes"]), "--out", str(out), "--weights", str(files["inpainting"]),
                      "--device", "cpu"]) == 2


def test_demo_and_evaluate_use_the_lib_map() -> None:
    """No second t-SNE: the demo and the evaluation call embed_2d (this file's subject)."""
    root = Path(__file__).resolve().parents[1]
    for path in ("RadiogenomicGANLib/demo.py", "training/evaluate.py", "RadiogenomicGAN/RadiogenomicGAN.py"):
        text = (root / path).read_text(encoding="utf-8")
        assert "TSNE(" not in text, f"{path} runs its own t-SNE"
    assert "embed_2d(" in (root / "RadiogenomicGANLib/demo.py").read_text(encoding="utf-8")
    assert "embed_2d(" in (root / "training/evaluation/sections.py").read_text(encoding="utf-8")

