"""Properties of the pair rules (metareward/pairs.py) over random iterations: any scores, lengths, ties,
missing or cut-off judgements, and verdicts."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from metareward.loop.pairs import actor_pairs, judge_pairs, usable_judgements

# A tier boundary closer than this is left alone: pairs.py lets float rounding fall either way there.
EDGE = 1e-6

SCORES = st.one_of(
    st.none(),
    st.integers(0, 5).map(float),
    st.floats(0, 5, allow_nan=False).map(lambda x: round(x, 3)),
)
# For prompts made of ties: equal lengths, and means that often coincide.
TIED_SCORES = st.sampled_from([None, 1.0, 4.0, 4.0])


def judge_prompt(messages: list[dict], text: str) -> list[dict]:
    return [{"role": "user", "content": f"judge {messages[-1]['content']!r}: {text}"}]


@st.composite
def iterations(draw):
    """(prompts, responses, judgements, verdicts) of one iteration, in the run directory's row format."""
    prompts, responses, judgements, verdicts = [], [], [], []
    for p in range(draw(st.integers(1, 4))):
        pid = f"q{p}"
        tied = draw(st.booleans())
        scores = TIED_SCORES if tied else SCORES
        lengths = st.integers(2, 3) if tied else st.integers(1, 5)
        prompts.append({"prompt_id": pid, "messages": [{"role": "user", "content": f"question {p}"}]})
        # k need not be 0..K-1: the actor drops duplicate samples.
        for k in draw(st.lists(st.integers(0, 9), unique=True, max_size=5)):
            rid = f"{pid}/r{k}"
            tokens = draw(lengths)
            responses.append(
                {"prompt_id": pid, "response_id": rid, "text": f"answer {rid}", "num_tokens": tokens}
            )
            usable = []
            for n in draw(st.lists(st.integers(0, 5), unique=True, max_size=4)):
                row = {
                    "response_id": rid,
                    "judgement_id": f"{rid}/j{n}",
                    "text": f"judgement {rid}/j{n}",
                    "score": draw(scores),
                    "finish_reason": draw(st.sampled_from(["stop", "stop", "stop", "length"])),
                }
                judgements.append(row)
                usable += [row["judgement_id"]] if usable_judgements([row]) else []
            for first in usable:
                for second in usable:
                    if first != second:
                        winner = draw(st.sampled_from(["first", "second", None]))
                        verdicts.append(
                            {"response_id": rid, "first_id": first, "second_id": second, "winner": winner}
                        )
    return prompts, responses, judgements, verdicts


def mean_scores(judgements: list[dict]) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for j in judgements:
        if j["score"] is not None:
            scores.setdefault(j["response_id"], []).append(j["score"])
    return {rid: math.fsum(s) / len(s) for rid, s in scores.items()}


RHOS = st.one_of(st.just(0.0), st.floats(0.0, 0.499))


