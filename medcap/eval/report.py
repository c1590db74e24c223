"""The static HTML report of a run: one self-contained file to read a run image by image.

``write_report`` reads the run directory (``report_run.read_run``: every caption set of the run in
pipeline order, neighbours, scores, ``ablation.md`` and ``ablation.png``) and the images named by
the run's ``config.yaml``, and writes ``report.html``: thumbnails as base64 JPEG data URIs, every
text escaped, a filter box and a sort menu in a few lines of inline JavaScript, no external file,
script or font. See docs/report.md.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

from medcap.eval.report_run import CaptionSet, RunView, read_run
from medcap.files import write_atomic
from medcap.records import Example
from medcap.runs import RunDir

log = logging.getLogger(__name__)

QUERY_SIDE = 256  # max side of a query thumbnail, pixels
NEIGHBOUR_SIDE = 96
LOWER_IS_BETTER = frozenset({"median_rank", "own_rank"})  # ranks of the own reference: 1 is best
COUNTS = frozenset({"distinct"})  # not better or worse: no bold
SHOWN_NEIGHBOURS = 5  # a card shows the nearest few; a caption-space fuser may weigh 200


def write_report(
    run_dir: Path, out: Path | None = None, *, split: str | None = None, max_images: int | None = None
) -> Path:
    """Write the run's HTML report (default ``run_dir/report.html``) for ``split`` and return its path.

    ``split`` defaults to the first query split of the config that has artifacts; ``max_images``
    keeps the first N images of the split (the report embeds ~10 KB of thumbnails per image).
    """
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no such run directory")
    view = read_run(run, split)
    shown = len(view.ids) if max_images is None else min(max_images, len(view.ids))
    out = Path(out) if out is not None else run.root / "report.html"
    write_atomic(out, render_report(view, run.root, max_images=max_images))
    log.info("report: %s (%d images, %.1f MB)", out, shown, out.stat().st_size / 1e6)
    return out


def render_report(view: RunView, root: Path, *, max_images: int | None = None) -> str:
    """The HTML page of ``view``; ``root`` is the run directory holding ``ablation.md``/``ablation.png``."""
    from jinja2 import Environment, StrictUndefined
    from markupsafe import Markup

    from medcap.eval.report_template import TEMPLATE

    shown = view.ids if max_images is None else view.ids[:max_images]
    if len(shown) > 2000:
        log.warning("report: %d images make a large page; pass max_images to show fewer", len(shown))
    per_image = {s["caption_set"]: s.get("per_image", {}) for s in view.scores if s.get("split") == view.split}
    sources = [(cs, per_image.get(cs.name, {})) for cs in view.caption_sets]
    metrics = list(dict.fromkeys(m for _, sc in sources for row in sc.values() for m in row))
    sort_keys = [
        {"key": f"s{i}", "label": f"{cs.name} · {m}", "source": j, "metric": m}
        for i, (j, cs, m) in enumerate(
            (j, cs, m) for j, (cs, sc) in enumerate(sources) for m in metrics if any(m in r for r in sc.values())
        )
    ]
    thumbs = _Thumbs()
    cards = [_card(view, image_id, sources, metrics, sort_keys, thumbs) for image_id in shown]
    ablation_md = _first(root, ("ablation.md", "ablation/ablation.md"))
    ablation_png = _first(root, ("ablation.png", "ablation/ablation.png"))
    corpus_metrics, corpus_rows = _corpus(view)

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=False)
    return env.from_string(TEMPLATE).render(
        run_name=view.name,
        split=view.split,
        shown=len(shown),
        total=len(view.ids),
        summary=view.summary,
        caption_sets=[_set_summary(cs) for cs in view.caption_sets],
        submitted=view.submitted.name if view.submitted else None,
        similarity_tip=_similarity_tip(view.encoder),
        ablation_html=Markup(markdown_html(ablation_md.read_text())) if ablation_md else None,
        ablation_png=_data_uri(ablation_png.read_bytes(), "image/png") if ablation_png else None,
        corpus_metrics=corpus_metrics,
        corpus_rows=corpus_rows,
        sort_keys=sort_keys,
        metrics=metrics,
        cards=cards,
    )


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


# --------------------------------------------------------------------------- rendering


class _Thumbs:
    """Thumbnails made once each: a neighbour recurs across many queries."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, int], str | None] = {}

    def __call__(self, ex: Example | None, side: int) -> str | None:
        if ex is None:
            return None
        if (ex.id, side) not in self._done:
            self._done[ex.id, side] = _thumb(ex, side)
        return self._done[ex.id, side]


