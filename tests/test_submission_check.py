"""The strict validator: a wrong separator and an unclosed quote named once, warnings a careful team wants."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pytest

from medcap.eval.submission import check_submission, clean_caption, validate_submission, write_submission

IDS = [f"ImageCLEFmedical_Caption_2026_test_{i:06d}" for i in range(1, 21)]
HEADER = "ID,Caption\n"


def _check(tmp_path: Path, content: str, year: int, name: str = "sub.csv"):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    return check_submission(path, IDS, year)


def _rows(sep: str = ",", captions: dict[int, str] | None = None) -> list[str]:
    captions = captions or {}
    return [f'{i}{sep}"{captions.get(n, f"caption {n}")}"\n' for n, i in enumerate(IDS)]


# --------------------------------------------------------------------------- named once


@pytest.mark.parametrize(("sep", "name"), [("|", "'|' (pipe)"), (";", "';' (semicolon)"), ("\t", "a tab")])
@pytest.mark.parametrize("year", [2023, 2025, 2026])
def test_wrong_separator_is_one_error_naming_it(tmp_path, sep, name, year):
    header = f"ID{sep}Caption\n" if year >= 2025 else ""
    check = _check(tmp_path, header + "".join(_rows(sep)), year)
    (err,) = check.errors  # not one error per row
    assert f"Wrong separator: the columns are separated by {name}" in err.message
    assert err.line == 1 and err.message.endswith("Error occurred at record line 1.")
    assert f"{len(IDS) + bool(header)} of {len(IDS) + bool(header)} rows read as one column" in err.message


def test_comma_file_checked_as_pipe_file_names_the_comma(tmp_path):
    from medcap.eval.imageclef import submission_format

    path = tmp_path / "sub.csv"
    path.write_text("".join(f"{i},a caption\n" for i in IDS), encoding="utf-8")
    (err,) = check_submission(path, IDS, 2024, fmt=submission_format(2024, separator="|")).errors
    assert "separated by ',' (comma)" in err.message


def test_one_row_with_another_separator_gets_a_hint_at_its_line(tmp_path):
    rows = _rows()
    rows[4] = f"{IDS[4]}|caption 4\n"
    check = _check(tmp_path, "".join(rows), 2023)
    assert [e.line for e in check.errors] == [5, 20]  # the row, then the count (IDS[4] is missing)
    assert "Wrong format" in check.errors[0].message and "This row uses '|' (pipe)" in check.errors[0].message


@pytest.mark.parametrize("year", [2023, 2026])
def test_unclosed_quote_is_named_once_at_its_line(tmp_path, year):
    rows = _rows()
    rows[3] = f'{IDS[3]},"caption 3 with no closing quote\n'
    header = HEADER if year == 2026 else ""
    check = _check(tmp_path, header + "".join(rows), year)
    first = 4 + bool(header)
    unclosed = [e for e in check.errors if "Unclosed double quote" in e.message]
    assert len(unclosed) == 1 and unclosed[0].line == first
    assert "not enclosed in double quotes" not in " ".join(e.message for e in check.errors)  # no row-by-row noise
    # what remains is the consequence: the swallowed rows' IDs are missing
    (rest,) = [e for e in check.errors if e not in unclosed]
    assert "Number of image IDs" in rest.message


def test_unclosed_quote_on_the_last_row_is_a_warning(tmp_path):
    # nothing is swallowed: the organisers' readers take the caption to the end of the file and accept it
    content = "".join(_rows()[:-1]) + f'{IDS[-1]},"last caption'
    check = _check(tmp_path, content, 2023)
    assert check.errors == []
    (w,) = check.warnings
    assert "unclosed double quote" in w.message and w.line == len(IDS)


def test_quoted_caption_over_two_lines_is_not_an_unclosed_quote(tmp_path):
    rows = _rows(captions={2: "first line\nsecond line"})
    check = _check(tmp_path, "".join(rows), 2023)
    assert check.errors == []
    (w,) = check.warnings
    assert w.line == 3 and "spanning several lines" in w.message


# --------------------------------------------------------------------------- warnings


def test_warnings_for_empty_multiline_long_and_control_characters(tmp_path):
    captions = {
        1: "",
        2: "   ",
        4: "line one\nline two",
        6: "x" * 100_000,
        8: "bell\x07 and zero\u200bwidth",
        9: "caf\ufffd",
    }
    check = _check(tmp_path, HEADER + "".join(_rows(captions=captions)), 2026, name="submission.csv")
    assert check.errors == [] and check.ok
    by_kind = {w.message.split(": line(s)")[0]: w for w in check.warnings}
    assert by_kind["the 2026 platform takes a zip holding submission.csv, not a bare CSV"].line is None
    empty = by_kind["2 row(s) with an empty caption (legal, but each scores 0)"]
    assert empty.line == 3 and empty.message.endswith("line(s) 3, 4")
    assert by_kind["1 row with a caption spanning several lines (line breaks inside its quotes)"].line == 6
    assert by_kind["1 row with a caption over 1,000 characters (a runaway generation?)"].line == 9
    control = by_kind["1 row with control or invisible characters in the caption (U+0007, U+200B)"]
    assert control.line == 11
    assert "U+FFFD" in by_kind[next(k for k in by_kind if "FFFD" in k)].message
    assert len(check.warnings) == 6


def test_many_empty_captions_are_one_warning(tmp_path):
    check = _check(tmp_path, "".join(f'{i},""\n' for i in IDS), 2023)
    (w,) = check.warnings
    assert w.message.startswith("20 row(s) with an empty caption") and "(+15 more)" in w.message


def test_caption_beyond_the_csv_field_limit_is_an_error_at_its_line(tmp_path):
    rows = _rows(captions={5: "y" * 140_000})
    (err,) = _check(tmp_path, "".join(rows), 2023).errors
    assert err.line == 6 and "field larger than field limit" in err.message and "131,072 characters" in err.message


def test_validate_submission_returns_errors_and_logs_warnings(tmp_path, caplog):
    path = tmp_path / "sub.csv"
    path.write_text("".join(_rows(captions={0: ""})), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert validate_submission(path, IDS, 2023) == []
    assert "empty caption" in caplog.text and f"{path}:1" in caplog.text


# --------------------------------------------------------------------------- writer


def test_writer_cleans_control_characters_and_refuses_unreadable_captions(tmp_path, caplog):
    assert clean_caption("a\tb\x07c\x85d\r\ne\u2028f") == "a b c d e f"
    captions = {i: f"caption {n}" for n, i in enumerate(IDS)}
    captions[IDS[1]] = "z" * 2_000
    with caplog.at_level(logging.WARNING):
        written = write_submission(captions, tmp_path / "run.csv", 2026, order=IDS)
    assert "1 caption(s) over 1000 characters" in caplog.text
    check = check_submission(written, IDS, 2026)
    assert check.errors == [] and [w.line for w in check.warnings] == [3]
    with zipfile.ZipFile(written) as zf:
        assert zf.namelist() == ["submission.csv"]
    captions[IDS[2]] = "z" * 140_000
    with pytest.raises(ValueError, match=rf"131,072 characters.*{IDS[2]}"):
        write_submission(captions, tmp_path / "bad.csv", 2026, order=IDS)


# --------------------------------------------------------------------------- the command line


def test_medcap_validate_names_a_wrong_separator_once_and_prints_warnings(tmp_path):
    from click.testing import CliRunner

    from medcap.cli import main

    testset = tmp_path / "test_captions.csv"
    testset.write_text(HEADER + "".join(f'{i},"reference"\n' for i in IDS), encoding="utf-8")
    bad = tmp_path / "pipes.csv"
    bad.write_text("ID|Caption\n" + "".join(_rows("|")), encoding="utf-8")
    res = CliRunner().invoke(main, ["validate", str(bad), "--testset", str(testset), "--year", "2026"])
    assert res.exit_code == 1
    assert [line for line in res.output.splitlines() if str(bad) in line and "Error occurred" in line] == [
        f"{bad}:1: Wrong separator: the columns are separated by '|' (pipe), but the 2026 rules read ',' (comma), "
        f"so 21 of 21 rows read as one column. Write <imageID>,<caption> rows. Error occurred at record line 1."
    ]
    good = write_submission(
        {i: "" if n == 3 else f"caption {n}" for n, i in enumerate(IDS)}, tmp_path / "s.csv", 2026, order=IDS
    )
    res = CliRunner().invoke(main, ["validate", str(good), "--testset", str(testset), "--year", "2026"])
    assert res.exit_code == 0 and "valid for 2026 (1 warning(s))" in res.output
    warning = next(line for line in res.output.splitlines() if line.startswith("warning: "))
    assert "1 row with an empty caption" in warning and f"{good}!submission.csv:5" in warning
