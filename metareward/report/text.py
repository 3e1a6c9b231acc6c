"""How a value reads in a table cell or a line of text: a number, or a placeholder where it is missing,
and long texts clipped. Shared by the terminal tables, report.html and the console summaries."""

from __future__ import annotations

CLIP = 600


def cell(value, fmt: str) -> str:
    """``value`` in ``fmt`` ("{:.2f}"), "-" when missing."""
    return "-" if value is None else fmt.format(value)


def number(value, spec: str = ".2f", missing: str = "n/a") -> str:
    """``value`` in ``spec`` (".2f"), ``missing`` when there is none."""
    return missing if value is None else format(value, spec)


def clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else f"{text[:limit].rstrip()} … [{len(text) - limit} more chars]"


def facts(pair: dict, side: str) -> str:
    """Score (and Elo, for a judge pair) and length of one side of a sample pair."""
    found = [f"score {cell(pair[f'{side}_score'], '{:.2f}')}"]
    if f"{side}_elo" in pair:
        found.append(f"elo {cell(pair[f'{side}_elo'], '{:+.2f}')}")
    return ", ".join([*found, f"{pair[f'{side}_length']:g} {pair[f'{side}_length_unit']}"])
