"""Where the lung mask is made: the classical threshold recipe, with the pitfalls of real CT handled.

Background patches (training) and nodule positions (the Slicer module) must lie inside the lungs, a known
distance from the pleura, so the mask has to be right on real scans, not only on a clean phantom. Recipe:

1. Work on a block-averaged copy of about `work_mm` voxels (≈ 1.5 mm): the heavy morphology on a full
   512×512×300 scan at native resolution would take tens of seconds; lung boundaries need no sub-mm detail.
2. Threshold (`threshold_hu`, −400 HU: between lung, −850, and fat, −100).
3. Remove the air connected to ANY voxel of the in-plane border of ANY slice — not one corner: a table, or
   −2000/−3024 padding outside a circular field of view, splits the outside air into several pieces. The
   first and last slices are not border here, because the trachea (and lungs cut by the scan range) reach them.
   A border-touching component whose mean is above `outside_air_hu` (−950 HU) is lung, not outside air:
   CTs cropped around the chest have lungs that touch the in-plane border.
4. Remove the trachea and main bronchi: slice-wise air sections that are mostly near-pure air
   (< `airway_hu`, −950 HU; lung parenchyma is ≈ −850 HU) and small (< `max_airway_area_mm2`) are airway
   lumen outside the lungs; from them, near-pure air is followed `airway_follow_mm` into the hilum.
5. Drop air pockets hugging the outside air (hollow table parts: mostly within `shell_mm` of it along a row or
   column), then keep the
   largest component and the second largest when it is at least `second_lung_ratio` of it: the lungs may or
   may not touch, and bowel gas must not be taken for a lung.
6. Per lung: a closing of radius `closing_mm` (in mm, by distance transforms on a ≈3 mm grid), so
   juxta-pleural nodules and hilar vessels up to about that radius are inside; a light smoothing closing;
   hole filling — regions enclosed in 3D (nodules) and slice-wise holes up to `max_hole_mm2` (vessels; the
   cap keeps out the diaphragm dome, which the lung base rings in axial slices); crumbs the airway removal
   left go.
7. Back to the input grid by block repetition.

All distances are in millimetres (`sampling=spacing_kji`), so anisotropic voxels are handled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_CROSS_3D = ndimage.generate_binary_structure(3, 1)
_CROSS_2D_IN_3D = np.zeros((3, 3, 3), dtype=bool)
_CROSS_2D_IN_3D[1] = ndimage.generate_binary_structure(2, 1)


class LungMaskError(ValueError):
    """No lung could be found (e.g. not a chest CT, or not in HU)."""


def _check_spacing(spacing_kji: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing_kji, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_kji must be three positive millimetre values, got {spacing_kji!r}")
    return spacing


def _factors(spacing: np.ndarray, target_mm: float) -> tuple[int, int, int]:
    """Integer block sizes per axis so that a block is about `target_mm` (never below 1)."""
    return tuple(max(1, round(target_mm / s)) for s in spacing)  # type: ignore[return-value]


def _block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping blocks (edge-padded to whole blocks), float32.

    Summed by strided slices axis after axis: several times faster than a reduction over a 6-D reshape.
    """
    if factors == (1, 1, 1):
        return np.asarray(volume, dtype=np.float32)
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors)]
    if any(p[1] for p in pad):
        volume = np.pad(volume, pad, mode="edge")
    # counts of a mask fit in small integers (cheaper to add); HU sums need floats
    accumulate = np.uint8 if volume.dtype == bool and np.prod(factors) < 256 else np.float32
    out: np.ndarray = volume
    for axis in (2, 1, 0):  # the last axis first: the largest reduction on the contiguous data
        f = factors[axis]
        if f == 1:
            continue
        index = [slice(None)] * 3
        index[axis] = slice(0, None, f)
        total = out[tuple(index)].astype(accumulate)
        for r in range(1, f):
            index[axis] = slice(r, None, f)
            total += out[tuple(index)]
        out = total
    return out.astype(np.float32) * np.float32(1.0 / (factors[0] * factors[1] * factors[2]))


