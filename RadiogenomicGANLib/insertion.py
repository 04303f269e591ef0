"""The insertion pipeline: synthetic nodules pasted into chosen slices of a CT (feathered, input untouched).

For every nodule centre (RAS mm) and every requested slice k, the 60 mm axial patch around the centre's
projection on slice k is resampled in millimetres (`patches.py`), mapped to the network's HU window, and run
through the generator together with the gene profile and a noise vector. All slices of all nodules go
through the generator in a few batched forward passes; each nodule keeps one noise vector for all its
slices, so its slices show the same nodule. The generated patch is resampled back onto the slice and
composited with `feather_alpha` — 1 over the dilated generated mask, 0 well inside the patch border — so
no voxel outside a patch footprint changes and no seam shows.

Decisions a user should know:
- Inputs are never modified: the result holds new arrays.
- The lung mask is computed once per volume (keyed by shape, dtype, geometry and a CRC of the voxels) and
  cached, so repeated insertions into the same CT are quick.
- A centre outside the lung is refused unless `allow_outside_lung=True`; automatic placement picks centres
  5–25 mm inside the lung boundary, on slices far enough from the volume's ends for the requested ±k.
  With `allow_outside_lung=True` and explicit centres, a CT in which no lung is found at all is still
  accepted: the label is then not clipped to a lung.
- The nodule label (value n for nodule n, 1-based) is the generated mask > 0.5 resampled to the slice,
  where the composite alpha is ≥ 0.5, and inside the lung mask: the segmentation marks the synthetic
  nodule in the lung, never a stray blob the network drew over the chest wall or the patch border.
- Intensities must look like Hounsfield units (`check_hu_volume`): a chest CT holds air or lung
  (≤ −500 HU) and soft tissue (≥ −200 HU). 8-bit images, raw 0…4095 detector values and normalised
  floats have no voxel ≤ −500, and are refused rather than silently producing garbage.
"""

from __future__ import annotations

import datetime as _dt
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from RadiogenomicGANLib.atomic import file_sha256
from RadiogenomicGANLib.devices import DeviceError, resolve_device
from RadiogenomicGANLib.geometry import VolumeGeometry
from RadiogenomicGANLib.intensity import hu_to_unit, unit_to_hu
from RadiogenomicGANLib.patches import extract_patch, feather_alpha, patch_frame, resample_to_slice

if TYPE_CHECKING:
    from RadiogenomicGANLib.weights import WeightsMetadata

ProgressCallback = Callable[[float, str], "bool | None"]

# Intensity plausibility thresholds (see check_hu_volume).
AIR_HU = -500.0
TISSUE_HU = -200.0
MIN_FRACTION = 0.002
HU_LIMITS = (-4000.0, 40000.0)
MIN_INPLANE_VOXELS = 16
#: torch's generator takes seeds in [0, 2**64); 2**63 keeps them valid for numpy and signed 64-bit storage too.
MAX_SEED = 2**63
#: Training provenance copied into every output's provenance is cut to this many keys, so a long one does
#: not bloat each NRRD header and DICOM SEG (the full record stays in the weights' JSON).
MAX_TRAINING_PROVENANCE_KEYS = 20
#: Slices per voxel-slab checked at a time for NaN/Inf (bounded memory on a 512×512×1000 float volume).
_FINITE_CHECK_SLICES = 16
AUTO_MIN_MM = 5.0
AUTO_MAX_MM = 25.0
#: Automatic centres of nodules whose slices are fitted to their size keep this far from the volume's first and
#: last slice, so that a nodule up to 20 mm across is not cut by the volume's end.
FIT_MARGIN_MM = 10.0


class InsertionError(ValueError):
    """Bad input to the insertion (a clear message for the user); nothing was produced."""


class InsertionCancelled(Exception):
    """The progress callback returned False."""


@dataclass
class InsertionResult:
    """The new CT (input dtype), the nodule label (n = nodule n) and, on request, the fusion weight map."""

    volume_hu: np.ndarray
    label: np.ndarray
    weight_map: np.ndarray | None
    centres_ras: np.ndarray
    slices: list[list[int]]
    provenance: dict[str, Any]
    # Per-nodule, per-slice patches (patch pixels): handy for figures and checks, cheap to keep.
    patches: dict[str, np.ndarray] = field(default_factory=dict)


