"""Kill anywhere, lose nothing: a tiny run SIGKILLed at a point in every stage and started again each
time finishes with exactly the rows (and the model) of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metareward.store import faults, layout, records
from metareward.training import TRAINING_LOG
from tests.helpers import ROW_FILES, as_from_a_terminal, chain_args, cli_env, run_cli

# Whole runs of the loop (make test-fast leaves them out).
pytestmark = pytest.mark.slow


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def temp_files(directory: Path, target: str) -> list[Path]:
    return list(directory.glob(f".{target}.*.tmp"))


# What must be on disk right after each kill; the chain goes through them in this order.
def killed_mid_actor(d: Path) -> None:
    assert not (d / layout.RESPONSES).exists()
    assert names(d / (layout.RESPONSES + ".parts")) == {"000000.jsonl"}


def killed_mid_judge(d: Path) -> None:
    assert (d / layout.RESPONSES).is_file() and not (d / layout.JUDGEMENTS).exists()
    assert names(d / (layout.JUDGEMENTS + ".parts")) == {"000000.jsonl", "000001.jsonl"}


def killed_after_joining(d: Path) -> None:
    assert (d / layout.JUDGEMENTS).is_file() and (d / (layout.JUDGEMENTS + ".parts")).is_dir()


def killed_writing_a_meta_judge_chunk(d: Path) -> None:
    parts = d / (layout.META_JUDGEMENTS + ".parts")
    assert not (d / layout.META_JUDGEMENTS).exists()
    assert "000000.jsonl" in names(parts) and "000001.jsonl" not in names(parts)
    assert len(temp_files(parts, "000001.jsonl")) == 1


def killed_writing_pairs(d: Path) -> None:
    assert (d / layout.META_JUDGEMENTS).is_file() and not (d / layout.ACTOR_PAIRS).exists()
    assert len(temp_files(d, layout.ACTOR_PAIRS)) == 1


def killed_mid_training(d: Path) -> None:
    assert (d / layout.ACTOR_PAIRS).is_file() and (d / layout.JUDGE_PAIRS).is_file()
    assert not (d / layout.MODEL).exists() and not (d / (layout.MODEL + ".tmp")).exists()


def killed_saving_the_model(d: Path) -> None:
    # A half-written model: weights and config, but no tokenizer or training log; never in model/.
    half = d / (layout.MODEL + ".tmp")
    assert not (d / layout.MODEL).exists()
    assert (half / "config.json").is_file() and list(half.glob("*.safetensors"))
    assert not (half / TRAINING_LOG).exists() and not (half / "tokenizer.json").exists()


def killed_writing_metrics(d: Path) -> None:
    assert (d / layout.MODEL / TRAINING_LOG).is_file() and not (d / layout.METRICS).exists()


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
    whole = run_cli(*chain_args(runs, "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    reference = runs / "whole" / "iter_1"
    assert records.read_jsonl(reference / layout.ACTOR_PAIRS), "the chain needs actor pairs"
    assert records.read_jsonl(reference / layout.JUDGE_PAIRS), "the chain needs judge pairs"
    assert records.read_json(reference / layout.MODEL / TRAINING_LOG)["global_steps"] >= 2

    killed = runs / "killed" / "iter_1"
    for point, check in CHAIN:
        result = run_cli(*chain_args(runs, "killed"), kill_at=point)
        assert result.returncode == -signal.SIGKILL, f"not killed at {point}:\n{result.stderr[-3000:]}"
        check(killed)
    final = run_cli(*chain_args(runs, "killed"))
    assert final.returncode == 0, final.stdout + final.stderr

    for name in ROW_FILES:
        assert records.read_jsonl(killed / name) == records.read_jsonl(reference / name), name
    for name, key in [(layout.RESPONSES, "response_id"), (layout.JUDGEMENTS, "judgement_id")]:
        ids = [row[key] for row in records.read_jsonl(killed / name)]
        assert len(ids) == len(set(ids)), f"a row of {name} was written twice"
    assert records.read_json(killed / layout.METRICS)["iteration"] == 1
    # No leftovers: chunk directories, temp files and the half-written model are all gone.
    assert not list(killed.glob("*.parts")) and not list(killed.rglob("*.tmp"))
    assert not (killed / (layout.MODEL + ".tmp")).exists()
    # M_1 is a whole retrained model, the same as the uninterrupted run's.
    assert comparable_log(killed / layout.MODEL) == comparable_log(reference / layout.MODEL)
    trained, expected = (load_file(str(d / layout.MODEL / "model.safetensors")) for d in (killed, reference))
    assert trained.keys() == expected.keys()
    assert all((trained[k] == expected[k]).all() for k in expected)


# ---------------------------------------------------------------- stage files edited after a kill


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _edit_score(path: Path) -> None:
    rows = records.read_jsonl(path)
    rows[0]["score"] = 5.0 if rows[0]["score"] != 5.0 else 0.0
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# (file, edit, the line the refusal names, what it says there)
STAGE_EDITS = {
    "prompt row duplicated": (
        layout.PROMPTS,
        lambda p: p.write_text(p.read_text() + _lines(p)[0]),
        3,
        "a row more than the 2",
    ),
    "judgement row deleted": (
        layout.JUDGEMENTS,
        lambda p: p.write_text("".join(_lines(p)[:1] + _lines(p)[2:])),
        2,
        "not the row",
    ),
    "verdict row duplicated": (
        layout.META_JUDGEMENTS,
        lambda p: p.write_text("".join(_lines(p)[:1] * 2 + _lines(p)[1:])),
        2,
        "not the row",
    ),
    "verdicts emptied": (
        layout.META_JUDGEMENTS,
        lambda p: p.write_text(""),
        1,
        "rows its stage wrote are missing",
    ),
    "score edited": (layout.JUDGEMENTS, _edit_score, 1, "not the row"),
}


def test_stage_files_edited_after_a_kill_are_named_by_file_and_line_and_never_used(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    killed = run_cli(*chain_args(runs, "edited"), kill_at=f"write:{layout.ACTOR_PAIRS}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    iteration = runs / "edited" / "iter_1"
    for case, (name, edit, line, says) in STAGE_EDITS.items():
        original = (iteration / name).read_bytes()
        edit(iteration / name)
        result = run_cli(*chain_args(runs, "edited"))
        (iteration / name).write_bytes(original)
        assert result.returncode == 1, f"{case}: {result.stderr[-2000:]}"
        [error] = [row for row in result.stderr.splitlines() if row.startswith("metareward: error: ")]
        assert f"{iteration / name}:{line}: " in error and says in error, case
        assert "Traceback" not in result.stderr
        assert not (iteration / layout.ACTOR_PAIRS).exists(), f"{case}: pairs were built from it"
    done = run_cli(*chain_args(runs, "edited"))
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_escalation_file_cut_in_half_is_refused_with_its_line(tmp_path):
    local = tmp_path / "judgements_local.jsonl"
    rows = [{"response_id": f"p0/r{k}", "judgement_id": f"p0/r{k}/j0", "score": 3.0} for k in range(4)]
    records.write_stage_file(local, rows)
    assert records.read_stage_file(local) == rows
    local.write_text("".join(_lines(local)[:2]))
    with pytest.raises(records.RecordError, match=rf"{re.escape(str(local))}:3: 2 of the 4 rows"):
        records.read_stage_file(local)
    with pytest.raises(records.RecordError, match="judgements_local.jsonl:3"):
        records.check_stage_files(tmp_path)


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
    return subprocess.run(
        [sys.executable, "-c", code], env=cli_env(kill_at), capture_output=True, text=True, timeout=60
    )


def test_a_point_kills_on_its_hit_and_not_before():
    result = point_script("b:2")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split("\n")[:-1] == ["passed a", "passed b", "passed a"]


def test_points_do_nothing_unless_armed():
    for kill_at in (None, "c"):
        result = point_script(kill_at)
        assert result.returncode == 0 and result.stdout.count("passed") == 5


FAULTS = [("ENOSPC", "OSError: [Errno 28]"), ("SIGINT", "KeyboardInterrupt")]


@pytest.mark.parametrize(("fault", "ends"), FAULTS)
def test_a_point_can_fill_the_disk_or_send_a_signal_instead(fault, ends):
    code = "from metareward.store import faults\nfaults.point('a')\nprint('passed', flush=True)\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env("a", fault),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=as_from_a_terminal(),
    )
    assert result.returncode != 0 and "passed" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(ends), result.stderr


def test_stage_files_written_before_checksums_are_adopted_when_the_first_is_recorded(tmp_path):
    prompts = [{"prompt_id": "p0", "messages": [{"role": "user", "content": "Hi?"}]}]
    records.write_jsonl(tmp_path / layout.PROMPTS, prompts)  # as an older metareward wrote it
    responses = [{"prompt_id": "p0", "response_id": "p0/r0", "text": "Hello."}]
    records.write_stage_file(tmp_path / layout.RESPONSES, responses)
    assert records.read_stage_file(tmp_path / layout.PROMPTS) == prompts
    (tmp_path / layout.PROMPTS).write_text("")  # edited after: found
    with pytest.raises(records.RecordError, match="prompts.jsonl:1: 1 of the 1 rows"):
        records.read_stage_file(tmp_path / layout.PROMPTS)