@settings(max_examples=300, deadline=None)
@given(iterations(), RHOS)
def test_actor_pairs_are_two_rows_of_one_prompt_best_over_worst(world, rho):
    prompts, responses, judgements, _ = world
    pairs, stats = actor_pairs(prompts, responses, judgements, rho)
    rows = {r["response_id"]: r for r in responses}
    means = mean_scores(judgements)
    by_prompt = {p["prompt_id"]: p for p in prompts}
    for pair in pairs:
        chosen, rejected = rows[pair["chosen_id"]], rows[pair["rejected_id"]]
        assert chosen["response_id"] != rejected["response_id"]
        assert chosen["prompt_id"] == rejected["prompt_id"] == pair["prompt_id"]
        # The pair carries the rows' own prompt and texts, and their real mean scores.
        assert pair["prompt"] == by_prompt[pair["prompt_id"]]["messages"]
        assert pair["chosen"] == [{"role": "assistant", "content": chosen["text"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": rejected["text"]}]
        assert pair["chosen_score"] == means[chosen["response_id"]]
        assert pair["rejected_score"] == means[rejected["response_id"]]
        assert pair["chosen_score"] >= pair["rejected_score"]
    # One pair for exactly the prompts with two scored responses whose means differ.
    expected = set()
    for pid in by_prompt:
        group = [
            means[r["response_id"]] for r in responses if r["prompt_id"] == pid and r["response_id"] in means
        ]
        if len(group) >= 2 and max(group) > min(group):
            expected.add(pid)
    assert [p["prompt_id"] for p in pairs] == [p["prompt_id"] for p in prompts if p["prompt_id"] in expected]
    skipped = sum(v for k, v in stats.items() if k.startswith("skipped_"))
    assert stats["pairs"] == len(pairs) and stats["pairs"] + skipped == len(prompts)


@settings(max_examples=300, deadline=None)
@given(iterations(), st.floats(0.01, 0.499))
def test_with_rho_chosen_is_the_shortest_of_the_top_tier_and_rejected_the_longest_of_the_bottom(world, rho):
    prompts, responses, judgements, _ = world
    pairs, _ = actor_pairs(prompts, responses, judgements, rho)
    rows = {r["response_id"]: r for r in responses}
    means = mean_scores(judgements)
    for pair in pairs:
        group = {rid: s for rid, s in means.items() if rows[rid]["prompt_id"] == pair["prompt_id"]}
        high, low = max(group.values()), min(group.values())
        top_line, bottom_line = high - rho * (high - low), low + rho * (high - low)
        assert pair["chosen_score"] >= top_line - EDGE and pair["rejected_score"] <= bottom_line + EDGE
        for rid, score in group.items():
            if score >= top_line + EDGE:
                assert rows[pair["chosen_id"]]["num_tokens"] <= rows[rid]["num_tokens"]
            if score <= bottom_line - EDGE:
                assert rows[pair["rejected_id"]]["num_tokens"] >= rows[rid]["num_tokens"]


@settings(max_examples=200, deadline=None)
@given(iterations())
def test_judge_pairs_are_two_usable_judgements_of_the_most_disputed_response(world):
    prompts, responses, judgements, verdicts = world
    pairs, stats = judge_pairs(prompts, responses, judgements, verdicts, judge_prompt)
    usable = {j["judgement_id"]: j for j in usable_judgements(judgements)}
    response_of = {r["response_id"]: r for r in responses}
    messages_of = {p["prompt_id"]: p["messages"] for p in prompts}
    assert stats["pairs"] == len(pairs) and len({p["prompt_id"] for p in pairs}) == len(pairs)
    for pair in pairs:
        chosen, rejected = usable[pair["chosen_id"]], usable[pair["rejected_id"]]
        assert chosen["judgement_id"] != rejected["judgement_id"]
        assert chosen["response_id"] == rejected["response_id"] == pair["response_id"]
        response = response_of[pair["response_id"]]
        assert response["prompt_id"] == pair["prompt_id"]
        assert pair["prompt"] == judge_prompt(messages_of[pair["prompt_id"]], response["text"])
        assert pair["chosen"] == [{"role": "assistant", "content": chosen["text"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": rejected["text"]}]
        assert pair["chosen_elo"] > pair["rejected_elo"]

        # The judged response is the one whose usable scores vary most.
        def variance(rid: str) -> float:
            scores = [j["score"] for j in usable.values() if j["response_id"] == rid]
            mean = math.fsum(scores) / len(scores)
            return math.fsum((s - mean) ** 2 for s in scores) / len(scores)

        rivals = [r["response_id"] for r in responses if r["prompt_id"] == pair["prompt_id"]]
        scored = [rid for rid in rivals if sum(j["response_id"] == rid for j in usable.values()) >= 2]
        assert variance(pair["response_id"]) >= max(variance(rid) for rid in scored) - EDGE


@settings(max_examples=200, deadline=None)
@given(iterations(), RHOS, st.randoms(use_true_random=False))
def test_shuffling_the_input_rows_does_not_change_the_pairs(world, rho, rng):
    prompts, responses, judgements, verdicts = world
    expected_actor = actor_pairs(prompts, responses, judgements, rho)
    expected_judge = judge_pairs(prompts, responses, judgements, verdicts, judge_prompt)

    def shuffled(rows: list[dict]) -> list[dict]:
        copy = list(rows)
        rng.shuffle(copy)
        return copy

    responses, judgements, verdicts = shuffled(responses), shuffled(judgements), shuffled(verdicts)
    assert actor_pairs(prompts, responses, judgements, rho) == expected_actor
    assert judge_pairs(prompts, responses, judgements, verdicts, judge_prompt) == expected_judge
    # Shuffled prompts give the same pairs, in the prompts' new order.
    order = shuffled(prompts)
    position = {p["prompt_id"]: i for i, p in enumerate(order)}
    for (pairs, _), again in [
        (expected_actor, actor_pairs(order, responses, judgements, rho)[0]),
        (expected_judge, judge_pairs(order, responses, judgements, verdicts, judge_prompt)[0]),
    ]:
        assert again == sorted(pairs, key=lambda p: position[p["prompt_id"]])
