"""The module's Logic end to end on slicer-core: nodes in, nodes out, in a real vtkMRMLScene.

RadiogenomicGAN/RadiogenomicGAN.py is imported from its file, exactly as Slicer loads it. Without Qt its
guarded import gives the Logic plain base classes (asserted below), so what runs here is the module's own
Logic code — parameter mapping, node validation, gene profile, insertion and node creation — on a small
phantom CT, with a small randomly initialised generator saved and loaded through the real weights files.
Checks are independent of the pipeline's internals: voxels outside the patches and slices are compared
with the input, the label with the phantom's own lung truth.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
torch = pytest.importorskip("torch")
vtk = pytest.importorskip("vtk")

from RadiogenomicGANLib import mrml_adapter as adapter  # noqa: E402
from RadiogenomicGANLib import segments  # noqa: E402
from RadiogenomicGANLib.genes import GenePreprocessing, GeneTableError  # noqa: E402
from RadiogenomicGANLib.insertion import InsertionCancelled, InsertionError  # noqa: E402
from RadiogenomicGANLib.networks import GeneratorConfig, build_generator  # noqa: E402
from RadiogenomicGANLib.phantom import generate_patient  # noqa: E402
from RadiogenomicGANLib.request import RequestError  # noqa: E402
from RadiogenomicGANLib.weights import WeightsMetadata, save_weights  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[1] / "RadiogenomicGAN" / "RadiogenomicGAN.py"
PHANTOM = dict(patientIndex=0, seed=7, size_ij=96, slices=24, spacing=(2.0, 3.0), n_genes=64)
GENES = [f"GENE{g}" for g in range(16)]
SAMPLES = ["S1", "S2", "S3", "S4"]
HALF_PATCH_MM = 30.0  # the 60 mm patch


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("RadiogenomicGAN", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules["RadiogenomicGAN"] = loaded
    spec.loader.exec_module(loaded)
    yield loaded
    sys.modules.pop("RadiogenomicGAN", None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small random generator, saved and later loaded through the real weights files.

    Its mask head is biased on and its image head brightened, so every patch visibly changes: these tests
    are about which voxels and nodes may change, not about what a trained nodule looks like.
    """
    torch.manual_seed(0)
    config = GeneratorConfig(kind="proposed", num_genes=len(GENES), patch_size=64, code_dim=8, noise_dim=4,
                             base_channels=8, max_channels=16, gene_hidden=16)
    generator = build_generator(config)
    with torch.no_grad():
        generator.mask_head.conv.bias.fill_(4.0)
        generator.image_head.conv.bias.fill_(0.5)
    genes = GenePreprocessing(list(GENES), np.full(len(GENES), 2.0), np.ones(len(GENES)))
    metadata = WeightsMetadata(config=config, genes=genes, patch_size=64, patch_spacing_mm=0.9375,
                               provenance={"note": "random initialisation, for tests"})
    return Path(save_weights(tmp_path_factory.mktemp("weights") / "tiny", generator, metadata))


