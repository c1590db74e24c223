"""Submission files: the writer's output passes the validator, and the validator catches each rule at its line."""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from pathlib import Path

import pytest

from medcap.data.problems import InputError
from medcap.eval.imageclef import known_years, submission_format
from medcap.eval.submission import (
    check_submission,
    clean_caption,
    read_test_ids,
    validate_submission,
    write_submission,
)

IDS = [f"ImageCLEFmedical_Caption_2026_test_{i:06d}" for i in range(1, 5)]
CAPTIONS = {
    IDS[0]: "CT of the chest, axial view, showing a 3 cm mass.",
    IDS[1]: 'The "arrow" marks the lesion',
    IDS[2]: "MRI of the brain\nshowing\r\nan infarct ",
    IDS[3]: "Ultrasound: 5×3 mm nodule, µ-calcifications | left lobe",
}
A, B, C, D = IDS


def _rows(path: Path, year: int) -> list[list[str]]:
    """The rows of a written submission, read back with the csv module (from the zip for zipped years)."""
    fmt = submission_format(year)
    if fmt.zipped:
        with zipfile.ZipFile(path) as zf:
            text = zf.read("submission.csv").decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=fmt.separator))


def _problems(tmp_path: Path, content: str | bytes, year: int, ids: list[str] = IDS):
    path = tmp_path / "sub.csv"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return validate_submission(path, ids, year)


# --------------------------------------------------------------------------- formats


def test_known_years_and_unknown_year():
    assert known_years() == [2023, 2024, 2025, 2026]
    with pytest.raises(ValueError, match=r"2019.*\[2023, 2024, 2025, 2026\]"):
        submission_format(2019)


def test_2026_format_is_strict_and_older_years_are_not():
    f26 = submission_format(2026)
    assert (f26.header, f26.zipped, f26.ordered, f26.quote_commas) == (("ID", "Caption"), True, True, True)
    for year in (2023, 2024):
        fmt = submission_format(year)
        assert fmt.header is None and not fmt.zipped and not fmt.ordered and fmt.separator == ","
    f25 = submission_format(2025)  # the 2025 evaluator needs a header row; the platform took a zip
    assert (f25.header, f25.header_exact, f25.zipped, f25.ordered) == (("ID", "Caption"), False, True, False)
    assert submission_format(2024, separator="|").separator == "|"
    with pytest.raises(ValueError, match="fix the separator"):
        submission_format(2026, separator="|")


# --------------------------------------------------------------------------- writer


@pytest.mark.parametrize("year", [2023, 2024, 2025, 2026])
def test_writer_output_passes_validator_and_roundtrips(tmp_path, year):
    written = write_submission(CAPTIONS, tmp_path / "run.csv", year, order=IDS)
    assert validate_submission(written, IDS, year) == []
    rows = _rows(written, year)
    if year >= 2025:
        assert rows[0] == ["ID", "Caption"]
        rows = rows[1:]
    assert rows == [[i, clean_caption(CAPTIONS[i])] for i in IDS]
    assert rows[2][1] == "MRI of the brain showing an infarct"  # line breaks became spaces, ends stripped
    assert rows[1][1] == 'The "arrow" marks the lesion'


def test_pipe_separator_roundtrips(tmp_path):
    fmt = submission_format(2024, separator="|")
    written = write_submission(CAPTIONS, tmp_path / "run.csv", 2024, order=IDS, fmt=fmt)
    assert validate_submission(written, IDS, 2024, fmt=fmt) == []
    assert written.read_text().splitlines()[0] == f"{A}|CT of the chest, axial view, showing a 3 cm mass."
    rows = list(csv.reader(io.StringIO(written.read_text(), newline=""), delimiter="|"))
    assert [r[1] for r in rows] == [clean_caption(CAPTIONS[i]) for i in IDS]


