"""The engine contract: chat requests with images and an optional LoRA adapter in, completions out.

Generators and the synthesizer build ``Request``s and never know which engine serves them. A
request's ``messages`` are OpenAI-style chat messages whose ``content`` is a list of parts
(``{"type": "text", "text": ...}`` or ``{"type": "image"}``); the ``images`` fill the image
parts in order. Each engine applies its model's chat template itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medcap.config import GenerationConfig


@dataclass(frozen=True)
class Request:
    id: str  # the image ID (or any key) the completion answers
    messages: tuple[dict[str, Any], ...]
    images: tuple[Any, ...] = ()  # PIL images or paths, one per {"type": "image"} part, in order
    adapter: str | None = None  # path of a PEFT LoRA adapter to apply, or None for the base model
    params: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass(frozen=True)
class Completion:
    id: str
    text: str  # raw model output (cleaning is the caller's job)
    n_tokens: int = 0  # generated tokens, for throughput figures


class Engine(Protocol):
    """Anything that turns requests into completions, in the same order."""

    def generate(self, requests: list[Request]) -> list[Completion]: ...

    def close(self) -> None: ...


def image_paths(images: tuple[Any, ...]) -> list[Path]:
    return [Path(i) for i in images if isinstance(i, (str, Path))]


def sampling(p: GenerationConfig) -> dict[str, Any]:
    """The decoding settings in the names vLLM (in-process and served) takes: greedy is temperature 0,
    the seed makes sampling reproducible."""
    return {
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature if p.do_sample else 0.0,
        "top_p": p.top_p if p.do_sample else 1.0,
        "repetition_penalty": p.repetition_penalty,
        "seed": p.seed,
    }