@pytest.fixture(scope="module")
def gene_table(tmp_path_factory) -> Path:
    """GEO text (empty first header cell, linear FPKM): sample s is z = ±(s+1)/2 away from the mean."""
    rng = np.random.default_rng(1)
    z = rng.choice([-1.0, 1.0], size=(len(GENES), len(SAMPLES))) * (np.arange(len(SAMPLES)) + 1) / 2
    fpkm = 2.0 ** (2.0 + z) - 1.0
    path = tmp_path_factory.mktemp("genes") / "genes.txt"
    lines = ["\t" + "\t".join(SAMPLES)] + [g + "\t" + "\t".join(f"{v:.6f}" for v in row) for g, row in zip(GENES, fpkm)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def logic(module):
    """One Logic for the file, as in Slicer: its generator and the lung mask of the phantom are cached."""
    return module.RadiogenomicGANLogic()


@pytest.fixture(scope="module")
def patient():
    options = dict(PHANTOM)
    return generate_patient(options.pop("patientIndex"), options.pop("seed"), **options)


@pytest.fixture()
def ct(logic, scene):
    return logic.createPhantomVolume(scene, **PHANTOM)


def _deep_lung_point(patient, k: int) -> np.ndarray:
    """RAS of the lung voxel of slice k farthest from the lung boundary (a safe nodule centre)."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(patient.lung_mask[k])
    j, i = np.unravel_index(np.argmax(distance), distance.shape)
    return patient.geometry.kji_to_ras([[k, j, i]])[0]


def _middle_lung_slice(patient) -> int:
    slices = np.flatnonzero(patient.lung_mask.any(axis=(1, 2)))
    return int(slices[len(slices) // 2])


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_masks(segmentation, reference) -> dict[str, np.ndarray]:
    return {name: adapter.segment_label_array(segmentation, sid, reference)
            for name, sid in adapter.segments_by_name(segmentation).items()}


def _assert_in_lung(logic, weights: Path, patient, label: np.ndarray) -> None:
    """Inside the lung mask the pipeline uses (exactly), and mostly inside the phantom's true lungs.

    The classical mask is a little generous at the hilum and the pleura on this coarse 2×2×3 mm grid
    (a closing, by design, so juxta-pleural nodules count as lung), hence the tolerance against the truth.
    """
    pipeline_lung = logic.getInserter(str(weights), "cpu").lung_mask(patient.volume_hu, patient.geometry)
    assert np.all(pipeline_lung[label]), "label voxels outside the lung mask"
    assert np.mean(patient.lung_mask[label]) >= 0.9, "label mostly outside the phantom's true lungs"


def _tag(segment, name: str) -> str:
    value = vtk.mutable("")
    assert segment.GetTag(name, value)
    return str(value)


def _changed_outside_footprints(before: np.ndarray, after: np.ndarray, geometry, centres, slices) -> int:
    """Changed voxels that lie off the nodules' slices or farther than the patch half-width in-plane."""
    allowed = np.zeros(before.shape, dtype=bool)
    jj, ii = np.mgrid[0 : before.shape[1], 0 : before.shape[2]]
    margin = HALF_PATCH_MM + float(max(geometry.spacing[:2]))
    for centre, ks in zip(centres, slices):
        for k in ks:
            ras = geometry.kji_to_ras(np.stack([np.full(jj.size, k), jj.ravel(), ii.ravel()], axis=1))
            offset = np.abs(ras[:, :2] - np.asarray(centre)[:2]).max(axis=1).reshape(jj.shape)
            allowed[k] |= offset <= margin
    return int(np.count_nonzero((before != after) & ~allowed))


# --- the headless module is honest about what it is -------------------------------------------------------
def test_module_loads_headless_with_plain_bases(module) -> None:
    assert module.SLICER_APPLICATION is False
    assert module.RadiogenomicGANLogic.__mro__[1].__module__ == "RadiogenomicGAN"  # the stand-in base, no Qt
    assert module.RadiogenomicGANLogic().moduleName == "RadiogenomicGAN"
    fields = module.RadiogenomicGANParameterNode.__dataclass_fields__
    assert {"inputVolume", "sampleId", "pointList", "outputSegmentation"} <= set(fields)


# --- insertion from a point list ----------------------------------------------------------------------------
def test_insert_from_points_end_to_end(logic, scene, ct, patient, weights, gene_table) -> None:
    k = _middle_lung_slice(patient)
    centre = _deep_lung_point(patient, k)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "centres")
    points.AddControlPoint(*centre)
    before = adapter.array_from_volume_node(ct)
    matrix_before = _matrix(ct)
    nodes_before = scene.GetNumberOfNodes()

    volume, segmentation, weight_map = logic.insertNodules(
        ct, str(gene_table), "S2", pointListNode=points, halfSlices=1, seed=3, weightsPath=str(weights),
        device="cpu", outputWeightMap=True, scene=scene)

    # New nodes in the scene, named after the input; the input node untouched, voxel for voxel.
    assert scene.GetNumberOfNodes() > nodes_before
    for node in (volume, segmentation, weight_map):
        assert scene.GetNodeByID(node.GetID()) is node and node is not ct
    assert volume.GetName() == f"{ct.GetName()} synthetic"
    assert np.array_equal(adapter.array_from_volume_node(ct), before)
    assert np.array_equal(_matrix(ct), matrix_before)
    # Same geometry out as in.
    after = adapter.array_from_volume_node(volume)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert np.allclose(_matrix(volume), matrix_before) and np.allclose(_matrix(weight_map), matrix_before)
    # Something was inserted, and only inside the patches of the requested slices.
    requested = [k - 1, k, k + 1]
    assert np.any(after != before)
    assert _changed_outside_footprints(before, after, patient.geometry, [centre], [requested]) == 0
    changed_slices = set(np.flatnonzero((after != before).any(axis=(1, 2))))
    assert changed_slices <= set(requested)

    # One segment, named and tagged; its voxels in the lung, on the requested slices only.
    masks = _segment_masks(segmentation, ct)
    assert list(masks) == ["Synthetic nodule 1"]
    label = masks["Synthetic nodule 1"]
    assert label.any()
    assert set(np.flatnonzero(label.any(axis=(1, 2)))) <= set(requested)
    _assert_in_lung(logic, weights, patient, label)
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    assert _tag(segment, segments.TAG_SYNTHETIC) == "true"
    assert _tag(segment, segments.TAG_MODEL) == "tiny.safetensors"
    assert _tag(segment, segments.TAG_GENE_SAMPLE) == "S2"
    assert _tag(segment, segments.TAG_SEED) == "3"
    provenance = json.loads(_tag(segment, segments.TAG_PROVENANCE))
    assert provenance["gene_table"] == "genes.txt" and provenance["slices"] == [requested]
    assert np.allclose(provenance["centres_ras"][0], centre, atol=1e-2)
    assert np.allclose(logic.insertedCentres(segmentation)[0], centre, atol=1e-2)

    # The weight map: in [0, 1], zero off the requested slices.
    w = adapter.array_from_volume_node(weight_map)
    assert w.dtype == np.float32 and w.min() >= 0.0 and w.max() <= 1.0 and w.max() > 0
    assert not w[[s for s in range(w.shape[0]) if s not in requested]].any()


