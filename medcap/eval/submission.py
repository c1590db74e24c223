"""Write ImageCLEF caption-prediction submission files and check them with every rule of a year.

The checks follow the organisers' code: the 2023-2025 evaluator (rows ``ID,caption``; errors for a
row with fewer than two columns, an ID not in the test set, an ID given twice and a row count that
differs from the test set) and the 2026 ``submission_check.py`` (UTF-8, header ``ID,Caption``,
exactly two columns, no blank lines, no whitespace around IDs, ground-truth order, no missing,
extra or repeated IDs, captions with commas double-quoted, a zip holding ``submission.csv``).
Unlike the organisers, who stop at the first error, every problem is reported. Each message ends
with "Error occurred at record line N" like theirs, where N is the file line the row starts on
(the first line of the file is 1; the organisers' own counters were 0- or 1-based by year).
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medcap.data.problems import InputError, Problem
from medcap.eval.imageclef import SubmissionFormat, submission_format
from medcap.runs import write_atomic

log = logging.getLogger(__name__)

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same captions give the same zip bytes


# --------------------------------------------------------------------------- test IDs


def read_test_ids(captions_csv: Path) -> list[str]:
    """The image IDs of a test set in file order, from an ``ID,Caption`` CSV or a one-column ID list.

    A first row whose first field is ``ID`` is a header; blank rows are skipped. Raises
    :class:`InputError` naming the line of an empty or repeated ID.
    """
    path = Path(captions_csv)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError([Problem(str(path), None, "no such file")]) from None
    except UnicodeDecodeError as e:
        raise InputError([Problem(str(path), None, f"not UTF-8: {e.reason} at byte {e.start}")]) from None
    ids: list[str] = []
    first_line: dict[str, int] = {}
    problems: list[Problem] = []
    rows = [rec for rec in _records(text, ",") if "".join(rec.row).strip()]
    if rows and rows[0].row[0].strip().lower() == "id":
        rows = rows[1:]  # the header
    for rec in rows:
        image_id = rec.row[0].strip()
        if not image_id:
            problems.append(Problem(str(path), rec.line, "empty image ID"))
        elif image_id in first_line:
            problems.append(Problem(str(path), rec.line, f"image ID {image_id!r} repeats line {first_line[image_id]}"))
        else:
            first_line[image_id] = rec.line
            ids.append(image_id)
    if problems:
        raise InputError(problems, f"{path}: not a usable list of test IDs")
    return ids


# --------------------------------------------------------------------------- writing


def write_submission(
    captions: dict[str, str],
    path: Path,
    year: int,
    order: list[str] | None = None,
    *,
    fmt: SubmissionFormat | None = None,
) -> Path:
    """Write a submission for ``year`` atomically; return the path of the file to upload.

    Rows follow ``order`` (the ground-truth order) when given; IDs of ``order`` without a caption
    are refused (ValueError naming them) and captions for IDs outside ``order`` are left out.
    Line breaks inside a caption become spaces and captions are stripped. An empty caption is
    legal for the evaluators (it scores 0), so it is written with a warning. For zipped years
    (2026) ``path`` (a ``.csv``) is written and a ``.zip`` beside it holding ``submission.csv``;
    the zip is returned. ``fmt`` overrides the year's format (e.g. a ``|`` separator).
    """
    fmt = fmt or submission_format(year)
    path = Path(path)
    csv_path = path.with_suffix(".csv") if path.suffix.lower() == ".zip" else path
    if order is None:
        if fmt.ordered:
            log.warning(
                "%s: the %d rules need rows in ground-truth order; none given, so rows keep the captions' order",
                csv_path,
                fmt.year,
            )
        ids = list(captions)
    else:
        ids = list(order)
        if len(set(ids)) != len(ids):
            raise ValueError(f"order repeats IDs: {_sample(_repeats(ids))}")
        missing = [i for i in ids if i not in captions or captions[i] is None]
        if missing:
            raise ValueError(f"no caption for {len(missing)} of the {len(ids)} IDs to submit: {_sample(missing)}")
        extra = set(captions) - set(ids)
        if extra:
            log.warning(
                "%s: %d captions for IDs outside the given order are left out, e.g. %s",
                csv_path,
                len(extra),
                _sample(sorted(extra)),
            )
    bad_ids = [i for i in ids if not _valid_id(i, fmt.separator)]
    if bad_ids:
        raise ValueError(
            f"IDs that cannot be written to a submission (empty, whitespace, quotes or the "
            f"separator {fmt.separator!r}): {_sample(bad_ids)}"
        )
    rows = [(i, clean_caption(captions[i] or "")) for i in ids]
    empty = [i for i, c in rows if not c]
    if empty:
        log.warning("%s: %d empty caption(s) (legal, but each scores 0), e.g. %s", csv_path, len(empty), _sample(empty))
    data = _render(rows, fmt).encode("utf-8")  # plain UTF-8, no byte-order mark
    write_atomic(csv_path, data)
    if not fmt.zipped:
        return csv_path
    zip_path = csv_path.with_suffix(".zip")
    write_atomic(zip_path, _zip_bytes(fmt.member, data))
    return zip_path


def clean_caption(caption: str) -> str:
    """A caption as one line: line breaks (every kind ``str.splitlines`` knows) become spaces, ends stripped."""
    parts = (p.strip() for p in caption.replace("\x00", "").splitlines())
    return " ".join(p for p in parts if p)


def _render(rows: list[tuple[str, str]], fmt: SubmissionFormat) -> str:
    out = io.StringIO()
    if fmt.header:
        out.write(fmt.separator.join(fmt.header) + "\n")
    if fmt.quote_all:
        for image_id, caption in rows:
            out.write(f'{image_id}{fmt.separator}"{caption.replace(chr(34), chr(34) * 2)}"\n')
    else:
        csv.writer(out, delimiter=fmt.separator, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _zip_bytes(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(member, date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, data)
    return buf.getvalue()


def _valid_id(image_id: str, separator: str) -> bool:
    return (
        bool(image_id)
        and image_id == image_id.strip()
        and len(image_id.splitlines()) == 1
        and separator not in image_id
        and '"' not in image_id
    )


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Record:
    line: int  # the file line the row starts on (1-based)
    raw: str  # the row's text as in the file, line endings removed
    row: list[str]


def validate_submission(
    path: Path, test_ids: list[str], year: int, *, fmt: SubmissionFormat | None = None
) -> list[Problem]:
    """Every problem that the ``year`` evaluator or checker would reject ``path`` for (empty: valid).

    ``test_ids`` are the test set's IDs in ground-truth order. ``path`` may be a ``.zip`` holding
    the CSV (for 2026 it must hold exactly ``submission.csv``).
    """
    fmt = fmt or submission_format(year)
    if len(set(test_ids)) != len(test_ids):
        raise ValueError(f"test_ids repeat IDs: {_sample(_repeats(test_ids))}")
    path = Path(path)
    loaded = _load(path, fmt)
    if isinstance(loaded, list):
        return loaded
    name, data = loaded
    problems: list[Problem] = []

    def report(line: int | None, message: str) -> None:
        where = f" Error occurred at record line {line}." if line is not None else ""
        problems.append(Problem(name, line, message + where))

    if data.startswith(b"\xef\xbb\xbf"):
        report(
            1,
            "The file starts with a UTF-8 byte-order mark (BOM); save it as plain UTF-8 (with a BOM the "
            "first field reads '\\ufeff...').",
        )
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        report(data[: e.start].count(b"\n") + 1, f"File encoding error: the file must be UTF-8 ({e.reason}).")
        return problems
    try:
        records = _records(text, fmt.separator)
    except csv.Error as e:
        report(None, f"CSV parsing error: {e}.")
        return problems
    if fmt.strict:
        # the 2026 checker looks at str.splitlines() lines: no blank one anywhere (inside quotes included)
        for number, text_line in enumerate(text.splitlines(), 1):
            if not text_line.strip():
                report(number, "Empty line detected: the submission must not contain blank lines.")
    _check_rows(records, text.splitlines(), test_ids, fmt, report)
    return problems


def _load(path: Path, fmt: SubmissionFormat) -> tuple[str, bytes] | list[Problem]:
    """The CSV's display name and bytes, from the file itself or from the zip that holds it."""
    if not path.is_file():
        return [Problem(str(path), None, "no such file")]
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".zip":
            return [Problem(str(path), None, "not a readable zip file")]
        return str(path), path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        if fmt.zipped and names != [fmt.member]:
            return [
                Problem(str(path), None, f"the zip must hold exactly one file named {fmt.member}; it holds {names}")
            ]
        csvs = [n for n in names if n.lower().endswith(".csv")]
        member = fmt.member if fmt.member in names else (csvs[0] if len(csvs) == 1 else None)
        if member is None:
            return [Problem(str(path), None, f"the zip must hold one CSV file ({fmt.member}); it holds {names}")]
        return f"{path}!{member}", zf.read(member)


