"""The training run's configuration: frozen dataclasses read from TOML, with ``--set`` overrides.

A run config has five sections. ``[model]`` belongs to the model being trained (its ``kind``
picks the dataclass: ``"cdiffset"`` -> cdiff.train.cdiffset.CDiffSETConfig, ``"s2o_npde"`` ->
cdiff.train.s2o_npde.S2ONPDEConfig); ``[data]``, ``[optim]``, ``[train]`` and ``[val]`` have the
same keys for every model. Defaults are the paper's and the official release's (see each field);
a model whose paper trains otherwise gives its own defaults for those sections
(``section_defaults()`` on its [model] class: S2O-NPDE's Adam, lr schedule and batch 1). Every
key of a file or of ``--set section.key=value`` is checked: an unknown one is an error that names
it and the nearest valid key (or the model kind it belongs to), and a value of the wrong type or
outside its range is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

SCHEDULES = ("cosine", "constant", "linear_decay")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("qxs", "sar2opt", "spacenet6", "sen12", "folders", "csv", "synthetic")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config: {key} {message}")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "synthetic"  # qxs, sar2opt, spacenet6, sen12, folders, csv (cdiff.open_dataset), or synthetic
    root: str = ""  # the dataset's folder (for csv: the pairs CSV file); unused for synthetic
    train_list: str = ""  # the release's list of training pairs (train_eo_list_080.txt); "" = cdiff's 80/20 split
    test_list: str = ""  # ... of held-out pairs, for validation
    crop: int = 0  # square crop side in px; 0 = the dataset's own (512 for sar2opt and spacenet6, else none)
    random_crop: bool = True  # training crops at random places (validation: the centre)
    hflip: bool = True  # random horizontal flips (the release: on)
    vflip: bool = True  # random vertical flips (the release: on)
    rot90: bool = True  # random rotations by multiples of 90 degrees (the release: on)
    latents: str = ""  # a folder written by `cdiff cache-latents`: train from it instead of encoding images
    workers: int = 4  # DataLoader worker processes per rank (0: load in the training process)
    count: int = 1000  # synthetic only: training pairs (pair i from seed i); held-out pairs come after them
    size: int = 256  # synthetic only: image side in px

    def __post_init__(self):
        _require(self.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}, got {self.kind!r}")
        _require(self.kind == "synthetic" or bool(self.root), "data.root", f"is needed for data.kind = {self.kind!r}")
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

    def __post_init__(self):
        for key in ("steps", "batch_size", "accumulation", "log_every", "save_every", "keep_last"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _require(self.device in DEVICES, "train.device", f"must be one of {DEVICES}, got {self.device!r}")
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(self.skip_nonfinite >= 0, "train.skip_nonfinite", f"must be >= 0, got {self.skip_nonfinite}")


@dataclass(frozen=True)
class ValConfig:
    every: int = 2000  # steps between validations on the held-out split; 0 = never
    images: int = 100  # held-out pairs validated (the release: 100)
    steps: int = 20  # sampler steps per image
    batch_size: int = 8
    grid_images: int = 4  # rows of the PNG grid (SAR | prediction | target | confidence)

    def __post_init__(self):
        _require(self.every >= 0, "val.every", f"must be >= 0, got {self.every}")
        for key in ("images", "steps", "batch_size"):
            _require(getattr(self, key) >= 1, f"val.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.grid_images >= 0, "val.grid_images", f"must be >= 0, got {self.grid_images}")


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


def _model_classes() -> dict[str, type]:
    from cdiff.train.cdiffset import CDiffSETConfig
    from cdiff.train.s2o_npde import S2ONPDEConfig

    return {"cdiffset": CDiffSETConfig, "s2o_npde": S2ONPDEConfig}


def model_config_class(kind: str):
    """The dataclass of the ``[model]`` section for ``kind``."""
    classes = _model_classes()
    _require(kind in classes, "model.kind", f"must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind]


# --- reading --------------------------------------------------------------------------------


def _section_classes(kind: str) -> dict[str, type]:
    return {"model": model_config_class(kind), "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "val": ValConfig}


def _unknown(key: str, valid: list[str], where: str) -> ValueError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def _coerce(value, kind, key: str):
    """``value`` as the field type ``kind`` (str, int, float, bool, tuple[float, ...]), else an error naming ``key``."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        any_length = len(args) == 2 and args[1] is Ellipsis  # tuple[str, ...]
        if isinstance(value, (list, tuple)) and (any_length or len(value) == len(args)):
            return tuple(_coerce(v, args[0], key) for v in value)
    elif kind in (str, int, float, bool) and type(value) is kind:
        return value
    name = getattr(kind, "__name__", str(kind))
    raise ValueError(f"config: {key} must be {name}, got {value!r}")


def _parse_value(text: str):
    """A ``--set`` value: TOML syntax (1e-5, true, [0.9, 0.99], "x"), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _read_toml(path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid TOML file: {err}") from None


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict:
    """``tree`` with each ``section.key=value`` of ``overrides`` set (keys checked later, by ``from_dict``)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for item in overrides:
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-5")
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ValueError(f"--set {item!r}: {section} is not a section")
        tree[section][key] = _parse_value(text.strip())
    return tree


def from_dict(tree: dict, where: str = "config") -> RunConfig:
    """A RunConfig from nested dicts (a parsed TOML file); every key and value checked."""
    model = tree.get("model", {})
    kind = model.get("kind", "cdiffset") if isinstance(model, dict) else "cdiffset"
    classes = _section_classes(kind)
    defaults = getattr(classes["model"], "section_defaults", dict)()  # {section: instance}
    valid_keys = [f"{s}.{f.name}" for s, cls in classes.items() for f in fields(cls)]
    sections = {}
    for section, values in tree.items():
        if section not in classes:
            raise _unknown(section, list(classes), where)
        if not isinstance(values, dict):
            raise ValueError(f"{where}: [{section}] must be a table of keys")
        cls = classes[section]
        types = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in types:
                owner = [k for k, c in _model_classes().items()
                         if section == "model" and key in typing.get_type_hints(c)]
                if owner:  # e.g. a C-DiffSET option in an S2O-NPDE run
                    raise ValueError(f"{where}: model.{key} is an option of model.kind {owner[0]!r}, not of {kind!r}")
                raise _unknown(f"{section}.{key}", valid_keys, where)
            kwargs[key] = _coerce(value, types[key], f"{section}.{key}")
        sections[section] = dataclasses.replace(defaults[section], **kwargs) if section in defaults else cls(**kwargs)
    for section in classes.keys() - sections.keys():
        sections[section] = defaults.get(section) or classes[section]()
    return RunConfig(**sections)


def load_config(path=None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """The config of ``path`` (a TOML file; None: every default) with ``--set`` overrides applied."""
    tree = _read_toml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    return from_dict(apply_overrides(tree, overrides), where)


# --- writing and comparing ------------------------------------------------------------------


def to_dict(config: RunConfig) -> dict:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in fields(config)}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (every key, defaults included); ``from_dict`` reads it back equal."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        values = dict(sorted(values.items(), key=lambda item: item[0] != "kind"))  # kind first: it picks the keys
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``section.key: old -> new`` for every key that differs."""
    a, b = to_dict(old), to_dict(new)
    out = []
    for section in a:
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                out.append(f"{section}.{key}: {a[section].get(key)!r} -> {b[section].get(key)!r}")
    return out
