"""The evaluation CLI end to end on a tiny synthetic dataset, and its pieces (training/evaluate.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from RadiogenomicGANLib.networks import GeneratorConfig, build_generator
from RadiogenomicGANLib.weights import WeightsMetadata, save_weights
from training import evaluate as E
from training.dataset import load_dataset, make_synthetic_dataset

TINY = {"code_dim": 8, "noise_dim": 4, "base_channels": 4, "max_channels": 8, "gene_hidden": 16}


def _save_tiny(path: Path, kind: str, data, seed: int) -> Path:
    """A randomly initialised tiny generator in the weights format. The mask head's bias is set to 0 (its
    default −2 keeps an untrained mask empty), so the generated 'nodules' are non-empty blobs and every
    measurement path runs on real numbers."""
    torch.manual_seed(seed)
    config = GeneratorConfig(kind=kind, num_genes=data.num_genes, patch_size=data.patch_size, **TINY)
    generator = build_generator(config).eval()
    torch.nn.init.zeros_(generator.mask_head.conv.bias)
    metadata = WeightsMetadata(config=config, gene_names=[str(n) for n in data.gene_names],
                               gene_means=data.gene_means, gene_stds=data.gene_stds, patch_size=data.patch_size,
                               patch_spacing_mm=data.patch_spacing_mm, provenance={"test": "random init"})
    return save_weights(path, generator, metadata)


def _truth_csv(path: Path, data) -> Path:
    """Truth that follows make_synthetic_dataset's drawing: disc radius ← gene 0, density ← gene 1."""
    rng = np.random.default_rng(0)
    rows = []
    for p, pid in enumerate(data.patient_ids):
        g0, g1 = float(data.genes[p, 0]), float(data.genes[p, 1])
        rows.append({"patient_id": str(pid), "module_class": int(g0 > 0) + 2 * int(g1 > 0), "module_1": g0,
                     "module_2": g1, "diameter_mm": 16 + 6 * np.tanh(g0), "solid_fraction": 0.5 + 0.4 * np.tanh(g1),
                     "margin_blur_mm": float(rng.uniform(0.3, 2.7)), "hu_solid": float(rng.uniform(0, 60))})
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data_path = make_synthetic_dataset(root / "data.npz", patients=12, genes=16, seed=1)
    data = load_dataset(data_path)
    weights = {kind: _save_tiny(root / kind, kind, data, i) for i, kind in enumerate(("proposed", "mcgan",
                                                                                       "inpainting"))}
    return {"root": root, "data_path": data_path, "data": data, "weights": weights,
            "truth": _truth_csv(root / "ground_truth.csv", data)}


FAST = ["--c2st-seconds", "2", "--max-samples", "16", "--diversity-inputs", "3", "--diversity-noises", "3",
        "--gene-control-backgrounds", "2", "--threads", "1", "--no-progress"]


def _not_blank(path: Path) -> bool:
    image = imread(path)
    return image.ndim >= 2 and float(np.var(image)) > 0 and np.unique(image.reshape(-1, image.shape[-1]),
                                                                         axis=0).shape[0] > 1


def test_full_report_end_to_end(setup):
    out = setup["root"] / "report"
    w = setup["weights"]
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(w["proposed"]), "--baseline", str(w["mcgan"]),
                 "--inpainting", str(w["inpainting"]), "--ground-truth", str(setup["truth"]), "--out", str(out),
                 "--seed", "3", *FAST])
    assert rc == 0
    for name in ("fig3_samples.png", "fig4_tsne.png", "gene_control.png", "diversity.png"):
        assert (out / name).is_file(), name
        assert _not_blank(out / name), name

    metrics = json.loads((out / "metrics.json").read_text())        # strict JSON: NaN became null
    for key in ("inputs", "table1", "figure3", "radiogenomic_map", "gene_control", "realism", "diversity",
                "conventional", "links", "targets"):
        assert key in metrics, key
    for role in ("inpainting", "baseline", "proposed"):
        for variant in ("paper", "background"):
            for metric in ("mse", "ssim", "psnr"):
                assert metrics["table1"][role][variant][metric]["mean"] is not None, (role, variant, metric)
        assert metrics["realism"][role]["n_test"] > 0
    # inpainting composites outside its hole: the background variant there is (nearly) untouched
    assert metrics["table1"]["inpainting"]["background"]["mse"]["mean"] < 1e-3
    scores = metrics["radiogenomic_map"]["scores"]
    assert set(scores) == {"raw genes", "baseline code", "proposed code"}
    assert "diameter_mm" in scores["proposed code"]["r2"] and "module_1" in scores["proposed code"]["r2"]
    # the ARI is what it says: k-means of all patients' raw genes against the true module class
    from training.metrics import adjusted_rand, kmeans_labels

    data = load_dataset(setup["data_path"])
    classes = [int(g0 > 0) + 2 * int(g1 > 0) for g0, g1 in data.genes[:, :2]]  # as _truth_csv writes them
    k = metrics["radiogenomic_map"]["k"]
    expected = adjusted_rand(classes, kmeans_labels(data.genes.astype(np.float64), k, 3))
    assert scores["raw genes"]["ari_all"] == pytest.approx(expected)
    gene_control = metrics["gene_control"]["scores"]
    assert set(gene_control) == {"baseline", "proposed", "real nodules"}
    # the real discs follow gene 0 exactly as the truth's diameter does
    assert gene_control["real nodules"]["size"]["aligned_rho_all"] > 0.8
    assert len(metrics["gene_control"]["per_donor_features"]["proposed"]["diameter_mm"]) == 12
    assert metrics["diversity"]["inpainting"]["l1_patch"]["mean"] == 0.0         # ignores noise
    assert metrics["diversity"]["proposed"]["l1_patch"]["mean"] > 0.0
    assert any(name.startswith("oracle") for name in metrics["links"])
    assert len(metrics["targets"]) >= 6
    assert all(t["reached"] in (True, False, None) for t in metrics["targets"])

    report = (out / "report.md").read_text()
    for heading in ("## Targets", "## Table 1", "## Fig. 3", "## Fig. 4", "## Scores against the truth",
                    "## Gene control", "## Realism", "## Diversity", "## Module → phenotype links"):
        assert heading in report, heading
    for figure in ("fig3_samples.png", "fig4_tsne.png", "gene_control.png", "diversity.png"):
        assert f"]({figure})" in report
    assert "HU window [-1000, 500]" in report and "data_range 1" in report