def test_same_seed_same_nodule_and_blend_changes_it(logic, scene, ct, patient, weights, gene_table) -> None:
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient)))
    common = dict(pointListNode=points, halfSlices=0, seed=11, weightsPath=str(weights), device="cpu", scene=scene)
    first = adapter.array_from_volume_node(logic.insertNodules(ct, str(gene_table), "S1", **common)[0])
    second = adapter.array_from_volume_node(logic.insertNodules(ct, str(gene_table), "S1", **common)[0])
    blended = adapter.array_from_volume_node(
        logic.insertNodules(ct, str(gene_table), "S1", blendSampleId="S4", blendWeight=1.0, **common)[0])
    assert np.array_equal(first, second)
    assert not np.array_equal(first, blended)
    assert logic.getInserter(str(weights), "cpu") is logic.getInserter(str(weights), "cpu")  # cached


# --- the parameter node path the Widget uses ----------------------------------------------------------------
def test_parameter_node_automatic_placement(module, logic, scene, ct, patient, weights, gene_table) -> None:
    p = module.RadiogenomicGANParameterNode(
        inputVolume=ct, useBundledWeights=False, weightsPath=str(weights), device=module.Device.CPU,
        geneTablePath=str(gene_table), sampleId="S3", placement=module.Placement.AUTOMATIC, autoCount=2,
        sliceMode=module.SliceMode.AROUND_CENTRE, halfSlices=0, seed=4)
    volume, segmentation, weight_map = logic.processParameterNode(p, scene=scene)
    assert weight_map is None
    assert p.outputVolume is volume and p.outputSegmentation is segmentation
    masks = _segment_masks(segmentation, ct)
    assert list(masks) == ["Synthetic nodule 1", "Synthetic nodule 2"]
    for mask in masks.values():
        assert mask.any() and np.count_nonzero(mask.any(axis=(1, 2))) == 1  # ±0 slices: exactly one slice
        _assert_in_lung(logic, weights, patient, mask)
    # A second Apply refills the same output nodes (the template's behaviour), never the input.
    again = logic.processParameterNode(p, scene=scene)
    assert again[0] is volume and again[1] is segmentation


