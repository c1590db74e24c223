"""FAISS indexes against numpy brute force, on seeded synthetic vectors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from medcap.config import IndexConfig
from medcap.retrieval.index import build_index, default_nlist, import_faiss, load_index, save_index, search

faiss = pytest.importorskip("faiss")


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """5,000 database and 200 query vectors of dimension 32 with structure (intrinsic dimension ~10)."""
    from faiss.contrib.datasets import SyntheticDataset

    ds = SyntheticDataset(32, 0, 5000, 200, metric="IP", seed=7)
    return _normalise(ds.get_database()), _normalise(ds.get_queries())


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_flat_equals_brute_force(data):
    xb, xq = data
    scores, positions = search(build_index(xb, IndexConfig(kind="flat", gpu="never")), xq, 10)
    true_scores, true_positions = brute_force(xb, xq, 10)
    np.testing.assert_array_equal(positions, true_positions)
    np.testing.assert_allclose(scores, true_scores, rtol=0, atol=1e-5)
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    assert scores.flags.c_contiguous and positions.flags.c_contiguous


@pytest.mark.parametrize(("kind", "floor"), [("ivf", 0.9), ("hnsw", 0.95)])
def test_approximate_recall(data, kind, floor):
    xb, xq = data
    _, positions = search(build_index(xb, IndexConfig(kind=kind, gpu="never")), xq, 10)
    _, truth = brute_force(xb, xq, 10)
    assert recall_at(positions, truth) >= floor


def test_ivf_uses_default_nlist_and_nprobe(data):
    xb, _ = data
    index = build_index(xb, IndexConfig(kind="ivf", nprobe=4, gpu="never"))
    assert index.nlist == default_nlist(len(xb)) == 5000 // 39  # 4*sqrt(5000)=282 clipped for training
    assert index.nprobe == 4


def test_default_nlist():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(100) == 2  # 100 // 39
    assert default_nlist(10) == 1
    assert default_nlist(50, nlist=8) == 8
    assert default_nlist(5, nlist=8) == 5  # never more cells than points


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_roundtrip(data, tmp_path, kind):
    xb, xq = data
    cfg = IndexConfig(kind=kind, gpu="never")
    index = build_index(xb, cfg)
    path = tmp_path / "index" / f"{kind}.faiss"
    save_index(index, path)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    loaded = load_index(path, cfg)
    assert loaded.ntotal == len(xb)
    a, b = search(index, xq, 10), search(loaded, xq, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_load_applies_search_knobs(data, tmp_path):
    xb, _ = data
    save_index(build_index(xb, IndexConfig(kind="hnsw", ef_search=16, gpu="never")), tmp_path / "h.faiss")
    assert load_index(tmp_path / "h.faiss", IndexConfig(kind="hnsw", ef_search=99, gpu="never")).hnsw.efSearch == 99
    save_index(build_index(xb, IndexConfig(kind="ivf", nprobe=2, gpu="never")), tmp_path / "i.faiss")
    assert load_index(tmp_path / "i.faiss", IndexConfig(kind="ivf", nprobe=8, gpu="never")).nprobe == 8


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.faiss"):
        load_index(tmp_path / "no-such.faiss", IndexConfig())


def test_search_k_beyond_index_and_empty():
    xb = _normalise(np.random.default_rng(0).standard_normal((3, 8)))
    index = build_index(xb, IndexConfig(gpu="never"))
    scores, positions = search(index, xb, 10)
    assert positions.shape == (3, 3) and sorted(positions[0]) == [0, 1, 2]
    assert search(index, xb, 0)[1].shape == (3, 0)
    assert search(index, xb[0], 1)[1].shape == (1, 1)  # one query as a vector


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty 2-D"):
        build_index(np.zeros((0, 8), np.float32), IndexConfig())
    with pytest.raises(ValueError, match="kind"):
        build_index(np.ones((4, 8), np.float32), IndexConfig(kind="lsh"))


def test_import_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"medcap\[cpu\].*medcap\[gpu\].*never both"):
        import_faiss()


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the behaviour without a GPU")
def test_gpu_always_without_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        build_index(np.ones((4, 8), np.float32), IndexConfig(gpu="always"))


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU visible to FAISS")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_index_matches_cpu(data, tmp_path, kind):
    xb, xq = data
    cpu = build_index(xb, IndexConfig(kind=kind, gpu="never"))
    gpu = build_index(xb, IndexConfig(kind=kind, gpu="always"))
    _, truth = search(cpu, xq, 10)
    _, found = search(gpu, xq, 10)
    assert recall_at(found, truth) >= 0.99
    save_index(gpu, tmp_path / "g.faiss")  # copied back to the CPU before writing
    _, reloaded = search(load_index(tmp_path / "g.faiss", IndexConfig(kind=kind, gpu="never")), xq, 10)
    assert recall_at(reloaded, truth) >= 0.99
