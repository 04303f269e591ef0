"""Generator weights on disk: `NAME.safetensors` (tensors) + `NAME.json` (everything needed to use them).

Why two files and no pickle: a weights file is shared and downloaded; unpickling runs arbitrary code, so
tensors live in safetensors (pure data) and the network is rebuilt from code using the JSON's
`architecture`. Nothing here calls `torch.load` or `pickle`; a pickle or zip checkpoint handed in is
recognised by its first bytes and refused.

JSON keys: format_version, kind, architecture (GeneratorConfig.to_dict()), gene_names, gene_clip,
gene_preprocessing (what the fit kept and dropped), gene_out_of_sample_gain (optional, 1 when absent),
hu_window, patch_size, patch_spacing_mm, provenance (free-form, JSON-serialisable), safetensors_sha256,
safetensors_bytes. The SHA-256 covers the whole tensors file, so a flipped byte inside tensor data, a
truncated copy or a tensors file paired with another file's JSON is caught before anything is used.
The other way round, the tensors file's header metadata holds `json_sha256`, the SHA-256 of the JSON record
without those two keys (canonical form: sorted keys, no spaces): an edited JSON — gene names reordered,
which would silently misalign every gene, a changed window or spacing — is refused too. Every file
save_weights() writes carries it; files exported before it load without it.
Nothing in the JSON is trusted before it is checked: types first, then plausible ranges (HU window, patch
spacing), then the tensors' shapes against the architecture built on the `meta` device, which allocates
nothing, so a forged width cannot make a 20 GB network before any tensor is compared.
Tensor keys: `generator.<state-dict key>` for the network (batch-norm buffers included), and the fitted gene
preprocessing (`genes.GenePreprocessing`) as `gene_norm.mean`, `gene_norm.std` (float32, one per gene name)
and, when it projects, `gene_norm.components` (K × G) and `gene_norm.fitted_scores` (N × K: the whitened scores
of the N training patients the projection was fitted on, so that their profiles are prepared as training prepared
them; absent in older files) — inside the hashed file. Format 1 (plain z-scores, no
filter or clip) is refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from RadiogenomicGANLib.atomic import write_bytes_atomic
from RadiogenomicGANLib.genes import GenePreprocessing
from RadiogenomicGANLib.intensity import HU_WINDOW
from RadiogenomicGANLib.networks import KINDS, GeneratorConfig, build_generator

FORMAT_VERSION = 2
TENSORS_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"
_PREFIX = "generator."
_MEAN_KEY, _STD_KEY, _COMPONENTS_KEY = "gene_norm.mean", "gene_norm.std", "gene_norm.components"
_FITTED_KEY = "gene_norm.fitted_scores"
_REQUIRED_KEYS = ("format_version", "kind", "architecture", "gene_names", "gene_clip", "hu_window", "patch_size",
                  "patch_spacing_mm", "provenance", "safetensors_sha256", "safetensors_bytes")
_HASHED_ELSEWHERE = ("safetensors_sha256", "safetensors_bytes")
#: A HU window must lie in what CT can hold (air −1000 … dense metal ~30000, with margin) and span ≥ 10 HU.
HU_WINDOW_LIMITS = (-4000.0, 40000.0)
MIN_HU_WINDOW_WIDTH = 10.0
#: A patch pixel between 0.05 mm (finer than any CT) and 20 mm (coarser than any); the default is 0.9375.
PATCH_SPACING_LIMITS_MM = (0.05, 20.0)
_HOW_TO_CONVERT = ("Loading it would unpickle, which can run arbitrary code, so it is refused. If you trust "
                   "it, load it yourself, put the state dict into build_generator(config) and export with "
                   "RadiogenomicGANLib.weights.save_weights().")


class WeightsError(ValueError):
    """A weights file that cannot be used; the message says what is wrong and what to do."""


@dataclass(kw_only=True)
class WeightsMetadata:
    """What a generator needs besides its tensors: how to build it and how to prepare its inputs."""

    config: GeneratorConfig
    genes: GenePreprocessing        # fitted on the training patients; empty for inpainting
    hu_window: tuple[float, float] = HU_WINDOW
    patch_size: int
    patch_spacing_mm: float
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def gene_names(self) -> list[str]:
        """The genes a profile must provide (by name), in the model's order."""
        return self.genes.gene_names

    def validate(self) -> None:
        """Raise WeightsError if the fields contradict each other (checked on save and on load)."""
        genes, count = self.genes, self.config.num_genes
        problems = genes.problems()
        if problems:
            raise WeightsError("the gene preprocessing is unusable: " + "; ".join(problems))
        # inpainting takes no genes, so its weights may carry no gene table at all
        if genes.output_dim != count and not (self.kind == "inpainting" and genes.num_genes == 0):
            raise WeightsError(f"the gene preprocessing gives {genes.output_dim} inputs to a generator that takes "
                               f"{count}: the gene table and the network do not belong together")
        low, high = self.hu_window
        if not (math.isfinite(low) and math.isfinite(high) and low + MIN_HU_WINDOW_WIDTH <= high
                and HU_WINDOW_LIMITS[0] <= low and high <= HU_WINDOW_LIMITS[1]):
            raise WeightsError(f"hu_window must be (low, high) within {HU_WINDOW_LIMITS[0]:.0f}…"
                               f"{HU_WINDOW_LIMITS[1]:.0f} HU and at least {MIN_HU_WINDOW_WIDTH:.0f} HU wide, got "
                               f"{self.hu_window}")
        if self.patch_size != self.config.patch_size:
            raise WeightsError(f"patch_size {self.patch_size} differs from the architecture's "
                               f"{self.config.patch_size}")
        low_mm, high_mm = PATCH_SPACING_LIMITS_MM
        if not (math.isfinite(self.patch_spacing_mm) and low_mm <= self.patch_spacing_mm <= high_mm):
            raise WeightsError(f"patch_spacing_mm must lie in {low_mm}…{high_mm} mm, got {self.patch_spacing_mm}")
        if self.format_version != FORMAT_VERSION:
            raise WeightsError(f"format_version {self.format_version} is not {FORMAT_VERSION}, the version "
                               "this code writes and reads")


