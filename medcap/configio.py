"""Generic config plumbing: plain data into typed dataclasses, ``a.b=c`` overrides, stable hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


class KindChoice:
    """A config section whose ``kind`` picks its dataclass: lerobot's choice registry, for medcap's kinds.

    The base section (``GeneratorConfig``, ``FuserConfig``) holds what every kind has (``name``, ``kind``)
    and a ``KINDS`` registry from each kind to its settings dataclass, a subclass that sits beside the
    kind's code. Reading YAML (:func:`from_dict`) and calling the base (``FuserConfig(kind="pool-mbr",
    tau=0.1)``) both build the kind's class, so a section has exactly the fields its kind reads:
    another kind's key is an error that names it, and ``medcap config show`` prints only what the kind has.
    """

    KINDS: ClassVar[Any]  # on the base: a Registry of kind -> settings class (or "module:Class")
    LEGACY_FIELDS: ClassVar[frozenset[str]] = frozenset()  # every field of the one-bag section of medcap <= 0.1

    def __new__(cls, *args: Any, **kwargs: Any):
        if "KINDS" in cls.__dict__:  # the base: its kind (the second field) chooses the class
            kind = kwargs["kind"] if "kind" in kwargs else args[1] if len(args) > 1 else cls.default_kind()
            cls = cls.kind_class(kind)
        return super().__new__(cls)

    def __getnewargs_ex__(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"kind": getattr(self, "kind", None)}  # copy and pickle rebuild the same class

    @classmethod
    def choice_base(cls) -> type:
        return next(c for c in cls.__mro__ if "KINDS" in c.__dict__)

    @classmethod
    def default_kind(cls) -> str:
        return next(f.default for f in dataclasses.fields(cls) if f.name == "kind")

    @classmethod
    def kind_class(cls, kind: str) -> type:
        """The settings dataclass of ``kind`` (ValueError naming the known kinds)."""
        base = cls.choice_base()
        sub = base.KINDS.get(kind)
        if not (isinstance(sub, type) and issubclass(sub, base)):
            raise TypeError(f"{base.KINDS.what} {kind!r}: its settings {sub!r} are not a {base.__name__}")
        return sub

    @classmethod
    def kind_classes(cls) -> dict[str, type]:
        base = cls.choice_base()
        return {kind: base.kind_class(kind) for kind in base.KINDS}


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    if isinstance(cls, type) and issubclass(cls, KindChoice):
        cls, data = _choose(cls, data, path)
    hints = typing.get_type_hints(cls)
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


def chosen(lookup: Any, name: Any, where: str, what: str) -> Any:
    """``lookup(name)`` of a registry (a kind's or a task's class), its errors as ``ConfigError`` at ``where``."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a {what} name, got {name!r}")
    try:
        return lookup(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _choose(cls: type, data: dict[str, Any], path: str) -> tuple[type, dict[str, Any]]:
    """The settings class that ``data``'s kind picks, and ``data`` without the stale keys of an old dump.

    Another kind's key is an error naming the kinds it belongs to. A resolved config of medcap <= 0.1
    (an entry with every field of the old one-bag section) still loads: its other kinds' keys that
    hold their defaults are dropped.
    """
    where = path or "config"
    kind = data.get("kind", cls.default_kind())
    sub = chosen(cls.kind_class, kind, f"{where}.kind", "kind")
    own = {f.name for f in dataclasses.fields(sub)}
    foreign = [k for k in data if k not in own]
    if not foreign:
        return sub, data
    others = cls.kind_classes()
    legacy = bool(cls.LEGACY_FIELDS) and set(data) >= cls.LEGACY_FIELDS
    problems = []
    for key in foreign:
        owners = [k for k, c in others.items() if key in {f.name for f in dataclasses.fields(c)}]
        if legacy and owners and any(_is_default(others[k], key, data[key]) for k in owners):
            continue
        if owners:
            problems.append(f"{key!r} is a setting of kind {' | '.join(owners)}, not of {kind!r}")
        else:
            problems.append(f"unknown key {key!r}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}; kind {kind!r} has: {sorted(own)}")
    return sub, {k: v for k, v in data.items() if k in own}


def _is_default(cls: type, key: str, value: Any) -> bool:
    return value == to_dict(cls())[key]


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
