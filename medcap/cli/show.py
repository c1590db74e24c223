"""What the commands print: the artifacts a command made, the dry-run plan, the scores table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

METRIC_ORDER = ("bertscore", "rouge1", "specificity", "median_rank", "distinct")
INTEGER_METRICS = ("median_rank", "distinct")  # a rank and a count


def relpath(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows of cells as aligned text; the first row is the header, columns in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def history(pipe: Any) -> None:
    """One line per artifact the command touched: done (made now) or cached (up to date)."""
    seen: dict[Any, Any] = {}  # one line per artifact, in the order first touched; made now wins over cached
    for s in pipe.history:
        seen[s.artifact] = s if s.ran or s.artifact not in seen else seen[s.artifact]
    ran = sum(1 for s in seen.values() if s.ran)
    click.echo(f"{ran} artifact(s) written, {len(seen) - ran} up to date, in {relpath(pipe.run.root)}")
    width = max((len(s.stage) for s in seen.values()), default=0)
    for s in seen.values():
        click.echo(f"  {'done  ' if s.ran else 'cached'} {s.stage:<{width}}  {relpath(s.artifact)}")


def plan(rows: list[tuple]) -> None:
    """The dry-run plan: each artifact, what would happen to it and why."""
    body = [["stage", "target", "status", "why", "artifact"]]
    body += [[stage, " / ".join(map(str, t)) or "-", state, why, relpath(path)] for stage, t, path, state, why in rows]
    click.echo(table(body))
    todo = sum(1 for r in rows if r[3] == "run")
    blocked = sum(1 for r in rows if r[3] == "blocked")
    click.echo(
        f"\n{todo} to run, {len(rows) - todo - blocked} up to date" + (f", {blocked} blocked" if blocked else "")
    )


def scores(rows: list[dict]) -> None:
    """One aligned table: caption set, split, n and every metric (the organisers' preprocessing)."""
    if not rows:
        return
    names = {k for r in rows for k in r} - {"caption_set", "split", "n"}
    metrics = [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))
    body = [["caption set", "split", "n", *metrics]]
    for r in rows:
        vals = [_cell(m, r.get(m)) for m in metrics]
        body.append([r["caption_set"], r["split"], str(r.get("n", "-")), *vals])
    click.echo("\n" + table(body, right=set(range(2, len(body[0])))))


def _cell(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    if metric in INTEGER_METRICS and isinstance(value, (int, float)):
        return f"{value:.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
