"""Caption text shared by every caption set: raw model output cleaned into one caption, captions on one line."""

from __future__ import annotations

import re

# Role tags and chat markup a model may echo at the start of its output.
_ROLE = re.compile(
    r"^\s*(?:<\|im_start\|>\s*assistant|<start_of_turn>\s*model|<\|start_header_id\|>\s*assistant"
    r"<\|end_header_id\|>|\[/INST\]|(?:assistant|model|ASSISTANT|Assistant)\s*:|"
    r"(?:assistant|model)\s*\n)\s*",
)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|<(?:end_of_turn|start_of_turn|end_of_utterance|eos|bos|/s|s|pad)>")
# Chat preambles before the caption itself ("Sure! Here is a caption for the image:").
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok)\b[!.,]*\s*)?"
    r"(?:(?:here\s+is|here's|below\s+is)\b[^:\n]{0,80}:\s*"
    r"|(?:the\s+)?(?:diagnostic\s+|suggested\s+|image\s+)?caption(?:\s+(?:is|would be|for (?:this|the) image))?\s*[:\-]\s*"
    r"|(?:the\s+)?(?:diagnostic\s+|suggested\s+|image\s+)?caption\s+is\s+"
    r")",
    re.IGNORECASE,
)
_LEADING_SURE = re.compile(r"^\s*(?:sure|certainly|of course)\b[!.,]*\s*(?=\S)", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)]|#+)\s+")
_QUOTES = "\"'`“”‘’"


def _strip_wrappers(text: str) -> str:
    text = text.replace("**", "").replace("__", "")
    text = _BULLET.sub("", text)
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip(_QUOTES).strip()
    return text


def clean_caption(text: str) -> str:
    """One caption from raw model output; ``""`` when nothing is left."""
    if not text or not text.strip():
        return ""
    text = text.replace("\r\n", "\n")
    for _ in range(3):  # an echoed role tag may precede a preamble, or the reverse
        text = _ROLE.sub("", text, count=1)
        text = _SPECIAL.sub("", text)
        text = _LEADING_SURE.sub("", text) if _PREAMBLE.match(text) is None else text
        text = _PREAMBLE.sub("", text, count=1)
    # The first non-empty paragraph or list item is the caption; later ones are alternatives.
    first = ""
    for line in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)", text):
        line = _strip_wrappers(line)
        line = _PREAMBLE.sub("", line, count=1)
        line = _strip_wrappers(line)
        if line and not line.endswith(":"):
            first = line
            break
    first = re.sub(r"\s+", " ", first).strip()
    if not first:
        return ""
    if first[-1] not in ".!?":
        first = first.rstrip(",;:-– ") + "."
    return first


def one_line(caption: str) -> str:
    """A caption on one line with collapsed whitespace."""
    return re.sub(r"\s+", " ", caption).strip()