def check_hu_volume(volume: np.ndarray) -> None:
    """Refuse arrays that are not 3D CT in Hounsfield units, with the reason.

    Rule: every voxel finite and within −4000…40000 (checked on all voxels: a single NaN slice would
    otherwise pass and spread through the output and the lung mask); and, on a strided sample, at least
    0.2 % of voxels ≤ −500 HU (air/lung — every chest CT has them) and at least 0.2 % ≥ −200 HU (soft
    tissue). 0…255 and 0…4095 images and [0, 1]/[−1, 1] normalised arrays fail the air test.
    """
    if volume.ndim != 3:
        raise InsertionError(
            f"the image is {volume.ndim}D (shape {tuple(volume.shape)}); a 3D CT volume is needed"
        )
    if min(volume.shape[1:]) < MIN_INPLANE_VOXELS:
        raise InsertionError(f"the slices are only {volume.shape[1]}×{volume.shape[2]} voxels; is this a CT?")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise InsertionError(f"unsupported voxel type {volume.dtype}; a CT in HU (integer or float) is needed")
    if np.issubdtype(volume.dtype, np.floating):
        for start in range(0, volume.shape[0], _FINITE_CHECK_SLICES):
            slab = volume[start : start + _FINITE_CHECK_SLICES]
            if not np.isfinite(slab).all():
                bad = start + int(np.flatnonzero(~np.isfinite(slab).all(axis=(1, 2)))[0])
                raise InsertionError(f"the volume contains NaN or infinite values (first in slice {bad})")
    low, high = float(volume.min()), float(volume.max())
    if low < HU_LIMITS[0] or high > HU_LIMITS[1]:
        raise InsertionError(
            f"intensities {low:.0f}…{high:.0f} are outside any Hounsfield range; is the rescale applied?"
        )
    # the fractions on a strided sample of about 2 million voxels: cheap, and a fraction needs no more
    step = max(1, round((volume.size / 2_000_000) ** (1 / 3)))
    sample = np.asarray(volume[::step, ::step, ::step], dtype=np.float32)
    air = float(np.mean(sample <= AIR_HU))
    tissue = float(np.mean(sample >= TISSUE_HU))
    if air < MIN_FRACTION or tissue < MIN_FRACTION:
        raise InsertionError(
            f"intensities {low:.0f}…{high:.0f} do not look like a chest CT in Hounsfield units "
            f"({100 * air:.1f}% of voxels ≤ {AIR_HU:.0f} HU, {100 * tissue:.1f}% ≥ {TISSUE_HU:.0f} HU); "
            "8-bit, raw detector or normalised images are not supported"
        )


def _as_geometry(geometry: VolumeGeometry | np.ndarray) -> VolumeGeometry:
    return geometry if isinstance(geometry, VolumeGeometry) else VolumeGeometry(np.asarray(geometry))


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("radiogenomicgan")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class _SliceJob:
    nodule: int
    slice_k: int


def slice_offsets(nodules: Sequence[int], slices_k: Sequence[int], centre_k: np.ndarray,
                  slice_spacing_mm: float) -> tuple[np.ndarray, dict[int, int]]:
    """Each slice's offset (mm) from its nodule's centre, and for each nodule the index of its slice nearest
    the centre: where both the sphere clip and a slice-position model read the nodule's radius."""
    nodules = np.asarray(nodules)
    offsets = (np.asarray(slices_k, dtype=np.float64) - np.asarray(centre_k, dtype=np.float64)[nodules]) \
        * float(slice_spacing_mm)
    nearest = {}
    for nodule in np.unique(nodules):
        members = np.flatnonzero(nodules == nodule)
        nearest[int(nodule)] = int(members[np.argmin(np.abs(offsets[members]))])
    return offsets, nearest


def equivalent_radius_mm(mask: np.ndarray, pixel_mm: float) -> float:
    """√(area / π) of a binary mask, in mm."""
    return float(np.sqrt(np.count_nonzero(mask) / np.pi)) * float(pixel_mm)


def fitted_slices(centre_k: float, radius_mm: float, slice_spacing_mm: float, num_slices: int) -> list[int]:
    """The slices a nodule of equivalent radius `radius_mm` centred at (fractional) slice `centre_k` spans: those
    less than R from the centre, where `sphere_profile_masks` leaves it a cross-section — at least the centre's
    own slice, within the volume."""
    centre = int(np.rint(centre_k))
    reach = int(np.ceil(radius_mm / slice_spacing_mm)) + 1
    spanned = {k for k in range(centre - reach, centre + reach + 1)
               if abs(k - centre_k) * slice_spacing_mm < radius_mm} | {centre}
    return sorted(k for k in spanned if 0 <= k < num_slices)


