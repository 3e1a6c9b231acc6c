"""Each benchmark's own score of a judge (``"official"`` beside ``accuracy``), computed the way the
benchmark's code computes the figure it publishes, so a result can be set beside its leaderboard::

    official_score("ab", judged)   # {"metric": "judgebench", "score": 65.7, "pairs": 350, ...}

``accuracy`` (judge_metrics.py) gives a judge tie or a missing verdict half a pair; the benchmarks
differ, and each is followed here:

- ``judgebench`` (``ab`` suites; ScalerLab/JudgeBench ``utils/metrics.py``): each order shown is +1
  when it names the label, -1 the other side, 0 a tie or no verdict; a pair counts when its sum is
  above 0 (so one right and one wrong order is no credit); score = 100 x counted / pairs, over all
  pairs, with the categories (knowledge = ``mmlu-pro*`` sources, reasoning, math, coding) beside it.
  One verdict (pointwise) is right or not.
- ``rewardbench`` (``pairs`` suites whose subsets are RewardBench's; allenai/reward-bench
  ``calculate_scores_per_section`` and ``analysis/get_benchmark_results.py``): a verdict is 1 right, 0
  wrong, 0.5 a tie or none (its generative script's rule, which judges one random order: the mean over
  both orders is that draw's expectation); per-subset accuracy, sections (Chat, Chat Hard, Safety,
  Reasoning) weighted by the subsets' example counts, Prior Sets the plain mean of its four sets; score =
  (2 x the four sections + Prior Sets) / 9, or the sections' mean without Prior Sets (the
  leaderboard's two forms). ``complete`` says whether every section had pairs.
- ``pandalm`` (WeOpenML/PandaLM, as its maintainers compute it with scikit-learn): three classes (tie,
  1, 2) against the annotators' majority, a judge's tie or missing verdict being the tie class;
  accuracy and macro precision, recall and F1 (a class never predicted has precision 0); score = F1.
- ``autoj`` (GAIR-NLP/auto-j ``codes/leaderboard/pairwise_eval.py``): agreement = both orders give the
  label (ties a class of their own); consistency = both orders give the same verdict; over all pairs.
  A judge with one verdict per pair (pointwise) has agreement on it and no consistency.
- ``accuracy`` (``llmbar``, other ``pairs``): each order's accuracy (1 right, 0 wrong, 0.5 a tie or
  none), averaged over the orders.

Scores are 0..100; a part that does not apply is None. Pairs whose label is a tie are left out except
where the benchmark scores ties (PandaLM, Auto-J).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from metareward.judging.judge_metrics import SIDES, JudgedPair, mean_or_none

# allenai/reward-bench rewardbench/constants.py: each subset's example count (math-prm is weighted as
# all six hep-* sets together) and the sections they make.
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
# The prior preference sets the overall score counts at half a section's weight (the rest are run but
# not counted).
REWARDBENCH_PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
# JudgeBench's categories, by prefix of a pair's source (mmlu-pro-math is knowledge).
JUDGEBENCH_CATEGORIES = {
    "knowledge": "mmlu-pro",
    "reasoning": "livebench-reasoning",
    "math": "livebench-math",
    "coding": "livecodebench",
}
PANDALM_CLASSES = ("tie", "A", "B")


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def verdict_credit(winner: str | None, label: str) -> float:
    """One verdict's credit against a side: 1 right, 0 the other side, 0.5 a tie or no verdict."""
    return 1.0 if winner == label else 0.0 if winner in SIDES else 0.5


def judgebench_credit(judged: JudgedPair) -> float:
    """1 when the pair counts on JudgeBench's terms (its verdicts' +1/-1 sum is above 0), else 0."""
    total = sum(1 if v.winner == judged.label else -1 if v.winner in SIDES else 0 for v in judged.verdicts)
    return 1.0 if total > 0 else 0.0


def order_credit(judged: JudgedPair) -> float:
    """The mean credit of a pair's verdicts (each order's, or the one pointwise verdict)."""
    return sum(verdict_credit(v.winner, judged.label) for v in judged.verdicts) / len(judged.verdicts)


def pair_credit(fmt: str) -> Callable[[JudgedPair], float] | None:
    """The per-pair credit behind a format's official score where it has one that sums to it (a cascade
    is then priced on the benchmark's terms), else None."""
    return judgebench_credit if fmt == "ab" else None


