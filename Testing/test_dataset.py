"""The dataset file: validated loading with one clear error per problem, and reproducible training batches."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.dataset import (
    DatasetError,
    NoduleBatchDataset,
    epoch_permutation,
    load_dataset,
    make_synthetic_dataset,
    write_dataset,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("ds") / "synthetic.npz", patients=8, genes=16, size=32)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def test_synthetic_round_trip(synthetic: Path) -> None:
    data = load_dataset(synthetic)
    assert data.num_patients == 8 and data.num_genes == 16 and data.patch_size == 32
    assert data.nodule_images.dtype == np.float32 and data.nodule_masks.dtype == np.uint8
    assert data.nodule_images.min() >= -1.0 and data.nodule_images.max() <= 1.0
    assert set(data.split.tolist()) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        owners = set(data.nodule_patient[data.nodule_indices(name)].tolist())
        assert owners == set(data.patients_in(name).tolist())
    assert "train" in data.summary()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.pop("genes"), "missing keys: genes"),
        (lambda a: a.pop("split"), "no train/val/test split"),
        (lambda a: a.update(split=np.array(["val"] * 8)), "no train patients"),
        (lambda a: a.update(split=np.array(["train"] * 7 + ["holdout"])), "holdout"),
        (lambda a: a.update(nodule_masks=a["nodule_masks"][:-1]), "'nodule_masks' has shape"),
        (lambda a: a.update(nodule_patient=a["nodule_patient"][:-1]), "'nodule_patient' has shape"),
        (lambda a: a.update(genes=a["genes"][:, :-1]), "'genes' has 15 columns, but the gene preprocessing gives 16"),
        (lambda a: a.update(gene_stds=a["gene_stds"][:-1]), "'gene_stds' has shape"),
        (lambda a: a.update(table_genes_log=a["table_genes_log"][:-1]), "'table_genes_log' has shape"),
        (lambda a: a.update(format_version=np.int64(1)), "older training.prepare"),
        (lambda a: a.update(background_patient=a["background_patient"] + 100), "outside"),
        (lambda a: a.update(patient_ids=np.array(["A"] * 8)), "duplicates"),
        (lambda a: a.update(gene_out_of_sample_gain=np.float64(0.0)), "'gene_out_of_sample_gain' must lie in"),
    ],
)
def test_each_problem_gives_one_clear_error(synthetic: Path, tmp_path: Path, mutate, message: str) -> None:
    arrays = _arrays(synthetic)
    mutate(arrays)
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(broken)


def test_missing_file_and_not_an_npz(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.npz")
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="not a dataset file"):
        load_dataset(text)
    with pytest.raises(DatasetError, match="folder"):
        load_dataset(tmp_path)


def test_write_refuses_inconsistent_arrays(synthetic: Path, tmp_path: Path) -> None:
    arrays = _arrays(synthetic)
    arrays["nodule_images"] = arrays["nodule_images"][:, :16]
    with pytest.raises(DatasetError, match="nodule_images"):
        write_dataset(tmp_path / "bad.npz", **arrays)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_batches_follow_the_contract(synthetic: Path) -> None:
    data = load_dataset(synthetic)
    dataset = NoduleBatchDataset(data, "train", seed=3)
    batch = next(iter(DataLoader(dataset, batch_size=5, shuffle=False)))
    s, g = data.patch_size, data.num_genes
    assert batch["image"].shape == (5, 1, s, s) and batch["mask"].shape == (5, 1, s, s)
    assert batch["background"].shape == (5, 1, s, s) and batch["wrong_mask"].shape == (5, 1, s, s)
    assert batch["genes"].shape == (5, g) and batch["wrong_genes"].shape == (5, g)
    assert batch["patient"].dtype == torch.int64
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    train = set(data.patients_in("train").tolist())
    for index in range(len(dataset)):
        item = dataset[index]
        patient = int(item["patient"])
        assert patient in train
        assert not torch.equal(item["wrong_genes"], item["genes"])
        # the background comes from the same split
        matches = [
            b
            for b in data.background_indices("train")
            if np.array_equal(data.background_images[b], item["background"][0].numpy())
        ]
        assert matches


def test_slice_position_within_the_nodule_by_hand(synthetic: Path) -> None:
    """t = (k − centre) / half extent over a patient's nodule slices: four slices → ±0.25, ±0.75; slices
    10, 11, 13 (centre 11.5, half extent 2) → −0.75, −0.25, 0.75; one slice → 0. Batches carry each slice's t."""
    import dataclasses

    data = load_dataset(synthetic)
    first = data.nodule_patient == data.nodule_patient[0]
    order = np.argsort(data.nodule_slice[first])
    np.testing.assert_allclose(data.nodule_position()[first][order], [-0.75, -0.25, 0.25, 0.75])
    slices = data.nodule_slice.copy()
    rows = np.flatnonzero(first)
    slices[rows[:3]], slices[rows[3]] = [10, 11, 13], 10
    patient = data.nodule_patient.copy()
    patient[rows[3]] = -1  # the fourth slice becomes the only one of a patient of its own
    lone = dataclasses.replace(data, nodule_slice=slices, nodule_patient=patient)
    np.testing.assert_allclose(lone.nodule_position()[rows], [-0.75, -0.25, 0.75, 0.0])
    dataset = NoduleBatchDataset(data, "train", seed=3)
    for index in range(4):
        item = dataset[index]
        sample = int(dataset.nodules[index])
        assert item["position"].item() == pytest.approx(float(data.nodule_position()[sample]))


