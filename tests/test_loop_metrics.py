"""Iteration metrics on small hand-made records, every number worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from metareward.loop.metrics import (
    higher_score_win_share,
    iteration_metrics,
    judge_metrics,
    meta_judge_metrics,
    order_agreement,
    score_histogram,
    train_metrics,
)
from metareward.report.tracking import flatten

UNIFORM = [1 / 6] * 6


def response(rid: str, tokens: int, finish: str = "stop", text: str = "An answer.") -> dict:
    return {
        "prompt_id": rid.split("/")[0],
        "response_id": rid,
        "text": text,
        "num_tokens": tokens,
        "finish_reason": finish,
    }


def judgement(jid: str, score, source="text", probs=None, finish="stop") -> dict:
    rid = jid.rsplit("/", 1)[0]
    return {
        "response_id": rid,
        "judgement_id": jid,
        "score": score,
        "score_source": source,
        "score_probs": probs,
        "finish_reason": finish,
    }


def verdict(first: str, second: str, winner, source="text") -> dict:
    return {
        "response_id": "p1/r0",
        "first_id": f"p1/r0/{first}",
        "second_id": f"p1/r0/{second}",
        "winner": winner,
        "winner_source": source,
    }


PROMPTS = [{"prompt_id": "p1", "messages": []}, {"prompt_id": "p2", "messages": []}]
RESPONSES = [
    response("p1/r0", 10),
    response("p1/r1", 20, "length"),
    response("p1/r2", 30, text="Done. **Score:** 5"),
    response("p2/r0", 40, text="Either.\nWinner: Judgement B"),
]
JUDGEMENTS = [
    judgement("p1/r0/j0", 4.0, probs=UNIFORM),
    judgement("p1/r0/j1", 2.0, probs=[0, 0, 0, 0, 1, 0]),
    judgement("p1/r1/j0", 5.0, finish="length"),
    judgement("p1/r1/j1", None, source=None),
    judgement("p1/r2/j0", 1.0, source="expected"),
    judgement("p2/r0/j0", None, source=None),
]
# Judgements j0..j3 of p1/r0 with scores 4, 2, 2, None, and verdicts over them.
META_JUDGEMENTS = [
    judgement("p1/r0/j0", 4.0),
    judgement("p1/r0/j1", 2.0),
    judgement("p1/r0/j2", 2.0),
    judgement("p1/r0/j3", None, source=None),
]
VERDICTS = [
    verdict("j0", "j1", "first"),  # j0 wins       higher score wins
    verdict("j1", "j0", "second"),  # j0 wins again: agree; higher score wins
    verdict("j0", "j2", "first"),  # j0 wins       higher score wins
    verdict("j2", "j0", "first"),  # j2 wins: disagree; lower score wins
    verdict("j1", "j2", None, source=None),  # no verdict: pair {j1, j2} has no agreement value
    verdict("j2", "j1", "second", source="probs"),  # equal scores: not in higher_score_win_share
    verdict("j0", "j3", "first"),  # one order only; j3 has no score
]
ACTOR_STATS = {"prompts": 2, "pairs": 1, "skipped_no_scored_responses": 1, "skipped_all_equal_scores": 0}
TRAINING = {
    "log_history": [
        {"loss": 0.69, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "step": 1},
        {
            "loss": 0.5,
            "rewards/chosen": 0.3,
            "rewards/rejected": -0.1,
            "rewards/margins": 0.4,
            "rewards/accuracies": 1.0,
            "grad_norm": 2.0,
            "learning_rate": 1e-6,
            "step": 2,
        },
        {"train_runtime": 3.25, "train_loss": 0.595, "step": 2},
    ],
    "train_pairs": 2,
    "global_steps": 2,
}


def test_actor_metrics():
    metrics = iteration_metrics(
        PROMPTS,
        RESPONSES,
        JUDGEMENTS,
        [],
        [{"chosen_id": "p1/r0", "rejected_id": "p1/r2"}],
        [],
        {"actor": ACTOR_STATS, "judge": {}},
        None,
    )
    actor = metrics["actor"]
    assert actor["prompts"] == 2 and actor["responses"] == 4
    assert actor["mean_response_tokens"] == 25.0
    assert actor["cut_off_share"] == 0.25
    # Response means: r0 (4+2)/2 = 3, r1 5 (None left out), r2 1; p2/r0 has no score.
    assert actor["mean_response_score"] == 3.0
    assert actor["score_histogram"] == [0, 1, 0, 1, 1]
    assert actor["num_pairs"] == 1
    assert (actor["chosen_mean_tokens"], actor["rejected_mean_tokens"]) == (10.0, 30.0)
    assert actor["prompts_skipped"] == {"no_scored_responses": 1, "all_equal_scores": 0}
    # A response that ends as a judge's answer would ("Score: 5", "Winner: ...") is flagged.
    assert actor["verdict_cue_responses"] == 2
    assert metrics["train"] == {}


def test_score_histogram_bins():
    # [0,1) [1,2) [2,3) [3,4) [4,5]: 5.0 falls in the last, closed bin.
    assert score_histogram([0.0, 0.99, 1.0, 2.5, 3.999, 4.0, 5.0]) == [2, 1, 1, 1, 2]
    assert score_histogram([]) == [0, 0, 0, 0, 0]


def test_judge_metrics():
    judge = judge_metrics(RESPONSES, JUDGEMENTS, [{"chosen_id": "x"}])
    assert judge["judgements"] == 6 and judge["scored"] == 4
    assert judge["parse_failure_rate"] == 0.5  # two without a score, one expected
    assert judge["mean_score"] == 3.0
    assert judge["score_stdev"] == pytest.approx(math.sqrt(2.5))  # deviations 1, -1, 2, -2
    assert judge["mean_within_response_variance"] == 1.0  # only p1/r0 has two: pvariance(4, 2)
    # Points (4, 10), (2, 10), (5, 20), (1, 30): sum dx*dy = -20, sum dx^2 = 10, sum dy^2 = 275.
    assert judge["score_length_correlation"] == pytest.approx(-20 / math.sqrt(10 * 275))
    assert judge["mean_score_entropy"] == pytest.approx(math.log(6) / 2)  # uniform and one-hot
    assert judge["cut_off_share"] == pytest.approx(1 / 6)
    assert judge["num_pairs"] == 1


def test_entropy_of_uniform_is_ln6():
    judge = judge_metrics(RESPONSES, [judgement("p1/r0/j0", 3.0, probs=UNIFORM)], [])
    assert judge["mean_score_entropy"] == pytest.approx(math.log(6))


@pytest.mark.parametrize(
    "scores, lengths",
    [
        ([4.0, 2.0], [10, 20]),  # fewer than 3 points
        ([3.0, 3.0, 3.0], [10, 20, 30]),  # constant scores
        ([1.0, 2.0, 3.0], [10, 10, 10]),  # constant lengths
    ],
)
def test_correlation_is_none_when_undefined(scores, lengths):
    responses = [response(f"p1/r{k}", n) for k, n in enumerate(lengths)]
    judgements = [judgement(f"p1/r{k}/j0", s) for k, s in enumerate(scores)]
    assert judge_metrics(responses, judgements, [])["score_length_correlation"] is None


def test_meta_judge_metrics():
    meta = meta_judge_metrics(META_JUDGEMENTS, VERDICTS)
    assert meta["verdicts"] == 7
    assert meta["parse_failure_rate"] == pytest.approx(2 / 7)
    assert meta["no_verdict_share"] == pytest.approx(1 / 7)
    assert meta["first_position_win_share"] == pytest.approx(4 / 6)
    assert meta["order_agreement"] == 0.5  # {j0,j1} agree, {j0,j2} disagree
    assert meta["higher_score_win_share"] == 0.75


def test_order_agreement_and_higher_score_edge_cases():
    assert order_agreement([]) is None
    assert order_agreement(VERDICTS[4:]) is None  # no pair with a verdict in both orders
    assert order_agreement(VERDICTS[:2]) == 1.0
    assert higher_score_win_share(META_JUDGEMENTS, VERDICTS[4:]) is None
    assert meta_judge_metrics([], [])["first_position_win_share"] is None


def test_train_metrics():
    assert train_metrics(None) == {}
    train = train_metrics(TRAINING)
    assert train == {
        "loss": 0.5,
        "first_loss": 0.69,
        "rewards_margins": 0.4,
        "rewards_accuracies": 1.0,
        "rewards_chosen": 0.3,
        "rewards_rejected": -0.1,
        "steps": 2,
        "train_runtime": 3.25,
    }
    assert train_metrics({"log_history": []})["loss"] is None


def test_empty_iteration_is_json_serialisable():
    metrics = iteration_metrics([], [], [], [], [], [], {}, {"log_history": [{"loss": float("nan")}]})
    json.dumps(metrics, allow_nan=False)
    assert metrics["actor"]["mean_response_score"] is None
    assert metrics["judge"]["parse_failure_rate"] is None
    assert metrics["train"]["loss"] is None


def test_flatten():
    nested = {
        "iteration": 2,
        "judge": {"mean_score": 3.5, "score_length_correlation": None},
        "actor": {"score_histogram": [1, 2], "prompts_skipped": {"no_scored_responses": 3}, "name": "x"},
        "pairs": {"trained_on_judge_pairs": True},
    }
    assert flatten(nested) == {
        "iteration": 2,
        "judge/mean_score": 3.5,
        "actor/prompts_skipped/no_scored_responses": 3,
        "pairs/trained_on_judge_pairs": 1,
    }
    assert flatten({"a": 1}, prefix="eval/") == {"eval/a": 1}
