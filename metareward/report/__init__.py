"""Look at a run: a per-iteration table and sample pairs in the terminal, an HTML report with plots,
and the console summary the loop prints after each iteration. The commands (in cli.py):

    metareward-inspect RUN_DIR [--json]                 # one row per iteration (+ unfinished iterations)
    metareward-inspect RUN_DIR --iter 2 --role judge -n 5   # sample pairs of iter_2 (--json: as JSON)
    metareward-report RUN_DIR [--out FILE]              # RUN_DIR/report.html + PNGs in RUN_DIR/report/

Modules: ``runs`` reads a run directory, ``inspect`` and ``html`` (with ``plots``) show it, ``suites``
holds metareward-eval-judge's tables, ``console`` the loop's summaries, ``tracking`` the W&B run.
"""

from __future__ import annotations

from metareward.report.console import eval_lines, sample, summary
from metareward.report.html import write_report
from metareward.report.inspect import inspect_pairs, inspect_run
from metareward.report.runs import is_run_dir, latest_cascades
from metareward.report.suites import format_cascade_table, format_suite_table

__all__ = [
    "eval_lines",
    "format_cascade_table",
    "format_suite_table",
    "inspect_pairs",
    "inspect_run",
    "is_run_dir",
    "latest_cascades",
    "sample",
    "summary",
    "write_report",
]
