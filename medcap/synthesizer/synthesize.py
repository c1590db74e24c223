"""The synthesizer stage: neighbours' captions + candidates -> prompt -> any engine -> one clean caption.

``build_synthesis_messages`` is the one prompt builder (templates in ``templates.py``); it sees the
query's ID only to drop a neighbour that is the query itself, and never its reference caption.
``Synthesizer`` sends the prompts ``cfg.engine.batch_size`` at a time to the engine
``cfg.engine.kind`` names (hf, vllm or openai) and cleans each output into one caption.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from medcap.config import SynthesizerConfig
from medcap.engines.base import Engine, Request
from medcap.models.captions import clean_caption, one_line
from medcap.records import Candidate, Example, NeighbourList

log = logging.getLogger(__name__)

Item = tuple[Example, NeighbourList | None, dict[str, str]]


def _neighbours(neighbours: NeighbourList | None, k: int, query_id: str) -> list[tuple[str, tuple[str, ...]]]:
    """(caption, concepts) of the first ``k`` captioned neighbours that are not the query itself."""
    if neighbours is None:
        return []
    own = {query_id, neighbours.id}
    kept = [(one_line(n.caption), n.concepts) for n in neighbours.neighbours if n.id not in own and n.caption]
    kept = [(c, cs) for c, cs in kept if c]
    return kept[: max(k, 0)]


def _candidates(cfg: SynthesizerConfig, candidates: dict[str, str]) -> list[tuple[str, str]]:
    """(generator, caption) pairs: the configured generators in their order (all when none), non-empty only."""
    names = cfg.candidates or list(candidates)
    return [(n, one_line(candidates[n])) for n in names if n in candidates and candidates[n].strip()]


def build_synthesis_messages(
    cfg: SynthesizerConfig, neighbours: NeighbourList | None, candidates: dict[str, str], *, query_id: str
) -> list[dict[str, Any]]:
    """OpenAI-style chat messages (content parts) asking for one caption; an image part first when multimodal."""
    from medcap.synthesizer.templates import get_template

    template = get_template(cfg.template)
    shown = _neighbours(neighbours, cfg.k, query_id)
    inline_concepts = cfg.use_concepts and "{concepts}" not in template.user
    lines = []
    for i, (caption, concepts) in enumerate(shown, 1):
        tail = f" [concepts: {'; '.join(concepts)}]" if inline_concepts and concepts else ""
        lines.append(f"{i}. {caption}{tail}")
    counts = Counter(c for _, cs in shown for c in cs) if cfg.use_concepts else Counter()
    fills = {
        "{neighbours}": "\n".join(lines) or "(none)",
        "{concepts}": "; ".join(c for c, _ in counts.most_common()) or "none",
        "{candidates}": "\n".join(f"- {name}: {cap}" for name, cap in _candidates(cfg, candidates)) or "(none)",
    }
    text = template.user
    for key, value in fills.items():  # str.replace: custom texts may hold other braces
        text = text.replace(key, value)
    content: list[dict[str, str]] = [{"type": "image"}] if cfg.multimodal else []
    content.append({"type": "text", "text": text})
    return [
        {"role": "system", "content": [{"type": "text", "text": template.system}]},
        {"role": "user", "content": content},
    ]


def make_engine(cfg: SynthesizerConfig) -> Engine:
    """The engine ``cfg.engine`` names, serving ``cfg.model`` (a VLM family's model when multimodal)."""
    from medcap.engines import make_engine as make

    if cfg.multimodal and not cfg.family:
        raise ValueError(f"synthesizer {cfg.name!r}: multimodal needs `family` (llava, qwen2_5_vl, medgemma, smolvlm)")
    family = cfg.family if cfg.multimodal else None
    return make(cfg.model, cfg.engine, family=family, owner=f"synthesizers.{cfg.name}")


def strip_echo(text: str, prompt_lines: set[str]) -> str:
    """Drop output lines that repeat a line of the prompt verbatim (models echo the examples)."""
    kept = [line for line in text.splitlines() if line.strip() not in prompt_lines]
    return "\n".join(kept)


def strip_label(text: str, names: list[str]) -> str:
    """Drop a leading candidate label (``- llava: ...``) a model copied from the prompt."""
    import re

    if not names:
        return text
    pattern = r"^\s*(?:[-*•]\s*)?(?:" + "|".join(re.escape(n) for n in names) + r")\s*:\s*"
    return re.sub(pattern, "", text, count=1)


class Synthesizer:
    """One caption per image from an instruction LLM behind any engine (built lazily from the config)."""

    def __init__(self, cfg: SynthesizerConfig, engine: Engine | None = None) -> None:
        from medcap.synthesizer.templates import get_template

        self.cfg = cfg
        self.version = get_template(cfg.template).version  # fail on a bad template before loading a model
        self.engine = engine if engine is not None else make_engine(cfg)

    def request(self, example: Example, neighbours: NeighbourList | None, candidates: dict[str, str]) -> Request:
        """The engine request for one image."""
        from medcap.data import load_image

        messages = build_synthesis_messages(self.cfg, neighbours, candidates, query_id=example.id)
        images = (load_image(example),) if self.cfg.multimodal else ()
        return Request(id=example.id, messages=tuple(messages), images=images, params=self.cfg.generation)

    def __call__(self, items: list[Item]) -> list[Candidate]:
        """One candidate per item, in order."""
        out: list[Candidate] = []
        size = max(self.cfg.engine.batch_size, 1)
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            requests = [self.request(ex, nl, cands) for ex, nl, cands in chunk]
            cands_of = {ex.id: cands for ex, _, cands in chunk}
            for req, comp in zip(requests, self.engine.generate(requests), strict=True):
                echoed = {
                    line.strip()
                    for m in req.messages
                    for part in m["content"]
                    if part.get("type") == "text"
                    for line in part["text"].splitlines()
                    if line.strip()
                }
                # An answer that is nothing but a prompt line (a copied candidate) is still an answer.
                raw = strip_label(comp.text, list(cands_of[req.id]))
                caption = clean_caption(strip_echo(raw, echoed)) or clean_caption(raw)
                if not caption:
                    log.warning("%s: %s wrote no usable caption (raw %r)", self.cfg.name, req.id, comp.text[:200])
                extra = {"template": self.version, "model": self.cfg.model, "raw": comp.text}
                out.append(Candidate(req.id, caption, self.cfg.name, extra))
            log.debug("%s: %d/%d images synthesised", self.cfg.name, len(out), len(items))
        return out

    def close(self) -> None:
        """Free the engine."""
        if self.engine is not None:
            self.engine.close()
