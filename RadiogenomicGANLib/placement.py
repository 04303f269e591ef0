"""Where a nodule (or a background patch) may go: lung locations a set distance from the pleura.

Used by `training.prepare` for the paper's background VOIs (centres 5–25 mm from the boundary of the lung
mask with the nodule excluded), and by the Slicer module to place nodules automatically and to check a
clicked point. Distances are Euclidean in millimetres; the edge of the volume counts as lung boundary.

On large volumes an exact distance transform of the whole mask costs seconds, so `sample_lung_centres`
finds candidates on a ≈3 mm grid with a tolerance and then checks each chosen voxel exactly in a small
window around it: the returned centres satisfy the bounds exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.lungmask import _block_mean, _check_spacing, _factors, boundary_distance_mm

#: Masks up to this many voxels get one exact distance transform; larger ones go the coarse-then-exact route.
EXACT_LIMIT_VOXELS = 250_000
_COARSE_MM = 3.0


class PlacementError(ValueError):
    """No (or not enough) valid lung location; the message says which constraint could not be met."""


def _margin_voxels(margin_mm: float | Sequence[float], spacing: np.ndarray) -> np.ndarray:
    margin = np.broadcast_to(np.asarray(margin_mm, dtype=np.float64), (3,))
    if np.any(margin < 0):
        raise ValueError(f"exclude_margin_mm must be ≥ 0, got {margin_mm!r}")
    return np.floor(margin / spacing + 1e-9).astype(int)


def _box_dilate(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Dilation by a box of half-widths `radius` voxels (separable, O(N) per axis)."""
    out = mask.astype(np.uint8)
    for axis, r in enumerate(radius):
        if r > 0:
            out = ndimage.maximum_filter1d(out, size=2 * int(r) + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def local_distance_mm(mask: np.ndarray, spacing_kji: Sequence[float], kji: Sequence[int], limit_mm: float) -> float:
    """Exact distance (mm) from voxel `kji` of `mask` to the nearest voxel outside it, or to the volume edge.

    Looks only `limit_mm` around the voxel: returns `inf` when nothing outside lies within `limit_mm`.
    Returns 0 when the voxel itself is outside the mask.
    """
    spacing = np.asarray(spacing_kji, dtype=np.float64)
    point = np.asarray(kji, dtype=int)
    shape = np.asarray(mask.shape)
    if not mask[tuple(point)]:
        return 0.0
    # the volume edge: the voxel layer just outside the array
    edge = float(np.min(np.minimum(point + 1, shape - point) * spacing))
    radius = np.ceil(limit_mm / spacing).astype(int) + 1
    low, high = np.maximum(point - radius, 0), np.minimum(point + radius + 1, shape)
    window = mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    outside = np.argwhere(~window)
    best = edge
    if outside.size:
        offsets = (outside + low - point) * spacing
        best = min(best, float(np.sqrt(np.min(np.einsum("ij,ij->i", offsets, offsets)))))
    return best if best <= limit_mm else float("inf")


def _excluded_near(exclude_points: np.ndarray | None, kji: np.ndarray, margin: np.ndarray) -> bool:
    """Whether an excluded voxel lies inside the box of half-widths `margin` around `kji`."""
    if exclude_points is None or exclude_points.size == 0:
        return False
    return bool(np.any(np.all(np.abs(exclude_points - kji) <= margin, axis=1)))


def sample_lung_centres(
    lung_mask: np.ndarray,
    spacing_kji: Sequence[float],
    n: int,
    rng: np.random.Generator,
    *,
    min_mm: float = 5.0,
    max_mm: float = 25.0,
    exclude_mask: np.ndarray | None = None,
    exclude_margin_mm: float | Sequence[float] = 0.0,
    min_separation_mm: float = 20.0,
    allow_fewer: bool = False,
    max_tries: int | None = None,
) -> np.ndarray:
    """`n` random lung voxels (int [k, j, i] rows) `min_mm`–`max_mm` from the lung boundary, deterministic in `rng`.

    - The distance is to the boundary of `lung_mask` minus `exclude_mask` (the paper: nodule excluded first).
    - A centre is also refused when an excluded voxel lies within `exclude_margin_mm` of it along every axis at
      once (a box, scalar or per-axis (k, j, i)): with half-widths of half a patch plus a voxel in-plane and half
      the VOI along k, no patch cut at the centre on the VOI's slices touches the excluded region.
    - Centres are at least `min_separation_mm` apart (Euclidean).
    Raises PlacementError when no location qualifies, or fewer than `n` do and `allow_fewer` is False.
    """
    spacing = _check_spacing(spacing_kji)
    lung = np.asarray(lung_mask, dtype=bool)
    if lung.ndim != 3:
        raise ValueError(f"lung_mask must be a 3D [k, j, i] array, got shape {lung.shape}")
    if not 0 <= min_mm <= max_mm:
        raise ValueError(f"need 0 ≤ min_mm ≤ max_mm, got {min_mm}, {max_mm}")
    if n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    region = lung
    exclude_points = None
    margin = _margin_voxels(exclude_margin_mm, spacing)
    if exclude_mask is not None:
        exclude = np.asarray(exclude_mask, dtype=bool)
        if exclude.shape != lung.shape:
            raise ValueError(f"exclude_mask shape {exclude.shape} differs from lung_mask shape {lung.shape}")
        region = lung & ~exclude
        exclude_points = np.argwhere(exclude)
    what = f"{min_mm:g}–{max_mm:g} mm from the lung boundary"
    if exclude_points is not None and exclude_points.size:
        what += " and clear of the excluded region"
    if not region.any():
        raise PlacementError("the lung mask is empty: no location can be placed")

    if region.size <= EXACT_LIMIT_VOXELS:
        distance = boundary_distance_mm(region, spacing)
        valid = (distance >= min_mm) & (distance <= max_mm)
        if exclude_points is not None and exclude_points.size:
            valid &= ~_box_dilate(exclude_mask, margin)
        candidates = np.argwhere(valid)
        block = None
    else:
        block = _factors(spacing, _COARSE_MM)
        coarse_spacing = spacing * np.asarray(block)
        tolerance = float(np.linalg.norm(coarse_spacing))
        fraction = _block_mean(region, block)
        coarse_region = fraction > 0
        padded = np.pad(fraction >= 0.5, 1)
        coarse_distance = ndimage.distance_transform_edt(padded, sampling=coarse_spacing)[1:-1, 1:-1, 1:-1]
        valid = coarse_region & (coarse_distance >= min_mm - tolerance) & (coarse_distance <= max_mm + tolerance)
        if exclude_points is not None and exclude_points.size:
            coarse_margin = np.maximum(np.round(margin / np.asarray(block)).astype(int) - 1, 0)
            valid &= ~_box_dilate(_block_mean(exclude_mask, block) > 0.5, coarse_margin)
        candidates = np.argwhere(valid)
    if candidates.size == 0:
        raise PlacementError(f"no lung location lies {what}")

    order = rng.permutation(len(candidates))
    limit = max_tries if max_tries is not None else (len(order) if block is None else 200 * n + 2000)
    chosen: list[np.ndarray] = []
    chosen_mm = np.zeros((0, 3))
    for index in order[:limit]:
        point = candidates[index]
        if block is not None:
            point = _fine_voxel(region, point, block, rng)
            if point is None:
                continue
        position = point * spacing
        if chosen and np.min(np.linalg.norm(chosen_mm - position, axis=1)) < min_separation_mm:
            continue  # the cheap test first
        if block is not None:
            if _excluded_near(exclude_points, point, margin):
                continue
            distance_mm = local_distance_mm(region, spacing, point, max_mm)
            if not min_mm <= distance_mm <= max_mm:
                continue
        chosen.append(point)
        chosen_mm = np.vstack([chosen_mm, position])
        if len(chosen) == n:
            break
    if not chosen:
        raise PlacementError(f"no lung location lies {what}")
    if len(chosen) < n and not allow_fewer:
        raise PlacementError(f"only {len(chosen)} of {n} locations {what} fit at least {min_separation_mm:g} mm apart")
    return np.asarray(chosen, dtype=np.int64).reshape(-1, 3)


def _fine_voxel(
    region: np.ndarray, coarse: np.ndarray, block: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray | None:
    """A random voxel of `region` inside coarse block `coarse` (None when the block holds none)."""
    low = coarse * np.asarray(block)
    high = np.minimum(low + np.asarray(block), region.shape)
    inside = np.argwhere(region[low[0] : high[0], low[1] : high[1], low[2] : high[2]])
    if inside.size == 0:
        return None
    return inside[rng.integers(len(inside))] + low


def check_centre(
    lung_mask: np.ndarray,
    geometry: VolumeGeometry,
    centre_ras: Sequence[float] | np.ndarray,
    *,
    min_mm: float = 0.0,
    max_mm: float | None = None,
) -> str | None:
    """None when `centre_ras` is a valid lung location, else the reason, for the user ("outside the lung", …)."""
    lung = np.asarray(lung_mask, dtype=bool)
    kji_float = geometry.ras_to_kji(np.asarray(centre_ras, dtype=np.float64).reshape(1, 3))[0]
    kji = np.round(kji_float).astype(int)
    if np.any(kji < 0) or np.any(kji >= np.asarray(lung.shape)):
        return "outside the volume"
    if not lung[tuple(kji)]:
        return "outside the lung"
    if min_mm > 0 or max_mm is not None:
        limit = max(min_mm, max_mm if max_mm is not None else 0.0)
        distance = local_distance_mm(lung, geometry.spacing_kji, kji, limit)
        if distance < min_mm:
            return f"{distance:.1f} mm from the lung boundary, closer than {min_mm:g} mm"
        if max_mm is not None and distance > max_mm:
            return f"more than {max_mm:g} mm from the lung boundary"
    return None
