"""Procedural chest anatomy on an axial voxel grid: body, fat, muscle, ribs, spine, lungs, vessels, airways.

Why procedural and analytic: the phantom must be cheap (20 patients at 256² in under a minute on 2 cores)
and its truth exact. Everything that does not change along z (body outline, fat and muscle layers, spine,
table) is a 2D map broadcast over slices; lungs, ribs and the diaphragm are a few broadcast 3D comparisons;
vessels and airways are tapered capsules rasterised inside their own bounding boxes.

Coordinates are DICOM LPS millimetres (x → patient left, y → posterior, z → superior); the grid is
``x_i = x0 + i·dx``, ``y_j = y0 + j·dx``, ``z_k = z0 + k·dz`` (DICOM-standard axial orientation).
HU values follow published CT values: air −1000, lung −850 (denser posteriorly), fat −100, muscle/blood 40,
bone 400–1000, outside the reconstruction circle −2000 or −3024 padding on some patients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Tissue labels of the label map (uint8).
OUTSIDE, FAT, MUSCLE, SOFT, BONE_CORTEX, BONE_MARROW, LUNG, ABDOMEN, TABLE, CSF, AIRWAY = range(11)
TISSUE_HU = np.array([-1000.0, -100.0, 40.0, 40.0, 900.0, 420.0, -850.0, 55.0, 120.0, 15.0, -1000.0], np.float32)


@dataclass(frozen=True)
class Grid:
    """Axis-aligned LPS sampling grid of one volume."""

    x: np.ndarray  # (I,) mm
    y: np.ndarray  # (J,) mm
    z: np.ndarray  # (K,) mm
    dx: float
    dz: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z.size, self.y.size, self.x.size

    def to_index(self, p: np.ndarray) -> np.ndarray:
        """LPS mm (…,3) → continuous (k, j, i) index (…,3)."""
        p = np.asarray(p, dtype=np.float64)
        return np.stack(
            [(p[..., 2] - self.z[0]) / self.dz, (p[..., 1] - self.y[0]) / self.dx, (p[..., 0] - self.x[0]) / self.dx],
            axis=-1,
        )

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box (k, j, i slices) covering the LPS mm box [lo, hi]; None if outside the grid."""
        a = np.floor(self.to_index(lo)).astype(int)
        b = np.ceil(self.to_index(hi)).astype(int) + 1
        a = np.maximum(a, 0)
        b = np.minimum(b, self.shape)
        if np.any(b <= a):
            return None
        return slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2])


@dataclass(frozen=True)
class ChestParams:
    """Per-patient anatomical parameters (mm, LPS, body centre at (bx, by))."""

    bx: float
    by: float
    body_a: float  # lateral semi-axis
    body_b: float  # AP semi-axis
    fat: float
    muscle: float
    z_base: float  # lowest lung point (lateral costophrenic recess)
    lung_height: float
    dome: float  # diaphragm dome height
    mediastinum: float  # half-width of the mediastinum between the lungs
    heart: float  # extra half-width of the heart on the left
    vertebra_r: float
    trachea_r: float
    rib_pitch: float
    rib_width: float
    rib_drop: float
    rib_phase: float
    lung_gradient: float  # HU added from anterior to posterior lung (gravity)
    table: bool
    padding_hu: float | None  # value outside the reconstruction circle (None: plain air)
    fov_radius: float

    @property
    def scale(self) -> float:
        return self.body_a / 165.0


def draw_chest_params(rng: np.random.Generator, fov: float, z0: float | None = None) -> ChestParams:
    """Body sized to the reconstruction FOV (scanners set the FOV to the patient), lungs to the body."""
    r_fov = fov / 2.0
    body_a = r_fov * rng.uniform(0.82, 0.91)
    s = body_a / 165.0
    lung_height = 225.0 * s * rng.uniform(0.9, 1.08)
    return ChestParams(
        bx=rng.normal(0.0, 4.0),
        by=-0.06 * r_fov + rng.normal(0.0, 4.0),
        body_a=body_a,
        body_b=body_a * rng.uniform(0.62, 0.72),
        fat=rng.uniform(5.0, 22.0) * s,
        muscle=rng.uniform(8.0, 14.0) * s,
        z_base=0.0 if z0 is None else z0,
        lung_height=lung_height,
        dome=rng.uniform(30.0, 50.0) * s,
        mediastinum=rng.uniform(11.0, 15.0) * s,
        heart=rng.uniform(30.0, 45.0) * s,
        vertebra_r=rng.uniform(15.0, 19.0) * s,
        trachea_r=rng.uniform(7.5, 10.0) * s,
        rib_pitch=rng.uniform(24.0, 30.0) * s,
        rib_width=rng.uniform(9.0, 12.0) * s,
        rib_drop=rng.uniform(35.0, 60.0) * s,
        rib_phase=rng.uniform(0.0, 30.0),
        lung_gradient=rng.uniform(30.0, 70.0),
        table=bool(rng.random() < 0.75),
        padding_hu=[None, -2000.0, -3024.0][int(rng.integers(3))],
        fov_radius=r_fov,
    )