def _one_point_parameters(module, scene, ct, patient, weights, gene_table, **settings):  # type: ignore[no-untyped-def]
    """A parameter node with one point deep in the lung on the middle lung slice k (returned with it), the
    weights file, the CPU and sample S1."""
    k = _middle_lung_slice(patient)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*_deep_lung_point(patient, k))
    return module.RadiogenomicGANParameterNode(
        inputVolume=ct, useBundledWeights=False, weightsPath=str(weights), device=module.Device.CPU,
        geneTablePath=str(gene_table), sampleId="S1", pointList=points, **settings), k


def test_parameter_node_fits_the_slices_by_default(module, logic, scene, ct, patient, weights, gene_table) -> None:
    """A clicked point gets its whole nodule: the default slice mode asks for the slices its size spans."""
    p, k = _one_point_parameters(module, scene, ct, patient, weights, gene_table, halfSlices=0)
    assert p.sliceMode == module.SliceMode.FIT_TO_SIZE
    assert logic.requestFromParameterNode(p).slices == ("auto",)
    _, segmentation, _ = logic.processParameterNode(p, scene=scene)
    spanned = np.flatnonzero(_segment_masks(segmentation, ct)["Synthetic nodule 1"].any(axis=(1, 2)))
    assert spanned.size > 1   # not the ±0 of halfSlices: that spin box is off in this mode
    assert spanned.tolist() == list(range(spanned[0], spanned[-1] + 1)) and spanned[0] <= k <= spanned[-1]


def test_parameter_node_slice_list(module, logic, scene, ct, patient, weights, gene_table) -> None:
    k = _middle_lung_slice(patient)
    p, _ = _one_point_parameters(module, scene, ct, patient, weights, gene_table, sliceMode=module.SliceMode.LIST,
                                 sliceList=f"{k - 2}, {k}", outputWeightMapEnabled=True)
    before = adapter.array_from_volume_node(ct)
    volume, segmentation, weight_map = logic.processParameterNode(p, scene=scene)
    changed = set(np.flatnonzero((adapter.array_from_volume_node(volume) != before).any(axis=(1, 2))))
    assert changed and changed <= {k - 2, k}
    label = _segment_masks(segmentation, ct)["Synthetic nodule 1"]
    assert set(np.flatnonzero(label.any(axis=(1, 2)))) <= {k - 2, k}
    assert p.outputWeightMap is weight_map


def test_slice_field_uses_the_request_syntax(module, logic, scene, ct, patient, weights) -> None:
    """The module's slice field is the CLI's syntax (one parser): '±K', lists, ';' per centre."""
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient)))
    points.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient) + 2))
    build = dict(pointListNode=points, weightsPath=str(weights))
    assert logic.buildRequest(ct, "t.txt", "S1", sliceList="40, 41, 45-47", **build).slices == ("40, 41, 45-47",)
    assert logic.buildRequest(ct, "t.txt", "S1", sliceList="±1; 3 4", **build).slices == ("±1", "3 4")
    assert logic.buildRequest(ct, "t.txt", "S1", sliceList=[3, 4], **build).slices == ([3, 4],)
    assert logic.buildRequest(ct, "t.txt", "S1", sliceList=[[3], [4, 5]], **build).slices == ([3], [4, 5])
    assert logic.buildRequest(ct, "t.txt", "S1", sliceList="  ", **build).slices == ()
    # from the console, with neither a list nor ±K, the nodules are fitted to their size as in the Widget
    assert logic.buildRequest(ct, "t.txt", "S1", **build).half_slices is None
    assert logic.buildRequest(ct, "t.txt", "S1", halfSlices=3, **build).half_slices == 3
    with pytest.raises(RequestError):
        logic.buildRequest(ct, "t.txt", "S1", sliceList="1;;2", **build)


