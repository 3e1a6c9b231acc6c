"""Each benchmark's own score (judging/official.py) against values worked out by hand on crafted pairs,
and JudgeBench's against a transcription of its own scoring code on a random both-order file."""

from __future__ import annotations

import math
import random

import pytest

from metareward.config import EvalEscalationConfig
from metareward.judging.cascade import cascade
from metareward.judging.judge_metrics import JudgedPair, Verdict
from metareward.judging.official import judgebench_credit, official_score, pair_credit


def pair(label: str, *winners: str | None, subset: str | None = None, pid: str = "") -> JudgedPair:
    """A pair judged in len(winners) orders (A shown first, then B), or once (pointwise)."""
    firsts = ("A", "B") if len(winners) == 2 else (None,)
    verdicts = tuple(Verdict(w, first=f) for w, f in zip(winners, firsts, strict=True))
    return JudgedPair(label, 10, 20, verdicts, len(verdicts), 0, subset=subset, pair_id=pid)


# ---------------------------------------------------------------- JudgeBench


def test_judgebench_counts_a_pair_only_when_its_orders_sum_above_zero():
    judged = [
        pair("A", "A", "A", subset="mmlu-pro-math"),  # +2: counts
        pair("A", "A", "B", subset="mmlu-pro-law"),  # 0: inconsistent, no credit
        pair("B", "B", None, subset="livebench-math"),  # +1: counts
        pair("B", None, None, subset="livebench-math"),  # 0
        pair("A", "B", "B", subset="livecodebench"),  # -2
        pair("B", "tie", "B", subset="livebench-reasoning"),  # +1: counts
    ]
    official = official_score("ab", judged)
    assert official["metric"] == "judgebench" and official["pairs"] == 6
    assert official["score"] == pytest.approx(100 * 3 / 6)
    # mmlu-pro-math is knowledge (by prefix), not math.
    assert official["categories"] == {"knowledge": 50.0, "reasoning": 100.0, "math": 50.0, "coding": 0.0}
    assert [judgebench_credit(j) for j in judged] == [1, 0, 1, 0, 0, 1]


def _judgebench_transcribed(rows: list[dict]) -> float:
    """ScalerLab/JudgeBench utils/metrics.py compute_final_metrics(pairs, reverse_order=True), transcribed."""

    def flip(decision):
        return {"A>B": "B>A", "B>A": "A>B"}.get(decision, decision)

    correct = 0
    for row in rows:
        label = row["label"]
        decisions = [row["judgments"][0]["decision"], flip(row["judgments"][1]["decision"])]
        counter = sum(1 if d == label else -1 if d == flip(label) else 0 for d in decisions)
        correct += counter > 0
    return 100 * correct / len(rows)


def test_judgebench_equals_the_benchmarks_own_formula_on_a_random_both_order_file():
    rng = random.Random(3)
    decisions = ["A>B", "B>A", "A=B", None]
    rows = [
        {
            "label": rng.choice(["A>B", "B>A"]),
            "judgments": [{"decision": rng.choice(decisions)}, {"decision": rng.choice(decisions)}],
        }
        for _ in range(200)
    ]
    # Ours: verdicts are sides of the pair, the second order mapped back (B>A shown swapped names A).
    side = {"A>B": "A", "B>A": "B", "A=B": "tie", None: None}
    swapped = {"A>B": "B", "B>A": "A", "A=B": "tie", None: None}
    judged = [
        pair(
            side[row["label"]],
            side[row["judgments"][0]["decision"]],
            swapped[row["judgments"][1]["decision"]],
        )
        for row in rows
    ]
    assert official_score("ab", judged)["score"] == pytest.approx(_judgebench_transcribed(rows))


# ---------------------------------------------------------------- RewardBench


