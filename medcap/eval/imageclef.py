"""The ImageCLEFmedical Caption rules: the organisers' caption preprocessing and each year's submission format.

Both follow the organisers' public evaluator code (GitHub ``taubsity/clef-caption-evaluation``,
2023 and 2025 versions, and ``taubsity/clef-caption-evaluation-2026`` with its
``submission_check.py``). ``medcap.eval.submission`` writes files in these formats and
``medcap.eval.submission_check`` checks them.
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass

_NUMBER = re.compile(r"\d+")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def preprocess(text: str) -> str:
    """The organisers' preprocessing before BERTScore, ROUGE and BLEURT.

    Lowercase, every run of digits becomes ``number``, every ``string.punctuation`` character is
    removed, in that order. Whitespace is left as it is (the organisers do not collapse it), so
    ``"CT, 3 mm-lesion."`` becomes ``"ct number mmlesion"``.
    """
    return _NUMBER.sub("number", text.lower()).translate(_NO_PUNCTUATION)


@dataclass(frozen=True)
class SubmissionFormat:
    """How a caption-prediction submission file of one ImageCLEF year must look."""

    year: int
    separator: str = ","  # column separator (some 2024 teams used "|")
    header: tuple[str, str] | None = None  # header the writer writes and the validator requires; None: none written,
    # and a first row whose ID is "ID" is skipped (the 2023-2024 evaluators skip a header row)
    header_exact: bool = True  # the header must be exactly `header`; False: any first row whose first field is
    # "ID" (any case) is the header (the 2025 evaluator's test)
    quote_commas: bool = False  # a caption containing a comma must be double-quoted (2026 checker rule)
    quote_all: bool = True  # the writer double-quotes every caption (the organisers' README examples do)
    zipped: bool = False  # uploaded as a zip holding `member`
    ordered: bool = False  # rows must follow the ground-truth order
    two_columns: bool = False  # a row with more than two columns is an error (else a warning: the evaluator
    # reads the first two, so the caption is cut at the unquoted separator)
    plain_utf8: bool = False  # a UTF-8 byte-order mark is an error (else only when it spoils the first ID)
    strict: bool = False  # 2026 checker: no blank line anywhere (str.splitlines), the quoting rule on raw lines
    member: str = "submission.csv"  # the CSV's name inside the uploaded zip


_FORMATS: dict[int, SubmissionFormat] = {
    # 2023-2025 evaluators: csv.reader rows `ID,caption`; errors for <2 columns, unknown or repeated IDs and a
    # row count that differs from the test set. 2023 skips a header row if there is one; none is written.
    2023: SubmissionFormat(2023),
    2024: SubmissionFormat(2024),  # no public evaluator; the 2023 format (for "|" files: separator="|")
    # 2025 (evaluator.py since Feb 2025): the first row is the header unless its first field is "ID", and is then
    # neither checked nor counted, so a file without a header fails the count check. Its README adds the
    # platform's rules: a zip holding only submission.csv, two columns ID,Caption, no empty lines, UTF-8.
    2025: SubmissionFormat(
        2025, header=("ID", "Caption"), header_exact=False, zipped=True, two_columns=True, plain_utf8=True
    ),  # fmt: skip
    # 2026 checker (submission_check.py): the strictest
    2026: SubmissionFormat(
        2026,
        header=("ID", "Caption"),
        quote_commas=True,
        zipped=True,
        ordered=True,
        two_columns=True,
        plain_utf8=True,
        strict=True,
    ),  # fmt: skip
}


def known_years() -> list[int]:
    return sorted(_FORMATS)


def submission_format(year: int, separator: str | None = None) -> SubmissionFormat:
    """The submission format of ``year``; ``separator`` overrides the column separator.

    A separator other than ``,`` turns off quoting every caption (the 2022-style ``|`` readers
    keep quotes as part of the caption); captions that contain the separator are still quoted.
    """
    if year not in _FORMATS:
        raise ValueError(f"no submission rules for ImageCLEF year {year}; known years: {known_years()}")
    fmt = _FORMATS[year]
    if separator is not None and separator != fmt.separator:
        if len(separator) != 1 or separator in '"\r\n':
            raise ValueError(
                f"submission separator must be one character other than a quote or newline, got {separator!r}"
            )
        if fmt.strict:
            raise ValueError(f"the {year} rules fix the separator to {fmt.separator!r}")
        fmt = dataclasses.replace(fmt, separator=separator, quote_all=False)
    return fmt
