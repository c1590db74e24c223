"""The retrieve stage's neighbour lists, read a row at a time: what a stage holds is byte offsets, not lists.

A ROCO-sized query split (17,237 images x 200 neighbours with their captions) is ~4 GB as Python objects;
stages that walk the split in batches look each image up as they reach it. The file is scanned once for
the IDs (a torn last line, a crash mid-write, is ignored as ``files.read_jsonl`` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from medcap.records import NeighbourList

_ID = re.compile(rb'^\{"id": ("(?:[^"\\]|\\.)*")')  # how NeighbourList.to_json rows start


class NeighbourFile(Mapping[str, NeighbourList]):
    """ID -> :class:`NeighbourList` of a neighbours JSONL, parsed on lookup (a dict's interface)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offsets: dict[str, int] = {}
        at = 0
        with open(self.path, "rb") as f:
            for line in f:
                start, at = at, at + len(line)
                if not line.strip():
                    continue
                m = _ID.match(line)
                if m and line.endswith(b"\n"):  # a whole row (a torn one has no newline)
                    self._offsets[json.loads(m.group(1))] = start
                    continue
                try:
                    self._offsets[json.loads(line)["id"]] = start
                except json.JSONDecodeError:
                    if at < self.path.stat().st_size:  # only the last line can be torn
                        raise ValueError(f"{self.path}: a malformed row at byte {start}") from None

    def __getitem__(self, image_id: str) -> NeighbourList:
        start = self._offsets[image_id]
        with open(self.path, "rb") as f:
            f.seek(start)
            return NeighbourList.from_json(json.loads(f.readline()))

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._offsets

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)