def _set_summary(cs: CaptionSet) -> dict[str, Any]:
    return {"name": cs.name, "kind": cs.kind, "path": str(cs.path), "exists": cs.exists,
            "submitted": cs.submitted, "fallback": len(cs.fallback)}  # fmt: skip


def _similarity_tip(encoder: str | None) -> str:
    by = f" ({encoder})" if encoder else ""
    return f"cosine similarity between the embeddings{by} of this training image and the query image; 1 = identical"


def _concepts(ids, names: dict[str, str]) -> list[dict[str, str]]:
    return [{"id": str(c), "name": names.get(str(c), "")} for c in ids or ()]


def _card(view: RunView, image_id: str, sources, metrics: list[str], sort_keys, thumbs: _Thumbs) -> dict[str, Any]:
    ex = view.examples.get(image_id)
    captions = []
    for cs, scores in sources:
        row = scores.get(image_id, {})
        state = "ok" if image_id in cs.captions else "no-file" if not cs.exists else "no-row"
        captions.append(
            {
                "name": cs.name,
                "kind": cs.kind,
                "path": str(cs.path),
                "state": state,
                "caption": cs.captions.get(image_id),
                "fallback": image_id in cs.fallback,
                "submitted": cs.submitted,
                "values": row,
                "scores": {m: _fmt(row.get(m), whole=m in COUNTS | LOWER_IS_BETTER) for m in metrics},
            }
        )
    for m in metrics:  # bold the best caption of this image on each metric
        vals = [r["values"].get(m) for r in captions]
        top = (min if m in LOWER_IS_BETTER else max)((v for v in vals if _num(v)), default=None)
        for r, v in zip(captions, vals, strict=True):
            r.setdefault("best", {})[m] = top is not None and _num(v) and v == top and len(captions) > 1
    sort = {}
    for k in sort_keys:
        v = captions[k["source"]]["values"].get(k["metric"])
        sort[k["key"]] = f"{v:.6g}" if _num(v) else ""
    return {
        "id": image_id,
        "image": thumbs(ex, QUERY_SIDE),
        "reference": ex.caption if ex is not None else None,
        "concepts": _concepts(ex.concepts if ex is not None else (), view.cui_names),
        "captions": captions,
        "sort": sort,
        "neighbours": [
            {
                "id": n.get("id", ""),
                "cos": f"{n['score']:.2f}" if _num(n.get("score")) else "",
                "caption": n.get("caption") or "",
                "concepts": _concepts(n.get("concepts"), view.cui_names),
                "image": thumbs(view.index_examples.get(n.get("id")), NEIGHBOUR_SIDE),
            }
            for n in view.neighbours.get(image_id, [])[:SHOWN_NEIGHBOURS]
        ],
        "more_neighbours": max(0, len(view.neighbours.get(image_id, [])) - SHOWN_NEIGHBOURS),
        "neighbours_file": f"neighbours/{view.split}.jsonl",
    }


