"""Training checkpoints: one safetensors file per checkpoint, tensors in the body, everything else as JSON.

Why this format: resuming must never unpickle (a checkpoint may come from someone else), so tensors go
through safetensors and the rest — step, configs, optimiser hyper-parameters, Python/NumPy RNG states —
is JSON in the safetensors header (``metadata["state"]``). One file per checkpoint makes the write atomic
with a single ``os.replace``: a run killed mid-save leaves the previous checkpoint intact and at worst a
stray hidden ``.*.partial.*`` file, which the next save removes.

Layout of the tensor names::

    model/<name>/<state-dict key>      networks (G, D, G_ema), raw modules, never DDP wrappers
    optim/<name>/<param index>/<key>   optimiser state tensors (Adam exp_avg, exp_avg_sq, step)
    rng/torch, rng/cuda, rng/numpy, rng/generator/<name>

Bit-exact resume needs every piece of state: model weights and buffers (BN running statistics), optimiser
moments and step counts, and all random-number states.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from RadiogenomicGANLib.atomic import atomic_path, remove_stale_partials

FORMAT = "radiogenomicgan-training-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the run resuming from it."""


# -- files -----------------------------------------------------------------------------------------------
def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in a folder, oldest first (by step, from the file name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | Path, step: int, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], keep: int = 3
) -> Path:
    """Write ``ckpt-<step>.safetensors`` atomically (temp file, fsync, rename), then keep only the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)
    final = checkpoint_path(directory, step)
    _write(final, tensors, state)
    for old in list_checkpoints(directory)[: -max(1, keep)]:
        old.unlink(missing_ok=True)
    return final


def _write(path: Path, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
    body = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(state)}
    with atomic_path(path) as temporary:
        save_file(body, str(temporary), metadata=header)
    _fsync_dir(path.parent)


def record_validation(path: str | Path, validation: Mapping[str, Any]) -> None:
    """Add a validation result to checkpoint `path` written before it was known (the score is read on a
    thread while training goes on): rewritten atomically, its tensors unchanged."""
    tensors, state = load_checkpoint(path)
    _write(Path(path), tensors, {**state, "validation": dict(validation)})


BEST_NAME = "best.safetensors"


def keep_if_best(path: str | Path, score: float | None) -> bool:
    """Copy checkpoint `path` to ``best.safetensors`` beside it when `score` is at least the best kept so far
    (the rotation of ``ckpt-*`` never removes it). Returns whether it was the best. NaN never wins. A tie
    goes to the later checkpoint: the validation score is a mean of Spearman ρ over a few donors, so it moves
    in steps of about 0.01 and ties are common, and the later one has trained longer (a run whose step 250
    tied with step 2000 exported step 250 before; README, Evaluation)."""
    path = Path(path)
    best = path.parent / BEST_NAME
    if score is None or not np.isfinite(score):
        return False
    if best.is_file():
        recorded = read_state(best).get("validation", {}).get("score")
        if recorded is not None and float(recorded) > score:
            return False
    with atomic_path(best) as temporary:
        temporary.write_bytes(path.read_bytes())
    return True


def best_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the best validation score (`keep_if_best`), if any."""
    best = Path(directory) / BEST_NAME
    return best if best.is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors (on CPU) and the JSON state; CheckpointError if it is not one of our checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state = _state(handle.metadata() or {}, path)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    return tensors, state


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of checkpoint `path` alone, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return _state(handle.metadata() or {}, Path(path))
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def _state(header: Mapping[str, str], path: Path) -> dict[str, Any]:
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a RadiogenomicGAN training checkpoint")
    if int(header.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {header['format_version']}, newer than this code ({FORMAT_VERSION})"
        )
    return json.loads(header["state"])


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- modules -------------------------------------------------------------------------------------------
def module_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model/{name}/{key}": value for key, value in module.state_dict().items()}


def load_module(name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    prefix = f"model/{name}/"
    state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint holds no network {name!r}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint network {name!r} does not fit this architecture: {error}") from None


# -- optimisers: state dict → tensors + JSON ------------------------------------------------------------
def optimizer_state(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimiser state dict: tensors by ``optim/<name>/<param>/<key>``, the rest JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(
    name: str, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    prefix = f"optim/{name}/"
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, entry = key[len(prefix) :].partition("/")
            state.setdefault(int(index), {})[entry] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint optimiser {name!r} does not fit: {error}") from None


# -- random-number generators ---------------------------------------------------------------------------
def rng_state(
    generators: Mapping[str, torch.Generator] | None = None, cuda_device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Python, NumPy, torch CPU, this process's CUDA device (only that one: asking every GPU would open a
    context on each from every rank) and named torch.Generator states."""
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    if cuda_device is not None and cuda_device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(cuda_device)
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    for name, gen in (generators or {}).items():
        tensors[f"rng/generator/{name}"] = gen.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    cuda_device: torch.device | None = None,
) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and cuda_device is not None and cuda_device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], cuda_device)
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for name, gen in (generators or {}).items():
        key = f"rng/generator/{name}"
        if key in tensors:
            gen.set_state(tensors[key])
