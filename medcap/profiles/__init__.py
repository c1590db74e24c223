"""Run profiles shipped inside the package: ``medcap config ls`` lists them, ``medcap run NAME`` runs one."""

from __future__ import annotations

from pathlib import Path

PROFILES = Path(__file__).parent


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no packaged profile {name!r}; known: {profile_names()}")
    return path


def profile_summary(name: str) -> str:
    """The first comment line of a profile: what it is for."""
    for line in profile_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file path, or the packaged profile of that name (``medcap run medpix-cpu``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and "/" not in str(name_or_path) and (PROFILES / f"{path}.yaml").is_file():
        return PROFILES / f"{path}.yaml"
    raise FileNotFoundError(f"{name_or_path}: no such config file or packaged profile; profiles: {profile_names()}")
