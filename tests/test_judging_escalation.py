"""Escalation to a stronger judge.

- Confidence signals and budgets on crafted rows, against values worked out by hand.
- The cascade curve of evaluation: a crafted local judge (a stand-in Generator, named so) whose least
  confident pairs are exactly its errors, and an oracle strong judge that answers with the human label,
  served by a real HTTP server on 127.0.0.1 (a stand-in for a GPT-4-class endpoint).
- A run on the tiny model whose judge and meta-judge escalate to such a server: the rows say what was
  escalated, metrics.json counts what the server saw, and a stage run again pays for nothing (cache).
"""

from __future__ import annotations

import json
import math
import re
import zlib

import pytest

from metareward import report
from metareward.config import ConfigError, EscalationConfig, JudgeConfig, load_config
from metareward.engines import Engines
from metareward.generation import Completion, Usage, make_generator
from metareward.judging import escalation
from metareward.judging.cascade import Cascade
from metareward.judging.escalation import StageEscalation, StrongJudge
from metareward.judging.evaluation import evaluate_suites
from metareward.judging.judge_metrics import JudgedPair, Verdict
from metareward.judging.prompts import Templates
from metareward.judging.suites import SuitePair
from metareward.loop.run import Run, stages
from metareward.store import layout, records
from metareward.store.records import ChunkedFile, read_jsonl
from tests.openai_standin import StandInServer

GOOD = "GOOD"
PROMPT_PRICE, COMPLETION_PRICE = 3.0, 15.0  # US$ per million tokens, a GPT-4-class endpoint's


# ------------------------------------------------------------------ signals and budgets by hand


def test_score_signals_equal_their_hand_computed_values():
    certain = {"score": 4, "score_probs": [0, 0, 0, 0, 1.0, 0]}
    unsure = {"score": 2, "score_probs": [0.5, 0.25, 0.25, 0, 0, 0]}
    # margin: the top two probabilities' difference, averaged over the judgements.
    assert escalation.score_confidence("margin", [certain, unsure]) == pytest.approx((1.0 + 0.25) / 2)
    # entropy: 1 - H / ln 6; H(0.5, 0.25, 0.25) = 1.5 ln 2.
    expected = (1.0 + (1 - 1.5 * math.log(2) / math.log(6))) / 2
    assert escalation.score_confidence("entropy", [certain, unsure]) == pytest.approx(expected)
    # spread: 1 - (max - min) / 5 of the parsed scores.
    assert escalation.score_confidence("spread", [certain, unsure]) == pytest.approx(1 - 2 / 5)
    # Without the inputs: no distribution (an endpoint), or fewer than two parsed scores.
    text_only = {"score": 3, "score_probs": None}
    assert escalation.score_confidence("margin", [text_only]) is None
    assert escalation.score_confidence("spread", [text_only, {"score": None, "score_probs": None}]) is None


def test_verdict_signals_equal_their_hand_computed_values():
    assert escalation.verdict_confidence("order", ["j0", "j0"], [None, None]) == 1.0
    assert escalation.verdict_confidence("order", ["j0", "j1"], [None, None]) == 0.0
    assert escalation.verdict_confidence("order", ["j0", None], [None, None]) is None
    assert escalation.verdict_confidence("margin", ["j0", "j1"], [0.8, 0.2]) == pytest.approx(0.5)
    assert escalation.verdict_confidence("margin", ["j0", "j1"], [None, None]) is None
    assert escalation.probability_margin([0.9, 0.1]) == pytest.approx(0.8)
    # An evaluation pair judged in both orders: prob_a 0.9 and 0.3 give margins 0.8 and 0.4.
    judged = JudgedPair("A", 1, 1, (Verdict("A", "A", 0.9), Verdict("B", "B", 0.3)), 2, 0, pair_id="p")
    assert escalation.pair_confidence("margin", judged, seed=0) == pytest.approx(0.6)
    assert escalation.pair_confidence("order", judged, seed=0) == 0.0
    assert 0 <= escalation.pair_confidence("random", judged, seed=0) < 1


