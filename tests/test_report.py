"""The static HTML report of a run made by the pipeline: every caption set in every card, the
submitted one marked, escaped, well-formed, self-contained."""

import base64
import csv
import html
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medcap.config import load_config
from medcap.data import load_split
from medcap.eval.report import NEIGHBOUR_SIDE, QUERY_SIDE, render_report, write_report
from medcap.eval.report_run import read_cui_names, read_run
from medcap.files import read_jsonl
from medcap.runs import RunDir

EVIL = '<script>alert("x")</script> & co <b>'
VOID = {"meta", "img", "br", "hr", "input", "link"}
SETS = ["nearest", "consensus", "synth", "mbr", "lmf"]  # pipeline order: generators, synthesizer, fusers
K = 3


class _Page(HTMLParser):
    """Checks that every element is closed in order, and keeps each card's caption-set rows and badges."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []  # character data, unescaped
        self.cards: list[dict] = []  # {"id", "sets": [name], "submitted": [name], "fallback": [name], "text"}

    def handle_data(self, data):
        self.text.append(data)
        if self.cards and "article" in self.stack:
            self.cards[-1]["text"] += data

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        cls = (attrs.get("class") or "").split()
        if tag == "article" and "card" in cls:
            self.cards.append({"id": attrs["data-id"], "sets": [], "submitted": [], "fallback": [], "text": ""})
        if tag == "tr" and "data-set" in attrs and "article" in self.stack:
            self.cards[-1]["sets"].append(attrs["data-set"])
            if "submitted" in cls:
                self.cards[-1]["submitted"].append(attrs["data-set"])
        if tag == "span" and "fb" in cls and "article" in self.stack:
            self.cards[-1]["fallback"].append(self.cards[-1]["sets"][-1])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, parser.stack
    return parser


@pytest.fixture(scope="session")
def run(tmp_path_factory, phantom_dir, tiny_clip) -> Path:
    """A run made by the pipeline and `medcap ablate`: two generators, a synthesizer, MBR and an LM-Fuser.

    Its data is the phantom set with script-like text appended to every training caption (so the
    neighbours' and the nearest captions carry it) and the ROCO header of ``cui_mapping.csv``.
    """
    from tiny_vlms import make_tiny_llama

    from medcap.ablate import run_ablation
    from medcap.pipeline import Pipeline

    base = tmp_path_factory.mktemp("report")
    data = base / "data"
    shutil.copytree(phantom_dir, data)
    _rewrite_csv(data / "train_captions.csv", lambda row: [row[0], f"{row[1]} {EVIL}"])
    _rewrite_csv(data / "cui_mapping.csv", lambda row: row, header=["CUI", "Canonical name"])
    llama = str(make_tiny_llama(base / "llama"))
    gen = {"max_new_tokens": 6}
    cfg = {
        "name": "rep",
        "runs_dir": str(base / "runs"),
        "data": {"root": str(data), "query_splits": ["valid", "test"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": K},
        "generators": [{"name": "nearest", "kind": "nearest"}, {"name": "consensus", "kind": "consensus"}],
        "synthesizers": [{"name": "synth", "model": llama, "k": 2, "generation": gen}],
        "fusers": [
            {"name": "mbr", "kind": "mbr"},
            {"name": "lmf", "kind": "lm", "model": llama, "train_split": "valid", "generation": gen,
             "train": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "eval_every": 1, "save_every": 1}},
        ],  # fmt: skip
        "eval": {"metrics": ["rouge1", "bleu1"], "bootstrap": 0},
        # no submit.caption_set: the last caption set (lmf) is submitted
        "ablation": {"reference": "nearest", "split": "test", "n_boot": 50,
                     "variants": [{"name": n, "caption_set": n} for n in SETS]},
    }  # fmt: skip
    (base / "run.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(base / "run.yaml")
    pipe = Pipeline(config)
    pipe.run_stages()
    run_ablation(config)
    return pipe.run.root


def _rewrite_csv(path: Path, change, header: list[str] | None = None) -> None:
    with path.open(newline="") as f:
        head, *rows = list(csv.reader(f))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header or head, *map(change, rows)])
    path.write_text(buf.getvalue())


def _ids(run: Path, split: str) -> list[str]:
    return [ex.id for ex in load_split(load_config(run / "config.yaml").data, split).examples]


def _thumb_sizes(page: str) -> list[tuple[int, int]]:
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]


def test_every_card_shows_every_caption_set_and_marks_the_submitted_one(run, tmp_path):
    page = write_report(run, tmp_path / "report.html", split="test").read_text()
    parser = _parse(page)
    ids = _ids(run, "test")
    assert [c["sets"] for c in parser.cards] == [SETS] * len(ids)
    assert [c["submitted"] for c in parser.cards] == [["lmf"]] * len(ids)
    assert all(not c["fallback"] for c in parser.cards)
    for name in SETS:  # every caption the pipeline wrote is in its card
        rel = {"synth": "synthesis", "mbr": "fused", "lmf": "fused"}.get(name, "candidates")
        rows = read_jsonl(run / rel / name / "test.jsonl")
        assert {r["id"] for r in rows} == set(ids), name
        for card, i in zip(parser.cards, ids, strict=True):
            caption = next(r["caption"] for r in rows if r["id"] == i)
            assert caption in card["text"], (name, i)
    assert "submitted: lmf" in "".join(parser.text)

    # per-image scores of every set, and a sort key for each
    for name in SETS:
        assert f">{name} · rouge1</option>" in page and f">{name} · bleu1</option>" in page
    scores = json.loads((run / "scores" / "lmf.test.json").read_text())["per_image"]
    assert f"{scores[ids[0]]['rouge1']:.4f}" in page


def test_neighbours_concepts_and_ablation_are_labelled(run, tmp_path):
    page = write_report(run, tmp_path / "report.html", split="test").read_text()
    parser = _parse(page)
    ids = _ids(run, "test")
    neighbours = {r["id"]: r["neighbours"] for r in read_jsonl(run / "neighbours" / "test.jsonl")}
    cos = [a for t, a in parser.tags if t == "span" and a.get("class") == "cos"]
    assert len(cos) == len(ids) * K and all("cosine similarity" in a["title"] for a in cos)
    for card, i in zip(parser.cards, ids, strict=True):
        for n in neighbours[i]:
            assert f"cos {n['score']:.2f}" in card["text"] and n["id"] in card["text"]

    names = read_cui_names(Path(load_config(run / "config.yaml").data.root) / "cui_mapping.csv")
    ex = load_split(load_config(run / "config.yaml").data, "test").examples[0]
    assert ex.concepts and all(f"{c} {names[c]}" in parser.cards[0]["text"] for c in ex.concepts)

    sizes = _thumb_sizes(page)
    assert len(sizes) == len(ids) * (1 + K)  # each query image and its neighbours
    assert max(max(s) for s in sizes) <= QUERY_SIDE
    assert sum(max(s) <= NEIGHBOUR_SIDE for s in sizes) >= len(ids) * K

    # ablation.md as a table (Δ with its interval) and the forest plot, from `medcap ablate`
    text = "".join(parser.text)
    assert "Ablation of rep" in text and re.search(r"Δ \w+ \[95% CI\]", text)
    table = re.search(r'<div class="md scroll">(.*?)</div>', page, re.S).group(1)
    assert table.count("<tr>") == 1 + len(SETS) and "nearest (reference)" in table
    assert 'src="data:image/png;base64,' in page


def test_text_is_escaped_and_the_page_is_self_contained(run, tmp_path):
    page = write_report(run, tmp_path / "report.html", split="test").read_text()
    parser = _parse(page)
    text = "".join(parser.text)
    assert EVIL in text and "<script>alert" not in page  # shown as text, never as markup
    assert html.escape(EVIL, quote=False) in page.replace("&#34;", '"')
    scripts = [a for t, a in parser.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]
    srcs = [a.get("src") or a.get("href") for t, a in parser.tags if a.get("src") or a.get("href")]
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "url(http" not in page and "@import" not in page and "<link" not in page


def test_a_caption_set_without_a_file_is_shown_missing(run, tmp_path):
    # the LM-Fuser trains on valid and never captions it: its valid file does not exist
    assert not (run / "fused" / "lmf" / "valid.jsonl").exists()
    page = write_report(run, tmp_path / "valid.html", split="valid").read_text()
    parser = _parse(page)
    ids = _ids(run, "valid")
    assert [c["sets"] for c in parser.cards] == [SETS] * len(ids)
    assert [c["submitted"] for c in parser.cards] == [["lmf"]] * len(ids)
    assert all("missing: fused/lmf/valid.jsonl was not written" in c["text"] for c in parser.cards)
    assert "missing for valid" in "".join(parser.text)


def test_fallback_rows_and_absent_rows_are_marked(run, tmp_path):
    # no stage writes fallback rows yet: mark one row of a copy of the pipeline's own file
    copy = tmp_path / "rep"
    shutil.copytree(run, copy, symlinks=True)
    path = copy / "candidates" / "consensus" / "test.jsonl"
    rows = read_jsonl(path)
    rows[1]["fallback"] = True
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = _parse(write_report(copy, split="test").read_text())
    assert {c["id"]: c["fallback"] for c in parser.cards} == {r["id"]: ["consensus"] * (r is rows[1]) for r in rows}

    view = read_run(RunDir(run), "test")  # the same markers from an in-memory view
    first, second = view.ids[:2]
    view.caption_sets[-1].fallback.add(first)
    del view.caption_sets[0].captions[second]
    cards = _parse(render_report(view, run)).cards
    assert cards[0]["fallback"] == ["lmf"] and "no caption for this image" not in cards[0]["text"]
    assert "no caption for this image" in cards[1]["text"] and cards[1]["sets"] == SETS


def test_max_images_other_split_and_no_config(run, tmp_path):
    page = write_report(run, tmp_path / "a.html", split="test", max_images=2).read_text()
    assert page.count('<article class="card"') == 2
    # the index split has no neighbours or captions: its images are still listed, every set missing
    train = _ids(run, "train")
    parser = _parse(write_report(run, tmp_path / "b.html", split="train").read_text())
    assert len(parser.cards) == len(train) and all(c["sets"] == SETS for c in parser.cards)

    copy = tmp_path / "rep"
    shutil.copytree(run, copy, symlinks=True)
    (copy / "config.yaml").unlink()  # no config: the sets on disk, nothing marked, no images
    page = write_report(copy, split="test").read_text()
    parser = _parse(page)
    assert sorted(parser.cards[0]["sets"][:2]) == ["consensus", "nearest"]
    assert parser.cards[0]["sets"][2:] == ["synth", "lmf", "mbr"]  # globbed: kind order, then by name
    assert all(not c["submitted"] for c in parser.cards)
    assert all(i in page for i in _ids(run, "test")) and "image not available" in page
    assert "data:image/jpeg" not in page


def test_cui_names_read_the_roco_layout_and_tolerate_bad_rows(tmp_path, caplog):
    path = tmp_path / "cui_mapping.csv"
    path.write_text('CUI,Canonical name\nC0040405,X-Ray Computed Tomography\nC1,"Head, and neck"\nC2\n')
    assert read_cui_names(path) == {"C0040405": "X-Ray Computed Tomography", "C1": "Head, and neck"}
    assert f"{path}:4" in caplog.text
    assert read_cui_names(tmp_path / "absent.csv") == {}
    path.write_text("C9,No header\n")
    assert read_cui_names(path) == {"C9": "No header"}


def test_thumbnails_keep_the_aspect_ratio_within_the_max_side(tmp_path):
    from medcap.eval.report import _thumb
    from medcap.records import Example

    Image.new("L", (600, 300), 128).save(tmp_path / "big.png")
    uri = _thumb(Example("big", tmp_path / "big.png"), QUERY_SIDE)
    assert uri.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (256, 128)
    assert _thumb(Example("gone", tmp_path / "gone.png"), 96) is None  # shown as "no image"


def test_a_missing_run_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        write_report(tmp_path / "nothing")
