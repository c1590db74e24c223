"""Model folders vLLM 0.32 can load: the vision tower's weight names as transformers 4 wrote them.

transformers 5 holds a CLIP or SigLIP vision tower without its ``vision_model`` level and saves
LLaVA and Gemma 3 checkpoints as ``vision_tower.embeddings...``; the hub's checkpoints (written by
transformers 4) and vLLM's loaders use ``vision_tower.vision_model.embeddings...``, and vLLM stops
with "There is no module or parameter named 'vision_tower.embeddings'". ``legacy_vision_keys``
renames those tensors in place; transformers 5 reads both spellings, so the folder stays loadable
everywhere (``tests/test_vllm_adapters.py`` checks the outputs are unchanged). Folders medcap
writes for serving (``merge_adapter``) go through it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

TOWERS = ("vision_tower.", "model.vision_tower.")  # LLaVA and Gemma 3, saved with and without the legacy prefix


def legacy_name(key: str) -> str:
    """``vision_tower.X`` -> ``vision_tower.vision_model.X`` (unchanged when already so, or not a tower weight)."""
    for tower in TOWERS:
        if key.startswith(tower) and not key[len(tower) :].startswith("vision_model."):
            return f"{tower}vision_model.{key[len(tower) :]}"
    return key


def legacy_vision_keys(folder: str | Path) -> int:
    """Rename the vision-tower tensors of every ``*.safetensors`` file in ``folder``; returns how many."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            if all(legacy_name(k) == k for k in keys):
                continue
            tensors = {legacy_name(k): f.get_tensor(k) for k in keys}
            meta = f.metadata()
        renamed += sum(legacy_name(k) != k for k in keys)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    index = Path(folder) / "model.safetensors.index.json"
    if renamed and index.is_file():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {legacy_name(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2))
    if renamed:
        log.info("%s: %d vision-tower tensors renamed for vLLM", folder, renamed)
    return renamed