def test_proposed_only_without_truth(setup):
    out = setup["root"] / "proposed-only"
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(setup["weights"]["proposed"]), "--out",
                 str(out), *FAST])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["table1"]) == {"proposed"}
    assert metrics["figure3"]["skipped_rows"] == ["inpainting", "baseline"]
    assert "scores" not in metrics["radiogenomic_map"]
    report = (out / "report.md").read_text()
    assert "Rows left out (model not given): inpainting, baseline" in report
    # without truth and baselines only the targets that need neither are claimed, each decided and reported
    reached = {t["target"]: t["reached"] for t in metrics["targets"]}
    assert set(reached) == {"proposed SSIM ≥ 0.88", "proposed PSNR ≥ 24.5 dB",
                            "C2ST accuracy of the proposed model ≤ 0.65"}
    assert all(value in (True, False) for value in reached.values())
    assert all(target in report for target in reached)
    assert _not_blank(out / "fig3_samples.png") and _not_blank(out / "fig4_tsne.png")


def test_wrong_kind_and_missing_test_split_are_clear_errors(setup, tmp_path, capsys):
    w = setup["weights"]
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(w["proposed"]), "--baseline", str(w["proposed"]),
                 "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert "--baseline" in capsys.readouterr().err
    arrays = setup["data"].arrays()
    arrays["split"] = np.where(arrays["split"] == "test", "val", arrays["split"])
    from training.dataset import write_dataset

    no_test = write_dataset(tmp_path / "no_test.npz", **arrays)
    rc = E.main(["--data", str(no_test), "--weights", str(w["proposed"]), "--out", str(tmp_path / "y"),
                 "--no-progress"])
    assert rc == 2
    assert "no test patients" in capsys.readouterr().err


def test_model_genes_realign_by_name_and_refuse_missing(setup):
    data = setup["data"]
    order = np.random.default_rng(0).permutation(data.num_genes)

    class Meta:
        def __init__(self) -> None:
            self.gene_names = [str(data.gene_names[i]) for i in order]
            self.gene_means = data.gene_means[order]
            self.gene_stds = data.gene_stds[order]

    meta = Meta()
    assert np.allclose(E.model_genes(data, meta), data.genes[:, order], atol=1e-5)
    meta.gene_means = meta.gene_means + 1.0          # another normalisation: z shifts by −1/std
    assert np.allclose(E.model_genes(data, meta), data.genes[:, order] - 1.0 / data.gene_stds[order], atol=1e-4)
    meta.gene_names = ["NOPE", *meta.gene_names[1:]]
    with pytest.raises(E.EvaluationError, match="1 of the model's"):
        E.model_genes(data, meta)


def test_targets_logic_on_hand_made_metrics():
    def entry(mse, ssim, psnr):
        return {"paper": {"mse": {"mean": mse}, "ssim": {"mean": ssim}, "psnr": {"mean": psnr}}}

    metrics = {
        "table1": {"inpainting": entry(0.01, 0.7, 20), "baseline": entry(0.006, 0.74, 22),
                   "proposed": entry(0.004, 0.9, 25)},
        "radiogenomic_map": {"scores": {"raw genes": {"ari_all": 0.1}, "proposed code": {"ari_all": 0.85}}},
        "gene_control": {"target_subset": "test", "scores": {"proposed": {
            "size": {"aligned_rho_test": 0.9}, "margin": {"aligned_rho_test": 0.7}}}},
        "realism": {"proposed": {"accuracy": 0.6}},
    }
    reached = {t["target"].split(" (")[0]: t["reached"] for t in E.targets(metrics)}
    assert reached["proposed beats inpainting and baseline on MSE, SSIM and PSNR"] is True
    assert reached["proposed SSIM ≥ 0.88"] is True and reached["proposed PSNR ≥ 24.5 dB"] is True
    assert reached["ARI of the proposed code ≥ 0.8"] is True and reached["ARI of the raw genes ≤ 0.3"] is True
    assert reached["gene-control aligned ρ ≥ 0.8 for size, margin"] is False
    assert reached["C2ST accuracy of the proposed model ≤ 0.65"] is True
    metrics["table1"]["baseline"] = entry(0.003, 0.74, 22)
    assert E.targets(metrics)[0]["reached"] is False


def test_jsonable_makes_strict_json():
    value = {"a": np.float32(1.5), "b": float("nan"), "c": np.arange(3), "d": (np.int64(2), np.inf),
             "e": Path("x.png"), "f": np.bool_(True)}
    assert json.loads(json.dumps(E.jsonable(value), allow_nan=False)) == {
        "a": 1.5, "b": None, "c": [0, 1, 2], "d": [2, None], "e": "x.png", "f": True}
