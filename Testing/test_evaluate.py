"""Evaluation protocol v2 end to end on a tiny synthetic dataset, and proof that each metric can fail."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from RadiogenomicGANLib.networks import GeneratorConfig, GeneratorOutput, build_generator
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
    metadata = WeightsMetadata(config=config, genes=data.gene_preprocessing, patch_size=data.patch_size,
                               patch_spacing_mm=data.patch_spacing_mm, provenance={"test": "random init"})
    return save_weights(path, generator, metadata)


def _truth_csv(path: Path, data) -> Path:
    """Truth that follows make_synthetic_dataset's drawing: disc radius ← gene 0, density ← gene 1; and a
    lobulation ← gene 2 that only LobedOracle draws (the real nodules are discs)."""
    rng = np.random.default_rng(0)
    rows = []
    for p, pid in enumerate(data.patient_ids):
        g0, g1 = float(data.genes[p, 0]), float(data.genes[p, 1])
        rows.append({"patient_id": str(pid), "module_class": int(g0 > 0) + 2 * int(g1 > 0), "module_1": g0,
                     "module_2": g1, "diameter_mm": 16 + 6 * np.tanh(g0), "solid_fraction": 0.5 + 0.4 * np.tanh(g1),
                     "margin_blur_mm": float(rng.uniform(0.3, 2.7)), "hu_solid": float(rng.uniform(0, 60)),
                     "lobulation": 0.5 + 0.4 * np.tanh(float(data.genes[p, 2]))})
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


FAST = ["--c2st-runs", "2", "--c2st-samples", "24", "--c2st-epochs", "2", "--c2st-crop", "24", "--max-samples", "16",
        "--backgrounds", "3", "--noises", "2", "--bootstrap", "50", "--threads", "1", "--no-progress"]


def _not_blank(path: Path) -> bool:
    image = imread(path)
    return image.ndim >= 2 and float(np.var(image)) > 0 and np.unique(image.reshape(-1, image.shape[-1]),
                                                                         axis=0).shape[0] > 1


def test_full_report_end_to_end(setup):
    out = setup["root"] / "report"
    w = setup["weights"]
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(w["proposed"]), "--baseline", str(w["mcgan"]),
                 "--inpainting", str(w["inpainting"]), "--ground-truth", str(setup["truth"]), "--out", str(out),
                 "--split", "all", "--seed", "3", *FAST])
    assert rc == 0
    for name in ("fig3_samples.png", "fig4_tsne.png", "gene_control.png"):
        assert (out / name).is_file(), name
        assert _not_blank(out / name), name

    metrics = json.loads((out / "metrics.json").read_text())        # strict JSON: NaN became null
    assert next(iter(metrics)) == "summary" and tuple(metrics["summary"]) == E.SUMMARY_KEYS
    summary = metrics["summary"]
    assert summary["protocol"] == 2 and summary["split"] == "all" and summary["donors"] == 12
    assert summary["c2st_runs"] == 2 and len(summary["size_rho_ci95"]) == 2
    for key in ("ssim_paper", "psnr_paper", "empty_mask_fraction", "c2st_median", "c2st_real_vs_real", "ari",
                "ari_linear_probe", "ari_raw_genes"):
        assert isinstance(summary[key], float), key
    for role in ("inpainting", "baseline", "proposed", "copy"):
        assert metrics["table1"][role]["paper"]["ssim"] is not None, role
        assert len(metrics["realism"]["models"][role]["accuracies"]) == 2
    # the copy control keeps its input exactly and draws nothing: perfect paper variant, no image with a nodule
    copy = metrics["table1"]["copy"]
    assert copy["paper"]["ssim"] == pytest.approx(1.0) and copy["empty_mask_fraction"] == 1.0
    assert copy["n_with_nodule"] == 0 and copy["with_nodule"]["ssim"] is None
    assert metrics["table1"]["inpainting"]["background"]["mse"] < 1e-3  # composites outside its hole
    scores = metrics["radiogenomic_map"]["scores"]
    assert set(scores) == {"raw genes (prepared)", "baseline code", "proposed code",
                           "linear probe of the genes (ceiling)"}
    # the synthetic classes are the signs of genes 0 and 1: a linear probe of the genes clusters them better
    # than k-means of all 16 genes (out-of-fold over 12 donors, so far from perfect)
    assert scores["linear probe of the genes (ceiling)"]["ari"] > scores["raw genes (prepared)"]["ari"]
    control = metrics["gene_control"]["models"]
    assert set(control) == {"baseline", "proposed", "copy", "shuffled"}
    assert control["copy"]["empty_mask_fraction"] == 1.0 and control["copy"]["rho"]["size"]["aligned_rho"] is None
    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("## Table 1")
    for heading in ("## Gene control", "## Fig. 4", "## Realism", "## Fig. 3", "## Module → phenotype links"):
        assert heading in report, heading
    assert "`c2st_real_vs_real`" in report
    assert metrics["inputs"]["gene_inputs"] == {"baseline": "16 z-scored genes", "proposed": "16 z-scored genes"}
    assert "(genes: 16 z-scored genes)" in report


class DiscOracle(torch.nn.Module):
    """A generator that does what the genes say: a disc whose radius follows gene 0 and density gene 1 (as
    make_synthetic_dataset draws its real nodules); the noise moves it by a pixel or two."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(noise_dim=2, patch_size=size)
        self.scale = torch.nn.Parameter(torch.ones(()))  # so that .parameters() has a device

    def forward(self, background, genes, noise=None, hole=None, radius_scale=1.0):
        size = background.shape[-1]
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        radius = (8.0 + 3.0 * torch.tanh(genes[:, 0])) / (60.0 / size) * radius_scale
        shift = 1.5 * noise if noise is not None else torch.zeros(genes.shape[0], 2)
        cy, cx = (size - 1) / 2 + shift[:, 0], (size - 1) / 2 + shift[:, 1]
        disc = ((rows[None] - cy[:, None, None]) ** 2 + (cols[None] - cx[:, None, None]) ** 2
                <= radius[:, None, None] ** 2).float()[:, None]
        value = (0.05 + 0.1 * torch.tanh(genes[:, 1]))[:, None, None, None]
        image = background * (1 - disc) + value * disc
        return GeneratorOutput(image=image, mask=disc, weight_maps=[disc], gene_code=genes)

    def encode_genes(self, genes):
        return genes


