"""Tracking: W&B offline runs read back from the files W&B writes, and the do-nothing tracker.

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
from metareward.tracking import RUN_ID_FILE, NullTracker, make_tracker, wandb_mode
from tests.wandb_files import offline_files, read_run

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
    assert got["history"][0]["judge/mean_score"] == 2.5
    assert got["history"][1]["judge/mean_score"] == 3.5
    assert got["history"][0]["actor/score_histogram/_type"] == "histogram"
    assert got["history"][0]["actor/score_histogram/values"] == [0, 1, 0, 2, 1]
    assert got["history"][0]["actor/score_histogram/bins"] == [0, 1, 2, 3, 4, 5]
    assert got["history"][1]["actor_pairs/_type"] == "table-file"
    table_file = first.parent / "files" / got["history"][1]["actor_pairs/path"]
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
    assert resumed["history"][2]["judge/mean_score"] == 4.0


def test_null_tracker_does_nothing(tmp_path):
    tracker = make_tracker(TrackingConfig(mode="none"), tmp_path / "run", "r", {"a": 1})
    assert isinstance(tracker, NullTracker)
    with tracker as same:
        same.log({"judge": {"mean_score": 1.0}}, step=0)
        same.log_table("t", ["a"], [[1]], step=0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


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
