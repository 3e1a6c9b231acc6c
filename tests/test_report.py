"""metareward-inspect and metareward-report on a small hand-made run directory (no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from metareward.cli import inspect_main, report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _stage_files(directory: Path, t: int) -> None:
    """Two prompts with two responses each, their judgements and verdicts, and the pairs."""
    directory.mkdir(parents=True)
    prompts = [
        {"prompt_id": f"p{i}", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": f"Question {i} of iteration {t}?"}]}
        for i in range(2)
    ]  # fmt: skip
    _jsonl(directory / "prompts.jsonl", prompts)
    tokens = {"p0/r0": 7, "p0/r1": 19, "p1/r0": 5, "p1/r1": 11}
    texts = {rid: f"Answer {rid} of iteration {t}." for rid in tokens}
    texts["p0/r0"] = f"Chosen answer {t} {SCRIPT}" if t == 3 else f"Chosen answer of iteration {t}."
    _jsonl(directory / "responses.jsonl", [
        {"prompt_id": rid.split("/")[0], "response_id": rid, "text": texts[rid], "num_tokens": n,
         "finish_reason": "stop"} for rid, n in tokens.items()
    ])  # fmt: skip
    _jsonl(directory / "judgements.jsonl", [
        {"response_id": "p0/r0", "judgement_id": f"p0/r0/j{n}", "text": f"Judgement {n}. Score: {s}",
         "score": s, "score_probs": None, "finish_reason": "stop"} for n, s in enumerate([4.0, 2.0, 3.0])
    ])  # fmt: skip
    _jsonl(directory / "meta_judgements.jsonl", [
        {"response_id": "p0/r0", "first_id": "p0/r0/j0", "second_id": "p0/r0/j1",
         "text": "Winner: Judgement A", "winner": "first"}
    ])  # fmt: skip
    user = [prompts[0]["messages"][0], prompts[0]["messages"][1]]
    _jsonl(directory / "actor_pairs.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": texts["p0/r0"]}],
         "rejected": [{"role": "assistant", "content": texts["p0/r1"]}], "prompt_id": "p0",
         "chosen_id": "p0/r0", "rejected_id": "p0/r1", "chosen_score": 4.0, "rejected_score": 1.5},
        {"prompt": [prompts[1]["messages"][1]], "chosen": [{"role": "assistant", "content": texts["p1/r0"]}],
         "rejected": [{"role": "assistant", "content": texts["p1/r1"]}], "prompt_id": "p1",
         "chosen_id": "p1/r0", "rejected_id": "p1/r1", "chosen_score": 3.0, "rejected_score": 2.0},
    ])  # fmt: skip
    _jsonl(directory / "judge_pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "Review the user's question ... Score: <points>"}],
         "chosen": [{"role": "assistant", "content": "Judgement 0. Score: 4.0"}],
         "rejected": [{"role": "assistant", "content": "Judgement 1. Score: 2.0"}],
         "response_id": "p0/r0", "chosen_id": "p0/r0/j0", "rejected_id": "p0/r0/j1",
         "chosen_score": 4.0, "rejected_score": 2.0, "chosen_elo": 1.5, "rejected_elo": -1.5}
    ])  # fmt: skip


OLD_METRICS = {  # the shape of the first loop: no eval, TRL's log history under train
    "iteration": 1,
    "prompts": 2,
    "actor": {"responses": 4, "mean_response_tokens": 10.5, "cut_off_share": 0.0},
    "judge": {"judgements": 3, "parse_failure_rate": 0.5, "mean_score": 2.0, "score_stdev": 0.8},
    "meta_judge": {"verdicts": 1, "first_position_win_share": 1.0},
    "pairs": {"actor": {"prompts": 2, "pairs": 2}, "judge": {"prompts": 2, "pairs": 1}, "rho": 0.0},
    "train": {
        "log_history": [
            {"loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "step": 1},
            {"loss": 0.6, "rewards/margins": 0.25, "rewards/accuracies": 1.0, "step": 2},
            {"train_runtime": 3.0, "train_loss": 0.65, "step": 2},
        ]
    },
}


def _suite_eval(accuracy: float) -> dict:
    """An iteration's judge evaluation: two suites, the first under two protocols."""
    metrics = {
        "accuracy": accuracy,
        "ci_low": accuracy - 0.1,
        "ci_high": accuracy + 0.1,
        "position_consistency": None,
        "longer_preference": 0.6,
        "official": {"metric": "pandalm", "score": 100 * accuracy - 20, "f1": 100 * accuracy - 20},
    }
    pairwise = {**metrics, "accuracy": accuracy - 0.05, "position_consistency": 0.8}
    return {"pandalm": {"pointwise": metrics, "pairwise": pairwise}, "hh_rlhf": {"pointwise": metrics}}


