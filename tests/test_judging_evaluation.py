"""Tests for metareward.judging.evaluation: judge-vs-human agreement, win rate and the eval CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from metareward.config import EvalConfig, GeneratorConfig, ModelConfig
from metareward.generation import Completion, make_generator
from metareward.judging.evaluation import evaluate_suites, judge_pointwise, load_suites
from metareward.judging.heldout import generate_responses, load_heldout_prompts, win_rate
from metareward.judging.judge_metrics import agreement_stats, suite_metrics
from metareward.judging.parsing import parse_pairwise_winner
from metareward.judging.prompts import PAIRWISE_CUE, Templates
from metareward.judging.suites import SuitePair
from metareward.store.records import RecordError
from tests.helpers import run_cli


class _StandInGenerator:
    """Shared plumbing of the stand-ins below: a Generator whose text comes from ``reply``."""

    def render(self, messages):
        return "\n".join(m["content"] for m in messages)

    def generate(self, requests, params, desc=""):
        return [
            [Completion(self.reply(r[-1]["content"]), num_tokens=3, finish_reason="stop")] * params.n
            for r in requests
        ]

    def next_token_probs(self, texts, candidates):
        return [[0.0] * len(candidates) for _ in texts]  # no probability fallback: text only

    def close(self):
        pass


class LengthPreferringJudgeStandIn(_StandInGenerator):
    """Stand-in judge: "Score: 5" for a response over 40 characters, else "Score: 1"."""

    def reply(self, content):
        response = re.search(r"<response>(.*)</response>", content, re.DOTALL).group(1)
        return "Long enough. Score: 5" if len(response) > 40 else "Too short. Score: 1"


class MarkerPickingEvaluatorStandIn(_StandInGenerator):
    """Stand-in pairwise evaluator: the response containing MARKER wins."""

    def reply(self, content):
        response_a = re.search(r"<response_a>(.*)</response_a>", content, re.DOTALL).group(1)
        return "Winner: Response A" if "MARKER" in response_a else "Winner: Response B"


SHORT, LONG = "Short answer.", "A much longer answer that goes on and on about the topic."
QUESTION = [{"role": "user", "content": "Question?"}]


def _pair(pair_id, chosen, rejected) -> SuitePair:
    """A human preference pair as the pairs format reads it: A = chosen, B = rejected."""
    return SuitePair(pair_id, QUESTION, chosen, rejected, "A", None, None, "crafted")


def _eval_cfg(**changes):
    return EvalConfig(**{"bootstrap_samples": 200, "num_judgements": 2, **changes})


# ------------------------------------------------------------------ agreement_stats


def test_agreement_stats_on_hand_examples():
    stats = agreement_stats([1, 1, 0, 0.5], bootstrap_samples=500, seed=3)
    assert stats["mean"] == pytest.approx(0.625)
    assert stats["tie_rate"] == pytest.approx(0.25)
    assert 0 <= stats["ci_low"] <= 0.625 <= stats["ci_high"] <= 1
    assert stats["ci_low"] < stats["ci_high"]
    assert agreement_stats([1, 1, 0, 0.5], 500, seed=3) == stats


def test_agreement_stats_all_agree_gives_a_point_interval():
    stats = agreement_stats([1.0] * 7, bootstrap_samples=100, seed=0)
    assert (stats["mean"], stats["ci_low"], stats["ci_high"], stats["tie_rate"]) == (1.0, 1.0, 1.0, 0.0)


def test_agreement_stats_needs_outcomes():
    with pytest.raises(ValueError):
        agreement_stats([], 100, 0)


# ------------------------------------------------------------------ the pointwise judge on suite pairs


def short_preferred_pairs() -> list[SuitePair]:
    """Humans prefer the shorter response in pairs a-c and the longer one in d."""
    return [
        _pair("a", SHORT, LONG),
        _pair("b", SHORT, LONG),
        _pair("c", SHORT, LONG),
        _pair("d", LONG, SHORT),
    ]


def pointwise_metrics(judge, pairs) -> tuple[dict, list]:
    judged = judge_pointwise(judge, Templates(), pairs, _eval_cfg(), "text", seed=0)
    return suite_metrics(judged, 200, 0), judged


def test_length_preferring_judge_disagrees_with_humans_who_prefer_short():
    m, judged = pointwise_metrics(LengthPreferringJudgeStandIn(), short_preferred_pairs())
    assert m["accuracy"] == 0.25
    assert m["longer_preference"] == 1.0 and m["human_longer_preference"] == 0.25
    assert m["judge_tie_rate"] == 0.0 and m["parse_failure_rate"] == 0.0 and m["pairs"] == 4
    assert m["ci_low"] is None and m["ci_high"] is None  # 4 decided pairs: too few for an interval
    assert [j.outcome() for j in judged] == ["B", "B", "B", "A"]
    # Two judgements per response, both parsed. The four pairs show the same two responses to one
    # question: each is judged once and paid on the first pair that shows it.
    assert [j.calls for j in judged] == [4, 0, 0, 0] and all(j.unparsed == 0 for j in judged)
    assert all(len(rows) == 2 for j in judged for rows in j.score_rows)


def test_equal_scores_count_as_a_tie():
    pairs = [*short_preferred_pairs(), _pair("tie", "Same length one.", "Same length two.")]
    m, judged = pointwise_metrics(LengthPreferringJudgeStandIn(), pairs)
    assert m["accuracy"] == pytest.approx((0 + 0 + 0 + 1 + 0.5) / 5)
    assert m["judge_tie_rate"] == pytest.approx(0.2)
    assert judged[4].outcome() == "tie"
    assert m["longer_preference"] == 1.0  # ties are not decided pairs


def test_unscored_response_counts_as_half_and_as_a_parse_failure():
    class SilentJudgeStandIn(_StandInGenerator):
        def reply(self, content):
            return "I cannot decide."

    m, judged = pointwise_metrics(SilentJudgeStandIn(), [_pair("a", SHORT, LONG)])
    assert m["accuracy"] == 0.5 and m["parse_failure_rate"] == 1.0
    assert judged[0].outcome() is None and m["longer_preference"] is None


def test_load_heldout_prompts_bundled_and_turns_files(tmp_path):
    prompts = load_heldout_prompts(None, 3)
    assert [p["prompt_id"] for p in prompts] == ["1", "2", "3"]
    assert prompts[0]["messages"] == [
        {"role": "user", "content": "How can I improve my time management skills?"}
    ]
    path = tmp_path / "mixed.jsonl"
    rows = [{"question_id": 81, "turns": ["First?", "Second?"]}, {"prompt": "Plain?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_heldout_prompts(str(path), 5)
    assert loaded == [
        {"prompt_id": "81", "messages": [{"role": "user", "content": "First?"}], "later_turns": ["Second?"]},
        {"prompt_id": "p1", "messages": [{"role": "user", "content": "Plain?"}]},
    ]
    assert len(load_heldout_prompts(None, None)) == 80  # every Vicuna-bench question


# ------------------------------------------------------------------ win rate


def test_pairwise_prompt_shows_both_responses_and_asks_for_a_parseable_verdict():
    content = Templates().pairwise_messages(QUESTION, "first one", "second one")[0]["content"]
    assert "User: Question?" in content
    assert content.index("<response_a>first one</response_a>") < content.index("<response_b>second one")
    assert '"Winner: Response A" or "Winner: Response B"' in content
    assert parse_pairwise_winner("Winner: Response B") == "B"
    # The verdict's words are the probability fallback's cue, so the next token chooses A or B.
    assert content.rstrip().endswith(f'"{PAIRWISE_CUE}A" or "{PAIRWISE_CUE}B"')


@pytest.mark.parametrize("marked, expected", [("candidate", 1.0), ("baseline", 0.0)])
def test_win_rate_follows_the_evaluator_in_both_orders(marked, expected):
    prompts = [{"prompt_id": str(i), "messages": QUESTION} for i in range(3)]
    plain = [{"prompt_id": str(i), "text": "plain text", "num_tokens": 2} for i in range(3)]
    marker = [{"prompt_id": str(i), "text": "has MARKER", "num_tokens": 4} for i in range(3)]
    candidate, baseline = (marker, plain) if marked == "candidate" else (plain, marker)
    result = win_rate(
        MarkerPickingEvaluatorStandIn(), Templates(), prompts, candidate, baseline, _eval_cfg(), 0
    )
    assert result["win_rate"] == expected
    assert result["ci_low"] == result["ci_high"] == expected
    assert result["first_position_win_share"] == 0.5
    assert result["num_prompts"] == 3
    assert result["candidate_mean_tokens"] == (4 if marked == "candidate" else 2)


class SilentEvaluatorStandIn(_StandInGenerator):
    """Stand-in pairwise evaluator that never writes a verdict; it prefers "A" by its probabilities and
    records the texts it was asked to continue."""

    def __init__(self):
        self.cue_texts = []

    def reply(self, content):
        return "Both are fine."

    def next_token_probs(self, texts, candidates):
        self.cue_texts += texts
        return [[0.9, 0.1] for _ in texts]


def test_win_rate_reads_a_missing_verdict_after_the_pairwise_judges_own_words():
    prompts = [{"prompt_id": "0", "messages": QUESTION}]
    mine = [{"prompt_id": "0", "text": "mine", "num_tokens": 1}]
    theirs = [{"prompt_id": "0", "text": "theirs", "num_tokens": 1}]
    evaluator = SilentEvaluatorStandIn()
    result = win_rate(evaluator, Templates(), prompts, mine, theirs, _eval_cfg(), 0)
    assert len(evaluator.cue_texts) == 2
    assert all(text.endswith("Both are fine.\n" + PAIRWISE_CUE) for text in evaluator.cue_texts)
    # "A" in both orders: the candidate wins shown first and loses shown second.
    assert result["win_rate"] == 0.5 and result["first_position_win_share"] == 1.0


# ------------------------------------------------------------------ the tiny real model


def test_tiny_model_judges_bundled_pairs(tiny_model_dir):
    generator = make_generator(tiny_model_dir, ModelConfig(kind="tiny"), GeneratorConfig(progress=False))
    try:
        cfg = EvalConfig(num_pairs=3, max_new_tokens=8, bootstrap_samples=50, winner_from="text_or_probs")
        cfg = replace(cfg, protocols=["pointwise", "pairwise"])
        result, per_pair = evaluate_suites(generator, Templates(), load_suites(cfg), cfg, "text_or_expected")
        heldout = load_heldout_prompts(None, 2)
        responses = generate_responses(generator, heldout, max_new_tokens=4, seed=0)
        # The tiny model writes no "Winner:" line in 4 tokens, so verdicts come from its probabilities
        # of A/B after the winner cue; against itself that still gives decided verdicts in [0, 1].
        other = [{**r, "text": r["text"] + " (other)"} for r in responses]
        wins = win_rate(generator, Templates(), heldout, responses, other, cfg, seed=0)
    finally:
        generator.close()
    for protocol in ("pointwise", "pairwise"):
        m = result["suites"]["hh_rlhf"][protocol]
        assert 0 <= m["accuracy"] <= 1 and m["ci_low"] is None and m["pairs"] == 3
        # Every answer comes from the model's probabilities (it writes neither format), so all have some.
        assert m["parse_failure_rate"] == 1.0 and m["brier"] is not None
    assert len(per_pair) == 6
    assert [r["prompt_id"] for r in responses] == ["1", "2"]
    assert all(1 <= r["num_tokens"] <= 4 for r in responses)
    assert 0 <= wins["ci_low"] <= wins["win_rate"] <= wins["ci_high"] <= 1
    assert wins["first_position_win_share"] is not None and wins["num_prompts"] == 2


# ------------------------------------------------------------------ command line


def _eval_judge(*args, cwd):
    return run_cli(*args, script="metareward-eval-judge", cwd=cwd, timeout=300)


@pytest.mark.slow
def test_eval_judge_command_writes_json(tiny_model_dir, tmp_path):
    out = tmp_path / "e.json"
    overrides = ["model=tiny", "eval.num_pairs=2", "eval.max_new_tokens=4", "eval.bootstrap_samples=20"]
    done = _eval_judge(
        *overrides,
        "judge.score_from=text_or_expected",
        "generator.progress=false",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # The default suite (the bundled HH-RLHF pairs) under the default protocol (pointwise).
    metrics = json.loads(out.read_text())["suites"]["hh_rlhf"]["pointwise"]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["ci_low"] is None  # 2 pairs: too few for an interval
    assert metrics["pairs"] == 2 and metrics["position_consistency"] is None
    table = done.stdout.splitlines()
    assert table[0].split()[:3] == ["suite", "protocol", "acc"] and table[1].split()[:2] == [
        "hh_rlhf",
        "pointwise",
    ]
    pair_rows = [json.loads(line) for line in (tmp_path / "e_pairs.jsonl").read_text().splitlines()]
    assert len(pair_rows) == 2 and all(row["label"] == "A" and "outcome" in row for row in pair_rows)


def test_eval_judge_command_rejects_a_bad_setting(tmp_path):
    done = _eval_judge("model=tiny", "eval.num_pairs=0", cwd=tmp_path)
    assert done.returncode == 2
    assert "eval.num_pairs" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "eval_judge.json").exists()


def test_heldout_prompts_from_an_alpaca_eval_json_list(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    rows = [
        {"instruction": "What are the names of some famous actors?", "dataset": "helpful_base"},
        {"instruction": "Write a haiku.", "dataset": "oasst"},
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    prompts = load_heldout_prompts(str(path), 5)
    assert [p["messages"] for p in prompts] == [[{"role": "user", "content": r["instruction"]}] for r in rows]
    path.write_text(json.dumps([rows[0], "not a row"]), encoding="utf-8")
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: expected a JSON object")):
        load_heldout_prompts(str(path), 5)
