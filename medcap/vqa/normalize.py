"""Answer normalisation as the medical VQA field scores it, and what a closed question may answer.

``normalize``: lower case, punctuation and the articles a/an/the removed, number words to digits,
whitespace collapsed (the VQA v2 evaluation's rules, which VQA-RAD and SLAKE papers follow).
"""

from __future__ import annotations

import re

NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")
_AUX = re.compile(r"^(is|are|was|were|does|do|did|can|could|has|have|had|will|would|should|may|might)\b", re.I)


def tokens(text: str | None) -> list[str]:
    """The normalised tokens of an answer."""
    if text is None:
        return []
    text = str(text).lower().replace("-", " ")
    text = _PUNCT.sub(" ", text)
    out = []
    for t in text.split():
        if t in ARTICLES:
            continue
        out.append(NUMBERS.get(t, t))
    return out


def normalize(text: str | None) -> str:
    """``"The Left Lung."`` -> ``"left lung"``; ``"Two"`` -> ``"2"``."""
    return " ".join(tokens(text))


def yes_no_question(question: str) -> bool:
    """A question that starts with an auxiliary verb and offers no ``X or Y`` choice: answered yes or no."""
    return bool(_AUX.match(question.strip())) and not options(question)


def options(question: str) -> list[str]:
    """The choices a question names (``Is this a CT or an MRI?`` -> ``["ct", "mri"]``), normalised; else []."""
    q = question.strip().rstrip("?").strip()
    if " or " not in f" {q.lower()} ":
        return []
    head, _, last = q.lower().rpartition(" or ")
    # the choice before "or" starts after the last comma or the verb phrase: keep at most as many words as `last`
    words = head.replace(",", " , ").split()
    n = max(len(last.split()), 1)
    left = []
    for w in reversed(words):
        if w == "," or len(left) >= n + 1 or _AUX.match(w):
            break
        left.insert(0, w)
    first = normalize(" ".join(left[-n:]) if len(left) > n else " ".join(left))
    second = normalize(last)
    return [o for o in (first, second) if o]
