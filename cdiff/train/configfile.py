"""Run configs as TOML files: reading them, with ``--set section.key=value`` overrides, and writing them.

Every key of a file or of an override is checked: an unknown one is an error that names it and the
nearest valid key (or the model kind it belongs to), and a value of the wrong type is an error
that names the key. ``model.kind`` picks the ``[model]`` dataclass from the table of kinds
(cdiff.train.kinds); the sections themselves are cdiff.train.config's.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import fields
from pathlib import Path

from cdiff.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, ValConfig, to_dict
from cdiff.train.kinds import DEFAULT_KIND, KINDS, model_kind


def _section_classes(kind: str) -> dict[str, type]:
    return {"model": model_kind(kind).config, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "val": ValConfig}


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
    kind = model.get("kind", DEFAULT_KIND) if isinstance(model, dict) else DEFAULT_KIND
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
                owner = [name for name, k in KINDS.items()
                         if section == "model" and key in typing.get_type_hints(k.config)]
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
