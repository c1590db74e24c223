"""k nearest training images of each query image, without leakage.

A query never gets itself back (same ID), and with groups (the case/patient an image belongs
to) never an image of its own group: a neighbour from the same case would carry the answer.
Filtering happens after the search, so the search asks for more than ``k`` and, for the queries
still short of ``k`` after filtering, asks again with twice as many, up to the whole index.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from medcap.records import Example, Neighbour, NeighbourList
from medcap.retrieval.index import search

# Extra hits fetched on the first search, beyond k and the hits known to be excluded.
MARGIN = 8
# Cap on the known-excluded count added to the first search; larger groups go through doubling.
MAX_FIRST_EXTRA = 256


def find_neighbours(
    index: Any,
    index_ids: list[str],
    query_ids: list[str],
    queries: np.ndarray,
    k: int,
    *,
    index_groups: list[str | None] | None = None,
    query_groups: list[str | None] | None = None,
    exclude_same_group: bool = True,
) -> list[list[tuple[str, float]]]:
    """For each query, up to ``k`` ``(index ID, score)`` pairs, best first, self and own group excluded.

    Each list holds ``min(k, allowed)`` hits, where ``allowed`` is the number of index items the
    query may get (for an approximate index, what the index can find of those).
    """
    n = int(index.ntotal)
    if len(index_ids) != n:
        raise ValueError(f"find_neighbours: {len(index_ids)} index IDs for an index of {n} vectors")
    if len(query_ids) != len(queries):
        raise ValueError(f"find_neighbours: {len(query_ids)} query IDs for {len(queries)} query vectors")
    if index_groups is not None and len(index_groups) != n:
        raise ValueError(f"find_neighbours: {len(index_groups)} index groups for {n} index vectors")
    if query_groups is not None and len(query_groups) != len(query_ids):
        raise ValueError(f"find_neighbours: {len(query_groups)} query groups for {len(query_ids)} queries")
    if k < 1 or n == 0 or not query_ids:
        return [[] for _ in query_ids]

    use_groups = exclude_same_group and index_groups is not None and query_groups is not None
    groups_of_queries = list(query_groups) if use_groups else [None] * len(query_ids)
    group_size = Counter(g for g in index_groups if g is not None) if use_groups else Counter()
    id_set = set(index_ids)
    excluded = [
        int(q in id_set) + (group_size[g] if g is not None else 0)
        for q, g in zip(query_ids, groups_of_queries, strict=True)
    ]

    hits: list[list[tuple[str, float]]] = [[] for _ in query_ids]
    pending = np.arange(len(query_ids))
    fetch = min(n, k + MARGIN + min(max(excluded), MAX_FIRST_EXTRA))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    while pending.size:
        scores, positions = search(index, queries[pending], fetch)
        still = []
        for row, qi in enumerate(pending):
            kept = _filter(
                positions[row], scores[row], query_ids[qi], groups_of_queries[qi], index_ids, index_groups, use_groups
            )
            hits[qi] = kept[:k]
            if len(kept) < k and fetch < n:
                still.append(qi)
        pending = np.asarray(still, dtype=np.int64)
        fetch = min(n, fetch * 2)
    return hits


def _filter(
    positions: np.ndarray,
    scores: np.ndarray,
    query_id: str,
    query_group: str | None,
    index_ids: list[str],
    index_groups: list[str | None] | None,
    use_groups: bool,
) -> list[tuple[str, float]]:
    kept = []
    for pos, score in zip(positions.tolist(), scores.tolist(), strict=True):
        if pos < 0:  # an approximate index found fewer than asked
            continue
        nid = index_ids[pos]
        if nid == query_id:
            continue
        if use_groups and query_group is not None and index_groups[pos] == query_group:
            continue
        kept.append((nid, float(score)))
    return kept


def neighbour_records(
    hits: list[list[tuple[str, float]]], query_ids: list[str], index_examples: dict[str, Example]
) -> list[NeighbourList]:
    """Attach each neighbour's caption and concepts: one :class:`NeighbourList` per query."""
    if len(hits) != len(query_ids):
        raise ValueError(f"neighbour_records: {len(hits)} hit lists for {len(query_ids)} queries")
    records = []
    for qid, row in zip(query_ids, hits, strict=True):
        neighbours = []
        for nid, score in row:
            ex = index_examples.get(nid)
            if ex is None:
                raise KeyError(f"neighbour_records: index ID {nid!r} is not among the index examples")
            neighbours.append(Neighbour(nid, float(score), ex.caption, tuple(ex.concepts)))
        records.append(NeighbourList(qid, tuple(neighbours)))
    return records
