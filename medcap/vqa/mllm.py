"""Multimodal LLMs as answerers (LLaVA-1.5, Qwen2.5-VL, MedGemma, SmolVLM), through the generators' engines.

A request is the image and the question in the family's chat template (``Family.render`` inside every
engine), the same shape the caption generators send: one user turn with the image part first. Few-shot
prompts list the nearest index (image, question) pairs' questions and answers before the question.
Answers are cut to their first line and stripped of a trailing full stop; ``scores`` give the answer
weight 1. ``mode: sft`` serves a LoRA adapter named by ``adapter`` (trained elsewhere, e.g. on a GPU).
"""

from __future__ import annotations

import logging
from typing import Any

from medcap.keys import key_settings
from medcap.models.hub import model_identity
from medcap.vqa.answerers import AnswererKind, index_of, nearest_pairs, rows_from
from medcap.vqa.features import load_split
from medcap.vqa.normalize import normalize

log = logging.getLogger(__name__)


def vqa_messages(prompt: str, question: str, shots: list[tuple[str, str]] = ()) -> tuple[dict[str, Any], ...]:
    """Chat messages of one question (OpenAI-style content parts; the image part first)."""
    text = prompt.format(question=question)
    if shots:
        listed = "\n".join(f"Q: {q}\nA: {a}" for q, a in shots)
        text = f"Questions about similar images, with their answers:\n{listed}\n\n{text}"
    return ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},)


def clean_answer(text: str) -> str:
    """The first line of a model's output, without a leading ``Answer:`` or a trailing full stop."""
    line = (text or "").strip().split("\n")[0].strip()
    if line.lower().startswith("answer:"):
        line = line[7:].strip()
    return line.rstrip(".").strip()


def _short(answer: str, q: Any) -> str:
    """A closed question's ``yes, there is ...`` is ``yes``."""
    first = answer.split()[:1]
    return first[0] if q.answer_type == "CLOSED" and first and first[0] in ("yes", "no") else answer


class MLLM(AnswererKind):
    """Every VLM family in VQA mode: zero-shot, few-shot (nearest QA pairs in the prompt), or a LoRA adapter."""

    def settings(self, pipe, cfg):
        from medcap.engines import resolved

        return key_settings(cfg), model_identity(cfg.model), model_identity(cfg.adapter), resolved(cfg.engine)

    def answer(self, pipe, cfg, split, model_dir):
        from medcap.engines import make_engine

        if cfg.mode == "sft" and not cfg.adapter:
            raise ValueError(f"vqa.answerers.{cfg.name}: mode sft needs adapter (a LoRA adapter folder)")
        index, query = index_of(pipe), load_split(pipe, split)
        shots: list[list[tuple[str, str]]] = [[] for _ in query.questions]
        if cfg.mode == "few-shot":
            for r, picked in enumerate(nearest_pairs(index, query, cfg.k, 1.0, 2.0)):
                shots[r] = [(index.questions[i].question, index.questions[i].answer or "") for i, _ in picked]
        adapter = cfg.adapter if cfg.mode == "sft" else None
        engine = make_engine(  # one model at a time: closed when this answerer is done (vLLM takes the GPU)
            cfg.model, cfg.engine, family=cfg.kind, max_pixels=cfg.max_pixels, owner=f"vqa.answerers.{cfg.name}"
        )
        try:
            texts = _generate(engine, cfg, query, shots, adapter)
        finally:
            engine.close()
        dists = [{_short(normalize(texts[q.qid]), q): 1.0} for q in query.questions]
        return rows_from(query, cfg, dists, pipe.cfg.vqa.use_answer_type)


def _generate(engine: Any, cfg: Any, query: Any, shots: list, adapter: str | None) -> dict[str, str]:
    from medcap.data import load_image
    from medcap.engines.base import Request
    from medcap.records import Example

    texts: dict[str, str] = {}
    size = max(cfg.engine.batch_size, 1)
    for start in range(0, len(query.questions), size):
        chunk = list(enumerate(query.questions))[start : start + size]
        requests = [
            Request(
                id=q.qid,
                messages=vqa_messages(cfg.prompt, q.question, shots[r]),
                images=(load_image(Example(q.image_id, q.image)),),
                adapter=adapter,
                params=cfg.generation,
            )
            for r, q in chunk
        ]
        for req, comp in zip(requests, engine.generate(requests), strict=True):
            texts[req.id] = clean_answer(comp.text)
        log.debug("%s: %d/%d questions answered", cfg.name, len(texts), len(query.questions))
    return texts


MLLM_KIND = MLLM()
