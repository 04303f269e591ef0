"""The insertion pipeline on a small in-memory phantom with a tiny, randomly initialised generator.

What a user relies on: the input is never touched, nothing outside the patch footprints changes, the label
lies on the requested slices inside the lung, batching does not change the result, a seed reproduces it,
and every bad input is refused with a clear message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_insertion_support import NUM_GENES, DiscMaskGenerator, make_generator, make_metadata, small_config

from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.insertion import InsertionCancelled, InsertionError, NoduleInserter, check_hu_volume
from RadiogenomicGANLib.networks import GeneratorOutput, build_generator
from RadiogenomicGANLib.patches import patch_frame

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom():  # type: ignore[no-untyped-def]
    from RadiogenomicGANLib.phantom.patient import generate_patient

    return generate_patient(0, 7, size_ij=128, slices=24, spacing=(2.5, 4.0), n_genes=64)


@pytest.fixture(scope="module")
def inserter() -> NoduleInserter:
    generator = DiscMaskGenerator(make_generator())
    return NoduleInserter(generator, make_metadata(generator.config), device="cpu")


@pytest.fixture(scope="module")
def genes() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(NUM_GENES).astype(np.float32)


def _lung_centre(phantom, offset_mm=(0.0, 0.0, 0.0)) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A point deep in the phantom's lung: the voxel farthest from the lung boundary."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(phantom.lung_mask, sampling=phantom.geometry.spacing_kji)
    distance[:4] = distance[-4:] = 0
    kji = np.unravel_index(np.argmax(distance), distance.shape)
    return phantom.geometry.kji_to_ras([kji])[0] + np.asarray(offset_mm)


def _footprints(inserter: NoduleInserter, phantom, result) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Boolean volume of every patch footprint box of the run."""
    inside = np.zeros(phantom.volume_hu.shape, dtype=bool)
    for centre, ks in zip(result.centres_ras, result.slices):
        for k in ks:
            frame = patch_frame(phantom.geometry, centre, k, inserter.metadata.patch_size,
                                inserter.metadata.patch_spacing_mm)
            box = frame.footprint_ji(phantom.volume_hu.shape[1:])
            inside[k][box] = True
    return inside


def test_inputs_unchanged_and_changes_confined(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    volume_before = phantom.volume_hu.copy()
    lung_before = phantom.lung_mask.copy()
    genes_before = genes.copy()
    centre = _lung_centre(phantom)
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=1,
                             lung_mask=phantom.lung_mask, return_weight_map=True, seed=3)
    assert np.array_equal(phantom.volume_hu, volume_before) and phantom.volume_hu.dtype == volume_before.dtype
    assert np.array_equal(phantom.lung_mask, lung_before) and np.array_equal(genes, genes_before)
    assert result.volume_hu.dtype == np.int16 and result.volume_hu.shape == volume_before.shape
    assert result.volume_hu is not phantom.volume_hu

    changed = result.volume_hu != volume_before
    footprint = _footprints(inserter, phantom, result)
    assert changed.any(), "the nodule should change some voxels"
    assert not (changed & ~footprint).any(), "a voxel outside the patch footprints changed"
    k_centre = int(np.rint(phantom.geometry.ras_to_kji([centre])[0, 0]))
    assert result.slices == [[k_centre - 1, k_centre, k_centre + 1]]
    assert set(np.flatnonzero(changed.any(axis=(1, 2)))) <= set(result.slices[0])

    label = result.label
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert set(np.flatnonzero(label.any(axis=(1, 2)))) == set(result.slices[0])
    assert not (label.astype(bool) & ~phantom.lung_mask).any(), "label outside the lung"
    # the disc of radius 6 px at 0.9375 mm/px ≈ 5.6 mm: about π·5.6² / 2.5² ≈ 16 voxels per slice
    assert 8 <= (label[k_centre] == 1).sum() <= 30
    # the nodule was painted where it is labelled: soft tissue in the lung
    assert result.volume_hu[label == 1].mean() > -300
    assert result.weight_map is not None and result.weight_map.dtype == np.float32
    assert not (result.weight_map.astype(bool) & ~footprint).any()
    assert result.weight_map.min() >= 0.0 and result.weight_map.max() <= 1.0