def _records(text: str, separator: str) -> list[_Record]:
    """CSV rows with the file line each starts on and its raw text (a quoted row may span lines)."""
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines), delimiter=separator)
    out: list[_Record] = []
    start = 1
    for row in reader:
        raw = "".join(lines[start - 1 : reader.line_num]).rstrip("\r\n")
        out.append(_Record(start, raw, row))
        start = reader.line_num + 1
    return out


def _check_rows(
    records: list[_Record], text_lines: list[str], test_ids: list[str], fmt: SubmissionFormat, report
) -> None:
    """Check the rows; ``text_lines`` are the file's ``str.splitlines()``, which the 2026 checker pairs with rows."""
    sep_name = "',' (comma)" if fmt.separator == "," else f"'{fmt.separator}'"
    test_set = set(test_ids)
    data = records
    if fmt.header:
        data = _check_header(records, test_set, fmt, report)
    elif records and records[0].row and records[0].row[0].strip().lower() == "id":
        data = records[1:]  # the 2023-2025 evaluators skip a header row
    seen: dict[str, int] = {}
    sequence: list[tuple[str, int]] = []
    first = len(records) - len(data)
    for index, rec in enumerate(data, first):
        row, line = rec.row, rec.line
        if fmt.strict and not rec.raw.strip():
            continue  # reported as an empty line
        if fmt.strict and len(row) != 2:
            hint = " A caption that contains a comma must be enclosed in double quotes." if len(row) > 2 else ""
            report(line, f"Expected exactly 2 columns, found {len(row)}: {row}.{hint}")
        elif len(row) < 2:
            report(
                line,
                f"Wrong format: Each line must consist of an image ID followed by a {sep_name} and a "
                f"caption (<imageID>{fmt.separator}<caption>).",
            )
        elif len(row) > 2:
            report(
                line,
                f"{len(row)} columns: the evaluator reads only the first two, so this caption is cut at an "
                f"unquoted {sep_name}; enclose the caption in double quotes.",
            )
        if not row or not row[0].strip():
            continue
        image_id = row[0]
        if image_id != image_id.strip() and image_id.strip() in test_set:
            # the evaluators compare IDs as written, so this row matches no test ID; go on with the stripped ID
            report(line, f"ID has leading/trailing whitespace: '{image_id}'.")
            image_id = image_id.strip()
        if image_id in seen:
            report(
                line,
                f"Image ID '{image_id}' was specified more than once in submission file "
                f"(first at line {seen[image_id]}).",
            )
            continue
        if image_id not in test_set:
            report(line, f"Image ID '{image_id}' in submission file does not exist in testset.")
            continue
        seen[image_id] = line
        sequence.append((image_id, line))
        # like the checker, the quoting rule reads the index-th text line: a row spanning lines shifts the pairing
        paired = text_lines[index] if index < len(text_lines) else rec.raw
        if len(row) == 2 and fmt.quote_commas and fmt.separator == "," and not _quoted_if_comma(paired):
            report(line, "Caption contains a comma but is not enclosed in double quotes.")
    last = records[-1].line if records else 1
    if fmt.ordered:
        expected = [i for i in test_ids if i in seen]
        for (image_id, line), want in zip(sequence, expected, strict=True):
            if image_id != want:
                report(line, f"ID order mismatch: expected '{want}' here (the test set's order), found '{image_id}'.")
                break
    missing = [i for i in test_ids if i not in seen]
    if missing:
        report(
            last,
            f"Number of image IDs in submission file not equal to number of image IDs in testset "
            f"(testset: {len(test_ids)}, valid IDs in submission: {len(seen)}); "
            f"{len(missing)} missing, e.g. {_sample(missing, 5)}.",
        )


def _check_header(records: list[_Record], test_set: set[str], fmt: SubmissionFormat, report) -> list[_Record]:
    """Check the required header; return the data rows (the first row too when it is data, not a header)."""
    assert fmt.header is not None
    want = fmt.separator.join(fmt.header)
    if not records:
        report(1, f"Missing header row. Expected columns: {want}.")
        return []
    first = records[0]
    if first.row == list(fmt.header):
        return records[1:]
    if first.row and first.row[0].strip() in test_set:
        report(first.line, f"Missing header row. Expected columns: {want}.")
        return records
    report(first.line, f"Invalid header. Expected exactly two columns: {want}. Found: {first.row}.")
    return records[1:]


def _quoted_if_comma(raw: str) -> bool:
    """The 2026 checker's rule on the raw line: after the first comma, a caption with a comma is in quotes."""
    if "," not in raw:
        return True
    after = raw.split(",", 1)[1]
    return "," not in after or (after.startswith('"') and after.endswith('"'))


def _repeats(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if i in seen or seen.add(i)]


def _sample(ids: list[str], n: int = 10) -> str:
    more = f" (+{len(ids) - n} more)" if len(ids) > n else ""
    return f"{ids[:n]}{more}"
