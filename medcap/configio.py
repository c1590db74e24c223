"""Generic config plumbing: plain data into typed dataclasses, ``a.b=c`` overrides, stable hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type; errors name the key."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    renamed = [f"{old!r} is now {new!r}" for old, new in getattr(cls, "RENAMED", {}).items() if old in data]
    if renamed:
        raise ConfigError(
            f"{path or 'config'}: {'; '.join(renamed)} (a caption set is any generator, synthesizer or fuser)"
        )
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if isinstance(value, (str, int, float, dict)) or value is None:
            if not isinstance(value, str) or args[0] is not str:
                raise ConfigError(f"{path}: expected a list, got {value!r}")
            value = [value]
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to nested config data, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. retrieval.k=3")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _list_index(node: list, part: str, item: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, entry in enumerate(node):  # generators.consensus.k=3 addresses a list entry by name
        if isinstance(entry, dict) and entry.get("name") == part:
            return i
    raise ConfigError(f"override {item!r}: no list entry {part!r}")


def deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain data) and upstream hashes."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