def test_2026_writes_header_quotes_and_a_zip_holding_submission_csv(tmp_path):
    written = write_submission(CAPTIONS, tmp_path / "run.csv", 2026, order=IDS)
    assert written == tmp_path / "run.zip"
    with zipfile.ZipFile(written) as zf:
        assert zf.namelist() == ["submission.csv"]
        inner = zf.read("submission.csv")
    assert inner == (tmp_path / "run.csv").read_bytes()
    lines = inner.decode("utf-8").split("\n")
    assert lines[0] == "ID,Caption"
    assert lines[1] == f'{A},"CT of the chest, axial view, showing a 3 cm mass."'
    assert lines[2] == f'{B},"The ""arrow"" marks the lesion"'
    assert lines[-1] == ""  # one final newline, no blank line
    assert not inner.startswith(b"\xef\xbb\xbf")
    # the same captions give the same bytes (fixed zip timestamps)
    again = write_submission(CAPTIONS, tmp_path / "again.csv", 2026, order=IDS)
    assert again.read_bytes() == written.read_bytes()


def test_writer_follows_order_and_refuses_missing_ids(tmp_path, caplog):
    order = [C, A, D, B]
    extra = {**CAPTIONS, "not_in_test": "x"}
    with caplog.at_level(logging.WARNING):
        written = write_submission(extra, tmp_path / "run.csv", 2023, order=order)
    assert [r[0] for r in _rows(written, 2023)] == order
    assert "left out" in caplog.text
    partial = {k: v for k, v in CAPTIONS.items() if k != D}
    with pytest.raises(ValueError, match=D):
        write_submission(partial, tmp_path / "bad.csv", 2025, order=IDS)
    assert not (tmp_path / "bad.csv").exists()


def test_writer_warns_on_empty_caption_which_the_evaluator_accepts(tmp_path, caplog):
    caps = {**CAPTIONS, B: "  \n "}
    with caplog.at_level(logging.WARNING):
        written = write_submission(caps, tmp_path / "run.csv", 2026, order=IDS)
    assert "empty caption" in caplog.text and B in caplog.text
    assert validate_submission(written, IDS, 2026) == []
    assert _rows(written, 2026)[2] == [B, ""]


def test_writer_refuses_unwritable_ids(tmp_path):
    with pytest.raises(ValueError, match="cannot be written"):
        write_submission({"a,b": "x"}, tmp_path / "run.csv", 2025)


# --------------------------------------------------------------------------- 2026 checker rules

HEADER = "ID,Caption\n"
GOOD_ROWS = [f'{i},"caption {n}"\n' for n, i in enumerate(IDS)]


def _file(*rows: str, header: str = HEADER) -> str:
    return header + "".join(rows)


CASES_2026 = {
    "not utf-8": (HEADER.encode() + GOOD_ROWS[0].encode() + f'{B},"caf\xe9"\n'.encode("latin-1"), 3, "UTF-8"),
    "byte-order mark": (b"\xef\xbb\xbf" + _file(*GOOD_ROWS).encode(), 1, "byte-order mark"),
    "wrong header": (_file(*GOOD_ROWS, header="id,caption\n"), 1, "Invalid header"),
    "missing header": (_file(*GOOD_ROWS, header=""), 1, "Missing header"),
    "three columns": (_file(GOOD_ROWS[0], f"{B},a, b\n", *GOOD_ROWS[2:]), 3, "Expected exactly 2 columns"),
    "one column": (_file(GOOD_ROWS[0], f"{B}\n", *GOOD_ROWS[2:]), 3, "Expected exactly 2 columns"),
    "blank line": (_file(GOOD_ROWS[0], "\n", *GOOD_ROWS[1:]), 3, "Empty line"),
    "trailing blank line": (_file(*GOOD_ROWS, "\n"), 6, "Empty line"),
    "whitespace around ID": (_file(GOOD_ROWS[0], f' {B},"x"\n', *GOOD_ROWS[2:]), 3, "whitespace"),
    "order": (_file(GOOD_ROWS[1], GOOD_ROWS[0], *GOOD_ROWS[2:]), 2, "order mismatch"),
    "missing ID": (_file(*GOOD_ROWS[:3]), 4, "1 missing"),
    "extra ID": (_file(*GOOD_ROWS, 'ImageCLEFmedical_Caption_2026_test_999999,"x"\n'), 6, "does not exist"),
    "repeated ID": (_file(*GOOD_ROWS, GOOD_ROWS[0]), 6, "more than once"),
    "unquoted comma": (_file(GOOD_ROWS[0], f'{B},"a, b" c\n', *GOOD_ROWS[2:]), 3, "not enclosed in double quotes"),
    "blank line inside quotes": (_file(GOOD_ROWS[0], f'{B},"a\n\nb"\n', *GOOD_ROWS[2:]), 4, "Empty line"),
}


