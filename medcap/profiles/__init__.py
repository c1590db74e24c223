"""Run profiles shipped inside the package (``medcap demo`` uses ``demo.yaml``)."""

from pathlib import Path

PROFILES = Path(__file__).parent


def profile_path(name: str) -> Path:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"no packaged profile {name!r}; known: {known}")
    return path