def test_each_metric_fails_the_negative_controls_and_passes_an_oracle(setup, tmp_path):
    """A metric must be able to fail: the copy-background generator and shuffled genes must score badly where
    a generator that truly follows the genes scores well."""
    from training.conventional import read_ground_truth
    from training.evaluation.context import Context, Model, negative_controls
    from training.evaluation.sections import gene_control, realism

    data = setup["data"]
    truth = read_ground_truth(setup["truth"], data.patient_ids, data.gene_names)
    oracle = Model("proposed", DiscOracle(data.patch_size), None, data.genes, "oracle")
    options = {"backgrounds": 4, "noises": 3, "bootstrap": 200, "dilation_px": 3, "batch_size": 64,
               "progress": False, "c2st_runs": 3, "c2st_samples": 48, "c2st_epochs": 10, "c2st_crop": 32}
    ctx = Context(data, {"proposed": oracle}, truth, torch.device("cpu"), 0, tmp_path, "all", options)
    ctx.controls = negative_controls(oracle, ctx.donors, seed=0)

    section = gene_control(ctx)
    control = section.metrics["models"]
    assert section.metrics["real_nodules_aligned_rho"]["size"] > 0.9  # the real nodules: each measure's ceiling
    assert control["proposed"]["rho"]["size"]["aligned_rho"] > 0.9
    assert control["proposed"]["rho"]["size"]["aligned_ci95"][0] > 0.6
    assert control["proposed"]["rho"]["density"]["aligned_rho"] > 0.5
    assert control["proposed"]["empty_mask_fraction"] == 0.0 and control["proposed"]["noise_diversity"] > 0
    # copying the background: no nodule, ρ undefined — never a pass
    assert control["copy"]["empty_mask_fraction"] == 1.0
    assert np.isnan(control["copy"]["rho"]["size"]["aligned_rho"])
    # another donor's genes: the nodule no longer follows the donor
    assert abs(control["shuffled"]["rho"]["size"]["aligned_rho"]) < 0.6
    assert control["shuffled"]["rho"]["size"]["aligned_rho"] < control["proposed"]["rho"]["size"]["aligned_rho"] - 0.4

    real = realism(ctx).metrics
    assert real["models"]["copy"]["median"] > 0.85  # backgrounds without a nodule are told from real nodules
    assert real["models"]["proposed"]["median"] < real["models"]["copy"]["median"] - 0.2  # discs like the real ones
    assert real["real_vs_real"]["runs"] == 3 and real["models"]["copy"]["collapsed_critics"] == 0
    # with the chest wall taken out of both sides the control still fails and the oracle still passes
    assert real["lung_only"]["copy"]["median"] > 0.85
    assert real["lung_only"]["proposed"]["median"] < real["lung_only"]["copy"]["median"] - 0.2
    # the oracle's discs replace the background inside them; the copy control draws none to measure
    assert abs(real["interior_leak"]["proposed"]["median"]) < 0.1 and real["interior_leak"]["proposed"]["measured"] > 0
    assert real["interior_leak"]["copy"]["measured"] == 0
    # the real discs pasted on the same backgrounds: the floor, below the copy control (no nodule)
    assert real["lung_only"]["pasted"]["median"] < real["lung_only"]["copy"]["median"] - 0.2
    assert real["models"]["pasted"]["median"] < real["models"]["copy"]["median"] - 0.2
    # each real crop against the background most like its surroundings: the control fails, the discs pass
    matched = real["surroundings_matched"]
    assert matched["copy"]["median"] > 0.85
    assert matched["proposed"]["median"] < matched["copy"]["median"] - 0.2
    assert matched["pasted"]["median"] < matched["copy"]["median"] - 0.2
    assert real["surroundings"]["distinct_backgrounds"] > 1


