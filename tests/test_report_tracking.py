"""Tracking: W&B offline runs read back from the files W&B writes (iteration rows, DPO step rows, a
resumed run, a one-iteration loop), and the do-nothing tracker.

wandb 0.31 writes no ``files/wandb-summary.json`` (nor config.yaml) offline; everything is in the
run's ``.wandb`` transaction log: a 7-byte header (":W&B", magic 0xBEE1, version) and then LevelDB-log records
(32 KiB blocks; each chunk has a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)
whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import os

import pytest

from metareward.config import TrackingConfig
from metareward.report.tracking import (
    ALARM_COLUMNS,
    PAIR_COLUMNS,
    RUN_ID_FILE,
    NullTracker,
    log_iteration_tables,
    make_tracker,
    wandb_mode,
)
from metareward.store.layout import ACTOR_PAIRS, JUDGE_PAIRS
from metareward.store.records import write_jsonl
from tests.wandb_files import offline_files, read_run, rows_at, series

os.environ["WANDB_MODE"] = "offline"


@pytest.fixture
def cfg() -> TrackingConfig:
    return TrackingConfig(mode="offline", project="metareward-test", tags=["unit"])


def test_offline_run_is_written_and_resumed(tmp_path, cfg):
    run_dir = tmp_path / "run"
    config = {"iterations": 2, "actor": {"max_new_tokens": 8}, "WANDB_API_KEY": "not-to-be-logged"}
    with make_tracker(cfg, run_dir, "my-run", config) as tracker:
        tracker.log({"judge": {"mean_score": 2.5}, "actor": {"score_histogram": [0, 1, 0, 2, 1]}}, step=0)
        tracker.log({"judge": {"mean_score": 3.5, "skipped": None}, "iteration": 1}, step=1)
        tracker.log_table("actor_pairs", ["prompt", "chosen"], [["q?", "a."], ["q2", "b"]], step=1)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()

    [first] = offline_files(run_dir)
    assert first.name == f"run-{run_id}.wandb"
    got = read_run(first)
    assert got["run"].run_id == run_id
    assert got["run"].display_name == "my-run"
    assert list(got["run"].tags) == ["unit"]
    config_keys = {item.key for item in got["run"].config.update}
    assert {"iterations", "actor"} <= config_keys and "WANDB_API_KEY" not in config_keys
    assert got["summary"]["judge/mean_score"] == 3.5
    assert got["summary"]["iteration"] == 1
    # Iteration-level keys are plotted against "iteration", logged in each of their rows.
    for key in ("judge/mean_score", "actor/score_histogram", "actor_pairs"):
        assert got["metrics"][key] == "iteration", key
    assert [row["iteration"] for row in got["rows"]] == [0, 1, 1]  # metrics, metrics, table
    at_0, at_1 = rows_at(got, "iteration", 0), rows_at(got, "iteration", 1)
    assert at_0["judge/mean_score"] == 2.5
    assert at_1["judge/mean_score"] == 3.5
    assert at_0["actor/score_histogram/_type"] == "histogram"
    assert at_0["actor/score_histogram/values"] == [0, 1, 0, 2, 1]
    assert at_0["actor/score_histogram/bins"] == [0, 1, 2, 3, 4, 5]
    assert at_1["actor_pairs/_type"] == "table-file"
    table_file = first.parent / "files" / at_1["actor_pairs/path"]
    assert json.loads(table_file.read_text()) == {
        "columns": ["prompt", "chosen"],
        "data": [["q?", "a."], ["q2", "b"]],
    }

    # A resumed metareward run continues the same W&B run (a second offline folder, same run id).
    tracker = make_tracker(cfg, run_dir, "my-run", config)
    assert tracker.run.id == run_id
    tracker.log({"judge": {"mean_score": 4.0}}, step=2)
    tracker.finish()
    tracker.finish()  # idempotent
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    files = offline_files(run_dir)
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    [second] = [f for f in files if f != first]
    resumed = read_run(second)
    assert resumed["run"].run_id == run_id
    assert resumed["summary"]["judge/mean_score"] == 4.0
    assert resumed["metrics"]["judge/mean_score"] == "iteration"
    assert rows_at(resumed, "iteration", 2)["judge/mean_score"] == 4.0


def test_dpo_steps_are_a_series_of_their_own_across_iterations(tmp_path, cfg):
    run_dir = tmp_path / "run"
    losses = {1: [0.69, 0.6], 2: [0.65, 0.5, 0.4]}
    with make_tracker(cfg, run_dir, "dpo-run", {}) as tracker:
        tracker.log({"judge": {"mean_score": 2.0}}, step=0)
        offset = 0
        for t, iteration_losses in losses.items():
            for step, loss in enumerate(iteration_losses, start=1):
                row = {"loss": loss, "rewards/margins": 0.1 * step, "step": step, "step_seconds": 0.5}
                tracker.log_dpo_step(t, offset + step, row)
            offset += len(iteration_losses)
            tracker.log({"judge": {"mean_score": 2.0 + t}, "train": {"loss": iteration_losses[-1]}}, step=t)
    [wandb_file] = offline_files(run_dir)
    got = read_run(wandb_file)
    # Iteration 2's steps continue after iteration 1's on the DPO x-axis.
    assert series(got, "dpo/loss", "dpo/global_step") == [(1, 0.69), (2, 0.6), (3, 0.65), (4, 0.5), (5, 0.4)]
    assert series(got, "dpo/iteration", "dpo/global_step") == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    assert series(got, "dpo/iteration_step", "dpo/global_step") == [(1, 1), (2, 2), (3, 1), (4, 2), (5, 3)]
    assert series(got, "dpo/rewards/margins", "dpo/global_step")[-1] == (5, pytest.approx(0.3))
    assert series(got, "dpo/step_seconds", "dpo/global_step") == [(g, 0.5) for g in range(1, 6)]
    for key in ("dpo/loss", "dpo/rewards/margins", "dpo/step_seconds", "dpo/iteration"):
        assert got["metrics"][key] == "dpo/global_step", key
    assert got["metrics"]["dpo/global_step"] == "" and got["metrics"]["iteration"] == ""
    # Iteration rows stay on their own axis, with none of the DPO keys, and vice versa.
    assert series(got, "judge/mean_score", "iteration") == [(0, 2.0), (1, 3.0), (2, 4.0)]
    assert got["metrics"]["train/loss"] == "iteration"
    for row in got["rows"]:
        assert ("iteration" in row) != ("dpo/global_step" in row), row
        assert ("iteration" in row) == (not any(key.startswith("dpo/") for key in row)), row


def test_null_tracker_does_nothing(tmp_path):
    tracker = make_tracker(TrackingConfig(mode="none"), tmp_path / "run", "r", {"a": 1})
    assert isinstance(tracker, NullTracker)
    with tracker as same:
        same.log({"judge": {"mean_score": 1.0}}, step=0)
        same.log_table("t", ["a"], [[1]], step=0)
        same.log_dpo_step(1, 1, {"loss": 0.5, "step": 1})
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


class RecordingTracker(NullTracker):
    """Keeps each ``log_table`` call as (name, columns, rows, step)."""

    def __init__(self):
        self.tables: list[tuple] = []

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.tables.append((name, columns, rows, step))


def _pair(prompt: str, chosen: str, rejected: str, scores: tuple[float, float]) -> dict:
    return {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_score": scores[0],
        "rejected_score": scores[1],
        "prompt_id": "p",
    }


def test_an_iterations_tables_are_its_first_pairs_its_cascades_and_its_alarms(tmp_path):
    actor = [_pair(f"q{i}?", f"good {i}", f"bad {i}", (4.0, i)) for i in range(3)]
    write_jsonl(tmp_path / ACTOR_PAIRS, actor)
    write_jsonl(tmp_path / JUDGE_PAIRS, [_pair("Rate it.", "Score: 4", "Score: 1", (1.5, -1.5))])
    point = {"fraction": 0.0, "accuracy": 0.5, "cost_usd": 0.0, "escalated": 0, "strong_tokens": 0}
    cascade = {"signal": "margin", "curve": [point], "random_curve": [{**point, "accuracy": 0.25}]}
    alarm = {"guard": "top_score_share", "value": 1.0, "threshold": 0.9, "reason": "score saturation"}
    metrics = {
        "eval": {"pandalm": {"pairwise": {"accuracy": 0.5, "escalation": cascade}, "pointwise": {}}},
        "guards": {"top_score_share": 1.0, "alarms": [alarm]},
    }
    tracker = RecordingTracker()
    log_iteration_tables(tracker, tmp_path, metrics, step=3, limit=2)
    curve_columns = ["curve", "fraction", "accuracy", "cost_usd", "escalated", "strong_tokens"]
    assert tracker.tables == [
        ("actor_pairs", PAIR_COLUMNS,
         [["q0?", "good 0", "bad 0", 4.0, 0], ["q1?", "good 1", "bad 1", 4.0, 1]], 3),
        ("judge_pairs", PAIR_COLUMNS, [["Rate it.", "Score: 4", "Score: 1", 1.5, -1.5]], 3),
        ("escalation_curve/pandalm/pairwise", curve_columns,
         [["margin", 0.0, 0.5, 0.0, 0, 0], ["random", 0.0, 0.25, 0.0, 0, 0]], 3),
        ("guard_alarms", ALARM_COLUMNS, [["top_score_share", 1.0, 0.9, "score saturation"]], 3),
    ]  # fmt: skip
    assert PAIR_COLUMNS == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    assert ALARM_COLUMNS == ["guard", "value", "threshold", "reason"]

    # No evaluation, no guards, table_rows=0: the three tables are logged, empty.
    tracker = RecordingTracker()
    log_iteration_tables(tracker, tmp_path, {}, step=1, limit=0)
    assert [(name, rows) for name, _, rows, _ in tracker.tables] == [
        ("actor_pairs", []),
        ("judge_pairs", []),
        ("guard_alarms", []),
    ]


@pytest.mark.parametrize(
    "mode, env, expected",
    [
        ("wandb", "", "online"),
        ("offline", "", "offline"),
        ("wandb", "offline", "offline"),  # WANDB_MODE may turn tracking down ...
        ("wandb", "disabled", "disabled"),
        ("offline", "online", "offline"),  # ... never up
    ],
)
def test_wandb_mode(monkeypatch, mode, env, expected):
    monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode(mode) == expected


# One iteration, tracked offline, small enough for seconds; the probability fallbacks give scores and
# verdicts although the random model writes neither. Batches of one pair: one optimiser step a pair.
TRACKED_RUN = [
    "model=tiny",
    "iterations=1",
    "data.prompts_per_iteration=3",
    "actor.num_responses=2",
    "actor.max_new_tokens=8",
    "judge.num_judgements=2",
    "judge.max_new_tokens=8",
    "judge.score_from=text_or_expected",
    "meta_judge.max_new_tokens=8",
    "meta_judge.winner_from=text_or_probs",
    "generator.progress=false",
    "train.dpo.batch_size=1",
    "train.dpo.learning_rate=1e-3",
    "tracking=offline",
    "eval.enabled=false",
]


def test_a_tracked_run_logs_every_dpo_step_of_its_iteration(tmp_path, tiny_model_dir):
    """Needs the loop to pass ``on_log`` to train_dpo (or log ``step_rows`` of the training log)."""
    from metareward.cli import load_config
    from metareward.loop.run import Run
    from metareward.store.layout import TRAINING_LOG
    from metareward.training import step_rows

    Run(load_config(None, [*TRACKED_RUN, f"runs_dir={tmp_path}", "run_name=dpo-steps"])).run()
    run_dir = tmp_path / "dpo-steps"
    log = json.loads((run_dir / "iter_1" / "model" / TRAINING_LOG).read_text())
    steps = log["global_steps"]
    assert steps >= 2 and len(step_rows(log)) == steps
    [wandb_file] = offline_files(run_dir)
    got = read_run(wandb_file)
    losses = series(got, "dpo/loss", "dpo/global_step")
    assert [global_step for global_step, _ in losses] == list(range(1, steps + 1))
    assert [loss for _, loss in losses] == pytest.approx([row["loss"] for row in step_rows(log)])
    assert [g for g, _ in series(got, "dpo/rewards/margins", "dpo/global_step")] == list(range(1, steps + 1))
    assert {t for _, t in series(got, "dpo/iteration", "dpo/global_step")} == {1}
    assert got["metrics"]["dpo/loss"] == "dpo/global_step"
    # The iteration's own row, on the iteration axis, ends where the DPO series ends.
    assert rows_at(got, "iteration", 1)["train/loss"] == pytest.approx(losses[-1][1])
    assert got["metrics"]["train/loss"] == "iteration"
