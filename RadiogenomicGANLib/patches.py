"""Where a patch is cut out of a CT slice and pasted back (design: the 60 mm patch, the feathered composite).

A patch is a square of `size_px × size_px` pixels at `spacing_mm` (60 mm × 60 mm at 64×64 by default) lying
in the plane of one slice k of the volume. It is resampled in millimetres from the volume's IJK→RAS
geometry, so volumes of any spacing and orientation give patches of the same physical size. Patch columns
run towards patient left and rows towards posterior — the usual axial display — whatever the orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from RadiogenomicGANLib.geometry import VolumeGeometry

DEFAULT_PATCH_SIZE = 64
DEFAULT_PATCH_SPACING_MM = 60.0 / 64


@dataclass(frozen=True)
class PatchFrame:
    """Maps patch pixel (row, col) to continuous (j, i) of slice k: ji = origin + row·row_step + col·col_step."""

    slice_k: int
    origin_ji: np.ndarray
    row_step_ji: np.ndarray
    col_step_ji: np.ndarray
    size_px: int

    def pixel_to_ji(self) -> tuple[np.ndarray, np.ndarray]:
        """Continuous (j, i) of every patch pixel centre, each (S, S)."""
        rows, cols = np.mgrid[0 : self.size_px, 0 : self.size_px].astype(np.float64)
        j = self.origin_ji[0] + rows * self.row_step_ji[0] + cols * self.col_step_ji[0]
        i = self.origin_ji[1] + rows * self.row_step_ji[1] + cols * self.col_step_ji[1]
        return j, i

    def ji_to_pixel(self, j: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `pixel_to_ji`: continuous (row, col) of slice voxels (j, i)."""
        basis = np.array([[self.row_step_ji[0], self.col_step_ji[0]], [self.row_step_ji[1], self.col_step_ji[1]]])
        inverse = np.linalg.inv(basis)
        dj, di = j - self.origin_ji[0], i - self.origin_ji[1]
        return inverse[0, 0] * dj + inverse[0, 1] * di, inverse[1, 0] * dj + inverse[1, 1] * di

    def footprint_ji(self, shape_ji: tuple[int, int]) -> tuple[slice, slice]:
        """Bounding box of the patch in slice voxels, clipped to the slice."""
        corners_r = np.array([0, 0, self.size_px - 1, self.size_px - 1], dtype=np.float64)
        corners_c = np.array([0, self.size_px - 1, 0, self.size_px - 1], dtype=np.float64)
        j = self.origin_ji[0] + corners_r * self.row_step_ji[0] + corners_c * self.col_step_ji[0]
        i = self.origin_ji[1] + corners_r * self.row_step_ji[1] + corners_c * self.col_step_ji[1]
        j0, j1 = max(int(np.floor(j.min())), 0), min(int(np.ceil(j.max())) + 1, shape_ji[0])
        i0, i1 = max(int(np.floor(i.min())), 0), min(int(np.ceil(i.max())) + 1, shape_ji[1])
        return slice(j0, max(j0, j1)), slice(i0, max(i0, i1))


def patch_frame(
    geometry: VolumeGeometry,
    centre_ras: np.ndarray,
    slice_k: int,
    size_px: int = DEFAULT_PATCH_SIZE,
    spacing_mm: float = DEFAULT_PATCH_SPACING_MM,
) -> PatchFrame:
    """The patch of slice k centred on the projection of `centre_ras` onto that slice."""
    centre_ijk = geometry.ras_to_ijk_points(centre_ras)[0]
    axes_ras = geometry.ijk_to_ras[:3, :3]  # columns: RAS step of one voxel along i, j, k
    # Choose the in-plane voxel axes whose directions best match patient left (−R) and posterior (−A).
    in_plane = axes_ras[:, :2]  # i and j columns
    unit = in_plane / np.linalg.norm(in_plane, axis=0)
    left, posterior = np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
    # Pick the assignment (i→cols, j→rows) or (j→cols, i→rows) that best matches the display axes.
    straight = abs(unit[:, 0] @ left) + abs(unit[:, 1] @ posterior)
    swapped = abs(unit[:, 1] @ left) + abs(unit[:, 0] @ posterior)
    col_axis, row_axis = (0, 1) if straight >= swapped else (1, 0)  # index into (i, j)
    col_sign = 1.0 if unit[:, col_axis] @ left >= 0 else -1.0
    row_sign = 1.0 if unit[:, row_axis] @ posterior >= 0 else -1.0
    spacing_ij = geometry.spacing[:2]
    col_step_ij = np.zeros(2)
    row_step_ij = np.zeros(2)
    col_step_ij[col_axis] = col_sign * spacing_mm / spacing_ij[col_axis]
    row_step_ij[row_axis] = row_sign * spacing_mm / spacing_ij[row_axis]
    half = (size_px - 1) / 2.0
    origin_ij = centre_ijk[:2] - half * (col_step_ij + row_step_ij)
    return PatchFrame(
        slice_k=int(slice_k),
        origin_ji=origin_ij[::-1].copy(),
        row_step_ji=row_step_ij[::-1].copy(),
        col_step_ji=col_step_ij[::-1].copy(),
        size_px=size_px,
    )


