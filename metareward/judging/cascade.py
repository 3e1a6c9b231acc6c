"""The cascade curve in evaluation: a local judge's and a strong judge's answers on the same suite pairs,
mixed as the share escalated to the strong judge grows by the local judge's confidence (and at random
for comparison), with accuracy and cost at each share (``eval.escalation``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metareward.config import EvalEscalationConfig
from metareward.generation import Generator
from metareward.judging.escalation import (
    MATCH_TOLERANCE,
    Prices,
    choose,
    escalation_order,
    fraction_count,
    pair_confidence,
)
from metareward.judging.judge_metrics import SIDES, JudgedPair, credit
from metareward.judging.recorded import RecordedVerdicts


@dataclass(frozen=True)
class Cascade:
    """Evaluation's strong judge: it answers every pair (``strong``, or its ``recorded`` verdicts), and
    :func:`cascade` mixes its answers with the local judge's."""

    cfg: EvalEscalationConfig
    strong: Generator | None
    strong_prices: Prices | None
    local_prices: Prices | None
    recorded: RecordedVerdicts | None = None


def _cost(judged: JudgedPair, prices: Prices | None) -> float:
    return prices.cost(judged.prompt_tokens, judged.completion_tokens) if prices else 0.0


def outcome_credit(judged: JudgedPair) -> float:
    """The project's per-pair credit (judge_metrics.credit of the pair's outcome)."""
    return credit(judged.outcome(), judged.label)


def cascade(
    local: list[JudgedPair],
    strong: list[JudgedPair],
    cfg: EvalEscalationConfig,
    prices: tuple,
    seed: int,
    credit_of: Callable[[JudgedPair], float] = outcome_credit,
) -> dict:
    """Accuracy and cost as the escalated share of a suite's pairs goes from 0 to 1, for ``cfg.signal``
    and for random escalation; ``local[i]`` and ``strong[i]`` are the two judges' answers on pair i,
    ``prices`` (local, strong) their :class:`Prices` or None.

    Accuracy counts human-labelled pairs (ties left out, as in :func:`judge_metrics.suite_metrics`);
    cost is the local judge on every pair plus the strong judge on the escalated ones. ``random_curve``
    is the expectation over uniformly random choices of the escalated pairs (exact, not one draw), and
    so is the signal's curve when the signal is ``random``. ``fraction_to_match_strong`` is the smallest
    k/n, over every k, at which the cascade is within MATCH_TOLERANCE of the strong judge alone;
    ``area_over_random`` the area between the signal's curve and random's (trapezoids over every k/n).
    ``operating_point`` is what the budget (``cfg.fraction`` or ``cfg.threshold``) escalates.
    ``credit_of`` is a pair's credit: the project's by default, a benchmark's own where it has one
    (official.pair_credit), so that the cascade is priced on the benchmark's terms."""
    local_prices, strong_prices = prices
    n = len(local)
    if n == 0:
        return {
            "signal": cfg.signal,
            "items": 0,
            "curve": [],
            "random_curve": [],
            "strong_accuracy": None,
            "local_accuracy": None,
            "fraction_to_match_strong": None,
            "area_over_random": None,
        }
    ids = [str(i) for i in range(n)]
    confidences = {i: pair_confidence(cfg.signal, judged, seed) for i, judged in zip(ids, local, strict=True)}
    labelled = [j.label in SIDES for j in local]
    n_labelled = sum(labelled)
    gain = [
        credit_of(s) - credit_of(lo) if lab else 0.0
        for lo, s, lab in zip(local, strong, labelled, strict=True)
    ]
    local_credit = sum(credit_of(j) for j, lab in zip(local, labelled, strict=True) if lab)
    strong_cost = [_cost(j, strong_prices) for j in strong]
    strong_tokens = [j.prompt_tokens + j.completion_tokens for j in strong]
    base_cost = sum(_cost(j, local_prices) for j in local)

    def accuracy(total_credit: float) -> float | None:
        return total_credit / n_labelled if n_labelled else None

    # Cumulative sums along the signal's order: the cascade at every k.
    order = [int(i) for i in escalation_order(confidences, seed)]
    at_k = [(0.0, 0.0, 0)]
    for i in order:
        credit_sum, cost_sum, tokens = at_k[-1]
        at_k.append((credit_sum + gain[i], cost_sum + strong_cost[i], tokens + strong_tokens[i]))
    total_gain, total_strong_cost, total_tokens = at_k[-1]

    def signal_point(k: int) -> tuple:
        if cfg.signal == "random":
            return random_point(k)
        credit_sum, cost_sum, tokens = at_k[k]
        return accuracy(local_credit + credit_sum), cost_sum, tokens

    def random_point(k: int) -> tuple:
        share = k / n
        return accuracy(local_credit + share * total_gain), share * total_strong_cost, share * total_tokens

    def point(fraction: float, k: int, values: tuple) -> dict:
        acc, cost, tokens = values
        return {
            "fraction": fraction,
            "accuracy": acc,
            "cost_usd": base_cost + cost if strong_prices or local_prices else None,
            "escalated": k,
            "strong_tokens": tokens,
        }

    fractions = [j / (cfg.curve_points - 1) for j in range(cfg.curve_points)]
    curve = [point(f, fraction_count(f, n), signal_point(fraction_count(f, n))) for f in fractions]
    random_curve = [point(f, fraction_count(f, n), random_point(fraction_count(f, n))) for f in fractions]
    strong_accuracy = accuracy(local_credit + total_gain)
    match = None
    area = None
    if strong_accuracy is not None:
        match = next(
            k / n for k in range(n + 1) if signal_point(k)[0] >= strong_accuracy - MATCH_TOLERANCE - 1e-12
        )
        lift = [signal_point(k)[0] - random_point(k)[0] for k in range(n + 1)]
        area = sum((lift[k] + lift[k + 1]) / 2 for k in range(n)) / n
    chosen = choose(confidences, cfg, seed)
    chosen_gain = sum(gain[int(i)] for i in chosen)
    operating = {
        "fraction": cfg.fraction,
        "threshold": cfg.threshold,
        "escalated": len(chosen),
        "accuracy": accuracy(local_credit + chosen_gain),
        "cost_usd": base_cost + sum(strong_cost[int(i)] for i in chosen)
        if strong_prices or local_prices
        else None,
        "strong_tokens": sum(strong_tokens[int(i)] for i in chosen),
    }
    return {
        "signal": cfg.signal,
        "items": n,
        "no_signal": sum(c is None for c in confidences.values()),
        "curve": curve,
        "random_curve": random_curve,
        "strong_accuracy": strong_accuracy,
        "local_accuracy": accuracy(local_credit),
        "fraction_to_match_strong": match,
        "area_over_random": area,
        "strong_cost_usd": total_strong_cost if strong_prices else None,
        "operating_point": operating,
        "escalated_pairs": sorted(int(i) for i in chosen),
        "confidences": [confidences[i] for i in ids],
    }
