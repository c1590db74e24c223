"""The LM-Fuser's prompt: the one builder shared by training and inference, and its trained folder's metadata.

``fuser_prompt`` shows every candidate labelled by its caption set; training (``lm_train``) passes an
``rng`` that shuffles their order so the model cannot learn to trust a position, inference sorts
them by name. Both render it with the tokenizer's chat template (``models.chat``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.models.captions import one_line
from medcap.models.hub import ModelNotFoundError
from medcap.records import NeighbourList

if TYPE_CHECKING:
    from medcap.fuser.lm import LMFuserConfig

META = "medcap_fuser.json"  # written beside the fuser's weights: config, steps, best validation loss
SYSTEM = "You merge candidate captions of a medical image into one concise diagnostic caption."
INSTRUCTION = "Write the single best diagnostic caption for this image. Answer with the caption only."


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def fuser_prompt(
    candidates: dict[str, str],
    neighbours: NeighbourList | None,
    cfg: LMFuserConfig,
    *,
    rng: random.Random | None = None,
) -> list[dict[str, Any]]:
    """Chat messages (one text part each) showing every candidate, labelled by its generator.

    Only ``cfg.candidates`` are shown when that list is set. Without ``rng`` the candidates come
    sorted by generator name; with it (training) in a random order.
    """
    wanted = set(cfg.candidates)
    pairs = [
        (n, one_line(c))
        for n, c in candidates.items()
        if (not wanted or n.split(" #")[0] in wanted) and c and c.strip()  # "ranker #2": an input's alternative
    ]
    pairs.sort()
    if rng is not None:
        rng.shuffle(pairs)
    parts = ["Candidate captions:\n" + ("\n".join(f"[{n}] {c}" for n, c in pairs) or "(none)")]
    if cfg.use_neighbours and neighbours is not None:
        caps = [one_line(n.caption) for n in neighbours.neighbours if n.id != neighbours.id and n.caption]
        caps = [c for c in caps if c][: max(cfg.k, 0)]
        if caps:
            parts.append("Captions of similar images:\n" + "\n".join(f"- {c}" for c in caps))
    parts.append(INSTRUCTION)
    return [
        {"role": "system", "content": [_text(SYSTEM)]},
        {"role": "user", "content": [_text("\n\n".join(parts))]},
    ]


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The ``medcap_fuser.json`` of a trained fuser folder; ModelNotFoundError when it is missing."""
    path = Path(model_dir) / META
    if not path.is_file():
        raise ModelNotFoundError(
            f"{model_dir} is not a trained LM-Fuser (no {META}); train one with `medcap train fuser NAME -c CONFIG`"
        )
    return json.loads(path.read_text())