def _new_metrics(t: int, score: float, first: float, loss: float, agreement: float) -> dict:
    return {
        "iteration": t,
        "prompts": 2,
        "actor": {"prompts": 2, "responses": 4, "mean_response_tokens": 10.5, "mean_response_score": score,
                  "score_histogram": [0, 1, 2, 1, 0], "num_pairs": 2, "chosen_mean_tokens": 6.0,
                  "rejected_mean_tokens": 15.0},
        "judge": {"judgements": 3, "parse_failure_rate": 0.25, "mean_score": 3.0, "score_stdev": 0.8,
                  "mean_within_response_variance": 0.67, "score_length_correlation": None},
        "meta_judge": {"verdicts": 1, "first_position_win_share": first, "order_agreement": 0.5,
                       "higher_score_win_share": 1.0},
        "pairs": {"actor": {"pairs": 2}, "judge": {"pairs": 1}, "rho": 0.0},
        "train": {"loss": loss, "rewards_margins": 0.8, "rewards_accuracies": 1.0},
        "eval": _suite_eval(agreement),
        "eval_actor": {"win_rate": 0.6, "ci_low": 0.45, "ci_high": 0.75},
    }  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """runs/synth: M_0 eval, iteration 1 in the old metrics shape, 2 and 3 in the new, 4 unfinished."""
    run = tmp_path / "runs" / "synth"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: synth\niterations: 4\n")
    eval_0 = _suite_eval(0.55)
    (run / "eval_0.json").write_text(json.dumps({"judge": eval_0, "per_pair": []}))
    metrics = {
        1: OLD_METRICS,
        2: _new_metrics(2, 2.5, 0.75, 0.5, 0.625),
        3: _new_metrics(3, 3.25, 0.5, 0.4, 0.7),
    }
    for t, m in metrics.items():
        _stage_files(run / f"iter_{t}", t)
        (run / f"iter_{t}" / "metrics.json").write_text(json.dumps(m))
    (run / "iter_4").mkdir()
    _jsonl(run / "iter_4" / "prompts.jsonl", [{"prompt_id": "p0", "messages": []}])
    _jsonl(run / "iter_4" / "responses.jsonl", [])
    return run