# ----------------------------------------------------------------------------------------------------
# Paths and file sniffing


def weights_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) for a path given with either suffix or with none."""
    path = Path(path)
    if path.suffix in (TENSORS_SUFFIX, JSON_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + TENSORS_SUFFIX), path.with_name(path.name + JSON_SUFFIX)


def _unsafe_format(head: bytes) -> str | None:
    """Name the format if the first bytes are those of a pickle or a zip (torch.save) file."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the format of torch.save / .pt / .pth / .ckpt checkpoints)"
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]}; legacy torch.save / .pkl files)"
    return None


def _sniff(path: Path) -> None:
    """Refuse a file that is not safetensors, naming pickle/zip files explicitly; never parses them."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    unsafe = _unsafe_format(head)
    if unsafe:
        raise WeightsError(f"{path} is {unsafe}, not safetensors. {_HOW_TO_CONVERT}")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or not 2 <= header_len <= size - 8:
        raise WeightsError(f"{path} is not a safetensors file (empty, truncated or another format). "
                           "Weights are NAME.safetensors + NAME.json as written by save_weights().")


# ----------------------------------------------------------------------------------------------------
# Save


def save_weights(path: str | os.PathLike[str], generator: nn.Module, metadata: WeightsMetadata) -> Path:
    """Write NAME.safetensors then NAME.json (each atomically); returns the .safetensors path.

    `path` may carry either suffix or none. The generator's `.config` must equal `metadata.config`.
    """
    config = getattr(generator, "config", None)
    if config != metadata.config:
        raise WeightsError(f"the generator's config {config} differs from metadata.config {metadata.config}")
    metadata.validate()
    tensors_path, json_path = weights_paths(path)
    tensors = {_PREFIX + key: value.detach().to("cpu").contiguous().clone()
               for key, value in generator.state_dict().items()}
    tensors[_MEAN_KEY] = torch.from_numpy(np.asarray(metadata.genes.means, dtype=np.float32).copy())
    tensors[_STD_KEY] = torch.from_numpy(np.asarray(metadata.genes.stds, dtype=np.float32).copy())
    if metadata.genes.components is not None:
        tensors[_COMPONENTS_KEY] = torch.from_numpy(np.asarray(metadata.genes.components, dtype=np.float32).copy())
    if metadata.genes.fitted_scores is not None:
        tensors[_FITTED_KEY] = torch.from_numpy(np.asarray(metadata.genes.fitted_scores, dtype=np.float32).copy())
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": metadata.kind,
        "architecture": metadata.config.to_dict(),
        "gene_names": list(metadata.gene_names),
        "gene_clip": float(metadata.genes.clip),
        "gene_preprocessing": dict(metadata.genes.fitted_on),
        "gene_out_of_sample_gain": float(metadata.genes.out_of_sample_gain),
        "hu_window": [float(v) for v in metadata.hu_window],
        "patch_size": int(metadata.patch_size),
        "patch_spacing_mm": float(metadata.patch_spacing_mm),
        "provenance": metadata.provenance,
    }
    try:
        json_digest = _record_sha256(record)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"provenance must be JSON-serialisable (no NaN, no objects): {error}") from error
    data = safetensors.torch.save(tensors, metadata={"format": "radiogenomicgan-weights",
                                                     "format_version": str(FORMAT_VERSION),
                                                     "kind": metadata.kind, "json_sha256": json_digest})
    record["safetensors_sha256"] = hashlib.sha256(data).hexdigest()
    record["safetensors_bytes"] = len(data)
    text = json.dumps(record, indent=1, allow_nan=False)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(tensors_path, data)
    write_bytes_atomic(json_path, (text + "\n").encode("utf-8"))
    return tensors_path


# ----------------------------------------------------------------------------------------------------
# Load


def _record_sha256(record: dict[str, Any]) -> str:
    """SHA-256 of the JSON record without the keys that describe the tensors file (canonical form)."""
    core = {key: value for key, value in record.items() if key not in _HASHED_ELSEWHERE}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header (already size-checked by _sniff)."""
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"the safetensors header is not valid JSON: {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _read_json(json_path: Path) -> dict[str, Any]:
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{json_path} is not valid JSON ({error}); re-export the weights or restore the "
                           "file from its source") from error
    if not isinstance(record, dict):
        raise WeightsError(f"{json_path} must hold a JSON object, found {type(record).__name__}")
    if record.get("format_version") == 1:
        raise WeightsError(f"{json_path} holds format-1 weights: their genes were plain z-scores, without the "
                           "expression filter and clip fitted on training patients that this version applies, "
                           "so every profile would be prepared differently than in training. Export the weights "
                           "again from a training run of this version (python -m training.train, or "
                           "python -m training.export from a checkpoint with a dataset prepared by this version)")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise WeightsError(f"{json_path} lacks the keys {missing}; it was not written by save_weights() "
                           f"(format {FORMAT_VERSION})")
    version = record["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise WeightsError(f"{json_path} has format_version {version!r}; this code reads version "
                           f"{FORMAT_VERSION} only (a newer file needs a newer RadiogenomicGAN)")
    size, digest = record["safetensors_bytes"], record["safetensors_sha256"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise WeightsError(f"{json_path}: safetensors_bytes must be a positive integer, got {size!r}")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise WeightsError(f"{json_path}: safetensors_sha256 must be 64 lower-case hex digits, got {digest!r}")
    return record


def _metadata_from(record: dict[str, Any], json_path: Path, tensors: dict[str, torch.Tensor]) -> WeightsMetadata:
    kind = record["kind"]
    if kind not in KINDS:
        raise WeightsError(f"{json_path}: unknown model kind {kind!r}; this code builds {', '.join(KINDS)}")
    architecture = record["architecture"]
    if not isinstance(architecture, dict):
        raise WeightsError(f"{json_path}: architecture must be an object of GeneratorConfig fields")
    try:
        config = GeneratorConfig.from_dict(architecture)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"{json_path}: the architecture cannot be built by this code: {error}") from error
    if config.kind != kind:
        raise WeightsError(f"{json_path}: kind {kind!r} but the architecture says {config.kind!r}")
    names = record["gene_names"]
    window = record["hu_window"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise WeightsError(f"{json_path}: gene_names must be a list of strings")
    clip = record["gene_clip"]
    if not isinstance(clip, int | float) or isinstance(clip, bool):
        raise WeightsError(f"{json_path}: gene_clip must be a number, got {clip!r}")
    fitted_on = record.get("gene_preprocessing", {})
    if not isinstance(fitted_on, dict):
        raise WeightsError(f"{json_path}: gene_preprocessing must be an object")
    gain = record.get("gene_out_of_sample_gain", 1.0)   # files written before the gain: none
    if not isinstance(gain, int | float) or isinstance(gain, bool):
        raise WeightsError(f"{json_path}: gene_out_of_sample_gain must be a number, got {gain!r}")
    components = tensors.get(_COMPONENTS_KEY)
    fitted = tensors.get(_FITTED_KEY)   # files written before it: no patient is recognised as a fitted one
    genes = GenePreprocessing(names, tensors[_MEAN_KEY].numpy(), tensors[_STD_KEY].numpy(), float(clip),
                              None if components is None else components.numpy(), fitted_on, float(gain),
                              None if fitted is None else fitted.numpy())
    if not (isinstance(window, list) and len(window) == 2 and all(isinstance(v, int | float) for v in window)):
        raise WeightsError(f"{json_path}: hu_window must be [low, high], got {window!r}")
    if not isinstance(record["provenance"], dict):
        raise WeightsError(f"{json_path}: provenance must be an object")
    if (isinstance(record["patch_size"], bool) or not isinstance(record["patch_size"], int)
            or isinstance(record["patch_spacing_mm"], bool) or not isinstance(record["patch_spacing_mm"], int | float)):
        raise WeightsError(f"{json_path}: patch_size must be an integer and patch_spacing_mm a number")
    metadata = WeightsMetadata(config=config, genes=genes,
                               hu_window=(float(window[0]), float(window[1])), patch_size=record["patch_size"],
                               patch_spacing_mm=float(record["patch_spacing_mm"]),
                               provenance=record["provenance"], format_version=record["format_version"])
    try:
        metadata.validate()
    except WeightsError as error:
        raise WeightsError(f"{json_path}: {error}") from None
    return metadata


def _check_against_architecture(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Same keys, shapes and dtypes as the network the JSON describes, and only finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{where} holds tensors of another architecture than its JSON describes "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}). "
            "The .safetensors and .json must come from the same save_weights() call.")
    wrong = [f"{k}: {tuple(state[k].shape)}/{state[k].dtype} vs {tuple(v.shape)}/{v.dtype}"
             for k, v in expected.items() if state[k].shape != v.shape or state[k].dtype != v.dtype]
    if wrong:
        raise WeightsError(f"{where}: {len(wrong)} tensors differ in shape or dtype from the JSON's architecture "
                           f"(file vs expected), e.g. {wrong[:3]}. The files do not belong together.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{where}: NaN or Inf in {bad[:3]} — the exporting run diverged; use another export")


def load_weights(path: str | os.PathLike[str], *, expected_kind: str | None = None,
                 expected_num_genes: int | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, WeightsMetadata]:
    """Validate NAME.safetensors + NAME.json and rebuild the generator (eval mode) on `map_location`.

    Raises WeightsError, with what is wrong and what to do, for: missing files, pickle/zip checkpoints,
    unreadable or incomplete JSON, another format version, unknown kind, a kind or gene count other than
    expected, truncated or corrupted tensors (size / SHA-256), tensors of another architecture.
    """
    given = Path(path)
    if given.is_file() and given.suffix not in (TENSORS_SUFFIX, JSON_SUFFIX):
        _sniff(given)                       # a pickle/zip is named as such; anything else is "not safetensors"
        raise WeightsError(f"{given} is not a weights file; pass NAME, NAME.safetensors or NAME.json")
    tensors_path, json_path = weights_paths(given)
    if not tensors_path.is_file():
        hint = f" (its sidecar {json_path.name} is there: copy both files together)" if json_path.is_file() else ""
        raise WeightsError(f"no weights file {tensors_path}{hint}; weights are NAME.safetensors + NAME.json")
    _sniff(tensors_path)
    if not json_path.is_file():
        raise WeightsError(f"{json_path} is missing: the .safetensors alone does not say which network it holds. "
                           "Keep the .json that save_weights() wrote next to it.")
    record = _read_json(json_path)

    kind = record["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise WeightsError(f"{tensors_path} holds a generator of kind {kind!r}, but kind {expected_kind!r} "
                          "was expected: pick weights exported for that model")
    num_genes = record["architecture"].get("num_genes") if isinstance(record["architecture"], dict) else None
    if expected_num_genes is not None and num_genes != expected_num_genes:
        raise WeightsError(f"{tensors_path} was trained on {num_genes} genes, but {expected_num_genes} were "
                           "expected: use weights trained on the same gene table")

    data = tensors_path.read_bytes()
    if len(data) != record["safetensors_bytes"]:
        state = "truncated" if len(data) < record["safetensors_bytes"] else "longer than recorded"
        raise WeightsError(f"{tensors_path} is {state} ({len(data)} bytes, the JSON records "
                           f"{record['safetensors_bytes']}); copy or download it again")
    if hashlib.sha256(data).hexdigest() != record["safetensors_sha256"]:
        raise WeightsError(f"{tensors_path} is corrupt: its SHA-256 differs from the one in {json_path.name} "
                           "(changed bytes, or a .json from another export); copy or download it again")
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError) as error:
        raise WeightsError(f"{tensors_path} cannot be read as safetensors: {error}") from error

    for key in (_MEAN_KEY, _STD_KEY):
        if key not in tensors:
            raise WeightsError(f"{tensors_path} lacks the tensor {key!r} (the gene normalisation)")
    metadata = _metadata_from(record, json_path, tensors)
    state = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
    known = (_MEAN_KEY, _STD_KEY, _COMPONENTS_KEY, _FITTED_KEY)
    stray = sorted(k for k in tensors if not k.startswith(_PREFIX) and k not in known)
    if stray:
        raise WeightsError(f"{tensors_path} holds unknown tensors {stray[:3]}; it was not written by save_weights()")
    with torch.device("meta"):                  # shapes only, nothing allocated: a forged width costs nothing
        skeleton = build_generator(metadata.config)
    _check_against_architecture(skeleton, state, tensors_path)
    # last, so that a JSON contradicting itself or its tensors gets the specific message above
    recorded = _header_metadata(data).get("json_sha256")
    if recorded is not None:  # absent only in files exported before the check existed
        try:
            actual = _record_sha256(record)
        except ValueError:
            actual = None
        if recorded != actual:
            raise WeightsError(f"{json_path} was changed after export (its content no longer matches the checksum "
                               f"stored in {tensors_path.name}): restore the file or export the weights again")
    generator = build_generator(metadata.config)
    generator.load_state_dict(state, strict=True)
    return generator.to(map_location).eval(), metadata