def official_score(fmt: str, judged: list[JudgedPair]) -> dict:
    """The official score of one suite (all of format ``fmt``) and protocol: ``{"metric", "score",
    ...parts}``; ``score`` None when no pair counts."""
    if fmt == "ab":
        return _judgebench(judged)
    if fmt == "pandalm":
        return _pandalm(judged)
    if fmt == "autoj":
        return _autoj(judged)
    subsets = {j.subset for j in judged if j.subset is not None}
    if fmt == "pairs" and subsets and subsets <= set(REWARDBENCH_COUNTS) | set(REWARDBENCH_PRIOR_SETS):
        return _rewardbench(judged)
    return _order_accuracy(judged)


def _labelled(judged: list[JudgedPair]) -> list[JudgedPair]:
    return [j for j in judged if j.label in SIDES and j.verdicts]


def _judgebench(judged: list[JudgedPair]) -> dict:
    scored = _labelled(judged)
    categories = {}
    for name, prefix in JUDGEBENCH_CATEGORIES.items():
        members = [j for j in scored if (j.subset or "").startswith(prefix)]
        categories[name] = _percent(mean_or_none(judgebench_credit(j) for j in members))
    return {
        "metric": "judgebench",
        "score": _percent(mean_or_none(judgebench_credit(j) for j in scored)),
        "pairs": len(scored),
        "categories": categories,
    }


def _rewardbench(judged: list[JudgedPair]) -> dict:
    by_subset: dict[str, list[float]] = defaultdict(list)
    for j in _labelled(judged):
        by_subset[j.subset].append(order_credit(j))
    subsets = {name: mean_or_none(credits) for name, credits in sorted(by_subset.items())}
    sections = {}
    for section, members in REWARDBENCH_SECTIONS.items():
        present = [name for name in members if name in subsets]
        weight = sum(REWARDBENCH_COUNTS[name] for name in present)
        sections[section] = (
            _percent(sum(subsets[name] * REWARDBENCH_COUNTS[name] for name in present) / weight)
            if present
            else None
        )
    prior = _percent(mean_or_none(subsets[name] for name in REWARDBENCH_PRIOR_SETS if name in subsets))
    known = [value for value in sections.values() if value is not None]
    complete = len(known) == len(sections)
    if not known:
        score = prior
    elif prior is None:
        score = sum(known) / len(known)
    else:
        score = (2 * sum(known) + prior) / (2 * len(known) + 1)
    return {
        "metric": "rewardbench",
        "score": score,
        "sections": sections,
        "prior_sets": prior,
        "complete": complete,
        "subsets": {name: _percent(value) for name, value in subsets.items()},
    }


def _order_accuracy(judged: list[JudgedPair]) -> dict:
    scored = _labelled(judged)
    orders = max((len(j.verdicts) for j in scored), default=0)
    per_order = [
        mean_or_none(verdict_credit(j.verdicts[k].winner, j.label) for j in scored if len(j.verdicts) > k)
        for k in range(orders)
    ]
    return {
        "metric": "accuracy",
        "score": _percent(mean_or_none(per_order)),
        "pairs": len(scored),
        "orders": [_percent(value) for value in per_order],
    }


def _pandalm(judged: list[JudgedPair]) -> dict:
    truth = [j.label for j in judged]
    # A judge's tie, and a pair it gave no verdict on, are the tie class (PandaLM reads them so).
    guess = [j.outcome() if j.outcome() in SIDES else "tie" for j in judged]
    precision, recall, f1 = [], [], []
    for cls in PANDALM_CLASSES:
        hits = sum(t == cls and g == cls for t, g in zip(truth, guess, strict=True))
        predicted, actual = guess.count(cls), truth.count(cls)
        p = hits / predicted if predicted else 0.0
        r = hits / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(judged)
    return {
        "metric": "pandalm",
        "score": _percent(mean_or_none(f1)) if n else None,
        "pairs": n,
        "accuracy": _percent(sum(t == g for t, g in zip(truth, guess, strict=True)) / n) if n else None,
        "precision": _percent(mean_or_none(precision)) if n else None,
        "recall": _percent(mean_or_none(recall)) if n else None,
        "f1": _percent(mean_or_none(f1)) if n else None,
    }


def _autoj(judged: list[JudgedPair]) -> dict:
    both = [j for j in judged if len(j.verdicts) >= 2]
    if both:
        agreement = mean_or_none(float(all(v.winner == j.label for v in j.verdicts)) for j in both)
        consistency = mean_or_none(
            float(j.verdicts[0].winner is not None and len({v.winner for v in j.verdicts}) == 1) for j in both
        )
    else:  # one verdict a pair: agreement on it, and no second order to be consistent with
        agreement = mean_or_none(float(j.outcome() == j.label) for j in judged if j.verdicts)
        consistency = None
    return {
        "metric": "autoj",
        "score": _percent(agreement),
        "pairs": len(judged),
        "agreement": _percent(agreement),
        "consistency": _percent(consistency),
    }