def test_rewardbench_weighs_subsets_into_sections_and_prior_sets_at_half_a_section():
    judged = [
        pair("A", "A", "A", subset="alpacaeval-easy"),  # 1
        pair("A", "A", "B", subset="alpacaeval-easy"),  # 0.5
        pair("A", "B", "B", subset="mt-bench-easy"),  # 0
        pair("A", "A", None, subset="llmbar-natural"),  # 0.75
        pair("A", "tie", subset="donotanswer"),  # pointwise tie: 0.5
        pair("A", "A", "A", subset="math-prm"),  # 1, weighed 984
        pair("A", "B", "B", subset="hep-python"),  # 0, weighed 164
        pair("A", "A", "A", subset="shp"),  # prior set: 1
        pair("A", "B", "B", subset="anthropic_hhh"),  # prior set: 0
    ]
    official = official_score("pairs", judged)
    chat = 100 * (0.75 * 100 + 0 * 28) / 128
    chat_hard, safety, reasoning = 75.0, 50.0, 100 * 984 / (984 + 164)
    assert official["metric"] == "rewardbench" and official["complete"]
    assert official["sections"] == pytest.approx(
        {"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning}
    )
    assert official["prior_sets"] == 50.0
    assert official["score"] == pytest.approx((2 * (chat + chat_hard + safety + reasoning) + 50.0) / 9)
    assert official["subsets"]["alpacaeval-easy"] == 75.0


def test_rewardbench_without_prior_sets_is_the_mean_of_its_sections_and_says_when_one_is_missing():
    judged = [pair("A", "A", "A", subset="alpacaeval-easy"), pair("A", "A", "B", subset="donotanswer")]
    official = official_score("pairs", judged)
    assert official["score"] == pytest.approx((100 + 50) / 2)
    assert official["sections"]["Chat Hard"] is None and not official["complete"]


def test_pairs_of_other_subsets_and_llmbar_get_accuracy_averaged_over_the_orders():
    judged = [
        pair("A", "A", "B", subset="mine"),
        pair("A", "A", None, subset="mine"),
        pair("B", "A", "B"),
        pair("tie", "A", "A"),  # a tied label is left out
    ]
    for fmt in ("pairs", "llmbar"):
        official = official_score(fmt, judged)
        # First order: 1, 1, 0; second: 0, 0.5, 1.
        assert official["metric"] == "accuracy" and official["pairs"] == 3
        assert official["orders"] == pytest.approx([200 / 3, 150 / 3])
        assert official["score"] == pytest.approx((200 / 3 + 150 / 3) / 2)


# ---------------------------------------------------------------- PandaLM and Auto-J


def test_pandalm_is_three_classes_with_macro_precision_recall_and_f1():
    judged = [
        pair("A", "A", "A"),  # A / A
        pair("A", "B", "B"),  # A / B
        pair("B", "B", "B"),  # B / B
        pair("tie", "A", "B"),  # tie / tie (split verdicts)
        pair("tie", "A", "A"),  # tie / A
        pair("B", None, None),  # B / tie (no verdict)
    ]
    official = official_score("pandalm", judged)
    # tie: P 1/2, R 1/2; A: P 1/2, R 1/2; B: P 1/2, R 1/2 -> every F1 1/2.
    assert official["metric"] == "pandalm" and official["pairs"] == 6
    assert official["accuracy"] == pytest.approx(100 * 3 / 6)
    assert official["precision"] == pytest.approx(50.0) and official["recall"] == pytest.approx(50.0)
    assert official["f1"] == official["score"] == pytest.approx(50.0)


def test_pandalm_gives_a_class_never_predicted_precision_zero():
    judged = [pair("A", "A", "A"), pair("B", "A", "A"), pair("tie", "A", "A")]
    official = official_score("pandalm", judged)
    # A: P 1/3, R 1; B and tie: never predicted, P 0, R 0.
    assert official["precision"] == pytest.approx(100 * (1 / 3) / 3)
    assert official["recall"] == pytest.approx(100 / 3)
    assert official["f1"] == pytest.approx(100 * (2 * (1 / 3) / (1 / 3 + 1)) / 3)


def test_autoj_agreement_needs_both_orders_on_the_label_and_ties_are_a_class():
    judged = [
        pair("A", "A", "A"),  # agrees, consistent
        pair("A", "A", "B"),  # neither
        pair("B", "A", "A"),  # consistent, wrong
        pair("tie", "tie", "tie"),  # agrees on a tie
        pair("B", None, None),  # no verdict: neither
    ]
    official = official_score("autoj", judged)
    assert official["metric"] == "autoj"
    assert official["agreement"] == official["score"] == pytest.approx(100 * 2 / 5)
    assert official["consistency"] == pytest.approx(100 * 3 / 5)
    pointwise = official_score("autoj", [pair("A", "A"), pair("tie", "tie"), pair("B", "A")])
    assert pointwise["agreement"] == pytest.approx(200 / 3) and pointwise["consistency"] is None


# ---------------------------------------------------------------- a cascade on the benchmark's terms


def test_a_judgebench_cascade_is_priced_on_judgebench_credit():
    # Local: inconsistent on pairs 0 and 1 (no JudgeBench credit, half under the project's rule),
    # right on 2. Strong: right everywhere but pair 2.
    local = [pair("A", "A", "B", pid="0"), pair("A", "B", "A", pid="1"), pair("B", "B", "B", pid="2")]
    strong = [pair("A", "A", "A"), pair("A", "A", "A"), pair("B", "A", "A")]
    cfg = EvalEscalationConfig(signal="order", fraction=None, threshold=0.5, curve_points=4)
    curve = cascade(local, strong, cfg, (None, None), seed=0, credit_of=pair_credit("ab"))
    assert curve["local_accuracy"] == pytest.approx(1 / 3) and curve["strong_accuracy"] == pytest.approx(
        2 / 3
    )
    # The order signal sends the two inconsistent pairs first: escalating them gives 3/3.
    assert [p["accuracy"] for p in curve["curve"]] == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3])
    assert curve["fraction_to_match_strong"] == pytest.approx(1 / 3)
    project = cascade(local, strong, cfg, (None, None), seed=0)
    assert project["local_accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- rows with several candidates


def scored(group: str, slot: tuple[int, int], score_a, score_b, subset: str) -> JudgedPair:
    """A pointwise pair of a best-of-N row: the chosen candidate slot[0] scored score_a, the rejected
    slot[1] score_b (None: unparsed)."""
    winner = (
        None
        if None in (score_a, score_b)
        else "A"
        if score_a > score_b
        else "B"
        if score_b > score_a
        else "tie"
    )
    rows = (({"score": score_a},), ({"score": score_b},))
    return JudgedPair(
        "A", 1, 1, (Verdict(winner),), 2, 0, subset=subset, pair_id=f"{group}/{slot}", score_rows=rows,
        group=group, slot=slot,
    )  # fmt: skip


def best_of_4(group: str, chosen, rejected: list, subset: str = "Math") -> list[JudgedPair]:
    return [scored(group, (0, r), chosen, score, subset) for r, score in enumerate(rejected)]


def test_rewardbench2_best_of_4_splits_a_tie_at_the_top_and_scores_subsets_equally():
    judged = [
        *best_of_4("m1", 5, [3, 4, 2]),  # chosen alone on top: 1
        *best_of_4("m2", 4, [4, 2, 4]),  # three tie at the top: 1/3
        *best_of_4("m3", 3, [4, 1, 1]),  # beaten: 0
        *best_of_4("m4", None, [None, None, None]),  # nothing parsed: 0.25 (the benchmark's error credit)
        *best_of_4("f1", 2, [1, None, 1], subset="Focus"),  # an unparsed candidate cannot win: 1
    ]
    official = official_score("rewardbench2", judged)
    math_score = 100 * (1 + 1 / 3 + 0 + 0.25) / 4
    assert official["metric"] == "rewardbench2" and official["items"] == 5
    assert official["subsets"] == pytest.approx({"Math": math_score, "Focus": 100.0})
    assert official["score"] == pytest.approx((math_score + 100.0) / 2)


def test_rewardbench2_pairwise_needs_the_chosen_to_win_every_comparison():
    def compared(group, *outcomes):
        return [
            JudgedPair(
                "A", 1, 1, (Verdict(o, "A"), Verdict(o, "B")), 2, 0, subset="Math", group=group, slot=(0, r)
            )
            for r, o in enumerate(outcomes)
        ]

    judged = [*compared("a", "A", "A", "A"), *compared("b", "A", None, "A"), *compared("c", "A", "B", "A")]
    assert official_score("rewardbench2", judged)["score"] == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)


