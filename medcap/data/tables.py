"""Reading CSV and JSONL input tables so that every problem names its file and 1-based line.

The readers here never stop at the first bad row: a malformed row (wrong field count, a quote
that is never closed, bytes that are not UTF-8) becomes a :class:`Problem` and reading goes on
from the next line, so a user sees every problem of a file at once. File-level problems (no
such file, a header without a required column) are ``fatal``: nothing in the file can be used.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.data.problems import Problem


@dataclass
class Table:
    """The usable rows of a table file, and what was wrong with the rest.

    ``rows`` are ``(line, record)`` pairs: ``line`` is where the row starts (header = line 1) and
    ``record`` maps each found column name (as requested, not as spelled in the file) to its value.
    """

    path: Path
    columns: list[str] = field(default_factory=list)
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # row-level: those rows are not in ``rows``
    fatal: list[Problem] = field(default_factory=list)  # file-level: the file cannot be used


def read_text(path: Path) -> tuple[str, dict[int, Problem]]:
    """The text of ``path`` (UTF-8, BOM dropped) and a problem for each line that is not valid UTF-8."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), {}
    except UnicodeDecodeError:
        pass
    bad: dict[int, Problem] = {}
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            byte = raw[e.start : e.start + 1].hex()
            bad[i] = Problem(
                str(path), i, f"not valid UTF-8 (byte 0x{byte} at column {e.start + 1}); save the file as UTF-8"
            )
    return data.decode("utf-8", errors="replace"), bad


def _physical_lines(text: str) -> list[str]:
    """Split on ``\\n`` only (``str.splitlines`` would also split on characters a caption may hold)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _records(lines: list[str], delimiter: str, path: Path) -> Iterator[tuple[int, int, list[str]] | Problem]:
    """CSV records as ``(first_line, last_line, fields)``; a malformed one yields a Problem and parsing
    resumes on the line after that record's first line (so one stray quote costs one row, not the file)."""
    pos = 0
    while pos < len(lines):
        reader = csv.reader((lines[i] for i in range(pos, len(lines))), delimiter=delimiter, strict=True)
        consumed = 0
        try:
            for row in reader:
                start = pos + consumed + 1
                consumed = reader.line_num
                yield start, pos + consumed, row
            return
        except csv.Error as e:
            start = pos + consumed + 1
            hint = "a quote that is never closed" if "end of data" in str(e) else "check the quotes"
            yield Problem(str(path), start, f"malformed row: {e} ({hint})")
            pos = start  # 0-based index of the line after the record's first line


def _match_columns(header: list[str], wanted: Sequence[str]) -> dict[str, int]:
    """Column indexes of ``wanted`` names in ``header``, matched case-insensitively, spaces stripped."""
    index = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
    return {w: index[w.lower()] for w in wanted if w.lower() in index}


def read_csv_table(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> Table:
    """Read a CSV (or tab-separated) file whose header must name every ``required`` column."""
    table = Table(path)
    if not path.is_file():
        table.fatal.append(Problem(str(path), None, "no such file"))
        return table
    text, bad_lines = read_text(path)
    lines = _physical_lines(text)
    if not lines or not lines[0].strip():
        table.fatal.append(
            Problem(str(path), 1, f"empty file or blank first line; expected a header {','.join(required)}")
        )
        return table
    delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    records = _records(lines, delimiter, path)
    first = next(records)
    if isinstance(first, Problem):
        table.fatal.append(Problem(str(path), 1, f"unreadable header: {first.message}"))
        return table
    header = first[2]
    cols = _match_columns(header, [*required, *optional])
    missing = [c for c in required if c not in cols]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        table.fatal.append(Problem(str(path), 1, f"missing column {names} in the header (found: {','.join(header)})"))
        return table
    table.columns = list(cols)
    table.problems.extend(bad_lines.values())
    for rec in records:
        if isinstance(rec, Problem):
            table.problems.append(rec)
            continue
        start, end, fields = rec
        if not fields or (len(fields) == 1 and not fields[0].strip() and len(header) > 1):
            continue  # blank line
        if any(line in bad_lines for line in range(start, end + 1)):
            continue  # already reported as not UTF-8
        if len(fields) != len(header):
            hint = "; quote fields that contain a comma" if len(fields) > len(header) and delimiter == "," else ""
            table.problems.append(
                Problem(
                    str(path),
                    start,
                    f"malformed row: expected {len(header)} fields ({','.join(header)}), found {len(fields)}{hint}",
                )
            )
            continue
        table.rows.append((start, {name: fields[i] for name, i in cols.items()}))
    return table


def read_jsonl_table(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> Table:
    """Read a JSONL file of objects; a row missing a ``required`` key is a problem at its line."""
    table = Table(path, columns=[*required, *optional])
    if not path.is_file():
        table.fatal.append(Problem(str(path), None, "no such file"))
        return table
    text, bad_lines = read_text(path)
    table.problems.extend(bad_lines.values())
    for i, line in enumerate(_physical_lines(text), 1):
        if not line.strip() or i in bad_lines:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            table.problems.append(Problem(str(path), i, f"malformed row: not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            table.problems.append(
                Problem(str(path), i, f"malformed row: expected a JSON object, got {type(obj).__name__}")
            )
            continue
        keys = _match_columns(list(obj), [*required, *optional])
        missing = [k for k in required if k not in keys]
        if missing:
            table.problems.append(Problem(str(path), i, f"missing key {', '.join(repr(k) for k in missing)}"))
            continue
        values = list(obj.values())
        table.rows.append((i, {name: values[j] for name, j in keys.items()}))
    if not table.rows and not table.problems:
        table.fatal.append(Problem(str(path), None, "no rows"))
    return table
