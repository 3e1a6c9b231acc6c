"""The field's judge metrics over judged preference pairs: pure functions, no model.

A judge answers each pair one or more times (:class:`Verdict`: pointwise, one comparison of the two
responses' mean scores; pairwise, one verdict per order shown). :func:`suite_metrics` turns a suite's
:class:`JudgedPair` rows into the numbers ``metareward-eval-judge`` reports per suite and protocol::

    metrics = suite_metrics(judged, bootstrap_samples=1000, seed=0)
    metrics["accuracy"], metrics["position_consistency"], metrics["subsets"]["chat"]["accuracy"]

Conventions (the alpaca_eval annotator table, RewardBench, JudgeBench):
- A pair's outcome is the judge's overall pick: the side with more votes over its verdicts (a "tie"
  verdict gives each side half a vote), "tie" when the votes are even, None when no verdict parsed.
- Accuracy is over pairs whose human label is not a tie (those are counted as ``label_ties``): 1 when
  the outcome is the label, 0 for the other side, 0.5 for a judge tie or no verdict.
- The accuracy's 95% interval is null, with ``ci_reason``, below MIN_DECIDED_FOR_CI decided pairs.
- Lengths are characters. A metric that does not apply (no pair it could be computed on, or a protocol
  without the inputs) is None.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


def mean_or_none(values) -> float | None:
    """The mean, or None for no values."""
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def mean_score(rows) -> float | None:
    """The mean of the parsed scores of one response's judgement rows (None when none parsed)."""
    return mean_or_none([r["score"] for r in rows if r.get("score") is not None])


SIDES = ("A", "B")
# Equal-width confidence bins of the expected calibration error.
ECE_BINS = 10
# Below this many decided pairs a bootstrap interval is too coarse to mean anything (one pair gives a
# zero-width one): it is reported as null, with the reason in "ci_reason".
MIN_DECIDED_FOR_CI = 10


@dataclass(frozen=True)
class Verdict:
    """One judge answer on a pair: ``winner`` is a side of the pair ("A", "B"), "tie", or None (no
    parsable answer); ``first`` the side shown first (None for a pointwise comparison, which shows each
    response on its own); ``prob_a`` the judge's probability that A is the better one, where it has one."""

    winner: str | None
    first: str | None = None
    prob_a: float | None = None


@dataclass(frozen=True)
class JudgedPair:
    """A suite pair with its human label ("A", "B" or "tie"), the human distribution over (A, B) where
    several annotators labelled it, the two responses' lengths, and the judge's verdicts. ``calls`` and
    ``unparsed``: the judge outputs behind the verdicts and how many of them did not parse."""

    label: str
    len_a: int
    len_b: int
    verdicts: tuple[Verdict, ...]
    calls: int
    unparsed: int
    human: tuple[float, float] | None = None
    subset: str | None = None
    pair_id: str = ""
    # Tokens the judge read and wrote on this pair (what an endpoint charges for).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Pointwise: the judgement rows of A and of B (their scores and 0..5 distributions), for escalation.
    score_rows: tuple = field(default=(), compare=False, repr=False)
    # A pair of a row with several candidates (SuitePair.group, SuitePair.slot).
    group: str | None = None
    slot: tuple[int, int] | None = None

    def outcome(self) -> str | None:
        votes = [v.winner for v in self.verdicts if v.winner is not None]
        if not votes:
            return None
        a = sum(1.0 if w == "A" else 0.5 if w == "tie" else 0.0 for w in votes)
        b = len(votes) - a
        return "A" if a > b else "B" if b > a else "tie"

    def prob_a(self) -> float | None:
        """The judge's probability that A is better: the mean over its verdicts that have one."""
        probs = [v.prob_a for v in self.verdicts if v.prob_a is not None]
        return sum(probs) / len(probs) if probs else None

    def longer(self) -> str | None:
        return None if self.len_a == self.len_b else ("A" if self.len_a > self.len_b else "B")


