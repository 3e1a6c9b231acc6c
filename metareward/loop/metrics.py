"""Numbers describing one iteration, computed from its records (pure: no model, no I/O).

:func:`iteration_metrics` returns a dict nested by role; every value is JSON-serialisable
(int, float, None, list or dict). A share, mean or correlation over nothing is ``None``.

``actor``
    ``prompts``; ``responses``; ``mean_response_tokens``; ``cut_off_share`` (``finish_reason == "length"``);
    ``mean_response_score`` (mean over responses of the mean of their parsed judge scores);
    ``score_histogram`` (counts of those response scores in the bins of :data:`SCORE_BIN_EDGES`:
    [0,1), [1,2), [2,3), [3,4), [4,5]); ``num_pairs``; ``chosen_mean_tokens`` and
    ``rejected_mean_tokens`` (``num_tokens`` of the responses named by the actor pairs);
    ``prompts_skipped`` ({reason: prompts}, from the ``skipped_<reason>`` pair stats);
    ``verdict_cue_responses`` (responses holding a score or verdict line a judge's own answer would
    end with, "Score: 5" or "Winner: ...": an actor learning to write the judge's verdict for it).
``judge``
    ``judgements``; ``scored``; ``parse_failure_rate`` (share whose ``score_source`` is not
    ``"text"``); ``mean_score`` and ``score_stdev`` (population, over all parsed scores: score
    inflation); ``mean_within_response_variance`` (population variance of a response's scores,
    averaged over responses with >= 2); ``score_length_correlation`` (Pearson r between a
    judgement's score and the judged response's ``num_tokens``; None under 3 points or with a
    constant side); ``mean_score_entropy`` (mean entropy, in nats, of ``score_probs``);
    ``cut_off_share``; ``num_pairs``.
``meta_judge``
    ``verdicts``; ``parse_failure_rate`` (``winner_source`` not ``"text"``); ``no_verdict_share``;
    ``first_position_win_share`` (W1 / (W1 + W2)); ``order_agreement`` (over pairs of judgements
    compared in both orders with a verdict both times: share where the same judgement won both);
    ``higher_score_win_share`` (over verdicts with a winner between judgements with different
    scores: share won by the higher-scoring judgement).
``train``
    From the training log (``{}`` without one): ``loss`` and ``first_loss`` (last and first
    logged step), ``rewards_margins``, ``rewards_accuracies``, ``rewards_chosen``,
    ``rewards_rejected`` (last logged values), ``steps``, ``train_runtime``.

:func:`metareward.report.tracking.flatten` turns the nested dict into ``"judge/mean_score"``-style keys for a
tracker.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from metareward.judging.judge_metrics import mean_or_none
from metareward.judging.parsing import parse_pairwise_winner, parse_score, parse_winner

# Unit bins over the 0..5 judge scale; the last bin is closed ([4, 5]).
SCORE_BIN_EDGES = [0, 1, 2, 3, 4, 5]

TRAIN_KEYS = {
    "rewards_margins": "rewards/margins",
    "rewards_accuracies": "rewards/accuracies",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
}


def _num(value) -> float | None:
    """A finite float, or None (missing, NaN and inf alike)."""
    if value is None or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value)


def _share(flags) -> float | None:
    return mean_or_none([1.0 if flag else 0.0 for flag in flags])


def _scores_by_response(judgements: list[dict]) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = defaultdict(list)
    for j in judgements:
        if (score := _num(j.get("score"))) is not None:
            scores[j["response_id"]].append(score)
    return scores


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or min(xs) == max(xs) or min(ys) == max(ys):
        return None
    return statistics.correlation(xs, ys)


def _entropy(probs: list[float]) -> float:
    return -math.fsum(p * math.log(p) for p in probs if p > 0)


def score_histogram(scores: list[float]) -> list[int]:
    """Counts over the bins of :data:`SCORE_BIN_EDGES` (scores outside 0..5 go to the end bins)."""
    counts = [0] * (len(SCORE_BIN_EDGES) - 1)
    for score in scores:
        counts[min(max(int(score), 0), len(counts) - 1)] += 1
    return counts


def actor_metrics(
    prompts: list[dict], responses: list[dict], judgements: list[dict], actor_pairs: list[dict], stats: dict
) -> dict:
    tokens = {r["response_id"]: r["num_tokens"] for r in responses}
    response_scores = [mean_or_none(s) for s in _scores_by_response(judgements).values()]
    return {
        "prompts": len(prompts),
        "responses": len(responses),
        "mean_response_tokens": mean_or_none(r["num_tokens"] for r in responses),
        "cut_off_share": _share(r.get("finish_reason") == "length" for r in responses),
        "mean_response_score": mean_or_none(response_scores),
        "score_histogram": score_histogram(response_scores),
        "num_pairs": len(actor_pairs),
        "chosen_mean_tokens": mean_or_none(
            tokens[p["chosen_id"]] for p in actor_pairs if p["chosen_id"] in tokens
        ),
        "rejected_mean_tokens": mean_or_none(
            tokens[p["rejected_id"]] for p in actor_pairs if p["rejected_id"] in tokens
        ),
        "prompts_skipped": {
            key.removeprefix("skipped_"): value for key, value in stats.items() if key.startswith("skipped_")
        },
        "verdict_cue_responses": sum(holds_verdict_cue(r["text"]) for r in responses),
    }


def holds_verdict_cue(text: str) -> bool:
    """Whether ``text`` holds what the judges' parsers read as a score or a verdict."""
    return any(read(text) is not None for read in (parse_score, parse_winner, parse_pairwise_winner))