def sphere_profile_masks(masks: np.ndarray, nodules: Sequence[int], slices_k: Sequence[int],
                         centre_k: np.ndarray, slice_spacing_mm: float, pixel_mm: float) -> np.ndarray:
    """3-D coherence (beyond the paper's 2-D synthesis): every slice's generated mask clipped to the
    cross-section of a sphere whose radius R is the generated nodule's own equivalent radius on the slice
    nearest its centre — r(z) = √(R² − z²) at the slice's offset z from the centre (mm), nothing from |z| ≥ R.

    Why: the generator draws each slice independently and the same size on every one of them, so a nodule
    was a cylinder cut flat at both ends of the chosen slices. Now its cross-section grows and shrinks, it ends
    where its size says, and the chosen slices are the range it may occupy. All slices of a nodule already
    share its genes and noise (one style); the clip keeps each slice's own texture and blending. The disc is
    centred on the centre slice's mask centroid, with a one-pixel soft edge.
    """
    masks = np.array(masks, dtype=np.float32, copy=True)
    size = masks.shape[-1]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    nodules = np.asarray(nodules)
    offsets, nearest = slice_offsets(nodules, slices_k, centre_k, slice_spacing_mm)
    for nodule, centre in nearest.items():
        reference = masks[centre] > 0.5
        if not reference.any():
            continue
        radius = equivalent_radius_mm(reference, pixel_mm)
        cy, cx = (float(v.mean()) for v in np.nonzero(reference))
        distance_px = np.hypot(rows - cy, cols - cx)
        for index in np.flatnonzero(nodules == nodule):
            z = offsets[index]
            section_px = np.sqrt(max(radius**2 - z**2, 0.0)) / pixel_mm
            disc = np.clip(section_px + 0.5 - distance_px, 0.0, 1.0)  # 1 inside, one-pixel ramp
            masks[index] *= disc.astype(np.float32)
    return masks


