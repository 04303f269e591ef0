"""The one Lib file that touches MRML: volume, segmentation, point-list and plot nodes ↔ numpy arrays.

Everything else in the Lib works on `[k, j, i]` arrays plus a `VolumeGeometry`; this file converts at the
border, so the same pipeline serves the Slicer module, the Python console and the headless CLI. Decisions:

- The scene is always passed explicitly (never `slicer.mrmlScene`), so the functions run on `slicer-core`
  without the application, and in Slicer on any scene.
- Voxels are copied in and out (`vtk.util.numpy_support`, deep copies): nothing here keeps a view on a
  node's memory, so the input node can never be written through an alias.
- Geometry is the node's own IJK→RAS matrix. A parent transform is not baked in: output nodes are put
  under the input's parent transform, and markup points are mapped from world into the input volume's
  local RAS, so points, input and outputs stay in one frame.
- Output segments are named "Synthetic nodule N", carry a DICOM terminology entry (SCT 27925004 "Nodule",
  category "Morphologically Altered Structure", region "Lung") and the provenance (model, gene sample,
  seed, …) as segment tags, and the segmentation's reference geometry is the input volume's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.segments import (
    ANATOMIC_CONTEXT,
    CATEGORY_CODE,
    REGION_CODE,
    TAG_PROVENANCE,
    TERMINOLOGY_CONTEXT,
    TYPE_CODE,
    nodule_segments,
    provenance_tags,
)

# --- names and codes other parts (tests, CLI writers) rely on --------------------------------------------
ATTRIBUTE_ROLE = "RadiogenomicGAN.Role"  # node attribute: "syntheticVolume", "noduleSegmentation", "weightMap"


class MRMLAdapterError(ValueError):
    """A node that cannot be used as asked (wrong class, no image, several components, …)."""


# --- terminology ------------------------------------------------------------------------------------------
def nodule_terminology_entry() -> str:
    """The serialised TerminologyEntry tag of a lung nodule, in Slicer's `~`/`^` string format."""
    category_scheme, category_value, category_meaning = CATEGORY_CODE
    type_scheme, type_value, type_meaning = TYPE_CODE
    region_scheme, region_value, region_meaning = REGION_CODE
    # Argument order is Slicer's: (value, scheme, meaning) per code.
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT,
        category_value, category_scheme, category_meaning,
        type_value, type_scheme, type_meaning,
        "", "", "",
        ANATOMIC_CONTEXT,
        region_value, region_scheme, region_meaning,
        "", "", "",
    )


# --- volume node ↔ array + geometry -----------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_geometry(volume_node: Any) -> VolumeGeometry:
    """The node's IJK→RAS matrix (its own frame; a parent transform is not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return VolumeGeometry(_matrix_to_numpy(matrix))


def array_from_volume_node(volume_node: Any) -> np.ndarray:
    """A copy of the node's voxels as a [k, j, i] array (single-component scalar volumes only)."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        name = volume_node.GetClassName() if volume_node is not None else "None"
        raise MRMLAdapterError(f"a scalar volume node is needed, got {name}")
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise MRMLAdapterError(f"volume '{volume_node.GetName()}' has no voxels")
    if scalars.GetNumberOfComponents() != 1:
        raise MRMLAdapterError(
            f"volume '{volume_node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel; "
            "a single-component CT is needed"
        )
    dims_ijk = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims_ijk[::-1]).copy()


def volume_from_node(volume_node: Any) -> tuple[np.ndarray, VolumeGeometry]:
    """(voxels [k, j, i] copied, IJK→RAS geometry) of a scalar volume node."""
    return array_from_volume_node(volume_node), volume_geometry(volume_node)


