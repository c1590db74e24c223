"""The typed config of the VQA task: ``task: vqa`` in a run config picks :class:`VQARunConfig`.

A VQA run has the caption run's sections (data, retrieval, seed, ...) and one more, ``vqa``: its
answerers (kinds in ``AnswererConfig.KINDS``, each kind's settings beside it here), its answer fusers,
and which answer set is submitted. Every field enters the key of the stage it shapes
(tests/test_vqa_keys.py holds it to that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from medcap.config import (
    ConfigError,
    EngineConfig,
    GenerationConfig,
    GeneratorConfig,
    RunConfig,
)
from medcap.configio import KindChoice
from medcap.registry import Registry

MLLM_KINDS = ("llava", "qwen2_5_vl", "medgemma", "smolvlm")


@dataclass
class AnswererConfig(KindChoice):
    """One answer writer. ``kind`` picks the implementation (``vqa.answerers.KINDS``) and its settings."""

    KINDS: ClassVar[Registry] = Registry(
        "answerer kind",
        {
            "prior": "medcap.vqa.config:PriorConfig",
            "vote": "medcap.vqa.config:VoteConfig",
            "classifier": "medcap.vqa.config:ClassifierConfig",
            **dict.fromkeys(MLLM_KINDS, "medcap.vqa.config:MLLMAnswererConfig"),
        },
    )

    name: str = "vote"  # the folder under answers/
    kind: str = "vote"  # prior | vote | classifier | llava | qwen2_5_vl | medgemma | smolvlm


@dataclass
class PriorConfig(AnswererConfig):
    """The majority answer of the same normalised question in the index split (else of its answer type)."""

    kind: str = "prior"


@dataclass
class VoteConfig(AnswererConfig):
    """A vote over the answers of the nearest index (image, question) pairs: cosine of the image embeddings
    weighted ``image_weight``, of the question embeddings ``question_weight``, searched jointly with FAISS."""

    kind: str = "vote"
    k: int = 20  # neighbour pairs that vote
    image_weight: float = 1.0
    question_weight: float = 2.0
    same_question: float = 1.0  # bonus to a neighbour whose normalised question is the query's
    tau: float = 0.05  # softmax temperature of the votes over the similarity


@dataclass
class ClassifierConfig(AnswererConfig):
    """An MLP over [image, question, image*question-projection, question-type] embeddings that picks one of the
    index split's answers (seen at least ``min_count`` times); closed questions pick yes/no or a named option."""

    kind: str = "classifier"
    hidden: int = 128
    dropout: float = 0.3
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-3
    batch_size: int = 128
    min_count: int = 1  # answers seen fewer times are not classes
    ensemble: int = 1  # models with different seeds, probabilities averaged


@dataclass
class MLLMAnswererConfig(AnswererConfig):
    """A multimodal LLM answering in VQA mode (every family), through the generators' engines and chat templates:
    zero-shot, few-shot with the nearest (image, question) pairs' answers, or ``sft``: served with the LoRA adapter
    ``adapter`` names (trained outside this run; medcap does not yet LoRA-tune in VQA mode)."""

    kind: str = "llava"
    model: str | None = None  # hub id or local path (default: the family's)
    mode: str = "zero-shot"  # zero-shot | few-shot | sft
    k: int = 3  # few-shot: nearest index QA pairs shown
    adapter: str | None = None  # LoRA adapter folder; sft default: the run's trained adapter
    prompt: str = "Answer the question about this medical image in a few words. Question: {question}"
    max_pixels: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=16))

    def check(self, where: str) -> None:
        if self.mode == "sft" and not self.adapter:
            raise ConfigError(f"{where}.adapter: mode sft needs a LoRA adapter folder (trained outside this run)")
        if self.mode not in ("zero-shot", "few-shot", "sft"):
            raise ConfigError(f"{where}.mode: {self.mode!r} is not one of ['few-shot', 'sft', 'zero-shot']")
        if "{question}" not in self.prompt:
            raise ConfigError(f"{where}.prompt: must contain {{question}}")


@dataclass
class AnswerFuserConfig:
    """Combines answerers: a weighted vote over their answer distributions (``fuse.py``). ``vote``: the weights
    given (by answerer; missing: 1); ``mbr``: the same weights, the answer of highest expected token F1; ``learned``: weights for closed and open questions chosen from ``grid`` on
    the index split's questions, each answered without its own image."""

    name: str = "fused"
    kind: str = "vote"  # vote | mbr (expected token F1 over the weighted answers) | learned
    candidates: list[str] = field(default_factory=list)  # answerers it reads; empty: all
    weights: dict[str, float] = field(default_factory=dict)  # vote
    closed_weights: dict[str, float] = field(default_factory=dict)  # vote: for closed questions (default: weights)
    grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])  # learned: each weight's choices


@dataclass
class VQAConfig:
    answerers: list[AnswererConfig] = field(
        default_factory=lambda: [PriorConfig("prior"), VoteConfig("vote"), ClassifierConfig("classifier")]
    )
    fusers: list[AnswerFuserConfig] = field(default_factory=lambda: [AnswerFuserConfig()])
    question_encoder: str = "minilm"  # minilm (offline) | a local sentence-transformers folder
    answer_set: str | None = None  # the answer set submitted; default: the last one (fusers come last)
    use_answer_type: bool = True  # read the data's answer_type (CLOSED/OPEN) for each query; False: guess it
    bootstrap: int = 1000  # image resamples for the 95 % intervals (0: none)


@dataclass
class VQARunConfig(RunConfig):
    """A run of the VQA task (``task: vqa``): the caption run's sections and ``vqa``."""

    DATA_FORMATS: ClassVar[tuple[str, ...]] = ("vqa-rad", "slake", "manifest")

    task: str = "vqa"
    generators: list[GeneratorConfig] = field(default_factory=list)
    vqa: VQAConfig = field(default_factory=VQAConfig)

    def check(self) -> None:
        names = [a.name for a in self.vqa.answerers] + [f.name for f in self.vqa.fusers]
        if len(set(names)) != len(names):
            raise ConfigError(f"vqa.answerers and vqa.fusers: names must be unique, got {names}")
        answerers = {a.name for a in self.vqa.answerers}
        for f in self.vqa.fusers:
            if f.kind not in ("vote", "mbr", "learned"):
                raise ConfigError(f"vqa.fusers.{f.name}.kind: {f.kind!r} is not one of ['learned', 'mbr', 'vote']")
            unknown = [c for c in [*f.candidates, *f.weights, *f.closed_weights] if c not in answerers]
            if unknown:
                raise ConfigError(f"vqa.fusers.{f.name}: {unknown} name no answerer of this config")
        if self.vqa.answer_set is not None and self.vqa.answer_set not in names:
            raise ConfigError(f"vqa.answer_set: {self.vqa.answer_set!r} is not an answerer or fuser; have {names}")
        for a in self.vqa.answerers:
            check = getattr(a, "check", None)
            if check is not None:
                check(f"vqa.answerers.{a.name}")