class NoduleInserter:
    """A generator plus its metadata, ready to paste nodules into CT volumes (one per process is plenty)."""

    def __init__(
        self,
        generator: nn.Module,
        metadata: WeightsMetadata,
        device: str | torch.device = "auto",
        *,
        batch_size: int = 32,
        weights_path: str | Path | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        try:
            self.device = resolve_device(device)
        except DeviceError as error:
            raise InsertionError(str(error)) from None
        self.generator = generator.to(self.device).eval()
        self.metadata = metadata
        self.batch_size = max(1, int(batch_size))
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.weights_sha256 = weights_sha256
        config = getattr(generator, "config", None)
        if config is not None and config.kind != metadata.config.kind:
            raise InsertionError(
                f"generator kind {config.kind!r} does not match its metadata ({metadata.config.kind!r})"
            )
        if int(metadata.patch_size) != int(metadata.config.patch_size):
            raise InsertionError("weights metadata: patch_size disagrees with the generator configuration")
        self._lung_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lung_cache_size = 2

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, path: str | Path, device: str | torch.device = "auto", **kwargs: Any) -> NoduleInserter:
        """Load `NAME.safetensors` + `NAME.json`; a missing or bad file is an InsertionError with the reason.

        Any path goes to `load_weights`, which names a pickle or zip checkpoint (`x.pt`) as such and refuses it.
        """
        from RadiogenomicGANLib.weights import load_weights, weights_paths

        path = Path(path)
        try:
            generator, metadata = load_weights(path, map_location="cpu")
        except (ValueError, OSError, KeyError, RuntimeError) as error:
            raise InsertionError(f"cannot load weights {path.name}: {error}") from error
        tensors = weights_paths(path)[0]
        return cls(generator, metadata, device, weights_path=tensors, weights_sha256=file_sha256(tensors), **kwargs)

    @property
    def kind(self) -> str:
        return self.metadata.config.kind

    @property
    def num_genes(self) -> int:
        return int(self.metadata.config.num_genes)

    # --- lung mask ------------------------------------------------------------------------------------
    def lung_mask(self, volume_hu: np.ndarray, geometry: VolumeGeometry | np.ndarray) -> np.ndarray:
        """The volume's lung mask, computed once and cached (keyed by content, so edits are noticed)."""
        from RadiogenomicGANLib.lungmask import compute_lung_mask

        geometry = _as_geometry(geometry)
        contiguous = np.ascontiguousarray(volume_hu)
        key = (
            contiguous.shape,
            contiguous.dtype.str,
            geometry.ijk_to_ras.round(6).tobytes(),
            zlib.crc32(memoryview(contiguous).cast("B")),
        )
        cached = self._lung_cache.get(key)
        if cached is not None:
            self._lung_cache.move_to_end(key)
            return cached
        try:
            mask = np.asarray(compute_lung_mask(contiguous, geometry.spacing_kji), dtype=bool)
        except ValueError as error:  # LungMaskError: no lung-sized air region inside the body
            raise InsertionError(f"no lung found in this CT: {error}") from error
        mask.setflags(write=False)
        self._lung_cache[key] = mask
        while len(self._lung_cache) > self._lung_cache_size:
            self._lung_cache.popitem(last=False)
        return mask

    # --- the pipeline -------------------------------------------------------------------------------
    def insert(
        self,
        volume_hu: np.ndarray,
        geometry: VolumeGeometry | np.ndarray,
        gene_profile: np.ndarray | Sequence[float] | None,
        centres_ras: np.ndarray | Sequence[Sequence[float]] | None = None,
        *,
        auto_count: int = 0,
        slices: Sequence[Sequence[int] | None] | None = None,
        half_slices: int | None = None,
        seed: int = 0,
        allow_outside_lung: bool = False,
        return_weight_map: bool = False,
        lung_mask: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
        gene_sample: str | dict[str, Any] | None = None,
        imputed_genes: int | None = None,
        shape_3d: bool = True,
    ) -> InsertionResult:
        """Insert one nodule per centre (or `auto_count` automatically placed ones) into a copy of the CT.

        `slices[n]` lists the slice indices k of nodule n; without it every nodule spans ±`half_slices`
        around its centre's slice. None (for one nodule in `slices`, or as `half_slices` for all: the default) fits
        the slices to the nodule: its centre slice is drawn first, and it gets every slice its size spans
        (`fitted_slices`), so that it is not cut flat by too short a range. `gene_sample` and `imputed_genes`
        (how many of the model's genes were set to the training mean because the table lacked them) only
        document the profile in the provenance.
        `shape_3d` (default): the nodule is a solid, not a cylinder — see `sphere_profile_masks`; False keeps
        the paper's independent 2-D slices.
        Raises InsertionError on bad input (before any heavy work where possible) and InsertionCancelled
        when `progress` returns False.
        """
        volume = np.asarray(volume_hu)
        geometry = _as_geometry(geometry)
        report = _Progress(progress)
        check_hu_volume(volume)
        genes = self._check_profile(gene_profile)
        if half_slices is not None and half_slices < 0:
            raise InsertionError(f"half_slices must be ≥ 0 (or None: fitted to each nodule), got {half_slices}")
        if not 0 <= int(seed) < MAX_SEED:
            raise InsertionError(f"seed must be an integer in 0…2**63 − 1, got {seed}")
        explicit = centres_ras is not None and np.size(centres_ras) > 0
        if explicit and auto_count:
            raise InsertionError("give either centres or an automatic count, not both")
        if not explicit and auto_count <= 0:
            raise InsertionError("no nodule centre given: pass centres (RAS mm) or an automatic count ≥ 1")
        if auto_count > 255 or (explicit and np.size(centres_ras) > 3 * 255):
            raise InsertionError("at most 255 nodules fit in one uint8 label volume")
        if auto_count and slices is not None:
            raise InsertionError("explicit slice lists need explicit centres; use half_slices with automatic placement")

        if explicit:
            centres = self._check_centres(volume.shape, geometry, centres_ras)
            nodule_slices = self._plan_slices(volume.shape[0], geometry, centres, slices, half_slices)
        if lung_mask is not None:
            lung = np.asarray(lung_mask, dtype=bool)
            if lung.shape != volume.shape:
                raise InsertionError(f"lung mask shape {lung.shape} differs from the volume's {volume.shape}")
        else:
            report(0.02, "Computing the lung mask")
            try:
                lung = self.lung_mask(volume, geometry)
            except InsertionError:
                if not (explicit and allow_outside_lung):
                    raise
                lung = np.zeros(volume.shape, dtype=bool)
        if not lung.any():
            if not (explicit and allow_outside_lung):
                raise InsertionError("no lung found in this CT (the lung mask is empty)")
            # the user vouches for the centres: nothing to check them against or to clip the label to
            lung = np.ones(volume.shape, dtype=bool)
        if explicit:
            if not allow_outside_lung:
                self._check_in_lung(lung, geometry, centres)
        else:
            centres = self._auto_centres(lung, geometry, auto_count, half_slices, seed)
            nodule_slices = self._plan_slices(volume.shape[0], geometry, centres, None, half_slices)
        report(0.25, "Extracting patches")
        centre_k = geometry.ras_to_kji(centres)[:, 0]
        fitted = [ks is None for ks in nodule_slices]
        centre_radius_mm = None   # each nodule's radius as drawn on its centre slice, when fitting drew it
        if any(fitted):
            nodule_slices, centre_radius_mm = self._fit_slices(volume, geometry, centres, centre_k, nodule_slices,
                                                               genes, seed)

        jobs = [_SliceJob(n, k) for n, ks in enumerate(nodule_slices) for k in ks]
        backgrounds = self._patches(volume, geometry, centres, jobs)
        backgrounds_unit = hu_to_unit(backgrounds, self.metadata.hu_window)
        nodule_of_job = [job.nodule for job in jobs]
        positions = None
        if self.metadata.config.slice_position:
            positions = self._slice_positions(backgrounds_unit, genes, jobs, len(centres), centre_k,
                                              float(geometry.spacing_kji[0]), seed, centre_radius_mm)
        images, masks, weights = self._run_generator(
            backgrounds_unit, genes, nodule_of_job, len(centres), seed, report, positions
        )

        if shape_3d:
            masks = sphere_profile_masks(masks, nodule_of_job, [job.slice_k for job in jobs], centre_k,
                                         float(geometry.spacing_kji[0]), float(self.metadata.patch_spacing_mm))
        report(0.85, "Pasting the nodules")
        output = volume.copy()
        label = np.zeros(volume.shape, dtype=np.uint8)
        weight_map = np.zeros(volume.shape, dtype=np.float32) if return_weight_map else None
        generated_hu = unit_to_hu(images, self.metadata.hu_window)
        alphas = np.stack([feather_alpha(mask) for mask in masks])
        for index, job in enumerate(jobs):
            self._paste(
                output, label, weight_map, lung, geometry, centres[job.nodule], job,
                generated_hu[index], alphas[index], masks[index], weights[index] if weights is not None else None,
            )
        report(1.0, "Done")
        provenance = self._provenance(centres, nodule_slices, seed, auto_count, allow_outside_lung, gene_sample)
        provenance["imputed_genes"] = None if imputed_genes is None else int(imputed_genes)
        provenance["slices_fitted_to_size"] = fitted
        provenance["shape_3d"] = "sphere profile" if shape_3d else "independent slices"
        if positions is not None:
            provenance["shape_3d"] += ", slice position given to the generator"
        patches = {"background_hu": backgrounds, "generated_hu": generated_hu, "mask": masks, "alpha": alphas}
        if weights is not None:
            patches["weight_map"] = weights
        patches["nodule"] = np.array([job.nodule for job in jobs], dtype=np.int32)
        patches["slice"] = np.array([job.slice_k for job in jobs], dtype=np.int32)
        return InsertionResult(output, label, weight_map, centres, nodule_slices, provenance, patches)

    # --- validation ---------------------------------------------------------------------------------
    def _check_profile(self, gene_profile: np.ndarray | Sequence[float] | None) -> np.ndarray | None:
        if self.kind == "inpainting":
            return None  # the inpainting baseline fills from context only
        if gene_profile is None:
            raise InsertionError(f"the {self.kind} model needs a gene profile of {self.num_genes} genes")
        genes = np.asarray(gene_profile, dtype=np.float32).reshape(-1)
        if genes.shape[0] != self.num_genes:
            raise InsertionError(
                f"the gene profile has {genes.shape[0]} values but the model expects {self.num_genes} genes "
                "(align it with genes.profile_for_model)"
            )
        if not np.isfinite(genes).all():
            raise InsertionError("the gene profile contains NaN or infinite values")
        return genes

    @staticmethod
    def _check_centres(shape: tuple[int, ...], geometry: VolumeGeometry, centres_ras: Any) -> np.ndarray:
        try:
            centres = np.asarray(centres_ras, dtype=np.float64).reshape(-1, 3)
        except (ValueError, TypeError) as error:
            raise InsertionError("centres must be RAS points (n, 3) in mm") from error
        if not np.isfinite(centres).all():
            raise InsertionError("a centre has a NaN or infinite coordinate")
        kji = geometry.ras_to_kji(centres)
        upper = np.asarray(shape, dtype=np.float64) - 0.5
        for n, (point, index) in enumerate(zip(centres, kji)):
            if (index < -0.5).any() or (index > upper).any():
                raise InsertionError(
                    f"centre {n + 1} at RAS ({point[0]:.6g}, {point[1]:.6g}, {point[2]:.6g}) mm is outside the "
                    f"volume (voxel k,j,i = {index[0]:.6g}, {index[1]:.6g}, {index[2]:.6g}; shape {tuple(shape)})"
                )
        return centres

    @staticmethod
    def _plan_slices(
        num_slices: int,
        geometry: VolumeGeometry,
        centres: np.ndarray,
        slices: Sequence[Sequence[int] | None] | None,
        half_slices: int | None,
    ) -> list[list[int] | None]:
        """Each centre's slice list; None where the slices are to be fitted to the nodule's size."""
        centre_k = np.rint(geometry.ras_to_kji(centres)[:, 0]).astype(int)
        if slices is None and half_slices is not None and half_slices >= num_slices:
            raise InsertionError(f"±{half_slices} slices per nodule do not fit in a volume of {num_slices} slices")
        planned: list[list[int] | None] = []
        if slices is None:
            planned = [None if half_slices is None else list(range(k - half_slices, k + half_slices + 1))
                       for k in centre_k]
        else:
            if len(slices) != len(centres):
                raise InsertionError(f"{len(slices)} slice lists given for {len(centres)} centres")
            for n, ks in enumerate(slices):
                values = None if ks is None else sorted({int(k) for k in ks})
                if values == []:
                    raise InsertionError(f"centre {n + 1} has an empty slice list")
                planned.append(values)
        for n, ks in enumerate(planned):
            bad = [k for k in ks or () if not 0 <= k < num_slices]
            if bad:
                raise InsertionError(
                    f"{describe_indices(bad)} of centre {n + 1} out of range: the volume has slices "
                    f"0…{num_slices - 1}"
                )
        return planned

    @staticmethod
    def _check_in_lung(lung: np.ndarray, geometry: VolumeGeometry, centres: np.ndarray) -> None:
        from RadiogenomicGANLib.placement import check_centre

        for n, point in enumerate(centres):
            reason = check_centre(lung, geometry, point)
            if reason is not None:
                raise InsertionError(
                    f"centre {n + 1} at RAS ({point[0]:.1f}, {point[1]:.1f}, {point[2]:.1f}) mm is not in the lung: "
                    f"{reason} (allow_outside_lung / --allow-outside-lung overrides)"
                )

    @staticmethod
    def _auto_centres(
        lung: np.ndarray, geometry: VolumeGeometry, count: int, half_slices: int | None, seed: int
    ) -> np.ndarray:
        """`count` lung centres 5–25 mm from the boundary, on slices where ±half_slices (fitted slices:
        ±`FIT_MARGIN_MM`) stays in the volume."""
        from RadiogenomicGANLib.placement import sample_lung_centres

        margin = half_slices
        if half_slices is None:
            margin = int(np.ceil(FIT_MARGIN_MM / float(geometry.spacing_kji[0])))
        allowed = lung
        if margin > 0:
            allowed = lung.copy()
            allowed[:margin] = False
            allowed[lung.shape[0] - margin :] = False
        if not allowed.any():
            wanted = f"±{half_slices} slices" if half_slices is not None else f"a {FIT_MARGIN_MM:g} mm margin"
            raise InsertionError(f"the volume has too few lung slices for {wanted} per nodule")
        rng = np.random.default_rng(seed)
        try:
            kji = sample_lung_centres(
                allowed, geometry.spacing_kji, count, rng, min_mm=AUTO_MIN_MM, max_mm=AUTO_MAX_MM
            )
        except (ValueError, RuntimeError) as error:
            raise InsertionError(f"automatic placement failed: {error}") from error
        kji = np.asarray(kji, dtype=np.float64).reshape(-1, 3)
        if len(kji) < count:
            raise InsertionError(f"automatic placement found only {len(kji)} of {count} valid lung locations")
        return geometry.kji_to_ras(kji)

    # --- generator ------------------------------------------------------------------------------------
    def _slice_positions(self, backgrounds_unit: np.ndarray, genes: np.ndarray | None, jobs: list[_SliceJob],
                         num_nodules: int, centre_k: np.ndarray, slice_spacing_mm: float, seed: int,
                         radius_mm: np.ndarray | None = None) -> np.ndarray:
        """For a `slice_position` model: each slice's place t within its nodule. The slice nearest each centre is
        drawn first at t = 0 (the nodule's widest cross-section); its equivalent radius R (mm) is the nodule's
        half extent, so t = offset from the centre (mm) / R and the nodule ends where its size says — the same
        R as `sphere_profile_masks`. A nodule drawn empty at its centre gets t = 0 throughout. `radius_mm`: R as
        `_fit_slices` drew it on each centre's own slice, used when that is the nearest slice of every nodule."""
        nodule_of_job = np.array([job.nodule for job in jobs])
        offsets_mm, nearest = slice_offsets(nodule_of_job, [job.slice_k for job in jobs], centre_k, slice_spacing_mm)
        centre_jobs = [nearest[n] for n in range(num_nodules)]
        drawn = radius_mm is not None and all(jobs[j].slice_k == int(np.rint(centre_k[n]))
                                              for n, j in enumerate(centre_jobs))
        if not drawn:
            radius_mm = self._centre_radii_mm(backgrounds_unit[centre_jobs], genes, seed)
        radius_of_job = radius_mm[nodule_of_job]
        safe = np.where(radius_of_job > 0, radius_of_job, 1.0)
        return np.where(radius_of_job > 0, np.clip(offsets_mm / safe, -1.0, 1.0), 0.0).astype(np.float32)

    def _centre_radii_mm(self, centre_backgrounds_unit: np.ndarray, genes: np.ndarray | None,
                         seed: int) -> np.ndarray:
        """Each nodule's equivalent radius (mm) as drawn on its centre slice (one background per nodule, the
        nodule's own noise; t = 0 for a `slice_position` model): its half extent."""
        count = centre_backgrounds_unit.shape[0]
        positions = np.zeros(count, dtype=np.float32) if self.metadata.config.slice_position else None
        _, masks, _ = self._run_generator(centre_backgrounds_unit, genes, list(range(count)), count, seed,
                                          _Progress(None), positions)
        pixel_mm = float(self.metadata.patch_spacing_mm)
        return np.array([equivalent_radius_mm(mask > 0.5, pixel_mm) for mask in masks])

    def _fit_slices(self, volume: np.ndarray, geometry: VolumeGeometry, centres: np.ndarray, centre_k: np.ndarray,
                    planned: list[list[int] | None], genes: np.ndarray | None, seed: int
                    ) -> tuple[list[list[int]], np.ndarray]:
        """Fill the nodules planned None with `fitted_slices` of the radius their centre slice is drawn at; and
        every nodule's radius (mm) so drawn."""
        centre_jobs = [_SliceJob(n, int(np.rint(k))) for n, k in enumerate(centre_k)]
        centre_unit = hu_to_unit(self._patches(volume, geometry, centres, centre_jobs), self.metadata.hu_window)
        radius_mm = self._centre_radii_mm(centre_unit, genes, seed)
        spacing_k = float(geometry.spacing_kji[0])
        return [fitted_slices(centre_k[n], radius_mm[n], spacing_k, volume.shape[0]) if ks is None else ks
                for n, ks in enumerate(planned)], radius_mm

    def _patches(self, volume: np.ndarray, geometry: VolumeGeometry, centres: np.ndarray,
                 jobs: list[_SliceJob]) -> np.ndarray:
        """The HU background patch of every job, in the model's patch grid."""
        size = int(self.metadata.patch_size)
        spacing_mm = float(self.metadata.patch_spacing_mm)
        return np.stack([extract_patch(volume, geometry, centres[job.nodule], job.slice_k, size, spacing_mm)
                         for job in jobs])

    def _run_generator(
        self,
        backgrounds_unit: np.ndarray,
        genes: np.ndarray | None,
        nodule_of_job: list[int],
        num_nodules: int,
        seed: int,
        report: _Progress,
        positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """All patches through G in batches; one noise vector per nodule (and, for a `pixel_noise` model, one
        noise map per patch), drawn on the CPU from the seed;
        `positions` (one t per patch) for a `slice_position` model."""
        config = self.metadata.config
        draw = torch.Generator().manual_seed(int(seed))
        noise_all = torch.randn(num_nodules, int(config.noise_dim), generator=draw)
        # after the style noise, so models without per-pixel noise draw exactly what they drew before
        size = int(getattr(config, "pixel_noise_size", 0))
        pixel_noise_all = (torch.randn(len(nodule_of_job), 1, size, size, generator=draw) if size else None)
        index = torch.as_tensor(nodule_of_job, dtype=torch.long)
        images, masks, weights = [], [], []
        total = len(nodule_of_job)
        with torch.inference_mode():
            for start in range(0, total, self.batch_size):
                stop = min(start + self.batch_size, total)
                report(0.3 + 0.5 * start / total, f"Generating slices {start + 1}–{stop} of {total}")
                background = torch.from_numpy(backgrounds_unit[start:stop, None]).to(self.device)
                batch = stop - start
                if self.kind == "inpainting":
                    from RadiogenomicGANLib.networks import hole_from_mask

                    hole = hole_from_mask(torch.zeros_like(background))
                    out = self.generator(background, None, None, hole=hole)
                else:
                    gene_batch = torch.from_numpy(genes).to(self.device).expand(batch, -1)
                    noise = noise_all[index[start:stop]].to(self.device)
                    extra = {}
                    if positions is not None:
                        extra["position"] = torch.from_numpy(positions[start:stop]).to(self.device)
                    if pixel_noise_all is not None:
                        extra["pixel_noise"] = pixel_noise_all[start:stop].to(self.device)
                    out = self.generator(background, gene_batch, noise, **extra)
                images.append(out.image[:, 0].float().cpu().numpy())
                masks.append(out.mask[:, 0].float().cpu().numpy())
                if out.weight_maps:
                    finest = out.weight_maps[-1].float()
                    if finest.shape[-2:] != background.shape[-2:]:
                        finest = torch.nn.functional.interpolate(
                            finest, size=background.shape[-2:], mode="bilinear", align_corners=False
                        )
                    weights.append(finest[:, 0].cpu().numpy())
        report(0.8, "Generated")
        return (
            np.concatenate(images).astype(np.float32),
            np.concatenate(masks).astype(np.float32),
            np.concatenate(weights).astype(np.float32) if len(weights) == len(images) and weights else None,
        )

    # --- composite ----------------------------------------------------------------------------------
    def _paste(
        self,
        output: np.ndarray,
        label: np.ndarray,
        weight_map: np.ndarray | None,
        lung: np.ndarray,
        geometry: VolumeGeometry,
        centre: np.ndarray,
        job: _SliceJob,
        generated_hu: np.ndarray,
        alpha: np.ndarray,
        mask: np.ndarray,
        weight: np.ndarray | None,
    ) -> None:
        """Composite one generated patch onto its slice; only voxels with alpha > 0 are written."""
        size = int(self.metadata.patch_size)
        frame = patch_frame(geometry, centre, job.slice_k, size, float(self.metadata.patch_spacing_mm))
        shape_ji = output.shape[1:]
        box, values = resample_to_slice(generated_hu, frame, shape_ji)
        if values.size == 0:
            return
        _, alpha_slice = resample_to_slice(alpha, frame, shape_ji)
        # inside the lung only (DESIGN decision 10): chest wall and mediastinum are never rewritten
        alpha_slice = alpha_slice * lung[job.slice_k][box]
        _, mask_slice = resample_to_slice(mask, frame, shape_ji)
        region = output[job.slice_k][box]
        original = region.astype(np.float32)
        blended = original + alpha_slice * (values - original)
        if np.issubdtype(output.dtype, np.integer):
            info = np.iinfo(output.dtype)
            blended = np.clip(np.rint(blended), info.min, info.max)
        write = alpha_slice > 0
        region[write] = blended[write].astype(output.dtype)
        output[job.slice_k][box] = region
        nodule = (mask_slice > 0.5) & (alpha_slice >= 0.5) & lung[job.slice_k][box]
        label_region = label[job.slice_k][box]
        label_region[nodule] = job.nodule + 1
        if weight_map is not None and weight is not None:
            _, weight_slice = resample_to_slice(weight, frame, shape_ji)
            inside = _inside_patch(frame, box, size)
            target = weight_map[job.slice_k][box]
            target[inside] = np.maximum(target[inside], weight_slice[inside])

    # --- provenance -----------------------------------------------------------------------------------
    def _provenance(
        self,
        centres: np.ndarray,
        slices: list[list[int]],
        seed: int,
        auto_count: int,
        allow_outside_lung: bool,
        gene_sample: str | dict[str, Any] | None,
    ) -> dict[str, Any]:
        trained = self.metadata.provenance if isinstance(self.metadata.provenance, dict) else {}
        return {
            "software": "RadiogenomicGAN",
            "version": _package_version(),
            "synthetic": True,
            "model_kind": self.kind,
            "weights_file": self.weights_path.name if self.weights_path else None,
            "weights_sha256": self.weights_sha256,
            "model_training": {key: trained[key] for key in list(trained)[:MAX_TRAINING_PROVENANCE_KEYS]},
            "gene_sample": gene_sample,
            "seed": int(seed),
            "placement": "automatic" if auto_count else "manual",
            "allow_outside_lung": bool(allow_outside_lung),
            "centres_ras": [[round(float(v), 3) for v in c] for c in centres],
            "slices": [list(map(int, ks)) for ks in slices],
            "patch_size": int(self.metadata.patch_size),
            "patch_spacing_mm": float(self.metadata.patch_spacing_mm),
            "device": str(self.device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def describe_indices(indices: Sequence[int], most: int = 6) -> str:
    """'slices 5, 6, 500' or, for many, 'slices -998…-1, 300…1002 (1700 slices)': one short line, whatever
    the count (a ±1000 request once printed 10 KB of indices)."""
    values = sorted(int(v) for v in indices)
    if len(values) <= most:
        return "slices " + ", ".join(map(str, values))
    runs: list[list[int]] = [[values[0], values[0]]]
    for value in values[1:]:
        if value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    text = ", ".join(f"{a}…{b}" if a != b else str(a) for a, b in runs[:most])
    return f"slices {text}{', …' if len(runs) > most else ''} ({len(values)} slices)"


def _inside_patch(frame: Any, box: tuple[slice, slice], size: int) -> np.ndarray:
    """Slice voxels of `box` whose patch coordinates fall inside the patch grid."""
    jj, ii = np.mgrid[box[0], box[1]].astype(np.float64)
    rows, cols = frame.ji_to_pixel(jj, ii)
    return (rows >= -0.5) & (rows <= size - 0.5) & (cols >= -0.5) & (cols <= size - 0.5)


class _Progress:
    """Calls the user's callback; a False return cancels the run."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    def __call__(self, fraction: float, message: str) -> None:
        if self.callback is not None and self.callback(float(min(max(fraction, 0.0), 1.0)), message) is False:
            raise InsertionCancelled(f"cancelled during: {message}")