def set_volume_node_array(volume_node: Any, array: np.ndarray, geometry: VolumeGeometry) -> None:
    """Give the node a fresh image holding a copy of `array` ([k, j, i]) and the given IJK→RAS."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise MRMLAdapterError(f"a 3D [k, j, i] array is needed, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(int(array.shape[2]), int(array.shape[1]), int(array.shape[0]))
    flat = np.ascontiguousarray(array).reshape(-1)
    vtk_array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    volume_node.SetIJKToRASMatrix(_numpy_to_matrix(geometry.ijk_to_ras))
    volume_node.SetAndObserveImageData(image)


# --- creating output nodes --------------------------------------------------------------------------------
def _unique_name(scene: Any, name: str) -> str:
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def _new_node(scene: Any, class_name: str, name: str) -> Any:
    node = scene.AddNewNodeByClass(class_name, _unique_name(scene, name))
    if node is None:
        raise MRMLAdapterError(f"the scene cannot create a {class_name}")
    return node


def _follow_input(scene: Any, input_node: Any, node: Any) -> None:
    """Same parent transform as the input, and a place beside it in the subject hierarchy."""
    node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    place_beside(scene, input_node, node)


def _check_output_node(output_node: Any, input_node: Any, class_name: str) -> None:
    if output_node is input_node or (output_node is not None and output_node.GetID() == input_node.GetID()):
        raise MRMLAdapterError("the output node must not be the input volume: the input is never modified")
    if output_node is not None and not output_node.IsA(class_name):
        raise MRMLAdapterError(f"output node '{output_node.GetName()}' is a {output_node.GetClassName()}, "
                               f"a {class_name} is needed")


def create_output_volume(
    scene: Any,
    input_node: Any,
    array: np.ndarray,
    name: str | None = None,
    *,
    output_node: Any = None,
    attributes: Mapping[str, str] | None = None,
) -> Any:
    """A scalar volume with the input's geometry holding `array` (new node, or `output_node` refilled).

    The display copies the input's window/level so the synthetic CT opens looking like the original.
    """
    _check_output_node(output_node, input_node, "vtkMRMLScalarVolumeNode")
    array = np.asarray(array)
    expected = tuple(input_node.GetImageData().GetDimensions()[::-1])
    if array.shape != expected:
        raise MRMLAdapterError(f"array shape {array.shape} differs from the input volume's {expected}")
    node = output_node or _new_node(scene, "vtkMRMLScalarVolumeNode", name or f"{input_node.GetName()} synthetic")
    set_volume_node_array(node, array, volume_geometry(input_node))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    source_display, display = input_node.GetDisplayNode(), node.GetDisplayNode()
    if source_display is not None and display is not None and source_display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        display.SetAutoWindowLevel(source_display.GetAutoWindowLevel())
        if not source_display.GetAutoWindowLevel():
            display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
        if source_display.GetColorNodeID():
            display.SetAndObserveColorNodeID(source_display.GetColorNodeID())
    for key, value in (attributes or {}).items():
        node.SetAttribute(key, str(value))
    _follow_input(scene, input_node, node)
    return node


def create_weight_map_volume(
    scene: Any, input_node: Any, weight_map: np.ndarray, name: str | None = None, *, output_node: Any = None
) -> Any:
    """The fusion weight map W (float32 in [0, 1], 0 outside the patches) as a volume beside the input."""
    node = create_output_volume(
        scene, input_node, np.asarray(weight_map, dtype=np.float32), name or f"{input_node.GetName()} weight map",
        output_node=output_node, attributes={ATTRIBUTE_ROLE: "weightMap"},
    )
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        for colour_id in ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow"):
            if scene.GetNodeByID(colour_id) is not None:
                display.SetAndObserveColorNodeID(colour_id)
                break
    return node


def _ensure_converter_rules() -> None:
    """Register the labelmap↔surface rules when nobody has (Slicer does at start-up; bare slicer-core not)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _oriented_image_from_mask(mask_kji: np.ndarray, geometry: VolumeGeometry) -> Any:
    """A binary vtkOrientedImageData (0/1 uint8) in the given geometry, for SetBinaryLabelmapToSegment."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(int(mask_kji.shape[2]), int(mask_kji.shape[1]), int(mask_kji.shape[0]))
    flat = np.ascontiguousarray(mask_kji, dtype=np.uint8).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(_numpy_to_matrix(geometry.ijk_to_ras))
    return image


def create_nodule_segmentation(
    scene: Any,
    input_node: Any,
    label: np.ndarray,
    provenance: Mapping[str, Any],
    name: str | None = None,
    *,
    num_nodules: int | None = None,
    output_node: Any = None,
) -> Any:
    """One segment per inserted nodule ("Synthetic nodule N" = label value N), terminology and provenance tags.

    A nodule whose label ended up empty still gets its (empty) segment, so segment N is always nodule N.
    """
    _check_output_node(output_node, input_node, "vtkMRMLSegmentationNode")
    label = np.asarray(label)
    expected = tuple(input_node.GetImageData().GetDimensions()[::-1])
    if label.shape != expected:
        raise MRMLAdapterError(f"label shape {label.shape} differs from the input volume's {expected}")
    count = int(num_nodules if num_nodules is not None else (label.max() if label.size else 0))
    _ensure_converter_rules()
    default_name = f"{input_node.GetName()} synthetic nodules"
    node = output_node or _new_node(scene, "vtkMRMLSegmentationNode", name or default_name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    geometry = volume_geometry(input_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for info in nodule_segments(count, provenance):
        segment_id = segmentation.AddEmptySegment(info.segment_id, info.name, info.colour)
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise MRMLAdapterError(f"could not add segment '{info.name}' to the segmentation")
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), info.terminology)
        for key, value in info.tags.items():
            segment.SetTag(key, value)
        mask = label == info.label_value
        if mask.any():
            ok = logic.SetBinaryLabelmapToSegment(
                _oriented_image_from_mask(mask, geometry), node, segment_id, logic.MODE_REPLACE
            )
            if not ok:
                raise MRMLAdapterError(f"could not set the voxels of segment '{info.name}'")
    node.SetAttribute(ATTRIBUTE_ROLE, "noduleSegmentation")
    node.SetAttribute(TAG_PROVENANCE, provenance_tags(provenance)[TAG_PROVENANCE])
    _follow_input(scene, input_node, node)
    return node


def segment_label_array(segmentation_node: Any, segment_id: str, reference_node: Any) -> np.ndarray:
    """A segment's voxels resampled (nearest) into `reference_node`'s grid, as a bool [k, j, i] array (a copy).

    Both sit in their nodes' own frames (no parent transform applied), matching `volume_from_node`.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment_image = slicer.vtkOrientedImageData()
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, segment_image, False):
        raise MRMLAdapterError(f"segment {segment_id!r} has no binary labelmap")
    dims_ijk = reference_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(*dims_ijk)
    reference.SetImageToWorldMatrix(_numpy_to_matrix(volume_geometry(reference_node).ijk_to_ras))
    if segment_image.IsEmpty():
        return np.zeros(dims_ijk[::-1], dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segment_image, reference, resampled
    ):
        raise MRMLAdapterError(f"could not resample segment {segment_id!r} to the reference volume")
    extent = resampled.GetExtent()
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape_kji)
    # The segment's value in a shared labelmap layer may differ from 1: threshold on the segment's own value.
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    out = np.zeros(dims_ijk[::-1], dtype=bool)
    k0, j0, i0 = extent[4], extent[2], extent[0]
    out[k0 : k0 + shape_kji[0], j0 : j0 + shape_kji[1], i0 : i0 + shape_kji[2]] = values == label_value
    return out


