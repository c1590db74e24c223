"""FAISS indexes over L2-normalised embeddings: inner product = cosine similarity.

Three kinds (``IndexConfig.kind``): ``flat`` (exact), ``ivf`` (inverted lists, ``nprobe`` cells
searched per query) and ``hnsw`` (graph). Indexes are built on the CPU and moved to every GPU
FAISS sees when ``IndexConfig.gpu`` asks for it; files always hold the CPU form.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from medcap.config import IndexConfig
from medcap.files import write_atomic

log = logging.getLogger(__name__)

# FAISS warns when k-means has fewer than 39 training points per centroid.
MIN_POINTS_PER_CELL = 39


def import_faiss() -> Any:
    """Import FAISS, or say which extra installs it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "FAISS is not installed: pip install 'medcap[cpu]' (or 'medcap[gpu]' on CUDA; never both: "
            "they overwrite each other)"
        ) from e
    return faiss


def default_nlist(n: int, nlist: int | None = None) -> int:
    """IVF cell count: ``nlist`` or 4*sqrt(n), never more than k-means can train on ``n`` points."""
    want = nlist if nlist is not None else int(4 * math.sqrt(n))
    cap = max(1, n // MIN_POINTS_PER_CELL) if nlist is None else max(1, n)
    if want > cap:
        log.info("IVF: %d cells for %d vectors is too many; using %d", want, n, cap)
    return max(1, min(want, cap))


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> Any:
    """Build an inner-product index of kind ``cfg.kind`` over ``vectors`` (rows L2-normalised)."""
    faiss = import_faiss()
    x = _as_float32(vectors)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"build_index: expected a non-empty 2-D array of vectors, got shape {x.shape}")
    n, d = x.shape
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == "ivf":
        nlist = default_nlist(n, cfg.nlist)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        raise ValueError(f"retrieval.index.kind: {cfg.kind!r} is not one of flat, ivf, hnsw")
    index.add(x)
    set_search_params(index, cfg)
    return to_device(index, cfg)


def set_search_params(index: Any, cfg: IndexConfig) -> None:
    """Apply the search-time knobs (``nprobe``, ``ef_search``) of ``cfg`` to a CPU index."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(cfg.nprobe, ivf.nlist))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search


def wants_gpu(cfg: IndexConfig) -> bool:
    """Whether ``cfg.gpu`` puts the index on GPUs here; ``always`` without a GPU is an error."""
    faiss = import_faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if cfg.gpu == "always" and gpus == 0:
        raise RuntimeError(
            "retrieval.index.gpu=always, but FAISS sees no GPU (is faiss-gpu installed: pip install 'medcap[gpu]'?)"
        )
    return cfg.gpu == "always" or (cfg.gpu == "auto" and gpus > 0)


def to_device(index: Any, cfg: IndexConfig) -> Any:
    """Move a CPU index to all GPUs when ``cfg`` asks for it (HNSW has no GPU form and stays)."""
    faiss = import_faiss()
    if not wants_gpu(cfg):
        return index
    if isinstance(index, faiss.IndexHNSW):
        log.info("FAISS has no GPU HNSW index; searching on the CPU")
        return index
    return faiss.index_cpu_to_all_gpus(index)


def to_cpu(index: Any) -> Any:
    """The CPU form of ``index`` (itself when it is on the CPU already)."""
    faiss = import_faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and not _is_cpu_index(faiss, index):
        return faiss.index_gpu_to_cpu(index)
    return index


def _is_cpu_index(faiss: Any, index: Any) -> bool:
    gpu_types = tuple(getattr(faiss, n) for n in ("GpuIndex", "IndexReplicas", "IndexShards") if hasattr(faiss, n))
    return not isinstance(index, gpu_types) if gpu_types else True


def save_index(index: Any, path: Path) -> None:
    """Write ``index`` (its CPU form) to ``path`` atomically."""
    faiss = import_faiss()
    data = faiss.serialize_index(to_cpu(index))
    write_atomic(path, np.asarray(data, dtype=np.uint8).tobytes())


def load_index(path: Path, cfg: IndexConfig) -> Any:
    """Read an index written by :func:`save_index`, apply ``cfg``'s search knobs, move it per ``cfg.gpu``."""
    faiss = import_faiss()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
    set_search_params(index, cfg)
    return to_device(index, cfg)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, positions) for each query row, best first; position -1 where none was found."""
    q = _as_float32(queries)
    if q.ndim == 1:
        q = q[None, :]
    k = min(int(k), int(index.ntotal))
    if k <= 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    scores, positions = index.search(q, k)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(positions, dtype=np.int64)


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