@pytest.mark.parametrize("case", sorted(CASES_2026))
def test_2026_rule_caught_at_its_line(tmp_path, case):
    content, line, message = CASES_2026[case]
    problems = _problems(tmp_path, content, 2026)
    assert len(problems) == 1, problems
    (p,) = problems
    assert p.line == line and message in p.message
    assert p.message.endswith(f"Error occurred at record line {line}.")
    assert p.file == str(tmp_path / "sub.csv")


def test_2026_good_file_passes_and_unquoted_captions_without_commas_are_fine(tmp_path):
    assert _problems(tmp_path, _file(*GOOD_ROWS), 2026) == []
    assert _problems(tmp_path, _file(*[f"{i},plain caption\n" for i in IDS]), 2026) == []
    # the checker accepts a quoted caption over two lines (its evaluator reads it with csv)
    assert _problems(tmp_path, _file(GOOD_ROWS[0], f'{B},"a\nb"\n', *GOOD_ROWS[2:]), 2026) == []


def test_2026_quoting_rule_reads_lines_paired_with_rows_like_the_checker(tmp_path):
    # row 3 spans two lines, so the checker pairs row 4 with the text line 'b" and, more, text"'
    content = _file(GOOD_ROWS[0], f'{B},"a\nb" and, more, text"\n', *GOOD_ROWS[2:])
    problems = _problems(tmp_path, content, 2026)
    assert any("not enclosed in double quotes" in p.message and p.line == 5 for p in problems), problems


def test_2026_zip_must_hold_exactly_submission_csv(tmp_path):
    good = _file(*GOOD_ROWS).encode()
    path = tmp_path / "up.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("submission.csv", good)
    assert validate_submission(path, IDS, 2026) == []
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("run1.csv", good)
    (p,) = validate_submission(path, IDS, 2026)
    assert "submission.csv" in p.message and "run1.csv" in p.message
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("submission.csv", _file(GOOD_ROWS[1], GOOD_ROWS[0], *GOOD_ROWS[2:]).encode())
    (p,) = validate_submission(path, IDS, 2026)
    assert p.file == f"{path}!submission.csv" and p.line == 2


def test_missing_file_is_a_problem(tmp_path):
    (p,) = validate_submission(tmp_path / "nope.csv", IDS, 2025)
    assert "no such file" in p.message


# --------------------------------------------------------------------------- 2023-2025 evaluator rules

PLAIN_ROWS = [f"{i},caption {n}\n" for n, i in enumerate(IDS)]

CASES_OLD = {
    "fewer than two columns": ("".join([PLAIN_ROWS[0], f"{B}\n", *PLAIN_ROWS[2:]]), 2, "Wrong format"),
    "blank line": ("".join([PLAIN_ROWS[0], "\n", *PLAIN_ROWS[1:]]), 2, "Wrong format"),
    "unknown ID": ("".join([*PLAIN_ROWS, "ImageCLEFmedical_x,y\n"]), 5, "does not exist in testset"),
    "repeated ID": ("".join([*PLAIN_ROWS, PLAIN_ROWS[2]]), 5, "more than once"),
    "row count": ("".join(PLAIN_ROWS[:3]), 3, "not equal to number of image IDs"),
    "empty ID": ("".join([*PLAIN_ROWS, ",a caption\n"]), 5, "Image ID '' in submission file does not exist"),
}


