"""End-to-end runs of the loop on the tiny model: files, training, pair rebuilds.

Resuming after a SIGKILL is tested in tests/test_store_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from safetensors.torch import load_file

from metareward.config import load_config
from metareward.loop.run import Run, RunStopped
from metareward.store import layout, records
from tests.helpers import TINY_RUN, run_cli, tiny_config
from tests.wandb_files import offline_files, read_run, rows_at

# Whole runs of the loop (make test-fast leaves them out).
pytestmark = pytest.mark.slow

# What the two-iteration run adds on top: W&B offline tracking and a small evaluation each iteration.
TRACKED_EVAL = [
    "tracking=offline",
    "eval.enabled=true",
    "eval.num_pairs=4",
    "eval.max_new_tokens=8",
    "eval.num_heldout=2",
    "eval.response_max_new_tokens=12",
    "eval.bootstrap_samples=50",
]
STAGE_FILES = [
    layout.RESPONSES,
    layout.JUDGEMENTS,
    layout.META_JUDGEMENTS,
    layout.ACTOR_PAIRS,
    layout.JUDGE_PAIRS,
]


def rows(path: Path) -> list[dict]:
    return records.read_jsonl(path)


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(runs, "run_name=e2e", "iterations=2", *TRACKED_EVAL)
    history = Run(cfg).run()
    return runs / "e2e", history


def test_two_iterations_write_every_contract_file(two_iterations):
    run_dir, history = two_iterations
    assert (run_dir / layout.CONFIG).is_file()
    assert [m["iteration"] for m in history] == [1, 2]
    for t in (1, 2):
        d = run_dir / f"iter_{t}"
        for name in [layout.PROMPTS, *STAGE_FILES, layout.METRICS]:
            assert (d / name).is_file(), f"{d / name} missing"
        assert (d / "model" / "model.safetensors").is_file()
        assert not list(d.glob("*.parts")), "chunk directories are removed once a stage is complete"
        prompts, responses = rows(d / layout.PROMPTS), rows(d / layout.RESPONSES)
        judgements, verdicts = rows(d / layout.JUDGEMENTS), rows(d / layout.META_JUDGEMENTS)
        assert len(prompts) == 4
        # IDs follow the contract and nothing is written twice.
        for r in responses:
            assert r["response_id"].startswith(r["prompt_id"] + "/r")
        assert len({r["response_id"] for r in responses}) == len(responses)
        assert len(judgements) == 3 * len(responses)
        assert {j["judgement_id"] for j in judgements} == {
            f"{r['response_id']}/j{n}" for r in responses for n in range(3)
        }
        for j in judgements:
            assert j["score_probs"] is None or abs(sum(j["score_probs"]) - 1) < 1e-6
            assert j["score"] is None or 0 <= j["score"] <= 5
        for v in verdicts:
            assert v["winner"] in ("first", "second", None)
            assert v["first_id"] != v["second_id"]
        # Every compared pair of judgements appears in both orders.
        shown = {(v["first_id"], v["second_id"]) for v in verdicts}
        assert shown == {(b, a) for a, b in shown}
        metrics = json.loads((d / layout.METRICS).read_text())
        assert metrics["pairs"]["actor"]["pairs"] == len(rows(d / layout.ACTOR_PAIRS)) >= 1
        assert any("loss" in entry for entry in metrics["train_log"])
        assert metrics["train"]["steps"] >= 1


def test_offline_wandb_run_holds_judge_skill_and_iteration_metrics(two_iterations):
    run_dir, history = two_iterations
    wandb_file = offline_files(run_dir)[0]  # later resumptions add folders of their own
    logged = read_run(wandb_file)
    assert logged["run"].run_id == (run_dir / "wandb_run_id").read_text().strip()
    summary = logged["summary"]
    final = history[-1]
    accuracy = "eval/hh_rlhf/pointwise/accuracy"  # eval/<suite>/<protocol>/<metric>
    assert summary[accuracy] == pytest.approx(final["eval"]["hh_rlhf"]["pointwise"]["accuracy"])
    # The benchmark's own score beside it (hh_rlhf: accuracy averaged over the orders, 0..100).
    official = final["eval"]["hh_rlhf"]["pointwise"]["official"]
    assert official["metric"] == "accuracy"
    assert summary["eval/hh_rlhf/pointwise/official/score"] == pytest.approx(official["score"])
    for key in [
        "actor/mean_response_score",
        "actor/num_pairs",
        "actor/chosen_mean_tokens",
        "judge/parse_failure_rate",
        "judge/mean_score",
        "judge/mean_within_response_variance",
        "judge/mean_score_entropy",
        "meta_judge/verdicts",
        "train/loss",
        "train/rewards_margins",
        "eval_actor/win_rate",
    ]:
        assert key in summary, key
    assert summary["judge/mean_score"] == pytest.approx(final["judge"]["mean_score"])
    # M_0's evaluation is iteration 0, then iterations 1 and 2, on the "iteration" axis.
    for t in (0, 1, 2):
        assert accuracy in rows_at(logged, "iteration", t), t
    assert logged["metrics"][accuracy] == "iteration"
    # Artifacts: M_0's evaluation, then per iteration its pairs, its evaluation and M_t by reference.
    ours = [a for a in logged["artifacts"] if a["type"] in ("dataset", "evaluation", "model")]  # not tables
    made = [(a["type"], a["name"], [x for x in a["aliases"] if x != "latest"]) for a in ours]
    assert made == [
        ("evaluation", "e2e-eval", ["iter_0"]),
        *[
            (kind, f"e2e-{what}", [f"iter_{t}"])
            for t in (1, 2)
            for kind, what in (("dataset", "pairs"), ("evaluation", "eval"), ("model", "model"))
        ],
    ]
    pairs = ours[1]["files"]
    assert set(pairs) == {"actor_pairs.jsonl", "judge_pairs.jsonl", "README.md", "train_job/pairs.jsonl"}
    model = ours[3]
    # By reference: each file of M_1's folder is pointed at where it is, none uploaded.
    folder = (run_dir / "iter_1" / "model").resolve()
    expected = {f"model/{f.name}": f.as_uri() for f in folder.iterdir() if f.is_file()}
    assert model["files"] == expected and "model/model.safetensors" in expected
    m0 = json.loads((run_dir / "eval_0.json").read_text())
    assert 0 <= m0["judge"]["hh_rlhf"]["pointwise"]["accuracy"] <= 1 and len(m0["per_pair"]) == 4
    # The best judge of M_0, M_1, M_2 on the default selection (the first suite and protocol).
    best = json.loads((run_dir / "best.json").read_text())
    accuracies = [m0["judge"], *(m["eval"] for m in history)]
    accuracies = [e["hh_rlhf"]["pointwise"]["accuracy"] for e in accuracies]
    assert best["select_by"] == "hh_rlhf/pointwise" and best["accuracy"] == max(accuracies)
    assert best["iteration"] == accuracies.index(max(accuracies))


def test_each_evaluated_model_exports_its_heldout_answers_and_its_self_preference(two_iterations):
    run_dir, history = two_iterations
    for t in (0, 1, 2):
        outputs = json.loads((run_dir / "heldout" / f"M_{t}" / "alpaca_eval_model_outputs.json").read_text())
        assert len(outputs) == 2 and {o["generator"] for o in outputs} == {f"e2e-M_{t}"}
        assert (run_dir / "heldout" / f"M_{t}" / "model_answer" / f"e2e-M_{t}.jsonl").is_file()
    for metrics in history:
        actor = metrics["eval_actor"]
        assert actor["self_preference"] == pytest.approx(actor["self_judged_win_rate"] - actor["win_rate"])


def test_pair_files_load_with_datasets(two_iterations, tmp_path):
    run_dir, _ = two_iterations
    for name in (layout.ACTOR_PAIRS, layout.JUDGE_PAIRS):
        path = run_dir / "iter_1" / name
        if path.stat().st_size == 0:
            continue
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
        assert {"prompt", "chosen", "rejected", "chosen_id", "rejected_id"} <= set(loaded.column_names)
        assert loaded[0]["chosen"][0]["role"] == "assistant"
    assert rows(run_dir / "iter_1" / layout.JUDGE_PAIRS), "the tiny run should give at least one judge pair"


def test_each_iteration_directory_loads_as_a_dataset_by_its_card(two_iterations, tmp_path):
    run_dir, _ = two_iterations
    for t in (1, 2):
        iteration = run_dir / f"iter_{t}"
        card = (iteration / layout.DATASET_CARD).read_text()
        assert card.startswith("---\nconfigs:\n") and f"iteration {t}" in card
        played_by = "tiny" if t == 1 else str(run_dir / "iter_1" / layout.MODEL)
        assert f"Actor: M_{t - 1} (`{played_by}`); judge: M_{t - 1} (`{played_by}`);" in card
        assert f"DPO trained M_{t} from M_{t - 1} on the `trained` rows." in card
        files = {
            "actor": iteration / layout.ACTOR_PAIRS,
            "judge": iteration / layout.JUDGE_PAIRS,
            "trained": iteration / layout.TRAIN_JOB / layout.JOB_PAIRS,
        }
        for name, path in files.items():
            if not rows(path):
                assert f"config_name: {name}\n" not in card
                continue
            loaded = datasets.load_dataset(str(iteration), name, split="train", cache_dir=str(tmp_path))
            assert len(loaded) == len(rows(path)), (t, name)
        # "trained" is exactly what DPO trained on: the actor pairs, and the judge pairs in iterations 1-2.
        trained = records.read_json(iteration / layout.MODEL / layout.TRAINING_LOG)["train_pairs"]
        assert len(rows(files["trained"])) == trained == len(rows(files["actor"])) + len(rows(files["judge"]))


def test_each_model_has_a_card_naming_its_base_iteration_and_judge_skill(two_iterations, tiny_model_dir):
    run_dir, history = two_iterations
    for t, metrics in zip((1, 2), history, strict=True):
        card = (run_dir / f"iter_{t}" / layout.MODEL / layout.MODEL_CARD).read_text()
        assert card.startswith("---\nlibrary_name: transformers\n") and f"# e2e: M_{t}" in card
        assert "the seed model `tiny`" in card
        trained_from = tiny_model_dir if t == 1 else str(run_dir / "iter_1" / layout.MODEL)
        assert f"from `{trained_from}`" in card
        assert f"| actor pairs | {metrics['pairs']['actor']['pairs']} |" in card
        accuracy = metrics["eval"]["hh_rlhf"]["pointwise"]["accuracy"]
        assert f"| hh_rlhf | pointwise | {accuracy:.3f} |" in card
        # Every DPO setting the step ran with (LoRA's only where it was on), as the run's config has it.
        settings = json.loads(card.split("DPO settings:\n\n```json\n")[1].split("```")[0])
        dpo = yaml.safe_load((run_dir / layout.CONFIG).read_text())["train"]["dpo"]
        assert settings == {k: v for k, v in dpo.items() if not k.startswith("lora_")} | {
            "launcher": "inline"
        }
        assert settings["learning_rate"] == 1e-3 and "max_grad_norm" in settings


def test_iterations_train_from_the_previous_model(two_iterations, tiny_model_dir):
    run_dir, _ = two_iterations
    m0 = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    m1 = load_file(str(run_dir / "iter_1" / "model" / "model.safetensors"))
    m2 = load_file(str(run_dir / "iter_2" / "model" / "model.safetensors"))
    changed_1 = [k for k in m0 if not (m0[k] == m1[k]).all()]
    changed_2 = [k for k in m1 if not (m1[k] == m2[k]).all()]
    assert changed_1 and changed_2


def test_rerun_of_a_finished_run_does_no_work(two_iterations):
    run_dir, _ = two_iterations
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.jsonl")}
    cfg = tiny_config(run_dir.parent, "run_name=e2e", "iterations=2", *TRACKED_EVAL)
    Run(cfg).run()
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.jsonl")}


def test_changed_config_is_refused_with_the_keys(two_iterations):
    run_dir, _ = two_iterations
    cfg = tiny_config(run_dir.parent, "run_name=e2e", "iterations=2", *TRACKED_EVAL, "actor.num_responses=4")
    with pytest.raises(RunStopped, match=r"actor\.num_responses: 3 -> 4"):
        Run(cfg).run()


def _crafted_iteration(iter_dir: Path) -> None:
    """One prompt whose responses make length control matter (see test below)."""
    iter_dir.mkdir(parents=True)
    prompt = {"prompt_id": "q", "messages": [{"role": "user", "content": "Explain tides."}]}
    scored = [(5.0, 100), (4.5, 10), (1.0, 50), (1.5, 200)]  # (score, num_tokens) for r0..r3
    responses = [
        {
            "prompt_id": "q",
            "response_id": f"q/r{k}",
            "text": f"answer {k}",
            "num_tokens": n,
            "finish_reason": "stop",
        }
        for k, (_, n) in enumerate(scored)
    ]
    judgements = [
        {
            "response_id": f"q/r{k}",
            "judgement_id": f"q/r{k}/j0",
            "text": f"Score: {s}",
            "score": s,
            "score_probs": None,
            "finish_reason": "stop",
        }
        for k, (s, _) in enumerate(scored)
    ]
    records.write_jsonl(iter_dir / layout.PROMPTS, [prompt])
    records.write_jsonl(iter_dir / layout.RESPONSES, responses)
    records.write_jsonl(iter_dir / layout.JUDGEMENTS, judgements)
    records.write_jsonl(iter_dir / layout.META_JUDGEMENTS, [])


def test_pairs_cli_rebuilds_with_another_rho(tmp_path):
    iter_dir = tmp_path / "run" / "iter_1"
    _crafted_iteration(iter_dir)
    pairs_cli = {"script": "metareward-pairs", "timeout": None, "text": False, "check": True}
    run_cli(str(iter_dir), **pairs_cli)
    run_cli(str(iter_dir), "--out", str(tmp_path / "out"), "pairs.rho=0.4", **pairs_cli)
    (rho0,) = rows(iter_dir / layout.ACTOR_PAIRS)
    (rho4,) = rows(tmp_path / "out" / layout.ACTOR_PAIRS)
    # rho=0: best vs worst score.
    # rho=0.4: top tier {r0, r1} -> shortest r1; bottom tier {r2, r3} -> longest r3.
    assert (rho0["chosen_id"], rho0["rejected_id"]) == ("q/r0", "q/r2")
    assert (rho4["chosen_id"], rho4["rejected_id"]) == ("q/r1", "q/r3")
    assert rows(tmp_path / "out" / layout.JUDGE_PAIRS) == []
    # The rewritten pairs come with their card: the actor pairs load by it; no judge pair, no config.
    card = (tmp_path / "out" / layout.DATASET_CARD).read_text()
    assert "config_name: judge" not in card and "rho" in card
    loaded = datasets.load_dataset(
        str(tmp_path / "out"), "actor", split="train", cache_dir=str(tmp_path / "c")
    )
    assert loaded[0]["chosen_id"] == "q/r1"


def test_pairs_cli_rejects_a_bad_override(tmp_path):
    iter_dir = tmp_path / "run" / "iter_1"
    _crafted_iteration(iter_dir)
    result = run_cli(str(iter_dir), "pairs.rho=0.9", script="metareward-pairs", timeout=None)
    assert result.returncode == 2
    assert "pairs.rho" in result.stderr and "Traceback" not in result.stderr


def test_no_pairs_stops_the_run_with_a_reason(tmp_path, tiny_model_dir):
    # The random model never writes "Score: N", so with the paper's rule nothing is scored.
    result = run_cli(
        *TINY_RUN,
        f"runs_dir={tmp_path}",
        "run_name=none",
        "iterations=1",
        "judge.score_from=text",
        "data.prompts_per_iteration=2",
        "judge.num_judgements=1",
    )
    assert result.returncode == 1
    assert "no preference pairs" in result.stderr and "no scored responses" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_multirun_gives_each_job_its_own_complete_run_directory(tmp_path, tiny_model_dir):
    tracked = [*(o for o in TINY_RUN if not o.startswith("tracking=")), "tracking=offline"]
    sweep = ["-m", *tracked, f"runs_dir={tmp_path}", "run_name=sweep", "iterations=1"]
    sweep += ["data.prompts_per_iteration=2", "actor.num_responses=2,3"]
    result = run_cli(*sweep)
    assert result.returncode == 0, result.stderr[-2000:]
    for job, k in (("sweep_0", 2), ("sweep_1", 3)):
        run_dir = tmp_path / job
        assert load_config(run_dir / layout.CONFIG, []).actor.num_responses == k
        directory = run_dir / "iter_1"
        for name in [*STAGE_FILES, layout.METRICS]:
            assert (directory / name).is_file(), (job, name)
        assert (directory / layout.MODEL / "model.safetensors").is_file()
        assert len(rows(directory / layout.RESPONSES)) == 2 * k
        # Hydra's own files and log are the job's, beside its run.
        assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "metareward.log").is_file()
        # Each job is its own W&B run, in the sweep's group.
        [wandb_file] = offline_files(run_dir)
        assert read_run(wandb_file)["run"].run_group == "sweep"


def test_a_two_trial_optuna_sweep_optimises_what_the_run_returns(tmp_path, tiny_model_dir):
    """Hydra's Optuna sweeper samples pairs.rho from an interval (which the basic sweeper cannot split)
    and maximises what each run returns: its judge's accuracy on eval.select_by."""
    evaluated = [
        "eval.enabled=true", "eval.num_pairs=4", "eval.max_new_tokens=8", "eval.win_rate=false",
        "eval.bootstrap_samples=20", "eval.suites=[llmbar_natural]",
    ]  # fmt: skip
    sweep = [
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=0", *(o for o in TINY_RUN if not o.startswith("eval.")), *evaluated,
        f"runs_dir={tmp_path}", "run_name=opt", "iterations=1", "data.prompts_per_iteration=2",
        "pairs.rho=interval(0,0.4)",
    ]  # fmt: skip
    result = run_cli(*sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    rhos, accuracies = [], []
    for job in ("opt_0", "opt_1"):
        config = load_config(tmp_path / job / layout.CONFIG, [])
        rhos.append(config.pairs.rho)
        metrics = records.read_json(tmp_path / job / "iter_1" / layout.METRICS)
        accuracies.append(metrics["eval"]["llmbar_natural"]["pointwise"]["accuracy"])
    assert all(0 <= rho < 0.4 for rho in rhos) and rhos[0] != rhos[1]
    found = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert found["best_value"] == pytest.approx(max(accuracies))
    assert found["best_params"]["pairs.rho"] == pytest.approx(rhos[accuracies.index(max(accuracies))])


def test_the_run_returns_its_objective(tmp_path):
    from metareward.loop.run import run_objective

    last = {"eval": {"hh_rlhf": {"pointwise": {"accuracy": 0.75}}}, "eval_actor": {"win_rate": 0.6}}
    assert run_objective(load_config(None, []), [last]) == 0.75
    assert run_objective(load_config(None, ["objective=eval_actor.win_rate"]), [last]) == 0.6
    assert run_objective(load_config(None, ["objective=eval_actor.nothing"]), [last]) is None


def test_an_interval_sweep_of_a_bad_setting_is_refused_before_any_job(tmp_path):
    sweep = ["-m", "hydra/sweeper=optuna", *TINY_RUN, f"runs_dir={tmp_path}", "pairs.rho=interval(0.5,0.9)"]
    result = run_cli(*sweep)
    assert result.returncode == 2 and "pairs.rho=0.7" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