def empty_nodule_numbers(segmentation_node: Any, reference_node: Any) -> list[int]:
    """1-based positions of the segments without a voxel in `reference_node`'s grid: segment N is nodule N."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [n for n, segment_id in enumerate(ids, start=1)
            if not segment_label_array(segmentation_node, segment_id, reference_node).any()]


def segments_by_name(segmentation_node: Any) -> dict[str, str]:
    """{segment name: segment id} in segment order."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return {segmentation.GetSegment(i).GetName(): i for i in ids}


# --- subject hierarchy ------------------------------------------------------------------------------------
def place_beside(scene: Any, input_node: Any, node: Any) -> bool:
    """Put `node` in the same subject-hierarchy folder/study as `input_node`; False when there is none."""
    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    if hierarchy_class is None:
        return False
    hierarchy = hierarchy_class.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return False
    input_item = hierarchy.GetItemByDataNode(input_node)
    if not input_item:
        return False
    parent = hierarchy.GetItemParent(input_item)
    if not parent or parent == hierarchy.GetSceneItemID():
        return False
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)
    return True


# --- markups ----------------------------------------------------------------------------------------------
def control_points_ras(point_list_node: Any, volume_node: Any | None = None) -> np.ndarray:
    """The point list's positions (n, 3) in the volume's own RAS frame (world if no volume is given).

    Points are read in world coordinates and mapped through the inverse of the volume's parent transform,
    so a transformed volume and its points agree.
    """
    if point_list_node is None:
        return np.zeros((0, 3))
    count = point_list_node.GetNumberOfControlPoints()
    points = np.zeros((count, 3))
    for index in range(count):
        position = [0.0, 0.0, 0.0]
        point_list_node.GetNthControlPointPositionWorld(index, position)
        points[index] = position
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is not None and count:
        world_to_local = vtk.vtkGeneralTransform()
        parent.GetTransformFromWorld(world_to_local)
        points = np.array([world_to_local.TransformPoint(*p) for p in points])
    return points


