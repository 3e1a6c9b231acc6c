"""Bad inputs get one clear error naming the file (and line), and leave nothing half-written."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from metareward.compute.models import resolve_model
from metareward.config import DataConfig, ModelConfig
from metareward.data import fit_prompts, load_prompts
from metareward.store import layout
from metareward.store.records import RecordError
from tests.helpers import run_cli


def run_bad_input(runs: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = ["model=tiny", "tracking=none", "eval.enabled=false", f"runs_dir={runs}", "run_name=bad"]
    return run_cli(*args, *overrides, timeout=300)


def assert_refused_cleanly(result: subprocess.CompletedProcess, run_dir: Path, *expected: str) -> None:
    """Exit code 1 or 2, one ``metareward: error:`` line holding ``expected``, no traceback, and no
    run state written (Hydra's own .hydra/ and log are not run state)."""
    assert result.returncode in (1, 2), result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("metareward: error: ")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(run_dir.glob("iter_*")), "an iteration was started"
    assert not (run_dir / layout.CONFIG).exists(), (
        "the run's config.yaml was written for a run that never ran"
    )


# (file bytes, what the message must say besides the path); {path} is the prompt file.
PROMPT_FILES = {
    "empty": (b"", ["{path}: no prompts"]),
    "blank lines only": (b"\n  \n\n", ["{path}: no prompts"]),
    "malformed line": (
        b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n',
        ["{path}:3:", "not valid JSON"],
    ),
    "not UTF-8": (b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', ["{path}:2:", "not UTF-8", "byte 31"]),
    "missing fields": (
        b'{"prompt": "a"}\n{"id": "q2", "text": "b"}\n',
        ["{path}:2:", "`messages`, `prompt`"],
    ),
    "duplicate ids": (
        b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
        ["{path}:3: duplicate prompt id 'a'", "{path}:1"],
    ),
}


@pytest.mark.parametrize("case", PROMPT_FILES)
def test_bad_prompt_file_is_refused_by_the_cli(tmp_path, case):
    content, expected = PROMPT_FILES[case]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    result = run_bad_input(tmp_path / "runs", "data=jsonl", f"data.path={path}")
    assert_refused_cleanly(result, tmp_path / "runs" / "bad", *(text.format(path=path) for text in expected))


def test_missing_model_path_is_refused_by_the_cli(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_bad_input(tmp_path / "runs", "model=hf", f"model.path={missing}")
    assert_refused_cleanly(result, tmp_path / "runs" / "bad", "model.path", str(missing))


# Every seat with a model of its own; each needs its switch on for its model to be used.
OWN_MODELS = {
    "judge.escalation.judge.model": ["judge.escalation.enabled=true"],
    "meta_judge.escalation.judge.model": ["meta_judge.escalation.enabled=true"],
    "eval.escalation.judge.model": ["eval.enabled=true", "eval.escalation.enabled=true"],
    "roles.meta_judge.model": ["roles.meta_judge.own_model=true"],
    "roles.prompter.model": ["roles.prompter.own_model=true"],
    "eval.evaluator.model": ["eval.enabled=true", "eval.evaluator.own_model=true"],
}


@pytest.mark.parametrize("key", OWN_MODELS)
def test_a_missing_model_of_any_seat_is_refused_by_its_full_key_before_any_file(tmp_path, key):
    missing = tmp_path / "no-such-model"
    runs = tmp_path / "runs"
    result = run_bad_input(runs, *OWN_MODELS[key], f"{key}.kind=hf", f"{key}.path={missing}")
    assert_refused_cleanly(result, runs / "bad", f"{key}.path='{missing}'", "no such directory")
    assert result.returncode == 2
    assert not runs.exists(), "files were written for a run that never started"


def test_a_strong_judge_behind_an_endpoint_needs_its_served_name(tmp_path):
    runs = tmp_path / "runs"
    result = run_bad_input(
        runs, "judge.escalation.enabled=true", "judge.escalation.judge.generator.backend=openai"
    )
    assert_refused_cleanly(result, runs / "bad", "judge.escalation.judge.generator.openai.model=None")
    assert result.returncode == 2 and not runs.exists()


# ---------------------------------------------------------------- messages, without the CLI


def test_non_utf8_error_gives_the_line_and_the_byte_in_the_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "b\xff"}\n')
    with pytest.raises(RecordError) as info:
        load_prompts(DataConfig(path=str(path)))
    # Lines 1 and 2 take 16 + 1 bytes; the bad byte is the 14th of line 3.
    assert f"{path}:3:" in str(info.value) and "byte 30 of the file" in str(info.value)


def test_a_byte_order_mark_is_no_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\n')
    assert [p["prompt_id"] for p in load_prompts(DataConfig(path=str(path)))] == ["a"]


def test_duplicate_id_error_names_both_lines_even_after_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('\n{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n\n{"id": "a", "prompt": "z"}\n')
    with pytest.raises(RecordError) as info:
        load_prompts(DataConfig(path=str(path)))
    assert f"{path}:5: duplicate prompt id 'a', already at {path}:2" in str(info.value)


def test_model_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.path=.*not a directory"):
        resolve_model(ModelConfig(kind="hf", path=str(path)))


# ---------------------------------------------------------------- prompts longer than the context


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def length(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt(prompt_id: str, content: str, earlier: list[dict] | None = None) -> dict:
    return {"prompt_id": prompt_id, "messages": [*(earlier or []), {"role": "user", "content": content}]}


LONG = "Explain why the sky is blue, and why sunsets are red, in plain words. " * 12


def test_prompts_that_fit_are_kept_as_they_are(tokenizer):
    prompts = [prompt("a", "Hi"), prompt("b", "What is 2 + 2?")]
    budget = max(length(tokenizer, p["messages"]) for p in prompts)
    for mode in ("skip", "truncate"):
        kept, counts = fit_prompts(prompts, tokenizer, budget, mode)
        assert kept == prompts and all(k is p for k, p in zip(kept, prompts, strict=True))
        assert counts == {"kept": 2, "skipped_too_long": 0, "truncated": 0}


def test_skip_leaves_out_exactly_the_prompts_over_the_budget(tokenizer):
    short, long = prompt("s", "Hi"), prompt("l", LONG)
    size = length(tokenizer, long["messages"])
    kept, counts = fit_prompts([long, short], tokenizer, size - 1, "skip")
    assert kept == [short] and counts == {"kept": 1, "skipped_too_long": 1, "truncated": 0}
    kept, _ = fit_prompts([long, short], tokenizer, size, "skip")
    assert kept == [long, short]


def test_truncate_keeps_the_start_of_the_last_user_message_within_the_budget(tokenizer):
    earlier = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    long = {**prompt("l", LONG, earlier), "source": "kept too"}
    budget = length(tokenizer, long["messages"]) // 2
    kept, counts = fit_prompts([long], tokenizer, budget, "truncate")
    assert counts == {"kept": 1, "skipped_too_long": 0, "truncated": 1}
    (cut,) = kept
    assert cut["prompt_id"] == "l" and cut["source"] == "kept too"
    assert cut["messages"][:-1] == earlier and cut["messages"][-1]["role"] == "user"
    content = cut["messages"][-1]["content"]
    assert LONG.startswith(content) and 0 < len(content) < len(LONG)
    # Within the budget, and as long as it could be: a few tokens more would not fit.
    assert budget - 4 <= length(tokenizer, cut["messages"]) <= budget
    assert long["messages"][-1]["content"] == LONG, "the input row is not changed"


def test_truncate_skips_a_prompt_whose_earlier_turns_alone_are_too_long(tokenizer):
    earlier = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Sure."}]
    long = prompt("l", "And now in one sentence?", earlier)
    kept, counts = fit_prompts([long], tokenizer, length(tokenizer, earlier[:1]), "truncate")
    assert kept == [] and counts == {"kept": 0, "skipped_too_long": 1, "truncated": 0}


def test_unknown_mode_is_refused(tokenizer):
    with pytest.raises(ValueError, match="mode"):
        fit_prompts([prompt("a", "Hi")], tokenizer, 64, "drop")


def test_generator_vllm_without_vllm_is_refused_in_one_line_naming_the_extras(tmp_path):
    # The main environment has no vLLM (the engine tier has an environment of its own).
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    runs = tmp_path / "runs"
    result = run_bad_input(runs, "generator=vllm")
    assert_refused_cleanly(result, runs / "bad", "generator.backend='vllm'", "metareward[vllm-cpu]")
    assert result.returncode == 2 and not runs.exists()
