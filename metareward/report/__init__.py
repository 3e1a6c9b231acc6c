"""Look at a run: a per-iteration table and sample pairs in the terminal, an HTML report with plots,
and the console summary the loop prints after each iteration. The commands (in cli.py):

    metareward-inspect RUN_DIR [--json]                 # one row per iteration (+ unfinished iterations)
    metareward-inspect RUN_DIR --iter 2 --role judge -n 5   # sample pairs of iter_2 (--json: as JSON)
    metareward-report RUN_DIR [--out FILE]              # RUN_DIR/report.html + PNGs in RUN_DIR/report/

A key missing from metrics.json shows as "-" and leaves its point out of the plots; a plot with no data
is skipped with a note in the HTML. Iteration 0 is the seed model M_0, from RUN_DIR/eval_0.json.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import textwrap
from pathlib import Path

from metareward.store import records

CLIP = 600
# fmt: off
# (summary-row key, column header, format, dotted paths into metrics.json: the first found wins)
COLUMNS = [
    ("iteration", "iter", "{}", ()),
    ("prompts", "prompts", "{}", ("actor.prompts", "prompts")),
    ("responses", "resp", "{}", ("actor.responses",)),
    ("mean_score", "score", "{:.2f}", ("actor.mean_response_score", "judge.mean_score")),
    ("judge_parse_failure_rate", "parse-fail", "{:.0%}", ("judge.parse_failure_rate",)),
    ("first_position_win_share", "1st-wins", "{:.0%}", ("meta_judge.first_position_win_share",)),
    ("actor_pairs", "a-pairs", "{}", ("actor.num_pairs", "pairs.actor.pairs")),
    ("judge_pairs", "j-pairs", "{}", ("pairs.judge.pairs",)),
    ("chosen_mean_tokens", "ch-tok", "{:.1f}", ("actor.chosen_mean_tokens",)),
    ("rejected_mean_tokens", "rej-tok", "{:.1f}", ("actor.rejected_mean_tokens",)),
    ("dpo_loss", "DPO-loss", "{:.4f}", ()),  # from TRAIN_KEYS
    ("judge_accuracy", "judge-acc", "{:.3f}", ()),  # the first suite and protocol, see _suite_keys
]
# more row keys, for the plots and --json
PATHS = {
    "actor_win_rate": ("eval_actor.win_rate",),
    "actor_win_rate_ci_low": ("eval_actor.ci_low",), "actor_win_rate_ci_high": ("eval_actor.ci_high",),
    "mean_response_tokens": ("actor.mean_response_tokens",),
    "order_agreement": ("meta_judge.order_agreement",),
}
# DPO numbers: train.<key minus "dpo_">, else this key of the last TRL log-history entry with a loss
TRAIN_KEYS = {"dpo_loss": "loss", "rewards_margins": "rewards/margins",
              "rewards_accuracies": "rewards/accuracies"}
# fmt: on
LEGEND = (
    "iter 0 = the seed model M_0; score = mean response score (0-5); parse-fail = judge scores not parsed "
    "from text; 1st-wins = meta-judge verdicts won by the first position; ch-tok / rej-tok = mean tokens "
    "of chosen / rejected responses; DPO-loss = last logged loss; judge-acc = the judge's accuracy on the "
    "first suite and protocol of eval.suites and eval.protocols (all of them: --json, and the report)"
)


def _get(data, path: str):
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _num(value) -> float | int | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _row(iteration: int, metrics: dict) -> dict:
    row: dict = {"iteration": iteration}
    for key, paths in [*((key, paths) for key, _, _, paths in COLUMNS[1:]), *PATHS.items()]:
        row[key] = next((v for path in paths if (v := _num(_get(metrics, path))) is not None), None)
    train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    history = train.get("log_history") or metrics.get("train_log") or []
    last = next((e for e in reversed(history) if isinstance(e, dict) and "loss" in e), {})
    for key, logged in TRAIN_KEYS.items():
        value = _num(train.get(key.removeprefix("dpo_")))
        row[key] = value if value is not None else _num(last.get(logged))
    for key, value in _suite_keys(metrics.get("eval")).items():
        row[key] = value
    row["judge_accuracy"] = next(
        (v for k, v in row.items() if k.startswith("acc:") and "_ci_" not in k), None
    )
    histogram = _get(metrics, "actor.score_histogram")
    ok = isinstance(histogram, list) and histogram and all(_num(c) is not None for c in histogram)
    row["score_histogram"] = histogram if ok else None
    return row


# Row keys per suite and protocol ("acc:pandalm/pointwise"), from metrics.json's "eval".
SUITE_KEYS = {"acc:": "accuracy", "consistency:": "position_consistency", "longer:": "longer_preference"}


def _suite_keys(evaluated) -> dict:
    """``{"acc:<suite>/<protocol>": accuracy, ..._ci_low, ..._ci_high, "consistency:...", "longer:..."}``
    of an iteration's judge evaluation ``{suite: {protocol: metrics}}``, in its order."""
    found: dict = {}
    for suite, protocols in (evaluated or {}).items():
        for protocol, m in (protocols if isinstance(protocols, dict) else {}).items():
            if not isinstance(m, dict):
                continue
            for prefix, metric in SUITE_KEYS.items():
                found[f"{prefix}{suite}/{protocol}"] = _num(m.get(metric))
            found[f"acc:{suite}/{protocol}_ci_low"] = _num(m.get("ci_low"))
            found[f"acc:{suite}/{protocol}_ci_high"] = _num(m.get("ci_high"))
    return found


