"""Judging preference suites under both protocols, with crafted stand-in judges (named as such): their
metrics are known by construction. One runs behind a real HTTP server on 127.0.0.1 through
``generator=openai``, with no local model at all."""

from __future__ import annotations

import json
import re

import pytest

from metareward.cli import eval_judge_main
from metareward.config import EvalConfig
from metareward.generation import Completion
from metareward.judging.evaluation import evaluate_suites, judge_pairwise, judge_pointwise, load_suites
from metareward.judging.prompts import Templates
from metareward.judging.suites import SuitePair
from tests.openai_standin import StandInServer, chat_answer

GOOD = "GOOD"


def pair(i: int, label: str, a: str, b: str) -> SuitePair:
    return SuitePair(
        f"p{i}", [{"role": "user", "content": f"Question {i}?"}], a, b, label, None, None, "crafted"
    )


# Humans prefer the shorter response, which carries the GOOD marker, on every pair; A and B alternate.
SHORTER_BETTER = [
    pair(0, "A", f"{GOOD} short", "a much longer answer that rambles on"),
    pair(1, "B", "another much longer answer that rambles on", f"{GOOD} brief"),
    pair(2, "A", f"{GOOD} tiny", "the longest answer of them all, rambling on and on"),
    pair(3, "B", "a long answer that goes nowhere at all", f"{GOOD} ok"),
]


class StandInJudge:
    """A Generator whose answer is ``reply(prompt text)``; it gives no probabilities."""

    def __init__(self, reply):
        self.reply = reply

    def render(self, messages):
        return "\n".join(m["content"] for m in messages)

    def generate(self, requests, params, desc=""):
        return [[Completion(self.reply(r[-1]["content"]), 3, "stop")] * params.n for r in requests]

    def next_token_probs(self, texts, candidates):
        return [[0.0] * len(candidates) for _ in texts]

    def close(self):
        pass


def shown(content: str) -> tuple[str, str]:
    a = re.search(r"<response_a>(.*)</response_a>", content, re.DOTALL).group(1)
    b = re.search(r"<response_b>(.*)</response_b>", content, re.DOTALL).group(1)
    return a, b


def always_first(content: str) -> str:
    return "Reasons.\nWinner: Response A"


def prefers_longer(content: str) -> str:
    a, b = shown(content)
    return f"Winner: Response {'A' if len(a) > len(b) else 'B'}"


def knows_the_labels(content: str) -> str:
    if "<response_a>" in content:
        a, _ = shown(content)
        return f"Winner: Response {'A' if GOOD in a else 'B'}"
    response = re.search(r"<response>(.*)</response>", content, re.DOTALL).group(1)
    return "Score: 5" if GOOD in response else "Score: 1"


CFG = EvalConfig(bootstrap_samples=100, num_judgements=2)


def metrics_of(judged) -> dict:
    from metareward.judging.judge_metrics import suite_metrics

    return suite_metrics(judged, 100, 0)


def test_a_stand_in_judge_that_always_picks_the_first_position():
    m = metrics_of(judge_pairwise(StandInJudge(always_first), Templates(), SHORTER_BETTER, CFG, seed=0))
    assert m["position_consistency"] == 0.0 and m["first_position_preference"] == 1.0
    assert m["judge_tie_rate"] == 1.0 and m["accuracy"] == 0.5
    assert m["parse_failure_rate"] == 0.0


def test_a_stand_in_judge_that_prefers_the_longer_response_where_humans_prefer_the_shorter():
    m = metrics_of(judge_pairwise(StandInJudge(prefers_longer), Templates(), SHORTER_BETTER, CFG, seed=0))
    assert m["accuracy"] == 0.0 and m["decided"] == 4
    assert m["longer_preference"] == 1.0 and m["human_longer_preference"] == 0.0
    assert m["position_consistency"] == 1.0 and m["first_position_preference"] == 0.5


