"""The static HTML report: every image and caption, escaped, well-formed, self-contained."""

import base64
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from medcap.config import dump_config, load_config
from medcap.data import load_split
from medcap.eval.report import NEIGHBOUR_SIDE, QUERY_SIDE, write_report
from medcap.runs import write_json

EVIL = '<script>alert("x")</script> & co <b>'
VOID = {"meta", "img", "br", "hr", "input", "link"}


class _Balance(HTMLParser):
    """Checks that every element is closed in order (void elements need no end tag)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []  # character data, unescaped

    def handle_data(self, data):
        self.text.append(data)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _parse(page: str) -> _Balance:
    parser = _Balance()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, parser.stack
    return parser


@pytest.fixture()
def run(tmp_path, phantom_dir) -> Path:
    """A run folder written by hand: neighbours and two generators' candidates of split valid, one scored."""
    root = tmp_path / "runs" / "rep"
    cfg = load_config(None, [f"data.root={phantom_dir}", "name=rep"])
    (root / "config.yaml").parent.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    valid = [ex.id for ex in load_split(cfg.data, "valid").examples]
    train = [ex.id for ex in load_split(cfg.data, "train").examples]
    _jsonl(
        root / "neighbours" / "valid.jsonl",
        [
            {
                "id": i,
                "neighbours": [
                    {
                        "id": train[(j + r) % len(train)],
                        "score": 0.9 - r / 10,
                        "caption": f"nb {r} of {i}",
                        "concepts": [],
                    }
                    for r in range(3)
                ],
            }
            for j, i in enumerate(valid)
        ],
    )
    _jsonl(
        root / "candidates" / "nearest" / "valid.jsonl", [_cand(i, f"nearest caption of {i}", "nearest") for i in valid]
    )
    evil = [_cand(i, EVIL if j == 0 else f"evil caption of {i} a<b", "evil") for j, i in enumerate(valid)]
    _jsonl(root / "candidates" / "evil" / "valid.jsonl", evil)
    per_image = {i: {"rouge1": j / 10, "bertscore": 0.5} for j, i in enumerate(valid)}
    write_json(root / "scores" / "nearest.valid.json", {"variant": "nearest", "split": "valid", "metrics": {"rouge1": 0.3, "bertscore": 0.5}, "per_image": per_image, "n": len(valid)})  # fmt: skip
    return root


def _cand(image_id: str, caption: str, generator: str) -> dict:
    return {"id": image_id, "caption": caption, "generator": generator}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ids(run: Path, split: str) -> list[str]:
    return [ex.id for ex in load_split(load_config(run / "config.yaml").data, split).examples]


def _thumb_sizes(page: str) -> list[tuple[int, int]]:
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]


def test_report_shows_every_image_and_caption_escaped_and_self_contained(run):
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    parser = _parse(page)

    ids = _ids(run, "valid")
    for i in ids:
        assert i in page
        assert html.escape(f"nearest caption of {i}") in page
    assert page.count('<article class="card"') == len(ids)
    text = "".join(parser.text)
    assert EVIL in text and "<script>alert" not in page  # shown as text, never as markup
    assert f"evil caption of {ids[1]} a<b" in text and f"evil caption of {ids[1]} a&lt;b" in page
    assert "nb 2 of " + ids[0] in page

    # self-contained: one inline script, images as data URIs, no external URL anywhere
    scripts = [a for t, a in parser.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]
    srcs = [a.get("src") or a.get("href") for t, a in parser.tags if a.get("src") or a.get("href")]
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "url(http" not in page and "@import" not in page and "<link" not in page

    sizes = _thumb_sizes(page)
    assert len(sizes) == len(ids) * 4  # each query image and its 3 neighbours
    assert max(max(s) for s in sizes) <= QUERY_SIDE
    assert sum(max(s) <= NEIGHBOUR_SIDE for s in sizes) >= len(ids) * 3

    # sort keys for the scored generator's metrics; per-image score shown
    assert '<option value="s1">nearest · rouge1</option>' in page  # metrics in the scores file's order
    assert f'data-s1="{0.1:.6g}"' in page
    assert "Corpus scores" in page and "Ablation" not in page


def test_synthesis_fused_and_ablation_are_shown_when_present(run):
    ids = _ids(run, "valid")
    _jsonl(run / "synthesis" / "valid.jsonl", [_cand(i, f"synthesised & {i}", "llama") for i in ids])
    _jsonl(run / "fused" / "valid.jsonl", [_cand(i, f"fused <final> {i}", "fuser") for i in ids])
    write_json(run / "scores" / "fused.valid.json", {"variant": "fused", "split": "valid", "metrics": {"rouge1": 0.9}, "per_image": {i: {"rouge1": 0.9} for i in ids}, "n": len(ids)})  # fmt: skip
    (run / "ablation.md").write_text(
        "# Ablation of rep\n\nBest in **bold** & `ref`.\n\n| variant | rouge1 |\n|---|---:|\n"
        "| base (reference) | 0.1 |\n| a<b \\| c | **0.2** |\n\n- note <x>\n"
    )
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buf, format="PNG")
    (run / "ablation.png").write_bytes(buf.getvalue())

    page = write_report(run, run / "out" / "r.html").read_text()
    _parse(page)
    for i in ids:
        assert html.escape(f"synthesised & {i}") in page and html.escape(f"fused <final> {i}") in page
    assert page.count('<tr class="fused">') == len(ids) and page.count('<tr class="synthesis">') == len(ids)
    assert "fused · rouge1" in page
    assert "<h3>Ablation of rep</h3>" in page and "<b>bold</b> &amp; <code>ref</code>" in page
    assert "<td>a&lt;b | c</td>" in page and "<li>note &lt;x&gt;</li>" in page
    assert 'src="data:image/png;base64,' in page


def test_max_images_other_split_and_no_config(run):
    page = write_report(run, max_images=2).read_text()
    assert page.count('<article class="card"') == 2
    # a split without artifacts still lists its images (with references and thumbnails)
    test_ids = _ids(run, "test")
    page = write_report(run, split="test").read_text()
    _parse(page)
    assert all(i in page for i in test_ids) and len(_thumb_sizes(page)) == len(test_ids)

    (run / "config.yaml").unlink()  # data gone too: captions and scores still reported, without images
    page = write_report(run).read_text()
    _parse(page)
    assert all(i in page for i in _ids_from_neighbours(run)) and "image not available" in page
    assert "data:image/jpeg" not in page


def _ids_from_neighbours(run: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (run / "neighbours" / "valid.jsonl").read_text().splitlines()]


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