# --- refusals leave the scene as it was ------------------------------------------------------------------
def test_bad_inputs_are_clear_errors_and_add_no_nodes(logic, scene, ct, patient, weights, gene_table) -> None:
    common = dict(weightsPath=str(weights), device="cpu", scene=scene)
    outside = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "outside")
    outside.AddControlPoint(1.0e4, 0.0, 0.0)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    inside = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "inside")
    inside.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient)))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    count = scene.GetNumberOfNodes()
    cases = [
        (InsertionError, "outside the volume", dict(inputVolumeNode=ct, sampleId="S1", pointListNode=outside)),
        (RequestError, "no points", dict(inputVolumeNode=ct, sampleId="S1", pointListNode=empty)),
        (RequestError, "point list", dict(inputVolumeNode=ct, sampleId="S1")),
        (RequestError, "scalar volume", dict(inputVolumeNode=labelmap, sampleId="S1", autoCount=1)),
        (RequestError, "choose a sample", dict(inputVolumeNode=ct, sampleId="", pointListNode=inside)),
        (GeneTableError, "NOPE", dict(inputVolumeNode=ct, sampleId="NOPE", pointListNode=inside)),
        (InsertionError, "out of range", dict(inputVolumeNode=ct, sampleId="S1", pointListNode=inside,
                                              sliceList=[0, 999])),
        (adapter.MRMLAdapterError, "input", dict(inputVolumeNode=ct, sampleId="S1", pointListNode=inside,
                                                 outputVolumeNode=ct)),
    ]
    for error, message, arguments in cases:
        with pytest.raises(error, match=message):
            logic.insertNodules(geneTablePath=str(gene_table), **arguments, **common)
        assert scene.GetNumberOfNodes() == count, f"a refused run ({message}) left nodes behind"


def test_cancel_adds_no_nodes(logic, scene, ct, patient, weights, gene_table) -> None:
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient)))
    messages: list[str] = []

    def progress(fraction: float, message: str) -> bool:
        messages.append(message)
        return fraction < 0.5  # the user presses Cancel half-way

    count = scene.GetNumberOfNodes()
    with pytest.raises(InsertionCancelled):
        logic.insertNodules(ct, str(gene_table), "S1", pointListNode=points, weightsPath=str(weights),
                            device="cpu", progress=progress, scene=scene)
    assert messages and scene.GetNumberOfNodes() == count


# --- radiogenomic map ----------------------------------------------------------------------------------------
def test_radiogenomic_map(logic, scene, weights, gene_table) -> None:
    ids, codes, xy = logic.computeRadiogenomicMap(str(gene_table), str(weights), device="cpu")
    assert ids == SAMPLES and codes.shape == (4, 8) and xy.shape == (4, 2) and np.isfinite(xy).all()
    chart = logic.showRadiogenomicMap(str(gene_table), highlight=["S2", ""], weightsPath=str(weights),
                                      device="cpu", scene=scene)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(1).GetTableNode().GetCellText(0, 2) == "S2"


def test_phantom_volume_node(logic, scene, patient) -> None:
    node = logic.createPhantomVolume(scene, **PHANTOM)
    assert np.array_equal(adapter.array_from_volume_node(node), patient.volume_hu)
    assert np.allclose(_matrix(node), patient.geometry.ijk_to_ras)
    assert node.GetAttribute("RadiogenomicGAN.PhantomPatient") == patient.patient_id


# --- one request path: in-process Logic, Apply's background CLI, and the CLI on files agree -------------------
def _segment_record(segmentation) -> list[tuple[str, dict[str, str]]]:
    """(name, tags without the run date) of every segment, in order."""
    records = []
    seg = segmentation.GetSegmentation()
    for index in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(index)
        tags = {name: _tag(segment, name) for name in (
            segments.TAG_SYNTHETIC, segments.TAG_MODEL, segments.TAG_GENE_SAMPLE, segments.TAG_SEED,
            segments.TAG_NODULE_INDEX, segments.TAG_PROVENANCE)}
        records.append((segment.GetName(), _without_date(tags)))
    return records


def _without_date(tags: dict[str, str]) -> dict[str, str]:
    provenance = json.loads(tags[segments.TAG_PROVENANCE])
    provenance.pop("date")
    return {**tags, segments.TAG_PROVENANCE: json.dumps(provenance, sort_keys=True)}


