"""What of the config enters a cache key: every field but the settings that cannot change an artifact.

Each stage hashes ``key_settings`` of the config sections it reads (``pipeline.Pipeline.key``).
"""

from __future__ import annotations

from typing import Any

from medcap.config import EncoderConfig, EngineConfig, EvalConfig, IndexConfig, RetrievalConfig, RunConfig, TrainConfig

# Settings that cannot change any artifact: left out of every cache key, so changing them reruns
# nothing (a kind's settings class may add its own: ``NO_EFFECT`` beside its fields, see ``no_effect``). Batch sizes, devices and workers change speed, not results; where a server is and how
# long to wait for it change nothing it answers; run names and the ablation and encoder-training
# sections are read by no stage. tests/test_keys.py holds every other leaf field of the config to
# changing the key of the stage it configures: a new field must be in one or the other.
NO_EFFECT: dict[type, frozenset[str]] = {
    RunConfig: frozenset({"name", "runs_dir", "ablation"}),
    EncoderConfig: frozenset({"batch_size", "device", "num_workers"}),
    IndexConfig: frozenset({"gpu"}),
    RetrievalConfig: frozenset({"encoder_training"}),
    EngineConfig: frozenset(
        {
            "batch_size",
            "device",
            "base_url",
            "api_key",
            "concurrency",
            "timeout",
            "max_retries",
            "gpu_memory_utilization",
        }
    ),
    # a training's global batch is batch_size x grad_accum whatever the number of processes
    TrainConfig: frozenset({"save_every", "eval_samples", "processes", "keep_checkpoints"}),
    EvalConfig: frozenset({"batch_size", "device"}),
}


def no_effect(cls: type) -> frozenset[str]:
    """The fields of config class ``cls`` left out of keys: ``NO_EFFECT`` of it and its bases, and the ``NO_EFFECT``
    a kind's settings class declares beside its code."""
    out: set[str] = set()
    for c in cls.__mro__:
        out |= NO_EFFECT.get(c, frozenset()) | c.__dict__.get("NO_EFFECT", frozenset())
    return frozenset(out)


def key_settings(section: Any) -> Any:
    """A config section as plain data for a cache key: every field but those without effect, recursively."""
    import dataclasses

    if dataclasses.is_dataclass(section):
        skip = no_effect(type(section))
        return {
            f.name: key_settings(getattr(section, f.name)) for f in dataclasses.fields(section) if f.name not in skip
        }
    if isinstance(section, (list, tuple)):
        return [key_settings(v) for v in section]
    if isinstance(section, dict):
        return {k: key_settings(v) for k, v in section.items()}
    return section
