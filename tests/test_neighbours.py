"""Neighbour search never returns the query itself or its own case, and fills k when it can."""

from __future__ import annotations

import numpy as np
import pytest

from medcap.config import IndexConfig
from medcap.records import Example, NeighbourList
from medcap.retrieval import neighbours as nb
from medcap.retrieval.index import build_index
from medcap.retrieval.neighbours import find_neighbours, neighbour_records

pytest.importorskip("faiss")


def unit(rows: list[list[float]] | np.ndarray) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def flat(x: np.ndarray):
    return build_index(x, IndexConfig(kind="flat", gpu="never"))


def expected(xb, ids, groups, q, qid, qgroup, k):
    """Brute force: all allowed index items, best first."""
    scores = xb @ q
    allowed = [
        i for i in np.argsort(-scores, kind="stable") if ids[i] != qid and (qgroup is None or groups[i] != qgroup)
    ]
    return [ids[i] for i in allowed[:k]]


@pytest.fixture
def clustered():
    """Group A: 30 images around one direction; the rest scattered. The query sits in A's direction."""
    rng = np.random.default_rng(1)
    a = unit(np.array([1.0] + [0.0] * 15) + 0.05 * rng.standard_normal((30, 16)))
    rest = unit(rng.standard_normal((70, 16)))
    xb = np.vstack([a, rest])
    ids = [f"img{i}" for i in range(100)]
    groups = ["A"] * 30 + [f"case{i // 2}" for i in range(70)]
    return xb, ids, groups


def test_self_is_never_returned():
    xb = unit(np.random.default_rng(0).standard_normal((20, 8)))
    ids = [f"t{i}" for i in range(20)]
    hits = find_neighbours(flat(xb), ids, ids, xb, 3)  # every query's nearest is itself
    for qid, row in zip(ids, hits, strict=True):
        assert len(row) == 3 and qid not in [n for n, _ in row]
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)


def test_same_group_is_excluded(clustered):
    xb, ids, groups = clustered
    q = xb[0]
    hits = find_neighbours(flat(xb), ids, ["img0"], q[None], 5, index_groups=groups, query_groups=["A"])
    found = [n for n, _ in hits[0]]
    assert len(found) == 5 and not {groups[ids.index(n)] for n in found} & {"A"}
    assert found == expected(xb, ids, groups, q, "img0", "A", 5)


def test_query_without_group_only_excludes_self(clustered):
    xb, ids, groups = clustered
    hits = find_neighbours(flat(xb), ids, ["img0"], xb[:1], 5, index_groups=groups, query_groups=[None])
    found = [n for n, _ in hits[0]]
    assert "img0" not in found and all(groups[ids.index(n)] == "A" for n in found)


def test_group_exclusion_can_be_turned_off(clustered):
    xb, ids, groups = clustered
    hits = find_neighbours(
        flat(xb), ids, ["img0"], xb[:1], 5, index_groups=groups, query_groups=["A"], exclude_same_group=False
    )
    assert all(groups[ids.index(n)] == "A" for n, _ in hits[0])


def test_searches_again_when_too_few_remain(clustered, monkeypatch):
    """With no oversampling, the first search sees only group A; the search doubles until k are found."""
    xb, ids, groups = clustered
    monkeypatch.setattr(nb, "MARGIN", 0)
    monkeypatch.setattr(nb, "MAX_FIRST_EXTRA", 0)
    calls: list[tuple[int, int]] = []
    real_search = nb.search

    def counting_search(index, queries, k):
        calls.append((len(queries), k))
        return real_search(index, queries, k)

    monkeypatch.setattr(nb, "search", counting_search)
    queries = xb[[0, 40]]
    hits = find_neighbours(flat(xb), ids, ["img0", "new"], queries, 5, index_groups=groups, query_groups=["A", None])
    assert calls == [(2, 5), (1, 10), (1, 20), (1, 40)]  # doubling, only for the query still short (img0)
    assert [n for n, _ in hits[0]] == expected(xb, ids, groups, xb[0], "img0", "A", 5)
    assert [n for n, _ in hits[1]] == expected(xb, ids, groups, xb[40], "new", None, 5)


def test_k_larger_than_index():
    xb = unit(np.random.default_rng(2).standard_normal((6, 8)))
    ids = [f"t{i}" for i in range(6)]
    hits = find_neighbours(flat(xb), ids, ["t0", "new"], xb[:2], 10)
    assert len(hits[0]) == 5  # all but itself
    assert len(hits[1]) == 6  # an ID not in the index: nothing to exclude
    groups = ["g0", "g0", "g1", "g1", "g2", "g2"]
    hits = find_neighbours(flat(xb), ids, ["t0"], xb[:1], 10, index_groups=groups, query_groups=["g0"])
    assert sorted(n for n, _ in hits[0]) == ["t2", "t3", "t4", "t5"]


def test_approximate_index_still_excludes(clustered):
    xb, ids, groups = clustered
    index = build_index(xb, IndexConfig(kind="hnsw", gpu="never"))
    hits = find_neighbours(index, ids, ids[:30], xb[:30], 5, index_groups=groups, query_groups=groups[:30])
    for row in hits:
        assert len(row) == 5 and all(groups[ids.index(n)] != "A" for n, _ in row)


def test_mismatched_lengths():
    xb = unit(np.eye(4))
    with pytest.raises(ValueError, match="3 index IDs"):
        find_neighbours(flat(xb), ["a", "b", "c"], ["q"], xb[:1], 2)
    with pytest.raises(ValueError, match="query IDs"):
        find_neighbours(flat(xb), list("abcd"), ["q", "r"], xb[:1], 2)


def test_neighbour_records_attach_caption_and_concepts():
    examples = {
        "t1": Example("t1", None, "Chest X-ray.", ("C0001",)),
        "t2": Example("t2", None, None, ()),
    }
    records = neighbour_records([[("t1", 0.9), ("t2", 0.5)], []], ["q1", "q2"], examples)
    assert records[0].neighbours[0].caption == "Chest X-ray." and records[0].neighbours[0].concepts == ("C0001",)
    assert records[0].neighbours[1].score == 0.5 and records[1].neighbours == ()
    assert NeighbourList.from_json(records[0].to_json()) == records[0]
    with pytest.raises(KeyError, match="t9"):
        neighbour_records([[("t9", 0.1)]], ["q"], examples)


def test_the_neighbour_file_reads_a_list_when_asked(tmp_path):
    """NeighbourFile answers like the dict of every row, keeps offsets only, skips a torn last line and
    refuses a malformed row in the middle, naming the file."""
    import json

    from medcap.records import Neighbour
    from medcap.retrieval.neighbour_file import NeighbourFile

    lists = [
        NeighbourList(f'q"{i}', tuple(Neighbour(f"i{j}", 1.0 - j / 10, f"caption {i}.{j}", ("C1",)) for j in range(3)))
        for i in range(5)
    ]
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(nl.to_json()) + "\n" for nl in lists) + '{"id": "torn", "neighb')
    found = NeighbourFile(path)
    assert list(found) == [nl.id for nl in lists] and len(found) == 5
    assert all(found[nl.id] == nl for nl in lists)
    assert found.get("torn") is None and 'q"3' in found and "nope" not in found
    assert dict(found.items()) == {nl.id: nl for nl in lists}
    path.write_text(json.dumps(lists[0].to_json()) + "\n{broken\n" + json.dumps(lists[1].to_json()) + "\n")
    with pytest.raises(ValueError, match="valid.jsonl: a malformed row at byte"):
        NeighbourFile(path)
