"""Typed run configuration: dataclasses loaded from YAML, ``--set a.b=c`` overrides, stage hashes.

The dataclasses are the single source of truth: YAML keys that no field names are an error,
and every knob is documented once, here, and in ``configs/*.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


@dataclass
class DataConfig:
    """Where the images and captions are, and which splits play which role."""

    root: str = "data/phantom"  # data set folder (imageclef), manifest file (manifest), or imagefolder/hub id (hf)
    format: str = "imageclef"  # imageclef | manifest | hf
    index_split: str = "train"  # the split the retrieval index is built from
    query_splits: list[str] = field(default_factory=lambda: ["valid"])  # splits that get neighbours and captions
    group_column: str | None = "case_id"  # metadata column naming the case; same-case neighbours are excluded
    image_dirs: list[str] = field(default_factory=lambda: ["{split}", "images", "{split}_images"])  # under root
    on_error: str = "raise"  # raise: stop at bad rows | skip: drop them and write them to RUN/rejects/
    verify_images: bool = True  # decode every image when a split is loaded (~1 s per 2,000 images)


@dataclass
class EncoderConfig:
    """The image encoder used for retrieval (an open_clip model)."""

    name: str = "biomedclip"  # biomedclip | open_clip model name | hf-hub:ID | local-dir:PATH | medcap-* offline model
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint file (for plain model names)
    revision: str | None = None  # hub revision; biomedclip has a pinned default
    batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (fp32 on CPU, fp16 on GPU) | fp32 | fp16 | bf16
    num_workers: int = 0  # image decoding workers


@dataclass
class IndexConfig:
    """The FAISS index over the index split's embeddings."""

    kind: str = "flat"  # flat (exact inner product) | ivf | hnsw
    nlist: int | None = None  # IVF cells; default 4*sqrt(n)
    nprobe: int = 64  # IVF cells visited per query (recall vs speed: bench/retrieval.py)
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 200
    ef_search: int = 128
    gpu: str = "auto"  # auto (use a GPU when faiss sees one) | never | always


@dataclass
class RetrievalConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    k: int = 5  # neighbours per image
    exclude_same_group: bool = True  # never return a neighbour from the query's own case


@dataclass
class GeneratorConfig:
    """One candidate writer. ``kind`` picks the implementation from the generators registry."""

    name: str = "nearest"  # the folder under candidates/
    kind: str = "nearest"  # nearest | consensus
    similarity: str = "rouge1"  # consensus: rouge1 | bertscore | embedding
    k: int | None = None  # consensus: neighbours to consider (default: all retrieved)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["bertscore", "rouge1"])
    bertscore_model: str = "microsoft/deberta-xlarge-mnli"  # hub id, local path, or "minilm" (offline)
    bertscore_num_layers: int | None = None  # required for local paths (bert-score cannot guess)
    bertscore_idf: bool = False  # 2025 used idf weights from the references
    batch_size: int = 32
    device: str = "auto"


@dataclass
class SubmitConfig:
    year: int = 2024  # submission rules of this ImageCLEF year (2023..2026)
    variant: str | None = None  # candidate set to submit; default: the last generator


@dataclass
class RunConfig:
    name: str = "default"  # run folder name under runs_dir
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generators: list[GeneratorConfig] = field(
        default_factory=lambda: [GeneratorConfig("nearest", "nearest"), GeneratorConfig("consensus", "consensus")]
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# --------------------------------------------------------------------------- loading


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type; errors name the key."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if isinstance(value, (str, int, float, dict)) or value is None:
            if not isinstance(value, str) or args[0] is not str:
                raise ConfigError(f"{path}: expected a list, got {value!r}")
            value = [value]
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to nested config data, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. retrieval.k=3")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _list_index(node: list, part: str, item: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, entry in enumerate(node):  # generators.consensus.k=3 addresses a list entry by name
        if isinstance(entry, dict) and entry.get("name") == part:
            return i
    raise ConfigError(f"override {item!r}: no list entry {part!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if overrides:
        data = apply_overrides(_materialise(data), list(overrides))
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from e
    _check(cfg)
    return cfg


def _materialise(data: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged under ``data`` so overrides can address list entries that only exist by default."""
    merged = to_dict(RunConfig())
    _deep_update(merged, data)
    return merged


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _check(cfg: RunConfig) -> None:
    choices = {
        "data.format": (cfg.data.format, {"imageclef", "manifest", "hf"}),
        "data.on_error": (cfg.data.on_error, {"raise", "skip"}),
        "retrieval.index.kind": (cfg.retrieval.index.kind, {"flat", "ivf", "hnsw"}),
        "retrieval.index.gpu": (cfg.retrieval.index.gpu, {"auto", "never", "always"}),
        "retrieval.encoder.precision": (cfg.retrieval.encoder.precision, {"auto", "fp32", "fp16", "bf16"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {sorted(allowed)}")
    if cfg.retrieval.k < 1:
        raise ConfigError(f"retrieval.k: must be at least 1, got {cfg.retrieval.k}")
    names = [g.name for g in cfg.generators]
    if len(set(names)) != len(names):
        raise ConfigError(f"generators: names must be unique, got {names}")


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain data) and upstream hashes."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
