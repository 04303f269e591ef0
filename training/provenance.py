"""Where a run's weights came from: the code (git commit), the data (dataset and gene-list hashes), the
command, the options and the machine. Written into every checkpoint (`run_record`) and into the exported
weights' provenance (`run_provenance`), so a weights file can be traced back to the run that made it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from RadiogenomicGANLib.atomic import file_sha256

from .config import TrainConfig
from .distributed import DistContext
from .losses import LossWeights


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (suffix -dirty with local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def gene_names_sha(names: np.ndarray) -> str:
    """SHA-256 of a gene list in order: a resumed run must see the genes its checkpoint was trained on."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def run_record(cfg: TrainConfig, ctx: DistContext, global_batch: int, gene_names: np.ndarray) -> dict[str, Any]:
    """What every checkpoint records about the run: world size, global batch, dataset path and hashes (the
    dataset is hashed on rank 0 only, which alone writes)."""
    return {
        "world_size": ctx.world_size,
        "global_batch": global_batch,
        "dataset": str(Path(cfg.data).resolve()),
        "dataset_sha256": file_sha256(cfg.data) if ctx.is_main else "",
        "gene_names_sha256": gene_names_sha(gene_names),
    }


def run_provenance(cfg: TrainConfig, ctx: DistContext, run: dict[str, Any], kind: str, weights: LossWeights,
                   command: str | None) -> dict[str, Any]:
    """The exported weights' provenance known before training starts (the code that runs, not the code at the
    end); the loop adds the step count, the date and, when chosen on validation, the selected step."""
    return {
        "command": command or "training.training_loop(...)",
        "seed": cfg.seed,
        "model": kind,
        "dataset": run["dataset"],
        "dataset_sha256": run["dataset_sha256"],
        "git_commit": git_commit() if ctx.is_main else None,
        "torch": torch.__version__,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "global_batch": run["global_batch"],
        "train_config": cfg.to_dict(),
        "loss_weights": weights.to_dict(),
    }
