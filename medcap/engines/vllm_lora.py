"""What vLLM does with a LoRA adapter, per architecture: which adapted modules it serves, ignores or refuses.

vLLM (0.32) maps an adapter's modules onto its own model. For a vision-language model it applies
LoRA to the language model; the vision tower and the projector ("connector") get LoRA only with
``enable_tower_connector_lora=True`` (experimental, and only for the architectures that declare
it), and otherwise are **ignored with a log line** ("no matching PunicaWrapper ... will be
ignored"): the served model silently differs from the trained one. An adapter that holds
``lm_head``/``embed_tokens`` weights, or a module of a kind vLLM cannot wrap, is refused when it
loads. ``VLLM_LORA`` records this per transformers class (checked against vLLM's own model classes
by ``tests/test_vllm_lora.py`` where vLLM is installed) so that ``medcap train generator`` can say,
before training, what vLLM would do with the adapter it is about to write.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

LINEAR_LM = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
REFUSED = ("lm_head", "embed_tokens", "modules_to_save")


@dataclass(frozen=True)
class VllmLora:
    """How vLLM serves LoRA for one architecture (submodule names as transformers saves them)."""

    vllm_class: str  # vLLM's model class (module path under vllm.model_executor.models)
    language_model: str  # transformers submodule of the language model, e.g. "model.language_model"
    tower: tuple[str, ...]  # vision tower submodules
    connector: tuple[str, ...]  # projector submodules between tower and language model
    tower_connector_lora: bool  # vLLM serves tower/connector LoRA with enable_tower_connector_lora=True
    lm_modules: frozenset[str] = field(default=LINEAR_LM)  # module names vLLM wraps with LoRA in the LM


VLLM_LORA: dict[str, VllmLora] = {
    "LlavaForConditionalGeneration": VllmLora(
        "llava.LlavaForConditionalGeneration",
        "model.language_model",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
        tower_connector_lora=True,
    ),  # fmt: skip
    "Qwen2_5_VLForConditionalGeneration": VllmLora(
        "qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
        "model.language_model",
        ("model.visual",),
        ("model.visual.merger",),
        tower_connector_lora=True,
    ),  # fmt: skip
    "Gemma3ForConditionalGeneration": VllmLora(
        "gemma3_mm.Gemma3ForConditionalGeneration",
        "model.language_model",
        ("model.vision_tower",),
        ("model.multi_modal_projector",),
        tower_connector_lora=True,
    ),  # fmt: skip
    "Idefics3ForConditionalGeneration": VllmLora(
        "idefics3.Idefics3ForConditionalGeneration",
        "model.text_model",
        ("model.vision_model",),
        ("model.connector",),
        tower_connector_lora=True,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class AdapterVerdict:
    """Adapted module names (as in the transformers model) sorted by what vLLM does with them."""

    served: tuple[str, ...]
    ignored: tuple[str, ...]  # vLLM loads the adapter but does not apply these (tower/connector without the flag)
    refused: tuple[str, ...]  # vLLM refuses to load an adapter holding these

    @property
    def exact(self) -> bool:
        """True when vLLM serves every adapted module: its outputs follow the trained model."""
        return not self.ignored and not self.refused

    def describe(self, limit: int = 6) -> str:
        def names(xs: tuple[str, ...]) -> str:
            return ", ".join(xs[:limit]) + (f" (+{len(xs) - limit} more)" if len(xs) > limit else "")

        parts = [f"serves {len(self.served)} module(s)"]
        if self.ignored:
            parts.append(f"IGNORES {len(self.ignored)} (vision tower / projector): {names(self.ignored)}")
        if self.refused:
            parts.append(f"REFUSES the adapter for {len(self.refused)}: {names(self.refused)}")
        return "; ".join(parts)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def strip_peft(name: str) -> str:
    """A PEFT module name without its wrapper prefix (``base_model.model.``)."""
    return re.sub(r"^(base_model\.model\.)+", "", name)


def classify(model_class: str, modules: Iterable[str], *, tower_connector_lora: bool = False) -> AdapterVerdict:
    """Sort adapted module names by what vLLM does with them for ``model_class``.

    ``tower_connector_lora``: the engine runs with ``enable_tower_connector_lora=True``. An
    architecture missing from ``VLLM_LORA`` raises ``KeyError``: its behaviour is unknown.
    """
    spec = VLLM_LORA[model_class]
    served, ignored, refused = [], [], []
    for raw in modules:
        name = strip_peft(raw)
        leaf = name.rsplit(".", 1)[-1]
        if any(r in name.split(".") for r in REFUSED):
            refused.append(name)
        elif _under(name, spec.tower + spec.connector):
            (served if tower_connector_lora and spec.tower_connector_lora else ignored).append(name)
        elif _under(name, (spec.language_model,)):
            (served if leaf in spec.lm_modules else refused).append(name)
        else:
            refused.append(name)
    return AdapterVerdict(tuple(sorted(served)), tuple(sorted(ignored)), tuple(sorted(refused)))
