"""Registries: plain mappings from a name in a config to an implementation, imported when first used.

An entry is the implementation itself or ``"module:attr"`` naming it, so a registry lists every
kind without importing its heavy dependencies (torch, transformers) until a run asks for it.
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry(dict):
    """``{name: implementation or "module:attr"}`` whose ``get(name)`` imports lazily and names the known ones."""

    def __init__(self, what: str, entries: dict[str, Any]):
        super().__init__(entries)
        self.what = what

    def get(self, name: str) -> Any:  # type: ignore[override]
        try:
            impl = self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; known: {sorted(self)}") from None
        if isinstance(impl, str):
            module, _, attr = impl.partition(":")
            impl = self[name] = getattr(importlib.import_module(module), attr)
        return impl


def optional_import(*modules: str, hint: str) -> Any:
    """Import an optional dependency (the first of ``modules``, after the rest load too), or an ImportError
    that says how to install it."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise ImportError(f"{hint} ({e})") from e
    return loaded[0]