def test_a_stand_in_judge_that_answers_with_the_labels_is_right_in_both_protocols():
    judge = StandInJudge(knows_the_labels)
    pairwise = metrics_of(judge_pairwise(judge, Templates(), SHORTER_BETTER, CFG, seed=0))
    pointwise = metrics_of(judge_pointwise(judge, Templates(), SHORTER_BETTER, CFG, "text", seed=0))
    for m in (pairwise, pointwise):
        assert m["accuracy"] == 1.0 and m["ci_low"] is None and m["ci_high"] is None  # too few pairs
        assert m["parse_failure_rate"] == 0.0 and m["longer_preference"] == 0.0
    assert pairwise["position_consistency"] == 1.0
    assert pointwise["position_consistency"] is None and pointwise["brier"] is None


def test_unparsable_answers_are_counted_never_scored():
    m = metrics_of(
        judge_pairwise(StandInJudge(lambda c: "I cannot decide."), Templates(), SHORTER_BETTER, CFG, 0)
    )
    assert m["parse_failure_rate"] == 1.0 and m["accuracy"] == 0.5 and m["decided"] == 0
    assert m["position_consistency"] is None


def test_suites_load_from_settings_and_a_bad_entry_names_eval_suites(tmp_path):
    from metareward.config import ConfigError

    loaded = load_suites(EvalConfig(suites=["llmbar_natural", "pandalm"], num_pairs=5))
    assert [(name, len(pairs)) for name, pairs in loaded] == [("llmbar_natural", 5), ("pandalm", 5)]
    with pytest.raises(ConfigError, match=r"^eval\.suites='nope'"):
        load_suites(EvalConfig(suites=["nope"]))
    with pytest.raises(ConfigError, match="two suites named 'pandalm'"):
        load_suites(EvalConfig(suites=["pandalm", "pandalm"]))


def test_every_suite_and_protocol_is_reported_with_its_per_pair_outcomes():
    judge = StandInJudge(knows_the_labels)
    cfg = EvalConfig(protocols=["pointwise", "pairwise"], bootstrap_samples=100, num_judgements=1)
    result, per_pair = evaluate_suites(judge, Templates(), [("crafted", SHORTER_BETTER)], cfg, "text")
    assert set(result["suites"]["crafted"]) == {"pointwise", "pairwise"}
    assert len(per_pair) == 8
    assert {row["outcome"] for row in per_pair} == {"A", "B"}
    assert all(row["outcome"] == row["label"] for row in per_pair)


