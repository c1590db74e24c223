"""The one prompt builder, shared by LoRA training and inference so the two never drift apart.

Messages are OpenAI-style chat messages whose content is a list of parts
(``{"type": "image"}`` / ``{"type": "text", "text": ...}``); each family's chat template turns them
into text (``Family.render``). The query image part is always present. Few-shot prompts show the
captions of the query's nearest training images (never the query's own), optionally with their
images interleaved as examples before the query image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medcap.models.captions import one_line
from medcap.models.families import DEFAULT_PROMPT
from medcap.records import Example, NeighbourList

if TYPE_CHECKING:
    from medcap.engines.base import Request

MODES = ("zero-shot", "sft", "few-shot")

Message = dict[str, Any]


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


IMAGE: dict[str, str] = {"type": "image"}


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


def mllm_request(
    cfg: Any,
    example: Example,
    neighbours: NeighbourList | None,
    *,
    adapter: str | None = None,
    index_examples: Mapping[str, Example] | None = None,
) -> Request:
    """The engine request of a multimodal generator (``MLLMConfig``) for one image: messages and images.

    Training (``sft_data``) and inference (``MLLMGenerator``) both build their prompts here. Few-shot
    prompts with ``shot_images`` show the neighbours' images, read from ``index_examples``.
    """
    from medcap.data import load_image
    from medcap.engines.base import Request
    from medcap.models.families import get_family

    family = get_family(cfg.kind)
    messages, with_images = build_messages(
        cfg.mode,
        neighbours=neighbours,
        k=cfg.k,
        instruction=cfg.prompt or family.default_prompt,
        shot_images=cfg.mode == "few-shot" and cfg.shot_images,
        query_id=example.id,
        max_images=family.max_images,
    )
    index_examples = index_examples or {}
    missing = [nid for nid in with_images if nid not in index_examples]
    if missing:
        raise ValueError(
            f"generator {cfg.name!r}: shot_images needs the index split's examples to load neighbour images; "
            f"missing {missing[:5]} (pass index_examples)"
        )
    images: list[Any] = [load_image(index_examples[nid]) for nid in with_images]
    images.append(load_image(example))
    return Request(
        id=example.id, messages=tuple(messages), images=tuple(images), adapter=adapter, params=cfg.generation
    )
