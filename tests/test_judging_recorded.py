"""Recorded verdicts (eval.recorded.*): a judge and a strong judge scored from files in JudgeBench's
outputs format, and from metareward-eval-judge's own per-pair rows, with no model and no network; the
cascade between them checked by hand on JudgeBench's terms."""

from __future__ import annotations

import json
import math

import pytest

from metareward.cli import eval_judge_main
from metareward.judging.recorded import load_recorded
from metareward.judging.suites import load_suite
from metareward.store import records

# (label, score difference A - B in the order shown as given, in the order shown swapped) of the local
# judge, a reward model; its confidence is the score margin.
LOCAL = {
    "p0": ("A>B", 3.0, 3.0),  # right twice: counts
    "p1": ("A>B", 0.1, -0.1),  # A, then B: inconsistent, no credit
    "p2": ("B>A", -2.0, -2.0),  # right twice
    "p3": ("B>A", 0.5, 0.5),  # wrong twice
    "p4": ("A>B", -0.2, 0.2),  # inconsistent
    "p5": ("B>A", 1.0, 1.0),  # wrong twice
}
# The strong judge's decisions (A shown first, then swapped as the judge saw it).
STRONG = {
    "p0": ("A>B", "B>A"),
    "p1": ("A>B", "B>A"),
    "p2": ("B>A", "A>B"),
    "p3": ("B>A", "A>B"),
    "p4": ("B>A", "A>B"),  # wrong twice
    "p5": ("B>A", None),  # right once, no verdict once: +1, counts
}


def _reward_model_row(pair_id: str, d_given: float, d_swapped: float) -> dict:
    """JudgeBench's row of a reward model: scores [first shown, second shown] and the decision they give."""

    def judgment(first: float, second: float) -> dict:
        return {"decision": "A>B" if first > second else "B>A", "judgment": {"scores": [first, second]}}

    # Shown swapped, B is first: its scores are [B, A] with A - B = d_swapped.
    return {"pair_id": pair_id, "judgments": [judgment(1.0 + d_given, 1.0), judgment(1.0, 1.0 + d_swapped)]}


@pytest.fixture
def files(tmp_path):
    suite = tmp_path / "judgebench.jsonl"
    rows = [
        {"pair_id": pid, "question": f"Q {pid}?", "response_A": f"a {pid}", "response_B": f"b {pid}",
         "label": label, "source": "mmlu-pro-law" if pid < "p3" else "livebench-math"}
        for pid, (label, _, _) in LOCAL.items()
    ]  # fmt: skip
    records.write_jsonl(suite, rows)
    local = tmp_path / "reward_model.jsonl"
    records.write_jsonl(local, [_reward_model_row(pid, d1, d2) for pid, (_, d1, d2) in LOCAL.items()])
    strong = tmp_path / "o1-mini.jsonl"
    records.write_jsonl(
        strong,
        [
            {"pair_id": pid, "judge_name": "strong", "judgments": [{"decision": d1}, {"decision": d2}]}
            for pid, (d1, d2) in STRONG.items()
        ],
    )
    return suite, local, strong


def _args(suite, out, *extra: str) -> list[str]:
    return [
        "--out", str(out), f"eval.suites=[{suite}]", "eval.protocols=[pairwise]", "eval.bootstrap_samples=20",
        *extra,
    ]  # fmt: skip


