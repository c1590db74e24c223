"""``medcap report`` for a VQA run: a self-contained HTML page, one card per image with its questions, every
answer set's answer (right ones marked) and the reference, under the scores table."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from medcap.files import read_jsonl, write_atomic

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em}.card{display:flex;gap:1em;border:1px solid #ddd;
border-radius:6px;padding:.75em;margin:.75em 0}.card img{width:192px;height:auto;border-radius:4px}
.ok{color:#176b2c;font-weight:600}.no{color:#a11}.ref{background:#f4f4f4}"""


def write_vqa_report(pipe: Any, out: Path | None, split: str | None = None, max_images: int | None = None) -> Path:
    from medcap.eval.report import _thumb
    from medcap.records import Example
    from medcap.vqa.data import split_questions
    from medcap.vqa.normalize import normalize
    from medcap.vqa.show import current_scores, score_table
    from medcap.vqa.stages import answer_need, answer_sets

    names = answer_sets(pipe)
    splits = [split] if split else pipe.cfg.data.query_splits
    split = next((s for s in splits if any(pipe.path(*answer_need(pipe, n, s)).is_file() for n in names)), splits[0])
    answers = {}
    for n in names:
        path = pipe.path(*answer_need(pipe, n, split))
        answers[n] = {r["id"]: r["answer"] for r in read_jsonl(path)} if path.is_file() else {}
    by_image: dict[str, list] = {}
    for q in split_questions(pipe, split).questions:
        by_image.setdefault(q.image_id, []).append(q)
    scores = [r for r in current_scores(pipe) if r["split"] == split]
    parts = [f"<h1>{html.escape(pipe.cfg.name)}: visual question answering, split {html.escape(split)}</h1>"]
    if scores:
        parts.append(f"<pre>{html.escape(score_table(scores))}</pre>")
    for image_id, qs in list(by_image.items())[:max_images]:
        thumb = _thumb(Example(image_id, qs[0].image), 256)
        rows = ["<tr><th>question</th><th>type</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
                + "<th class=ref>reference</th></tr>"]  # fmt: skip
        for q in qs:
            cells = []
            for n in names:
                a = answers[n].get(q.qid, "")
                cls = "" if q.answer is None else ("ok" if normalize(a) == normalize(q.answer) else "no")
                cells.append(f"<td class={cls}>{html.escape(a)}</td>")
            rows.append(
                f"<tr><td>{html.escape(q.question)}</td><td>{q.answer_type.lower()} {html.escape(q.content_type)}</td>"
                + "".join(cells) + f"<td class=ref>{html.escape(q.answer or '')}</td></tr>"
            )  # fmt: skip
        img = f"<img src='{thumb}' alt='{html.escape(image_id)}'>" if thumb else ""
        parts.append(
            f"<div class=card>{img}<div><b>{html.escape(image_id)}</b><table>{''.join(rows)}</table></div></div>"
        )
    page = f"<!doctype html><meta charset=utf-8><title>{html.escape(pipe.cfg.name)}</title><style>{STYLE}</style>"
    out = out or pipe.run.root / "report.html"
    write_atomic(out, page + "\n".join(parts))
    return out
