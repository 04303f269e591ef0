"""The MRML adapter on slicer-core, in a real vtkMRMLScene: volumes, segmentations, hierarchy, points, plots.

Geometries are deliberately oblique (rotated, LPS-flipped, anisotropic) so a swapped axis or a lost
direction shows; every round trip compares voxels exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from RadiogenomicGANLib import mrml_adapter as adapter  # noqa: E402
from RadiogenomicGANLib import segments  # noqa: E402
from RadiogenomicGANLib.geometry import VolumeGeometry  # noqa: E402

SHAPE = (7, 19, 23)  # (k, j, i): all different so transposes cannot hide


def _oblique_geometry() -> VolumeGeometry:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    return VolumeGeometry.from_lps([12.5, -40.0, -210.0], [0.7, 0.8, 2.5], rotation)


def _tag(segment, name: str) -> str:
    value = vtk.mutable("")
    assert segment.GetTag(name, value), f"segment has no tag {name}"
    return str(value)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture()
def ct(scene):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, SHAPE).astype(np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest")
    adapter.set_volume_node_array(node, array, _oblique_geometry())
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)
    return node, array


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_volume_round_trip_is_exact_and_copies(ct) -> None:
    node, array = ct
    voxels, geometry = adapter.volume_from_node(node)
    assert voxels.dtype == np.int16 and voxels.shape == SHAPE
    assert np.array_equal(voxels, array)
    assert np.allclose(geometry.ijk_to_ras, _oblique_geometry().ijk_to_ras)
    voxels[0, 0, 0] = 1234  # the returned array is a copy: the node does not change
    assert adapter.array_from_volume_node(node)[0, 0, 0] == array[0, 0, 0]
    array[1, 1, 1] = 999  # neither does editing the array that was stored
    assert adapter.array_from_volume_node(node)[1, 1, 1] != 999


def test_float_volume_and_refusals(scene) -> None:
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "float")
    values = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    adapter.set_volume_node_array(node, values, VolumeGeometry.from_spacing([1, 1, 1]))
    assert adapter.array_from_volume_node(node).dtype == np.float32
    with pytest.raises(adapter.MRMLAdapterError, match="3D"):
        adapter.set_volume_node_array(node, values[0], VolumeGeometry.from_spacing([1, 1, 1]))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(adapter.MRMLAdapterError, match="no voxels"):
        adapter.array_from_volume_node(empty)
    with pytest.raises(adapter.MRMLAdapterError, match="scalar volume"):
        adapter.array_from_volume_node(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))


def test_output_volume_is_new_with_the_input_geometry(scene, ct) -> None:
    node, array = ct
    result = array.copy()
    result[3, 5:9, 6:10] = 40
    output = adapter.create_output_volume(scene, node, result)
    assert output is not node and output.GetName() == "chest synthetic"
    assert np.array_equal(adapter.array_from_volume_node(output), result)
    assert np.array_equal(adapter.array_from_volume_node(node), array)
    assert np.allclose(_matrix(output), _matrix(node))
    display = output.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (1500.0, -600.0)
    again = adapter.create_output_volume(scene, node, result)
    assert again.GetName() != output.GetName()  # never silently reuses a node by name
    refilled = adapter.create_output_volume(scene, node, array, output_node=output)
    assert refilled is output and np.array_equal(adapter.array_from_volume_node(output), array)
    with pytest.raises(adapter.MRMLAdapterError, match="input"):
        adapter.create_output_volume(scene, node, result, output_node=node)
    with pytest.raises(adapter.MRMLAdapterError, match="shape"):
        adapter.create_output_volume(scene, node, result[:-1])


def test_outputs_follow_the_input_transform_and_subject_hierarchy(scene, ct) -> None:
    node, array = ct
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    # No hierarchy item for the input (bare scene): nothing to place beside, no error.
    loose = adapter.create_output_volume(scene, node, array)
    assert not hierarchy.GetItemByDataNode(loose)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "CT study")
    hierarchy.CreateItem(study, node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    output = adapter.create_output_volume(scene, node, array)
    segmentation = adapter.create_nodule_segmentation(scene, node, np.zeros(SHAPE, np.uint8), {}, num_nodules=1)
    for created in (output, segmentation):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(created)) == study
        assert created.GetTransformNodeID() == transform.GetID()


def test_segmentation_names_terminology_tags_and_voxels(scene, ct) -> None:
    node, _ = ct
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2, 4:8, 5:11] = 1
    label[3, 4:9, 5:10] = 1
    label[5, 12:15, 14:20] = 2
    provenance = {"weights_file": "demo_model.safetensors", "gene_sample": "R01-042", "seed": 7,
                  "centres_ras": [[1.0, 2.0, 3.0]] * 3, "synthetic": True}
    segmentation = adapter.create_nodule_segmentation(scene, node, label, provenance, num_nodules=3)
    assert segmentation.GetName() == "chest synthetic nodules"
    assert adapter.empty_nodule_numbers(segmentation, node) == [3]   # nodule 3's label stayed empty
    assert adapter.segments_by_name(segmentation).keys() == {"Synthetic nodule 1", "Synthetic nodule 2",
                                                             "Synthetic nodule 3"}
    colours = set()
    for n, (name, segment_id) in enumerate(adapter.segments_by_name(segmentation).items(), start=1):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        colours.add(tuple(round(c, 3) for c in segment.GetColor()))
        assert _tag(segment, segments.TAG_SYNTHETIC) == "true"
        assert _tag(segment, segments.TAG_MODEL) == "demo_model.safetensors"
        assert _tag(segment, segments.TAG_GENE_SAMPLE) == "R01-042"
        assert _tag(segment, segments.TAG_SEED) == "7"
        assert _tag(segment, segments.TAG_NODULE_INDEX) == str(n)
        assert json.loads(_tag(segment, segments.TAG_PROVENANCE))["seed"] == 7
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            _tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()), entry)
        assert entry.GetCategoryObject().GetCodeValue() == "49755003"
        assert entry.GetTypeObject().GetCodeValue() == "27925004"
        assert entry.GetTypeObject().GetCodeMeaning() == "Nodule"
        assert entry.GetRegionObject().GetCodeMeaning() == "Lung"
        voxels = adapter.segment_label_array(segmentation, segment_id, node)
        assert np.array_equal(voxels, label == n), name
    assert len(colours) == 3
    reference = segmentation.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is node
    geometry = slicer.vtkOrientedImageData()
    parameter = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(parameter, geometry)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    assert np.allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], _matrix(node))
    assert geometry.GetDimensions() == node.GetImageData().GetDimensions()


def test_terminology_is_in_slicers_dicom_master_list() -> None:
    """"Nodule" (SCT 27925004) is a type of the DICOM master list, not of the 3D Slicer General Anatomy list."""
    entry = adapter.nodule_terminology_entry()
    assert entry.startswith("Segmentation category and type - DICOM master list~SCT^49755003^")
    assert "~SCT^27925004^Nodule~" in entry and "~Anatomic codes - DICOM master list~SCT^39607008^Lung~" in entry


def test_terminology_matches_the_files_the_cli_writes() -> None:
    """The string the CLI writes into .seg.nrrd files is exactly what Slicer's own serializer produces."""
    assert adapter.nodule_terminology_entry() == segments.NODULE_TERMINOLOGY


