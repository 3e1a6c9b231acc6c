"""``metareward-inspect``: a run in the terminal, as a per-iteration table (with its unfinished
iterations) or an iteration's sample pairs, each as text or JSON.

A key missing from metrics.json shows as "-" in the table.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from metareward.report.runs import COLUMNS, LEGEND, iterations, load_summary, sample_pairs
from metareward.report.text import cell, clip, facts
from metareward.store import layout


def format_table(rows: list[dict]) -> str:
    lines = [[header for _, header, _, _ in COLUMNS]]
    lines += [[cell(row.get(key), fmt) for key, _, fmt, _ in COLUMNS] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(*lines, strict=True)]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def format_pairs(pairs: list[dict], iteration: int, width: int) -> str:
    def wrap(text: str) -> list[str]:
        return [textwrap.indent(textwrap.fill(x, width - 4), "    ") for x in clip(text).splitlines()]

    lines = []
    for i, pair in enumerate(pairs, start=1):
        where = f"prompt {pair['prompt_id']}"
        where += f", response {pair['response_id']}" if "response_id" in pair else ""
        lines.append(f"── iter {iteration} {pair['role']} pair {i}/{len(pairs)}: {where} ".ljust(width, "─"))
        if "prompt" in pair:
            lines += ["  prompt:", *wrap(pair["prompt"])]
        for side in ("chosen", "rejected"):
            lines += [f"  {side} [{pair[f'{side}_id']}] ({facts(pair, side)}):", *wrap(pair[side])]
        lines.append("")
    return "\n".join(lines)


def inspect_run(run: Path, as_json: bool) -> str:
    """The per-iteration table of a run (and its unfinished iterations), as text or JSON."""
    rows, unfinished = load_summary(run)
    if as_json:
        return json.dumps({"run": run.name, "iterations": rows, "unfinished": unfinished}, indent=2)
    table = format_table(rows) if rows else "(no finished iteration)"
    lines = [f"run {run.name} ({run})", table, textwrap.fill(LEGEND, 100)]
    lines += [
        f"iter_{u['iteration']}: unfinished (no metrics.json): {', '.join(u['files']) or '-'}"
        for u in unfinished
    ]
    return "\n".join(lines)


def inspect_pairs(run: Path, iteration: int, role: str, n: int, as_json: bool) -> str:
    """Sample ``role`` pairs of ``iter_<iteration>``, for a terminal or as JSON; ValueError says what is
    missing."""
    directory = layout.iter_dir(run, iteration)
    if not directory.is_dir():
        known = ", ".join(str(t) for t, _ in iterations(run)) or "none"
        raise ValueError(f"iteration {iteration} does not exist in {run} (iterations: {known})")
    name = layout.ACTOR_PAIRS if role == "actor" else layout.JUDGE_PAIRS
    if not (directory / name).is_file():
        raise ValueError(f"{directory / name} does not exist (that stage has not finished)")
    pairs = sample_pairs(directory, role, max(n, 1))
    if as_json:
        return json.dumps({"run": run.name, "iteration": iteration, "pairs": pairs}, indent=2)
    width = max(40, min(shutil.get_terminal_size((100, 24)).columns, 120))
    return format_pairs(pairs, iteration, width) if pairs else f"no {role} pairs in {name}"
