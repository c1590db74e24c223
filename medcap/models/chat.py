"""Chat formatting rules every LLM stage shares: templates, BOS, stop tokens, label masking, prompt drift.

One place decides how a conversation becomes text (``render_chat``), whether tokenising that text
adds a BOS (``add_special_tokens``: never a second one after a template that wrote it), which tokens
end a turn (``stop_ids``), and what a training sequence learns: labels are ``IGNORE`` on the prompt,
on padding and after the first stop token. ``check_token_prefix`` / ``check_text_prefix`` raise
:class:`PromptDriftError` when the generation prompt is not a prefix of the training sequence, the
check that training and inference format prompts the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE = -100  # label value that cross-entropy skips
# End-of-turn tokens of the supported chat formats; the first one after the prompt ends what is learned.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<end_of_utterance>", "<|eot_id|>", "</s>")


class PromptDriftError(ValueError):
    """The generation prompt is not a prefix of the training sequence: training and inference would differ."""


def render_chat(processor_or_tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    """``apply_chat_template`` without tokenising; processors and tokenizers alike."""
    return processor_or_tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )


def text_only(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content parts joined into one string per message, as text-only chat templates expect."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({"role": m["role"], "content": content})
    return out


def add_special_tokens(texts: Sequence[str] | str, bos: str | None) -> bool:
    """The BOS rule: let the tokenizer add special tokens unless every text already starts with the BOS."""
    texts = [texts] if isinstance(texts, str) else texts
    return not (bos and all(t.startswith(bos) for t in texts))


def eos_ids(model: Any) -> list[int]:
    """The model's own stop tokens (``generation_config.eos_token_id``, one id or a list)."""
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]


def stop_ids(tokenizer: Any, model_eos: Sequence[int] = ()) -> set[int]:
    """The model's stop tokens, the tokenizer's EOS and any known end-of-turn token in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {int(i) for i in model_eos if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def close_turn(prompt: str, full: str, tokenizer: Any, stops: set[int]) -> str:
    """``full`` with an EOS appended when the template closes the assistant turn with nothing (LLaVA-1.5)."""
    completion = full[len(prompt) :]
    if any(tokenizer.convert_ids_to_tokens(i) in completion for i in sorted(stops)):
        return full
    return prompt + completion.rstrip() + tokenizer.eos_token


def check_text_prefix(prompt: str, full: str, what: str) -> None:
    """Raise :class:`PromptDriftError` when the rendered generation prompt does not start the training text."""
    if not full.startswith(prompt):
        raise PromptDriftError(
            f"{what}: the generation prompt is not a prefix of the training text;\n"
            f"prompt ends: {prompt[-80:]!r}\ntraining text there: {full[max(len(prompt) - 80, 0) : len(prompt) + 20]!r}"
        )


def check_token_prefix(prompt_ids: Sequence[int], row: Sequence[int], tokenizer: Any, what: str) -> int:
    """The prompt's token count, after checking that its tokens start the training sequence ``row``."""
    p, r = list(prompt_ids), list(row)
    n = len(p)
    if n >= len(r) or r[:n] != p:
        at = next((j for j in range(min(n, len(r))) if r[j] != p[j]), min(n, len(r)))
        raise PromptDriftError(
            f"{what}: the tokenised generation prompt ({n} tokens) is not a prefix of the training sequence "
            f"({len(r)} tokens); first difference at token {at}: prompt {tokenizer.decode(p[at : at + 5])!r} "
            f"vs training {tokenizer.decode(r[at : at + 5])!r}"
        )
    return n


def mask_labels(labels: Any, attention_mask: Any, prompt_lens: Sequence[int], stops: set[int]) -> Any:
    """Labels learn only the completion: ``IGNORE`` on padding, on each row's prompt and after its first stop."""
    labels[attention_mask == 0] = IGNORE
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = IGNORE
        after = labels[i, n:].tolist()
        end = next((j for j, t in enumerate(after) if t in stops), None)
        if end is not None:
            labels[i, n + end + 1 :] = IGNORE
    return labels