def test_segmentation_refusals(scene, ct) -> None:
    node, _ = ct
    with pytest.raises(adapter.MRMLAdapterError, match="shape"):
        adapter.create_nodule_segmentation(scene, node, np.zeros((1, 2, 3), np.uint8), {})
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(adapter.MRMLAdapterError, match="vtkMRMLSegmentationNode"):
        adapter.create_nodule_segmentation(scene, node, np.zeros(SHAPE, np.uint8), {}, output_node=other)


def test_weight_map_volume(scene, ct) -> None:
    node, _ = ct
    weights = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    weight_map = adapter.create_weight_map_volume(scene, node, weights)
    assert weight_map.GetName() == "chest weight map"
    assert weight_map.GetAttribute(adapter.ATTRIBUTE_ROLE) == "weightMap"
    stored = adapter.array_from_volume_node(weight_map)
    assert stored.dtype == np.float32 and np.array_equal(stored, weights)
    display = weight_map.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))


def test_control_points_in_the_volume_frame(scene, ct) -> None:
    node, _ = ct
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    assert adapter.control_points_ras(points, node).shape == (0, 3)
    points.AddControlPoint(10.0, -20.0, 30.0)
    points.AddControlPoint(-5.0, 0.0, 1.0)
    assert np.allclose(adapter.control_points_ras(points, node), [[10, -20, 30], [-5, 0, 1]])
    # The volume moved 5 mm right: the same world points are 5 mm further left in the volume's frame.
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(adapter.control_points_ras(points, node), [[5, -20, 30], [-10, 0, 1]])
    assert adapter.control_points_ras(None, node).shape == (0, 3)


def test_scatter_plot(scene) -> None:
    xy = np.arange(10, dtype=float).reshape(5, 2)
    chart = adapter.create_scatter_plot(scene, xy, ["a", "b", "c", "d", "e"], highlight=["c"])
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 2
    cohort, chosen = (chart.GetNthPlotSeriesNode(i) for i in range(2))
    assert cohort.GetTableNode().GetNumberOfRows() == 4
    table = chosen.GetTableNode()
    assert table.GetNumberOfRows() == 1 and table.GetCellText(0, 2) == "c"
    assert cohort.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter
    with pytest.raises(adapter.MRMLAdapterError):
        adapter.create_scatter_plot(scene, xy, ["a"])


def test_scatter_plot_reuses_its_chart(scene) -> None:
    """A second map into the same chart leaves one chart, two series and two tables (no pile-up per click)."""
    xy = np.arange(10, dtype=float).reshape(5, 2)
    chart = adapter.create_scatter_plot(scene, xy, ["a", "b", "c", "d", "e"], highlight=["c"])
    counts = {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
                                                             "vtkMRMLTableNode")}
    again = adapter.create_scatter_plot(scene, xy[:4], ["a", "b", "c", "d"], highlight=["a", "b"], chart_node=chart)
    assert again is chart
    assert {c: scene.GetNumberOfNodesByClass(c) for c in counts} == counts
    assert chart.GetNthPlotSeriesNode(1).GetTableNode().GetNumberOfRows() == 2
    assert chart.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows() == 2


def test_world_points_invert_control_points(scene, ct) -> None:
    node, _ = ct
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.0)
    matrix.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    local = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, 6.0]])
    world = adapter.world_points(node, local)
    np.testing.assert_allclose(world, local + np.array([12.0, 0.0, -7.5]))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for p in world:
        points.AddControlPointWorld(*p)
    np.testing.assert_allclose(adapter.control_points_ras(points, node), local, atol=1e-9)