@pytest.mark.parametrize("year", [2023, 2024, 2025])
@pytest.mark.parametrize("case", sorted(CASES_OLD))
def test_older_evaluator_rule_caught_at_its_line(tmp_path, case, year):
    content, line, message = CASES_OLD[case]
    if year == 2025:  # the 2025 evaluator needs a header row: the same file with one, a line further down
        content, line = "ID,Caption\n" + content, line + 1
    (p,) = _problems(tmp_path, content, year)
    assert p.line == line and message in p.message
    assert p.message.endswith(f"Error occurred at record line {line}.")


def test_older_years_accept_header_any_order_and_unquoted_captions(tmp_path):
    shuffled = [PLAIN_ROWS[2], PLAIN_ROWS[0], PLAIN_ROWS[3], PLAIN_ROWS[1]]
    assert _problems(tmp_path, "".join(shuffled), 2023) == []
    assert _problems(tmp_path, "id,caption\n" + "".join(shuffled), 2025) == []  # any case, any order
    assert _problems(tmp_path, "ID,Caption\n" + "".join(PLAIN_ROWS), 2023) == []


def test_unquoted_comma_cuts_the_caption_a_warning_until_2025_then_an_error(tmp_path):
    rows = "".join([PLAIN_ROWS[0], f"{B},a, b\n", *PLAIN_ROWS[2:]])
    for year in (2023, 2024):  # the evaluator reads row[1]: accepted, but the caption is cut
        (tmp_path / "sub.csv").write_text(rows)
        check = check_submission(tmp_path / "sub.csv", IDS, year)
        assert check.errors == [] and "cut at an unquoted ','" in check.warnings[0].message
    (p,) = _problems(tmp_path, "ID,Caption\n" + rows, 2025)  # the 2025 platform: two columns ID,Caption
    assert p.line == 3 and "Expected exactly 2 columns, found 3" in p.message


def test_byte_order_mark_before_2025_is_an_error_only_where_it_spoils_the_first_id(tmp_path):
    bom = b"\xef\xbb\xbf"
    (p,) = _problems(tmp_path, bom + "".join(PLAIN_ROWS).encode(), 2023)
    assert p.line == 1 and "byte-order mark" in p.message and "matches no test ID" in p.message
    path = tmp_path / "h.csv"
    path.write_bytes(bom + ("ID,Caption\n" + "".join(PLAIN_ROWS)).encode())
    check = check_submission(path, IDS, 2023)
    assert check.errors == [] and "byte-order mark" in check.warnings[0].message


def test_2025_file_without_header_fails_the_evaluators_count(tmp_path):
    # the 2025 evaluator reads the first row as a header unless its first field is "ID", and does not count it
    (p,) = _problems(tmp_path, "".join(PLAIN_ROWS), 2025)
    assert p.line == 1 and "Missing header row" in p.message and "count check" in p.message


# --------------------------------------------------------------------------- test IDs


def test_read_test_ids_from_captions_csv_and_id_list(tmp_path):
    captions = tmp_path / "test_captions.csv"
    captions.write_text("ID,Caption\n" + "".join(f'{i},"a, b"\n' for i in [C, A, B]), encoding="utf-8")
    assert read_test_ids(captions) == [C, A, B]
    plain = tmp_path / "ids.csv"
    plain.write_text(f"{A}\n\n{B}\n", encoding="utf-8")
    assert read_test_ids(plain) == [A, B]


def test_read_test_ids_names_the_line_of_a_repeated_id(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text(f"ID\n{A}\n{B}\n{A}\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_test_ids(path)
    (p,) = err.value.problems
    assert (p.file, p.line) == (str(path), 4) and "line 2" in p.message