def _seg_nrrd_record(path: Path) -> tuple[list[tuple[str, dict[str, str]]], np.ndarray]:
    """(name, tags) per segment and the labelmap [k, j, i] of a .seg.nrrd the CLI wrote."""
    import nrrd

    label, header = nrrd.read(str(path), index_order="C")
    records = []
    index = 0
    while f"Segment{index}_Name" in header:
        tags = dict(item.split(":", 1) for item in header[f"Segment{index}_Tags"].split("|") if item)
        tags = {k: v for k, v in tags.items() if k.startswith(segments.TAG_PREFIX)}
        records.append((header[f"Segment{index}_Name"], _without_date(tags)))
        index += 1
    return records, label


def test_in_process_background_and_cli_are_one_path(logic, scene, ct, patient, weights, gene_table, tmp_path) -> None:
    """The same request three ways — `insertNodules` in this process, Apply's background CLI (`startInsertion`),
    and `python -m RadiogenomicGANLib insert` on files — gives the same voxels, segment names and tags."""
    from RadiogenomicGANLib import cli, volume_io

    centre = _deep_lung_point(patient, _middle_lung_slice(patient))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*centre)
    settings = dict(pointListNode=points, halfSlices=1, seed=5, weightsPath=str(weights), device="cpu",
                    blendSampleId="S3", blendWeight=0.25, outputWeightMap=True)
    volume, segmentation, weight_map = logic.insertNodules(ct, str(gene_table), "S2", scene=scene, **settings)

    # Same torch thread count in the child as here: float sums may round differently with another count.
    job = logic.startInsertion(ct, logic.buildRequest(ct, str(gene_table), "S2", **settings),
                               threads=torch.get_num_threads())
    fractions = []
    while job.poll():  # what the Widget's timer does
        fractions.append(job.fraction)
        time.sleep(0.05)
    background = logic.finishInsertion(job, scene)
    assert job.run.returncode == 0 and job.fraction == 1.0 and fractions == sorted(fractions)
    assert not Path(job.folder.name).exists(), "the temporary files were not removed"

    ct_file = tmp_path / f"{ct.GetName()}.nrrd"
    volume_io.write_volume(ct_file, *adapter.volume_from_node(ct))
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["insert", "--ct", str(ct_file), "--genes", str(gene_table), "--sample", "S2",
                     "--blend-with", "S3", "--blend-weight", "0.25", "--weights", str(weights), "--device", "cpu",
                     "--seed", "5", "--half-slices", "1", "--center-ras=" + ",".join(repr(float(v)) for v in centre),
                     "--out-volume", str(out / "v.nrrd"), "--out-segmentation", str(out / "v.seg.nrrd"),
                     "--out-weight-map", str(out / "w.nrrd"), "--quiet",
                     "--threads", str(torch.get_num_threads())]) == 0
    cli_segments, cli_label = _seg_nrrd_record(out / "v.seg.nrrd")

    in_process = _segment_record(segmentation)
    assert in_process[0][0] == "Synthetic nodule 1"
    assert in_process[0][1][segments.TAG_GENE_SAMPLE] == "S2 (0.75) + S3 (0.25)"
    assert _segment_record(background[1]) == in_process == cli_segments
    expected = adapter.array_from_volume_node(volume)
    assert np.any(expected != adapter.array_from_volume_node(ct))
    assert np.array_equal(adapter.array_from_volume_node(background[0]), expected)
    assert np.array_equal(volume_io.read_volume(out / "v.nrrd").array, expected)
    np.testing.assert_array_equal(adapter.array_from_volume_node(background[2]),
                                  adapter.array_from_volume_node(weight_map))
    label = _segment_masks(segmentation, ct)["Synthetic nodule 1"]
    assert label.any()
    assert np.array_equal(_segment_masks(background[1], ct)["Synthetic nodule 1"], label)
    assert np.array_equal(cli_label == 1, label)