@dataclass
class Chest:
    """Outputs of `build_chest`: float HU (no noise yet), masks and the label map."""

    hu: np.ndarray  # float32 (K,J,I)
    labels: np.ndarray  # uint8 (K,J,I)
    lung_mask: np.ndarray  # bool (K,J,I) both lungs (parenchyma, vessels, intrapulmonary airways)
    lung_side: np.ndarray  # int8 (K,J,I): 0 none, 1 right lung, 2 left lung
    body_mask: np.ndarray  # bool (K,J,I)
    fov_mask: np.ndarray  # bool (J,I) inside the reconstruction circle
    carina: np.ndarray  # LPS mm


def _ellipse_radius(cos_t: np.ndarray, sin_t: np.ndarray, a: float, b: float) -> np.ndarray:
    """Distance from the centre to an ellipse boundary along each direction."""
    return a * b / np.sqrt((b * cos_t) ** 2 + (a * sin_t) ** 2)


def lung_field(p: ChestParams) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Return lung_side(x, y, z) for broadcastable LPS arrays: 0 none, 1 right lung (x<0), 2 left lung."""
    s = p.scale
    a_c = p.body_a - p.fat - p.muscle
    b_c = p.body_b - p.fat - p.muscle
    y_vb = b_c - p.vertebra_r - 4.0 * s
    y_tr = y_vb - p.vertebra_r - p.trachea_r - 10.0 * s
    pleura = 3.0 * s

    def side(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        X = x - p.bx
        Y = y - p.by
        t = (z - p.z_base) / p.lung_height
        r = np.sqrt(X**2 + Y**2) + 1e-9
        # Cavity minus pleura, with the paraspinal muscle bulge posteriorly.
        psi = np.arccos(np.clip(Y / r, -1.0, 1.0))  # 0 = posterior midline
        r_cav = _ellipse_radius(X / r, Y / r, a_c, b_c) - 22.0 * s * np.exp(-((psi / 0.35) ** 2)) - pleura
        inside = r < r_cav
        # Medial limit: mediastinum + vertebra + trachea (upper) + heart (lower, larger on the left).
        med = p.mediastinum + (p.vertebra_r + 8.0 * s) * np.exp(-(((Y - y_vb) / (p.vertebra_r + 6.0 * s)) ** 2))
        med = med + (p.trachea_r + 6.0 * s) * np.exp(-(((Y - y_tr) / (14.0 * s)) ** 2)) * (t > 0.55)
        heart_t = np.sqrt(np.clip(1.0 - t / 0.55, 0.0, 1.0))
        heart = p.heart * heart_t * np.exp(-(((Y + 0.35 * b_c) / (0.45 * b_c)) ** 2))
        # Apex taper: cross-section shrinks to the apex above t = 0.55.
        w = np.sqrt(np.clip(1.0 - ((t - 0.4) / 0.6) ** 2, 0.0, 1.0))
        w = np.where(t < 0.4, 1.0, w)
        out = np.zeros(np.broadcast_shapes(X.shape, Y.shape, t.shape), dtype=np.int8)
        for code, sign, z_shift, heart_gain in ((1, -1.0, 10.0 * s, 0.6), (2, 1.0, 0.0, 1.3)):
            xs = sign * X
            xc = 0.55 * a_c
            q = ((xs - xc) / (0.45 * a_c)) ** 2 + ((Y + 0.05 * b_c) / (0.85 * b_c)) ** 2
            floor = p.z_base + z_shift + p.dome * np.clip(1.0 - q, 0.0, 1.0)
            taper = ((xs - xc) / (0.55 * a_c * w + 1e-6)) ** 2 + ((Y + 0.05 * b_c) / (1.0 * b_c * w + 1e-6)) ** 2
            lung = inside & (xs > med + heart_gain * heart) & (taper < 1.0) & (z > floor) & (t < 1.0)
            out[lung] = code
        return out

    return side


def _capsule_occupancy(
    grid: Grid, box: tuple[slice, slice, slice], a: np.ndarray, b: np.ndarray, r0: float, r1: float, soft: float
) -> np.ndarray:
    """Partial-volume occupancy (0..1) of a tapered capsule a→b (radius r0→r1) inside an index box."""
    z = grid.z[box[0]][:, None, None]
    y = grid.y[box[1]][None, :, None]
    x = grid.x[box[2]][None, None, :]
    ab = b - a
    denom = float(ab @ ab) + 1e-12
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    d = np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)
    radius = r0 + (r1 - r0) * t
    return np.clip((radius - d) / soft + 0.5, 0.0, 1.0).astype(np.float32)


def paint_capsules(
    hu: np.ndarray,
    grid: Grid,
    segments: list[tuple[np.ndarray, np.ndarray, float, float]],
    value: float,
    restrict: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label: int | None = None,
) -> None:
    """Blend `value` into `hu` over tapered capsules, optionally only where `restrict` is True."""
    soft = grid.dx
    for a, b, r0, r1 in segments:
        pad = max(r0, r1) + soft
        box = grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            continue
        occ = _capsule_occupancy(grid, box, a, b, r0, r1, soft)
        if restrict is not None:
            occ *= restrict[box]
        view = hu[box]
        view += occ * (value - view)
        if labels is not None and label is not None:
            labels[box][occ >= 0.5] = label


def _smooth_1d(rng: np.random.Generator, n: int, correlation_px: float) -> np.ndarray:
    """Unit-variance smooth random profile of length n (float32), for separable textures."""
    sigma = max(1.0, correlation_px)
    prof = ndimage.gaussian_filter1d(rng.standard_normal(n + int(6 * sigma)), sigma, mode="wrap")[: n]
    return (prof / (prof.std() + 1e-9)).astype(np.float32)


def _rotate_towards(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector d by `angle` around a random perpendicular axis."""
    u = rng.standard_normal(3)
    u -= (u @ d) * d
    u /= np.linalg.norm(u) + 1e-12
    return np.cos(angle) * d + np.sin(angle) * u


