"""``metareward-report``: RUN_DIR/report.html, with the summary table, the PNG plots (written to
RUN_DIR/report/, see :mod:`metareward.report.plots`) and two sample actor pairs of the last iteration
that has them.

A key missing from metrics.json shows as "-" and leaves its point out of the plots; a plot with no data
is skipped with a note in the HTML.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from metareward.report.plots import CASCADE_PLOT, PLOTS, plot, plot_cascades
from metareward.report.runs import COLUMNS, LEGEND, iterations, latest_cascades, load_summary, sample_pairs
from metareward.report.text import cell, clip, facts
from metareward.store import layout, records

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:right}img{max-width:100%}.note{color:#555}
.pair{border:1px solid #ddd;padding:0 1em}.text{white-space:pre-wrap;background:#f4f4f4;padding:.5em}"""


def render_html(run: str, rows: list[dict], unfinished: list[dict], figures: list, pairs: list, at) -> str:
    e = escape
    cells = [[e(cell(r.get(key), fmt)) for key, _, fmt, _ in COLUMNS] for r in rows]
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>metareward report: {e(run)}</title>",
        f"<style>{CSS}</style></head>\n<body><h1>metareward report: {e(run)}</h1><h2>Summary</h2><table>",
        "<tr>" + "".join(f"<th>{e(header)}</th>" for _, header, _, _ in COLUMNS) + "</tr>",
        *("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells),
        f"</table><p class='note'>{e(LEGEND)}</p>",
        *(f"<p class='note'>iter_{u['iteration']} unfinished, has {e(', '.join(u['files']))}</p>"
          for u in unfinished),
        "<h2>Plots</h2>",
    ]  # fmt: skip
    for src, title, caption in figures:
        img = f'<img src="{e(src)}" alt="{e(title)}">' if src else ""
        note = e(caption) if src else f"{e(title)}: skipped (no data for it in metrics.json)."
        parts.append(f"<figure>{img}<figcaption>{note}</figcaption></figure>")
    parts.append(f"<h2>Sample actor pairs (iteration {at})</h2>" if pairs else "")
    for pair in pairs:
        parts.append(f"<div class='pair'><p><b>prompt</b> {e(str(pair['prompt_id']))}</p>")
        parts.append(f"<div class='text'>{e(clip(pair['prompt']))}</div>")
        for side in ("chosen", "rejected"):
            parts.append(f"<p><b>{side}</b> {e(str(pair[f'{side}_id']))} ({e(facts(pair, side))})</p>")
            parts.append(f"<div class='text'>{e(clip(pair[side]))}</div>")
        parts.append("</div>")
    return "\n".join(parts) + "\n</body></html>\n"


def write_report(run: Path, out: Path) -> str:
    """``out`` (HTML) with the PNG plots in ``run/report/``; returns a line saying what was written."""
    rows, unfinished = load_summary(run)
    done = [(t, d) for t, d in iterations(run) if (d / layout.ACTOR_PAIRS).is_file()]
    at, pairs = (done[-1][0], sample_pairs(done[-1][1], "actor", 2)) if done else (None, [])
    plot_dir = run / layout.REPORT_PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, title, panels, caption in PLOTS:
        path = plot_dir / name
        if not (made := plot(path, rows, title, panels)):
            path.unlink(missing_ok=True)  # no stale plot from an earlier report
        src = Path(os.path.relpath(path, out.resolve().parent)).as_posix() if made else None
        figures.append((src, title, caption))
    # The cascade plot only for runs that evaluate one (eval.escalation).
    name, title, caption = CASCADE_PLOT
    path = plot_dir / name
    path.unlink(missing_ok=True)
    if plot_cascades(path, *latest_cascades(run)):
        figures.append((Path(os.path.relpath(path, out.resolve().parent)).as_posix(), title, caption))
    records.write_text(out, render_html(run.name, rows, unfinished, figures, pairs, at))
    return f"wrote {out} and {sum(src is not None for src, _, _ in figures)} plots in {plot_dir}"
