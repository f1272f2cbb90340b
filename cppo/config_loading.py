"""Loading a run config: a YAML mapping, dotted `key=value` overrides and `{field}` placeholders, turned
into the typed, validated dataclasses of `cppo.config`; and what a resume may and may not change."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import Config
from .errors import UserError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (`what` names it in the one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys to values")
    return raw


def load_config(source: str | Path | dict | None = None, overrides: list[str] = (), num_processes: int = 1) -> Config:
    """The run config of `source`, a YAML file or a mapping of the same shape (None: every default), with
    `a.b=value` overrides applied (values parsed as YAML; a leading `--`, as in `--ppo.steps=5`, is allowed),
    built and validated. `num_processes` is the number of processes it will run on (batch sizes must split)."""
    if isinstance(source, dict):
        raw = _copied(source)
    else:
        raw = read_yaml_mapping(source, "config file") if source is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. ppo.learning_rate=1e-5)")
        _set_dotted(raw, key.lstrip("-"), yaml.safe_load(text) if text else None)
    config = from_dict(Config, raw)
    for name in ("output_dir", "run_name", "run_group"):
        text = getattr(config, name)
        if text is not None:
            setattr(config, name, _PLACEHOLDER.sub(lambda m, name=name: path_text(_field(config, m[1], name)), text))
    return config.validate(num_processes)


def _copied(tree: Any) -> Any:
    """A copy of the mappings and lists of `tree`; other values as they are (rows given in memory are not copied)."""
    if isinstance(tree, dict):
        return {k: _copied(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copied(v) for v in tree]
    return tree


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.]*)\}")


def _field(config: Config, dotted: str, where: str) -> Any:
    """The value of config field `dotted` (`cppo.kr_coef`, `tasks.0.steps`), named in `where`'s text."""
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        else:
            raise UserError(f"{where}: {{{dotted}}} names no config field")
    if dataclasses.is_dataclass(node) or isinstance(node, list | dict):
        raise UserError(f"{where}: {{{dotted}}} is a section, not a value")
    return node


def path_text(value: Any) -> str:
    """A config value as a piece of a file name: `0.01`, `3e-05`, `cppo`, `None`; other characters become `_`."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings; a numeric part indexes a list (`tasks.0.steps=5`)."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parents):
        where = ".".join(parents[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {dotted}: {where} is not an existing list item")
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise UserError(f"override {dotted}: {where} is not a section")
        node = child
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise UserError(f"override {dotted}: no list item {leaf}")
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise UserError(f"override {dotted}: {'.'.join(parents)} is not a section")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, converting each value to its field's declared type."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        suggestion = nearest_key(prefix + str(unknown[0]))
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        raise UserError(f"unknown config key '{prefix}{unknown[0]}'{hint} (known keys here: "
                        f"{', '.join(sorted(names))})")
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def field_names(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted field name of dataclass `cls` and its sections (a list of sections as `tasks.0.`)."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        section = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        listed = next((typing.get_args(a)[0] for a in inner if typing.get_origin(a) is list
                       and dataclasses.is_dataclass(typing.get_args(a)[0])), None)
        if section is not None:
            names.extend(field_names(section, f"{prefix}{f.name}."))
        elif listed is not None:
            names.extend(field_names(listed, f"{prefix}{f.name}.0."))
        else:
            names.append(prefix + f.name)
    return names


def nearest_key(key: str) -> str | None:
    """The config field a mistyped or misplaced dotted `key` most likely meant (`ppo.learning_rat` →
    `ppo.learning_rate`, `learning_rate` → `ppo.learning_rate`), or None when nothing is close."""
    known = field_names()
    normalised = re.sub(r"\.\d+\.", ".0.", key)
    close = difflib.get_close_matches(normalised, known, n=1, cutoff=0.75)
    if not close:  # the right name in the wrong section
        leaf = normalised.rsplit(".", 1)[-1]
        close = [name for name in known if name.rsplit(".", 1)[-1] == leaf][:1] or [
            name for name in known if difflib.get_close_matches(leaf, [name.rsplit(".", 1)[-1]], cutoff=0.85)][:1]
    if not close:
        return None
    digits = re.search(r"\.(\d+)\.", key)
    return close[0].replace(".0.", f".{digits[1]}.") if digits else close[0]


def _convert(tp: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        listed = [a for a in inner if typing.get_origin(a) is list]
        if isinstance(value, list) and listed:  # `X | list[X]`: one item or a list of them
            return _convert(listed[0], value, name)
        return _convert(next((a for a in inner if typing.get_origin(a) is not list), inner[0]), value, name)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise UserError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{name} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        # YAML 1.1 reads `1e-5` as a string; accept any spelling float() accepts.
        try:
            if isinstance(value, bool):
                raise ValueError
            converted = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(converted):
            raise UserError(f"{name} must be a finite number, got {value!r}")
        return converted
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{name} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {name}")


# Fields that change how a run is reported or saved, never what it computes: they may differ on resume.
RESUME_SAFE_FIELDS = {"output_dir", "report_to", "project", "run_name", "run_group", "logging_steps", "save_steps",
                      "save_total_limit", "ppo.on_nonfinite", "ppo.max_nonfinite_skips"}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ and that change the result of a run. A field the saved
    config lacks (added to cppo since it was written) counts as its default: the run ran as the default does."""
    if not prefix:
        saved = _with_defaults(saved)
    names = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if name in RESUME_SAFE_FIELDS or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            names.extend(config_differences(old, new, name + "."))
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(
                isinstance(o, dict) and isinstance(n, dict) for o, n in zip(old, new, strict=True)):
            for i, (o, n) in enumerate(zip(old, new, strict=True)):
                names.extend(config_differences(o, n, f"{name}[{i}]."))
        else:
            names.append(name)
    return names


def _with_defaults(saved: dict) -> dict:
    try:
        return from_dict(Config, saved).to_dict()
    except (UserError, TypeError):  # a field cppo no longer has: compare as written, so that it shows
        return saved


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, loadable by `load_config`."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