def _repeat(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a block grid back onto `shape`."""
    out = mask
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


def _fill_holes(mask: np.ndarray, spacing: np.ndarray, max_hole_mm2: float) -> np.ndarray:
    """Fill holes: every region enclosed in 3D (a nodule inside the lung), and slice-wise holes up to
    `max_hole_mm2` (vessels, nodules touching vessels). The area cap keeps the liver/spleen under the
    diaphragm dome out, which the lung base rings in axial slices."""
    filled = mask.copy()
    labels, count = ndimage.label(~mask, structure=_CROSS_2D_IN_3D)
    if count:
        outside = np.zeros(count + 1, dtype=bool)
        for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            outside[np.unique(face)] = True
        area = np.bincount(labels.ravel(), minlength=count + 1) * (spacing[1] * spacing[2])
        hole = ~outside & (area <= max_hole_mm2)
        hole[0] = False
        filled |= hole[labels]
    labels, count = ndimage.label(~filled, structure=_CROSS_3D)
    if count:
        outside = np.zeros(count + 1, dtype=bool)
        for axis in range(3):
            outside[np.unique(np.take(labels, [0, -1], axis=axis))] = True
        outside[0] = True
        filled |= ~outside[labels]
    return filled


def _closing_mm(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Binary closing with a ball of `radius_mm` via two distance transforms (exact in mm, any spacing)."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    margin = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    padded = np.pad(mask, [(m, m) for m in margin])
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[margin[0] : -margin[0], margin[1] : -margin[1], margin[2] : -margin[2]]


def _bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """Bounding box of a mask grown by `margin` voxels per axis, clipped to the array."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start = max(int(present[0]) - margin[axis], 0)
        stop = min(int(present[-1]) + 1 + margin[axis], mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def _drop_crumbs(mask: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Remove bits left isolated by the airway subtraction (components < `fraction` of the largest)."""
    labels, count = ndimage.label(mask, structure=_CROSS_3D)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = sizes >= fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def _outside_air(air: np.ndarray, coarse_hu: np.ndarray, outside_air_hu: float) -> np.ndarray:
    """Air components touching the in-plane border of any slice (table and padding may split them), unless
    their mean is lung parenchyma rather than air: in a CT cropped around the chest (Slicer's Crop Volume,
    a small reconstruction field of view) the lung itself touches the border. Outside air is ≈ −1000 HU (or
    −2000/−3024 padding), lung ≈ −850 HU, so the mean of the component tells them apart (a mean by
    bincount costs one pass; a median per component would sort the whole outside air)."""
    labels, count = ndimage.label(air, structure=_CROSS_3D)
    outside = np.zeros(count + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[np.unique(face)] = True
    outside[0] = False
    if outside.any():
        flat = labels.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        means = np.bincount(flat, weights=coarse_hu.ravel(), minlength=count + 1) / np.maximum(sizes, 1)
        outside &= means <= outside_air_hu
    return outside[labels]


def _near_in_plane(mask: np.ndarray, spacing: np.ndarray, distance_mm: float) -> np.ndarray:
    """Voxels with a `mask` voxel within `distance_mm` straight along a row or column of their slice.

    A plus-shaped dilation by array shifts: cheap on the full working grid and enough to tell an air pocket
    inside a table's thin shell (outside air a few mm above and below) from a lung behind a chest wall.
    """
    near = mask.copy()
    for axis in (1, 2):
        for step in range(1, int(distance_mm / spacing[axis]) + 1):
            if step >= mask.shape[axis]:
                break
            ahead = [slice(None)] * 3
            behind = [slice(None)] * 3
            ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
            near[tuple(behind)] |= mask[tuple(ahead)]
            near[tuple(ahead)] |= mask[tuple(behind)]
    return near


def _airway_sections(
    candidate: np.ndarray, coarse_hu: np.ndarray, spacing: np.ndarray, airway_hu: float, max_area_mm2: float
) -> np.ndarray:
    """Slice-wise air sections that are mostly near-pure air and small: trachea/main-bronchus lumen."""
    labels, count = ndimage.label(candidate, structure=_CROSS_2D_IN_3D)
    if count == 0:
        return np.zeros_like(candidate)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)
    pure = np.bincount(flat, weights=(coarse_hu < airway_hu).ravel(), minlength=count + 1)
    pixel_mm2 = spacing[1] * spacing[2]
    airway = (pure >= 0.5 * np.maximum(area, 1)) & (area * pixel_mm2 <= max_area_mm2)
    airway[0] = False
    return airway[labels]


def compute_lung_mask(
    volume_hu: np.ndarray,
    spacing_kji: Sequence[float],
    *,
    threshold_hu: float = -400.0,
    airway_hu: float = -950.0,
    outside_air_hu: float = -950.0,
    max_airway_area_mm2: float = 900.0,
    airway_follow_mm: float = 20.0,
    closing_mm: float = 10.0,
    max_hole_mm2: float = 1000.0,
    shell_mm: float = 6.0,
    second_lung_ratio: float = 0.1,
    work_mm: float = 1.5,
) -> np.ndarray:
    """Both lungs (bool, same [k,j,i] shape as the volume) by the classical recipe; see the module docstring.

    Raises LungMaskError when no lung-sized air region exists inside the body.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"volume_hu must be a 3D [k, j, i] array, got shape {volume.shape}")
    spacing = _check_spacing(spacing_kji)
    if min(volume.shape[1:]) < 3:
        raise LungMaskError(f"volume of shape {volume.shape} is too small for a lung mask")

    # 1. working grid of ≈ work_mm voxels
    factors = _factors(spacing, work_mm)
    coarse = _block_mean(volume, factors)
    work_spacing = spacing * np.asarray(factors)

    # 2–3. threshold, remove outside air (every in-plane border voxel of every slice)
    air = coarse < threshold_hu
    outside = _outside_air(air, coarse, outside_air_hu)
    candidate = air & ~outside

    # 4. trachea and main bronchi
    airway = _airway_sections(candidate, coarse, work_spacing, airway_hu, max_airway_area_mm2)
    if airway.any() and airway_follow_mm > 0:
        margin = [int(np.ceil(airway_follow_mm / s)) + 1 for s in work_spacing]
        box = _bbox(airway, margin)
        steps = int(np.ceil(airway_follow_mm / work_spacing.min()))
        pure = candidate[box] & (coarse[box] < airway_hu)
        airway[box] = ndimage.binary_dilation(airway[box], _CROSS_3D, iterations=steps, mask=pure | airway[box])
    candidate &= ~airway

    # 5. components: drop air hugging the outside (table cavities), keep one or two lungs
    labels, count = ndimage.label(candidate, structure=_CROSS_3D)
    if count == 0:
        raise LungMaskError("no air region inside the body (is this a chest CT in Hounsfield units?)")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    near_outside = _near_in_plane(outside, work_spacing, shell_mm)
    near = np.bincount(labels.ravel(), weights=near_outside.ravel(), minlength=count + 1)
    sizes[near > 0.5 * np.maximum(sizes, 1)] = 0
    order = np.argsort(sizes)[::-1]
    if sizes[order[0]] == 0:
        raise LungMaskError("no air region inside the body (is this a chest CT in Hounsfield units?)")
    keep = [int(order[0])]
    if count >= 2 and sizes[order[1]] >= second_lung_ratio * sizes[order[0]]:
        keep.append(int(order[1]))

    # 6. per lung: mm closing on the ≈3 mm grid, slice-wise hole filling, light smoothing
    lungs = np.zeros_like(candidate)
    grid = _factors(work_spacing, 3.0)
    close_margin = [int(np.ceil((closing_mm + 3.0) / s)) + 1 for s in work_spacing]
    for label in keep:
        component = labels == label
        box = _bbox(component, close_margin)
        part = component[box]
        part_grid = _block_mean(part, grid) >= 0.5
        added_grid = _closing_mm(part_grid, work_spacing * grid, closing_mm) & ~part_grid
        part = part | _repeat(added_grid, grid, part.shape)
        part = ndimage.binary_closing(part, _CROSS_3D, iterations=1, border_value=0) | part
        lungs[box] |= _fill_holes(part, work_spacing, max_hole_mm2)
    lungs &= ~airway
    lungs = _drop_crumbs(lungs)

    # 7. back to the input grid
    return _repeat(lungs, factors, volume.shape)


def boundary_distance_mm(lung_mask: np.ndarray, spacing_kji: Sequence[float]) -> np.ndarray:
    """Distance in mm from every lung voxel to the nearest non-lung voxel (0 outside the lung), float32.

    Outside the volume counts as outside the lung, so a centre near the scan edge is not taken for deep lung.
    Exact (one full distance transform); `placement.sample_lung_centres` uses a faster coarse-then-exact route.
    """
    spacing = _check_spacing(spacing_kji)
    mask = np.asarray(lung_mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"lung_mask must be a 3D [k, j, i] array, got shape {mask.shape}")
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded, sampling=spacing)
    return distance[1:-1, 1:-1, 1:-1].astype(np.float32)