def _table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["iter"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line.split() or not line.split()[0].isdigit():
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_inspect_table(run: Path, capsys):
    inspect_main([str(run)])
    out = capsys.readouterr().out
    assert all(len(line) <= 100 for line in out.splitlines())
    rows = _table(out)
    assert list(rows) == ["0", "1", "2", "3"]
    # iter prompts resp score parse-fail 1st-wins a-pairs j-pairs ch-tok rej-tok DPO-loss judge-acc (the
    # first suite under its first protocol)
    assert rows["0"] == ["0", *["-"] * 10, "0.550"]
    assert rows["1"] == ["1", "2", "4", "2.00", "50%", "100%", "2", "1", "-", "-", "0.6000", "-"]
    assert rows["2"] == ["2", "2", "4", "2.50", "25%", "75%", "2", "1", "6.0", "15.0", "0.5000", "0.625"]
    assert rows["3"][3] == "3.25"
    assert "iter_4: unfinished (no metrics.json): prompts.jsonl, responses.jsonl" in out


def test_inspect_json(run: Path, capsys):
    inspect_main([str(run), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["run"] == "synth"
    rows = {row["iteration"]: row for row in data["iterations"]}
    assert rows[0]["judge_accuracy"] == 0.55 and rows[0]["mean_score"] is None
    assert rows[0]["acc:pandalm/pairwise"] == pytest.approx(0.5) and rows[0]["acc:hh_rlhf/pointwise"] == 0.55
    assert rows[2]["consistency:pandalm/pairwise"] == 0.8 and rows[2]["longer:hh_rlhf/pointwise"] == 0.6
    assert rows[1]["dpo_loss"] == 0.6 and rows[1]["rewards_margins"] == 0.25 and rows[1]["actor_pairs"] == 2
    assert rows[1]["score_histogram"] is None and rows[1]["judge_accuracy"] is None
    assert rows[2]["mean_score"] == 2.5 and rows[2]["score_histogram"] == [0, 1, 2, 1, 0]
    assert rows[2]["acc:pandalm/pointwise_ci_high"] == pytest.approx(0.725)
    assert rows[3]["actor_win_rate"] == 0.6 and rows[3]["rewards_accuracies"] == 1.0
    assert data["unfinished"] == [{"iteration": 4, "files": ["prompts.jsonl", "responses.jsonl"]}]


def test_inspect_actor_pairs(run: Path, capsys):
    inspect_main([str(run), "--iter", "1", "--role", "actor", "-n", "1"])
    out = capsys.readouterr().out
    assert "iter 1 actor pair 1/1: prompt p0" in out
    assert "Question 0 of iteration 1?" in out and "Be brief." not in out  # the last user message
    assert "chosen [p0/r0] (score 4.00, 7 tokens):" in out and "Chosen answer of iteration 1." in out
    assert "rejected [p0/r1] (score 1.50, 19 tokens):" in out and "Answer p0/r1 of iteration 1." in out
    assert "p1/r0" not in out

    inspect_main([str(run), "--iter", "2", "--json"])
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    assert len(pairs) == 2
    assert pairs[1]["prompt"] == "Question 1 of iteration 2?" and pairs[1]["chosen_length"] == 5
    assert pairs[1]["rejected_length_unit"] == "tokens" and pairs[1]["rejected_score"] == 2.0


def test_inspect_judge_pairs(run: Path, capsys):
    inspect_main([str(run), "--iter", "2", "--role", "judge"])
    out = capsys.readouterr().out
    assert "iter 2 judge pair 1/1: prompt p0, response p0/r0" in out
    assert "chosen [p0/r0/j0] (score 4.00, elo +1.50, 23 chars):" in out
    assert "rejected [p0/r0/j1] (score 2.00, elo -1.50, 23 chars):" in out
    assert "Judgement 1. Score: 2.0" in out and "Review the user's question" not in out

    inspect_main([str(run), "--iter", "2", "--role", "judge", "--json"])
    (pair,) = json.loads(capsys.readouterr().out)["pairs"]
    assert pair["response_id"] == "p0/r0" and pair["chosen_elo"] == 1.5
    assert pair["chosen"] == "Judgement 0. Score: 4.0" and pair["chosen_length_unit"] == "chars"


def test_long_texts_are_clipped_and_wrapped(run: Path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    pairs = run / "iter_1" / "actor_pairs.jsonl"
    row = json.loads(pairs.read_text().splitlines()[0])
    row["chosen"][0]["content"] = "word " * 400
    _jsonl(pairs, [row])
    inspect_main([str(run), "--iter", "1"])
    out = capsys.readouterr().out
    assert "more chars]" in out and out.count("word") < 150
    assert all(len(line) <= 60 for line in out.splitlines())


@pytest.mark.parametrize("main", [inspect_main, report_main])
def test_not_a_run_dir(tmp_path: Path, capsys, main):
    prog = "metareward-inspect" if main is inspect_main else "metareward-report"
    for path in [tmp_path / "missing", tmp_path]:
        with pytest.raises(SystemExit) as exc:
            main([str(path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"{prog}: error: {path} is not a run directory" in err and "Traceback" not in err


def test_report_problems_are_one_line(run: Path, tmp_path: Path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exc:
        report_main([str(run), "--out", str(afile / "r.html")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("metareward-report: error: ") and "afile" in err
    (run / "iter_2" / "metrics.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as exc:
        report_main([str(run)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "iter_2/metrics.json: expected a JSON object, got list" in err


@pytest.mark.parametrize(
    "args, message",
    [(["--iter", "9"], "iteration 9 does not exist"), (["--iter", "4"], "actor_pairs.jsonl does not exist")],
)
def test_inspect_bad_iteration(run: Path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        inspect_main([str(run), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "metareward-inspect: error:" in err and message in err and "Traceback" not in err


def _images(html_path: Path) -> list[Path]:
    srcs = re.findall(r'<img src="([^"]+)"', html_path.read_text(encoding="utf-8"))
    return [html_path.parent / src for src in srcs]


def test_report(run: Path):
    report_main([str(run)])
    page = (run / "report.html").read_text(encoding="utf-8")
    images = _images(run / "report.html")
    names = {
        "judge_accuracy",
        "judge_official",
        "judge_biases",
        "score_histogram",
        "lengths",
        "position_bias",
        "dpo",
        "actor_win_rate",
    }
    assert {p.name for p in images} == {f"{name}.png" for name in names}
    assert {p.resolve() for p in images} == {p.resolve() for p in (run / "report").iterdir()}  # no temp files
    for image in images:
        assert image.read_bytes().startswith(PNG_MAGIC)
    assert "<title>metareward report: synth</title>" in page and "<td>2.50</td>" in page
    assert "skipped" not in page
    # two sample pairs of the last iteration with pairs, escaped
    assert "Sample actor pairs (iteration 3)" in page and "Question 1 of iteration 3?" in page
    assert "Chosen answer 3 &lt;script&gt;alert(1)&lt;/script&gt;" in page and SCRIPT not in page


def test_report_skips_plots_without_data(run: Path, tmp_path: Path):
    for name in ["eval_0.json", "iter_2", "iter_3"]:
        path = run / name
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    (run / "report").mkdir()
    (run / "report" / "score_histogram.png").write_bytes(PNG_MAGIC)  # stale, from an earlier report
    out = tmp_path / "elsewhere" / "page.html"
    report_main([str(run), "--out", str(out)])
    images = _images(out)
    assert sorted(p.name for p in images) == ["dpo.png", "lengths.png", "position_bias.png"]
    assert all(p.is_file() and p.read_bytes().startswith(PNG_MAGIC) for p in images)
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(p.name for p in images)
    page = out.read_text(encoding="utf-8")
    for title in [
        "Judge accuracy on the preference suites",
        "Response scores by iteration",
        "Actor win rate vs M_0",
    ]:
        assert re.search(re.escape(title) + r"[^<]*: skipped", page)
    assert "iter_4 unfinished" in page and not (run / "report.html").exists()


def test_suite_and_model_names_with_dollar_signs_are_drawn_as_typed(tmp_path: Path):
    from metareward.report.plots import plot_cascades

    points = [
        {"fraction": 0.0, "accuracy": 0.5, "cost_usd": 0.0},
        {"fraction": 1.0, "accuracy": 0.7, "cost_usd": 2.0},
    ]
    found = {"signal": "margin", "curve": points, "random_curve": points, "strong_accuracy": 0.7}
    path = tmp_path / "escalation.png"
    assert plot_cascades(path, "model $_$", {"prices $_$ and $\\frac$/pairwise": found})
    assert path.read_bytes().startswith(PNG_MAGIC)