def test_a_budget_escalates_the_least_confident_and_items_without_a_signal_first():
    confidences = {"a": 0.9, "b": 0.1, "c": None, "d": 0.5, "e": 0.3}
    assert escalation.escalation_order(confidences, seed=0)[:2] == ["c", "b"]
    assert escalation.choose(confidences, EscalationConfig(fraction=0.4), seed=0) == {"c", "b"}
    # floor(0.5 x 5 + 1/2) = 3 items
    assert escalation.choose(confidences, EscalationConfig(fraction=0.5), seed=0) == {"c", "b", "e"}
    assert escalation.choose(confidences, EscalationConfig(fraction=0.0), seed=0) == set()
    threshold = EscalationConfig(fraction=None, threshold=0.5)
    assert escalation.choose(confidences, threshold, seed=0) == {"c", "b", "e"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["judge.escalation.signal=order"], "judge.escalation.signal='order': the judge's scores allow"),
        (["meta_judge.escalation.signal=entropy"], "meta_judge.escalation.signal='entropy'"),
        (["judge.escalation.threshold=0.3"], "judge.escalation.threshold=0.3: set exactly one budget"),
        (["judge.escalation.fraction=1.5"], "judge.escalation.fraction=1.5: must be in [0, 1]"),
        (["judge.num_judgements=1", "judge.escalation.signal=spread"], "spread needs 2 or more judgements"),
        (["eval.protocols=[pairwise]", "eval.escalation.signal=entropy"], "eval.escalation.signal='entropy'"),
        (["eval.escalation.curve_points=1"], "eval.escalation.curve_points=1: must be >= 2"),
        (["eval.escalation.judge.generator.batch_size=0"], "eval.escalation.judge.generator.batch_size=0"),
    ],
)
def test_bad_escalation_settings_are_refused_by_their_full_key(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert message in str(refused.value)


# ------------------------------------------------------------------ the cascade curve in evaluation


def shown(content: str) -> tuple[str, str]:
    a = re.search(r"<response_a>(.*)</response_a>", content, re.DOTALL).group(1)
    b = re.search(r"<response_b>(.*)</response_b>", content, re.DOTALL).group(1)
    return a, b


def chat(body: dict, text: str, seen: list) -> dict:
    """An OpenAI chat answer with usage counted one word, one token; ``seen`` gets (prompt, completion)."""
    prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
    completion_tokens = len(text.split())
    seen.append((prompt_tokens, completion_tokens))
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def oracle(seen: list):
    """The stand-in strong judge's answers: the human label (GOOD marks the preferred response)."""

    def answer(body: dict) -> dict:
        content = body["messages"][-1]["content"]
        if "<response_a>" in content:
            a, _ = shown(content)
            return chat(body, f"Both read. Winner: Response {'A' if GOOD in a else 'B'}", seen)
        response = re.search(r"<response>(.*)</response>", content, re.DOTALL).group(1)
        return chat(body, "Read. Score: 5" if GOOD in response else "Read. Score: 1", seen)

    return answer


def suite_pairs(n: int) -> list[SuitePair]:
    """Crafted pairs: pair i's human-preferred response carries GOOD, in A on even i, B on odd."""
    out = []
    for i in range(n):
        good, bad = f"{GOOD} answer {i}", f"weak answer {i}"
        a, b, label = (good, bad, "A") if i % 2 == 0 else (bad, good, "B")
        out.append(SuitePair(f"p{i}", [{"role": "user", "content": f"Q{i}?"}], a, b, label, None, None, "c"))
    return out


class CraftedLocalJudgeStandIn:
    """Stand-in local pairwise judge: right on every pair but ``wrong`` (pair numbers), and sure (0.95)
    where it is right, unsure (0.55) where it is wrong, so its least-confident pairs are its errors."""

    def __init__(self, wrong: set[int]):
        self.wrong = wrong
        self.usage = Usage()

    def _pick(self, content: str) -> str:
        a, b = shown(content)
        number = int(re.search(r"answer (\d+)", a).group(1))
        right = "A" if GOOD in a else "B"
        return ({"A": "B", "B": "A"}[right] if number in self.wrong else right), number

    def render(self, messages):
        return messages[-1]["content"]

    def generate(self, requests, params, desc=""):
        return [
            [Completion(f"Winner: Response {self._pick(r[-1]['content'])[0]}", 3, "stop", 10)]
            for r in requests
        ]

    def next_token_probs(self, texts, candidates):
        out = []
        for text in texts:
            side, number = self._pick(text)
            sure = 0.55 if number in self.wrong else 0.95
            out.append([sure, 1 - sure] if side == "A" else [1 - sure, sure])
        return out

    def close(self):
        pass


def cascade_of(local, server_url: str, pairs, **escalation_settings) -> tuple[dict, list]:
    cfg = load_config(
        None,
        [
            "eval.protocols=[pairwise]",
            "eval.bootstrap_samples=100",
            "eval.escalation.enabled=true",
            "eval.escalation.judge.generator.backend=openai",
            f"eval.escalation.judge.generator.openai.base_urls=[{server_url}]",
            "eval.escalation.judge.generator.openai.model=strong-judge",
            f"eval.escalation.judge.generator.openai.prompt_price_per_mtok={PROMPT_PRICE}",
            f"eval.escalation.judge.generator.openai.completion_price_per_mtok={COMPLETION_PRICE}",
            "eval.escalation.judge.generator.progress=false",
            *(f"eval.escalation.{key}={value}" for key, value in escalation_settings.items()),
        ],
    )
    strong = StrongJudge(cfg.eval.escalation.judge, Engines(cfg).strong_judge)
    cfg = cfg.eval
    try:
        cascade = Cascade(cfg.escalation, strong.generator(), strong.prices, None)
        result, per_pair = evaluate_suites(
            local, Templates(), [("crafted", pairs)], cfg, "text", None, cascade
        )
    finally:
        strong.close()
    return result["suites"]["crafted"]["pairwise"], per_pair


def test_the_cascade_reaches_the_oracle_at_the_share_of_the_local_judges_errors():
    seen: list = []
    server = StandInServer(answer_chat=oracle(seen))
    try:
        pairs = suite_pairs(20)
        wrong = {1, 4, 9, 12, 17}  # 5 of 20: the local judge's accuracy is 0.75
        metrics, per_pair = cascade_of(CraftedLocalJudgeStandIn(wrong), server.url, pairs)
    finally:
        server.close()
    found = metrics["escalation"]
    assert found["signal"] == "margin" and found["items"] == 20 and found["no_signal"] == 0
    assert found["local_accuracy"] == pytest.approx(0.75)
    assert found["strong_accuracy"] == 1.0
    curve, chance = found["curve"], found["random_curve"]
    assert [p["fraction"] for p in curve] == pytest.approx([j / 10 for j in range(11)])
    assert [p["escalated"] for p in curve] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    # The oracle never does worse than the local judge: the curve never falls, ending at 1.
    accuracies = [p["accuracy"] for p in curve]
    assert accuracies == sorted(accuracies) and accuracies[-1] == 1.0
    # Escalating the 5 unsure pairs (25%) fixes all 5 errors; at 20% (4 pairs) it has fixed 4.
    assert found["fraction_to_match_strong"] == pytest.approx(0.25)
    assert curve[2]["accuracy"] == pytest.approx(0.95)
    # Random escalation fixes errors at their base rate: 0.75 + f x 0.25, below the signal's curve.
    assert [p["accuracy"] for p in chance] == pytest.approx([0.75 + 0.025 * j for j in range(11)])
    assert all(s["accuracy"] > r["accuracy"] for s, r in zip(curve[1:-1], chance[1:-1], strict=True))
    assert found["area_over_random"] > 0
    # Cost: the strong judge's tokens on the escalated pairs at its prices, as the server counted them.
    assert len(seen) == 40  # every pair, both orders
    all_cost = sum(p * PROMPT_PRICE + c * COMPLETION_PRICE for p, c in seen) / 1e6
    assert curve[-1]["cost_usd"] == pytest.approx(all_cost) == found["strong_cost_usd"]
    assert curve[0]["cost_usd"] == 0.0 and chance[5]["cost_usd"] == pytest.approx(all_cost / 2)
    # The budget (fraction 0.2 by default) is the operating point; per-pair rows say which it escalates.
    assert found["operating_point"]["escalated"] == 4
    assert found["operating_point"]["accuracy"] == pytest.approx(0.95)
    escalated = {row["pair_id"] for row in per_pair if row["escalated"]}
    assert len(escalated) == 4 and escalated < {f"p{i}" for i in wrong}
    assert all(row["strong_outcome"] == row["label"] for row in per_pair)


def test_at_fraction_0_every_pair_keeps_the_local_answer():
    seen: list = []
    server = StandInServer(answer_chat=oracle(seen))
    try:
        local = CraftedLocalJudgeStandIn({0, 3})
        metrics, per_pair = cascade_of(local, server.url, suite_pairs(8), fraction=0.0)
    finally:
        server.close()
    found = metrics["escalation"]
    assert found["operating_point"]["escalated"] == 0
    assert found["operating_point"]["accuracy"] == found["local_accuracy"] == metrics["accuracy"] == 0.75
    assert not any(row["escalated"] for row in per_pair)


def test_random_signal_curve_is_the_expectation_of_random_escalation():
    server = StandInServer(answer_chat=oracle([]))
    try:
        metrics, _ = cascade_of(CraftedLocalJudgeStandIn({2}), server.url, suite_pairs(4), signal="random")
    finally:
        server.close()
    found = metrics["escalation"]
    assert found["curve"] == found["random_curve"] and found["area_over_random"] == 0
    assert len(found["curve"]) == 11


# ------------------------------------------------------------------ escalation in a run


def strong_judge_of_a_run(seen: list, counts: dict):
    """The stand-in strong judge of the run: a score fixed by the response it is shown, and the
    meta-judge's verdict "Judgement A"."""

    def answer(body: dict) -> dict:
        content = body["messages"][-1]["content"]
        kind = "meta_judge" if "Judgment A:" in content else "judge"
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "meta_judge":
            return chat(body, "A is more accurate. Winner: Judgement A", seen)
        score = zlib.crc32(f"{content}/{body['seed']}".encode()) % 6
        return chat(body, f"Judged with seed {body['seed']}. Score: {score}", seen)

    return answer


def run_overrides(tmp_path, url: str, *extra: str) -> list[str]:
    strong = [
        "generator.backend=openai",
        f"generator.openai.base_urls=[{url}]",
        "generator.openai.model=strong-judge",
        f"generator.openai.prompt_price_per_mtok={PROMPT_PRICE}",
        f"generator.openai.completion_price_per_mtok={COMPLETION_PRICE}",
        "generator.progress=false",
    ]
    return [
        "model=tiny",
        f"runs_dir={tmp_path}",
        "iterations=1",
        "data.prompts_per_iteration=3",
        "actor.num_responses=4",
        "actor.max_new_tokens=8",
        "judge.num_judgements=3",
        "judge.max_new_tokens=8",
        "meta_judge.max_new_tokens=4",
        "generator.progress=false",
        "tracking=none",
        "eval.enabled=false",
        "train.on_no_pairs=carry",
        "judge.escalation.enabled=true",
        "judge.escalation.fraction=0.5",
        "meta_judge.escalation.enabled=true",
        "meta_judge.escalation.signal=order",
        "meta_judge.escalation.fraction=0.5",
        *(f"judge.escalation.judge.{setting}" for setting in strong),
        *(f"meta_judge.escalation.judge.{setting}" for setting in strong),
        *extra,
    ]


class KilledStandIn(Exception):
    """Stands in for a SIGKILL at a kill point (faults.py), raised in-process."""


def test_a_run_escalates_its_share_says_so_in_rows_and_metrics_and_pays_once(
    monkeypatch, tmp_path, tiny_model_dir
):
    from metareward.store import faults

    real_point = faults.point
    strong_chunks = []

    def killed_at_the_second_strong_chunk(name: str) -> None:
        if name == "chunk:judgements_strong.jsonl":
            strong_chunks.append(name)
            if len(strong_chunks) == 2:
                raise KilledStandIn(name)
        real_point(name)

    seen: list = []
    counts: dict = {}
    server = StandInServer(answer_chat=strong_judge_of_a_run(seen, counts))
    try:
        # Killed in the middle of the strong judge's pass, then resumed: no request is sent twice.
        cfg = load_config(None, run_overrides(tmp_path, server.url, "generator.chunk_size=4"))
        monkeypatch.setattr(faults, "point", killed_at_the_second_strong_chunk)
        with pytest.raises(KilledStandIn):
            Run(cfg).run()
        monkeypatch.setattr(faults, "point", real_point)
        (metrics,) = Run(cfg).run()
        bodies = [json.dumps(body, sort_keys=True) for body in server.bodies]
        assert len(bodies) == len(set(bodies))
        directory = tmp_path / "default" / "iter_1"
        responses = read_jsonl(directory / layout.RESPONSES)
        judgements = read_jsonl(directory / layout.JUDGEMENTS)

        # The judge stage: half of the responses (rounded half up), each judged 3 times by the strong judge.
        escalated = {j["response_id"] for j in judgements if j["escalated"]}
        assert len(escalated) == escalation.fraction_count(0.5, len(responses))
        assert counts["judge"] == 3 * len(escalated)
        for row in judgements:
            assert row["judge"] == ("strong-judge" if row["escalated"] else "M_0")
            if row["escalated"]:
                assert re.fullmatch(r"Judged with seed \d+\. Score: \d", row["text"])
        # The rows not escalated are the local judge's, as it wrote them (judgements_local.jsonl).
        local = {r["judgement_id"]: r for r in read_jsonl(directory / "judgements_local.jsonl")}
        assert list(local) == [r["judgement_id"] for r in judgements]
        added = ("escalated", "judge", "confidence")
        for row in judgements:
            if not row["escalated"]:
                assert {k: v for k, v in row.items() if k not in added} == local[row["judgement_id"]]
        # margin (the default signal) reads the tiny model's 0..5 probabilities: every response has one.
        assert all(j["confidence"] is not None for j in judgements)

        # The meta-judge stage: half of the comparisons, both orders, answered by the strong meta-judge.
        verdicts = read_jsonl(directory / layout.META_JUDGEMENTS)
        comparisons = {escalation.comparison_of(v) for v in verdicts}
        strong_verdicts = [v for v in verdicts if v["escalated"]]
        assert len({escalation.comparison_of(v) for v in strong_verdicts}) == escalation.fraction_count(
            0.5, len(comparisons)
        )
        assert strong_verdicts and counts["meta_judge"] == len(strong_verdicts)
        assert all(v["winner"] == "first" for v in strong_verdicts)

        # metrics.json: the escalated share and the strong judges' tokens and cost, as the server saw them.
        judge_share = metrics["escalation"]["judge"]
        assert judge_share["items"] == len(responses) and judge_share["escalated"] == len(escalated)
        strong = judge_share["judges"]["strong"]
        judge_seen = seen[: counts["judge"]]  # the judge stage's requests all come before the meta-judge's
        assert strong["name"] == "strong-judge" and strong["answers"] == counts["judge"]
        assert strong["prompt_tokens"] == sum(p for p, _ in judge_seen)
        assert strong["completion_tokens"] == sum(c for _, c in judge_seen)
        expected_cost = sum(p * PROMPT_PRICE + c * COMPLETION_PRICE for p, c in judge_seen) / 1e6
        assert strong["cost_usd"] == pytest.approx(expected_cost)
        # usage: what each invocation sent. The resumed one found the strong judge's chunks on disk and
        # sent the judge nothing; the meta-judge stage ran in it whole.
        assert metrics["usage"]["judge_strong"]["requests"] == 0
        meta_cost = sum(p * PROMPT_PRICE + c * COMPLETION_PRICE for p, c in seen[counts["judge"] :]) / 1e6
        meta = metrics["escalation"]["meta_judge"]["judges"]["strong"]
        assert meta["cost_usd"] == pytest.approx(meta_cost)
        assert metrics["usage"]["meta_judge_strong"]["requests"] == counts["meta_judge"]
        assert metrics["usage"]["meta_judge_strong"]["cost_usd"] == pytest.approx(meta_cost)
        assert metrics["escalation"]["judge"]["judges"]["local"]["cost_usd"] is None  # a local model
        assert "escalated  judge:" in report.summary(metrics)

        # Delete the stage files and run the iteration's stages again: every strong answer is cached.
        requests_before = len(server.log)
        for path in directory.iterdir():
            if path.name.startswith(
                ("judgements", "meta_judgements", "actor_pairs", "judge_pairs", "metrics")
            ):
                path.unlink()
        Run(cfg).run()
        assert len(server.log) == requests_before
        assert read_jsonl(directory / layout.JUDGEMENTS) == judgements
        assert read_jsonl(directory / layout.META_JUDGEMENTS) == verdicts
    finally:
        server.close()


def test_fraction_0_leaves_every_judgement_as_it_was_and_calls_no_strong_judge(tmp_path, tiny_model_dir):
    server = StandInServer(answer_chat=strong_judge_of_a_run([], {}))
    try:
        cfg = load_config(None, run_overrides(tmp_path, server.url, "judge.escalation.fraction=0"))
        local = make_generator(tiny_model_dir, cfg.model, cfg.generator)
        ctx = stages.StageContext(local, Templates(), seed=0, iteration=1, chunk_size=4)
        prompts = [
            {"prompt_id": f"q{i}", "messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(2)
        ]
        responses = [
            {"prompt_id": p["prompt_id"], "response_id": f"{p['prompt_id']}/r{k}", "text": f"Answer {k}."}
            for p in prompts
            for k in range(3)
        ]
        judge_cfg = JudgeConfig(num_judgements=2, max_new_tokens=8)
        plain = stages.judge(ctx, prompts, responses, judge_cfg, ChunkedFile(tmp_path / "plain.jsonl"))
        esc = StageEscalation(
            cfg.judge.escalation,
            StrongJudge(cfg.judge.escalation.judge, Engines(cfg, tmp_path).strong_judge),
            "M_0",
            None,
            7,
        )
        escalating = stages.judge(
            ctx, prompts, responses, judge_cfg, ChunkedFile(tmp_path / "judgements.jsonl"), esc
        )
        local.close()
    finally:
        server.close()
    assert len(server.log) == 0 and esc.strong._generator is None  # never made: nothing was escalated
    assert len(escalating) == len(plain) == 12
    for before, after in zip(plain, escalating, strict=True):
        assert after["escalated"] is False and after["judge"] == "M_0"
        for key in ("judgement_id", "text", "score", "num_tokens", "finish_reason"):
            assert after[key] == before[key]


# ------------------------------------------------------------------ the report and W&B


def test_the_report_plots_the_latest_cascade_and_wandb_gets_its_table(tmp_path):
    from metareward.report import tracking

    server = StandInServer(answer_chat=oracle([]))
    try:
        metrics, _ = cascade_of(CraftedLocalJudgeStandIn({1}), server.url, suite_pairs(6))
    finally:
        server.close()
    run = tmp_path / "run"
    run.mkdir()
    records.write_json(run / layout.EVAL_0, {"judge": {"crafted": {"pairwise": metrics}}, "per_pair": []})
    assert report.latest_cascades(run)[0] == "M_0"
    line = report.write_report(run, run / "report.html")
    assert (run / "report" / "escalation.png").stat().st_size > 0
    assert "escalation.png" in (run / "report.html").read_text() and "plots" in line

    # W&B (offline): the curve is a table at the evaluation's iteration.
    from metareward.config import TrackingConfig
    from tests.wandb_files import offline_files, read_run, rows_at

    with tracking.make_tracker(
        TrackingConfig(mode="offline"), tmp_path / "tracked", "cascade", {}
    ) as tracker:
        tracking.log_cascade_curves(tracker, {"crafted": {"pairwise": metrics}}, step=0)
    logged = read_run(offline_files(tmp_path / "tracked")[0])
    assert rows_at(logged, "iteration", 0)["escalation_curve/crafted/pairwise/_type"] == "table-file"


def test_eval_judge_prints_the_cascade_and_a_second_pricing_pays_nothing(tmp_path, tiny_model_dir, capsys):
    from metareward.cli import eval_judge_main

    seen: list = []
    server = StandInServer(answer_chat=oracle(seen))
    suite = tmp_path / "crafted.jsonl"
    rows = [
        {"prompt": p.prompt[0]["content"], "chosen": f"{GOOD} {i}", "rejected": f"weak {i}"}
        for i, p in enumerate(suite_pairs(6))
    ]
    records.write_jsonl(suite, rows)
    out = tmp_path / "cascade.json"
    args = [
        "--out", str(out), "model=tiny", f"eval.suites=[{suite}]", "eval.protocols=[pairwise]",
        "eval.max_new_tokens=4", "eval.bootstrap_samples=20", "generator.progress=false",
        "eval.escalation.enabled=true", "eval.escalation.judge.generator.backend=openai",
        f"eval.escalation.judge.generator.openai.base_urls=[{server.url}]",
        "eval.escalation.judge.generator.openai.model=strong-judge",
        "eval.escalation.judge.generator.progress=false",
    ]  # fmt: skip
    try:
        eval_judge_main(args)
        first = capsys.readouterr().out
        requests = len(server.log)
        eval_judge_main([*args, "eval.escalation.signal=random"])
        assert len(server.log) == requests == 12  # 6 pairs, both orders, once: then from the cache
    finally:
        server.close()
    found = records.read_json(out)["suites"]["crafted"]["pairwise"]["escalation"]
    assert found["strong_accuracy"] == 1.0 and found["signal"] == "random"
    assert found["curve"][-1]["accuracy"] == 1.0 and found["curve"][-1]["cost_usd"] is None  # no prices
    assert "crafted/pairwise: signal margin" in first and "escalated  accuracy" in first
    assert (tmp_path / "cascade_cache" / "openai").is_dir()


def test_a_local_judge_without_probabilities_has_no_signal_and_every_pair_counts_so():
    class NoProbabilitiesStandIn(CraftedLocalJudgeStandIn):  # stand-in: an endpoint without a tokenizer
        reads_probabilities = False

        def next_token_probs(self, texts, candidates):
            raise AssertionError("an endpoint without a local tokenizer is never asked for probabilities")

    server = StandInServer(answer_chat=oracle([]))
    try:
        metrics, per_pair = cascade_of(NoProbabilitiesStandIn({1}), server.url, suite_pairs(10))
    finally:
        server.close()
    found = metrics["escalation"]
    assert found["no_signal"] == 10 and all(row["confidence"] is None for row in per_pair)
    assert found["operating_point"]["escalated"] == 2  # the budget still holds: 20% of 10
