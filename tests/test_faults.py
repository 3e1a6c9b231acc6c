"""Kill anywhere, lose nothing: a tiny run SIGKILLed at a point in every stage and started again each
time finishes with exactly the rows (and the model) of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metareward.store import faults, records
from metareward.training import TRAINING_LOG

# Whole runs of the loop (make test-fast leaves them out).
pytestmark = pytest.mark.slow

CLI = Path(sys.executable).parent / "metareward"
# The smallest run that still has two chunks in every stage, actor and judge pairs, and two DPO steps.
CHAIN_RUN = [
    "model=tiny",
    "iterations=1",
    "data.prompts_per_iteration=2",
    "actor.num_responses=2",
    "actor.max_new_tokens=16",
    "judge.num_judgements=2",
    "judge.max_new_tokens=16",
    "meta_judge.max_new_tokens=4",
    # The random model writes neither scores nor verdicts; these fallbacks give both.
    "judge.score_from=text_or_expected",
    "meta_judge.winner_from=text_or_probs",
    "generator.chunk_size=1",
    "generator.progress=false",
    "train.dpo.batch_size=1",
    "train.dpo.learning_rate=1e-3",
    "tracking=none",
    "eval.enabled=false",
]
ROW_FILES = [
    records.PROMPTS,
    records.RESPONSES,
    records.JUDGEMENTS,
    records.META_JUDGEMENTS,
    records.ACTOR_PAIRS,
    records.JUDGE_PAIRS,
]


def run_cli(runs: Path, name: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != faults.ENV}
    if kill_at is not None:
        env[faults.ENV] = kill_at
    args = [str(CLI), *CHAIN_RUN, f"runs_dir={runs}", f"run_name={name}"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def temp_files(directory: Path, target: str) -> list[Path]:
    return list(directory.glob(f".{target}.*.tmp"))


# What must be on disk right after each kill; the chain goes through them in this order.
def killed_mid_actor(d: Path) -> None:
    assert not (d / records.RESPONSES).exists()
    assert names(d / (records.RESPONSES + ".parts")) == {"000000.jsonl"}


def killed_mid_judge(d: Path) -> None:
    assert (d / records.RESPONSES).is_file() and not (d / records.JUDGEMENTS).exists()
    assert names(d / (records.JUDGEMENTS + ".parts")) == {"000000.jsonl", "000001.jsonl"}


def killed_after_joining(d: Path) -> None:
    assert (d / records.JUDGEMENTS).is_file() and (d / (records.JUDGEMENTS + ".parts")).is_dir()


def killed_writing_a_meta_judge_chunk(d: Path) -> None:
    parts = d / (records.META_JUDGEMENTS + ".parts")
    assert not (d / records.META_JUDGEMENTS).exists()
    assert "000000.jsonl" in names(parts) and "000001.jsonl" not in names(parts)
    assert len(temp_files(parts, "000001.jsonl")) == 1


def killed_writing_pairs(d: Path) -> None:
    assert (d / records.META_JUDGEMENTS).is_file() and not (d / records.ACTOR_PAIRS).exists()
    assert len(temp_files(d, records.ACTOR_PAIRS)) == 1


def killed_mid_training(d: Path) -> None:
    assert (d / records.ACTOR_PAIRS).is_file() and (d / records.JUDGE_PAIRS).is_file()
    assert not (d / records.MODEL).exists() and not (d / (records.MODEL + ".tmp")).exists()


def killed_saving_the_model(d: Path) -> None:
    # A half-written model: weights and config, but no tokenizer or training log; never in model/.
    half = d / (records.MODEL + ".tmp")
    assert not (d / records.MODEL).exists()
    assert (half / "config.json").is_file() and list(half.glob("*.safetensors"))
    assert not (half / TRAINING_LOG).exists() and not (half / "tokenizer.json").exists()


def killed_writing_metrics(d: Path) -> None:
    assert (d / records.MODEL / TRAINING_LOG).is_file() and not (d / records.METRICS).exists()


CHAIN = [
    ("chunk:responses.jsonl:1", killed_mid_actor),
    ("chunk:judgements.jsonl:2", killed_mid_judge),
    ("joined:judgements.jsonl", killed_after_joining),
    ("write:000001.jsonl", killed_writing_a_meta_judge_chunk),
    ("write:actor_pairs.jsonl", killed_writing_pairs),
    ("train_step:1", killed_mid_training),
    ("save_model", killed_saving_the_model),
    ("write:metrics.json", killed_writing_metrics),
]


def comparable_log(model_dir: Path) -> list[dict]:
    """TRL's log without its wall-clock numbers."""
    log = records.read_json(model_dir / TRAINING_LOG)["log_history"]
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k} for entry in log]