def test_anatomy_outside_the_nodule_and_the_lung_is_kept(phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """A generator that redraws its whole patch (here: a flat −300 HU smear around its disc) may change only
    the lung within a few millimetres of its nodule: chest wall, mediastinum and far vessels stay as they were."""

    class Smear(DiscMaskGenerator):
        def forward(self, background, genes, noise=None, hole=None):  # type: ignore[no-untyped-def]
            out = super().forward(background, genes, noise, hole)
            smear = torch.full_like(out.image, (-300.0 + 1000.0) / 750.0 - 1.0)  # −300 HU in the window
            return GeneratorOutput(smear * (1 - out.mask) + out.image * out.mask, out.mask, out.weight_maps,
                                   out.gene_code)

    generator = Smear(make_generator(), radius_px=6.0)
    inserter = NoduleInserter(generator, make_metadata(generator.config), device="cpu")
    from scipy import ndimage

    lung = phantom.lung_mask
    distance = ndimage.distance_transform_edt(lung, sampling=phantom.geometry.spacing_kji)
    distance[:4] = distance[-4:] = 0
    # a centre 10–14 mm from the pleura, so the 60 mm patch holds chest wall
    k, j, i = np.argwhere((distance > 10) & (distance < 14))[0]
    centre = phantom.geometry.kji_to_ras([[k, j, i]])[0]
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], slices=[[int(k)]],
                             lung_mask=lung, seed=0)
    changed = result.volume_hu != phantom.volume_hu
    assert changed.any()
    assert not (changed & ~lung).any(), "a voxel outside the lung changed"
    centre_kji = phantom.geometry.ras_to_kji([centre])[0]
    rows, cols = np.nonzero(changed[int(k)])
    spacing = np.asarray(phantom.geometry.spacing_kji)
    reach_mm = np.hypot((rows - centre_kji[1]) * spacing[1], (cols - centre_kji[2]) * spacing[2]).max()
    # disc 6 px + 2 px dilation + 3 px fall-off at 0.9375 mm/px ≈ 10.3 mm, plus one voxel of resampling
    assert reach_mm <= 10.3 + float(spacing[1:].max()) + 0.5


def test_a_nodule_is_a_solid_not_a_cylinder(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """The generator draws the same 6 px disc on every slice; the inserted nodule's cross-section still shrinks
    away from its centre and ends where its radius (≈ 5.6 mm) says, whatever range of slices was chosen."""
    centre = _lung_centre(phantom)
    k_centre = int(np.rint(phantom.geometry.ras_to_kji([centre])[0, 0]))
    solid = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=3,
                            lung_mask=phantom.lung_mask, seed=0)
    area = {k: int((solid.label[k] > 0).sum()) for k in solid.slices[0]}
    offset_mm = {k: abs(k - phantom.geometry.ras_to_kji([centre])[0, 0]) * phantom.geometry.spacing_kji[0]
                 for k in area}
    radius_mm = 6 * 60 / 64
    assert area[k_centre] == max(area.values()) > 0
    assert all(area[k] == 0 for k in area if offset_mm[k] >= radius_mm + 0.5)  # it ends where its size says
    inside = sorted((offset_mm[k], area[k]) for k in area if offset_mm[k] < radius_mm - 0.5)
    assert [a for _, a in inside] == sorted((a for _, a in inside), reverse=True)  # shrinks away from the centre
    assert any(0 < a < area[k_centre] for _, a in inside[1:])
    assert solid.provenance["shape_3d"] == "sphere profile"
    # the paper's independent slices: the same disc on every chosen slice — a cylinder
    cylinder = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=3,
                               lung_mask=phantom.lung_mask, seed=0, shape_3d=False)
    flat = [int((cylinder.label[k] > 0).sum()) for k in cylinder.slices[0]]
    assert min(flat) > 0.8 * max(flat)