def test_a_cascade_between_two_recorded_judges_runs_with_no_model_and_is_priced_on_judgebench_terms(
    files, tmp_path, monkeypatch
):
    suite, local, strong = files
    monkeypatch.setenv("METAREWARD_CACHE", str(tmp_path / "no-model-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "priced.json"
    eval_judge_main(
        _args(
            suite,
            out,
            f"eval.recorded.judge={local}",
            f"eval.recorded.strong={strong}",
            "eval.escalation.enabled=true",
            "eval.escalation.signal=margin",
            "eval.escalation.curve_points=7",
        )
    )
    assert not (tmp_path / "no-model-cache").exists(), "a model was looked for"
    m = records.read_json(out)["suites"]["judgebench"]["pairwise"]
    assert m["official"]["metric"] == "judgebench"
    assert m["official"]["score"] == pytest.approx(100 * 2 / 6)
    # The project's accuracy gives the two inconsistent pairs half each.
    assert m["accuracy"] == pytest.approx(3 / 6)
    found = m["escalation"]
    assert found["local_accuracy"] == pytest.approx(2 / 6) and found["strong_accuracy"] == pytest.approx(
        5 / 6
    )
    # Least margin first: p1 (+1), p4 (0), p3 (+1), p5 (+1), p2, p0 (0 each).
    assert [p["accuracy"] for p in found["curve"]] == pytest.approx([k / 6 for k in (2, 3, 3, 4, 5, 5, 5)])
    assert found["fraction_to_match_strong"] == pytest.approx(4 / 6)
    assert all(p["cost_usd"] is None for p in found["curve"])  # nothing priced, nothing paid

    # The run's own per-pair rows, recorded: the same judge, re-priced without a call.
    again = tmp_path / "again.json"
    eval_judge_main(_args(suite, again, f"eval.recorded.judge={tmp_path / 'priced_pairs.jsonl'}"))
    m2 = records.read_json(again)["suites"]["judgebench"]["pairwise"]
    assert m2["official"]["score"] == m["official"]["score"] and m2["accuracy"] == m["accuracy"]


def test_a_reward_models_scores_give_each_orders_probability_that_a_is_better(files):
    suite, local, _ = files
    _, pairs = load_suite(str(suite))
    [judged] = load_recorded(local).judged("judgebench", "pairwise", pairs[:1])
    assert [v.winner for v in judged.verdicts] == ["A", "A"] and [v.first for v in judged.verdicts] == [
        "A",
        "B",
    ]
    sigmoid = 1 / (1 + math.exp(-3.0))
    assert [v.prob_a for v in judged.verdicts] == pytest.approx([sigmoid, sigmoid])


def test_recorded_verdicts_that_do_not_fit_are_one_line_naming_the_file(files, tmp_path, capsys):
    suite, local, _ = files
    rows = records.read_jsonl(local)[:-1]
    short = tmp_path / "short.jsonl"
    records.write_jsonl(short, rows)
    cases = {
        "no recorded verdicts for pair 'p5'": _args(
            suite, tmp_path / "a.json", f"eval.recorded.judge={short}"
        ),
        "none under protocol pointwise": [
            *_args(suite, tmp_path / "b.json", f"eval.recorded.judge={local}"),
            "eval.protocols=[pointwise]",
        ],
    }
    for says, args in cases.items():
        with pytest.raises(SystemExit) as stopped:
            eval_judge_main(args)
        err = capsys.readouterr().err
        assert stopped.value.code == 1 and err.count("\n") == 1, err
        assert says in err and str(short if "p5" in says else local) in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"pair_id": "p0", "judgments": [{"decision": "A>B", "judgment": {"scores": [1]}}]})
    )
    with pytest.raises(SystemExit):
        eval_judge_main(_args(suite, tmp_path / "c.json", f"eval.recorded.judge={bad}"))
    assert f"{bad}:1: `scores` must be two finite numbers" in capsys.readouterr().err


def test_a_run_refuses_recorded_verdicts_by_key(tmp_path):
    from metareward.config import ConfigError, load_config
    from metareward.loop.run import check_run_models

    path = tmp_path / "r.jsonl"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"eval\.recorded\.judge=.*is for metareward-eval-judge"):
        check_run_models(load_config(None, [f"eval.recorded.judge={path}"]))
    with pytest.raises(ConfigError, match=r"eval\.recorded\.strong=.*eval\.escalation\.enabled=true"):
        load_config(None, [f"eval.recorded.strong={path}"])


def test_pointwise_rows_of_the_command_keep_their_scores_for_a_best_of_n_rescoring(tmp_path):
    from metareward.judging.official import official_score
    from metareward.judging.suites import read_suite_rows

    row = {
        "id": "1",
        "prompt": "Q?",
        "chosen": ["c"],
        "rejected": ["r0", "r1"],
        "num_correct": 1,
        "subset": "Math",
    }
    pairs = read_suite_rows([(1, row)], "crafted", "rb2")
    own = [
        {"suite": "rb2", "protocol": "pointwise", "pair_id": p.pair_id, "verdicts": ["tie"], "prob_a": None,
         "scores": [4.0, score]}
        for p, score in zip(pairs, (4.0, 2.0), strict=True)
    ]  # fmt: skip
    path = tmp_path / "own.jsonl"
    records.write_jsonl(path, own)
    judged = load_recorded(path).judged("rb2", "pointwise", pairs)
    # The chosen one ties the first rejected at the top: 1/2, as RewardBench 2 scores it.
    assert official_score("rewardbench2", judged)["subsets"]["Math"] == pytest.approx(50.0)
