"""The static HTML report of a run: one self-contained file to read a run image by image.

``write_report`` reads the run directory (neighbours, candidates of every generator, synthesis and
fused captions when present, per-image and corpus scores, ``ablation.md`` and ``ablation.png``)
and the images named by the run's ``config.yaml``, and writes ``report.html``: thumbnails as
base64 JPEG data URIs, every text escaped, a filter box and a sort menu in a few lines of inline
JavaScript, no external file, script or font. See docs/report.md.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medcap.records import Example
from medcap.runs import RunDir, read_json, read_jsonl, write_atomic

log = logging.getLogger(__name__)

QUERY_SIDE = 256  # max side of a query thumbnail, pixels
NEIGHBOUR_SIDE = 96
STAGE_OUTPUTS = ("synthesis", "fused")  # later stages: run_dir/STAGE/SPLIT.jsonl, rows like candidates


@dataclass
class CaptionSet:
    """One set of captions for the split: a generator's candidates, the synthesis or the fused captions."""

    label: str
    kind: str  # candidate | synthesis | fused
    captions: dict[str, str]
    aliases: tuple[str, ...] = ()  # other names its scores file may use


@dataclass
class RunView:
    """What the report shows of one split of a run, read from the run directory."""

    name: str
    split: str
    ids: list[str]
    examples: dict[str, Example] = field(default_factory=dict)
    index_examples: dict[str, Example] = field(default_factory=dict)
    neighbours: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    caption_sets: list[CaptionSet] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # every scores/*.json of the run
    summary: list[str] = field(default_factory=list)
    thumbs: dict[tuple[str, int], str | None] = field(default_factory=dict)  # a neighbour recurs across queries

    def thumb(self, ex: Example | None, side: int) -> str | None:
        if ex is None:
            return None
        if (ex.id, side) not in self.thumbs:
            self.thumbs[ex.id, side] = _thumb(ex, side)
        return self.thumbs[ex.id, side]


def write_report(
    run_dir: Path, out: Path | None = None, *, split: str | None = None, max_images: int | None = None
) -> Path:
    """Write the run's HTML report (default ``run_dir/report.html``) for ``split`` and return its path.

    ``split`` defaults to the first query split of the config that has artifacts; ``max_images``
    keeps the first N images of the split (the report embeds ~10 KB of thumbnails per image).
    """
    from markupsafe import Markup

    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no such run directory")
    view = read_run(run, split)
    shown = view.ids if max_images is None else view.ids[:max_images]
    if len(shown) > 2000:
        log.warning("report: %d images make a large page; pass max_images to show fewer", len(shown))
    per_image = {s["caption_set"]: s.get("per_image", {}) for s in view.scores if s.get("split") == view.split}
    sources = [(cs, _scores_for(cs, per_image)) for cs in view.caption_sets]
    metrics = list(dict.fromkeys(m for _, sc in sources for row in sc.values() for m in row))
    sort_keys = [
        {"key": f"s{i}", "label": f"{cs.label} · {m}", "source": j, "metric": m}
        for i, (j, cs, m) in enumerate(
            (j, cs, m) for j, (cs, sc) in enumerate(sources) for m in metrics if any(m in r for r in sc.values())
        )
    ]
    cards = [_card(view, image_id, sources, metrics, sort_keys) for image_id in shown]
    ablation_md = _first(run.root, ("ablation.md", "ablation/ablation.md"))
    ablation_png = _first(run.root, ("ablation.png", "ablation/ablation.png"))
    corpus_metrics, corpus_rows = _corpus(view.scores)

    from jinja2 import Environment, StrictUndefined

    from medcap.eval.report_template import TEMPLATE

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=False)
    page = env.from_string(TEMPLATE).render(
        run_name=view.name,
        split=view.split,
        shown=len(shown),
        total=len(view.ids),
        summary=view.summary,
        ablation_html=Markup(markdown_html(ablation_md.read_text())) if ablation_md else None,
        ablation_png=_data_uri(ablation_png.read_bytes(), "image/png") if ablation_png else None,
        corpus_metrics=corpus_metrics,
        corpus_rows=corpus_rows,
        sort_keys=sort_keys,
        metrics=metrics,
        cards=cards,
    )
    out = Path(out) if out is not None else run.root / "report.html"
    write_atomic(out, page)
    log.info("report: %s (%d images, %.1f MB)", out, len(shown), out.stat().st_size / 1e6)
    return out


