"""One engine per base model in a run: generators that share a model and engine settings share its engine.

A vLLM engine start costs ~30-60 s on a CPU and a full copy of the weights (plus the KV cache
reservation) on a GPU. Generators of one family and model — zero-shot, few-shot and SFT with
different adapters — differ only in their prompts and in the adapter each request carries, which
one engine already serves (one ``LoRARequest`` per adapter, the base model for ``adapter=None``).
``EnginePool`` builds one engine per ``EngineSpec.key`` on first use, reserves images per prompt
for the most demanding announced user, hands out ``SharedEngine`` handles whose ``close`` only
releases them, and closes an engine once every announced user of it has released its handle (so
generators that run one after another reuse it, and a GPU holds one base model at a time when the
users of each model run together), or at ``close``.

    pool = EnginePool([spec_of(g) for g in generator_configs])   # every user first: the image limit
    engine = pool.engine(spec_of(cfg))                           # instead of make_engine(cfg)
    ...
    pool.close()
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.config import EngineConfig
from medcap.engines.base import Completion, Engine, Request

if TYPE_CHECKING:
    from medcap.config import GeneratorConfig

log = logging.getLogger(__name__)

SHARED_KINDS = ("vllm", "hf")  # in-process engines holding weights; openai/ray are built per user


@dataclass(frozen=True)
class EngineSpec:
    """What an engine serves: kind, family (None: a text-only LM), model, settings, image needs."""

    kind: str
    family: str | None
    model: str
    engine: EngineConfig
    max_pixels: int | None = None
    max_images: int = 1  # images one prompt of this user may hold

    @property
    def key(self) -> str:
        """Equal for specs one engine can serve: everything but the user's image count (and, for vLLM, batch size)."""
        settings = asdict(self.engine)
        if self.kind == "vllm":
            settings.pop("batch_size")  # vLLM schedules its own batches; ours only chunks the writes
        model = str(Path(self.model).resolve()) if Path(self.model).is_dir() else self.model
        return json.dumps([self.kind, self.family, model, self.max_pixels, settings], sort_keys=True, default=str)

    @property
    def shared(self) -> bool:
        return self.kind in SHARED_KINDS and "ray" not in self.engine.extra


def spec_of(cfg: GeneratorConfig) -> EngineSpec:
    """The engine a multimodal generator config needs (its own model, or the family's default)."""
    from medcap.engines import resolve_kind
    from medcap.models.families import get_family

    family = get_family(cfg.kind)
    shots = cfg.mode == "few-shot" and cfg.shot_images
    return EngineSpec(
        kind=resolve_kind(cfg.engine.kind),
        family=family.name,
        model=cfg.model or family.default_model,
        engine=cfg.engine,
        max_pixels=cfg.max_pixels,
        max_images=family.max_images if shots else 1,
    )


def build_engine(spec: EngineSpec) -> Engine:
    """A new engine for ``spec`` (``make_engine``: shared kinds here, and the others for their one user)."""
    from medcap.engines import make_engine

    return make_engine(
        spec.model, spec.engine, family=spec.family, max_pixels=spec.max_pixels, max_images=spec.max_images
    )


class SharedEngine:
    """A user's handle on a pooled engine: ``generate`` goes through, ``close`` releases this handle only."""

    def __init__(self, pool: EnginePool, key: str, engine: Engine) -> None:
        self._pool, self._key, self.engine = pool, key, engine
        self.closed = False

    def generate(self, requests: list[Request]) -> list[Completion]:
        if self.closed:
            raise RuntimeError("this shared engine handle was closed")
        return self.engine.generate(requests)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pool._release(self._key)


class EnginePool:
    """Engines by ``EngineSpec.key``, built on first use and closed with their last handle."""

    def __init__(self, specs: Iterable[EngineSpec] = (), *, build: Callable[[EngineSpec], Engine] = build_engine):
        self._build = build
        self._images: dict[str, int] = {}  # key -> most images any announced user needs
        self._users: dict[str, int] = {}  # key -> users announced
        self._released: dict[str, int] = {}  # key -> handles released
        self._engines: dict[str, Engine] = {}
        self.starts = 0  # engines built so far (for tests and benchmarks)
        for spec in specs:
            self.announce(spec)

    def announce(self, spec: EngineSpec) -> None:
        """Declare a future user, so the engine reserves room for its images (before the engine starts)."""
        key = spec.key
        if key in self._engines and spec.max_images > self._images.get(key, 1):
            raise ValueError(
                f"an engine for {spec.model} already runs with {self._images[key]} image(s) per prompt; "
                f"announce every user (here one needing {spec.max_images}) before the first engine() call"
            )
        self._images[key] = max(self._images.get(key, 1), spec.max_images)
        self._users[key] = self._users.get(key, 0) + 1

    def engine(self, spec: EngineSpec) -> Engine:
        """A handle on the engine for ``spec``: shared when the kind allows, else a new engine of its own."""
        if not spec.shared:
            self.starts += 1
            return self._build(spec)
        key = spec.key
        if key not in self._users:  # a user nobody announced: it counts from now on
            self.announce(spec)
        elif spec.max_images > self._images[key] and key not in self._engines:
            self._images[key] = spec.max_images
        if key not in self._engines:
            full = replace(spec, max_images=self._images[key])
            log.info("starting one %s engine for %s, shared by %d user(s)", spec.kind, spec.model, self._users[key])
            self._engines[key] = self._build(full)
            self._released[key] = 0
            self.starts += 1
        elif spec.max_images > self._images[key]:
            self.announce(spec)  # raises: the running engine reserved fewer images
        return SharedEngine(self, key, self._engines[key])

    def _release(self, key: str) -> None:
        self._released[key] += 1
        if self._released[key] >= self._users[key] and key in self._engines:
            log.info("closing the engine for %s: its %d user(s) are done", key[:80], self._users[key])
            self._engines.pop(key).close()
            self._users[key] = self._released[key] = 0

    def close(self) -> None:
        """Close every engine still open, whatever handles remain."""
        for key in list(self._engines):
            self._engines.pop(key).close()