def world_points(volume_node: Any, points_local: np.ndarray) -> np.ndarray:
    """Points (n, 3) from the volume's own RAS frame to world (through its parent transform), e.g. to jump
    the slice views, which take world coordinates; the inverse of `control_points_ras`."""
    points = np.asarray(points_local, dtype=np.float64).reshape(-1, 3)
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is None or not len(points):
        return points
    local_to_world = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(local_to_world)
    return np.array([local_to_world.TransformPoint(*p) for p in points])


# --- plots ------------------------------------------------------------------------------------------------
def create_scatter_plot(
    scene: Any,
    xy: np.ndarray,
    labels: Sequence[str],
    highlight: Sequence[str] = (),
    *,
    name: str = "Radiogenomic map",
    x_title: str = "t-SNE 1",
    y_title: str = "t-SNE 2",
    chart_node: Any = None,
) -> Any:
    """A plot chart node: every sample as a point, the `highlight` samples as a second, larger series.

    Returns the vtkMRMLPlotChartNode; its table node (columns x, y, sample) keeps the sample ids so a
    hovered point can be identified in Slicer's plot view. With `chart_node` (a previous map) that chart is
    refilled and its old series and tables removed, so repeated maps do not pile up nodes.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(labels) != len(xy):
        raise MRMLAdapterError(f"{len(labels)} labels for {len(xy)} points")
    chosen = set(highlight)

    def table(table_name: str, rows: list[int]) -> Any:
        node = _new_node(scene, "vtkMRMLTableNode", table_name)
        columns = {"x": vtk.vtkDoubleArray(), "y": vtk.vtkDoubleArray(), "sample": vtk.vtkStringArray()}
        for column_name, column in columns.items():
            column.SetName(column_name)
        for row in rows:
            columns["x"].InsertNextValue(float(xy[row, 0]))
            columns["y"].InsertNextValue(float(xy[row, 1]))
            columns["sample"].InsertNextValue(str(labels[row]))
        for column in columns.values():
            node.AddColumn(column)
        return node

    def series(series_name: str, table_node: Any, colour: tuple[float, float, float], size: float) -> Any:
        node = _new_node(scene, "vtkMRMLPlotSeriesNode", series_name)
        node.SetAndObserveTableNodeID(table_node.GetID())
        node.SetXColumnName("x")
        node.SetYColumnName("y")
        node.SetLabelColumnName("sample")
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        node.SetMarkerSize(size)
        node.SetColor(*colour)
        return node

    if chart_node is not None:
        chart = chart_node
        old = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        chart.RemoveAllPlotSeriesNodeIDs()
        for series_node in old:
            if series_node is not None:
                table_node = series_node.GetTableNode()
                scene.RemoveNode(series_node)
                if table_node is not None:
                    scene.RemoveNode(table_node)
    else:
        chart = _new_node(scene, "vtkMRMLPlotChartNode", name)
    others = [i for i, label in enumerate(labels) if label not in chosen]
    highlighted = [i for i, label in enumerate(labels) if label in chosen]
    cohort = series(f"{name} cohort", table(f"{name} cohort table", others), (0.55, 0.55, 0.55), 8.0)
    chart.AddAndObservePlotSeriesNodeID(cohort.GetID())
    if highlighted:
        marked = series(f"{name} chosen", table(f"{name} chosen table", highlighted), (0.85, 0.1, 0.1), 16.0)
        chart.AddAndObservePlotSeriesNodeID(marked.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    return chart