def test_fitted_slices_by_hand() -> None:
    from RadiogenomicGANLib.insertion import fitted_slices

    # |k − 10.3| · 2 mm < 5 mm: k = 7.8 … 12.8
    assert fitted_slices(10.3, 5.0, 2.0, 40) == [8, 9, 10, 11, 12]
    assert fitted_slices(10.3, 0.0, 2.0, 40) == [10]           # drawn empty: its centre slice only
    assert fitted_slices(1.0, 5.0, 2.0, 40) == [0, 1, 2, 3]    # within the volume
    assert fitted_slices(10.0, 4.0, 2.0, 40) == [9, 10, 11]    # a slice exactly R away has no cross-section


def test_slices_fitted_to_the_nodule_hold_all_of_it(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """half_slices=None: the nodule gets every slice its size spans — its label tapers to both ends and
    stops where its radius says — where ±0 cuts the same nodule flat at its centre slice."""
    from RadiogenomicGANLib.insertion import fitted_slices

    centre = _lung_centre(phantom)
    k_float = phantom.geometry.ras_to_kji([centre])[0, 0]
    spacing_k = float(phantom.geometry.spacing_kji[0])
    fitted = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=None,
                             lung_mask=phantom.lung_mask, seed=0)
    radius_mm = 6 * 60 / 64   # DiscMaskGenerator's disc
    expected = fitted_slices(k_float, radius_mm, spacing_k, phantom.volume_hu.shape[0])
    assert fitted.slices[0] == expected and len(expected) >= 3
    area = [int((fitted.label[k] > 0).sum()) for k in expected]
    assert all(a > 0 for a in area) and area[0] < max(area) and area[-1] < max(area)
    labelled = np.flatnonzero((fitted.label > 0).any(axis=(1, 2)))
    assert labelled.tolist() == expected
    assert fitted.provenance["slices_fitted_to_size"] == [True]
    # the same nodule on ±0: one slice — and an explicit list beside a fitted nodule keeps its own slices
    flat = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=0,
                           lung_mask=phantom.lung_mask, seed=0)
    assert np.flatnonzero((flat.label > 0).any(axis=(1, 2))).tolist() == [int(np.rint(k_float))]
    other = _lung_centre(phantom, (0.0, 12.0, 0.0))
    mixed = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre, other],
                            slices=[None, [int(np.rint(k_float))]], lung_mask=phantom.lung_mask, seed=0)
    assert mixed.slices == [expected, [int(np.rint(k_float))]]
    assert mixed.provenance["slices_fitted_to_size"] == [True, False]
    automatic = inserter.insert(phantom.volume_hu, phantom.geometry, genes, auto_count=2, half_slices=None,
                                lung_mask=phantom.lung_mask, seed=4)
    margin = int(np.ceil(10.0 / spacing_k))   # FIT_MARGIN_MM from either end of the volume
    centre_k = np.rint(phantom.geometry.ras_to_kji(automatic.centres_ras)[:, 0])
    assert ((centre_k >= margin) & (centre_k < phantom.volume_hu.shape[0] - margin)).all()
    assert all(len(ks) in (len(expected) - 1, len(expected), len(expected) + 1) for ks in automatic.slices)


