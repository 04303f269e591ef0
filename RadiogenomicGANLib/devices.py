"""The one place that turns a device preference (auto / cpu / cuda / cuda:N) into a torch device.

Insertion, training (one process per GPU under torchrun) and evaluation all go through it, so 'auto' means
the same everywhere and asking for a GPU that is not there is the same clear error everywhere.
"""

from __future__ import annotations

import ctypes
import platform

import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """An unknown device name, or a GPU asked for where there is none (a user error)."""


def resolve_device(preference: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'auto' → this process's GPU when there is one, else the CPU; 'cuda' without a GPU is a DeviceError.

    `local_rank` picks the GPU of a torchrun worker (rank modulo the GPUs present) for 'auto' and 'cuda'.
    """
    if isinstance(preference, torch.device):
        return preference
    name = str(preference).strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {preference!r}: use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but no CUDA GPU is available; use auto or cpu")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# glibc malloc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below 1 GiB come from the heap, and up to 2 GiB of freed heap is kept rather than handed back.
_MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1   # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; False (and nothing changed) on any other C library.

    glibc serves every block above its mmap threshold (32 MB at most by its own rule) with a fresh mapping and
    unmaps it when freed, and trims freed heap above a small threshold. A 128² training step frees and
    allocates tensors of 17–50 MB dozens of times, so without this each is faulted in again page by page (50–80
    thousand page faults per step on the recommended setting; the MONAI stand-in's step 1.5× as long, ours up to
    1.12×, 1.03× at the demo's 64²: README, Benchmarks). Only where memory comes from changes, never a value:
    training stays bit-identical. The cost: the process keeps its peak heap instead of returning freed memory
    to the system while it runs."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
