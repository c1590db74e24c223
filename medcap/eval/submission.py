"""Write ImageCLEF caption-prediction submission files in a year's format, and read a test set's IDs.

The formats (``medcap.eval.imageclef``) follow the organisers' code: rows ``ID,caption`` for
2023-2024, a header ``ID,Caption`` from 2025, and for 2025-2026 the upload is a zip holding
``submission.csv``. :func:`validate_submission` checks a file with every rule of its year
(``medcap.eval.submission_check``).
"""

from __future__ import annotations

import csv
import io
import logging
import re
import zipfile
from pathlib import Path

from medcap.data.problems import InputError, Problem
from medcap.eval.imageclef import SubmissionFormat, submission_format
from medcap.eval.submission_check import FIELD_LIMIT, LONG_CAPTION, SubmissionCheck, check_submission
from medcap.eval.submission_read import records, repeats, sample
from medcap.files import write_atomic, write_atomic_all

__all__ = [
    "SubmissionCheck",
    "check_submission",
    "clean_caption",
    "read_test_ids",
    "validate_submission",
    "write_submission",
]

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters (tabs and line breaks included)
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
    try:
        recs = records(text, ",")
    except csv.Error as e:
        raise InputError([Problem(str(path), getattr(e, "line", None), f"unreadable CSV: {e}")]) from None
    rows = [rec for rec in recs if "".join(rec.row).strip()]
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
    Line breaks and control characters inside a caption become spaces and captions are stripped. An empty caption is
    legal for the evaluators (it scores 0), so it is written with a warning. For zipped years
    (2025, 2026) ``path`` (a ``.csv``) is written and a ``.zip`` beside it holding
    ``submission.csv``; the zip is returned. A caption too long for the organisers' csv reader is
    refused (ValueError naming it); one over ``LONG_CAPTION`` characters is written with a warning. ``fmt`` overrides the year's format (e.g. a ``|`` separator).
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
            raise ValueError(f"order repeats IDs: {sample(repeats(ids))}")
        missing = [i for i in ids if i not in captions or captions[i] is None]
        if missing:
            raise ValueError(f"no caption for {len(missing)} of the {len(ids)} IDs to submit: {sample(missing)}")
        extra = set(captions) - set(ids)
        if extra:
            log.warning(
                "%s: %d captions for IDs outside the given order are left out, e.g. %s",
                csv_path,
                len(extra),
                sample(sorted(extra)),
            )
    bad_ids = [i for i in ids if not _valid_id(i, fmt.separator)]
    if bad_ids:
        raise ValueError(
            f"IDs that cannot be written to a submission (empty, whitespace, quotes or the "
            f"separator {fmt.separator!r}): {sample(bad_ids)}"
        )
    rows = [(i, clean_caption(captions[i] or "")) for i in ids]
    unreadable = [i for i, c in rows if len(c) > FIELD_LIMIT]
    if unreadable:
        raise ValueError(
            f"captions over {FIELD_LIMIT:,} characters, which the organisers' csv reader cannot read: {sample(unreadable)}"
        )
    empty = [i for i, c in rows if not c]
    if empty:
        log.warning("%s: %d empty caption(s) (legal, but each scores 0), e.g. %s", csv_path, len(empty), sample(empty))
    long = [i for i, c in rows if len(c) > LONG_CAPTION]
    if long:
        log.warning("%s: %d caption(s) over %d characters, e.g. %s", csv_path, len(long), LONG_CAPTION, sample(long))
    data = _render(rows, fmt).encode("utf-8")  # plain UTF-8, no byte-order mark
    if not fmt.zipped:
        return write_atomic(csv_path, data)
    zip_path = csv_path.with_suffix(".zip")
    # both or neither: a failed write (a full disk) must not leave a new CSV beside the old zip
    write_atomic_all({csv_path: data, zip_path: _zip_bytes(fmt.member, data)})
    return zip_path


def clean_caption(caption: str) -> str:
    """A caption as one line: line breaks (every kind ``str.splitlines`` knows) and control characters become
    spaces, ends stripped."""
    parts = (_CONTROL.sub(" ", p).strip() for p in caption.splitlines())
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


def validate_submission(
    path: Path, test_ids: list[str], year: int, *, fmt: SubmissionFormat | None = None
) -> list[Problem]:
    """Every problem that the ``year`` evaluator or checker would reject ``path`` for (empty: valid).

    ``test_ids`` are the test set's IDs in ground-truth order. ``path`` may be a ``.zip`` holding
    the CSV (for zipped years it must hold exactly ``submission.csv``). Warnings (empty, multi-line
    or over-long captions, control characters) are logged; :func:`check_submission` returns them.
    """
    check = check_submission(path, test_ids, year, fmt=fmt)
    for w in check.warnings:
        log.warning("%s", w)
    return check.errors
