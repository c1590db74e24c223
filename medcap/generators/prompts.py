"""The one prompt builder, shared by LoRA training and inference so the two never drift apart.

Messages are OpenAI-style chat messages whose content is a list of parts
(``{"type": "image"}`` / ``{"type": "text", "text": ...}``); each family's chat template turns them
into text (``Family.render``). The query image part is always present. Few-shot prompts show the
captions of the query's nearest training images (never the query's own), optionally with their
images interleaved as examples before the query image.
"""

from __future__ import annotations

import re
from typing import Any

from medcap.models.families import DEFAULT_PROMPT
from medcap.records import NeighbourList

MODES = ("zero-shot", "sft", "few-shot")

Message = dict[str, Any]


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


IMAGE: dict[str, str] = {"type": "image"}


def one_line(caption: str) -> str:
    """A caption on one line with collapsed whitespace."""
    return re.sub(r"\s+", " ", caption).strip()


def shots(neighbours: NeighbourList | None, k: int | None, query_id: str | None) -> list[tuple[str, str]]:
    """The first ``k`` (all when None) neighbours with a caption, never the query itself: (id, caption)."""
    if neighbours is None:
        return []
    own = query_id if query_id is not None else neighbours.id
    out = [
        (n.id, one_line(n.caption)) for n in neighbours.neighbours if n.id != own and n.caption and n.caption.strip()
    ]
    return out if k is None else out[: max(k, 0)]


def build_messages(
    mode: str,
    *,
    neighbours: NeighbourList | None = None,
    k: int | None = None,
    instruction: str | None = None,
    shot_images: bool = False,
    query_id: str | None = None,
    max_images: int | None = None,
) -> tuple[list[Message], list[str]]:
    """Chat messages for one query image, and the neighbour IDs whose images the prompt includes.

    The images fill the image parts in order: the listed neighbours' images first, the query's last.
    ``max_images`` (the family's limit) caps how many images a few-shot prompt holds, the query's
    included; examples beyond it are shown as text only.
    """
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; use one of {MODES}")
    instruction = instruction or DEFAULT_PROMPT
    if mode in ("zero-shot", "sft"):
        return [{"role": "user", "content": [IMAGE, _text(instruction)]}], []
    examples = shots(neighbours, k, query_id)
    if not shot_images:
        listed = "\n".join(f"{i}. {cap}" for i, (_, cap) in enumerate(examples, 1))
        intro = f"Captions of the most similar images:\n{listed}\n\n" if examples else ""
        return [{"role": "user", "content": [IMAGE, _text(intro + instruction)]}], []
    budget = len(examples) if max_images is None else max(max_images - 1, 0)
    content: list[dict[str, str]] = [_text("Similar images with their captions:")] if examples else []
    with_images: list[str] = []
    for i, (nid, cap) in enumerate(examples, 1):
        if len(with_images) < budget:
            content += [_text(f"Example {i}:"), IMAGE, _text(f"Caption: {cap}")]
            with_images.append(nid)
        else:
            content.append(_text(f"Example {i} caption: {cap}"))
    if examples:
        content.append(_text("Query image:"))
    content += [IMAGE, _text(instruction)]
    return [{"role": "user", "content": content}], with_images


def training_messages(messages: list[Message], caption: str) -> list[Message]:
    """``messages`` plus the assistant turn holding the reference caption."""
    return [*messages, {"role": "assistant", "content": [_text(one_line(caption))]}]
