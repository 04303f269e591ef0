"""The one request path of an insertion: request → validated plan → result, shared by the CLI and the module.

`python -m RadiogenomicGANLib insert` and the Slicer module's Logic both describe what the user asked for as
an `InsertionRequest`, turn it into an `InsertionPlan` with `make_plan` (weights loaded, gene profile formed,
centres and slices validated against the CT) and run it with `execute`. So there is one slice syntax, one
gene-sample label (the segments' GeneSample tag), one provenance and one GPU out-of-memory fallback; the two
front ends only differ in where the volume comes from and where the result goes (files or MRML nodes).

Slice syntax (`parse_slice_spec`, `split_slice_specs`), one spec per nodule or one for all:
  "±K" / "+-K"            K slices either side of the centre's slice;
  "auto"                  the slices the nodule's size spans (its centre slice is drawn first; see
                          `insertion.fitted_slices`), so that a short range does not cut it flat;
  "40, 41, 45-48"         explicit indices (ranges with "-", ".." or ":", separators "," or spaces);
  "40-44; 50-52"          one spec per centre, separated by ";" (the module's field; the CLI repeats --slices).

Decisions:
- The gene table is optional for the inpainting baseline (it fills from context only, no genes).
- With automatic placement the only slice spec allowed is one "±K" or "auto" (the centres are not known yet).
- Device "auto" that runs out of GPU memory is retried once on the CPU (with a warning); an explicit "cuda"
  fails with the error instead, since the user asked for the GPU.
- `ResourceCache` keeps one generator and one gene table (the module's repeated Apply is quick) and
  `release()` drops them and empties the CUDA cache, so a module that is left does not hold GPU memory.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# No torch (nor anything importing it) at import time: the Slicer module builds requests in Slicer's own
# process, where the generator never runs (the background CLI runs it), so torch is never loaded there.
#: No CT holds more slices than this: bigger requests are typos (and would exhaust memory), refused early.
MAX_SLICES = 10_000
SliceSpec = str | int | Sequence[int] | None   # None, like "auto": fitted to the nodule's size
FIT_TO_SIZE = "auto"
ProgressCallback = Callable[[float, str], "bool | None"]


class RequestError(ValueError):
    """The request cannot be run as given (a clear message for the user); nothing was produced."""


@dataclass(frozen=True)
class InsertionRequest:
    """What the user asked for, as the CLI's options and the module's parameters both say it.

    `slices`: specs (see the module docstring; an int is a half width, a list explicit indices, None or
    "auto" fitted to the nodule's size), one for every centre or one per centre; empty → ±`half_slices`, and
    with `half_slices` None too (the default, as in the module) every nodule is fitted to its size.
    `weights` None → the bundled demo model.
    """

    sample: str | None
    gene_table: str | Path | None = None
    blend_with: str | None = None
    blend_weight: float = 0.5
    impute_missing_genes: bool = False
    weights: str | Path | None = None
    device: str = "auto"
    centres_ras: Any = None
    auto_count: int = 0
    slices: Sequence[SliceSpec] = ()
    half_slices: int | None = None
    seed: int = 0
    allow_outside_lung: bool = False
    weight_map: bool = False
    input_name: str | None = None


@dataclass
class InsertionPlan:
    """A validated request: the generator, the aligned profile, the centres (None = automatic) and slices."""

    request: InsertionRequest
    inserter: Any
    profile: np.ndarray | None
    gene_sample: str | None
    centres: np.ndarray | None
    slices: list[list[int] | None] | None   # None for a nodule: fitted to its size
    half_slices: int | None                 # for automatic centres; None: fitted to each nodule's size
    provenance: dict[str, Any] = field(default_factory=dict)


# --- slices -------------------------------------------------------------------------------------------------
_HALF_WIDTH = re.compile(r"(?:±|\+-|\+/-)(\d+)")
_RANGE = re.compile(r"(-?\d+)(?:-|\.\.|:)(-?\d+)")


def parse_slice_spec(text: str) -> int | list[int] | None:
    """'±K' → K (a half width); '40, 41, 45-48' → [40, 41, 45, 46, 47, 48]; 'auto' → None (fitted to the
    nodule's size)."""
    spec = str(text).strip()
    if spec.lower() == FIT_TO_SIZE:
        return None
    match = _HALF_WIDTH.fullmatch(spec.replace(" ", ""))
    if match:
        half = int(match.group(1))
        if 2 * half + 1 > MAX_SLICES:
            raise RequestError(f"slices {text!r}: ±{half} asks for more slices than any CT has (at most {MAX_SLICES})")
        return half
    spec = re.sub(r"\s*(-|\.\.|:)\s*(?=-?\d)", r"\1", spec)  # "45 - 48" → "45-48"
    values: list[int] = []
    for part in (p for p in re.split(r"[,\s]+", spec) if p):
        span = _RANGE.fullmatch(part)
        if span:
            low, high = int(span.group(1)), int(span.group(2))
            if high < low:
                raise RequestError(f"slices {text!r}: the range {part} runs backwards")
            if high - low + 1 > MAX_SLICES:
                raise RequestError(f"slices {text!r}: the range {part} holds more slices than any CT has "
                                   f"(at most {MAX_SLICES})")
            values.extend(range(low, high + 1))
        elif re.fullmatch(r"-?\d+", part):
            values.append(int(part))
        else:
            raise RequestError(f"slices {text!r}: expected '±K', 'auto' or slice indices such as '40, 41, 45-48'")
        if len(values) > MAX_SLICES:
            raise RequestError(f"slices {text!r}: more than {MAX_SLICES} slices")
    if not values:
        raise RequestError(f"slices {text!r}: no slice given")
    return values


def split_slice_specs(text: str) -> list[str]:
    """'40-44; 50-52' → ['40-44', '50-52'] (one per centre); '' → [] (use ±half slices)."""
    groups = [group.strip() for group in str(text).split(";")]
    if not any(groups):
        return []
    if not all(groups):
        raise RequestError(f"slices {text!r}: an empty group between ';'")
    return groups


def _as_spec(spec: SliceSpec) -> int | list[int] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return parse_slice_spec(spec)
    if isinstance(spec, (int, np.integer)):
        if spec < 0:
            raise RequestError(f"a half width of {spec} slices: it must be ≥ 0")
        return int(spec)
    values = [int(k) for k in spec]
    if not values:
        raise RequestError("an empty slice list")
    return values


def plan_slices(
    specs: Sequence[SliceSpec] | None, centres: np.ndarray, geometry: Any, half_slices: int | None
) -> list[list[int] | None]:
    """Explicit slice lists for every centre from the specs (one for all, or one per centre); None for a
    centre whose slices are fitted to its nodule's size."""
    specs = list(specs or ())
    k_float = geometry.ras_to_kji(np.asarray(centres, dtype=np.float64).reshape(-1, 3))[:, 0]
    if not np.all(np.abs(k_float) < 10 * MAX_SLICES):  # the insertion names the volume's range for nearer ones
        raise RequestError(f"a centre lies outside the volume (slice index {k_float[np.argmax(np.abs(k_float))]:.3g})")
    centre_k = np.rint(k_float).astype(int)
    parsed = [_as_spec(s) for s in specs] if len(specs) else [None if half_slices is None else int(half_slices)]
    if len(parsed) == 1:
        parsed = parsed * len(centre_k)
    if len(parsed) != len(centre_k):
        raise RequestError(f"{len(parsed)} slice specs for {len(centre_k)} centres: give one for all or one per centre")
    return [list(range(k - s, k + s + 1)) if isinstance(s, int) else s for k, s in zip(centre_k, parsed)]


# --- labels -------------------------------------------------------------------------------------------------
def gene_sample_label(sample: str | None, blend_with: str | None = None, blend_weight: float = 0.0) -> str | None:
    """The profile as recorded in the provenance and the GeneSample tag: 'S' or 'S (0.75) + B (0.25)'."""
    if not blend_with:
        return sample
    return f"{sample} ({1 - float(blend_weight):.2f}) + {blend_with} ({float(blend_weight):.2f})"


# --- resources ----------------------------------------------------------------------------------------------
def default_weights() -> Path:
    """The bundled demo model (`bundled.bundled_weights_path`: the wheel's package data, else Resources/)."""
    from RadiogenomicGANLib.bundled import bundled_weights_path

    return bundled_weights_path()


def load_inserter(weights: str | Path, device: str = "auto") -> Any:
    """A NoduleInserter for the weights file; a missing file is a RequestError saying which (before torch loads)."""
    path = Path(weights)
    if not path.exists():
        if path == default_weights():
            raise RequestError(f"the bundled demo model {path} is not installed: choose a weights file")
        raise RequestError(f"weights file not found: {path}")
    from RadiogenomicGANLib.insertion import NoduleInserter

    return NoduleInserter.from_weights(path, device=device)


def read_table(path: str | Path) -> Any:
    """The gene table (linear FPKM, genes × samples) at `path`."""
    from RadiogenomicGANLib.genes import read_gene_table

    if not Path(path).is_file():
        raise RequestError(f"gene table not found: {path}")
    return read_gene_table(path)


def _stamp(path: str | Path) -> tuple[str, float | None]:
    resolved = str(Path(path).resolve())
    return resolved, (os.path.getmtime(resolved) if os.path.exists(resolved) else None)


class ResourceCache:
    """One generator and one gene table, reloaded when the file, its time stamp or the device changes."""

    def __init__(self) -> None:
        self._inserter: tuple[tuple, Any] | None = None
        self._table: tuple[tuple, Any] | None = None

    def inserter(self, weights: str | Path | None = None, device: str = "auto") -> Any:
        key = (*_stamp(weights or default_weights()), str(device))
        if self._inserter is None or self._inserter[0] != key:
            self.release()
            self._inserter = (key, load_inserter(weights or default_weights(), device))
        return self._inserter[1]

    def gene_table(self, path: str | Path) -> Any:
        key = _stamp(path)
        if self._table is None or self._table[0] != key:
            self._table = (key, read_table(path))
        return self._table[1]

    def release(self) -> None:
        """Drop the cached generator and table; give cached CUDA memory back to the driver."""
        on_gpu = self._inserter is not None and getattr(self._inserter[1].device, "type", "cpu") == "cuda"
        self._inserter = None
        self._table = None
        if on_gpu:
            import torch

            torch.cuda.empty_cache()


# --- plan and run -------------------------------------------------------------------------------------------
def _check_request(request: InsertionRequest) -> None:
    """Checks that need no file: placement, counts, blend weight."""
    explicit = request.centres_ras is not None and np.size(request.centres_ras) > 0
    if explicit and request.auto_count:
        raise RequestError("give nodule centres or an automatic count, not both")
    if not explicit and request.auto_count < 1:
        raise RequestError("give nodule centres (points in the lung) or an automatic count ≥ 1")
    if request.half_slices is not None and not 0 <= request.half_slices <= MAX_SLICES // 2:
        raise RequestError(f"±{request.half_slices} slices: the half width must be between 0 and {MAX_SLICES // 2}")
    if request.blend_with and not 0.0 <= float(request.blend_weight) <= 1.0:
        raise RequestError(f"blend weight {request.blend_weight} is not in [0, 1]")


def make_plan(request: InsertionRequest, geometry: Any, cache: ResourceCache | None = None) -> InsertionPlan:
    """Validate a request against its CT geometry; loads the generator and forms the gene profile."""
    from RadiogenomicGANLib.genes import profile_for_model, training_patients_among
    from RadiogenomicGANLib.imputation import check_imputation

    _check_request(request)
    cache = cache or ResourceCache()
    half = None if request.half_slices is None else int(request.half_slices)
    specs = [_as_spec(s) for s in request.slices]
    centres = None
    slices = None
    if request.auto_count:
        if specs and (len(specs) != 1 or isinstance(specs[0], list)):
            raise RequestError("with automatic placement the slices can only be one '±K' or 'auto'")
        half = specs[0] if specs else half
    else:
        try:
            centres = np.asarray(request.centres_ras, dtype=np.float64).reshape(-1, 3)
        except (TypeError, ValueError) as error:
            raise RequestError("centres must be RAS points (n, 3) in mm") from error
        if not np.isfinite(centres).all():
            raise RequestError("centres must be finite RAS points in mm")
        slices = plan_slices(specs, centres, geometry, half)

    inserter = cache.inserter(request.weights, request.device)
    profile = None
    imputed = None
    seen_in_training: list[str] = []
    if inserter.kind != "inpainting":
        if not request.gene_table:
            raise RequestError(f"the {inserter.kind} model needs a gene table (GEO text or CSV)")
        if not request.sample:
            raise RequestError("choose a sample of the gene table")
        metadata = inserter.metadata
        blend = request.blend_with or None
        table = cache.gene_table(request.gene_table)
        imputed = check_imputation(table, [request.sample, blend], metadata.gene_names, request.impute_missing_genes)
        profile = profile_for_model(
            table, request.sample, metadata.genes,
            impute=request.impute_missing_genes, blend_with=blend,
            blend_weight=float(request.blend_weight) if blend else 0.0)
        seen_in_training = training_patients_among(table, [request.sample, blend], metadata.genes,
                                                   impute=request.impute_missing_genes)
    provenance: dict[str, Any] = {
        "gene_table": os.path.basename(str(request.gene_table)) if request.gene_table else None,
        "impute_missing_genes": bool(request.impute_missing_genes),
        "imputed_genes": imputed,
        "gene_samples_in_training": seen_in_training,
    }
    if request.input_name:
        provenance["input_volume"] = request.input_name
    label = gene_sample_label(request.sample, request.blend_with, request.blend_weight)
    return InsertionPlan(request, inserter, profile, label, centres, slices, half, provenance)


def training_sample_notes(provenance: dict[str, Any]) -> list[str]:
    """One line per gene sample of a result that is a patient the model trained on (`make_plan` records them)."""
    return [f"sample {sample} is one of the patients the model trained on; its profile is prepared as in training, "
            "so the nodule shows what the model learnt for it, not how it carries over to a new patient"
            for sample in provenance.get("gene_samples_in_training") or ()]


def _out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def execute(
    plan: InsertionPlan,
    volume_hu: np.ndarray,
    geometry: Any,
    progress: ProgressCallback | None = None,
    cache: ResourceCache | None = None,
) -> Any:
    """Run the plan on the CT; InsertionResult with the provenance of the request. Auto device: OOM → CPU."""
    request = plan.request
    arguments = dict(
        auto_count=int(request.auto_count) if plan.centres is None else 0, slices=plan.slices,
        half_slices=plan.half_slices, seed=int(request.seed), allow_outside_lung=bool(request.allow_outside_lung),
        return_weight_map=bool(request.weight_map), progress=progress, gene_sample=plan.gene_sample)
    try:
        result = plan.inserter.insert(volume_hu, geometry, plan.profile, plan.centres, **arguments)
    except RuntimeError as error:
        if str(request.device) != "auto" or plan.inserter.device.type != "cuda" or not _out_of_memory(error):
            raise
        logging.warning("RadiogenomicGAN: the GPU ran out of memory; running on the CPU instead")
        plan.inserter = (cache or ResourceCache()).inserter(request.weights, "cpu")
        result = plan.inserter.insert(volume_hu, geometry, plan.profile, plan.centres, **arguments)
    result.provenance.update(plan.provenance)
    return result


def run(
    request: InsertionRequest,
    volume_hu: np.ndarray,
    geometry: Any,
    progress: ProgressCallback | None = None,
    cache: ResourceCache | None = None,
) -> Any:
    """`make_plan` then `execute`: the whole request path in one call."""
    return execute(make_plan(request, geometry, cache), volume_hu, geometry, progress, cache)
