"""Every option of a training run in one dataclass, saved next to the run as ``config.json``.

One place for defaults, so the CLI, a ``--config FILE`` and a resumed run all resolve to the same thing and
the run folder records exactly what was trained. Unknown keys are refused: a typo in a JSON config must not
silently fall back to a default.

Batch size is **per process**: under ``torchrun --nproc_per_node N`` the global batch is ``N × batch_size``
(the paper's and the MONAI peer's batch of 16 on 4 GPUs is ``--batch-size 4``). Learning rates are not
rescaled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from RadiogenomicGANLib.atomic import write_bytes_atomic
from RadiogenomicGANLib.devices import DEVICE_CHOICES
from RadiogenomicGANLib.networks import COMPOSITION_OPTIONS, KINDS
from RadiogenomicGANLib.strict_dict import check_mapping

MODELS: tuple[str, ...] = KINDS            # the one definition of model kinds is the generator's
DEVICES: tuple[str, ...] = DEVICE_CHOICES
VALIDATION_THREAD: tuple[str, ...] = ("auto", "on", "off")
#: More DataLoader workers than this only oversubscribe the CPU (and a typo would try to fork them all).
MAX_WORKERS = 4 * (os.cpu_count() or 1)
# Provenance entries the run writes itself (training.train.export); --provenance may not replace them.
RESERVED_PROVENANCE: tuple[str, ...] = (
    "command", "steps", "seed", "model", "dataset", "dataset_sha256", "date", "git_commit", "torch", "device",
    "world_size", "global_batch", "train_config", "loss_weights",
)
# Architecture keys fixed by the run itself (model choice and dataset), not by generator/discriminator overrides.
_DERIVED_ARCH_KEYS: tuple[str, ...] = ("kind", "num_genes", "patch_size")


class ConfigError(ValueError):
    """A training configuration that cannot be run; the message says which option and why."""


@dataclass
class TrainConfig:
    """Resolved options of one training run (see the module docstring for the batch-size convention)."""

    data: str = ""                     # dataset file written by `python -m training.prepare`
    model: str = "proposed"            # proposed | mcgan | inpainting
    out: str = ""                      # run folder: config.json, checkpoints/, samples/, tensorboard/, weights
    steps: int = 10_000                # total optimisation steps (a resumed run continues up to this number)
    batch_size: int = 16               # per process; global batch = batch_size × world size
    lr_g: float = 2e-4                 # Adam, MC-GAN/DCGAN practice
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999           # EMA of G (the exported, sampled generator)
    ema_warmup: bool = True            # decay min(ema_decay, (1+t)/(10+t)): short runs get a usable EMA
    loss_weights: dict[str, float] = field(default_factory=dict)      # overrides of training.losses.LossWeights
    generator: dict[str, Any] = field(default_factory=dict)          # overrides of GeneratorConfig
    discriminator: dict[str, Any] = field(default_factory=dict)      # overrides of DiscriminatorConfig
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    amp: bool = True                   # bf16 autocast on CUDA
    cpu_bf16: bool = False             # bf16 autocast on CPU too: ~2× faster with AVX512-BF16/AMX, not bit-equal
    channels_last: bool = True         # channels-last memory format (faster convolutions on CPU and GPU)
    sync_batchnorm: bool = True        # under DDP, batch-norm statistics over the global batch
    deterministic: bool = False        # CUDA: deterministic cuDNN (CPU is deterministic anyway)
    num_workers: int = 0               # DataLoader worker processes per rank
    log_every: int = 10                # TensorBoard scalars / progress-bar refresh, in steps
    sample_every: int = 500            # image grids (TensorBoard + samples/*.png), 0 = only at the end
    checkpoint_every: int = 1000       # 0 = only at the end
    keep_checkpoints: int = 3          # newest checkpoints kept
    num_samples: int = 8               # rows of the image grid (fixed validation samples)
    tensorboard: bool = True
    progress: bool = True              # tqdm bar
    gene_components: int = 0           # > 0: refit the gene preprocessing on the train patients with a whitened
                                       # PCA to this many axes (a gene front-end the mapping cannot overfit)
    gene_top_variance: int = 0         # > 0: keep only this many most variable genes (before the PCA)
    gene_out_of_sample_gain: bool = True  # with the PCA: scale a patient outside the fit back to the training
                                       # patients' spread (GenePreprocessing.out_of_sample_gain)
    uniform_donors: bool = True        # each item is a uniformly drawn donor's slice, not slice-count weighted
    distant_wrong_genes: bool = True   # ḡ of D_ISG from the farther half of the other patients (in gene space)
    augment: bool = False              # flips and quarter turns of every drawn patch (NoduleBatchDataset)
    match_backgrounds: bool = False    # pair each nodule slice with a background of about its chest-wall share
    match_share: float = 0.1           # ... drawn among this fraction of the backgrounds nearest in wall share
    match_texture: bool = False        # ... nearest in wall share and the surroundings' texture together
    validation: bool = True            # at every checkpoint, the cheap validation score on the val donors;
                                       # the export is the best-scoring checkpoint's EMA generator
    validation_thread: str = "auto"    # score checkpoints on a thread beside training: on | off | auto (a CPU
                                       # with a core the training processes leave idle)
    export_name: str = ""              # RUN/<export_name>.safetensors+json; empty = the model name
    # composition options (networks.COMPOSITION_OPTIONS) set on the exported generator only: the run trains and
    # validates without them (e.g. edge_over_background: trained with it, margin and placement got worse)
    export_generator: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)         # extra entries for the weights' provenance

    # -- JSON round trip ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, refusing unknown keys (typos) and wrong types."""
        return cls(**check_mapping(cls, data, error=ConfigError, keys="training option(s)"))

    def save(self, path: str | Path) -> Path:
        """Write as indented JSON (atomically: a crash never leaves half a config)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    # -- checks that need no dataset ---------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first option that cannot work; returns self for chaining."""
        if not self.data:
            raise ConfigError("no dataset given (--data FILE)")
        if not self.out:
            raise ConfigError("no run folder given (--out RUN)")
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for name in ("steps", "batch_size", "num_samples", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "checkpoint_every", "num_workers", "gene_components", "gene_top_variance"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.match_share <= 1:
            raise ConfigError(f"match_share must be in (0, 1], got {self.match_share}")
        if self.match_texture and not self.match_backgrounds:
            raise ConfigError("match_texture refines match_backgrounds: give --match-backgrounds with --match-texture")
        if self.num_workers > MAX_WORKERS:
            raise ConfigError(f"num_workers must be <= {MAX_WORKERS} (4 × this machine's CPUs), got {self.num_workers}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1 (torch's generator), got {self.seed}")
        if self.validation_thread not in VALIDATION_THREAD:
            raise ConfigError(f"validation_thread must be one of {', '.join(VALIDATION_THREAD)}, "
                              f"got {self.validation_thread!r}")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        for name in ("beta1", "beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {value}")
        for section in ("generator", "discriminator"):
            fixed = sorted(set(getattr(self, section)) & set(_DERIVED_ARCH_KEYS))
            if fixed:
                raise ConfigError(
                    f"{section} option(s) {fixed} are set by the run (--model and the dataset), not by overrides"
                )
        loose = sorted(set(self.export_generator) - COMPOSITION_OPTIONS)
        if loose:
            options = ", ".join(sorted(COMPOSITION_OPTIONS))
            raise ConfigError(f"--export-generator sets composition options only ({options}), not {loose}: they "
                              "would change the trained tensors; use --generator")
        taken = sorted(set(self.provenance) & set(RESERVED_PROVENANCE))
        if taken:
            raise ConfigError(f"provenance key(s) {taken} are written by the training run itself")
        for key, value in self.loss_weights.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss weight {key!r} must be a finite number >= 0, got {value!r}")
        return self

    @property
    def weights_name(self) -> str:
        """File stem of the exported EMA generator."""
        return self.export_name or self.model


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is read as JSON when it parses (numbers, true), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value
