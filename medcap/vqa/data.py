"""VQA data sets in, :class:`Question` records out, with every input problem named by file and line.

Three layouts (``data.format``):

- ``vqa-rad``: the OSF release, ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``. Rows whose
  ``phrase_type`` is ``freeform``/``para`` are split ``train``; ``test_freeform``/``test_para`` are ``test``.
- ``slake``: ``train.json``, ``validate.json``, ``test.json`` (split = file stem) and ``imgs/xmlabN/source.jpg``;
  English rows only (``q_lang == "en"``).
- ``manifest``: a CSV or JSONL file (``data.root``) with ``image, question, answer, answer_type`` and optional
  ``qid, split, content_type, question_type``; images relative to the manifest's folder.

A split named ``A+B`` is the union of A and B. Questions are validated before any model loads (missing
image, empty question, unknown answer type, repeated question ID, empty answer in a split that has answers);
every problem is reported at once with its file and 1-based line (JSON: the line where the row's object
starts). The pipeline's image-level split (:func:`load_image_split`) holds one ``Example`` per image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.data.problems import InputError, Problem
from medcap.records import Example

if TYPE_CHECKING:
    from medcap.config import DataConfig
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

FORMATS = ("vqa-rad", "slake", "manifest")
ANSWER_TYPES = ("CLOSED", "OPEN")
VQARAD_JSON = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"
VQARAD_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}
SLAKE_SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class Question:
    """One question about one image; ``answer`` is None where the split ships without answers."""

    qid: str
    image_id: str
    image: Path
    question: str
    answer: str | None
    answer_type: str  # CLOSED | OPEN
    content_type: str = ""  # SLAKE content_type / VQA-RAD question_type: the per-type breakdowns
    organ: str = ""  # VQA-RAD image_organ / SLAKE location
    where: str = ""  # file:line, for messages
    raw_qid: Any = None  # the qid as the file holds it (SLAKE: a number), written back in submissions


@dataclass
class QuestionSplit:
    name: str
    questions: list[Question]

    @property
    def image_ids(self) -> list[str]:
        return list(dict.fromkeys(q.image_id for q in self.questions))


# --------------------------------------------------------------------------- raw rows


def _json_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Problem]]:
    """The objects of a JSON list with the line where each starts (for messages)."""
    if not path.is_file():
        return [], [Problem(str(path), None, "no such file")]
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [Problem(str(path), e.lineno, f"not valid JSON: {e.msg}")]
    if not isinstance(data, list):
        return [], [Problem(str(path), 1, "expected a JSON list of question objects")]
    lines: list[int | None] = []
    depth, line = 0, 1  # the line of each top-level object: brackets counted outside strings
    in_str = esc = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            if ch == "{" and depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "}]":
            depth -= 1
    if len(lines) != len(data):
        lines = [None] * len(data)  # unusual layout: report rows by index instead
    return list(zip(lines, data, strict=True)), []


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _vqarad(root: Path) -> tuple[list[tuple[str, int | None, dict[str, Any]]], list[Problem], Path]:
    path = root / VQARAD_JSON
    rows, problems = _json_rows(path)
    out = []
    for line, r in rows:
        phrase = _text(r.get("phrase_type")).lower()
        split = VQARAD_SPLITS.get(phrase) or ("test" if phrase.startswith("test") else "train" if phrase else None)
        if split is None:
            problems.append(Problem(str(path), line, "no phrase_type (freeform, para, test_freeform or test_para)"))
            continue
        name = _text(r.get("image_name"))
        rec = {
            "qid": _text(r.get("qid")),
            "raw_qid": r.get("qid"),
            "image": name,
            "question": _text(r.get("question")),
            "answer": r.get("answer"),
            "answer_type": r.get("answer_type"),
            "content_type": _text(r.get("question_type")),
            "organ": _text(r.get("image_organ")),
        }
        out.append((split, line, rec))
    return out, problems, root / VQARAD_IMAGES


def _slake(root: Path, split: str) -> tuple[list[tuple[str, int | None, dict[str, Any]]], list[Problem], Path]:
    path = root / f"{split}.json"
    rows, problems = _json_rows(path)
    out = []
    for line, r in rows:
        if _text(r.get("q_lang", "en")).lower() != "en":
            continue
        rec = {
            "qid": _text(r.get("qid")),
            "raw_qid": r.get("qid"),
            "image": _text(r.get("img_name")),
            "question": _text(r.get("question")),
            "answer": r.get("answer"),
            "answer_type": r.get("answer_type"),
            "content_type": _text(r.get("content_type")),
            "organ": _text(r.get("location")),
        }
        out.append((split, line, rec))
    return out, problems, root / "imgs"


def _manifest(root: Path) -> tuple[list[tuple[str, int | None, dict[str, Any]]], list[Problem], Path]:
    from medcap.data.tables import read_csv_table, read_jsonl_table

    required = ("image", "question", "answer_type")
    optional = ("answer", "qid", "split", "content_type", "question_type", "organ")
    read = read_jsonl_table if root.suffix == ".jsonl" else read_csv_table
    table = read(root, required, optional)
    out = []
    for line, r in table.rows:
        rec = dict(r)
        rec["content_type"] = _text(r.get("content_type") or r.get("question_type"))
        rec["qid"] = _text(r.get("qid")) or str(line)
        out.append((_text(r.get("split")) or "train", line, rec))
    return out, table.fatal + table.problems, root.parent


def _raw(cfg: DataConfig, split: str) -> tuple[list[tuple[str, int | None, dict[str, Any]]], list[Problem], Path, Path]:
    root = Path(cfg.root)
    if cfg.format == "vqa-rad":
        rows, problems, images = _vqarad(root)
        return rows, problems, images, root / VQARAD_JSON
    if cfg.format == "slake":
        rows, problems, images = _slake(root, split)
        return rows, problems, images, root / f"{split}.json"
    if cfg.format == "manifest":
        rows, problems, images = _manifest(root)
        return rows, problems, images, root
    raise ValueError(f"data.format {cfg.format!r} is not a VQA format; use one of {list(FORMATS)}")


def list_vqa_splits(cfg: DataConfig) -> list[str]:
    """The splits the data set holds (train first, test last)."""
    root = Path(cfg.root)
    if cfg.format == "slake":
        return [s for s in SLAKE_SPLITS if (root / f"{s}.json").is_file()]
    rows, _, _, _ = _raw(cfg, "train")
    found = {s for s, _, _ in rows}
    return sorted(found, key=lambda s: (s == "test", s))


# --------------------------------------------------------------------------- validation


def _check(rec: dict[str, Any], images: Path, where: Problem, needs_answer: bool) -> list[str]:
    errs = []
    if not rec["question"]:
        errs.append("empty question")
    atype = _text(rec.get("answer_type")).upper()
    if atype not in ANSWER_TYPES:
        errs.append(f"unknown answer_type {rec.get('answer_type')!r} (expected CLOSED or OPEN)")
    if needs_answer and not _text(rec.get("answer")):
        errs.append("empty answer")
    if not rec["image"]:
        errs.append("no image named")
    elif not (images / rec["image"]).is_file():
        errs.append(f"image {rec['image']!r} not found in {images}")
    return errs


def image_id(name: str) -> str:
    """``synpic1234.jpg`` -> ``synpic1234``; SLAKE's ``xmlab7/source.jpg`` -> ``xmlab7``."""
    p = Path(name)
    return p.parent.name if p.stem == "source" and p.parent.name else p.stem


