"""One phantom patient: acquisition geometry, chest anatomy, a module-driven nodule and its gene profile.

Acquisition (per patient, from the seed): axial, DICOM-standard orientation (rows → posterior, columns →
patient left, slices stacked towards superior). In-plane spacing is drawn in the real 512-matrix range
0.56–0.85 mm and scaled by 512/size_ij, so a small test matrix still images a body-sized field of view
(a 96² test volume has 3–4.5 mm pixels); ``fov`` or ``spacing`` override that. Slice thickness is drawn
from {1, 1.25, 1.5, 2, 2.5} mm and the scan covers both lungs with a 15 mm margin; with ``slices`` the same
length is divided into that many slices instead (unless ``spacing`` fixes the slice spacing too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..geometry import LPS_TO_RAS, VolumeGeometry
from .anatomy import Grid, build_chest, draw_chest_params
from .genomics import GeneModel, draw_module_activations, gene_model, gene_profile
from .nodule import make_shape, phenotype_from_modules, place_nodule, render_nodule

SLICE_THICKNESSES = (1.0, 1.25, 1.5, 2.0, 2.5)
SCAN_MARGIN_MM = 15.0


@dataclass
class PhantomPatient:
    """A generated patient; arrays are [k, j, i], geometry IJK→RAS (interfaces.md)."""

    patient_id: str
    patient_index: int
    seed: int
    volume_hu: np.ndarray  # int16 (K,J,I)
    geometry: VolumeGeometry
    lung_mask: np.ndarray  # bool (K,J,I), both lungs incl. vessels, intrapulmonary airways and the nodule
    nodule_mask: np.ndarray  # bool (K,J,I)
    body_mask: np.ndarray  # bool (K,J,I)
    module_activations: np.ndarray  # (n_modules,)
    module_class: int
    phenotype: dict[str, float]
    nodule_centre_ras: np.ndarray  # (3,)
    genes_fpkm: np.ndarray  # (G,) linear FPKM, NaN = NA
    gene_names: tuple[str, ...]
    gene_model: GeneModel
    acquisition: dict[str, float | str | None] = field(default_factory=dict)

    @property
    def nodule_slices(self) -> np.ndarray:
        """Indices k of the slices that contain nodule voxels."""
        return np.flatnonzero(self.nodule_mask.any(axis=(1, 2)))


def patient_id_for(patient_index: int) -> str:
    """0-based index → TCIA-style subject id (0 → ``R01-001``)."""
    return f"R01-{patient_index + 1:03d}"


def _acquisition(
    rng: np.random.Generator,
    size_ij: int,
    spacing: tuple[float, float] | None,
    fov: float | None,
    slices: int | None,
) -> tuple[float, float | None, int | None]:
    """(in-plane spacing, slice spacing or None = derive, slices or None = derive)."""
    drawn_dx = rng.uniform(0.56, 0.85) * 512.0 / size_ij
    drawn_dz = float(rng.choice(SLICE_THICKNESSES))
    if spacing is not None:
        return float(spacing[0]), float(spacing[1]), slices
    dx = fov / size_ij if fov is not None else drawn_dx
    return dx, (None if slices is not None else drawn_dz), slices


def generate_patient(
    patient_index: int,
    seed: int,
    *,
    size_ij: int = 256,
    slices: int | None = None,
    spacing: tuple[float, float] | None = None,
    fov: float | None = None,
    n_genes: int = 5172,
    n_na_genes: int | None = None,
    n_modules: int = 4,
    n_classes: int = 4,
    noise_sd: float | None = None,
) -> PhantomPatient:
    """Generate patient `patient_index` (0-based) of the cohort `seed`; deterministic for (index, seed).

    The phenotype and genes do not depend on the image size options, so a small test cohort has the same
    truth as a full-size one. ``spacing=(in_plane_mm, slice_mm)`` and ``fov`` (mm) override the draws.
    """
    rng_acq = np.random.default_rng([seed, patient_index, 1])
    rng_anat = np.random.default_rng([seed, patient_index, 2])
    rng_pheno = np.random.default_rng([seed, patient_index, 3])
    rng_nod = np.random.default_rng([seed, patient_index, 4])
    rng_noise = np.random.default_rng([seed, patient_index, 5])

    # --- acquisition geometry ---------------------------------------------------------------------
    dx, dz, n_slices = _acquisition(rng_acq, size_ij, spacing, fov, slices)
    z_start = float(rng_acq.uniform(-420.0, -150.0))  # table position of the first slice (scanner mm)
    params = draw_chest_params(rng_anat, fov=dx * size_ij, z0=z_start + SCAN_MARGIN_MM)
    length = params.lung_height + 2.0 * SCAN_MARGIN_MM
    if dz is None:
        dz = length / float(n_slices)  # type: ignore[arg-type]
    if n_slices is None:
        n_slices = int(np.ceil(length / dz)) + 1
    if spacing is not None and slices is not None:  # explicit stack: centre it on the lungs
        z_start = params.z_base + 0.5 * params.lung_height - 0.5 * dz * (n_slices - 1)
    # Round to what the DICOM DS strings hold, so the files carry exactly this geometry.
    dx, dz = round(dx, 5), round(dz, 5)
    x0 = round(-0.5 * dx * (size_ij - 1), 4)
    z_start = round(z_start, 3)
    grid = Grid(
        x=x0 + dx * np.arange(size_ij),
        y=x0 + dx * np.arange(size_ij),
        z=z_start + dz * np.arange(n_slices),
        dx=dx,
        dz=dz,
    )
    origin_lps = np.array([grid.x[0], grid.y[0], grid.z[0]])
    geometry = VolumeGeometry.from_lps(origin_lps, (dx, dx, dz), np.eye(3))

    # --- anatomy --------------------------------------------------------------------------------
    chest = build_chest(grid, params, rng_anat)

    # --- modules → phenotype → nodule -----------------------------------------------------------
    module_class, activations = draw_module_activations(patient_index, seed, n_modules, n_classes)
    phenotype = phenotype_from_modules(activations, rng_pheno)
    shape = make_shape(phenotype, rng_nod)
    margin = 3.0
    centre, clearance = place_nodule(chest.lung_side, grid, shape.extent, rng_nod, margin=margin)
    if clearance < shape.extent + margin:  # small lung: shorten spicules, then shrink the nodule
        spic = float(shape.spicule_lengths.max()) if shape.spicule_lengths.size else 0.0
        room = clearance - margin - (shape.extent - spic)
        scale = max(0.0, room / spic) if spic > 0 else 1.0
        shape = make_shape(phenotype, np.random.default_rng([seed, patient_index, 4]), spicule_scale=min(1.0, scale))
        if shape.extent + margin > clearance:
            factor = max(0.3, (clearance - margin - 1.0) / (shape.extent - 1.0))
            phenotype["diameter_mm"] *= factor
            shape = make_shape(phenotype, np.random.default_rng([seed, patient_index, 4]), spicule_scale=0.0)
    shape = replace(shape, centre=np.asarray(centre, dtype=np.float64))
    nodule_mask = render_nodule(chest.hu, grid, shape, chest.lung_mask)
    lung_mask = chest.lung_mask | nodule_mask

    # --- noise, padding, integer HU ----------------------------------------------------------------
    sigma = float(noise_sd if noise_sd is not None else rng_noise.uniform(20.0, 40.0))
    hu = chest.hu
    for k0 in range(0, hu.shape[0], 16):  # slabs keep the peak memory of 512² volumes low
        slab = hu[k0 : k0 + 16]
        slab += rng_noise.standard_normal(slab.shape, dtype=np.float32) * np.float32(sigma)
    if params.padding_hu is not None:
        hu[:, ~chest.fov_mask] = params.padding_hu
    np.rint(hu, out=hu)
    np.clip(hu, -3024, 3071, out=hu)
    volume = hu.astype(np.int16)
    del hu, chest.hu

    voxel_mm3 = dx * dx * dz
    phenotype = dict(phenotype)
    phenotype.update(
        n_spicules=float(shape.spicule_dirs.shape[0]),
        volume_mm3=float(nodule_mask.sum() * voxel_mm3),
        lung_side=float(chest.lung_side[tuple(np.round(grid.to_index(centre)).astype(int))]),
    )
    model = gene_model(n_genes, n_na_genes, n_modules)
    return PhantomPatient(
        patient_id=patient_id_for(patient_index),
        patient_index=patient_index,
        seed=seed,
        volume_hu=volume,
        geometry=geometry,
        lung_mask=lung_mask,
        nodule_mask=nodule_mask,
        body_mask=chest.body_mask,
        module_activations=activations,
        module_class=module_class,
        phenotype=phenotype,
        nodule_centre_ras=LPS_TO_RAS @ centre,
        genes_fpkm=gene_profile(model, activations, patient_index, seed),
        gene_names=model.gene_names,
        gene_model=model,
        acquisition={
            "pixel_spacing_mm": dx,
            "slice_spacing_mm": dz,
            "noise_sd_hu": sigma,
            "padding_hu": params.padding_hu,
            "table": float(params.table),
        },
    )
