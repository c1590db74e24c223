"""The hypothesis pool of an index: every caption and sentence, embedded once per run for the pool fusers.

``pool-mbr`` and the learned ranker choose among the same hypotheses: every distinct (preprocessed)
caption of the index split, each of their sentences (and the first two sentences of longer
captions), with the cases that wrote each. What scoring them needs is query-independent, so the
``pool`` stage computes it once, in one pass over the index (linear in its size), and every image of
every split reads it:

- ``hypotheses.json``: raw text, preprocessed text, writing cases, caption or sentence, per row;
- ``tokens.npy`` (float16, memory-mapped) + ``offsets.npy`` + ``weights.npy``: the BERTScore model's
  unit token embeddings of each row (bert-score's tokens and layer; weights 1, 0 on [CLS]/[SEP]);
- ``vectors.npy`` (float16): unit MiniLM sentence embeddings of each row: the shortlist's search
  space (reference aggregation) and the image-text term. When the sentence model is the BERTScore
  model (MiniLM: mean pooling of its last layer), both come from one pass (``embed_texts``);
- ``images.json``: the row of each index image's caption.

It is built in shards of ``SHARD`` rows (a crash loses at most one), then joined; the artifact is
keyed by the index split's data, the utility model and the sentence model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcap.eval.imageclef import preprocess
from medcap.files import write_atomic, write_json
from medcap.runs import Manifest

log = logging.getLogger(__name__)

SHARD = 4096  # hypotheses embedded and written per shard (the resumable unit)
MIN_SENTENCE_WORDS = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def ntokens(text: str) -> int:
    """ROUGE's token count of preprocessed text (at least 1)."""
    from rouge_score import tokenize

    return max(len(tokenize.tokenize(text, None)), 1)


def sentence_hypotheses(caption: str) -> list[str]:
    """Each sentence of ``caption`` and, for three or more, the first two together (raw text)."""
    parts = [s.strip() for s in _SENTENCE_END.split(caption.strip()) if s.strip()]
    if len(parts) < 2:
        return []
    return parts + ([" ".join(parts[:2])] if len(parts) >= 3 else [])


def index_hypotheses(captions: Sequence[tuple[str, Any]]) -> tuple[list[str], list[str], list[set], int]:
    """Every distinct index caption, then every new sentence hypothesis, deduplicated on preprocessed text;
    with the set of cases (groups) whose captions gave each, and how many rows are captions."""
    raw, text, groups, row = [], [], [], {}

    def add(r: str, group: Any) -> None:
        p = preprocess(r)
        if p not in row:
            row[p] = len(text)
            raw.append(r)
            text.append(p)
            groups.append(set())
        groups[row[p]].add(group)

    for caption, group in captions:
        add(caption, group)
    n_captions = len(text)
    for caption, group in captions:
        for s in sentence_hypotheses(caption):
            if len(preprocess(s).split()) >= MIN_SENTENCE_WORDS:
                add(s, group)
    return raw, text, groups, n_captions


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def mean_of(scorer: Any, text_model: Any) -> bool:
    """Whether ``text_model``'s vectors are the unit mean of ``scorer``'s token states (same weights, all of its
    layers, mean pooling, normalised): then one pass of the model gives a text's tokens and its vector."""
    try:
        transformer, pooling, normalize = list(text_model)
        model = transformer.auto_model
        same = Path(model.config._name_or_path).resolve() == Path(scorer.model_type).resolve()
        mean = pooling.get_config_dict().get("pooling_mode") == "mean" and type(normalize).__name__ == "Normalize"
        return bool(same and mean and scorer.num_layers == model.config.num_hidden_layers)
    except (TypeError, ValueError, AttributeError):  # not a (Transformer, Pooling, Normalize) SentenceTransformer
        return False


def embed_texts(scorer: Any, text_model: Any, texts: Sequence[str]) -> tuple[list, np.ndarray]:
    """BERTScore token embeddings and weights of ``texts``, and their unit sentence vectors: from one pass of the
    model when :func:`mean_of` holds (a text past the sentence model's length limit is encoded by it: its
    truncation differs), else from the two models."""
    if not mean_of(scorer, text_model):
        vectors = text_model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return scorer.token_embeddings(texts), np.asarray(vectors, dtype=np.float32)
    pairs, vectors = scorer.token_and_mean_embeddings(texts)
    long = [k for k, (_, w) in enumerate(pairs) if len(w) > text_model.max_seq_length]
    if long:
        vectors[long] = text_model.encode([texts[k] for k in long], normalize_embeddings=True, convert_to_numpy=True)
    return pairs, vectors


