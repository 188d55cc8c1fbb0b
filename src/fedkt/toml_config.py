"""A small TOML engine for typed configs: dataclasses built from TOML tables with errors that name the key.

``from_dict(cls, table)`` checks every key and value against ``cls``'s fields (unknown keys, wrong types,
values outside a ``Literal``) and runs the dataclass's own ``__post_init__`` checks, whose
:class:`FieldError` messages get the table's prefix. ``read_toml`` / ``apply_overrides`` (``--set
a.b=value``) / ``resolve_paths`` (fields with ``metadata=PATH``) / ``load_section`` / ``dump_toml`` do the
rest. Nothing here knows what an experiment is: that schema is ``fedkt.config``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import tomli_w

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key and the allowed values."""


class FieldError(ConfigError):
    """Raised by a config dataclass's own ``__post_init__`` checks with a key relative to its section;
    :func:`from_dict` prefixes the section (``batch_size must be > 0`` -> ``train.batch_size must be > 0``)."""


PATH = {"path": True}
"""Field metadata of a file, directory or model key: a relative value read from a TOML file resolves
against that file's directory (``resolve_paths``); ``--set`` values stay relative to the working directory."""


def check(condition: bool, message: str) -> None:
    """For ``__post_init__`` validation: raise :class:`FieldError` with ``message`` unless ``condition``."""
    if not condition:
        raise FieldError(message)


def check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v > 0, f"{n} must be > 0, got {v}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(get_args(tp)[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        # one plain arm and at most one table arm (``Literal[...] | dict[str, Literal[...]]``): a TOML
        # table takes the table arm, anything else the plain one
        tables = [a for a in get_args(tp) if get_origin(a) is dict]
        plain = [a for a in get_args(tp) if get_origin(a) is not dict]
        if len(plain) != 1 or len(tables) > 1:
            raise TypeError(f"unsupported config type {tp} at {key}")
        if isinstance(value, dict) and tables:
            return _coerce(value, tables[0], key)
        try:
            return _coerce(value, plain[0], key)
        except ConfigError as e:
            if not tables:
                raise
            raise ConfigError(f"{e}; or a table of such values, {key} = {{NAME = VALUE, ...}}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        kt, vt = get_args(tp)
        if kt is not str:
            raise TypeError(f"unsupported config type {tp} at {key}: table keys are strings")
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "",
              sections: Mapping[str, type] | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values. ``sections``
    (name -> dataclass) are further tables ``cls`` accepts, built into its ``sections`` field (a dict;
    absent tables get their defaults)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("toml", True)]
    sections = sections or {}
    unknown = [k for k in data if k not in names and k not in sections]
    if unknown:
        where = f"[{prefix[:-1]}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} in {where}; allowed keys: {', '.join(names + list(sections))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items() if k in names}
    if sections:
        kwargs["sections"] = {}
        for name, section_cls in sections.items():
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table, got {value!r}")
            kwargs["sections"][name] = from_dict(section_cls, value, prefix=name + ".")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{prefix}{e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values parse as TOML, else as a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        node[path[-1]] = value
    return data


def read_toml(path: str | Path | None) -> dict[str, Any]:
    """A TOML file as a dict ({} for no file), with errors that name the file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def _is_local_path(value: str) -> bool:
    """A relative file/dir/model value (not empty, not absolute, not a ``scheme:`` spec such as
    ``builtin:NAME``, ``hf:ORG/NAME`` or ``openai:URL``)."""
    return bool(value) and not Path(value).is_absolute() and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value)


def resolve_paths(cls: type, data: dict[str, Any], base: Path,
                  sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Rewrite, in place, every relative value of a path field (metadata ``PATH``) of ``cls`` (and of its
    nested dataclasses, and of the extra ``sections`` tables) as ``base / value``."""
    if not isinstance(data, dict):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    nested: dict[str, type] = {n: hints[n] for n in fields if dataclasses.is_dataclass(hints[n])}
    nested.update(sections or {})
    for key, value in data.items():
        f = fields.get(key)
        if key in nested:
            resolve_paths(nested[key], value, base)
        elif f is not None and f.metadata.get("path"):
            if isinstance(value, str) and _is_local_path(value):
                data[key] = str((base / value).resolve())
            elif isinstance(value, list):
                data[key] = [str((base / v).resolve()) if isinstance(v, str) and _is_local_path(v) else v
                             for v in value]
    return data


def load_section(cls: type[T], path: str | Path | None, section: str, overrides: list[str] | None = None,
                 values: dict[str, Any] | None = None) -> T:
    """One table of a TOML file (e.g. ``[derive]``) as ``cls``, with ``--set key=value`` overrides
    (keys relative to the table) and explicit ``values`` (e.g. from command-line flags) on top."""
    raw = read_toml(path)
    if path is not None and section not in raw:
        stray = sorted(k for k in raw if not isinstance(raw[k], dict))
        raise ConfigError(f"{path}: no [{section}] table" + (
            f" (found top-level keys {', '.join(stray)}: put them under a [{section}] line)" if stray else ""))
    data = raw.get(section, {})
    if path is not None:
        resolve_paths(cls, data, Path(path).resolve().parent)
    apply_overrides(data, overrides or [])
    data.update({k: v for k, v in (values or {}).items() if v is not None})
    return from_dict(cls, data, prefix=section + ".")


def dump_toml(cfg: Any) -> str:
    """``cfg`` as TOML text (its ``to_dict()`` when it has one)."""
    return tomli_w.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg))
