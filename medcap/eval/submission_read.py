"""Reading a caption-prediction file: the CSV out of a bare file or a zip, and its rows with their file lines.

``submission_check`` applies each year's rules to what this reads; ``submission`` writes and re-reads files.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import NamedTuple

from medcap.data.problems import Problem
from medcap.eval.imageclef import SubmissionFormat


class Record(NamedTuple):
    """One CSV row with the file line it starts on (1-based) and its raw text, line endings removed."""

    line: int
    raw: str
    row: tuple[str, ...]
    end: int  # the file line it ends on (a quoted caption may span lines)


def records(text: str, separator: str) -> list[Record]:
    """CSV rows with their lines; raises ``csv.Error`` with ``.line`` set to the line of the row that broke."""
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines), delimiter=separator)
    out: list[Record] = []
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return out
        except csv.Error as e:
            e.line = start  # type: ignore[attr-defined]
            raise
        raw = "".join(lines[start - 1 : reader.line_num]).rstrip("\r\n")
        out.append(Record(start, raw, tuple(row), reader.line_num))
        start = reader.line_num + 1


def load_submission(path: Path, fmt: SubmissionFormat) -> tuple[str, bytes, bool] | Problem:
    """The CSV's display name, its bytes and whether it came from a zip."""
    if not path.is_file():
        return Problem(str(path), None, "no such file")
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".zip":
            return Problem(str(path), None, "not a readable zip file")
        return str(path), path.read_bytes(), False
    with zipfile.ZipFile(path) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        if fmt.zipped and names != [fmt.member]:
            return Problem(str(path), None, f"the zip must hold exactly one file named {fmt.member}; it holds {names}")
        csvs = [n for n in names if n.lower().endswith(".csv")]
        member = fmt.member if fmt.member in names else (csvs[0] if len(csvs) == 1 else None)
        if member is None:
            return Problem(str(path), None, f"the zip must hold one CSV file ({fmt.member}); it holds {names}")
        return f"{path}!{member}", zf.read(member), True


def repeats(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if i in seen or seen.add(i)]


def sample(ids: list[str], n: int = 10) -> str:
    more = f" (+{len(ids) - n} more)" if len(ids) > n else ""
    return f"{ids[:n]}{more}"