def extract_patch(
    volume_kji: np.ndarray,
    geometry: VolumeGeometry,
    centre_ras: np.ndarray,
    slice_k: int,
    size_px: int = DEFAULT_PATCH_SIZE,
    spacing_mm: float = DEFAULT_PATCH_SPACING_MM,
    order: int = 1,
    fill: float = -1000.0,
) -> np.ndarray:
    """Resample the patch of slice k around `centre_ras` (float32; outside the volume → `fill`)."""
    if not 0 <= slice_k < volume_kji.shape[0]:
        raise IndexError(f"slice {slice_k} is outside the volume (0…{volume_kji.shape[0] - 1})")
    frame = patch_frame(geometry, centre_ras, slice_k, size_px, spacing_mm)
    j, i = frame.pixel_to_ji()
    plane = np.asarray(volume_kji[slice_k], dtype=np.float32)
    patch = ndimage.map_coordinates(plane, [j, i], order=order, mode="constant", cval=fill, prefilter=False)
    return patch.astype(np.float32)


def extract_mask_patch(
    mask_kji: np.ndarray,
    geometry: VolumeGeometry,
    centre_ras: np.ndarray,
    slice_k: int,
    size_px: int = DEFAULT_PATCH_SIZE,
    spacing_mm: float = DEFAULT_PATCH_SPACING_MM,
) -> np.ndarray:
    """Resample a binary mask patch: linear interpolation then ≥ 0.5, so edges follow the partial volume."""
    patch = extract_patch(mask_kji.astype(np.float32), geometry, centre_ras, slice_k, size_px, spacing_mm, 1, 0.0)
    return patch >= 0.5


def resample_to_slice(
    patch: np.ndarray, frame: PatchFrame, shape_ji: tuple[int, int], order: int = 1
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Resample a patch back onto the voxels of its slice: (footprint box, values inside the box).

    Voxels up to half a patch pixel beyond the outermost pixel centres take the edge value (mode "nearest");
    the composite alpha is zero there anyway.
    """
    box = frame.footprint_ji(shape_ji)
    jj, ii = np.mgrid[box[0], box[1]].astype(np.float64)
    rows, cols = frame.ji_to_pixel(jj, ii)
    values = ndimage.map_coordinates(
        np.asarray(patch, dtype=np.float32), [rows, cols], order=order, mode="nearest", prefilter=False
    )
    return box, values.astype(np.float32)


def feather_alpha(mask: np.ndarray, dilate_px: int = 2, border_px: int = 6, fall_px: float = 3.0) -> np.ndarray:
    """Composite weight in patch pixels: 1 over the dilated mask, 0 from `fall_px` beyond it and well inside
    the border.

    The fall-off is a smooth step of the distance from the dilated mask that reaches exactly 0 at `fall_px`
    (about 3 mm at the default 0.94 mm/px): a Gaussian tail used to carry the network's re-drawn background
    ~10 mm out, over vessels and chest wall the nodule never touched. Everything within `border_px` of the
    patch edge is forced to 0 so the pasted region never reaches the edge of the patch (no seam).
    """
    size = mask.shape[0]
    core = ndimage.binary_dilation(mask > 0.5, iterations=dilate_px) if dilate_px > 0 else mask > 0.5
    if not core.any():
        return np.zeros(mask.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~core)
    t = np.clip(1.0 - distance / max(fall_px, 1e-6), 0.0, 1.0)
    alpha = t * t * (3.0 - 2.0 * t)  # smoothstep: 1 at the mask, 0 at fall_px, no kink at either end
    rows, cols = np.mgrid[0:size, 0:size]
    to_edge = np.minimum.reduce([rows, cols, size - 1 - rows, size - 1 - cols]).astype(np.float64)
    # Smooth ramp from 0 at `border_px` from the edge up to 1 at 2·border_px.
    ramp = np.clip((to_edge - border_px) / max(border_px, 1), 0.0, 1.0)
    return (alpha * ramp).astype(np.float32)