def load_questions(cfg: DataConfig, split: str, training: bool | None = None) -> QuestionSplit:
    """Read one split (``A+B``: a union); raise an InputError listing every problem. ``training`` (default: the
    split is part of ``cfg.index_split``): every question needs an answer; else one without is answered, not scored."""
    if training is None:
        training = set(split.split("+")) <= set(cfg.index_split.split("+"))
    if "+" in split:
        parts = [load_questions(cfg, s, training) for s in split.split("+")]
        seen: dict[str, str] = {}
        problems = []
        for part in parts:
            for q in part.questions:
                if q.qid in seen:
                    problems.append(Problem(q.where, None, f"question ID {q.qid!r} is also in split {seen[q.qid]!r}"))
                seen.setdefault(q.qid, part.name)
        if problems:
            raise InputError(problems, f"split {split!r}: the splits it joins repeat question IDs")
        return QuestionSplit(split, [q for p in parts for q in p.questions])
    rows, problems, images, path = _raw(cfg, split)
    fatal = [p for p in problems if p.line is None or "JSON" in p.message]
    if fatal:
        raise InputError(problems, f"{len(problems)} problem(s) in split {split!r} of {cfg.root}")
    mine = [(line, rec) for s, line, rec in rows if s == split]
    if not mine:
        have = sorted({s for s, _, _ in rows}) if cfg.format != "slake" else list_vqa_splits(cfg)
        raise InputError(
            [Problem(str(path), None, f"no questions of split {split!r}")],
            f"split {split!r} is not in {cfg.root} (splits: {have})",
        )
    needs_answer = training
    out, seen = [], {}
    for line, rec in mine:
        where = f"{path}:{line}" if line is not None else str(path)
        errs = _check(rec, images, Problem(str(path), line, ""), needs_answer)
        if rec["qid"] in seen:
            errs.append(f"question ID {rec['qid']!r} repeats the one at line {seen[rec['qid']]}")
        seen.setdefault(rec["qid"], line)
        if errs:
            problems += [Problem(str(path), line, e) for e in errs]
            continue
        answer = _text(rec.get("answer")) or None
        out.append(
            Question(
                rec["qid"],
                image_id(rec["image"]),
                images / rec["image"],
                rec["question"],
                answer,
                _text(rec["answer_type"]).upper(),
                rec.get("content_type") or "",
                rec.get("organ") or "",
                where,
                rec.get("raw_qid", rec["qid"]),
            )
        )
    if problems and cfg.on_error != "skip":
        raise InputError(problems, f"{len(problems)} problem(s) in split {split!r} of {cfg.root}")
    if problems:
        log.warning("split %s: skipped %d bad question(s), e.g. %s", split, len(problems), problems[0])
    if cfg.limit is not None:
        keep = set(list(dict.fromkeys(q.image_id for q in out))[: cfg.limit])
        out = [q for q in out if q.image_id in keep]
    return QuestionSplit(split, out)