def build_pool(out: Path, key: str, examples: Sequence[tuple[str, str, Any]], scorer: Any, text_model: Any) -> None:
    """Write the pool of index ``examples`` (ID, caption, case) into folder ``out``, resumably, manifest last."""
    from medcap.logs import progress

    captions = [(c, g) for _, c, g in examples]
    raw, text, groups, n_captions = index_hypotheses(captions)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(text), SHARD))
    todo = [s for s in starts if not (shards / f"{s:09d}.done").exists()]
    log.info("pool: %d hypotheses (%d captions), %d shard(s) to embed", len(text), n_captions, len(todo))
    for start in progress(todo, desc="pool", unit="shard"):
        chunk = text[start : start + SHARD]
        pairs, vectors = embed_texts(scorer, text_model, chunk)
        stem = shards / f"{start:09d}"
        write_atomic(stem.with_suffix(".tokens.npy"), _npy(np.concatenate([e for e, _ in pairs]).astype(np.float16)))
        write_atomic(stem.with_suffix(".weights.npy"), _npy(np.concatenate([w for _, w in pairs]).astype(np.uint8)))
        write_atomic(stem.with_suffix(".lengths.npy"), _npy(np.array([len(w) for _, w in pairs], dtype=np.int64)))
        write_atomic(stem.with_suffix(".vectors.npy"), _npy(np.asarray(vectors, dtype=np.float16)))
        write_atomic(stem.with_suffix(".done"), "")
    _join(out, shards, starts)
    write_json(
        out / "hypotheses.json",
        {
            "raw": raw,
            "text": text,
            "groups": [sorted(map(str, g)) for g in groups],
            "captions": n_captions,
            "log_len": [float(np.log(ntokens(t))) for t in text],
        },
    )
    row = {t: i for i, t in enumerate(text)}
    write_json(out / "images.json", {i: row[preprocess(c)] for i, c, _ in examples})
    shutil.rmtree(shards)
    Manifest("pool", key, complete=True, count=len(text), info={"captions": n_captions}).write(out)


def _join(out: Path, shards: Path, starts: list[int]) -> None:
    """The shards' arrays as one file each (tokens streamed: never all in memory)."""
    lengths = np.concatenate([np.load(shards / f"{s:09d}.lengths.npy") for s in starts] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    write_atomic(out / "offsets.npy", _npy(offsets))
    for name, dtype in (("weights", np.uint8), ("vectors", np.float16)):
        parts = [np.load(shards / f"{s:09d}.{name}.npy") for s in starts]
        write_atomic(out / f"{name}.npy", _npy(np.concatenate(parts) if parts else np.zeros(0, dtype)))
    first = np.load(shards / f"{starts[0]:09d}.tokens.npy", mmap_mode="r") if starts else np.zeros((0, 1), np.float16)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (int(offsets[-1]), first.shape[1])}  # fmt: skip
    tmp = out / "tokens.npy.tmp"
    with open(tmp, "wb") as f:  # appended a shard at a time: a memory map of the whole file counted as resident
        np.lib.format.write_array_header_1_0(f, header)
        for s in starts:
            f.write(np.ascontiguousarray(np.load(shards / f"{s:09d}.tokens.npy"), dtype=np.float16).tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    tmp.replace(out / "tokens.npy")


@dataclass
class HypothesisPool:
    """A built pool, memory-mapped: rows are hypotheses (the first ``captions`` are the index's captions)."""

    folder: Path
    raw: list[str]
    text: list[str]
    groups: list[frozenset[str]]
    captions: int
    log_len: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray  # (tokens, d) float16, memory-mapped
    weights: np.ndarray  # (tokens,) uint8
    vectors: np.ndarray  # (rows, d_text) float16
    image_row: dict[str, int]

    @classmethod
    def load(cls, folder: Path) -> HypothesisPool:
        folder = Path(folder)
        meta = json.loads((folder / "hypotheses.json").read_text())
        return cls(
            folder,
            meta["raw"],
            meta["text"],
            [frozenset(g) for g in meta["groups"]],
            int(meta["captions"]),
            np.asarray(meta["log_len"], dtype=np.float64),
            np.load(folder / "offsets.npy"),
            np.load(folder / "tokens.npy", mmap_mode="r"),
            np.load(folder / "weights.npy", mmap_mode="r"),
            np.load(folder / "vectors.npy", mmap_mode="r"),
            {k: int(v) for k, v in json.loads((folder / "images.json").read_text()).items()},
        )

    def __len__(self) -> int:
        return len(self.text)

    @property
    def row_of(self) -> dict[str, int]:
        """Preprocessed text -> row (built on first use)."""
        if not hasattr(self, "_row_of"):
            self._row_of = {t: i for i, t in enumerate(self.text)}
        return self._row_of

    def lengths(self, rows: Sequence[int]) -> np.ndarray:
        """Tokens of each row ([CLS] and [SEP] included)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.offsets[rows + 1] - self.offsets[rows]

    def only_group(self) -> list[str | None]:
        """Each row's single writing case, or None when several cases wrote it."""
        return [next(iter(g)) if len(g) == 1 else None for g in self.groups]

    def padded(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Token embeddings (n, L, d) float32 and weights (n, L) of ``rows``, zero-padded to the longest."""
        rows = np.asarray(rows, dtype=np.int64)
        start, lens = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        width = int(lens.max()) if len(rows) else 1
        pos = np.arange(width)[None, :]
        real = pos < lens[:, None]
        idx = np.where(real, start[:, None] + pos, 0)
        emb = np.asarray(self.tokens[idx.ravel()], dtype=np.float32).reshape(len(rows), width, -1)
        emb[~real] = 0.0
        w = np.where(real, np.asarray(self.weights[idx.ravel()]).reshape(len(rows), width), 0).astype(np.float32)
        return emb, w


def pad_tokens(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, weights) of texts outside a pool, zero-padded like :meth:`HypothesisPool.padded`."""
    width = max((len(w) for _, w in pairs), default=1)
    dim = pairs[0][0].shape[1] if pairs else 1
    emb = np.zeros((len(pairs), width, dim), dtype=np.float32)
    w = np.zeros((len(pairs), width), dtype=np.float32)
    for k, (e, ww) in enumerate(pairs):
        emb[k, : len(ww)], w[k, : len(ww)] = e, ww
    return emb, w