class PositionDiscGenerator(DiscMaskGenerator):
    """A `slice_position` generator whose disc is a sphere's cross-section, r₀·√(1 − t²); records every t."""

    def __init__(self) -> None:
        import dataclasses

        from test_insertion_support import small_config

        from RadiogenomicGANLib.networks import build_generator

        torch.manual_seed(0)
        inner = build_generator(dataclasses.replace(small_config(), slice_position=True)).eval()
        super().__init__(inner)
        self.seen_positions: list[np.ndarray] = []

    def forward(self, background, genes, noise=None, hole=None, position=None) -> GeneratorOutput:  # type: ignore[no-untyped-def]
        self.seen_positions.append(position.numpy().copy())
        out = super().forward(background, genes, noise, hole)
        size = background.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        distance = (((yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2) ** 0.5)[None, None]
        radius = (self.radius_px * (1 - position.clamp(-1, 1) ** 2).sqrt())[:, None, None, None]
        disc = (distance <= radius).to(background)
        return out._replace(mask=disc)


def test_a_slice_position_model_is_told_where_each_slice_lies(phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """The centre slice is drawn first at t = 0; its radius R sets t = offset / R for every chosen slice, so
    the model's own cross-section shrinks towards the ends and slices beyond R get t = ±1 (nothing drawn)."""
    generator = PositionDiscGenerator()
    inserter = NoduleInserter(generator, make_metadata(generator.config), device="cpu")
    centre = _lung_centre(phantom)
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=3,
                             lung_mask=phantom.lung_mask, seed=0, shape_3d=False)
    first, given = generator.seen_positions[0], generator.seen_positions[-1]
    assert first.tolist() == [0.0]
    radius_mm = np.sqrt((generator(torch.zeros(1, 1, 64, 64), torch.zeros(1, NUM_GENES), torch.zeros(1, 4),
                                   position=torch.zeros(1)).mask > 0.5).sum().item() / np.pi) * 60 / 64
    offsets_mm = (np.array(result.slices[0]) - phantom.geometry.ras_to_kji([centre])[0, 0]) \
        * phantom.geometry.spacing_kji[0]
    np.testing.assert_allclose(given, np.clip(offsets_mm / radius_mm, -1, 1), rtol=1e-5)
    area = [int((result.label[k] > 0).sum()) for k in result.slices[0]]
    assert area[3] == max(area) and area[0] == area[-1] == 0 and 0 < area[2] < area[3]   # not a cylinder
    assert "slice position" in result.provenance["shape_3d"]
    # slices fitted to its size: the same R (drawn at t = 0) picks them, and none lies beyond it
    generator.seen_positions.clear()
    fitted = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=None,
                             lung_mask=phantom.lung_mask, seed=0, shape_3d=False)
    assert generator.seen_positions[0].tolist() == [0.0]
    assert len(generator.seen_positions) == 2   # the centre once (it fits the slices and sets t), then every slice
    assert [k for k, t in zip(result.slices[0], given) if abs(t) < 1] == fitted.slices[0]


def test_no_seam_at_the_footprint_border(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """The composite is feathered to zero inside the patch: its outer rim of voxels is unchanged."""
    centre = _lung_centre(phantom)
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=0,
                             lung_mask=phantom.lung_mask)
    k = result.slices[0][0]
    frame = patch_frame(phantom.geometry, centre, k, 64, 60 / 64)
    box = frame.footprint_ji(phantom.volume_hu.shape[1:])
    before, after = phantom.volume_hu[k][box], result.volume_hu[k][box]
    rim = np.ones(before.shape, dtype=bool)
    rim[3:-3, 3:-3] = False
    assert np.array_equal(before[rim], after[rim])