def judge_metrics(responses: list[dict], judgements: list[dict], judge_pairs: list[dict]) -> dict:
    tokens = {r["response_id"]: r["num_tokens"] for r in responses}
    scores = [s for j in judgements if (s := _num(j.get("score"))) is not None]
    variances = [statistics.pvariance(s) for s in _scores_by_response(judgements).values() if len(s) >= 2]
    points = [
        (s, float(tokens[j["response_id"]]))
        for j in judgements
        if (s := _num(j.get("score"))) is not None and j["response_id"] in tokens
    ]
    return {
        "judgements": len(judgements),
        "scored": len(scores),
        "parse_failure_rate": _share(j.get("score_source") != "text" for j in judgements),
        "mean_score": mean_or_none(scores),
        "score_stdev": statistics.pstdev(scores) if scores else None,
        "mean_within_response_variance": mean_or_none(variances),
        "score_length_correlation": _pearson([p[0] for p in points], [p[1] for p in points]),
        "mean_score_entropy": mean_or_none(
            _entropy(j["score_probs"]) for j in judgements if j.get("score_probs")
        ),
        "cut_off_share": _share(j.get("finish_reason") == "length" for j in judgements),
        "num_pairs": len(judge_pairs),
    }


def _winning_id(verdict: dict) -> str | None:
    return {"first": verdict["first_id"], "second": verdict["second_id"]}.get(verdict.get("winner"))


def order_agreement(verdicts: list[dict]) -> float | None:
    """Share of judgement pairs, judged in both orders with a verdict each time, won by the same one."""
    won = {(v["response_id"], v["first_id"], v["second_id"]): _winning_id(v) for v in verdicts}
    agree = [
        won[(rid, a, b)] == won[(rid, b, a)]
        for (rid, a, b), winner in won.items()
        if a < b and winner is not None and won.get((rid, b, a)) is not None
    ]
    return _share(agree)


def higher_score_win_share(judgements: list[dict], verdicts: list[dict]) -> float | None:
    """Among verdicts with a winner between judgements of different scores: won by the higher score."""
    score = {j["judgement_id"]: _num(j.get("score")) for j in judgements}
    wins = []
    for v in verdicts:
        first, second = score.get(v["first_id"]), score.get(v["second_id"])
        if v.get("winner") in ("first", "second") and None not in (first, second) and first != second:
            wins.append((v["winner"] == "first") == (first > second))
    return _share(wins)


def meta_judge_metrics(judgements: list[dict], verdicts: list[dict]) -> dict:
    first = sum(v.get("winner") == "first" for v in verdicts)
    second = sum(v.get("winner") == "second" for v in verdicts)
    return {
        "verdicts": len(verdicts),
        "parse_failure_rate": _share(v.get("winner_source") != "text" for v in verdicts),
        "no_verdict_share": _share(v.get("winner") is None for v in verdicts),
        "first_position_win_share": first / (first + second) if first + second else None,
        "order_agreement": order_agreement(verdicts),
        "higher_score_win_share": higher_score_win_share(judgements, verdicts),
    }


def train_metrics(training: dict | None) -> dict:
    if training is None:
        return {}
    history = training.get("log_history", [])
    losses = [e["loss"] for e in history if "loss" in e]

    def last(key: str):
        return next((_num(e[key]) for e in reversed(history) if key in e), None)

    return {
        "loss": _num(losses[-1]) if losses else None,
        "first_loss": _num(losses[0]) if losses else None,
        **{name: last(key) for name, key in TRAIN_KEYS.items()},
        "steps": int(training.get("global_steps", len(losses))),
        "train_runtime": last("train_runtime"),
    }


def iteration_metrics(
    prompts: list[dict],
    responses: list[dict],
    judgements: list[dict],
    verdicts: list[dict],
    actor_pairs: list[dict],
    judge_pairs: list[dict],
    pair_stats: dict,
    training: dict | None,
) -> dict:
    """Every number of one iteration, nested by role (see the module docstring for the keys)."""
    return {
        "actor": actor_metrics(prompts, responses, judgements, actor_pairs, pair_stats.get("actor", {})),
        "judge": judge_metrics(responses, judgements, judge_pairs),
        "meta_judge": meta_judge_metrics(judgements, verdicts),
        "train": train_metrics(training),
    }
