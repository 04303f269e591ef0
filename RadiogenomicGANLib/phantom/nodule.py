"""Nodule phenotype from the latent gene modules, and its rasterisation into the CT.

The gene → phenotype map (the phantom's ground truth; ``ε`` are independent N(0,1) nuisance draws and
``σ(x) = 1/(1+e^(−x))``):

- module 1 → size:       ``diameter_mm = 10 + 30·σ(1.6·(a1 + 0.25ε))``            (10–40 mm)
- module 2 → density:    ``solid_fraction = σ(2.5·(a2 + 0.25ε))``; the nodule is ground glass
  (−750…−600 HU, drawn) outside a solid core (0…60 HU, drawn) holding that fraction of the volume
- module 3 → margin:     ``margin_blur_mm = 0.3 + 2.4·σ(2·(a3 + 0.25ε))`` (width of the soft edge) and
  ``spiculation = σ(2.5·(a3 + 0.25ε'))`` → ``round(14·spiculation)`` spicules of 3–9 mm
- module 4 → lobulation: ``lobulation = σ(2.5·(a4 + 0.25ε))`` → 4–8 radial bumps of relative height 0.35·lobulation

Nuisance only (no module): elongation and orientation, the drawn HU values, lobe count and directions,
spicule directions, and the position in the lung. Modules beyond the fourth drive genes only.
The mask is occupancy ≥ 0.5; the soft edge is symmetric about the surface, so blur does not change size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Grid, _capsule_occupancy


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class NoduleShape:
    """Everything needed to rasterise one nodule (mm, LPS)."""

    centre: np.ndarray
    radius: float  # nominal radius (half of diameter_mm)
    axes: np.ndarray  # (3,) relative semi-axis factors (product 1)
    rotation: np.ndarray  # (3,3) columns = principal axes in LPS
    lobe_dirs: np.ndarray  # (L,3) unit
    lobe_weights: np.ndarray  # (L,)
    lobe_amplitude: float
    spicule_dirs: np.ndarray  # (S,3) unit
    spicule_lengths: np.ndarray  # (S,) mm
    blur: float  # mm
    solid_fraction: float
    hu_solid: float
    hu_ggo: float

    @property
    def extent(self) -> float:
        """Radius of a sphere (mm) that holds the nodule and its spicules."""
        spic = float(self.spicule_lengths.max()) if self.spicule_lengths.size else 0.0
        return self.radius * float(self.axes.max()) * (1.0 + 1.5 * self.lobe_amplitude) + spic + 1.0


def phenotype_from_modules(activations: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """The documented map; returns the phenotype values written to ground_truth.csv."""
    a = np.zeros(4)
    a[: min(4, activations.size)] = activations[:4]
    e = 0.25 * rng.standard_normal(6)
    return {
        "diameter_mm": 10.0 + 30.0 * _sigmoid(1.6 * (a[0] + e[0])),
        "solid_fraction": _sigmoid(2.5 * (a[1] + e[1])),
        "margin_blur_mm": 0.3 + 2.4 * _sigmoid(2.0 * (a[2] + e[2])),
        "spiculation": _sigmoid(2.5 * (a[2] + e[3])),
        "lobulation": _sigmoid(2.5 * (a[3] + e[4])),
        "hu_solid": float(rng.uniform(0.0, 60.0)),
        "hu_ggo": float(rng.uniform(-750.0, -600.0)),
        "elongation": float(rng.uniform(1.0, 1.3)),
    }


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_shape(phenotype: dict[str, float], rng: np.random.Generator, spicule_scale: float = 1.0) -> NoduleShape:
    """Draw the nuisance geometry for a phenotype (centre filled in later by placement)."""
    e = phenotype["elongation"]
    axes = np.array([e, 1.0, 1.0 / e]) ** (2.0 / 3.0)
    axes /= np.prod(axes) ** (1.0 / 3.0)
    n_lobes = int(rng.integers(4, 9))
    n_spic = round(14 * phenotype["spiculation"])
    return NoduleShape(
        centre=np.zeros(3),
        radius=phenotype["diameter_mm"] / 2.0,
        axes=axes,
        rotation=_random_rotation(rng),
        lobe_dirs=_unit(rng.standard_normal((n_lobes, 3))),
        lobe_weights=rng.uniform(0.6, 1.0, n_lobes),
        lobe_amplitude=0.35 * phenotype["lobulation"],
        spicule_dirs=_unit(rng.standard_normal((n_spic, 3))) if n_spic else np.zeros((0, 3)),
        spicule_lengths=spicule_scale * rng.uniform(3.0, 3.0 + 6.0 * phenotype["spiculation"], n_spic),
        blur=phenotype["margin_blur_mm"],
        solid_fraction=phenotype["solid_fraction"],
        hu_solid=phenotype["hu_solid"],
        hu_ggo=phenotype["hu_ggo"],
    )


def _surface_radius(shape: NoduleShape, u: np.ndarray) -> np.ndarray:
    """Radius of the lobulated surface along unit directions u (…,3) in the nodule's own frame."""
    kappa = 8.0
    mean_bump = (1.0 - np.exp(-2.0 * kappa)) / (2.0 * kappa)  # mean of exp(κ(u·v−1)) over the sphere
    bumps = np.zeros(u.shape[:-1], np.float32)
    for v, w in zip(shape.lobe_dirs, shape.lobe_weights):
        cos = u[..., 0] * v[0] + u[..., 1] * v[1] + u[..., 2] * v[2]
        bumps += w * (np.exp(kappa * (cos - 1.0)) - mean_bump)
    return shape.radius * (1.0 + shape.lobe_amplitude * bumps / (1.0 - mean_bump))