def test_batched_equals_per_slice_and_seed_reproduces(phantom, genes) -> None:  # type: ignore[no-untyped-def]
    generator = DiscMaskGenerator(make_generator(seed=1))
    metadata = make_metadata(generator.config)
    batched = NoduleInserter(generator, metadata, "cpu", batch_size=64)
    single = NoduleInserter(generator, metadata, "cpu", batch_size=1)
    centres = [_lung_centre(phantom), _lung_centre(phantom, (0.0, 0.0, 8.0))]
    kwargs = dict(slices=[[10, 11, 12], [12, 13]], lung_mask=phantom.lung_mask, seed=5, return_weight_map=True)
    a = batched.insert(phantom.volume_hu, phantom.geometry, genes, centres, **kwargs)
    b = single.insert(phantom.volume_hu, phantom.geometry, genes, centres, **kwargs)
    assert np.abs(a.volume_hu.astype(np.int32) - b.volume_hu).max() <= 1
    assert np.array_equal(a.label, b.label)
    np.testing.assert_allclose(a.weight_map, b.weight_map, atol=1e-5)
    again = batched.insert(phantom.volume_hu, phantom.geometry, genes, centres, **kwargs)
    assert np.array_equal(a.volume_hu, again.volume_hu) and np.array_equal(a.label, again.label)
    other = batched.insert(phantom.volume_hu, phantom.geometry, genes, centres, **{**kwargs, "seed": 6})
    assert not np.array_equal(a.volume_hu, other.volume_hu)


def test_one_noise_vector_per_nodule(phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """All slices of a nodule share its noise (a coherent nodule); different nodules get different noise."""
    generator = DiscMaskGenerator(make_generator())
    inserter = NoduleInserter(generator, make_metadata(generator.config), "cpu")
    centres = [_lung_centre(phantom), _lung_centre(phantom, (0.0, 0.0, 8.0))]
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, centres, half_slices=1,
                             lung_mask=phantom.lung_mask, seed=11)
    noise = torch.cat(generator.seen_noise)
    nodule = result.patches["nodule"]
    assert len(noise) == len(nodule) == 6
    for n in (0, 1):
        rows = noise[torch.as_tensor(nodule == n)]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    assert not torch.equal(noise[nodule == 0][0], noise[nodule == 1][0])
    assert set(np.unique(result.label)) == {0, 1, 2}