# --------------------------------------------------------------------------- reading the run


def read_run(run: RunDir, split: str | None = None) -> RunView:
    """Read one split of a run; without a usable config or data the report has no images or references."""
    cfg = _config(run)
    split = split or _default_split(run, cfg)
    view = RunView(name=run.root.name, split=split, ids=[])
    if cfg is not None:
        view.name = cfg.name
        view.summary = [f"encoder {cfg.retrieval.encoder.name}", f"k={cfg.retrieval.k}"]
        view.examples = _examples(cfg, split)
    view.neighbours = {r["id"]: r.get("neighbours", []) for r in read_jsonl(run.neighbours(split))}
    if cfg is not None and view.neighbours:
        view.index_examples = _examples(cfg, cfg.data.index_split)
    view.caption_sets = _caption_sets(run, split)
    view.scores = _all_scores(run)
    ids = list(view.examples)
    for source in (view.neighbours, *(cs.captions for cs in view.caption_sets)):
        ids += [i for i in source if i not in view.examples]
    view.ids = list(dict.fromkeys(ids))
    if not view.ids:
        log.warning("report: split %r of %s has no images, neighbours or captions", split, run.root)
    return view


def _config(run: RunDir):
    from medcap.config import load_config

    if not run.config().exists():
        log.warning("report: %s is missing; the report has no images or references", run.config())
        return None
    try:
        return load_config(run.config())
    except Exception as e:  # a config of another medcap version: still report what the files hold
        log.warning("report: cannot read %s (%s); the report has no images or references", run.config(), e)
        return None


def _default_split(run: RunDir, cfg) -> str:
    """The first query split of the config that has artifacts, else the first split that has any."""
    patterns = ("neighbours/*.jsonl", "candidates/*/*.jsonl", *(f"{s}/*.jsonl" for s in STAGE_OUTPUTS))
    found = sorted({p.stem for pattern in patterns for p in run.root.glob(pattern)})
    preferred = list(cfg.data.query_splits) if cfg is not None else []
    for split in preferred + found:
        if split in found:
            return split
    if preferred:
        return preferred[0]
    raise FileNotFoundError(f"{run.root}: no neighbours or candidates to report, and no config.yaml to name a split")


def _examples(cfg, split: str) -> dict[str, Example]:
    """The split's examples by ID, or {} (with a warning) when the data cannot be read."""
    from medcap.data import load_split

    data_cfg = replace(cfg.data, verify_images=False, on_error="skip")  # the report only needs paths
    try:
        return {ex.id: ex for ex in load_split(data_cfg, split).examples}
    except Exception as e:  # data moved or deleted since the run: the report still shows the captions
        log.warning("report: cannot read split %r of %s (%s); shown without images", split, cfg.data.root, e)
        return {}


def _caption_sets(run: RunDir, split: str) -> list[CaptionSet]:
    sets = []
    for path in sorted((run.root / "candidates").glob(f"*/{split}.jsonl")):
        rows = read_jsonl(path)
        label = next((r["generator"] for r in rows if r.get("generator")), path.parent.name)
        sets.append(CaptionSet(label, "candidate", {r["id"]: r.get("caption") for r in rows}, (path.parent.name,)))
    for stage in STAGE_OUTPUTS:
        path = run.root / stage / f"{split}.jsonl"
        if path.exists():
            rows = read_jsonl(path)
            gen = next((r["generator"] for r in rows if r.get("generator")), stage)
            sets.append(CaptionSet(stage, stage, {r["id"]: r.get("caption") for r in rows}, (gen,)))
    return sets


