"""Behaviour tests for metareward.loop.pairs: hand-computed examples plus hypothesis properties."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from metareward.loop.elo import battle_matrix, fit_elo, positional_weights
from metareward.loop.pairs import (
    actor_pairs,
    judge_pairs,
    judge_target_responses,
    judgement_n,
    response_k,
    usable_judgements,
)
from metareward.store import layout
from tests.helpers import CHAIN_RUN, run_cli

# ---------------------------------------------------------------- builders


def prompt(pid):
    return {"prompt_id": pid, "messages": [{"role": "user", "content": f"question {pid}"}]}


def response(pid, k, tokens):
    rid = f"{pid}/r{k}"
    return {
        "prompt_id": pid,
        "response_id": rid,
        "text": f"answer {rid}",
        "num_tokens": tokens,
        "finish_reason": "stop",
    }


def judgement(rid, n, score, finish="stop"):
    jid = f"{rid}/j{n}"
    return {
        "response_id": rid,
        "judgement_id": jid,
        "text": f"judging {jid}",
        "score": score,
        "score_probs": None,
        "finish_reason": finish,
    }


def judgements_for(rid, scores, start=0):
    return [judgement(rid, start + n, s) for n, s in enumerate(scores)]


def meta(first, second, winner):
    rid = first.rpartition("/j")[0]
    return {"response_id": rid, "first_id": first, "second_id": second, "text": "...", "winner": winner}


def judge_prompt(messages, text):
    return [{"role": "user", "content": f"judge: {messages[-1]['content']} -> {text}"}]


def by_id(rows):
    return {row["prompt_id"]: row for row in rows}


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- ids


def test_ids_parse_the_last_marker():
    assert response_k("a/rb/r12") == 12
    assert judgement_n("p/r3/j07") == 7
    with pytest.raises(ValueError):
        response_k("p/j3")
    with pytest.raises(ValueError):
        judgement_n("p/r3/jx")


# ---------------------------------------------------------------- actor pairs


def test_score_ties_prefer_higher_score_then_lower_k():
    # S: r1=5, r3=4.5, r4=5 (all 20 tokens) on top; r0=1, r2=1.5, r5=1 (all 5 tokens) at the bottom.
    means = {1: 5.0, 3: 4.5, 4: 5.0, 0: 1.0, 2: 1.5, 5: 1.0}
    responses = [response("p", k, 20 if s > 3 else 5) for k, s in means.items()]
    judgements = [judgement(f"p/r{k}", 0, s) for k, s in means.items()]
    # D = 4, rho = 0.2: top tier S >= 4.2 -> {r1, r3, r4}; bottom tier S <= 1.8 -> {r0, r2, r5}.
    pairs, stats = actor_pairs([prompt("p")], responses, judgements, rho=0.2)
    assert stats["pairs"] == 1
    assert (pairs[0]["chosen_id"], pairs[0]["rejected_id"]) == ("p/r1", "p/r0")
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (5.0, 1.0)


def test_rho_picks_shorter_chosen_and_longer_rejected():
    responses = [response("p", 0, 300), response("p", 1, 50), response("p", 2, 10), response("p", 3, 400)]
    judgements = [judgement(f"p/r{k}", 0, s) for k, s in enumerate([5.0, 4.0, 1.0, 2.0])]
    strict, _ = actor_pairs([prompt("p")], responses, judgements, rho=0.0)
    assert (strict[0]["chosen_id"], strict[0]["rejected_id"]) == ("p/r0", "p/r2")
    # rho = 0.25, D = 4: top tier S >= 4 -> {r0, r1}, bottom tier S <= 2 -> {r2, r3}.
    controlled, _ = actor_pairs([prompt("p")], responses, judgements, rho=0.25)
    row = controlled[0]
    assert (row["chosen_id"], row["rejected_id"]) == ("p/r1", "p/r3")
    assert (row["chosen_tokens"], row["rejected_tokens"]) == (50, 400)
    assert row["prompt"] == prompt("p")["messages"]
    assert row["chosen"] == [{"role": "assistant", "content": "answer p/r1"}]
    assert row["rejected"] == [{"role": "assistant", "content": "answer p/r3"}]


def test_threshold_tolerates_float_rounding():
    # 1.1 - 0.4 * (1.1 - 0.1) evaluates to 0.7000000000000001 > 0.7, yet r1 (S = 0.7) is in the top tier.
    responses = [response("p", 0, 100), response("p", 1, 10), response("p", 2, 50)]
    judgements = [judgement("p/r0", 0, 1.1), judgement("p/r1", 0, 0.7), judgement("p/r2", 0, 0.1)]
    pairs, _ = actor_pairs([prompt("p")], responses, judgements, rho=0.4)
    assert pairs[0]["chosen_id"] == "p/r1"


def test_no_actor_pair_without_two_distinct_scores():
    prompts = [prompt("same"), prompt("one"), prompt("none"), prompt("empty")]
    responses = [
        response("same", 0, 5),
        response("same", 1, 9),
        response("one", 0, 5),
        response("one", 1, 5),
        response("none", 0, 5),
    ]
    judgements = (
        judgements_for("same/r0", [3.0, 4.0])
        + judgements_for("same/r1", [3.5])
        + judgements_for("one/r0", [2.0])
        + judgements_for("one/r1", [None, None])
        + judgements_for("none/r0", [None])
    )
    pairs, stats = actor_pairs(prompts, responses, judgements, rho=0.0)
    assert pairs == []
    assert stats == {
        "prompts": 4,
        "pairs": 0,
        "skipped_no_scored_responses": 2,
        "skipped_one_scored_response": 1,
        "skipped_all_equal_scores": 1,
    }


def test_none_scores_are_left_out_of_the_mean():
    responses = [response("p", 0, 5), response("p", 1, 5)]
    judgements = judgements_for("p/r0", [4.0, None, 2.0]) + judgements_for("p/r1", [None, 1.0])
    pairs, _ = actor_pairs([prompt("p")], responses, judgements, rho=0.0)
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (3.0, 1.0)


def test_rho_out_of_range_is_refused():
    with pytest.raises(ValueError):
        actor_pairs([], [], [], rho=0.5)


# ---------------------------------------------------------------- judge target


def test_unusable_judgements_do_not_count_for_the_target():
    cut_off = judgement("p/r1", 0, 0.0, "length")
    judgements = (
        judgements_for("p/r0", [1.0, 2.0])
        + [cut_off]
        + judgements_for("p/r1", [5.0, 5.0], start=1)
        + judgements_for("p/r2", [None, 5.0])
    )
    responses = [response("p", k, 5) for k in range(3)]
    assert len(usable_judgements(judgements)) == 5
    # With the cut-off 0.0, r1 would vary most; without it r1 has variance 0 and r2 one usable score.
    assert judge_target_responses(responses, judgements) == {"p": "p/r0"}
    only_unusable = judgements_for("p/r0", [1.0, None]) + [
        judgement("p/r1", 0, 1.0, "length"),
        judgement("p/r1", 1, 4.0),
    ]
    assert judge_target_responses(responses, only_unusable) == {}


def test_variance_ties_go_to_lower_k():
    responses = [response("p", 7, 5), response("p", 5, 5), response("p", 2, 5)]
    judgements = (
        judgements_for("p/r5", [2.0, 4.0])
        + judgements_for("p/r7", [3.0, 3.0, 3.0])
        + judgements_for("p/r2", [1.0, 3.0])
    )
    for seed in range(5):
        random.Random(seed).shuffle(judgements)
        random.Random(seed).shuffle(responses)
        assert judge_target_responses(responses, judgements) == {"p": "p/r2"}


# ---------------------------------------------------------------- verdicts and Elo


def test_positional_weights_hand_example():
    rows = [meta("a/j0", "a/j1", w) for w in ["first", "first", "second", "first", None]]
    assert positional_weights(rows) == (0.25, 0.75)
    assert positional_weights([meta("a/j0", "a/j1", None)]) == (0.0, 0.0)
    assert positional_weights([]) == (0.0, 0.0)


def test_battle_matrix_hand_example():
    ids = ["x/j0", "x/j1", "x/j2"]
    rows = [
        meta("x/j0", "x/j1", "first"),  # j0 wins from first: B[0][1] += w1
        meta("x/j1", "x/j0", "second"),  # j0 wins from second: B[0][1] += w2
        meta("x/j2", "x/j0", "first"),  # B[2][0] += w1
        meta("x/j0", "x/j2", None),  # no verdict
        meta("x/j1", "x/j9", "first"),  # j9 is not among the ids
        meta("x/j1", "x/j1", "first"),  # self-comparison
    ]
    expected = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.0]])
    np.testing.assert_array_equal(battle_matrix(ids, rows, 0.25, 0.75), expected)


def test_elo_two_players_hand_solution():
    a, b, l2 = 3.0, 1.0, 0.01
    eps = fit_elo(np.array([[0.0, a], [b, 0.0]]), l2)
    assert eps[0] > 0 > eps[1]
    assert eps[1] == pytest.approx(-eps[0], abs=1e-12)
    d = eps[0] - eps[1]
    assert a * sigmoid(-d) - b * sigmoid(d) - l2 * eps[0] == pytest.approx(0.0, abs=1e-10)
    # Same optimum by bisection on the scalar condition g(e) = a s(-2e) - b s(2e) - l2 e = 0.
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if a * sigmoid(-2 * mid) - b * sigmoid(2 * mid) - l2 * mid > 0 else (lo, mid)
    assert eps[0] == pytest.approx(lo, abs=1e-9)
    np.testing.assert_allclose(fit_elo(np.array([[0.0, 2.0], [2.0, 0.0]])), [0.0, 0.0], atol=1e-12)


def test_elo_one_sided_stays_finite_and_ordered():
    battles = np.array([[0.0, 5.0, 5.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    eps = fit_elo(battles, 0.01)
    assert np.all(np.isfinite(eps)) and eps[0] > eps[1] > eps[2]


# ---------------------------------------------------------------- judge pairs


def judge_world():
    prompts = [prompt("p"), prompt("q")]
    responses = [response("p", 0, 5), response("p", 2, 5), response("q", 1, 5)]
    judgements = (
        judgements_for("p/r0", [2.0, 5.0])
        + [judgement("p/r0", 2, 1.0, "length")]
        + judgements_for("p/r0", [4.0], start=3)
        + judgements_for("p/r2", [3.0, 3.0])
        + judgements_for("q/r1", [4.0, 3.0])
    )
    j0, j1, j2, j3 = (f"p/r0/j{n}" for n in range(4))
    metas = [
        meta(j1, j0, "first"),
        meta(j0, j1, "second"),  # j1 beats j0 in both orders
        meta(j1, j3, "first"),
        meta(j3, j1, "second"),  # j1 beats j3 in both orders
        meta(j3, j0, "first"),
        meta(j0, j3, "first"),  # j3 vs j0: each wins from first position
        meta(j2, j0, "first"),  # j2 is cut off: counts for W1, not in battles
        meta("q/r1/j0", "q/r1/j1", "first"),
        meta("q/r1/j1", "q/r1/j0", "first"),
    ]
    return prompts, responses, judgements, metas


def test_judge_pair_hand_example():
    pairs, stats = judge_pairs(*judge_world(), judge_prompt=judge_prompt)
    # W1 = 7, W2 = 2 -> w1 = 2/9, w2 = 7/9.
    # For p: B[j1][j0] = B[j1][j3] = w1 + w2 = 1 and B[j3][j0] = B[j0][j3] = w1, so j0 and j3 tie.
    assert stats == {
        "prompts": 2,
        "pairs": 1,
        "skipped_no_variance": 0,
        "skipped_no_verdicts": 0,
        "skipped_elo_tie": 1,
        "first_position_wins": 7,
        "second_position_wins": 2,
        "w1": pytest.approx(2 / 9),
        "w2": pytest.approx(7 / 9),
    }
    row = pairs[0]
    assert (row["prompt_id"], row["response_id"]) == ("p", "p/r0")
    assert (row["chosen_id"], row["rejected_id"]) == ("p/r0/j1", "p/r0/j0")  # j0, j3 tie: lower n
    assert (row["chosen_score"], row["rejected_score"]) == (5.0, 2.0)
    assert row["chosen_elo"] > 0 > row["rejected_elo"]
    assert row["prompt"] == judge_prompt(prompt("p")["messages"], "answer p/r0")
    assert row["chosen"] == [{"role": "assistant", "content": "judging p/r0/j1"}]
    assert row["rejected"] == [{"role": "assistant", "content": "judging p/r0/j0"}]


def test_elo_tie_gives_no_pair():
    # A meta-judge that always prefers the first position: both judgements get equal weight.
    prompts = [prompt("p")]
    responses = [response("p", 0, 5)]
    judgements = judgements_for("p/r0", [1.0, 5.0])
    metas = [
        meta("p/r0/j0", "p/r0/j1", "first"),
        meta("p/r0/j1", "p/r0/j0", "first"),
        meta("z/r0/j0", "z/r0/j1", "second"),
        meta("z/r0/j1", "z/r0/j0", "second"),
    ]
    pairs, stats = judge_pairs(prompts, responses, judgements, metas, judge_prompt)
    assert pairs == [] and stats["skipped_elo_tie"] == 1 and stats["w1"] == 0.5


def test_no_verdicts_or_no_variance_gives_no_pair():
    prompts = [prompt("p"), prompt("q")]
    responses = [response("p", 0, 5), response("q", 0, 5)]
    judgements = judgements_for("p/r0", [1.0, 5.0]) + judgements_for("q/r0", [2.0, 2.0])
    metas = [meta("p/r0/j0", "p/r0/j1", None)]
    pairs, stats = judge_pairs(prompts, responses, judgements, metas, judge_prompt)
    assert pairs == []
    assert (stats["skipped_no_verdicts"], stats["skipped_no_variance"], stats["w1"]) == (1, 1, 0.0)


# ---------------------------------------------------------------- order and format


def shuffled(rows, rng):
    rows = list(rows)
    rng.shuffle(rows)
    return rows


def pair_world():
    """judge_world plus scores that give both prompts an actor pair."""
    prompts, responses, judgements, metas = judge_world()
    judgements += judgements_for("p/r2", [1.0, 4.5], start=2) + judgements_for("q/r1", [0.5], start=2)
    responses.append(response("q", 4, 9))
    judgements += judgements_for("q/r4", [5.0, None])
    return prompts, responses, judgements, metas


def test_shuffling_rows_leaves_output_unchanged():
    prompts, responses, judgements, metas = pair_world()
    expected_actor = actor_pairs(prompts, responses, judgements, rho=0.3)
    expected_judge = judge_pairs(prompts, responses, judgements, metas, judge_prompt)
    assert expected_actor[0] and expected_judge[0]
    rng = random.Random(0)
    for _ in range(10):
        args = [shuffled(rows, rng) for rows in (responses, judgements, metas)]
        assert actor_pairs(prompts, args[0], args[1], rho=0.3) == expected_actor
        assert judge_pairs(prompts, *args, judge_prompt) == expected_judge


def test_rows_load_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    prompts, responses, judgements, metas = pair_world()
    actor, actor_stats = actor_pairs(prompts, responses, judgements, rho=0.0)
    judge, judge_stats = judge_pairs(prompts, responses, judgements, metas, judge_prompt)
    json.dumps(actor_stats), json.dumps(judge_stats)
    for name, rows in [("actor", actor), ("judge", judge)]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
        assert len(loaded) == len(rows) > 0
        assert {"prompt", "chosen", "rejected", "chosen_id", "rejected_id"} <= set(loaded.column_names)
        assert loaded[0]["chosen"] == rows[0]["chosen"]


# Properties of these rules over generated inputs: tests/test_loop_pairs_properties.py.


# ---------------------------------------------------------------- pair options (pairs.*)


def both_orders(a, b, winner):
    """The two verdicts of one comparison, each naming ``winner``."""
    return [
        meta(a, b, "first" if winner == a else "second"),
        meta(b, a, "first" if winner == b else "second"),
    ]


def long_judgement_world():
    """r0's scores vary most only through j1, a 90-token judgement; r1's j3 (80 tokens) wins everything."""
    prompts = [prompt("p")]
    responses = [response("p", 0, 5), response("p", 1, 5)]
    judgements = judgements_for("p/r0", [1.0, 5.0]) + judgements_for("p/r1", [2.0, 4.0, 3.0, 5.0])
    tokens = {"p/r0/j0": 10, "p/r0/j1": 90, "p/r1/j0": 10, "p/r1/j1": 20, "p/r1/j2": 30, "p/r1/j3": 80}
    for j in judgements:
        j["num_tokens"] = tokens[j["judgement_id"]]
    r0, r1 = [f"p/r0/j{n}" for n in range(2)], [f"p/r1/j{n}" for n in range(4)]
    metas = both_orders(r0[0], r0[1], r0[1])
    metas += (
        both_orders(r1[1], r1[0], r1[1]) + both_orders(r1[1], r1[2], r1[1]) + both_orders(r1[2], r1[0], r1[2])
    )
    metas += [m for other in r1[:3] for m in both_orders(r1[3], other, r1[3])]
    return prompts, responses, judgements, metas


def test_max_judgement_tokens_leaves_long_judgements_out_of_the_target_and_the_battles():
    world = long_judgement_world()
    (row,), _ = judge_pairs(*world, judge_prompt)
    # All usable: r0's scores {1, 5} (variance 4) beat r1's {2, 4, 3, 5} (1.25); j1 wins both orders.
    assert (row["chosen_id"], row["rejected_id"]) == ("p/r0/j1", "p/r0/j0")
    (row,), _ = judge_pairs(*world, judge_prompt, max_tokens=50)
    # r0 keeps one usable score; r1's {2, 4, 3} (j3 is too long) is picked, and without j3's battles
    # the chain j1 > j2 > j0 decides.
    assert (row["chosen_id"], row["rejected_id"]) == ("p/r1/j1", "p/r1/j0")
    assert judge_target_responses(world[1], world[2], max_tokens=50) == {"p": "p/r1"}
    assert [j["judgement_id"] for j in usable_judgements(world[2], max_tokens=20)] == [
        "p/r0/j0",
        "p/r1/j0",
        "p/r1/j1",
    ]


def verdict_consistency_world():
    """p: one verdict, for j0 from the first position, its other order without a verdict; q: each wins
    from the second position; u: j1 wins in both orders."""
    prompts = [prompt("p"), prompt("q"), prompt("u")]
    responses = [response("p", 0, 5), response("q", 0, 5), response("u", 0, 5)]
    judgements = (
        judgements_for("p/r0", [1.0, 4.0])
        + judgements_for("q/r0", [2.0, 3.0])
        + judgements_for("u/r0", [2.0, 5.0])
    )
    metas = [
        meta("p/r0/j0", "p/r0/j1", "first"),
        meta("p/r0/j1", "p/r0/j0", None),
        meta("q/r0/j0", "q/r0/j1", "second"),
        meta("q/r0/j1", "q/r0/j0", "second"),
        *both_orders("u/r0/j0", "u/r0/j1", "u/r0/j1"),
    ]
    return prompts, responses, judgements, metas


def test_consistent_verdicts_only_counts_a_comparison_only_when_both_orders_agree():
    world = verdict_consistency_world()
    pairs, stats = judge_pairs(*world, judge_prompt)
    # W1 = 2 (p, u), W2 = 3 (q twice, u): w1 = 3/5, w2 = 2/5. p: B[j0][j1] = 3/5 alone; q: B = w2 both
    # ways, an Elo tie; u: B[j1][j0] = w1 + w2 = 1.
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs] == [
        ("p/r0/j0", "p/r0/j1"),
        ("u/r0/j1", "u/r0/j0"),
    ]
    assert (stats["w1"], stats["skipped_elo_tie"]) == (pytest.approx(3 / 5), 1)
    pairs, stats = judge_pairs(*world, judge_prompt, consistent_only=True)
    # p lacks a verdict in one order and q's orders disagree: only u counts, with 1.
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs] == [("u/r0/j1", "u/r0/j0")]
    assert (stats["skipped_no_verdicts"], stats["skipped_elo_tie"]) == (2, 0)


def test_consistent_battle_matrix_adds_one_per_agreeing_comparison():
    from metareward.loop.elo import consistent_battle_matrix

    ids = ["r/j0", "r/j1", "r/j2"]
    metas = both_orders("r/j0", "r/j1", "r/j1") + both_orders("r/j2", "r/j0", "r/j0")
    metas += [meta("r/j1", "r/j2", "first"), meta("r/j2", "r/j1", "first")]  # each wins when first
    expected = np.zeros((3, 3))
    expected[1, 0] = expected[0, 2] = 1.0
    assert (consistent_battle_matrix(ids, metas) == expected).all()


def cut_off_world():
    prompts = [prompt("p"), prompt("q")]
    responses = [response("p", k, n) for k, n in enumerate([100, 20, 30, 40])]
    responses += [response("q", 0, 10), response("q", 1, 50)]
    for r in responses:
        if r["response_id"] in ("p/r0", "p/r3", "q/r1"):
            r["finish_reason"] = "length"
    judgements = [
        judgement(rid, 0, s) for rid, s in [("p/r0", 5.0), ("p/r1", 4.0), ("p/r2", 1.0), ("p/r3", 0.0)]
    ] + [judgement("q/r0", 0, 5.0), judgement("q/r1", 0, 2.0)]
    return prompts, responses, judgements


def test_exclude_cut_off_responses_pairs_only_finished_responses():
    prompts, responses, judgements = cut_off_world()
    pairs, _ = actor_pairs(prompts, responses, judgements, rho=0.0)
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs] == [("p/r0", "p/r3"), ("q/r0", "q/r1")]
    pairs, stats = actor_pairs(prompts, responses, judgements, rho=0.0, exclude_cut_off=True)
    # p: r0 (5) and r3 (0) were cut off, so r1 (4) over r2 (1); q keeps one finished response.
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs] == [("p/r1", "p/r2")]
    assert (stats["skipped_one_scored_response"], stats["cut_off_responses_left_out"]) == (1, 3)


def score_cap_world():
    """Five prompts whose judge pairs choose a 5, 5, 5, 4 and 3; p2's Elo gap is the widest (three
    judgements in a clear order)."""
    chosen = [5.0, 5.0, 5.0, 4.0, 3.0]
    prompts = [prompt(f"p{i}") for i in range(5)]
    responses = [response(f"p{i}", 0, 5) for i in range(5)]
    judgements, metas = [], []
    for i, score in enumerate(chosen):
        rid = f"p{i}/r0"
        if i == 2:
            judgements += judgements_for(rid, [1.0, score, 3.0])
            j0, j1, j2 = (f"{rid}/j{n}" for n in range(3))
            metas += both_orders(j1, j0, j1) + both_orders(j1, j2, j1) + both_orders(j2, j0, j2)
        else:
            judgements += judgements_for(rid, [1.0, score])
            metas += both_orders(f"{rid}/j0", f"{rid}/j1", f"{rid}/j1")
    return prompts, responses, judgements, metas


def test_judge_chosen_score_cap_keeps_the_most_pairs_with_no_score_above_its_share():
    from metareward.loop.pairs import cap_chosen_scores

    pairs, _ = judge_pairs(*score_cap_world(), judge_prompt)
    assert [r["chosen_score"] for r in pairs] == [5.0, 5.0, 5.0, 4.0, 3.0]
    gaps = [r["chosen_elo"] - r["rejected_elo"] for r in pairs]
    assert gaps[2] > gaps[0] == pytest.approx(gaps[1])
    # Counts {5: 3, 4: 1, 3: 1}. Cap 0.4: at most L of each value with L <= 0.4 * kept(L):
    # L=3 keeps 5 (3 > 2.0), L=2 keeps 4 (2 > 1.6), L=1 keeps 3 (1 <= 1.2): the widest-gap 5, the 4, the 3.
    assert [r["prompt_id"] for r in cap_chosen_scores(pairs, 0.4)] == ["p2", "p3", "p4"]
    # Cap 0.5: L=2 keeps 4 (2 <= 2.0): p2 and, of the equal gaps, the earlier p0.
    assert [r["prompt_id"] for r in cap_chosen_scores(pairs, 0.5)] == ["p0", "p2", "p3", "p4"]
    assert cap_chosen_scores(pairs, 1.0) == pairs
    # A judge that chooses one score only: no share of one value can be below 1, so no judge pairs.
    assert cap_chosen_scores(pairs[:3], 0.9) == []


def write_iteration(iter_dir, prompts, responses, judgements, metas):
    from metareward.store import records

    iter_dir.mkdir(parents=True)
    for name, rows in [
        (layout.PROMPTS, prompts),
        (layout.RESPONSES, responses),
        (layout.JUDGEMENTS, judgements),
        (layout.META_JUDGEMENTS, metas),
    ]:
        records.write_jsonl(iter_dir / name, rows)


def _no_verdicts(world):
    return (*world, [])


PAIR_OPTION_CASES = {
    # option override: (iteration files, pair file, expected (chosen, rejected) without, and with it)
    "pairs.max_judgement_tokens=50": (
        long_judgement_world,
        "judge",
        [("p/r0/j1", "p/r0/j0")],
        [("p/r1/j1", "p/r1/j0")],
    ),
    "pairs.consistent_verdicts_only=true": (
        verdict_consistency_world,
        "judge",
        [("p/r0/j0", "p/r0/j1"), ("u/r0/j1", "u/r0/j0")],
        [("u/r0/j1", "u/r0/j0")],
    ),
    "pairs.exclude_cut_off_responses=true": (
        lambda: _no_verdicts(cut_off_world()),
        "actor",
        [("p/r0", "p/r3"), ("q/r0", "q/r1")],
        [("p/r1", "p/r2")],
    ),
    "pairs.judge_chosen_score_cap=0.4": (
        score_cap_world,
        "judge",
        [(f"p{i}/r0/j1", f"p{i}/r0/j0") for i in range(5)],
        [("p2/r0/j1", "p2/r0/j0"), ("p3/r0/j1", "p3/r0/j0"), ("p4/r0/j1", "p4/r0/j0")],
    ),
}


@pytest.mark.parametrize("override", sorted(PAIR_OPTION_CASES))
def test_pairs_cli_applies_each_option_to_a_saved_iteration(override, tmp_path):
    from metareward.store import records

    world, role, without, with_option = PAIR_OPTION_CASES[override]
    iter_dir = tmp_path / "run" / "iter_1"
    write_iteration(iter_dir, *world())
    name = layout.ACTOR_PAIRS if role == "actor" else layout.JUDGE_PAIRS
    pairs_cli = {"script": "metareward-pairs", "timeout": None, "text": False, "check": True}
    run_cli(str(iter_dir), **pairs_cli)
    run_cli(str(iter_dir), "--out", str(tmp_path / "out"), override, **pairs_cli)

    def ids(path):
        return [(r["chosen_id"], r["rejected_id"]) for r in records.read_jsonl(path)]

    assert ids(iter_dir / name) == without
    assert ids(tmp_path / "out" / name) == with_option


# ---------------------------------------------------------------- what is trained is what is on disk

# The smallest run with actor and judge pairs and two DPO steps (the kill-and-resume chain's).
TRAINED_RUN = CHAIN_RUN


@pytest.mark.slow
def test_pairs_rewritten_between_the_pair_and_dpo_steps_are_the_pairs_trained_on(tmp_path, tiny_model_dir):
    import signal

    from metareward.store import records

    args = [*TRAINED_RUN, f"runs_dir={tmp_path}"]
    killed = run_cli(*args, kill_at="train_step:1", text=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    iter_dir = tmp_path / "default" / "iter_1"
    actor = records.read_jsonl(iter_dir / layout.ACTOR_PAIRS)
    assert actor and records.read_jsonl(iter_dir / layout.JUDGE_PAIRS), "the run needs both kinds of pair"
    # A cap no share can meet leaves no judge pair: the rebuilt files hold the actor pairs alone.
    run_cli(
        str(iter_dir),
        "pairs.judge_chosen_score_cap=0.01",
        script="metareward-pairs",
        timeout=None,
        text=False,
        check=True,
    )
    assert records.read_jsonl(iter_dir / layout.JUDGE_PAIRS) == []
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = records.read_json(iter_dir / layout.METRICS)
    assert records.read_json(iter_dir / layout.MODEL / "training_log.json")["train_pairs"] == len(actor)
    assert (metrics["pairs"]["actor"]["pairs"], metrics["pairs"]["judge"]["pairs"]) == (len(actor), 0)
    assert metrics["pairs"]["trained_on_judge_pairs"] and metrics["judge"]["num_pairs"] == 0