def test_run_killed_at_every_stage_finishes_with_the_rows_of_an_uninterrupted_run(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    whole = run_cli(runs, "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    reference = runs / "whole" / "iter_1"
    assert records.read_jsonl(reference / records.ACTOR_PAIRS), "the chain needs actor pairs"
    assert records.read_jsonl(reference / records.JUDGE_PAIRS), "the chain needs judge pairs"
    assert records.read_json(reference / records.MODEL / TRAINING_LOG)["global_steps"] >= 2

    killed = runs / "killed" / "iter_1"
    for point, check in CHAIN:
        result = run_cli(runs, "killed", kill_at=point)
        assert result.returncode == -signal.SIGKILL, f"not killed at {point}:\n{result.stderr[-3000:]}"
        check(killed)
    final = run_cli(runs, "killed")
    assert final.returncode == 0, final.stdout + final.stderr

    for name in ROW_FILES:
        assert records.read_jsonl(killed / name) == records.read_jsonl(reference / name), name
    for name, key in [(records.RESPONSES, "response_id"), (records.JUDGEMENTS, "judgement_id")]:
        ids = [row[key] for row in records.read_jsonl(killed / name)]
        assert len(ids) == len(set(ids)), f"a row of {name} was written twice"
    assert records.read_json(killed / records.METRICS)["iteration"] == 1
    # No leftovers: chunk directories, temp files and the half-written model are all gone.
    assert not list(killed.glob("*.parts")) and not list(killed.rglob("*.tmp"))
    assert not (killed / (records.MODEL + ".tmp")).exists()
    # M_1 is a whole retrained model, the same as the uninterrupted run's.
    assert comparable_log(killed / records.MODEL) == comparable_log(reference / records.MODEL)
    trained, expected = (load_file(str(d / records.MODEL / "model.safetensors")) for d in (killed, reference))
    assert trained.keys() == expected.keys()
    assert all((trained[k] == expected[k]).all() for k in expected)


# ---------------------------------------------------------------- the kill points themselves


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        ("", None),
        ("save_model", ("save_model", 1)),
        ("train_step:3", ("train_step", 3)),
        ("chunk:judgements.jsonl", ("chunk:judgements.jsonl", 1)),
        ("chunk:judgements.jsonl:2", ("chunk:judgements.jsonl", 2)),
        ("write:x:0", ("write:x", 1)),
    ],
)
def test_kill_point_spec(spec, expected):
    assert faults.parse(spec) == expected


def point_script(kill_at: str | None) -> subprocess.CompletedProcess:
    code = (
        "from metareward.store import faults\n"
        "for name in ['a', 'b', 'a', 'b', 'b']:\n"
        "    faults.point(name)\n"
        "    print('passed', name, flush=True)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != faults.ENV}
    if kill_at is not None:
        env[faults.ENV] = kill_at
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_a_point_kills_on_its_hit_and_not_before():
    result = point_script("b:2")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split("\n")[:-1] == ["passed a", "passed b", "passed a"]


def test_points_do_nothing_unless_armed():
    for kill_at in (None, "c"):
        result = point_script(kill_at)
        assert result.returncode == 0 and result.stdout.count("passed") == 5


FAULTS = [("ENOSPC", "OSError: [Errno 28]"), ("SIGINT", "KeyboardInterrupt")]


def as_from_a_terminal(umask: int | None = None):
    """A ``preexec_fn`` giving the child a process started from a terminal: Ctrl-C interrupts it. A job
    started in the background of a non-interactive shell (as CI may start the tests) inherits SIGINT
    ignored, and Python then leaves it ignored."""

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if umask is not None:
            os.umask(umask)

    return prepare


@pytest.mark.parametrize(("fault", "ends"), FAULTS)
def test_a_point_can_fill_the_disk_or_send_a_signal_instead(fault, ends):
    code = "from metareward.store import faults\nfaults.point('a')\nprint('passed', flush=True)\n"
    env = {key: value for key, value in os.environ.items() if key != faults.ENV}
    env.update({faults.ENV: "a", faults.WITH_ENV: fault})
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=as_from_a_terminal(),
    )
    assert result.returncode != 0 and "passed" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(ends), result.stderr
