"""The judge metrics on crafted judged pairs, each number checked against its hand-computed value."""

from __future__ import annotations

import math

import pytest

from metareward.judging.judge_metrics import (
    JudgedPair,
    Verdict,
    expected_calibration_error,
    jensen_shannon,
    suite_metrics,
)


def pairwise(label: str, first_order: str | None, second_order: str | None, **extra) -> JudgedPair:
    """A pair judged in both orders: A shown first, then B shown first; winners are sides of the pair."""
    verdicts = (Verdict(first_order, first="A"), Verdict(second_order, first="B"))
    unparsed = sum(w is None for w in (first_order, second_order))
    fields = {"len_a": 10, "len_b": 20, **extra}
    return JudgedPair(label=label, verdicts=verdicts, calls=2, unparsed=unparsed, **fields)


def metrics(judged: list[JudgedPair]) -> dict:
    return suite_metrics(judged, bootstrap_samples=200, seed=0)


def test_a_stand_in_judge_that_always_picks_the_first_position():
    # Shown A first it says A; shown B first it says B: the orders never agree.
    judged = [pairwise(label, "A", "B") for label in ("A", "B", "A", "tie")]
    m = metrics(judged)
    assert m["position_consistency"] == 0.0
    assert m["first_position_preference"] == 1.0
    # Every pair's votes are even, so the judge ties everywhere: half credit on the 3 labelled pairs.
    assert m["judge_tie_rate"] == 1.0 and m["accuracy"] == 0.5 and m["decided"] == 0
    assert m["label_ties"] == 1 and m["pairs"] == 4
    assert m["parse_failure_rate"] == 0.0


def test_a_stand_in_judge_that_prefers_the_longer_response_where_humans_prefer_the_shorter():
    # B is always the longer (20 > 10 characters) and humans prefer A, the shorter, on 3 of 4 pairs.
    judged = [pairwise(label, "B", "B") for label in ("A", "A", "A", "B")]
    m = metrics(judged)
    assert m["longer_preference"] == 1.0
    assert m["human_longer_preference"] == 0.25
    assert m["accuracy"] == 0.25 and m["decided"] == 4
    assert m["position_consistency"] == 1.0 and m["first_position_preference"] == 0.5


def test_a_stand_in_judge_that_answers_with_the_labels_in_both_protocols():
    labels = ["A", "B", "B", "A", "A"]
    both_orders = [pairwise(label, label, label) for label in labels]
    pointwise = [JudgedPair(label, 10, 20, (Verdict(label),), calls=6, unparsed=0) for label in labels]
    for judged in (both_orders, pointwise):
        m = metrics(judged)
        # Five decided pairs are too few for an interval: null, with the reason.
        assert m["accuracy"] == 1.0 and m["ci_low"] is None and m["ci_high"] is None
        assert m["ci_reason"] == "5 decided pair(s), fewer than the 10 an interval needs"
        assert m["judge_tie_rate"] == 0.0
    # A pointwise comparison has no order: the position metrics do not apply.
    m = metrics(pointwise)
    assert m["position_consistency"] is None and m["first_position_preference"] is None


def test_accuracy_gives_half_credit_to_ties_and_unparsed_pairs_and_leaves_out_label_ties():
    judged = [
        pairwise("A", "A", "A"),  # right: 1
        pairwise("A", "B", "B"),  # wrong: 0
        pairwise("B", None, None),  # no verdict: 0.5, and 2 unparsed calls
        pairwise("B", "B", None),  # one order parsed: B, right: 1
        pairwise("tie", "A", "A"),  # label tie: not in accuracy
    ]
    m = metrics(judged)
    assert m["accuracy"] == pytest.approx(2.5 / 4)
    assert m["label_ties"] == 1 and m["decided"] == 3
    assert m["parse_failure_rate"] == pytest.approx(3 / 10)
    # Position consistency counts only pairs with both orders parsed: 3 of them, all consistent.
    assert m["position_consistency"] == 1.0
    # A judge tie among the pairs with an outcome: none here (the unparsed pair has no outcome).
    assert m["judge_tie_rate"] == 0.0
    assert m["ci_low"] is None and m["ci_high"] is None and m["ci_reason"]


def test_brier_ece_and_jsd_on_hand_computed_probabilities():
    judged = [
        JudgedPair("A", 5, 5, (Verdict("A", prob_a=0.9),), calls=1, unparsed=0, human=(1.0, 0.0)),
        JudgedPair("B", 5, 5, (Verdict("A", prob_a=0.6),), calls=1, unparsed=0, human=(0.5, 0.5)),
        JudgedPair("A", 5, 5, (Verdict("A", prob_a=0.7), Verdict("A", prob_a=0.9)), calls=2, unparsed=0),
    ]
    m = metrics(judged)
    # p(label wins): 0.9, 0.4, 0.8 -> Brier mean((1 - p)^2) = (0.01 + 0.36 + 0.04) / 3.
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.04) / 3)
    # Confidences 0.9 (hit), 0.6 (miss: it picked A, the label is B), 0.8 (hit); bins [0.9, 1), [0.6, 0.7),
    # [0.8, 0.9): |1 - 0.9| + |0 - 0.6| + |1 - 0.8|, each a third.
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    # JSD only where annotators gave a distribution: rows 1 and 2.
    expected = (jensen_shannon((1.0, 0.0), (0.9, 0.1)) + jensen_shannon((0.5, 0.5), (0.6, 0.4))) / 2
    assert m["jsd"] == pytest.approx(expected)
    # The length metrics need unequal lengths: none here.
    assert m["longer_preference"] is None and m["human_longer_preference"] is None


def test_jensen_shannon_in_bits():
    assert jensen_shannon((1.0, 0.0), (0.0, 1.0)) == pytest.approx(1.0)
    assert jensen_shannon((0.3, 0.7), (0.3, 0.7)) == 0.0
    # Against the mixture (0.75, 0.25): KL((1, 0) || m) and KL((0.5, 0.5) || m), averaged.
    kl_p = 1.0 * math.log2(1.0 / 0.75)
    kl_q = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    assert jensen_shannon((1.0, 0.0), (0.5, 0.5)) == pytest.approx((kl_p + kl_q) / 2)


def test_expected_calibration_error_of_a_calibrated_and_an_overconfident_judge():
    # Ten answers at confidence 0.7, seven right: calibrated.
    assert expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    # Always sure (1.0), right half the time.
    assert expected_calibration_error([1.0] * 4, [True, False, True, False]) == pytest.approx(0.5)


def test_subsets_and_metrics_that_do_not_apply():
    judged = [
        pairwise("A", "A", "A", subset="chat"),
        pairwise("B", "A", "A", subset="chat"),
        pairwise("A", "A", "A", subset="math"),
        pairwise("tie", "A", "A", subset="math"),
    ]
    m = metrics(judged)
    assert m["subsets"] == {"chat": {"accuracy": 0.5, "pairs": 2}, "math": {"accuracy": 1.0, "pairs": 1}}
    assert m["brier"] is None and m["ece"] is None and m["jsd"] is None
    empty = metrics([pairwise("tie", "A", "B")])
    assert empty["accuracy"] is None and empty["ci_low"] is None and empty["label_ties"] == 1