def test_rewardbench2_ties_follows_the_benchmarks_weighted_formula():
    def ties_item(item: str, right: list, wrong: list) -> list[JudgedPair]:
        return [scored(item, (c, r), a, b, "Ties") for c, a in enumerate(right) for r, b in enumerate(wrong)]

    judged = [
        # Prompt 1: the reference version (one correct answer) and the tied one (two).
        *ties_item("ref:1", [5], [2, 3]),  # accurate, margin 2
        *ties_item("tied:1", [5, 4], [3, 1]),  # accurate, margin 1, spread 1
        # Prompt 2: the tied version is not accurate.
        *ties_item("ref:2", [4], [1]),  # accurate, margin 3
        *ties_item("tied:2", [4, 2], [3]),  # margin -1, spread 2
    ]
    ref_accuracy, tied_accuracy = 1.0, 0.5
    preferred = (float(1 > 1) + float(-1 > 2)) / 2  # tied margin > spread
    preferred_hard = (float(min(2, 1) > 1) + float(min(3, -1) > 2)) / 2
    gaps = (math.tanh(min(2, 1) / 1 - 1) + math.tanh(min(3, -1) / 2 - 1)) / 2
    expected = 0.3 * tied_accuracy + 0.3 * ref_accuracy + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * gaps
    official = official_score("rewardbench2", judged)
    assert official["subsets"]["Ties"] == pytest.approx(100 * expected)