def test_pairings_are_reproducible_per_seed_and_epoch(synthetic: Path) -> None:
    data = load_dataset(synthetic)
    a, b = NoduleBatchDataset(data, seed=1), NoduleBatchDataset(data, seed=1)
    for index in (0, 3, len(a) - 1):
        for key in ("background", "wrong_genes", "wrong_mask"):
            assert torch.equal(a[index][key], b[index][key])
    draws = {tuple(a[i]["background"].flatten()[:4].tolist()) for i in range(len(a))}
    a.set_epoch(1)
    redraws = {tuple(a[i]["background"].flatten()[:4].tolist()) for i in range(len(a))}
    assert draws != redraws
    np.testing.assert_array_equal(epoch_permutation(10, 0, 2), epoch_permutation(10, 0, 2))
    assert not np.array_equal(epoch_permutation(10, 0, 2), epoch_permutation(10, 0, 3))


def test_uniform_donors_and_distant_wrong_genes(tmp_path: Path) -> None:
    """Donors are drawn uniformly (not by slice count), and ḡ comes from the farther half of the patients."""
    arrays = _arrays(make_synthetic_dataset(tmp_path / "d.npz", patients=8, genes=16, size=32))
    keep = np.ones(arrays["nodule_patient"].size, dtype=bool)
    keep[(arrays["nodule_patient"] > 0) & (arrays["nodule_slice"] > 10)] = False  # patient 0 keeps 4 slices, others 1
    for key in ("nodule_images", "nodule_masks", "nodule_patient", "nodule_slice", "nodule_centre_ras"):
        arrays[key] = arrays[key][keep]
    data = load_dataset(write_dataset(tmp_path / "skewed.npz", **arrays))
    plain = NoduleBatchDataset(data, "train", seed=0)
    uniform = NoduleBatchDataset(data, "train", seed=0, uniform_donors=True, distant_wrong_genes=True)
    plain_share = np.mean([int(plain[i]["patient"]) == 0 for i in range(len(plain))])
    draws = []
    for epoch in range(20):
        uniform.set_epoch(epoch)
        draws.extend(int(uniform[i]["patient"]) for i in range(len(uniform)))
    train_donors = np.unique(data.nodule_patient[data.nodule_indices("train")]).size
    assert plain_share == pytest.approx(4 / (4 + train_donors - 1), abs=0.01)  # slice-count weighted
    assert np.mean(np.asarray(draws) == 0) == pytest.approx(1 / train_donors, abs=0.06)
    genes = torch.from_numpy(data.genes)
    for index in range(len(uniform)):
        item = uniform[index]
        patient = int(item["patient"])
        others = [p for p in data.patients_in("train") if p != patient]
        distances = sorted(float(torch.linalg.norm(genes[p] - genes[patient])) for p in others)
        assert float(torch.linalg.norm(item["wrong_genes"] - item["genes"])) >= np.median(distances) - 1e-5


def test_square_symmetry_gives_the_eight_distinct_symmetries() -> None:
    from training.dataset import square_symmetry

    patch = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    turned = [square_symmetry(patch, which) for which in range(8)]
    assert torch.equal(turned[0], patch)
    assert len({tuple(t.flatten().tolist()) for t in turned}) == 8
    assert all(sorted(t.flatten().tolist()) == list(range(16)) for t in turned)  # a permutation of the pixels


