"""Versioned prompt templates of the synthesizer: data, not code.

A template is a system message and a user message with three placeholders, filled by
``synthesize.build_synthesis_messages``:

- ``{neighbours}``: the retrieved images' captions, numbered, best first (with their concepts
  in brackets when the template has no ``{concepts}`` placeholder and concepts are shown);
- ``{concepts}``: the neighbours' concepts, most frequent first (``none`` when there are none);
- ``{candidates}``: the candidate captions, one per line, labelled by the generator that wrote it.

Published versions never change once results were reported with them: add ``v3`` rather than
editing ``v1``. ``SynthesizerConfig.template`` is a version key or a custom user text with the
same placeholders (it then gets ``v1``'s system message).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PLACEHOLDERS = ("{neighbours}", "{candidates}", "{concepts}")


@dataclass(frozen=True)
class Template:
    """One prompt template version."""

    version: str
    system: str
    user: str


_SYSTEM_V1 = (
    "You are an expert radiologist who writes diagnostic captions for medical images, "
    "in the style of the ImageCLEFmedical Caption data set."
)

TEMPLATES: dict[str, Template] = {
    "v1": Template(
        "v1",
        _SYSTEM_V1,
        "Captions of the most similar images in the training set, most similar first:\n{neighbours}\n\n"
        "Candidate captions written for this image by different models:\n{candidates}\n\n"
        "Write ONE concise diagnostic caption for this image in the style of the example captions: "
        "keep the findings the candidates and the examples agree on, name the imaging modality and "
        "the anatomy, and do not invent findings. Answer with the caption only, on one line.",
    ),
    "v2": Template(
        "v2",
        "You write concise diagnostic captions for medical images.",
        "Similar images' captions:\n{neighbours}\n\nCandidates:\n{candidates}\n\n"
        "Write one caption for this image in the same style. Reply with the caption only.",
    ),
}


def get_template(spec: str) -> Template:
    """The template a config names: a version key of ``TEMPLATES`` or a custom text with placeholders."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not any(p in spec for p in PLACEHOLDERS):
        raise ValueError(
            f"synthesizer template {spec!r} is neither a version ({sorted(TEMPLATES)}) nor a custom text "
            f"with any of the placeholders {', '.join(PLACEHOLDERS)}"
        )
    digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
    return Template(f"custom-{digest}", _SYSTEM_V1, spec)
