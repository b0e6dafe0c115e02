"""The training run's configuration: five frozen dataclasses, one per section.

``[model]`` belongs to the model being trained: its ``kind`` picks the dataclass (the table of
kinds is cdiff.train.kinds: ``"cdiffset"`` -> cdiff.train.cdiffset.CDiffSETConfig, ``"s2o_npde"`` ->
cdiff.train.s2o_npde.S2ONPDEConfig). ``[data]``, ``[optim]``, ``[train]`` and ``[val]`` have the
same keys for every model. Defaults are the paper's and the official release's (see each field);
a model whose paper trains otherwise gives its own defaults for those sections
(``section_defaults()`` on its [model] class: S2O-NPDE's Adam, lr schedule and batch 1). A value
of the wrong type or outside its range is an error that names the key. Reading and writing the
TOML files, with ``--set`` overrides: cdiff.train.configfile.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields

from cdiff.config import DTYPES
from cdiff.data.datasets import DATASET_KINDS, FORCE_KINDS

SCHEDULES = ("cosine", "constant", "linear_decay")
PRECISIONS = tuple(DTYPES)  # fp32, or autocast to fp16 (with a gradient scaler) or bf16
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = DATASET_KINDS + ("synthetic",)  # synthetic: generated in memory (cdiff.data.synth)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config: {key} {message}")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "synthetic"  # qxs, sar2opt, sar2eo, spacenet6, spacenet6_chips, sen12, folders, csv
    #                          (cdiff.open_dataset), or synthetic
    root: str = ""  # the dataset's folder (for csv: the pairs CSV file); unused for synthetic
    train_list: str = ""  # a list of training pairs; "" = the field's frozen list for qxs, sar2opt, sar2eo,
    #                       spacenet6(_chips) (docs/datasets.md), cdiff's 80/20 split by scene for the others
    force: bool = False  # use a train_list that is not the published one (its numbers then compare with no table)
    crop: int = 0  # square crop side in px; 0 = the dataset's own (512 for sar2opt and spacenet6, else none)
    random_crop: bool = True  # training crops at random places (validation: the centre)
    hflip: bool = True  # random horizontal flips (the release: on)
    vflip: bool = True  # random vertical flips (the release: on)
    rot90: bool = True  # random rotations by multiples of 90 degrees (the release: on)
    latents: str = ""  # a folder written by `cdiff cache-latents`: train from it instead of encoding images
    workers: int = 4  # DataLoader worker processes per rank (0: load in the training process)
    count: int = 1000  # synthetic only: pairs of the training list (pair i from seed i)
    size: int = 256  # synthetic only: image side in px

    def __post_init__(self):
        _require(self.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}, got {self.kind!r}")
        _require(self.kind == "synthetic" or bool(self.root), "data.root", f"is needed for data.kind = {self.kind!r}")
        _require(not self.force or self.kind in FORCE_KINDS, "data.force",
                 f"applies to the datasets with published lists ({', '.join(FORCE_KINDS)}), not {self.kind!r}")
        _require(self.crop >= 0, "data.crop", f"must be >= 0, got {self.crop}")
        _require(self.workers >= 0, "data.workers", f"must be >= 0, got {self.workers}")
        _require(self.count >= 1, "data.count", f"must be >= 1, got {self.count}")
        _require(self.size >= 64 and self.size % 64 == 0, "data.size", f"must be a multiple of 64, got {self.size}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-5  # AdamW learning rate after warm-up (paper and release)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay (paper and release)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays (torch's defaults, as the release)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up from 0 (paper and release)
    schedule: str = "cosine"  # after warm-up: "cosine" to 0 at train.steps (the release), "constant", or
    #                           "linear_decay": constant to train.steps / 2, then linearly to 0 (S2O-NPDE, CycleGAN)
    clip_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping (the release does not clip)

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.clip_grad_norm >= 0, "optim.clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50_000  # optimiser steps (paper and release)
    batch_size: int = 64  # per process; the global batch is batch_size x processes x accumulation
    accumulation: int = 1  # micro-batches whose gradients are summed into one optimiser step
    precision: str = "bf16"  # "bf16" autocast, "fp16" autocast with a gradient scaler, or "fp32" (the release)
    seed: int = 2025  # the paper's seed: data order, augmentation, noise and timesteps all derive from it
    device: str = "auto"  # "auto" (CUDA when available), "cuda" or "cpu"
    skip_nonfinite: int = 0  # steps with a NaN/Inf loss that may be skipped before the run stops
    log_every: int = 100  # steps per line of log.jsonl (averages over those steps)
    save_every: int = 2000  # steps between checkpoints (the release: 2000)
    keep_last: int = 3  # checkpoints kept besides the best one
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (a multiple of save_every;
    #                      10000 keeps step-040000, the field's published one); 0 = none
    note: str = ""  # printed when the run starts: what the config is for, and what it cannot show

    def __post_init__(self):
        for key in ("steps", "batch_size", "accumulation", "log_every", "save_every", "keep_last"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.keep_every >= 0 and self.keep_every % self.save_every == 0, "train.keep_every",
                 f"must be 0 or a multiple of train.save_every ({self.save_every}), got {self.keep_every}")
        _require(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _require(self.device in DEVICES, "train.device", f"must be one of {DEVICES}, got {self.device!r}")
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(self.skip_nonfinite >= 0, "train.skip_nonfinite", f"must be >= 0, got {self.skip_nonfinite}")


@dataclass(frozen=True)
class ValConfig:
    """Validation, which picks the ``best`` checkpoint, reads pairs held out of the TRAINING list, never
    the test split (cdiff.train.data.training_split): no model is selected on test data."""

    every: int = 0  # steps between validations; 0 = never
    holdout: int = 0  # pairs taken out of the training list for validation (the same ones in every run on the
    #                   list); they are not trained on. 0 = none (validation needs some)
    images: int = 100  # held-out pairs validated, the first of the holdout (the release validates 100)
    steps: int = 20  # sampler steps per image
    batch_size: int = 8
    grid_images: int = 4  # rows of the PNG grid (SAR | prediction | target | confidence)

    def __post_init__(self):
        _require(self.every >= 0, "val.every", f"must be >= 0, got {self.every}")
        _require(self.holdout >= 0, "val.holdout", f"must be >= 0, got {self.holdout}")
        for key in ("images", "steps", "batch_size"):
            _require(getattr(self, key) >= 1, f"val.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.grid_images >= 0, "val.grid_images", f"must be >= 0, got {self.grid_images}")
        if self.every:
            _require(self.holdout > 0, "val.every", f"= {self.every} needs val.holdout > 0: validation reads pairs "
                     "held out of the training list, never the test split (or set val.every = 0)")
            _require(self.images <= self.holdout, "val.images",
                     f"({self.images}) must be <= val.holdout ({self.holdout}), the pairs held out to validate on")


@dataclass(frozen=True)
class RunConfig:
    model: typing.Any  # the model's own dataclass, picked by model.kind
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    val: ValConfig = ValConfig()

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step in one process; times the world size under torchrun."""
        return self.train.batch_size * self.train.accumulation


# --- comparing -------------------------------------------------------------------------------


def to_dict(config: RunConfig) -> dict:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in fields(config)}


def differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``section.key: old -> new`` for every key that differs."""
    a, b = to_dict(old), to_dict(new)
    out = []
    for section in a:
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                out.append(f"{section}.{key}: {a[section].get(key)!r} -> {b[section].get(key)!r}")
    return out
