"""DPO training on the tiny random Llama: weights move, and out_dir is a plain, loadable model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metareward.config import DPOSettings
from metareward.models import build_tiny_model
from metareward.training import autocasts_bf16, train_dpo


def _settings(**overrides) -> DPOSettings:
    # A high learning rate so that two optimiser steps visibly move a random model.
    return DPOSettings(**{"learning_rate": 1e-3, "batch_size": 2, "max_length": 128, **overrides})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("m0")
    build_tiny_model(path)
    return str(path)


def _pairs(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
            "rejected": [{"role": "assistant", "content": "No idea, maybe a banana?"}],
        }
        for i in range(n)
    ]


def _state(model_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


def _assert_trained_plain_model(model_dir: str, out_dir: Path) -> None:
    before, after = _state(model_dir), _state(out_dir)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)
    assert not (out_dir / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((out_dir / "config.json").read_text())
    assert (out_dir / "model.safetensors").is_file()
    assert (out_dir / "tokenizer.json").is_file()
    original, saved = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(str(out_dir))
    assert saved.chat_template and saved.chat_template == original.chat_template
    assert not out_dir.with_name(out_dir.name + ".tmp").exists()


def test_full_dpo_moves_weights_and_logs_rewards(tiny_model, tmp_path):
    out_dir = tmp_path / "m1"
    result = train_dpo(tiny_model, _pairs(), _settings(), out_dir, seed=0)
    _assert_trained_plain_model(tiny_model, out_dir)
    json.dumps(result)
    assert result["train_pairs"] == 4
    assert result["global_steps"] == 2
    steps = [entry for entry in result["log_history"] if "loss" in entry]
    assert len(steps) == 2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in entry for entry in steps), key
    # The first step runs the policy before any update, so it equals its reference exactly.
    assert steps[0]["rewards/margins"] == 0.0
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[-1]["rewards/margins"] > 0
    # Each optimiser step's wall time, and the precision it computed in.
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    assert result["computes_in"] == ("bfloat16" if autocasts_bf16(_settings()) else "float32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_setting_decides_the_compute_dtype(tiny_model, tmp_path, precision):
    settings = _settings(precision=precision)
    assert autocasts_bf16(settings) == (precision == "bf16")
    result = train_dpo(tiny_model, _pairs(2), settings, tmp_path / "m1", seed=0)
    assert result["computes_in"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    # Master weights stay fp32 whatever the compute dtype: small updates must not round away.
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m1"))
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    steps = [entry for entry in result["log_history"] if "loss" in entry]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_lora_dpo_saves_merged_model(tiny_model, tmp_path):
    out_dir = tmp_path / "m1"
    result = train_dpo(tiny_model, _pairs(), _settings(use_lora=True), out_dir, seed=0)
    _assert_trained_plain_model(tiny_model, out_dir)
    assert result["global_steps"] == 2


def test_empty_rows_raise(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="rows is empty"):
        train_dpo(tiny_model, [], _settings(), tmp_path / "m1", seed=0)
    assert not (tmp_path / "m1").exists()


def test_provenance_columns_are_dropped(tiny_model, tmp_path):
    rows = _pairs()
    for i, row in enumerate(rows):
        # Mixed types across rows, as provenance may have, would not even fit one Arrow column.
        row.update(prompt_id=f"p{i}", chosen_score=4.5 if i % 2 else "n/a", rejected_score=None, elo=[1.0])
    out_dir = tmp_path / "m1"
    result = train_dpo(tiny_model, rows, _settings(batch_size=4), out_dir, seed=0)
    assert result["global_steps"] == 1
    assert (out_dir / "model.safetensors").is_file()


def test_stale_tmp_and_existing_out_dir_are_replaced(tiny_model, tmp_path):
    out_dir = tmp_path / "m1"
    stale = tmp_path / "m1.tmp"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("from an earlier run")
    train_dpo(tiny_model, _pairs(), _settings(batch_size=4), out_dir, seed=0)
    assert not stale.exists()
    assert not (out_dir / "old.txt").exists()
    AutoModelForCausalLM.from_pretrained(str(out_dir))


def test_accelerate_launch_trains_in_a_separate_process(tiny_model, tmp_path):
    """train.launcher=accelerate: a real `accelerate launch` (one CPU process) runs the DPO step."""
    from metareward.training import launch_dpo

    config = Path(__file__).parents[1] / "metareward" / "conf" / "accelerate" / "single_process.yaml"
    out_dir = tmp_path / "m1"
    result = launch_dpo(
        tiny_model,
        _pairs(),
        _settings(),
        out_dir,
        seed=0,
        job_dir=tmp_path / "job",
        accelerate_config=str(config),
    )
    _assert_trained_plain_model(tiny_model, out_dir)
    assert result["global_steps"] == 2
    assert result["train_pairs"] == 4
    # The job the launched process read: the pairs and settings, written whole.
    assert len((tmp_path / "job" / "pairs.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "job" / "launch.log").is_file()


def test_accelerate_launch_failure_names_the_log(tiny_model, tmp_path):
    from metareward.training import launch_dpo

    config = Path(__file__).parents[1] / "metareward" / "conf" / "accelerate" / "single_process.yaml"
    with pytest.raises(RuntimeError, match="launch.log"):
        launch_dpo(
            str(tmp_path / "no_such_model"),
            _pairs(),
            _settings(),
            tmp_path / "m1",
            seed=0,
            job_dir=tmp_path / "job",
            accelerate_config=str(config),
        )
    assert not (tmp_path / "m1").exists()