def test_background_errors_and_cancel_add_no_nodes(logic, scene, ct, patient, weights, gene_table) -> None:
    from RadiogenomicGANLib.background import BackgroundCancelled, BackgroundError

    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*_deep_lung_point(patient, _middle_lung_slice(patient)))
    count = scene.GetNumberOfNodes()
    request = logic.buildRequest(ct, str(gene_table), "NOPE", pointListNode=points, weightsPath=str(weights),
                                 device="cpu")
    job = logic.startInsertion(ct, request)
    with pytest.raises(BackgroundError, match="NOPE"):  # the child's own one-line error, as a Python error
        logic.finishInsertion(job, scene)
    request = logic.buildRequest(ct, str(gene_table), "S1", pointListNode=points, weightsPath=str(weights),
                                 device="cpu", halfSlices=3)
    job = logic.startInsertion(ct, request)
    job.cancel()  # Cancel: the child is killed at once, its files go
    assert job.run.returncode is not None and job.run.returncode < 0
    with pytest.raises(BackgroundCancelled):
        logic.finishInsertion(job, scene)
    assert scene.GetNumberOfNodes() == count


def test_apply_path_never_imports_torch_in_slicers_process(weights, gene_table, tmp_path) -> None:
    """Building the request, writing the CT, starting and finishing the background run load no torch in the
    calling process (Slicer's): a torch crash or upgrade cannot touch the application."""
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("RadiogenomicGAN", {str(MODULE_FILE)!r})
module = importlib.util.module_from_spec(spec)
sys.modules["RadiogenomicGAN"] = module
spec.loader.exec_module(module)
import slicer
scene = slicer.vtkMRMLScene()
logic = module.RadiogenomicGANLogic()
ct = logic.createPhantomVolume(scene, patientIndex=0, seed=7, size_ij=96, slices=24, spacing=(2.0, 3.0), n_genes=64)
request = logic.buildRequest(ct, {str(gene_table)!r}, "S1", autoCount=1, halfSlices=0, weightsPath={str(weights)!r},
                             device="cpu")
job = logic.startInsertion(ct, request)
volume, segmentation, _ = logic.finishInsertion(job, scene)
assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
assert module.RadiogenomicGANLogic.emptyNoduleNote(segmentation, volume) == ""   # the status line's check
print(sorted(m for m in ("torch", "safetensors", "sklearn", "highdicom") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=MODULE_FILE.parents[1], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_status_names_nodules_that_came_out_empty(module, scene, ct, caplog) -> None:
    """Segment N is nodule N, empty or not: the Widget's status line names the empty ones from the nodes, and
    creating the outputs logs the same line for console users."""
    label = np.zeros(adapter.array_from_volume_node(ct).shape, dtype=np.uint8)
    k, j, i = (n // 2 for n in label.shape)
    label[k, j : j + 3, i : i + 3] = 2
    segmentation = adapter.create_nodule_segmentation(scene, ct, label, {}, num_nodules=3)
    note = module.RadiogenomicGANLogic.emptyNoduleNote(segmentation, ct)
    assert note.startswith("nodules 1, 3 came out empty") and "Try another point" in note

    from types import SimpleNamespace

    result = SimpleNamespace(volume_hu=adapter.array_from_volume_node(ct), label=label,
                             centres_ras=np.zeros((3, 3)), provenance={}, weight_map=None)
    with caplog.at_level("WARNING"):
        module.RadiogenomicGANLogic().createOutputs(scene, ct, result)
    assert "nodules 1, 3 came out empty" in caplog.text


def test_model_kind_is_read_without_loading_the_model(module, weights, tmp_path) -> None:
    """The panel asks for a gene table only when the model uses genes (the inpainting baseline does not)."""
    kind = module.RadiogenomicGANLogic.modelKind
    assert kind(str(weights)) == "proposed"
    assert kind(None) == "proposed"  # the bundled demo model
    record = json.loads(weights.with_suffix(".json").read_text())
    record["kind"] = "inpainting"
    (tmp_path / "inpaint.json").write_text(json.dumps(record))
    assert kind(str(tmp_path / "inpaint.safetensors")) == "inpainting"
    assert kind(str(tmp_path / "missing.safetensors")) is None
