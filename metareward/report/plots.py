"""The PNG plots of report.html: the per-iteration series of the summary rows (:data:`PLOTS`) and the
latest cascade curves (:data:`CASCADE_PLOT`), each drawn with matplotlib's Agg backend and written
atomically.

A point whose row key is None is left out; a plot with no data at all is not drawn.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

# (file, title, panels [(ylabel, reference y | None, [(label, row key)])] | None: histograms, caption)
PLOTS = [
    ("judge_accuracy.png", "Judge accuracy on the preference suites (95% CI)",
     [("accuracy", 0.5, "acc:")],
     "Should rise over iterations (0 = seed model M_0); a fall means the judge drifts from human taste."),
    ("judge_official.png", "Judge on each benchmark's own terms (0-100)",
     [("official score", None, "official:")],
     "The figure each benchmark publishes, computed its way (JudgeBench, RewardBench sections, PandaLM F1, "
     "Auto-J agreement; else accuracy over both orders): set it beside the benchmark's leaderboard."),
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

CASCADE_PLOT = (
    "escalation.png",
    "Cascade to the strong judge (eval.escalation)",
    "The signal's curve above random's = the local judge knows when it is unsure; where it meets the "
    "dashed line, the cascade matches the strong judge at that share of its cost.",
)


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


def _plain_text(draw):
    """Titles and legends hold suite and model names as typed: a ``$`` in one is a dollar sign, not
    the start of mathtext (which would fail to parse)."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


@_plain_text
def plot(path: Path, rows: list[dict], title: str, panels: list | None) -> bool:
    """One PNG of :data:`PLOTS`, written atomically; False when ``rows`` hold none of its data (error
    bars: K_ci_low/high)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _expand(panels, rows)
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


@_plain_text
def plot_cascades(path: Path, model: str, cascades: dict) -> bool:
    """Accuracy and cost against the escalated share, the signal's curve and random's per suite and
    protocol, with the strong judge's accuracy dashed; False when there is no cascade."""
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


def _save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