def first_position_chat(body: dict) -> dict:
    """The stand-in endpoint judge: always the first position shown."""
    answer = chat_answer({**body, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    answer["choices"][0]["message"]["content"] = "Both fine, but the first.\nWinner: Response A"
    return answer


def test_an_endpoint_judge_with_no_local_model_through_the_command(tmp_path, monkeypatch, capsys):
    suite = tmp_path / "ab_suite.jsonl"
    rows = [
        {"question": f"Q{i}?", "response_A": "short", "response_B": "much longer answer", "label": label}
        for i, label in enumerate(["A>B", "B>A", "A>>B", "A=B"])
    ]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    server = StandInServer(answer_chat=first_position_chat)
    # No embedded or local model may be touched: a cache with nothing in it, and a model path that is a name.
    monkeypatch.setenv("METAREWARD_CACHE", str(tmp_path / "empty-cache"))
    try:
        eval_judge_main(
            [
                "--out",
                str(tmp_path / "out.json"),
                "generator=openai",
                f"generator.openai.base_urls=[{server.url}]",
                "generator.openai.model=strong-judge",
                "generator.progress=false",
                f"eval.suites=[{suite}]",
                "eval.protocols=[pairwise]",
                "eval.bootstrap_samples=50",
            ]
        )
    finally:
        server.close()
    m = json.loads((tmp_path / "out.json").read_text())["suites"]["ab_suite"]["pairwise"]
    assert m["position_consistency"] == 0.0 and m["first_position_preference"] == 1.0
    assert m["pairs"] == 4 and m["label_ties"] == 1 and m["accuracy"] == 0.5
    assert len(server.bodies) == 8 and {b["model"] for b in server.bodies} == {"strong-judge"}
    assert not (tmp_path / "empty-cache").exists()
    assert "ab_suite" in capsys.readouterr().out
    assert len((tmp_path / "out_pairs.jsonl").read_text().splitlines()) == 4


def test_the_pairwise_template_is_replaced_from_the_config(tmp_path):
    from metareward.config import load_config

    path = tmp_path / "pairwise.txt"
    path.write_text(
        "Q: {question}\nA: <response_a>{response_a}</response_a>\nB: <response_b>{response_b}</response_b>"
    )
    cfg = load_config(None, [f"eval.pairwise_template={path}"])
    templates = Templates.load(cfg.judge.template, cfg.meta_judge.template, cfg.eval.pairwise_template)
    content = templates.pairwise_messages([{"role": "user", "content": "Why?"}], "x", "y")[0]["content"]
    assert content == "Q: Why?\nA: <response_a>x</response_a>\nB: <response_b>y</response_b>"
    # The stand-in judges still read the responses where the replaced prompt shows them.
    m = metrics_of(judge_pairwise(StandInJudge(knows_the_labels), templates, SHORTER_BETTER, CFG, seed=0))
    assert m["accuracy"] == 1.0


# ------------------------------------------------------------------ the command's stops and its cache


def _ab_suite(path):
    rows = [
        {"question": f"Q{i}?", "response_A": "short", "response_B": "much longer answer", "label": "A>B"}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _endpoint_judge(server_url: str, suite, out) -> list[str]:
    return [
        "--out", str(out), "generator=openai", f"generator.openai.base_urls=[{server_url}]",
        "generator.openai.model=judge", "generator.openai.max_in_flight=1", "generator.progress=false",
        f"eval.suites=[{suite}]", "eval.protocols=[pairwise]", "eval.bootstrap_samples=20",
    ]  # fmt: skip


def test_eval_judge_stopped_by_sigint_keeps_the_endpoint_answers_and_pays_only_the_rest(tmp_path):
    import signal
    import subprocess
    import time

    from tests.helpers import as_from_a_terminal, cli_env, console_script, run_cli

    server = StandInServer(answer_chat=first_position_chat, delay_s=0.3)
    args = _endpoint_judge(server.url, _ab_suite(tmp_path / "ab.jsonl"), tmp_path / "e.json")
    try:
        child = subprocess.Popen(
            [str(console_script("metareward-eval-judge")), *args],
            env=cli_env(),
            preexec_fn=as_from_a_terminal(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while sum(entry["answered"] is not None for entry in server.log) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 130, err[-3000:]
        assert "Traceback" not in err
        [line] = [row for row in err.splitlines() if row.startswith("metareward-eval-judge:")]
        assert f"stopped by SIGINT; the endpoint answers received are kept in {tmp_path / 'e_cache'}" in line
        kept = len(list((tmp_path / "e_cache").rglob("*.json")))
        assert 3 <= kept < 8 and not (tmp_path / "e.json").exists()

        sent = len(server.log)
        done = run_cli(*args, script="metareward-eval-judge", timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(server.log) - sent == 8 - kept  # 4 pairs in both orders, each answer paid once
        again = run_cli(*args, script="metareward-eval-judge", timeout=300)
        assert again.returncode == 0 and len(server.log) - sent == 8 - kept
    finally:
        server.close()


def test_eval_judge_stops_in_one_line_on_a_dead_strong_judge_and_on_an_out_it_cannot_write(tmp_path):
    from tests.helpers import run_cli

    server = StandInServer(answer_chat=first_position_chat)
    suite = _ab_suite(tmp_path / "ab.jsonl")
    dead = "http://127.0.0.1:9/v1"
    strong = [
        "eval.escalation.enabled=true", "eval.escalation.judge.generator.backend=openai",
        f"eval.escalation.judge.generator.openai.base_urls=[{dead}]",
        "eval.escalation.judge.generator.openai.model=strong",
        "eval.escalation.judge.generator.openai.max_retries=0",
        "eval.escalation.judge.generator.progress=false",
    ]  # fmt: skip
    (tmp_path / "afile").write_text("")
    try:
        down = run_cli(
            *_endpoint_judge(server.url, suite, tmp_path / "e.json"), *strong, script="metareward-eval-judge"
        )
        sent = len(server.log)
        blocked = run_cli(
            *_endpoint_judge(server.url, suite, tmp_path / "afile" / "x.json"), script="metareward-eval-judge"
        )
    finally:
        server.close()
    assert down.returncode == 1 and "Traceback" not in down.stderr
    [line] = down.stderr.strip().splitlines()
    assert line.startswith("metareward-eval-judge: error: ") and dead in line
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr
    out = tmp_path / "afile" / "x.json"
    why = f"{tmp_path / 'afile'} is not a directory"
    assert blocked.stderr.strip() == f"metareward-eval-judge: error: --out {out} cannot be written: {why}"
    assert len(server.log) == sent  # refused before any request


def test_an_rmbench_suite_scores_each_candidate_once_and_reports_its_matrix(tmp_path):
    """A stand-in judge scoring by length (the detailed styles win): RM-Bench's hard cells, where the
    chosen answer is plainer, are all lost."""
    from metareward.judging.suites import load_suite

    styles = ("short", "a longer answer", "the longest answer of them all")
    rows = [
        {"id": i, "prompt": f"Q{i}?", "chosen": [f"{s} {i}" for s in styles],
         "rejected": [f"{s} {i}!" for s in styles], "domain": "chat"}
        for i in range(2)
    ]  # fmt: skip
    path = tmp_path / "rmbench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    asked: list[str] = []

    def by_length(content: str) -> str:
        response = re.search(r"<response>(.*)</response>", content, re.DOTALL).group(1)
        asked.append(response)
        return f"Score: {min(5, len(response) // 6)}"

    cfg = EvalConfig(protocols=["pointwise"], bootstrap_samples=100)
    result, _ = evaluate_suites(StandInJudge(by_length), Templates(), [load_suite(str(path))], cfg, "text")
    assert sorted(asked) == sorted({t for r in rows for t in r["chosen"] + r["rejected"]})  # 12, once each
    official = result["suites"]["rmbench"]["pointwise"]["official"]
    assert official["metric"] == "rmbench" and official["items"] == 2
    # The rejected twin is one character longer: same length bucket, so the diagonal ties (lost).
    assert (official["hard"], official["normal"], official["easy"]) == (0.0, 0.0, 100.0)


def test_a_row_with_a_pair_left_out_is_left_out_whole_and_shared_answers_are_paid_once(tmp_path):
    from metareward.judging.suites import load_suite

    rows = [
        {
            "id": "same",
            "prompt": "Q?",
            "chosen": ["a", "b", "c"],
            "rejected": ["a", "y", "z"],
            "domain": "chat",
        },
        {
            "id": "ok",
            "prompt": "R?",
            "chosen": ["d", "e", "f"],
            "rejected": ["u", "v", "w"],
            "domain": "chat",
        },
    ]
    path = tmp_path / "rmbench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    judge = StandInJudge(lambda content: "Score: 3")
    cfg = EvalConfig(protocols=["pointwise"], bootstrap_samples=100, num_judgements=1)
    result, per_pair = evaluate_suites(judge, Templates(), [load_suite(str(path))], cfg, "text")
    m = result["suites"]["rmbench"]["pointwise"]
    # "same" has one identical pair ("a" against "a"): the whole row is left out, not scored on 8 cells.
    assert m["official"]["items"] == 1 and m["pairs"] == 9 and {r["pair_id"][:2] for r in per_pair} == {"ok"}
    assert all(r["scores"] == [3.0, 3.0] for r in per_pair)
