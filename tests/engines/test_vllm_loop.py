"""The Meta-Rewarding loop with ``generator=vllm`` on the real engine (vLLM's CPU build) and the tiny
model: one engine per iteration, shut down before DPO; a run killed mid-judge-stage resumes to the
rows of an uninterrupted one.

    make test-engines          # or: .venv-engines/bin/python -m pytest tests/engines/test_vllm_loop.py
"""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import pytest

import metareward.training
from metareward.config import load_config
from metareward.store import layout, records
from tests.helpers import CHAIN_RUN, ROW_FILES, TINY_RUN, run_cli

ENGINE = [
    "generator=vllm",
    "generator.vllm.enforce_eager=true",
    "generator.vllm.cpu_kv_cache_gib=1",
    "generator.vllm.max_model_len=2048",
    # The random model writes no scores or verdicts, and the run falls back to the probabilities of the
    # score and verdict tokens; its next tokens are near uniform over the 4096 of its vocabulary, so
    # those probabilities are read from all of them, not only the top 20.
    "generator.vllm.max_logprobs=4096",
]


def model_args(model_dir: str) -> list[str]:
    return ["model=hf", f"model.path={model_dir}", "model.dtype=float32"]


def engine_processes() -> set[psutil.Process]:
    """Live vLLM engine cores and workers on this machine (vLLM titles them ``VLLM::...``)."""
    found = set()
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and "VLLM::" in " ".join(process.cmdline()):
                found.add(process)
    return found


@pytest.mark.slow
def test_two_iterations_use_one_engine_each_shut_down_before_training(tiny32_dir, tmp_path, monkeypatch):
    from metareward.generation.vllm import VLLMGenerator  # importable only where vLLM is
    from metareward.loop.run import Run

    events = []
    start, close, train = VLLMGenerator.__init__, VLLMGenerator.close, metareward.training.train_dpo

    def started(self, model_dir, *args, **kwargs):
        start(self, model_dir, *args, **kwargs)
        events.append(("engine", model_dir, len(engine_processes())))

    def closed(self):
        if self.llm is not None:
            events.append(("close",))
        close(self)

    def trained(*args, **kwargs):
        events.append(("train", len(engine_processes())))
        return train(*args, **kwargs)

    monkeypatch.setattr(VLLMGenerator, "__init__", started)
    monkeypatch.setattr(VLLMGenerator, "close", closed)
    monkeypatch.setattr(metareward.training, "train_dpo", trained)
    # A learning rate at which M_1 still writes answers (at TINY_RUN's 1e-3 it learns to end at once).
    overrides = [*TINY_RUN, *model_args(tiny32_dir), *ENGINE, "iterations=2", "train.dpo.learning_rate=1e-5"]
    cfg = load_config(None, [*overrides, f"runs_dir={tmp_path}", "run_name=vllm"])
    history = Run(cfg).run()

    assert [m["iteration"] for m in history] == [1, 2]
    run = tmp_path / "vllm"
    # Each iteration: its engine (running processes) serves all three roles, is shut down, then DPO
    # trains with no engine process left; iteration 2 is served by M_1.
    assert [event[0] for event in events] == ["engine", "close", "train"] * 2
    assert events[0][1] == tiny32_dir and events[3][1] == str(run / "iter_1" / layout.MODEL)
    assert events[0][2] > 0 and events[3][2] > 0
    assert events[2][1] == 0 and events[5][1] == 0
    for t in (1, 2):
        iteration = run / f"iter_{t}"
        assert len(records.read_jsonl(iteration / layout.RESPONSES)) == 4 * 3
        assert len(records.read_jsonl(iteration / layout.JUDGEMENTS)) == 4 * 3 * 3
        assert (iteration / layout.MODEL / "model.safetensors").is_file()
        assert history[t - 1]["pairs"]["actor"]["pairs"] > 0


@pytest.mark.slow
def test_a_run_killed_mid_judge_stage_resumes_to_the_rows_of_an_uninterrupted_one(tiny32_dir, tmp_path):
    args = [*CHAIN_RUN, *model_args(tiny32_dir), *ENGINE, "generator.chunk_size=1", f"runs_dir={tmp_path}"]
    whole = run_cli(*args, "run_name=whole", timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # Killed outright (SIGKILL) after the judge stage's second chunk, its engine still running.
    killed = run_cli(*args, "run_name=killed", kill_at="chunk:judgements.jsonl:2", timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    iteration = tmp_path / "killed" / "iter_1"
    assert len(list((iteration / (layout.JUDGEMENTS + ".parts")).iterdir())) == 2
    assert not (iteration / layout.JUDGEMENTS).exists()
    # Its engine's processes do not outlive it (nor hold its output pipes: run_cli returned).
    deadline = time.monotonic() + 30
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not engine_processes()

    resumed = run_cli(*args, "run_name=killed", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ROW_FILES:
        rows = records.read_jsonl(iteration / name)
        assert rows == records.read_jsonl(tmp_path / "whole" / "iter_1" / name), name
        assert len({repr(row) for row in rows}) == len(rows)  # no row twice