def test_flipped_storage_gives_the_same_nodule(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """The same anatomy stored with i running the other way (and its geometry saying so) gets the same nodule."""
    volume = phantom.volume_hu
    origin, spacing, direction = phantom.geometry.to_lps()
    direction = direction @ np.diag([-1.0, 1.0, 1.0])
    origin = origin + (volume.shape[2] - 1) * spacing[0] * phantom.geometry.to_lps()[2][:, 0]
    flipped_geometry = VolumeGeometry.from_lps(origin, spacing, direction)
    flipped = volume[:, :, ::-1].copy()
    centre = _lung_centre(phantom)
    kwargs = dict(half_slices=1, seed=2, allow_outside_lung=True)
    a = inserter.insert(volume, phantom.geometry, genes, [centre], lung_mask=phantom.lung_mask, **kwargs)
    b = inserter.insert(flipped, flipped_geometry, genes, [centre], lung_mask=phantom.lung_mask[:, :, ::-1], **kwargs)
    assert np.abs(a.volume_hu.astype(np.int32) - b.volume_hu[:, :, ::-1]).max() <= 1
    assert np.array_equal(a.label, b.label[:, :, ::-1])


def test_automatic_placement(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    from RadiogenomicGANLib.lungmask import boundary_distance_mm

    kwargs = dict(auto_count=2, half_slices=2, seed=4, lung_mask=phantom.lung_mask)
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, **kwargs)
    assert result.centres_ras.shape == (2, 3) and result.provenance["placement"] == "automatic"
    distance = boundary_distance_mm(phantom.lung_mask, phantom.geometry.spacing_kji)
    kji = np.rint(phantom.geometry.ras_to_kji(result.centres_ras)).astype(int)
    for k, j, i in kji:
        assert phantom.lung_mask[k, j, i]
        assert 5.0 - 2.5 <= distance[k, j, i] <= 25.0 + 2.5  # ± one voxel
    for ks in result.slices:
        assert len(ks) == 5 and ks[0] >= 0 and ks[-1] < phantom.volume_hu.shape[0]
    again = inserter.insert(phantom.volume_hu, phantom.geometry, genes, **kwargs)
    np.testing.assert_array_equal(result.centres_ras, again.centres_ras)


def test_lung_mask_computed_once_per_volume(phantom, genes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import RadiogenomicGANLib.lungmask as lungmask

    calls = []
    real = lungmask.compute_lung_mask

    def counting(volume, spacing):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(volume, spacing)

    monkeypatch.setattr(lungmask, "compute_lung_mask", counting)
    generator = DiscMaskGenerator(make_generator())
    inserter = NoduleInserter(generator, make_metadata(generator.config), "cpu")
    centre = _lung_centre(phantom)
    for seed in (0, 1):
        inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=0, seed=seed)
    assert len(calls) == 1
    edited = phantom.volume_hu.copy()
    edited[0, 0, 0] += 1
    inserter.insert(edited, phantom.geometry, genes, [centre], half_slices=0)
    assert len(calls) == 2


def test_progress_and_cancel(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    seen: list[float] = []
    inserter.insert(phantom.volume_hu, phantom.geometry, genes, [_lung_centre(phantom)], half_slices=0,
                    lung_mask=phantom.lung_mask, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0
    with pytest.raises(InsertionCancelled):
        inserter.insert(phantom.volume_hu, phantom.geometry, genes, [_lung_centre(phantom)], half_slices=0,
                        lung_mask=phantom.lung_mask, progress=lambda f, m: f < 0.5)


def test_provenance(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    import json

    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [_lung_centre(phantom)], half_slices=0,
                             lung_mask=phantom.lung_mask, seed=9, gene_sample="R01-001")
    provenance = result.provenance
    assert provenance["model_kind"] == "proposed" and provenance["seed"] == 9
    assert provenance["gene_sample"] == "R01-001" and provenance["synthetic"] is True
    assert provenance["slices"] == result.slices and len(provenance["centres_ras"]) == 1
    json.dumps(provenance)  # serialisable, so it can travel in file headers and MRML attributes


def test_inpainting_baseline_runs(phantom) -> None:  # type: ignore[no-untyped-def]
    generator = make_generator("inpainting")
    inserter = NoduleInserter(generator, make_metadata(generator.config), "cpu")
    result = inserter.insert(phantom.volume_hu, phantom.geometry, None, [_lung_centre(phantom)], half_slices=0,
                             lung_mask=phantom.lung_mask)
    assert result.volume_hu.shape == phantom.volume_hu.shape


# --- refusals -------------------------------------------------------------------------------------------
def test_hu_plausibility_rule(phantom) -> None:  # type: ignore[no-untyped-def]
    check_hu_volume(phantom.volume_hu)
    check_hu_volume(phantom.volume_hu.astype(np.float32))
    for bad, message in [
        (np.zeros((40, 40), np.int16), "2D"),
        (((phantom.volume_hu.astype(np.float32) + 1024) / 16).clip(0, 255).astype(np.uint8), "Hounsfield"),
        ((phantom.volume_hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16), "Hounsfield"),
        ((phantom.volume_hu.astype(np.float32) + 1000) / 1500, "Hounsfield"),
        (np.full((4, 32, 32), np.nan, np.float32), "NaN"),
    ]:
        with pytest.raises(InsertionError, match=message):
            check_hu_volume(bad)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("2d", "2D"),
        ("not_hu", "Hounsfield"),
        ("outside_volume", "outside the volume"),
        ("outside_lung", "not in the lung"),
        ("slices", "out of range"),
        ("half_slices", "out of range"),
        ("genes", f"model expects {NUM_GENES} genes"),
        ("nothing", "no nodule centre"),
        ("both", "not both"),
        ("slice_lists", "slice lists given"),
    ],
)
def test_bad_input_is_refused(inserter, phantom, genes, case, message) -> None:  # type: ignore[no-untyped-def]
    volume, geometry = phantom.volume_hu, phantom.geometry
    centre = _lung_centre(phantom)
    args: dict = dict(volume_hu=volume, geometry=geometry, gene_profile=genes, centres_ras=[centre])
    kwargs: dict = dict(lung_mask=phantom.lung_mask)
    if case == "2d":
        args["volume_hu"] = volume[10]
    elif case == "not_hu":
        args["volume_hu"] = ((volume.astype(np.float32) + 1024) / 16).clip(0, 255).astype(np.uint8)
    elif case == "outside_volume":
        args["centres_ras"] = [geometry.kji_to_ras([[5, -20, 10]])[0]]
    elif case == "outside_lung":
        body = phantom.body_mask & ~phantom.lung_mask
        body[:4] = body[-4:] = False
        args["centres_ras"] = [geometry.kji_to_ras([np.argwhere(body)[len(np.argwhere(body)) // 2]])[0]]
    elif case == "slices":
        kwargs["slices"] = [[5, 6, volume.shape[0]]]
    elif case == "half_slices":
        args["centres_ras"] = [geometry.kji_to_ras([[1, *np.argwhere(phantom.lung_mask[1])[0]]])[0]]
        kwargs["half_slices"] = 3
        kwargs["allow_outside_lung"] = True
    elif case == "genes":
        args["gene_profile"] = genes[:-1]
    elif case == "nothing":
        args["centres_ras"] = None
    elif case == "both":
        kwargs["auto_count"] = 2
    elif case == "slice_lists":
        kwargs["slices"] = [[3], [4]]
    before = volume.copy()
    with pytest.raises(InsertionError, match=message):
        inserter.insert(**args, **kwargs)
    assert np.array_equal(volume, before)


def test_outside_lung_override(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    body = phantom.body_mask & ~phantom.lung_mask
    body[:4] = body[-4:] = False
    point = phantom.geometry.kji_to_ras([np.argwhere(body)[len(np.argwhere(body)) // 2]])[0]
    result = inserter.insert(phantom.volume_hu, phantom.geometry, genes, [point], half_slices=0,
                             lung_mask=phantom.lung_mask, allow_outside_lung=True)
    assert result.provenance["allow_outside_lung"] is True
    assert not (result.label.astype(bool) & ~phantom.lung_mask).any()


def test_cuda_request_without_gpu_is_clear() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    generator = make_generator()
    with pytest.raises(InsertionError, match="no CUDA GPU"):
        NoduleInserter(generator, make_metadata(generator.config), device="cuda")


def test_nan_on_any_slice_is_refused(phantom) -> None:  # type: ignore[no-untyped-def]
    """The finiteness check covers every voxel: one NaN slice at an odd index once slipped past a strided
    sample and spread 65,536 NaN voxels into the output."""
    volume = np.zeros((31, 256, 256), np.float32)
    volume[:, :128] = -1000.0
    volume[13] = np.nan
    with pytest.raises(InsertionError, match="NaN or infinite values \\(first in slice 13\\)"):
        check_hu_volume(volume)
    volume[13] = 0.0
    volume[17, 101, 77] = np.inf
    with pytest.raises(InsertionError, match="slice 17"):
        check_hu_volume(volume)


def test_huge_slice_requests_are_refused_in_one_short_line(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    centre = _lung_centre(phantom)
    with pytest.raises(InsertionError, match="do not fit"):
        inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre], half_slices=99_999_999_999,
                        lung_mask=phantom.lung_mask)
    with pytest.raises(InsertionError) as raised:
        inserter.insert(phantom.volume_hu, phantom.geometry, genes, [centre],
                        slices=[list(range(-1000, 1001))], lung_mask=phantom.lung_mask)
    assert len(str(raised.value)) < 200 and "(1977 slices)" in str(raised.value), str(raised.value)


def test_cropped_ct_with_the_lung_at_the_border(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """A CT cropped around one lung (the lung touches the crop box) finds its lung, and a centre there works."""
    from RadiogenomicGANLib.geometry import VolumeGeometry

    _, _, is_ = np.nonzero(phantom.lung_mask)
    start_i = (is_.min() + is_.max()) // 2 - 5
    cropped = np.ascontiguousarray(phantom.volume_hu[:, :, start_i:])
    matrix = phantom.geometry.ijk_to_ras.copy()
    matrix[:3, 3] += matrix[:3, 0] * start_i
    geometry = VolumeGeometry(matrix)
    lung = phantom.lung_mask[:, :, start_i:]
    assert lung[:, :, 0].any(), "the crop cuts through the lung"
    found = inserter.lung_mask(cropped, geometry)
    assert 2 * (found & lung).sum() / (found.sum() + lung.sum()) > 0.9
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(lung, sampling=geometry.spacing_kji)
    distance[:4] = distance[-4:] = 0
    centre = geometry.kji_to_ras([np.unravel_index(np.argmax(distance), distance.shape)])[0]
    result = inserter.insert(cropped, geometry, genes, [centre], half_slices=1)
    assert result.label.any()


def test_no_lung_at_all_with_allow_outside_lung(inserter, phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """--allow-outside-lung means the user vouches for the centre: a CT where no lung is found still works."""
    solid = np.where(phantom.body_mask, 40, -1000).astype(np.int16)
    centre = _lung_centre(phantom)
    with pytest.raises(InsertionError, match="no lung"):
        inserter.insert(solid, phantom.geometry, genes, [centre], half_slices=0)
    result = inserter.insert(solid, phantom.geometry, genes, [centre], half_slices=0, allow_outside_lung=True)
    assert result.label.any()


class PixelNoiseDisc(DiscMaskGenerator):
    """DiscMaskGenerator over a per-pixel-noise generator (strengths on): the disc keeps the inner image, so
    the noise maps it was given show in the output."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__(inner)
        self.seen_maps: list[torch.Tensor] = []

    def forward(self, background, genes, noise=None, hole=None, pixel_noise=None):  # type: ignore[no-untyped-def]
        self.seen_maps.append(pixel_noise.clone())
        out = self.inner(background, genes, noise, hole=hole, pixel_noise=pixel_noise)
        disc = self.disc(background)
        return GeneratorOutput(out.image + 0.5 * disc, disc, out.weight_maps, out.gene_code)


def test_pixel_noise_is_drawn_from_the_seed_per_patch(phantom, genes) -> None:  # type: ignore[no-untyped-def]
    """A per-pixel-noise model gets its own map for every patch, from the insertion's seed: batched equals
    per-slice (the same maps), the same seed gives the same volume."""
    from dataclasses import replace

    config = replace(small_config(), pixel_noise=True)
    torch.manual_seed(2)
    inner = build_generator(config).eval()
    with torch.no_grad():
        for block in inner.blocks.values():
            block.noise_strength.fill_(2.0)
    generator = PixelNoiseDisc(inner)
    centre = [_lung_centre(phantom)]
    kwargs = dict(slices=[[10, 11, 12]], lung_mask=phantom.lung_mask, seed=5)
    batched = NoduleInserter(generator, make_metadata(config), "cpu", batch_size=64)
    a = batched.insert(phantom.volume_hu, phantom.geometry, genes, centre, **kwargs)
    maps, generator.seen_maps = torch.cat(generator.seen_maps), []
    assert maps.shape[0] == 3 and not torch.equal(maps[0], maps[1]) and not torch.equal(maps[1], maps[2])
    b = NoduleInserter(generator, make_metadata(config), "cpu", batch_size=1).insert(
        phantom.volume_hu, phantom.geometry, genes, centre, **kwargs)
    assert torch.equal(torch.cat(generator.seen_maps), maps)
    assert np.abs(a.volume_hu.astype(np.int32) - b.volume_hu).max() <= 1
    assert np.array_equal(a.volume_hu, batched.insert(phantom.volume_hu, phantom.geometry, genes, centre,
                                                      **kwargs).volume_hu)