def _all_scores(run: RunDir) -> list[dict[str, Any]]:
    scores = []
    for path in sorted((run.root / "scores").glob("*.json")):
        if path.name.endswith(".manifest.json"):
            continue
        try:
            s = read_json(path)
            s.setdefault("caption_set", s.get("variant", path.name.split(".")[0]))
            s.setdefault("split", path.name.split(".")[-2] if path.name.count(".") >= 2 else "")
            scores.append(s)
        except (json.JSONDecodeError, OSError) as e:
            log.warning("report: skipping unreadable %s (%s)", path, e)
    return scores


def _scores_for(cs: CaptionSet, per_image: dict[str, dict]) -> dict[str, dict[str, float]]:
    for name in (cs.label, *cs.aliases):
        if name in per_image:
            return per_image[name]
    return {}


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


# --------------------------------------------------------------------------- rendering


def _card(view: RunView, image_id: str, sources, metrics: list[str], sort_keys) -> dict[str, Any]:
    ex = view.examples.get(image_id)
    captions = []
    for cs, scores in sources:
        row = scores.get(image_id, {})
        captions.append(
            {
                "label": cs.label,
                "kind": cs.kind,
                "caption": cs.captions.get(image_id),
                "values": row,
                "scores": {m: _fmt(row.get(m)) for m in metrics},
            }
        )
    for m in metrics:  # bold the best caption of this image on each metric
        vals = [r["values"].get(m) for r in captions]
        top = max((v for v in vals if _num(v)), default=None)
        for r, v in zip(captions, vals, strict=True):
            r.setdefault("best", {})[m] = top is not None and _num(v) and v == top and len(captions) > 1
    sort = {}
    for k in sort_keys:
        v = captions[k["source"]]["values"].get(k["metric"])
        sort[k["key"]] = f"{v:.6g}" if _num(v) else ""
    return {
        "id": image_id,
        "image": view.thumb(ex, QUERY_SIDE),
        "reference": ex.caption if ex is not None else None,
        "concepts": ", ".join(ex.concepts) if ex is not None else "",
        "captions": captions,
        "sort": sort,
        "neighbours": [
            {
                "id": n.get("id", ""),
                "score": _fmt(n.get("score")),
                "caption": n.get("caption") or "",
                "image": view.thumb(view.index_examples.get(n.get("id")), NEIGHBOUR_SIDE),
            }
            for n in view.neighbours.get(image_id, [])
        ],
    }


def _corpus(scores: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    metrics = list(dict.fromkeys(m for s in scores for m in s.get("metrics", {})))
    rows = sorted(scores, key=lambda s: (s.get("split", ""), s.get("caption_set", "")))
    out = []
    for s in rows:
        vals = s.get("metrics", {})
        best = {}
        for m in metrics:
            same = [o.get("metrics", {}).get(m) for o in rows if o.get("split") == s.get("split")]
            top = max((v for v in same if _num(v)), default=None)
            best[m] = top is not None and _num(vals.get(m)) and vals[m] == top and len(same) > 1
        out.append(
            {
                "variant": s["caption_set"],
                "split": s["split"],
                "n": s.get("n", ""),
                "metrics": {m: _fmt(vals.get(m)) for m in metrics},
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


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if _num(v) else ""


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
        return f"<{tag}{cls}>{_inline(text)}</{tag}>"

    parts = ["<table>"]
    if head:
        parts.append("<thead><tr>" + "".join(cell("th", j, c) for j, c in enumerate(head)) + "</tr></thead>")
    parts.append("<tbody>")
    parts += ["<tr>" + "".join(cell("td", j, c) for j, c in enumerate(r)) + "</tr>" for r in body]
    parts.append("</tbody></table>")
    return "".join(parts)


def _inline(text: str) -> str:
    text = html.escape(text, quote=True)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
