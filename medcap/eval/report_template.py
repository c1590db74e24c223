"""The Jinja2 template of the HTML report (inline, so it ships with the package): markup, CSS, JS.

The output is XHTML-compatible (every element closed, void elements self-closed) and
self-contained: images are data URIs, there are no external scripts, styles or fonts.
"""

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>medcap report · {{ run_name }} · {{ split }}</title>
<style>
:root { --fg: #1d2330; --muted: #5d6778; --line: #dde2ea; --bg: #f5f7fa; --card: #fff; --accent: #2457c5; --hi: #fffaf0; --sub: #1e7d3a; --subbg: #e8f6ec; --warn: #a15c00; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header.top { background: #1f2a44; color: #fff; padding: 18px 28px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header.top p { margin: 0; color: #c9d2e3; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 28px 60px; }
section.block { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin-bottom: 18px; }
section.block h2 { margin: 0 0 10px; font-size: 17px; }
.md h1 { font-size: 17px; margin: 0 0 8px; } .md h2, .md h3 { font-size: 15px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.current td { background: #f3f7ff; }
.scroll { overflow-x: auto; }
.md table { width: 100%; font-size: 12px; }
.md th { white-space: normal; vertical-align: bottom; padding: 4px 5px; }
.md td { padding: 3px 5px; }
.md .ci { font-size: 11px; color: var(--muted); }
img.plot { max-width: 100%; height: auto; display: block; margin-top: 12px; }
ul.sets { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 6px 8px; }
ul.sets li { border: 1px solid var(--line); border-radius: 14px; padding: 2px 10px; font-size: 13px; background: #fbfcfe; }
ul.sets li.submitted { border-color: var(--sub); background: var(--subbg); }
ul.sets li.absent { color: var(--muted); border-style: dashed; }
.controls { position: sticky; top: 0; z-index: 5; display: flex; flex-wrap: wrap; gap: 10px; align-items: center; background: var(--bg); padding: 10px 0; border-bottom: 1px solid var(--line); margin-bottom: 14px; }
.controls input[type=search] { flex: 1 1 320px; padding: 7px 10px; border: 1px solid #b9c2d0; border-radius: 6px; font-size: 14px; }
.controls select { padding: 6px; border: 1px solid #b9c2d0; border-radius: 6px; font-size: 13px; background: #fff; }
.controls .count { color: var(--muted); }
article.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin-bottom: 14px; display: grid; grid-template-columns: 260px 1fr; gap: 6px 18px; }
article.card[hidden] { display: none; }
.card .query img { width: 100%; max-width: 256px; height: auto; border-radius: 4px; border: 1px solid var(--line); display: block; }
.noimg { width: 256px; height: 120px; display: flex; align-items: center; justify-content: center; color: var(--muted); background: #eef1f6; border-radius: 4px; font-size: 12px; text-align: center; padding: 6px; }
.card h3 { margin: 0 0 6px; font-size: 15px; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.ref { background: #eef6ee; border-left: 3px solid #3c8d40; padding: 6px 10px; margin-bottom: 8px; }
.label { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin-right: 6px; }
.concepts { color: var(--muted); font-size: 12px; }
.cui { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11px; color: var(--fg); }
table.caps { width: 100%; }
table.caps td.gen { white-space: nowrap; width: 1%; }
table.caps td.gen .name { font-weight: 600; color: var(--accent); }
.kind { display: block; font-size: 10px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
table.caps tr.synthesizer td, table.caps tr.fuser td { background: var(--hi); }
table.caps tr.submitted td { background: var(--subbg); }
table.caps tr.submitted td:first-child { box-shadow: inset 3px 0 0 var(--sub); }
table.caps td.best { font-weight: 700; }
.badge { display: inline-block; font-size: 10px; font-weight: 700; text-transform: uppercase; letter-spacing: .03em; border-radius: 3px; padding: 0 5px; margin-left: 4px; vertical-align: 1px; }
.badge.sub { background: var(--sub); color: #fff; }
.badge.fb { background: #fde9c8; color: var(--warn); border: 1px solid #f0c27a; }
.missing { color: var(--muted); font-style: italic; }
.neighbours { grid-column: 1 / -1; display: flex; flex-wrap: wrap; gap: 10px 14px; padding-top: 8px; border-top: 1px dashed var(--line); }
figure.nb { margin: 0; flex: 0 0 190px; font-size: 12px; }
figure.nb .cos { color: var(--fg); font-weight: 600; cursor: help; border-bottom: 1px dotted var(--muted); }
figure.nb .concepts { font-size: 11px; margin-top: 2px; }
figure.nb img, figure.nb .noimg { width: 96px; height: auto; max-height: 96px; border-radius: 3px; border: 1px solid var(--line); }
figure.nb .noimg { height: 60px; font-size: 10px; }
figure.nb figcaption { color: var(--fg); }
figure.nb .meta { color: var(--muted); font-family: ui-monospace, monospace; font-size: 11px; }
.muted { color: var(--muted); }
@media (max-width: 760px) { article.card { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header class="top">
<h1>medcap report · {{ run_name }}</h1>
<p>split <b>{{ split }}</b> · {{ shown }} of {{ total }} image(s){% for line in summary %} · {{ line }}{% endfor %}{% if submitted %} · submitted: <b>{{ submitted }}</b>{% endif %}</p>
</header>
<main>
<section class="block" id="caption-sets">
<h2>Caption sets</h2>
{% if caption_sets %}<ul class="sets">{% for cs in caption_sets %}<li class="{{ cs.kind }}{% if cs.submitted %} submitted{% endif %}{% if not cs.exists %} absent{% endif %}" title="{{ cs.path }}"><b>{{ cs.name }}</b> <span class="muted">{{ cs.kind }}</span>{% if cs.submitted %}<span class="badge sub">submitted</span>{% endif %}{% if not cs.exists %} · <span class="missing">missing for {{ split }}</span>{% endif %}{% if cs.fallback %}<span class="badge fb">{{ cs.fallback }} fallback</span>{% endif %}</li>{% endfor %}</ul>
<p class="muted">In pipeline order: generators, synthesizers, fusers. Each image below shows every set; the submitted one is marked.</p>
{% else %}<p class="muted">No caption sets in this run.</p>{% endif %}
</section>
{% if ablation_html or ablation_png %}
<section class="block" id="ablation">
<h2>Ablation</h2>
{% if ablation_html %}<div class="md scroll">{{ ablation_html }}</div>{% endif %}
{% if ablation_png %}<img class="plot" src="{{ ablation_png }}" alt="ablation plot" />{% endif %}
</section>
{% endif %}
<section class="block" id="scores">
<h2>Corpus scores</h2>
{% if corpus_rows %}
<div class="scroll"><table>
<thead><tr><th>caption set</th><th>split</th><th class="num">n</th>{% for m in corpus_metrics %}<th class="num">{{ m }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in corpus_rows %}<tr{% if r.split == split %} class="current"{% endif %}><td>{{ r.caption_set }}{% if r.submitted %}<span class="badge sub">submitted</span>{% endif %}</td><td>{{ r.split }}</td><td class="num">{{ r.n }}</td>{% for m in corpus_metrics %}<td class="num">{% if r.best[m] %}<b>{{ r.metrics[m] }}</b>{% else %}{{ r.metrics[m] }}{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table></div>
{% else %}<p class="muted">No scores in this run.</p>{% endif %}
</section>
<div class="controls">
<input type="search" id="q" placeholder="Filter: ID, caption, generator…" aria-label="filter" />
<label>sort by <select id="sort"><option value="order">split order</option>{% for k in sort_keys %}<option value="{{ k.key }}">{{ k.label }}</option>{% endfor %}</select></label>
<select id="dir" aria-label="sort direction"><option value="desc">high → low</option><option value="asc">low → high</option></select>
<span class="count" id="count">{{ shown }} shown</span>
</div>
<div id="cards">
{% for c in cards %}<article class="card" data-id="{{ c.id }}" data-order="{{ loop.index0 }}"{% for k, v in c.sort.items() %} data-{{ k }}="{{ v }}"{% endfor %}>
<div class="query">{% if c.image %}<img src="{{ c.image }}" alt="{{ c.id }}" />{% else %}<div class="noimg">image not available</div>{% endif %}</div>
<div class="body">
<h3>{{ c.id }}</h3>
<div class="ref{% if c.reference is none %} muted{% endif %}"><span class="label">reference</span>{% if c.reference is not none %}{{ c.reference }}{% else %}none{% endif %}{% if c.concepts %}<div class="concepts"><span class="label">concepts</span>{% for k in c.concepts %}<span class="cui">{{ k.id }}</span>{% if k.name %} {{ k.name }}{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}</div>{% endif %}</div>
<table class="caps">
<thead><tr><th>source</th><th>caption</th>{% for m in metrics %}<th class="num">{{ m }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in c.captions %}<tr class="{{ row.kind }}{% if row.submitted %} submitted{% endif %}" data-set="{{ row.name }}"><td class="gen"><span class="name">{{ row.name }}</span>{% if row.submitted %}<span class="badge sub" title="the caption set this run submits">submitted</span>{% endif %}<span class="kind">{{ row.kind }}</span></td><td>{% if row.state == "no-file" %}<span class="missing" title="{{ row.path }}">missing: {{ row.path }} was not written</span>{% elif row.state == "no-row" %}<span class="missing">no caption for this image</span>{% elif row.caption is none %}<span class="missing">(empty)</span>{% else %}{{ row.caption }}{% endif %}{% if row.fallback %}<span class="badge fb" title="generation failed for this image; the caption came from a fallback">fallback</span>{% endif %}</td>{% for m in metrics %}<td class="num{% if row.best[m] %} best{% endif %}">{{ row.scores[m] }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
</div>
{% if c.neighbours %}<div class="neighbours">{% for n in c.neighbours %}<figure class="nb">{% if n.image %}<img src="{{ n.image }}" alt="{{ n.id }}" />{% else %}<div class="noimg">no image</div>{% endif %}<div class="meta">#{{ loop.index }}{% if n.cos %} · <span class="cos" title="{{ similarity_tip }}">cos {{ n.cos }}</span>{% endif %}<br />{{ n.id }}</div><figcaption>{{ n.caption }}</figcaption>{% if n.concepts %}<div class="concepts">{% for k in n.concepts %}<span class="cui">{{ k.id }}</span>{% if k.name %} {{ k.name }}{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}</div>{% endif %}</figure>{% endfor %}{% if c.more_neighbours %}<div class="meta">and {{ c.more_neighbours }} more neighbours in {{ c.neighbours_file }}</div>{% endif %}</div>{% endif %}
</article>
{% endfor %}</div>
</main>
<script>
(function () {
  var box = document.getElementById("cards"), q = document.getElementById("q");
  var sort = document.getElementById("sort"), dir = document.getElementById("dir"), count = document.getElementById("count");
  var cards = Array.prototype.slice.call(box.querySelectorAll("article.card"));
  var text = cards.map(function (c) { return c.textContent.toLowerCase(); });
  function value(c, key) { var v = parseFloat(c.getAttribute("data-" + key)); return isNaN(v) ? null : v; }
  function apply() {
    var needle = q.value.trim().toLowerCase(), key = sort.value, sign = dir.value === "asc" ? 1 : -1, shown = 0;
    cards.forEach(function (c, i) { var hit = !needle || text[i].indexOf(needle) >= 0; c.hidden = !hit; if (hit) shown++; });
    var order = cards.slice().sort(function (a, b) {
      if (key === "order") return value(a, "order") - value(b, "order");
      var x = value(a, key), y = value(b, key);
      if (x === null || y === null) return (x === null) - (y === null);
      return sign * (x - y) || value(a, "order") - value(b, "order");
    });
    order.forEach(function (c) { box.appendChild(c); });
    count.textContent = shown + " shown";
  }
  q.addEventListener("input", apply); sort.addEventListener("change", apply); dir.addEventListener("change", apply);
})();
</script>
</body>
</html>
"""