def _corpus(view: RunView) -> tuple[list[str], list[dict[str, Any]]]:
    """Corpus scores: by split, caption sets in pipeline order; the best per split and metric in bold."""
    scores = view.scores
    order = {cs.name: i for i, cs in enumerate(view.caption_sets)}
    submitted = view.submitted.name if view.submitted else None
    metrics = list(dict.fromkeys(m for s in scores for m in s.get("metrics", {})))
    rows = sorted(
        scores, key=lambda s: (s.get("split", ""), order.get(s.get("caption_set"), len(order)), s["caption_set"])
    )
    out = []
    for s in rows:
        vals = s.get("metrics", {})
        best = {}
        for m in metrics:
            same = [o.get("metrics", {}).get(m) for o in rows if o.get("split") == s.get("split")]
            pick = min if m in LOWER_IS_BETTER else max
            top = pick((v for v in same if _num(v)), default=None)
            best[m] = m not in COUNTS and top is not None and _num(vals.get(m)) and vals[m] == top and len(same) > 1
        out.append(
            {
                "caption_set": s["caption_set"],
                "split": s["split"],
                "submitted": s["caption_set"] == submitted,
                "n": s.get("n", ""),
                "metrics": {m: _fmt(vals.get(m), whole=m in COUNTS | LOWER_IS_BETTER) for m in metrics},
                "best": best,
            }
        )
    return metrics, out


def _thumb(ex: Example | None, side: int) -> str | None:
    """A JPEG data URI of the example's image, at most ``side`` pixels on its long side, or None."""
    if ex is None or ex.image is None:
        return None
    from medcap.data import load_image

    try:
        im = load_image(ex)
    except Exception as e:  # a missing image is shown as such; the rest of the report stands
        log.warning("report: no thumbnail for %s (%s)", ex.id, e)
        return None
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82, optimize=True)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _fmt(v: Any, whole: bool = False) -> str:
    if not _num(v):
        return ""
    return f"{v:g}" if whole else f"{v:.4f}"


# --------------------------------------------------------------------------- Markdown


def markdown_html(text: str) -> str:
    """The Markdown that ``write_ablation_md`` writes (headings, paragraphs, lists, pipe tables,
    ``**bold**`` and ``code``) as escaped HTML; anything else is shown as a paragraph."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 2, 6)  # under the page h1 and the section h2
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            out.append(_table(block))
        elif line.startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"[#|]|[-*] ", lines[i].strip()):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|") for c in cells]


def _table(block: list[str]) -> str:
    rows = [_cells(line) for line in block]
    sep = len(rows) > 1 and all(re.fullmatch(r":?-{1,}:?", c) for c in rows[1])
    aligns = ["num" if c.endswith(":") else "" for c in rows[1]] if sep else []
    head, body = (rows[0], rows[2:]) if sep else ([], rows)

    def cell(tag: str, j: int, text: str) -> str:
        cls = f' class="{aligns[j]}"' if j < len(aligns) and aligns[j] else ""
        return f"<{tag}{cls}>{_number_cell(text) if tag == 'td' else _inline(text)}</{tag}>"

    parts = ["<table>"]
    if head:
        parts.append("<thead><tr>" + "".join(cell("th", j, c) for j, c in enumerate(head)) + "</tr></thead>")
    parts.append("<tbody>")
    parts += ["<tr>" + "".join(cell("td", j, c) for j, c in enumerate(r)) + "</tr>" for r in body]
    parts.append("</tbody></table>")
    return "".join(parts)


_WITH_CI = re.compile(r"(\*\*)?([+-]?\d+(?:\.\d+)?) (\[[+-]?\d[^\]]*\])(\*\*)?")


def _number_cell(text: str) -> str:
    """``0.4123 [0.38, 0.44]`` as the number over its interval in small type, so wide tables fit the page."""
    m = _WITH_CI.fullmatch(text)
    if m is None:
        return _inline(text)
    inner = f'{_inline(m.group(2))}<br /><span class="ci">{_inline(m.group(3))}</span>'
    return f"<b>{inner}</b>" if m.group(1) and m.group(4) else inner


def _inline(text: str) -> str:
    text = html.escape(text, quote=True)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
