"""The one place that turns a device preference (auto / cpu / cuda / cuda:N) into a torch device.

Insertion, training (one process per GPU under torchrun) and evaluation all go through it, so 'auto' means
the same everywhere and asking for a GPU that is not there is the same clear error everywhere.
"""

from __future__ import annotations

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