def load_image_split(cfg: DataConfig, split: str) -> Any:
    """The pipeline's view of a VQA split: one ``Example`` per image (no caption), grouped by image."""
    from medcap.data import SplitData

    qs = load_questions(cfg, split)
    first: dict[str, Question] = {}
    for q in qs.questions:
        first.setdefault(q.image_id, q)
    return SplitData(split, [Example(i, q.image, None, (), i) for i, q in first.items()])


def split_questions(pipe: Pipeline, split: str) -> QuestionSplit:
    """The questions of any split of a run: a data set split, a union, or a derived one (a CV fold: the questions
    of its parents about its images)."""

    def build() -> QuestionSplit:
        parents = pipe.parents(split)
        if split in pipe.derived:
            images = {ex.id for ex in pipe.split(split).examples}
            qs = [q for p in parents for q in split_questions(pipe, p).questions if q.image_id in images]
            return QuestionSplit(split, qs)
        return load_questions(pipe.cfg.data, split)

    return pipe.resource(("vqa-questions", split, tuple(pipe.derived.get(split, ((), ()))[1])), build)


def questions_key(pipe: Pipeline, split: str) -> str:
    """Fingerprint of a split's questions (IDs, texts, answers, types) and its images."""
    from medcap.config import config_hash

    rows = [(q.qid, q.image_id, q.question, q.answer, q.answer_type) for q in split_questions(pipe, split).questions]
    return config_hash("vqa-questions", rows, pipe.data_key(split))


def check_vqa(cfg: DataConfig, splits: list[str] | None = None) -> tuple[list[Problem], dict[str, int]]:
    """``medcap data check --format vqa-rad|slake|vqa-manifest``: every problem of every split (each split read as
    training data except ``test``), and the questions each split holds."""
    problems, counts = [], {}
    for split in splits or list_vqa_splits(cfg):
        try:
            counts[split] = len(load_questions(cfg, split, training=split != "test").questions)
        except InputError as e:
            problems += e.problems
    return problems, counts
