"""Typed configs: dataclasses <-> YAML, with dotted ``key=value`` overrides.

A config is a (nested) dataclass.  :func:`load_config` reads YAML, applies command-line overrides such
as ``train.lr=3e-4`` and builds the dataclass, checking every key and value: an unknown key fails with
the valid keys and the closest match, a value of the wrong type fails naming the key and the expected
type.  :func:`save_config` writes the resolved config (every default filled in) next to a run.

A section whose dataclass depends on one of its own keys (``model.family: bert`` -> BERT's config) is either a
union of dataclasses told apart by their ``family`` Literals, or ``Annotated[Any, choice]`` with a
:class:`SectionChoice` that a higher layer provides (the model-family registry: core knows no model classes).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_text

T = TypeVar("T")


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


class SectionChoice:
    """Field metadata, ``Annotated[Any, choice]``: the section's dataclass is picked, when a config is read, by the
    value of its key ``key`` (``default`` when absent) through :meth:`resolve`.  Subclasses implement the three
    methods; :meth:`names` and :meth:`classes` word the errors."""

    key: str = "family"
    default: Any = None

    def resolve(self, tag: Any) -> type | None:
        """The dataclass for ``tag``, None when unknown."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """The known values of ``key``."""
        raise NotImplementedError

    def classes(self) -> list[type]:
        """The dataclasses the section may be."""
        raise NotImplementedError


class _UnionChoice(SectionChoice):
    """A union of config dataclasses as a choice, by their ``family`` Literals; no family key: the first class."""

    def __init__(self, classes: list[type]) -> None:
        self._classes = classes

    def resolve(self, tag: Any) -> type | None:
        if tag is None:
            return self._classes[0]
        return next((cls for cls in self._classes if tag in _family_values(cls)), None)

    def names(self) -> list[str]:
        return [str(f) for cls in self._classes for f in _family_values(cls)]

    def classes(self) -> list[type]:
        return list(self._classes)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (converting where unambiguous) or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *meta = get_args(tp)
        choice = next((m for m in meta if isinstance(m, SectionChoice)), None)
        return _coerce(value, inner, where) if choice is None else _coerce_choice(value, choice, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if len(classes) > 1 and isinstance(value, dict):
            return _coerce_choice(value, _UnionChoice(classes), where)
        errors = []
        # Try the most specific types first so that "3" stays a str for `int | str` only if it is not an int.
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{where}': {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        # YAML reads `true`/`false` as bools; allow Literal['true', ...] to match them as strings.
        if isinstance(value, bool) and str(value).lower() in allowed:
            return str(value).lower()
        if value in allowed:
            return value
        raise ConfigError(
            f"config key '{where}': {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
            f"{_closest(str(value), [str(a) for a in allowed])}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}': expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}': {value!r} is not a bool (use true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{where}': {value!r} is not an int")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{where}': {value!r} is not a number")
        # No knob means anything at nan or inf, and torch takes some of them silently (a nan grad_clip or
        # weight_decay trains to a nan model): refused here, for every float key of every config, by name.
        if not math.isfinite(number):
            raise ConfigError(f"config key '{where}': {number} is not allowed; give a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{where}': {value!r} is not a string")
    return value


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """A config value outside its range is one line naming the key: ``require(n >= 1, "data.seq_len", n, ">= 1")``.
    Config dataclasses call it from ``__post_init__``, so the value fails when the config is read, before a run
    dir is touched."""
    if not ok:
        raise ConfigError(f"config key '{key}': {value!r} must be {rule}")


def _family_values(cls: type) -> tuple[Any, ...]:
    hint = get_type_hints(cls).get("family")
    return get_args(hint) if get_origin(hint) is Literal else ()


def _coerce_choice(value: Any, choice: SectionChoice, where: str) -> Any:
    """A section whose dataclass ``choice`` picks by one of its keys (e.g. model.family: gpt2 | bert | t5)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # built by code, not read from YAML
        cls = choice.resolve(getattr(value, choice.key, None))
        if cls is not None and isinstance(value, cls):
            return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{where}': {value!r} is not a valid "
                          f"{' | '.join(cls.__name__ for cls in choice.classes())}")
    tag = value.get(choice.key)
    cls = choice.resolve(choice.default if tag is None else tag)
    if cls is None:
        known = [str(n) for n in choice.names()]
        raise ConfigError(f"config key '{where}.{choice.key}': {tag!r} is not one of {', '.join(known)}"
                          f"{_closest(str(tag), known)}")
    return from_dict(cls, value, prefix=where + ".")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    hints = get_type_hints(cls, include_extras=True)  # extras: a SectionChoice in Annotated[...]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            valid = sorted(fields)
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{_closest(key, valid)}; valid keys under "
                f"'{prefix.rstrip('.') or '<top level>'}': {', '.join(valid)}"
            )
        f = fields[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and f.default_factory is not dataclasses.MISSING:
            # A partial section starts from the parent's default for it (e.g. fine-tuning's own train defaults),
            # not from the section class's bare defaults.
            value = deep_merge(to_dict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ validation or a missing required field
        raise ConfigError(f"config '{prefix.rstrip('.') or cls.__name__}': {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain (YAML-safe) nested dict of a dataclass config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "model.n_layer=4"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (pass a YAML file, e.g. configs/tiny-gpt2.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); pass a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}{line}' is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Defaults of ``cls`` <- ``base`` <- YAML file <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def split_config_arg(config_path: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``lmforge CMD max_steps=10``: a first positional with ``=`` that is not a file is an override."""
    if config_path is not None and "=" in config_path and not os.path.exists(config_path):
        return None, [config_path, *overrides]
    return config_path, list(overrides)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, dump_yaml(cfg))


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys = sorted(set(old) | set(new))
    changed = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff_configs(a, b, prefix + k + ".")
        elif a != b:
            changed.append(prefix + k)
    return changed