def agreement_stats(outcomes: list[float], bootstrap_samples: int, seed: int) -> dict:
    """Mean of per-item outcomes (1, 0.5 or 0, or any value in [0, 1]), its 95% percentile
    bootstrap interval over items, and the share of 0.5 outcomes (ties).

    Returns ``{"mean", "ci_low", "ci_high", "tie_rate", "n"}``; same seed, same interval."""
    if not outcomes:
        raise ValueError("agreement_stats needs at least one outcome")
    values = np.asarray(outcomes, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(bootstrap_samples, len(values)))
    means = values[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(values.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "tie_rate": float(np.mean(values == 0.5)),
        "n": len(values),
    }


def credit(outcome: str | None, label: str) -> float:
    """A pair's accuracy credit: 1 for the label, 0 for the other side, 0.5 for a tie or no verdict."""
    return 1.0 if outcome == label else 0.0 if outcome in SIDES else 0.5


def jensen_shannon(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    """Jensen-Shannon divergence of two distributions, in bits (0 = equal, 1 = disjoint)."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x, y) -> float:
        return sum(a * math.log2(a / b) for a, b in zip(x, y, strict=True) if a > 0)

    return (kl(p, m) + kl(q, m)) / 2


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (share of items) x |accuracy - mean confidence|, where an
    item's confidence is the probability the judge gave its own pick (>= 0.5 for two sides; at exactly
    0.5 the judge picks nothing, which counts as a miss)."""
    totals: dict[int, list] = defaultdict(lambda: [0, 0.0, 0])
    for confidence, hit in zip(confidences, correct, strict=True):
        b = min(int(confidence * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += confidence
        totals[b][2] += int(hit)
    n = len(confidences)
    return float(sum(count / n * abs(hits / count - conf / count) for count, conf, hits in totals.values()))


def suite_metrics(judged: list[JudgedPair], bootstrap_samples: int, seed: int) -> dict:
    """The metrics of one suite and protocol (keys as in ``metareward-eval-judge``'s JSON)."""
    labelled = [j for j in judged if j.label in SIDES]
    credits = [credit(j.outcome(), j.label) for j in labelled]
    stats = agreement_stats(credits, bootstrap_samples, seed) if credits else None
    outcomes = [j.outcome() for j in judged]
    decided = [j for j in labelled if j.outcome() in SIDES]

    # Position: pairs judged in both orders (pairwise), and every verdict whose order is known.
    ordered = [j for j in judged if sum(v.first is not None for v in j.verdicts) >= 2]
    both_parsed = [j for j in ordered if all(v.winner is not None for v in j.verdicts)]
    consistent = [float(len({v.winner for v in j.verdicts}) == 1) for j in both_parsed]
    placed = [v for j in ordered for v in j.verdicts if v.winner in SIDES]

    by_length = [j for j in judged if j.outcome() in SIDES and j.longer() is not None]
    human_by_length = [j for j in labelled if j.longer() is not None]
    calls = sum(j.calls for j in judged)

    # Calibration of the judge's probability that the human-preferred response wins.
    with_probs = [(j, j.prob_a()) for j in labelled if j.prob_a() is not None]
    p_label = [p if j.label == "A" else 1 - p for j, p in with_probs]
    with_human = [(j, j.prob_a()) for j in judged if j.human is not None and j.prob_a() is not None]

    subsets: dict[str, list[float]] = defaultdict(list)
    for j, earned in zip(labelled, credits, strict=True):
        if j.subset is not None:
            subsets[j.subset].append(earned)
    ci_reason = None
    if len(decided) < MIN_DECIDED_FOR_CI:
        ci_reason = f"{len(decided)} decided pair(s), fewer than the {MIN_DECIDED_FOR_CI} an interval needs"
    interval = stats if stats and ci_reason is None else None
    return {
        "accuracy": stats["mean"] if stats else None,
        "ci_low": interval["ci_low"] if interval else None,
        "ci_high": interval["ci_high"] if interval else None,
        "ci_reason": ci_reason,
        "pairs": len(judged),
        "decided": len(decided),
        "label_ties": sum(j.label == "tie" for j in judged),
        "judge_tie_rate": mean_or_none([float(o == "tie") for o in outcomes if o is not None]),
        "position_consistency": mean_or_none(consistent),
        "first_position_preference": mean_or_none([float(v.winner == v.first) for v in placed]),
        "longer_preference": mean_or_none([float(j.outcome() == j.longer()) for j in by_length]),
        "human_longer_preference": mean_or_none([float(j.label == j.longer()) for j in human_by_length]),
        "parse_failure_rate": sum(j.unparsed for j in judged) / calls if calls else None,
        "brier": mean_or_none([(1 - p) ** 2 for p in p_label]),
        "ece": expected_calibration_error([max(p, 1 - p) for p in p_label], [p > 0.5 for p in p_label])
        if p_label
        else None,
        "jsd": mean_or_none([jensen_shannon(j.human, (p, 1 - p)) for j, p in with_human]),
        "subsets": {
            name: {"accuracy": mean_or_none(c), "pairs": len(c)} for name, c in sorted(subsets.items())
        },
    }