def place_nodule(
    lung_side: np.ndarray, grid: Grid, extent: float, rng: np.random.Generator, margin: float = 3.0
) -> tuple[np.ndarray, float]:
    """Pick a centre (LPS mm) whose distance to the lung boundary ≥ extent + margin, on a ~4 mm grid.

    Returns (centre, clearance_mm). Falls back to the deepest point when nothing is deep enough (the caller
    shrinks the spicules in that case). Why a coarse grid: the EDT of a full-resolution volume costs more
    than the whole rest of the patient.
    """
    step_k = max(1, round(4.0 / grid.dz))
    step_ij = max(1, round(4.0 / grid.dx))
    coarse = lung_side[::step_k, ::step_ij, ::step_ij] > 0
    dist = ndimage.distance_transform_edt(
        np.pad(coarse, 1), sampling=(grid.dz * step_k, grid.dx * step_ij, grid.dx * step_ij)
    )[1:-1, 1:-1, 1:-1]
    slack = 0.5 * float(np.linalg.norm([grid.dz * step_k, grid.dx * step_ij, grid.dx * step_ij]))
    ok = np.flatnonzero(dist.ravel() >= extent + margin + slack)
    if ok.size == 0:
        flat = int(np.argmax(dist))
    else:
        flat = int(rng.choice(ok))
    k, j, i = np.unravel_index(flat, dist.shape)
    centre = np.array([grid.x[i * step_ij], grid.y[j * step_ij], grid.z[k * step_k]], dtype=np.float64)
    jitter = rng.uniform(-0.5, 0.5, 3) * np.array([grid.dx, grid.dx, grid.dz])
    return centre + jitter, float(dist.ravel()[flat] - slack)


def render_nodule(
    hu: np.ndarray, grid: Grid, shape: NoduleShape, lung_mask: np.ndarray
) -> np.ndarray:
    """Blend the nodule into `hu` in place (inside the lung only); return its boolean mask (K,J,I)."""
    mask = np.zeros(hu.shape, bool)
    reach = shape.extent + 2.0 * shape.blur + grid.dx
    box = grid.box(shape.centre - reach, shape.centre + reach)
    if box is None:
        return mask
    z = grid.z[box[0]][:, None, None] - shape.centre[2]
    y = grid.y[box[1]][None, :, None] - shape.centre[1]
    x = grid.x[box[2]][None, None, :] - shape.centre[0]
    # Into the nodule frame (rotation, then anisotropic scaling).
    rot = shape.rotation
    coords = [(x * rot[0, c] + y * rot[1, c] + z * rot[2, c]) / shape.axes[c] for c in range(3)]
    rho = np.sqrt(coords[0] ** 2 + coords[1] ** 2 + coords[2] ** 2) + 1e-6
    u = np.stack([c / rho for c in coords], axis=-1)
    r_surf = _surface_radius(shape, u)
    width = max(shape.blur, 1e-3) / 1.7  # logistic scale for the requested 10–90 % edge width / 2
    body = 1.0 / (1.0 + np.exp(np.clip((rho - r_surf) / width, -50.0, 50.0)))
    r_core = r_surf * shape.solid_fraction ** (1.0 / 3.0)
    core = 1.0 / (1.0 + np.exp(np.clip((rho - r_core) / width, -50.0, 50.0))) if shape.solid_fraction > 0.01 else 0.0
    value = shape.hu_ggo + (shape.hu_solid - shape.hu_ggo) * core
    occ = body.astype(np.float32)
    # Spicules: thin solid strands from inside the surface outward (radius 1.6 → 0.5 mm).
    soft = grid.dx
    for v, length in zip(shape.spicule_dirs, shape.spicule_lengths):
        v_lps = shape.rotation @ (v * shape.axes)
        v_lps /= np.linalg.norm(v_lps)
        base_r = float(_surface_radius(shape, v[None])[0]) * float(np.linalg.norm(shape.axes * v))
        a = shape.centre + 0.7 * base_r * v_lps
        b = shape.centre + (base_r + length) * v_lps
        spic = _capsule_occupancy(grid, box, a, b, 1.6, 0.5, soft)
        value = np.where(spic > occ, shape.hu_solid - 60.0, value)
        occ = np.maximum(occ, spic)
    occ *= lung_mask[box]
    view = hu[box]
    view += occ * (value - view)
    mask[box] = occ >= 0.5
    return mask
