"""``metareward-eval-judge``'s terminal tables: the judge's skill per preference suite and protocol,
and the cascade to the strong judge (eval.escalation) where one was evaluated."""

from __future__ import annotations

from metareward.report.text import number

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


def official_cells(m: dict) -> list[str]:
    """The benchmark's own metric and score (0..100) of one suite and protocol, "-" without one."""
    official = m.get("official") or {}
    score = official.get("score")
    return [official.get("metric", "-"), "-" if score is None else f"{score:.1f}"]


def format_suite_table(result: dict) -> str:
    """One row per suite and protocol, "-" where a metric does not apply; the benchmark's own score
    (``official``, 0..100, computed its way) after the project's accuracy."""
    titles = [title for _, title, _ in METRIC_COLUMNS]
    header = ["suite", "protocol", titles[0], "official", "score", *titles[1:]]
    lines = [header]
    for name, protocols in result["suites"].items():
        for protocol, m in protocols.items():
            cells = ["-" if m[key] is None else fmt.format(m[key]) for key, _, fmt in METRIC_COLUMNS]
            lines.append([name, protocol, cells[0], *official_cells(m), *cells[1:]])
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
                f"{number(found['local_accuracy'], '.3f')}, strong "
                f"{number(found['strong_accuracy'], '.3f')}, matched at "
                f"{number(found['fraction_to_match_strong'], '.0%')} escalated, area over random "
                f"{number(found['area_over_random'], '+.3f')}"
            )
            lines.append("  escalated  accuracy  random    cost_usd  random")
            for point, chance in zip(found["curve"], found["random_curve"], strict=True):
                lines.append(
                    f"  {point['fraction']:>9.0%}  {number(point['accuracy'], '.3f'):>8}  "
                    f"{number(chance['accuracy'], '.3f'):>6}  {number(point['cost_usd'], '.4f'):>8}  "
                    f"{number(chance['cost_usd'], '.4f'):>6}"
                )
    return "\n".join(lines)