def test_rmbench_reads_hard_normal_and_easy_off_the_style_matrix():
    # Chosen styles (rows) against rejected styles (columns): concise, detailed plain, markdown.
    wins = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # the chosen one wins when it is at least as detailed
    judged = [
        scored("r1", (i, j), 2.0 if wins[i][j] else 1.0, 1.5, "chat") for i in range(3) for j in range(3)
    ]
    # A math row the judge gets all right, and one where a tie and an unparsed score count as losses.
    judged += [scored("r2", (i, j), 3.0, 1.0, "math") for i in range(3) for j in range(3)]
    judged += [scored("r3", (i, j), 1.0 if i == j else None, 1.0, "math") for i in range(3) for j in range(3)]
    official = official_score("rmbench", judged)
    chat = official["domains"]["chat"]
    assert (chat["hard"], chat["normal"], chat["easy"]) == (0.0, 100.0, 100.0)
    assert chat["score"] == pytest.approx(200 / 3)
    math_domain = official["domains"]["math"]
    assert (math_domain["hard"], math_domain["normal"], math_domain["easy"]) == (50.0, 50.0, 50.0)
    assert official["score"] == pytest.approx((200 / 3 + 50.0) / 2)
    assert official["hard"] == pytest.approx(25.0) and official["items"] == 3


def test_review_edge_cases_pandalm_classes_present_rewardbench_unsubsetted_and_uncounted_sets():
    # No tie anywhere: the macro average is over A and B only (scikit-learn's), so perfect is 100.
    assert official_score("pandalm", [pair("A", "A", "A"), pair("B", "B", "B")])["f1"] == pytest.approx(100.0)
    # A pair of no subset beside RewardBench's belongs to no section (and does not break the sort).
    mixed = [pair("A", "A", "A", subset="alpacaeval-easy"), pair("A", "B", "B", subset=None)]
    assert official_score("pairs", mixed)["sections"]["Chat"] == 100.0
    # The pref-test-sets the overall score does not count still make a RewardBench suite.
    sets = [pair("A", "A", "A", subset="shp"), pair("A", "B", "B", subset="mtbench_human")]
    found = official_score("pairs", sets)
    assert found["metric"] == "rewardbench" and found["prior_sets"] == 100.0