def _expand(panels: list | None, rows: list[dict]) -> list | None:
    """Panels whose lines are a row-key prefix get one line per suite and protocol found in ``rows``."""
    if panels is None:
        return None
    expanded = []
    for ylabel, reference, lines in panels:
        if isinstance(lines, str):
            keys = dict.fromkeys(k for r in rows for k in r if k.startswith(lines) and "_ci_" not in k)
            lines = [(key.removeprefix(lines), key) for key in keys]
        expanded.append((ylabel, reference, lines))
    return expanded


def _iterations(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m[1]), p) for p in run_dir.glob("iter_*") if (m := re.fullmatch(r"iter_(\d+)", p.name))]
    return sorted((t, p) for t, p in found if p.is_dir())


def load_summary(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(summary rows, unfinished iterations) of a run directory."""
    rows, unfinished = [], []
    data = records.read_json(run_dir / records.EVAL_0) if (run_dir / records.EVAL_0).is_file() else None
    if isinstance(data, dict):  # the loop writes {"judge": {...}, ...}; a bare eval dict works too
        rows.append(_row(0, {"eval": data["judge"] if isinstance(data.get("judge"), dict) else data}))
    for t, directory in _iterations(run_dir):
        if (directory / records.METRICS).is_file():
            metrics = records.read_json(directory / records.METRICS)
            rows.append(_row(t, metrics if isinstance(metrics, dict) else {}))
        else:
            files = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))  # + *.parts
            unfinished.append({"iteration": t, "files": files})
    return rows, unfinished


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    lines = [[header for _, header, _, _ in COLUMNS]]
    lines += [[_cell(row.get(key), fmt) for key, _, fmt, _ in COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def _text(messages) -> str:
    last = messages[-1] if isinstance(messages, list) and messages else {"content": messages or ""}
    return str(last.get("content", "") if isinstance(last, dict) else last)


def sample_pairs(directory: Path, role: str, n: int | None) -> list[dict]:
    """The first ``n`` (None: all) ``role`` pairs of an iteration directory, with scores and lengths."""
    actor = role == "actor"
    pairs = records.read_jsonl(directory / (records.ACTOR_PAIRS if actor else records.JUDGE_PAIRS))[:n]
    responses = directory / records.RESPONSES
    rows = records.read_jsonl(responses) if actor and responses.is_file() else []
    tokens = {r.get("response_id"): r.get("num_tokens") for r in rows}
    out = []
    for pair in pairs:
        prompt_id = pair.get("prompt_id") or str(pair.get("response_id")).rpartition("/")[0]
        row = {"role": role, "prompt_id": prompt_id}
        if actor:  # the judge prompt holds the response; judge pairs show its id instead
            users = [m for m in pair.get("prompt") or [] if isinstance(m, dict) and m.get("role") == "user"]
            row["prompt"] = _text(users or pair.get("prompt"))
        else:
            row["response_id"] = pair.get("response_id")
        for side in ("chosen", "rejected"):
            row[side] = text = _text(pair.get(side))
            row[f"{side}_id"] = pair.get(f"{side}_id")
            row[f"{side}_score"] = _num(pair.get(f"{side}_score"))
            if not actor:
                row[f"{side}_elo"] = _num(pair.get(f"{side}_elo"))
            count = _num(tokens.get(row[f"{side}_id"], pair.get(f"{side}_tokens"))) if actor else None
            row[f"{side}_length"] = count if count is not None else len(text)
            row[f"{side}_length_unit"] = "tokens" if count is not None else "chars"
        out.append(row)
    return out


def clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else f"{text[:limit].rstrip()} … [{len(text) - limit} more chars]"


def _facts(pair: dict, side: str) -> str:
    facts = [f"score {_cell(pair[f'{side}_score'], '{:.2f}')}"]
    if f"{side}_elo" in pair:
        facts.append(f"elo {_cell(pair[f'{side}_elo'], '{:+.2f}')}")
    return ", ".join([*facts, f"{pair[f'{side}_length']:g} {pair[f'{side}_length_unit']}"])


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
            lines += [f"  {side} [{pair[f'{side}_id']}] ({_facts(pair, side)}):", *wrap(pair[side])]
        lines.append("")
    return "\n".join(lines)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / records.CONFIG).is_file() or bool(_iterations(path)))


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
    directory = records.iter_dir(run, iteration)
    if not directory.is_dir():
        known = ", ".join(str(t) for t, _ in _iterations(run)) or "none"
        raise ValueError(f"iteration {iteration} does not exist in {run} (iterations: {known})")
    name = records.ACTOR_PAIRS if role == "actor" else records.JUDGE_PAIRS
    if not (directory / name).is_file():
        raise ValueError(f"{directory / name} does not exist (that stage has not finished)")
    pairs = sample_pairs(directory, role, max(n, 1))
    if as_json:
        return json.dumps({"run": run.name, "iteration": iteration, "pairs": pairs}, indent=2)
    width = max(40, min(shutil.get_terminal_size((100, 24)).columns, 120))
    return format_pairs(pairs, iteration, width) if pairs else f"no {role} pairs in {name}"


def _draw_lines(ax, rows: list[dict], ylabel: str, reference: float | None, lines: list) -> None:
    for label, key in lines:
        if points := [r for r in rows if r.get(key) is not None]:
            xs, ys = [r["iteration"] for r in points], [r[key] for r in points]
            ci = [[r.get(f"{key}_ci_{bound}") for r in points] for bound in ("low", "high")]
            yerr = [[0.0 if c is None else abs(c - y) for c, y in zip(cs, ys, strict=True)] for cs in ci]
            ax.errorbar(xs, ys, yerr, marker="o", capsize=4, label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=f"{reference:.3g}")
    ax.set(xlabel="iteration", ylabel=ylabel, xticks=sorted({r["iteration"] for r in rows}))


def _draw_histogram(ax, rows: list[dict]) -> None:
    width, bins = 0.8 / len(rows), len(rows[0]["score_histogram"])
    for i, row in enumerate(rows):
        counts, shift = row["score_histogram"], (i - (len(rows) - 1) / 2) * width
        shares = [c / sum(counts) for c in counts]
        ax.bar([b + shift for b in range(len(counts))], shares, width, label=f"iter {row['iteration']}")
    ax.set_xticks(range(bins), [f"[{b},{b + 1}{']' if b == bins - 1 else ')'}" for b in range(bins)])
    ax.set(xlabel="response score (mean of its judge scores)", ylabel="share of responses")


def _plot(path: Path, rows: list[dict], title: str, panels: list | None) -> bool:
    """One PNG, written atomically; False when ``rows`` hold none of its data (error bars: K_ci_low/high)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hists = [r for r in rows if r.get("score_histogram") and sum(r["score_histogram"]) > 0]
    keys = [key for _, _, lines in panels or [] for _, key in lines]
    if not (any(r.get(key) is not None for r in rows for key in keys) if panels else hists):
        return False
    fig = Figure(figsize=(6.4 * len(panels or [None]), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels or [None]), squeeze=False)[0]
    for ax, panel in zip(axes, panels or [None], strict=True):
        _draw_lines(ax, rows, *panel) if panel else _draw_histogram(ax, hists)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with no data for any suite has nothing to name
            ax.legend(fontsize="small")
    fig.suptitle(title)
    _save_png(fig, path)
    return True


def _save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# (file, title, panels [(ylabel, reference y | None, [(label, row key)])] | None: histograms, caption)
PLOTS = [
    ("judge_accuracy.png", "Judge accuracy on the preference suites (95% CI)",
     [("accuracy", 0.5, "acc:")],
     "Should rise over iterations (0 = seed model M_0); a fall means the judge drifts from human taste."),
    ("judge_biases.png", "Judge biases on the preference suites",
     [("position consistency", None, "consistency:"), ("longer preferred", 0.5, "longer:")],
     "Consistency well below 1 = verdicts follow the order shown; longer-preferred far above the humans' "
     "share = the judge rewards length."),
    ("score_histogram.png", "Response scores by iteration", None,
     "Mass piling into the top bin without better agreement = score inflation (a lenient judge)."),
    ("lengths.png", "Response length", [("tokens", None, [("mean response", "mean_response_tokens"),
     ("chosen", "chosen_mean_tokens"), ("rejected", "rejected_mean_tokens")])],
     "Chosen much longer than rejected, or lengths climbing, = the judge rewards length (raise pairs.rho)."),
    ("position_bias.png", "Meta-judge positional bias", [("share", 0.5, [
     ("first-position win share", "first_position_win_share"), ("order agreement", "order_agreement")])],
     "First-position wins far from 0.5 = the meta-judge picks a position, not the better judgement."),
    ("dpo.png", "DPO training", [("last loss", math.log(2), [("loss", "dpo_loss")]),
     ("reward margin", 0.0, [("chosen - rejected reward", "rewards_margins")])],
     "Loss should end below ln 2 = 0.693 with a positive margin; stuck at 0.693 = nothing was learned."),
    ("actor_win_rate.png", "Actor win rate vs M_0 (95% CI)",
     [("win rate", 0.5, [("M_t vs M_0", "actor_win_rate")])],
     "Above 0.5 = the trained actor beats the seed model on held-out prompts."),
]  # fmt: skip

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:right}img{max-width:100%}.note{color:#555}
.pair{border:1px solid #ddd;padding:0 1em}.text{white-space:pre-wrap;background:#f4f4f4;padding:.5em}"""


def render_html(run: str, rows: list[dict], unfinished: list[dict], figures: list, pairs: list, at) -> str:
    e = html.escape
    cells = [[e(_cell(r.get(key), fmt)) for key, _, fmt, _ in COLUMNS] for r in rows]
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
            parts.append(f"<p><b>{side}</b> {e(str(pair[f'{side}_id']))} ({e(_facts(pair, side))})</p>")
            parts.append(f"<div class='text'>{e(clip(pair[side]))}</div>")
        parts.append("</div>")
    return "\n".join(parts) + "\n</body></html>\n"


def latest_cascades(run: Path) -> tuple[str, dict]:
    """(which model, {"suite/protocol": escalation}) of the last evaluated model with cascade curves
    (eval.escalation): the last finished iteration's, else M_0's."""
    evaluated = [
        (f"M_{t}", records.read_json(d / records.METRICS).get("eval", {}))
        for t, d in _iterations(run)
        if (d / records.METRICS).is_file()
    ]
    if (run / records.EVAL_0).is_file():
        evaluated.insert(0, ("M_0", records.read_json(run / records.EVAL_0).get("judge", {})))
    for model, judge in reversed(evaluated):
        found = {
            f"{suite}/{protocol}": m["escalation"]
            for suite, protocols in judge.items()
            for protocol, m in protocols.items()
            if isinstance(m, dict) and m.get("escalation")
        }
        if found:
            return model, found
    return "", {}


def _plot_cascades(path: Path, model: str, cascades: dict) -> bool:
    """Accuracy and cost against the escalated share, the signal's curve and random's per suite and
    protocol, with the strong judge's accuracy dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not cascades:
        return False
    fig = Figure(figsize=(12.8, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    accuracy_ax, cost_ax = fig.subplots(1, 2)
    for name, found in cascades.items():
        for key, label, style in (("curve", found["signal"], "-o"), ("random_curve", "random", ":")):
            points = found[key]
            xs = [p["fraction"] for p in points]
            if any(p["accuracy"] is not None for p in points):
                accuracy_ax.plot(xs, [p["accuracy"] for p in points], style, label=f"{name} {label}")
            if any(p["cost_usd"] is not None for p in points):
                cost_ax.plot(xs, [p["cost_usd"] for p in points], style, label=f"{name} {label}")
        if found.get("strong_accuracy") is not None:
            accuracy_ax.axhline(found["strong_accuracy"], linestyle="--", linewidth=1, color="grey")
    accuracy_ax.set(xlabel="share of pairs escalated", ylabel="accuracy (dashed: strong judge alone)")
    cost_ax.set(xlabel="share of pairs escalated", ylabel="cost (US$)")
    for ax in (accuracy_ax, cost_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"Escalating the judge of {model} to the strong judge")
    _save_png(fig, path)
    return True


CASCADE_PLOT = (
    "escalation.png",
    "Cascade to the strong judge (eval.escalation)",
    "The signal's curve above random's = the local judge knows when it is unsure; where it meets the "
    "dashed line, the cascade matches the strong judge at that share of its cost.",
)


def write_report(run: Path, out: Path) -> str:
    """``out`` (HTML) with the PNG plots in ``run/report/``; returns a line saying what was written."""
    rows, unfinished = load_summary(run)
    done = [(t, d) for t, d in _iterations(run) if (d / records.ACTOR_PAIRS).is_file()]
    at, pairs = (done[-1][0], sample_pairs(done[-1][1], "actor", 2)) if done else (None, [])
    plot_dir = run / "report"
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, title, panels, caption in PLOTS:
        path = plot_dir / name
        if not (made := _plot(path, rows, title, _expand(panels, rows))):
            path.unlink(missing_ok=True)  # no stale plot from an earlier report
        src = Path(os.path.relpath(path, out.resolve().parent)).as_posix() if made else None
        figures.append((src, title, caption))
    # The cascade plot only for runs that evaluate one (eval.escalation).
    name, title, caption = CASCADE_PLOT
    path = plot_dir / name
    path.unlink(missing_ok=True)
    if _plot_cascades(path, *latest_cascades(run)):
        figures.append((Path(os.path.relpath(path, out.resolve().parent)).as_posix(), title, caption))
    records.write_text(out, render_html(run.name, rows, unfinished, figures, pairs, at))
    return f"wrote {out} and {sum(src is not None for src, _, _ in figures)} plots in {plot_dir}"


# ------------------------------------------------------------------ judge skill on suites


METRIC_COLUMNS = [
    ("accuracy", "acc", "{:.3f}"),
    ("ci_low", "ci-low", "{:.3f}"),
    ("ci_high", "ci-high", "{:.3f}"),
    ("pairs", "pairs", "{}"),
    ("label_ties", "l-ties", "{}"),
    ("judge_tie_rate", "j-ties", "{:.0%}"),
    ("position_consistency", "consist", "{:.0%}"),
    ("first_position_preference", "1st-pref", "{:.0%}"),
    ("longer_preference", "longer", "{:.0%}"),
    ("human_longer_preference", "h-longer", "{:.0%}"),
    ("parse_failure_rate", "unparsed", "{:.0%}"),
    ("brier", "brier", "{:.3f}"),
    ("ece", "ece", "{:.3f}"),
    ("jsd", "jsd", "{:.3f}"),
]


def format_suite_table(result: dict) -> str:
    """One row per suite and protocol, "-" where a metric does not apply."""
    header = ["suite", "protocol", *(title for _, title, _ in METRIC_COLUMNS)]
    lines = [header]
    for name, protocols in result["suites"].items():
        for protocol, m in protocols.items():
            cells = ["-" if m[key] is None else fmt.format(m[key]) for key, _, fmt in METRIC_COLUMNS]
            lines.append([name, protocol, *cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in lines)


def format_cascade_table(result: dict) -> str:
    """Per suite and protocol with a cascade: local and strong accuracy, the share of pairs escalated
    to match the strong judge, and accuracy / cost at each point of the curve."""
    lines = []
    for name, protocols in result["suites"].items():
        for protocol, m in protocols.items():
            found = m.get("escalation")
            if not found:
                continue
            lines.append(
                f"{name}/{protocol}: signal {found['signal']}, local accuracy "
                f"{_number(found['local_accuracy'], '.3f')}, strong "
                f"{_number(found['strong_accuracy'], '.3f')}, matched at "
                f"{_number(found['fraction_to_match_strong'], '.0%')} escalated, area over random "
                f"{_number(found['area_over_random'], '+.3f')}"
            )
            lines.append("  escalated  accuracy  random    cost_usd  random")
            for point, chance in zip(found["curve"], found["random_curve"], strict=True):
                lines.append(
                    f"  {point['fraction']:>9.0%}  {_number(point['accuracy'], '.3f'):>8}  "
                    f"{_number(chance['accuracy'], '.3f'):>6}  {_number(point['cost_usd'], '.4f'):>8}  "
                    f"{_number(chance['cost_usd'], '.4f'):>6}"
                )
    return "\n".join(lines)


# ------------------------------------------------------------------ the loop's console summary


def _number(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def eval_lines(evaluated: dict) -> list[str]:
    """The judge's accuracy with its 95% interval, per suite and protocol of an evaluation."""
    return [
        f"eval       {suite}/{protocol} judge accuracy {_number(m['accuracy'], '.2f')} "
        f"[{_number(m['ci_low'], '.2f')}, {_number(m['ci_high'], '.2f')}]"
        for suite, protocols in evaluated.items()
        for protocol, m in protocols.items()
    ]


def summary(metrics: dict) -> str:
    """A one-screen account of one iteration."""
    actor, judge, meta = metrics["actor"], metrics["judge"], metrics["meta_judge"]
    pair, train = metrics["pairs"], metrics["train"]
    agreement, actor_eval = metrics.get("eval") or {}, metrics.get("eval_actor") or {}
    tokens, score = _number(actor["mean_response_tokens"], ".0f"), _number(actor.get("mean_response_score"))
    judge_failures, meta_failures = (
        _number(judge["parse_failure_rate"], ".0%"),
        _number(meta["parse_failure_rate"], ".0%"),
    )
    first_wins = _number(meta["first_position_win_share"], ".0%")
    losses = f"{_number(train.get('first_loss'), '.4f')} -> {_number(train.get('loss'), '.4f')}"
    lines = [
        f"== iteration {metrics['iteration']} ==",
        f"actor      {metrics['prompts']} prompts -> {actor['responses']} responses, "
        f"mean {tokens} tokens, mean score {score}",
        f"judge      {judge['judgements']} judgements, {judge['scored']} scored, "
        f"parse failures {judge_failures}, mean score {_number(judge['mean_score'])}",
        f"meta-judge {meta['verdicts']} verdicts, parse failures {meta_failures}, "
        f"first-position wins {first_wins}",
        f"pairs      actor {pair['actor']['pairs']}, judge {pair['judge']['pairs']} "
        f"(rho {pair['rho']}, judge pairs trained: {pair['trained_on_judge_pairs']})",
        f"DPO        {train.get('steps', 0)} steps, loss {losses}, "
        f"reward margin {_number(train.get('rewards_margins'), '.4f')}",
    ]
    lines += guard_lines(metrics.get("guards"))
    lines += escalation_lines(metrics.get("escalation"))
    lines += eval_lines(agreement)
    if actor_eval:
        lines.append(f"eval       actor win rate vs M_0 {actor_eval['win_rate']:.2f}")
    return "\n".join(lines)


def guard_lines(guard: dict | None) -> list[str]:
    """The guarded numbers of an iteration (guards.py) on one line, then one line per alarm."""
    if not guard:
        return []
    lines = [
        f"guards     top scores {_number(guard.get('top_score_share'), '.0%')}, length growth "
        f"responses {_number(guard.get('response_tokens_growth'), '+.0%')} / judgements "
        f"{_number(guard.get('judgement_tokens_growth'), '+.0%')}, parse failures "
        f"{_number(guard.get('judge_parse_failure_rate'), '.0%')} / "
        f"{_number(guard.get('meta_judge_parse_failure_rate'), '.0%')}, first-position wins "
        f"{_number(guard.get('first_position_win_share'), '.0%')}"
    ]
    lines += [f"ALARM      {alarm['reason']}" for alarm in guard.get("alarms", [])]
    return lines


def escalation_lines(escalation: dict | None) -> list[str]:
    """Per escalating stage: how much went to the strong judge, how often it agreed, what it cost."""
    lines = []
    for role, m in (escalation or {}).items():
        strong = m["judges"]["strong"]
        cost = "" if strong["cost_usd"] is None else f", ${strong['cost_usd']:.4f}"
        lines.append(
            f"escalated  {role.replace('_', '-')}: {m['escalated']}/{m['items']} items "
            f"({_number(m['escalated_share'], '.0%')}, {m['no_signal']} without a signal) to "
            f"{strong['name']}, agreement {_number(m['agreement'], '.0%')}, "
            f"{strong['prompt_tokens']}+{strong['completion_tokens']} tokens{cost}"
        )
    return lines


def _clip_line(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def sample(directory: Path) -> str:
    """One actor pair and one judgement of the iteration, for a person to read."""
    actor = records.read_jsonl(directory / records.ACTOR_PAIRS)
    judge = records.read_jsonl(directory / records.JUDGE_PAIRS)
    lines = []
    if actor:
        pair = actor[0]
        lines += [
            f"  prompt    {_clip_line(pair['prompt'][-1]['content'])}",
            f"  chosen    [{pair['chosen_score']:.2f}] {_clip_line(pair['chosen'][0]['content'])}",
            f"  rejected  [{pair['rejected_score']:.2f}] {_clip_line(pair['rejected'][0]['content'])}",
        ]
    if judge:
        pair = judge[0]
        lines.append(
            f"  judgement [elo {pair['chosen_elo']:+.2f}] {_clip_line(pair['chosen'][0]['content'])}"
        )
    else:
        judgement = next(iter(records.read_jsonl(directory / records.JUDGEMENTS)), None)
        if judgement is not None:
            lines.append(f"  judgement [{_number(judgement['score'])}] {_clip_line(judgement['text'])}")
    return "\n".join(lines)