def test_augment_turns_image_and_mask_together_and_keeps_the_draws(tmp_path: Path) -> None:
    """With `augment` every item is a symmetry of the un-augmented item (same donor, background, ḡ, m̄ draws);
    the nodule's image and mask turn together; over the epoch the patches really are turned."""
    from training.dataset import square_symmetry

    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=6, genes=8, size=16))
    plain = NoduleBatchDataset(data, "train", seed=2, uniform_donors=True)
    augmented = NoduleBatchDataset(data, "train", seed=2, uniform_donors=True, augment=True)
    changed = 0
    for index in range(len(plain)):
        a, b = plain[index], augmented[index]
        assert torch.equal(a["genes"], b["genes"]) and torch.equal(a["wrong_genes"], b["wrong_genes"])
        matches = [w for w in range(8) if torch.equal(square_symmetry(a["image"], w), b["image"])
                   and torch.equal(square_symmetry(a["mask"], w), b["mask"])]
        assert matches, "the nodule image and its mask must be turned by one and the same symmetry"
        assert any(torch.equal(square_symmetry(a["background"], w), b["background"]) for w in range(8))
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= len(plain) // 2


def test_phenotype_targets_are_the_donors_real_nodules_z_scored(tmp_path: Path) -> None:
    """`phenotype` is the donor's real nodule (diameter, mean HU) z-scored over the split's donors: the same
    value for every slice of a donor, the larger nodule the larger value, mean 0 and sd 1 over the donors."""
    from training.conventional import real_nodule_features

    data = load_dataset(make_synthetic_dataset(tmp_path / "d.npz", patients=8, genes=8, size=32))
    names = ("diameter_mm", "mean_hu")
    items = NoduleBatchDataset(data, "train", seed=0, phenotype_features=names)
    assert "phenotype" not in NoduleBatchDataset(data, "train", seed=0)[0]
    donors = np.unique(data.nodule_patient[data.nodule_indices("train")])
    by_donor: dict[int, torch.Tensor] = {}
    for index in range(len(items)):
        item = items[index]
        patient = int(item["patient"])
        assert item["phenotype"].shape == (2,) and item["phenotype"].dtype == torch.float32
        assert torch.equal(by_donor.setdefault(patient, item["phenotype"]), item["phenotype"])
    assert set(by_donor) == set(donors.tolist())
    table = np.stack([by_donor[int(p)].numpy() for p in donors])
    np.testing.assert_allclose(table.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(table.std(axis=0), 1, atol=1e-4)
    measured = real_nodule_features(data, donors, names)
    assert np.all(np.argsort(table[:, 0], kind="stable") == np.argsort(measured[:, 0], kind="stable"))


def test_a_refitted_projection_prepares_its_own_patients_in_sample_and_the_others_with_the_gain(
        tmp_path: Path) -> None:
    """`--gene-components`: the training patients keep their whitened in-sample scores (what the generator
    learns from); val and test patients, like any patient at inference, get the out-of-sample gain. The
    dataset written from it keeps the gain and the training patients' scores."""
    from training.config import TrainConfig
    from training.dataset import training_data

    path = make_synthetic_dataset(tmp_path / "wide.npz", patients=12, genes=300, size=16)
    data = training_data(TrainConfig(data=str(path), gene_components=4))
    train, held_out = data.patients_in("train"), data.patients_in(["val", "test"])
    preprocessing = data.gene_preprocessing
    assert preprocessing.out_of_sample_gain > 1.0 == load_dataset(path).gene_out_of_sample_gain
    np.testing.assert_allclose(data.genes[train].std(axis=0, ddof=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(data.genes[held_out], data.genes_for(preprocessing)[held_out], rtol=1e-5)
    # the run's own preprocessing (what its weights carry) recognises the training patients: prepared again,
    # e.g. by the evaluation, they get the scores the generator learnt, not those times the gain
    np.testing.assert_allclose(data.genes_for(preprocessing)[train], data.genes[train], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(preprocessing.transform_log(data.table_genes_log[train][:, [
        list(data.table_gene_names).index(g) for g in preprocessing.gene_names]], in_sample=False),
        data.genes[train] * preprocessing.out_of_sample_gain, rtol=1e-4, atol=1e-5)
    copy = load_dataset(write_dataset(tmp_path / "copy.npz", **data.arrays()))
    assert copy.gene_out_of_sample_gain == preprocessing.out_of_sample_gain
    np.testing.assert_array_equal(copy.gene_preprocessing.fitted_scores, preprocessing.fitted_scores)
    np.testing.assert_array_equal(copy.genes, data.genes)
    off = training_data(TrainConfig(data=str(path), gene_components=4, gene_out_of_sample_gain=False))
    np.testing.assert_allclose(off.genes[held_out] * preprocessing.out_of_sample_gain, data.genes[held_out],
                               rtol=1e-4, atol=1e-5)