class LobedOracle(DiscOracle):
    """DiscOracle whose outline has 5 lobes of relative height 0.15 + 0.1·tanh(gene 2): lobulation that follows
    the genes, as the truth CSV's."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        size = background.shape[-1]
        rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                    indexing="ij")
        radius = (8.0 + 3.0 * torch.tanh(genes[:, 0])) / (60.0 / size)
        height = 0.15 + 0.1 * torch.tanh(genes[:, 2])
        shift = 1.5 * noise if noise is not None else torch.zeros(genes.shape[0], 2)
        dr = rows[None] - ((size - 1) / 2 + shift[:, 0])[:, None, None]
        dc = cols[None] - ((size - 1) / 2 + shift[:, 1])[:, None, None]
        outline = radius[:, None, None] * (1 + height[:, None, None] * torch.cos(5 * torch.atan2(dr, dc)))
        mask = (torch.hypot(dr, dc) <= outline).float()[:, None]
        value = (0.05 + 0.1 * torch.tanh(genes[:, 1]))[:, None, None, None]
        return out._replace(image=background * (1 - mask) + value * mask, mask=mask, weight_maps=[mask])


def test_lobulation_follows_lobes_drawn_from_the_genes_and_fails_another_donors_genes(setup, tmp_path):
    """The lobed oracle's outline follows the true lobulation (summary `lobulation_rho`); fed another donor's genes
    it no longer does; compactness, the former measure, is in the table beside it."""
    from training.conventional import read_ground_truth
    from training.evaluation.context import Context, Model, negative_controls
    from training.evaluation.sections import gene_control

    data = setup["data"]
    truth = read_ground_truth(setup["truth"], data.patient_ids, data.gene_names)
    oracle = Model("proposed", LobedOracle(data.patch_size), None, data.genes, "lobed")
    options = {"backgrounds": 3, "noises": 2, "bootstrap": 50, "dilation_px": 3, "batch_size": 64, "progress": False}
    ctx = Context(data, {"proposed": oracle}, truth, torch.device("cpu"), 0, tmp_path, "all", options)
    ctx.controls = negative_controls(oracle, ctx.donors, seed=0)
    section = gene_control(ctx)
    models = section.metrics["models"]
    lobed = models["proposed"]["rho"]["lobulation"]["aligned_rho"]
    assert lobed > 0.8 and section.summary["lobulation_rho"] == lobed
    assert models["shuffled"]["rho"]["lobulation"]["aligned_rho"] < lobed - 0.4
    assert np.isnan(models["copy"]["rho"]["lobulation"]["aligned_rho"])
    assert "lobulation (compactness)" in models["proposed"]["rho"]
    assert "the outline's lobes" in "\n".join(section.markdown)


def test_pasted_nodules_keep_the_real_nodule_and_its_rim_only():
    """Inside the real mask grown by 1 px the real image, elsewhere the background."""
    from training.evaluation.sections import pasted_nodules

    images, backgrounds = np.full((1, 8, 8), 0.5, np.float32), np.full((1, 8, 8), -0.8, np.float32)
    masks = np.zeros((1, 8, 8), np.uint8)
    masks[0, 3:5, 3:5] = 1
    pasted = pasted_nodules(images, masks, backgrounds)[0]
    assert (pasted[2:6, 2:6] == 0.5).all() and (pasted == 0.5).sum() == 16 and pasted[0, 0] == -0.8


class GhostOracle(DiscOracle):
    """DiscOracle whose disc is laid over the background at half opacity: the lung shows through it."""

    def forward(self, background, genes, noise=None, hole=None, radius_scale=1.0):
        out = super().forward(background, genes, noise, hole, radius_scale)
        return out._replace(image=0.5 * (out.image + background))


def test_interior_leak_sees_a_background_through_the_nodule(setup):
    """β ≈ 0.5 for a half-transparent disc, ≈ 0 for an opaque one, 1 for the background stamped as a nodule."""
    from training.evaluation.sections import interior_leak

    data = setup["data"]
    backgrounds = data.background_images[:32]
    genes = torch.from_numpy(np.resize(data.genes, (32, data.genes.shape[1])))
    tensor = torch.from_numpy(backgrounds)[:, None]
    with torch.no_grad():
        opaque = DiscOracle(data.patch_size)(tensor, genes)
        ghost = GhostOracle(data.patch_size)(tensor, genes)
    masks = opaque.mask[:, 0].numpy()
    assert np.nanmedian(interior_leak(opaque.image[:, 0].numpy(), masks, backgrounds)) == pytest.approx(0.0, abs=0.05)
    assert np.nanmedian(interior_leak(ghost.image[:, 0].numpy(), masks, backgrounds)) == pytest.approx(0.5, abs=0.05)
    assert np.nanmedian(interior_leak(backgrounds, masks, backgrounds)) == pytest.approx(1.0, abs=1e-3)


class Scaled(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


class EdgeOracle(DiscOracle):
    """DiscOracle whose edge is blurred by σ = exp(−0.6·φ[2]/anchor_sd) px inside its disc — a generator that
    reads its anchored margin axis (φ = anchor_sd × the genes, through a mapping the sweep's hook can move)."""

    def __init__(self, size: int, anchor_sd: float = 1.0) -> None:
        super().__init__(size)
        from RadiogenomicGANLib.networks import CodeDrivenEdge

        self.config.anchor_sd = anchor_sd
        self.mapping = Scaled(anchor_sd) if anchor_sd != 1.0 else torch.nn.Identity()
        self.edge = CodeDrivenEdge(0.6, 2, inside_mask=True, anchor_sd=anchor_sd)

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        code = self.mapping(genes)
        return out._replace(image=self.edge(out.image, background, code, out.mask), gene_code=code)

    def encode_genes(self, genes):
        return self.mapping(genes)


def test_code_axes_sweep_sees_an_axis_the_generator_reads_and_skips_an_unanchored_code(setup, tmp_path):
    """The anchored-axes section: the margin axis of a generator whose edge width reads it sweeps from blurry
    to sharp while its size axis (read by nothing) stays put; the shifted code is the code + shift inside
    the block only; a model trained without the anchor is skipped."""
    from training.conventional import read_ground_truth
    from training.evaluation.context import Context, Model, shifted_code
    from training.evaluation.sections import code_axes
    from training.losses import CODE_PHENOTYPE_FEATURES

    data = setup["data"]
    truth = read_ground_truth(setup["truth"], data.patient_ids, data.gene_names)
    oracle = EdgeOracle(data.patch_size)
    anchored = SimpleNamespace(provenance={"loss_weights": {"code_phenotype": 1.0}})
    options = {"backgrounds": 4, "noises": 1, "dilation_px": 3, "batch_size": 64, "progress": False}
    ctx = Context(data, {"proposed": Model("proposed", oracle, anchored, data.genes, "oracle")}, truth,
                  torch.device("cpu"), 0, tmp_path, "all", options)

    genes = torch.from_numpy(data.genes[:3])
    with shifted_code(oracle, 2, 2.0):
        moved = oracle.encode_genes(genes)
    torch.testing.assert_close(moved[:, 2], genes[:, 2] + 2.0)
    torch.testing.assert_close(moved[:, [0, 1, 3]], genes[:, [0, 1, 3]])
    torch.testing.assert_close(oracle.encode_genes(genes), genes)

    section = code_axes(ctx)
    assert section.metrics["anchored"] and list(section.metrics["axes"]) == list(CODE_PHENOTYPE_FEATURES)
    margin = list(section.metrics["axes"]["margin_sharpness"]["sweep"].values())
    assert margin[0] < margin[1] < margin[2], margin          # +2 sd: σ 0.3 px, sharp; −2 sd: 3 px, blurry
    size = list(section.metrics["axes"]["diameter_mm"]["sweep"].values())
    assert size[0] == size[1] == size[2], size                # the oracle's size follows gene 0, not the code
    assert "| 2: margin_sharpness | margin |" in "\n".join(section.markdown)
    # a code anchored at sd 3 is swept by ±2 sd = ±6 units: the same images as the sd-1 oracle's
    wide = EdgeOracle(data.patch_size, anchor_sd=3.0)
    wide_ctx = Context(data, {"proposed": Model("proposed", wide, anchored, data.genes, "oracle")}, truth,
                       torch.device("cpu"), 0, tmp_path, "all", options)
    wide_section = code_axes(wide_ctx)
    wide_margin = list(wide_section.metrics["axes"]["margin_sharpness"]["sweep"].values())
    np.testing.assert_allclose(wide_margin, margin, rtol=1e-5)
    assert wide_section.metrics["anchor_sd"] == 3.0 and "(× 3, the anchor's sd" in "\n".join(wide_section.markdown)

    unanchored = SimpleNamespace(provenance={"loss_weights": {"code_phenotype": 0.0}})
    plain = Context(data, {"proposed": Model("proposed", oracle, unanchored, data.genes, "oracle")}, truth,
                    torch.device("cpu"), 0, tmp_path, "all", options)
    assert code_axes(plain).metrics == {"anchored": False}


def test_too_few_held_out_donors_and_wrong_kind_are_clear_errors(setup, tmp_path, capsys):
    w = setup["weights"]
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(w["proposed"]), "--baseline", str(w["proposed"]),
                 "--split", "all", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert "--baseline" in capsys.readouterr().err
    rc = E.main(["--data", str(setup["data_path"]), "--weights", str(w["proposed"]), "--split", "test",
                 "--out", str(tmp_path / "y"), "--no-progress"])
    assert rc == 2
    assert "needs at least 3 held-out donors" in capsys.readouterr().err


def test_a_model_reads_another_cohort_with_its_own_preprocessing(setup, tmp_path):
    """--split all on a cohort the model never saw: genes aligned by name, prepared by the model's fit."""
    from training.evaluation.context import load_model

    other = load_dataset(make_synthetic_dataset(tmp_path / "other.npz", patients=6, genes=16, seed=9))
    model = load_model("proposed", setup["weights"]["proposed"], other, torch.device("cpu"))
    expected = setup["data"].gene_preprocessing.transform_log(other.table_genes_log)
    np.testing.assert_allclose(model.genes, expected, rtol=1e-6)
    fewer = load_dataset(make_synthetic_dataset(tmp_path / "fewer.npz", patients=6, genes=8, seed=9))
    with pytest.raises(E.EvaluationError, match="8 of the 16 genes the model reads are not in this dataset"):
        load_model("proposed", setup["weights"]["proposed"], fewer, torch.device("cpu"))


def test_validation_score_needs_no_truth_and_rewards_gene_control(setup):
    data = setup["data"]
    arrays = data.arrays()
    arrays["split"] = np.array(["train"] * 4 + ["val"] * 8)
    from training.dataset import _validate

    val_data = _validate(arrays, "")
    good = E.validation_score(DiscOracle(data.patch_size), val_data, backgrounds=3, noises=2)
    assert good["donors"] == 8 and good["size_rho_vs_real"] > 0.8 and good["score"] > 0.5
    empty = E.validation_score(CopyBackgroundLike(data.patch_size), val_data, backgrounds=3, noises=2)
    assert empty["empty_mask_fraction"] == 1.0 and empty["score"] < good["score"] - 1.0
    assert good["misplaced_fraction"] == 0.0
    # the same gene control drawn a quarter patch (15 mm) from the point: every draw misplaced
    aside = E.validation_score(OffCentre(data.patch_size), val_data, backgrounds=3, noises=2)
    assert aside["size_rho_vs_real"] == pytest.approx(good["size_rho_vs_real"], abs=0.1)
    assert aside["misplaced_fraction"] == 1.0 and aside["score"] < good["score"] - 0.8


def test_validation_score_charges_the_slice_profile_gap(setup):
    """Real nodules made spheres: a model that draws the sphere's cross-section at each slice's t outscores one
    that draws every slice alike by the difference of their profile gaps (their centre slices are the same)."""
    import dataclasses

    from training.dataset import _validate

    data = setup["data"]
    arrays = data.arrays()
    arrays["split"] = np.array(["train"] * 4 + ["val"] * 8)
    val_data = _validate(arrays, "")
    size = data.patch_size
    rows, cols = np.mgrid[0:size, 0:size]
    distance = np.hypot(rows - (size - 1) / 2, cols - (size - 1) / 2)
    radius = 10 * np.sqrt(1 - val_data.nodule_position() ** 2)
    spheres = dataclasses.replace(val_data, nodule_masks=(distance[None] <= radius[:, None, None]).astype(np.uint8))
    blind = E.validation_score(DiscOracle(size), spheres, backgrounds=3, noises=2)
    sphere = E.validation_score(SphereOracle(size), spheres, backgrounds=3, noises=2)
    assert blind["slice_profile_gap"] > 0.2 and sphere["slice_profile_gap"] < 0.08
    for key in ("density_rho_vs_real", "margin_rho_vs_real", "empty_mask_fraction", "misplaced_fraction"):
        assert sphere[key] == blind[key], key   # at the centre, where gene control draws, the same images
    assert sphere["score"] - blind["score"] == pytest.approx(blind["slice_profile_gap"] - sphere["slice_profile_gap"])


class CopyBackgroundLike(DiscOracle):
    def forward(self, background, genes, noise=None, hole=None):
        empty = torch.zeros_like(background)
        return GeneratorOutput(image=background, mask=empty, weight_maps=[empty], gene_code=genes)


class OffCentre(DiscOracle):
    """DiscOracle's nodule drawn a quarter patch to the left of the centre, in the same lung."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        disc = torch.roll(out.mask, shifts=-(background.shape[-1] // 4), dims=-1)
        image = torch.where(disc > 0, torch.roll(out.image, shifts=-(background.shape[-1] // 4), dims=-1), background)
        return out._replace(image=image, mask=disc, weight_maps=[disc])


def _gene_control_of(data, generators, tmp_path, **options):
    """The gene-control section of each named generator, as the proposed model on `data` (split all)."""
    from training.evaluation.context import Context, Model
    from training.evaluation.sections import gene_control

    options = {"bootstrap": 20, "dilation_px": 3, "batch_size": 64, "progress": False, **options}
    return {name: gene_control(Context(data, {"proposed": Model("proposed", generator, None, data.genes, name)},
                                       None, torch.device("cpu"), 0, tmp_path / name, "all", options))
            for name, generator in generators.items()}


class TissueMarker(DiscOracle):
    """Marks as its nodule the tissue its background already has in the patch's left quarter and draws
    nothing: the mask follows the genes in size (cropped to that tissue) yet lies over existing wall."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        size = background.shape[-1]
        shifted = torch.roll(out.mask, shifts=-(size // 2 - size // 8), dims=-1)     # the disc, moved left
        mask = shifted * (background > -0.3).float()
        return out._replace(image=background, mask=mask, weight_maps=[mask])


def test_placement_fails_a_mask_laid_over_existing_tissue(setup, tmp_path):
    """Backgrounds with a wall in their left quarter: the centred oracle draws in lung, near the centre; a
    generator that labels the wall as its nodule is caught by its offset and by its share on tissue."""
    import dataclasses

    data = setup["data"]
    walled = data.background_images.copy()
    walled[:, :, : data.patch_size // 4] = 0.8                # soft tissue in the window's units
    data = dataclasses.replace(data, background_images=walled)
    results = _gene_control_of(data, {"oracle": DiscOracle(data.patch_size),
                                      "marker": TissueMarker(data.patch_size)}, tmp_path, backgrounds=4, noises=2)
    oracle, marker = results["oracle"].summary, results["marker"].summary
    assert oracle["mask_offset_mm"] < 4 and oracle["mask_on_tissue_fraction"] == 0.0
    assert oracle["misplaced_fraction"] == 0.0
    assert marker["empty_mask_fraction"] == 0.0 and marker["mask_on_tissue_fraction"] == 1.0
    assert marker["mask_offset_mm"] > 15 and marker["mask_on_tissue_centred"] == 0.0
    assert marker["misplaced_fraction"] == 1.0
    real_offset = results["oracle"].metrics["real_nodule_offset_mm"]
    assert 0 <= real_offset < 4 and "on existing tissue" in "\n".join(results["marker"].markdown)
    assert 0 <= results["oracle"].summary["misplaced_fraction_real"] < 0.5


def test_misplaced_fraction_sees_a_tail_the_median_hides():
    """Two draws in three at the point and one 9 mm beside it: the median offset looks well placed, the share
    off the point does not; an empty draw (NaN) is charged by the empty rate, not here."""
    from training.evaluation.sections import MISPLACED_MM, misplaced_fraction, placement_summary

    where = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, 0.0, 0.0], [np.nan, np.nan, np.nan]])
    summary = placement_summary(where)
    assert summary["mask_offset_mm"] == 2.0 < MISPLACED_MM
    assert summary["misplaced_fraction"] == 0.25 == misplaced_fraction(where[:, 0])
    assert np.isnan(misplaced_fraction(np.array([])))


class HalfAreaOracle(DiscOracle):
    """DiscOracle's nodule at half its area (radius / √2): the same ranks, every nodule too small."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        size = background.shape[-1]
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        radius = (8.0 + 3.0 * torch.tanh(genes[:, 0])) / (60.0 / size) / 2**0.5
        disc = ((rows - (size - 1) / 2) ** 2 + (cols - (size - 1) / 2) ** 2 <= radius[:, None, None] ** 2).float()
        return out._replace(mask=disc[:, None], weight_maps=[disc[:, None]])


def test_size_calibration_sees_nodules_drawn_too_small_that_rho_does_not(setup, tmp_path):
    """Half the area: ρ with the real nodules is unchanged, the diameter ratio falls by √2."""
    data = setup["data"]
    sections = _gene_control_of(data, {"oracle": DiscOracle(data.patch_size),
                                       "half": HalfAreaOracle(data.patch_size)}, tmp_path, backgrounds=3, noises=1)
    oracle, half = (sections[name].metrics["models"]["proposed"] for name in ("oracle", "half"))
    assert half["rho"]["size"]["rho_vs_real_nodule"] == pytest.approx(oracle["rho"]["size"]["rho_vs_real_nodule"],
                                                                      abs=0.1)
    assert half["size_ratio"] / oracle["size_ratio"] == pytest.approx(2**-0.5, abs=0.06)
    assert 0 < half["size_ratio_small"] < oracle["size_ratio_small"]


class CoredOracle(DiscOracle):
    """DiscOracle with a brighter core (+0.4 in [−1, 1] units) over its inner half: a part-solid look."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        core = super().forward(background, genes, noise, hole, radius_scale=1 / 2.5).mask   # the same disc, shrunk
        return out._replace(image=out.image + 0.4 * core)


def test_core_calibration_sees_a_cored_nodule(setup, tmp_path):
    """The fixture's real nodules are flat discs (core ≈ 0 HU); a flat oracle draws ≈ 0, a cored one
    ≈ +0.4 × 750 HU = 300 HU (inner half partly core: lower)."""
    data = setup["data"]
    sections = _gene_control_of(data, {"flat": DiscOracle(data.patch_size), "cored": CoredOracle(data.patch_size)},
                                tmp_path, backgrounds=3, noises=1)
    flat, cored = (sections[name].metrics["models"]["proposed"] for name in ("flat", "cored"))
    assert abs(flat["core_contrast_real_hu"]) < 20 and abs(flat["core_contrast_hu"]) < 20
    assert 150 < cored["core_contrast_hu"] < 320
    assert sections["cored"].summary["core_contrast_hu"] == cored["core_contrast_hu"]
    assert "**The nodule's core**" in "\n".join(sections["cored"].markdown)


class SpikedOracle(DiscOracle):
    """DiscOracle with a one-pixel spike of 6 px to the right of its disc: a spicule that reaches out."""

    def forward(self, background, genes, noise=None, hole=None):
        out = super().forward(background, genes, noise, hole)
        spike = torch.zeros_like(out.mask)
        for draw, disc in enumerate(out.mask[:, 0] > 0):
            row = int(disc.sum(dim=1).argmax())                               # the disc's widest row
            column = int(disc[row].nonzero().max()) + 1                       # just right of it
            spike[draw, 0, row, column: column + 6] = 1.0
        mask = torch.maximum(out.mask, spike)
        return out._replace(mask=mask, image=torch.where(spike > 0, out.image.max(), out.image), weight_maps=[mask])


def test_long_strand_share_sees_spicules_drawn_or_not(setup, tmp_path):
    """Every draw of the spiked oracle has a long strand, none of the plain disc's; the fixture's real nodules are
    discs, so their share is ≈ 0. The share is in the summary and the report."""
    data = setup["data"]
    sections = _gene_control_of(data, {"disc": DiscOracle(data.patch_size), "spiked": SpikedOracle(data.patch_size)},
                                tmp_path, backgrounds=3, noises=1)
    disc, spiked = (sections[name].metrics["models"]["proposed"] for name in ("disc", "spiked"))
    assert disc["long_strand_fraction"] == 0.0 and spiked["long_strand_fraction"] == 1.0
    assert sections["spiked"].summary["long_strand_fraction"] == 1.0
    assert sections["spiked"].summary["long_strand_fraction_real"] < 0.1
    assert "**Spicules drawn**" in "\n".join(sections["spiked"].markdown)


class SphereOracle(DiscOracle):
    """DiscOracle that reads the slice position: its disc is a sphere's cross-section, radius × √(1 − t²)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.config.slice_position = True

    def forward(self, background, genes, noise=None, hole=None, position=None):
        if position is None:   # the centre, as the real generators take it: DiscOracle's images
            position = torch.zeros(background.shape[0])
        return super().forward(background, genes, noise, hole, radius_scale=(1 - position.clamp(-1, 1) ** 2).sqrt())


def test_slice_profile_fails_a_position_blind_model_and_passes_a_sphere(setup, tmp_path):
    """Real nodules made spheres (each slice a disc of √(1 − t²) × 10 px): a model that draws every slice alike
    misses their taper (gap ≈ 0.27), one that reads t and draws the sphere's cross-section matches it."""
    import dataclasses

    from training.evaluation.context import Context, Model
    from training.evaluation.sections import slice_profile

    data = setup["data"]
    size = data.patch_size
    rows, cols = np.mgrid[0:size, 0:size]
    distance = np.hypot(rows - (size - 1) / 2, cols - (size - 1) / 2)
    radius = 10 * np.sqrt(1 - data.nodule_position() ** 2)
    data = dataclasses.replace(data, nodule_masks=(distance[None] <= radius[:, None, None]).astype(np.uint8))
    options = {"batch_size": 64, "progress": False}
    gaps = {}
    for name, generator in (("blind", DiscOracle(size)), ("sphere", SphereOracle(size))):
        ctx = Context(data, {"proposed": Model("proposed", generator, None, data.genes, name)}, None,
                      torch.device("cpu"), 0, tmp_path / name, "all", options)
        section = slice_profile(ctx)
        gaps[name] = section.summary["slice_profile_error"]
        assert section.metrics["models"]["proposed"]["reads_position"] == (name == "sphere")
    assert gaps["blind"] > 0.2 and gaps["sphere"] < 0.08
    assert "## 3-D coherence: the slice profile" in "\n".join(section.markdown)
    table = [line.replace("\\|", "") for line in section.markdown if line.startswith("|")]
    assert {line.count("|") for line in table} == {8}   # 7 cells per row: |t| in a header must be escaped
    # realism draws a position-reading model at the real sample's places, also when it asks for more images
    # than the split has nodule slices (here 96 against 48), and the copy control takes the position too
    from training.evaluation.context import negative_controls
    from training.evaluation.sections import realism

    ctx.options.update(c2st_crop=24, c2st_samples=2 * data.num_nodules, c2st_runs=1, c2st_epochs=1)
    ctx.controls = negative_controls(ctx.models["proposed"], ctx.donors, 0)
    accuracies = realism(ctx).metrics["models"]["proposed"]["accuracies"]
    assert len(accuracies) == 1 and 0.0 <= accuracies[0] <= 1.0


class RecordingOracle(DiscOracle):
    """DiscOracle that keeps every gene row it was given, in call order."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.seen: list[torch.Tensor] = []

    def forward(self, background, genes, noise=None, hole=None, radius_scale=1.0):
        self.seen.append(genes.detach().clone())
        return super().forward(background, genes, noise, hole, radius_scale)


def test_realism_draws_each_image_with_a_real_slices_donor(setup, tmp_path):
    """The real side of the C2ST is slice-weighted (a large nodule has many slices), so the synthetic side
    takes its donors from the sampled real slices: with donors that keep 1 to 4 slices each, every donor's
    genes are drawn exactly as often as it has slices."""
    from collections import Counter
    from dataclasses import replace

    from training.evaluation.context import Context, Model
    from training.evaluation.sections import realism

    data = setup["data"]
    keep = np.concatenate([np.flatnonzero(data.nodule_patient == p)[: 1 + p % 4] for p in range(data.num_patients)])
    data = replace(data, **{name: getattr(data, name)[keep] for name in
                            ("nodule_images", "nodule_masks", "nodule_patient", "nodule_slice", "nodule_centre_ras")})
    oracle = RecordingOracle(data.patch_size)
    options = {"batch_size": 512, "progress": False, "c2st_runs": 1, "c2st_samples": data.num_nodules,
               "c2st_epochs": 1, "c2st_crop": 24}
    ctx = Context(data, {"proposed": Model("proposed", oracle, None, data.genes, "oracle")}, None,
                  torch.device("cpu"), 0, tmp_path, "all", options)
    realism(ctx)
    first = oracle.seen[0].numpy()     # the images on random backgrounds, one batch
    assert first.shape[0] == data.num_nodules
    donors = [int(np.flatnonzero((data.genes == row).all(axis=1))[0]) for row in first]
    assert Counter(donors) == Counter(data.nodule_patient.tolist())
    assert len(set(Counter(donors).values())) == 4     # the donors do differ in slice count


def test_jsonable_makes_strict_json():
    value = {"a": np.float32(1.5), "b": float("nan"), "c": np.arange(3), "d": (np.int64(2), np.inf),
             "e": Path("x.png"), "f": np.bool_(True)}
    assert json.loads(json.dumps(E.jsonable(value), allow_nan=False)) == {
        "a": 1.5, "b": None, "c": [0, 1, 2], "d": [2, None], "e": "x.png", "f": True}


def test_generate_gives_a_pixel_noise_model_the_same_maps_at_any_batch_size():
    """The evaluation's per-pixel noise is keyed by the row: batch size and the global RNG change nothing,
    while the maps do reach the generator (another row's map gives another image); the copy-background
    control of such a model takes them and still copies."""
    from RadiogenomicGANLib.networks import GeneratorConfig, build_generator
    from training.evaluation.context import Model, generate

    config = GeneratorConfig(num_genes=6, patch_size=16, code_dim=4, noise_dim=2, base_channels=4, max_channels=8,
                             gene_hidden=8, pixel_noise=True)
    generator = build_generator(config).eval()
    with torch.no_grad():
        for block in generator.blocks.values():
            block.noise_strength.fill_(2.0)
    model = Model("proposed", generator, None, np.zeros((1, 6), np.float32), "tiny")
    rng = np.random.default_rng(0)
    backgrounds = np.repeat(rng.uniform(-1, 1, (1, 16, 16)).astype(np.float32), 5, axis=0)
    genes, noise = np.zeros((5, 6), np.float32), np.zeros((5, 2), np.float32)
    whole, _ = generate(model, backgrounds, genes, noise, batch_size=5, progress=False)
    torch.manual_seed(123)
    pieces, _ = generate(model, backgrounds, genes, noise, batch_size=2, progress=False)
    np.testing.assert_allclose(whole, pieces, atol=1e-5)   # batched convolutions may round differently
    assert not np.allclose(whole[0], whole[1])   # same inputs, another row's map
    from training.evaluation.context import negative_controls

    copy = negative_controls(model, np.arange(1), 0)[0]        # the controls take the maps too
    np.testing.assert_array_equal(generate(copy, backgrounds, genes, noise, progress=False)[0], backgrounds)
