"""The bundled demo model: present, intact (SHA-256 file), loadable, and it draws nodules inside the lung."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from RadiogenomicGANLib.demo import cohort_genes
from RadiogenomicGANLib.genes import GeneTable, profile_for_model
from RadiogenomicGANLib.insertion import NoduleInserter
from RadiogenomicGANLib.phantom import generate_patient
from RadiogenomicGANLib.weights import load_weights

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
WEIGHTS = RESOURCES / "demo_model.safetensors"


def test_sha256_file_matches_the_bundled_files() -> None:
    listed = dict(line.split()[::-1] for line in (RESOURCES / "demo_model.sha256").read_text().splitlines())
    assert set(listed) == {"demo_model.safetensors", "demo_model.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((RESOURCES / name).read_bytes()).hexdigest() == digest, name


def test_loads_as_the_proposed_model_with_its_provenance() -> None:
    generator, metadata = load_weights(WEIGHTS, expected_kind="proposed")
    assert metadata.config.patch_size == 64 and metadata.genes.output_dim == metadata.config.num_genes
    assert WEIGHTS.stat().st_size < 20 * 2**20
    # trained on a phantom cohort of biology 1, chosen on the validation split (never on the test split)
    assert {"phantom_seed", "phantom_biology", "command", "seed", "selected_step"} <= set(metadata.provenance)
    assert metadata.provenance["selected_by"] == "validation score (val split)"
    # trained, not a fresh initialisation shipped by mistake: most parameter tensors moved away from it
    import torch

    from RadiogenomicGANLib.networks import build_generator

    torch.manual_seed(0)
    fresh = build_generator(metadata.config).state_dict()
    trained = generator.state_dict()
    assert fresh.keys() == trained.keys()
    moved = [k for k, v in trained.items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert len(moved) > 0.9 * sum(v.is_floating_point() for v in trained.values())


def test_draws_nodules_inside_the_lung() -> None:
    """A trained model (a random one keeps its mask empty) draws nodule-sized labels for phantom donors of a
    cohort seed it never saw (one biology: any seed's table has its genes), only on the requested slices and
    inside the lung, and their size follows the donor's genes."""
    inserter = NoduleInserter.from_weights(WEIGHTS, device="cpu")
    meta = inserter.metadata
    unseen_seed = int(meta.provenance["phantom_seed"]) + 5
    names, ids, fpkm, _ = cohort_genes(unseen_seed, 6, int(meta.provenance.get("phantom_genes", 5172)))
    table = GeneTable(gene_names=names, sample_ids=ids, values=fpkm)
    patient = generate_patient(3, seed=7, size_ij=256, n_genes=50)  # a realistic ~1.4 mm in-plane grid
    lung = inserter.lung_mask(patient.volume_hu, patient.geometry)
    areas = []
    for sample in ids:
        profile = profile_for_model(table, sample, meta.genes)
        result = inserter.insert(patient.volume_hu, patient.geometry, profile, auto_count=1, half_slices=2, seed=1,
                                 lung_mask=lung)
        label = result.label > 0
        requested = np.zeros(label.shape[0], dtype=bool)
        requested[result.slices[0]] = True
        assert not label[~requested].any() and lung[label].all()
        assert not (result.volume_hu != patient.volume_hu)[~requested].any()
        spacing = patient.geometry.spacing
        areas.append(label.reshape(label.shape[0], -1).sum(axis=1).max() * spacing[0] * spacing[1])
    assert 20.0 < max(areas) < 2000.0, f"largest cross-sections {areas} mm² are not nodule-sized"
    assert max(areas) > 2 * min(areas), f"the donors' genes do not change the nodule size: {areas}"


def _exported_and_as_trained(option: str, background: Any, *needing_it: str) -> dict[str, Any]:
    """The bundled model's outputs on `background` (B, 1, S, S) as exported and with the composition `option` it was
    exported with switched off, with the options `needing_it` that it must come with — the same tensors, genes and
    noise — after checking that each was set at the export, not in training."""
    import torch

    from RadiogenomicGANLib.networks import with_composition

    exported, metadata = load_weights(WEIGHTS)
    switched = (option, *needing_it)
    for name in switched:
        assert getattr(metadata.config, name) and not metadata.provenance["train_config"]["generator"].get(name, False)
    generator = torch.Generator().manual_seed(0)
    genes = torch.randn(background.shape[0], metadata.config.num_genes, generator=generator)
    noise = torch.randn(background.shape[0], metadata.config.noise_dim, generator=generator)
    outputs = {}
    off = with_composition(exported, **dict.fromkeys(switched, False))
    for name, model in (("exported", exported), ("as trained", off)):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs[name] = model.eval()(background, genes, noise)
    return outputs


def test_its_nodules_cover_the_background_they_are_laid_on() -> None:
    """Exported composed over the background (round 34): on a lung with vessel-sized stripes the bundled nodules
    do not show the stripes inside them (the evaluation's `interior_leak` ≈ 0), where the same tensors composed
    as trained — the blurred change added to the background — show most of them."""
    import math

    import torch

    from training.evaluation.sections import interior_leak

    size = load_weights(WEIGHTS)[1].config.patch_size
    stripes = 0.25 * torch.sin(torch.arange(float(size)) * 2 * math.pi / 4.0)
    background = (torch.full((8, 1, size, size), -0.75) + stripes).contiguous()
    leak = {}
    for name, out in _exported_and_as_trained("edge_over_background", background).items():
        assert (out.mask > 0.5).flatten(1).sum(1).min() > 50     # a nodule to look inside, in every patch
        leak[name] = float(np.nanmedian(interior_leak(out.image[:, 0].numpy(), out.mask[:, 0].numpy(),
                                                      background[:, 0].numpy())))
    assert leak["exported"] < 0.2 and leak["as trained"] > 0.5, leak


def test_its_strands_stand_out_from_the_lung_as_the_real_ones_do() -> None:
    """Exported with the strands painted at the training donors' real strands' lift over the lung (round 35): on
    a flat lung the bundled nodules' long strands read a contrast near the real strands' (295 HU on the cohort it
    trained on), where the same tensors drawing them as trained (unpainted, so uncapped) leave them faint (< 100 HU)."""
    import torch

    from RadiogenomicGANLib.intensity import unit_to_hu
    from training.metrics import strand_contrast_hu

    metadata = load_weights(WEIGHTS)[1]
    size, count = metadata.config.patch_size, 256           # about one draw in twelve carries a long strand
    background = torch.full((count, 1, size, size), -0.75)  # ≈ −810 HU
    contrast = {}
    for name, out in _exported_and_as_trained("spicule_contrast", background, "spicule_cap").items():
        hu = unit_to_hu(out.image[:, 0].numpy(), tuple(metadata.hu_window))
        read = np.array([strand_contrast_hu(h, m) for h, m in zip(hu, out.mask[:, 0].numpy() > 0.5)])
        assert np.isfinite(read).sum() >= 10, name             # strands to read
        contrast[name] = float(np.nanmedian(read))
    assert 200.0 < contrast["exported"] < 400.0 and contrast["as trained"] < 100.0, contrast


def test_its_label_holds_no_thin_piece_of_its_own_outline(monkeypatch: Any) -> None:
    """Exported with its own mask opened after the lobes (round 36): every long strand in the bundled labels holds
    a drawn strand, where the same tensors composed as trained label thin pieces of the lobed outline, lung in the
    image, which the evaluation reads as strands."""
    import torch
    from scipy import ndimage

    from RadiogenomicGANLib.networks import CodeDrivenSpicules
    from training.metrics import long_strands

    drawn_forward = CodeDrivenSpicules.forward
    own_pieces: list[int] = []     # per call: the exported model's, then the as-trained one's

    def counting(self: CodeDrivenSpicules, *args: Any, **kwargs: Any) -> tuple:
        image, joined, strand = drawn_forward(self, *args, **kwargs)
        count = 0
        for label, drawn in zip(joined[:, 0].numpy() > 0.5, strand[:, 0].numpy() >= 0.5, strict=True):
            pieces, found = ndimage.label(long_strands(label), structure=np.ones((3, 3), dtype=bool))
            count += int((np.bincount(pieces[drawn], minlength=found + 1)[1:] == 0).sum())
        own_pieces.append(count)
        return image, joined, strand

    monkeypatch.setattr(CodeDrivenSpicules, "forward", counting)
    size = load_weights(WEIGHTS)[1].config.patch_size
    _exported_and_as_trained("open_own_mask", torch.full((512, 1, size, size), -0.75))   # a flat lung, ≈ −810 HU
    exported, as_trained = own_pieces
    assert exported == 0 and as_trained > 0, own_pieces


def test_its_strands_merge_with_the_vessels_they_cross() -> None:
    """Exported with the painted strands capped at max(background, 0 HU) (round 38): on a lung crossed by 40 HU
    vessels the bundled nodules' strands stand over the tissue they cross far less than the same tensors painted
    without the cap, which lift them 414 HU over it; over the lung the two read alike."""
    import torch

    from RadiogenomicGANLib.intensity import hu_to_unit, unit_to_hu
    from training.metrics import strand_contrast_split_hu

    metadata = load_weights(WEIGHTS)[1]
    size, count, window = metadata.config.patch_size, 256, tuple(metadata.hu_window)
    lung = np.full((size, size), -810.0)
    for column in range(3, size, 10):
        lung[:, column : column + 3] = 40.0      # a vessel 3 px wide every 10 px
    background = torch.from_numpy(np.asarray(hu_to_unit(lung, window), dtype=np.float32)).expand(count, 1, size, size)
    read = {}
    for name, out in _exported_and_as_trained("spicule_cap", background.contiguous()).items():
        hu = unit_to_hu(out.image[:, 0].numpy(), window)
        split = np.array([strand_contrast_split_hu(h, m) for h, m in zip(hu, out.mask[:, 0].numpy() > 0.5)])
        assert np.isfinite(split).sum(axis=0).min() >= 5, name     # strands over both to read
        read[name] = np.nanmedian(split, axis=0)
    assert read["exported"][1] < 150.0 and read["as trained"][1] > 300.0, read
    assert abs(read["exported"][0] - read["as trained"][0]) < 20.0, read