def grow_tree(
    root: np.ndarray,
    directions: list[np.ndarray],
    length: float,
    radius: float,
    generations: int,
    inside: Callable[[np.ndarray], bool],
    rng: np.random.Generator,
    *,
    min_radius: float = 0.7,
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Bifurcating tree of tapered segments; branches stop where their tip would leave the organ."""
    segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    stack = [(root, d / np.linalg.norm(d), length, radius, 0) for d in directions]
    while stack:
        p, d, length_, r, gen = stack.pop()
        tip = p + length_ * d
        if not inside(tip):  # one retry at half length, then the branch ends at the pleura
            length_ *= 0.5
            tip = p + length_ * d
            if gen > 0 and (length_ < 2.0 or not inside(tip)):
                continue
        r_end = max(min_radius, 0.92 * r)
        segments.append((p, tip, r, r_end))
        if gen + 1 < generations and r_end * 0.85 >= min_radius:
            for _ in range(2):
                child = _rotate_towards(d, rng.uniform(0.3, 0.65), rng)
                stack.append((tip, child, length_ * rng.uniform(0.7, 0.85), r_end * 0.85, gen + 1))
    return segments


def build_chest(grid: Grid, p: ChestParams, rng: np.random.Generator) -> Chest:
    """Rasterise the chest: label map → HU, then vessels and airways, then the lung/body truth masks."""
    K, J, I = grid.shape
    s = p.scale
    X = (grid.x - p.bx)[None, :]  # (1, I)
    Y = (grid.y - p.by)[:, None]  # (J, 1)
    r = np.sqrt(X**2 + Y**2) + 1e-9
    cos_t, sin_t = X / r, Y / r
    psi = np.arccos(np.clip(sin_t, -1.0, 1.0))  # 0 = posterior midline, π = anterior

    # --- 2D layers (constant along z) ---------------------------------------------------------------
    r_body = _ellipse_radius(cos_t, sin_t, p.body_a, p.body_b)
    paraspinal = 22.0 * s * np.exp(-((psi / 0.35) ** 2))
    r_fat = r_body - p.fat
    r_cav = r_fat - p.muscle - paraspinal
    label2d = np.full((J, I), OUTSIDE, np.uint8)
    label2d[r < r_body] = FAT
    label2d[r < r_fat] = MUSCLE
    label2d[r < r_cav] = SOFT
    b_c = p.body_b - p.fat - p.muscle
    y_vb = b_c - p.vertebra_r - 4.0 * s
    # Spine: vertebral body (cortex + marrow), canal, posterior arch and spinous process.
    d_vb = np.sqrt(X**2 + (Y - y_vb) ** 2)
    y_canal = y_vb + p.vertebra_r + 7.0 * s
    d_canal = np.sqrt(X**2 + (Y - y_canal) ** 2)
    arch = (d_canal < 13.0 * s) | ((np.abs(X) < 4.0 * s) & (np.abs(Y - y_canal - 15.0 * s) < 15.0 * s))
    arch |= (np.abs(Y - y_canal) < 4.5 * s) & (np.abs(X) < 32.0 * s)  # transverse processes
    label2d[arch & (r < r_body - p.fat)] = BONE_CORTEX
    label2d[d_canal < 7.0 * s] = CSF
    label2d[d_vb < p.vertebra_r] = BONE_CORTEX
    label2d[d_vb < p.vertebra_r - 2.5 * s] = BONE_MARROW
    # Sternum (anterior midline, just inside the muscle layer).
    y_st = -b_c - 2.0 * s
    sternum = ((X / (14.0 * s)) ** 2 + ((Y - y_st) / (6.0 * s)) ** 2) < 1.0
    body2d = r < r_body
    # Table below the patient; outside-FOV padding.
    table2d = np.zeros((J, I), bool)
    if p.table:
        y_top = p.body_b + 3.0
        # The top board spans the whole image width: without padding it splits the outside air in two
        # (the classical "flood from one corner" lung-mask pitfall).
        table2d = (np.abs(Y - y_top - 4.5) < 4.5) & np.ones_like(X, dtype=bool)
        table2d |= (np.abs(Y - y_top - 28.5) < 3.5) & (np.abs(X) < 0.7 * p.fov_radius)
        label2d[table2d & ~body2d] = TABLE
    xf = grid.x[None, :]
    yf = grid.y[:, None]
    fov2d = xf**2 + yf**2 <= p.fov_radius**2

    labels = np.broadcast_to(label2d, (K, J, I)).copy()

    # Intervertebral discs: bands of soft tissue in the vertebral body (index lists: no 3D temporaries).
    disc_k = np.flatnonzero(((grid.z - p.rib_phase) % (28.0 * s)) < 5.0 * s)
    vb_j, vb_i = np.nonzero(d_vb < p.vertebra_r)
    labels[disc_k[:, None], vb_j[None, :], vb_i[None, :]] = SOFT
    # Ribs: a band just outside the cavity, banded along z with an anterior drop (ribs slope down).
    rib_band = (r > r_cav + 0.5 * s) & (r < r_cav + 0.5 * s + 9.0 * s) & (psi > 0.25) & (psi < 2.55)
    rb_j, rb_i = np.nonzero(rib_band)
    depth = (r - r_cav)[rb_j, rb_i][None, :]
    phase = (grid.z[:, None] + p.rib_drop * psi[rb_j, rb_i][None, :] / np.pi - p.rib_phase) % p.rib_pitch
    t1 = ((grid.z - p.z_base) / p.lung_height)[:, None]
    in_chest = (t1 > -0.1) & (t1 < 1.02)
    rib = (phase < p.rib_width) & in_chest
    marrow = rib & (phase > 2.0 * s) & (phase < p.rib_width - 2.0 * s) & (depth > 2.5 * s) & (depth < 7.0 * s)
    band = labels[:, rb_j, rb_i]
    band[rib] = BONE_CORTEX
    band[marrow] = BONE_MARROW
    labels[:, rb_j, rb_i] = band
    st_k = np.flatnonzero((t1[:, 0] > 0.2) & (t1[:, 0] < 0.9))
    st_j, st_i = np.nonzero(sternum)
    labels[st_k[:, None], st_j[None, :], st_i[None, :]] = BONE_CORTEX

    # Lungs: evaluated only on the slices that can hold lung.
    side = np.zeros((K, J, I), np.int8)
    lung_k = np.flatnonzero((t1[:, 0] > -0.01) & (t1[:, 0] < 1.0))
    field_fn = lung_field(p)
    x32, y32 = grid.x[None, None, :].astype(np.float32), grid.y[None, :, None].astype(np.float32)
    if lung_k.size:
        for k0 in range(lung_k[0], lung_k[-1] + 1, 24):  # slabs: bounded float temporaries at 512²
            ks = slice(k0, min(k0 + 24, lung_k[-1] + 1))
            side[ks] = field_fn(x32, y32, grid.z[ks, None, None].astype(np.float32))
    lung = side > 0
    labels[lung] = LUNG
    # Abdomen under the diaphragm domes: the cavity's soft tissue in the lowest slices (mediastinum above).
    dome_top = p.z_base + p.dome + 10.0 * s
    low = slice(0, int(np.searchsorted(grid.z, dome_top)))
    sub = labels[low]
    sub[sub == SOFT] = ABDOMEN

    hu = TISSUE_HU[labels]
    # Gravity-dependent lung density (denser posteriorly) + a slow separable texture (cheap, smooth).
    grad = (p.lung_gradient * np.clip((grid.y - p.by + b_c) / (2.0 * b_c), 0.0, 1.0)).astype(np.float32)
    profiles = [
        (
            _smooth_1d(rng, K, 20.0 / grid.dz),
            _smooth_1d(rng, J, 20.0 / grid.dx),
            9.0 * _smooth_1d(rng, I, 20.0 / grid.dx),
        )
        for _ in range(3)
    ]
    for k in np.flatnonzero(lung.any(axis=(1, 2))):  # slice by slice: no full-volume float temporaries
        field = grad[:, None] + sum(a[k] * np.outer(b, c) for a, b, c in profiles)
        hu[k][lung[k]] += field[lung[k]]

    # --- airways: trachea above the carina, main bronchi to each hilum ---------------------------------
    y_tr = y_vb - p.vertebra_r - p.trachea_r - 10.0 * s
    z_car = p.z_base + 0.68 * p.lung_height
    carina = np.array([p.bx, p.by + y_tr, z_car])
    trachea_top = np.array([p.bx, p.by + y_tr, grid.z[-1] + 10.0])
    airway_segments = [(carina, trachea_top, p.trachea_r, p.trachea_r)]
    hila = []
    for sign, drop in ((-1.0, 18.0), (1.0, 28.0)):
        hilum = carina + np.array([sign * (p.mediastinum + 22.0 * s), 8.0 * s, -drop * s])
        hila.append(hilum)
        airway_segments.append((carina, hilum, 0.7 * p.trachea_r, 0.6 * p.trachea_r))
    wall = [(a, b, r0 + 1.5 * s, r1 + 1.5 * s) for a, b, r0, r1 in airway_segments]
    paint_capsules(hu, grid, wall, 40.0, restrict=~lung)
    paint_capsules(hu, grid, airway_segments, -1000.0, labels=labels, label=AIRWAY)

    def in_lung(code: int) -> Callable[[np.ndarray], bool]:
        def inside(q: np.ndarray) -> bool:  # nearest-voxel lookup: cheap, and exactly the rendered lung
            k, j, i = np.rint(grid.to_index(q)).astype(int)
            return bool(0 <= k < K and 0 <= j < J and 0 <= i < I and side[k, j, i] == code)

        return inside

    # --- vessels and intrapulmonary airways, per lung ------------------------------------------------
    vessel_segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    bronchus_segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for code, hilum in zip((1, 2), hila):
        sign = -1.0 if code == 1 else 1.0
        entry = hilum + np.array([sign * 6.0 * s, 0.0, 0.0])
        inside = in_lung(code)
        trunks = [
            np.array([sign * 0.5, 0.1, 1.0]),
            np.array([sign * 1.0, -0.3, 0.3]),
            np.array([sign * 1.0, 0.5, -0.2]),
            np.array([sign * 0.5, 0.4, -1.0]),
            np.array([sign * 0.6, -0.6, -0.8]),
            np.array([sign * 0.7, 0.8, 0.6]),
        ]
        trunks = [d + rng.normal(0.0, 0.15, 3) for d in trunks]
        vessel_segments += grow_tree(entry, trunks, 30.0 * s, 4.5 * s, 7, inside, rng, min_radius=0.6)
        airway_dirs = [trunks[0], trunks[2], trunks[3]]
        bronchus_segments += grow_tree(entry, airway_dirs, 28.0 * s, 3.5 * s, 3, inside, rng, min_radius=1.2)
    paint_capsules(hu, grid, vessel_segments, 40.0, restrict=lung)
    bronchus_wall = [(a, b, r0 + 1.2, r1 + 1.2) for a, b, r0, r1 in bronchus_segments]
    paint_capsules(hu, grid, bronchus_wall, 0.0, restrict=lung)
    paint_capsules(hu, grid, bronchus_segments, -1000.0, restrict=lung)

    body = np.broadcast_to(body2d, (K, J, I)).copy()
    return Chest(
        hu=hu,
        labels=labels,
        lung_mask=lung,
        lung_side=side,
        body_mask=body,
        fov_mask=fov2d,
        carina=carina,
    )
