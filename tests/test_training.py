"""DPO training on the tiny random Llama: weights move, out_dir is a plain, loadable model, each step's
log row reaches ``on_log``, and TRL's completion-only scoring on CPU stays inside our trainer."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import metareward.training as training
from metareward.compute.models import build_tiny_model
from metareward.config import ACCELERATE_CONFIGS, DPOSettings
from metareward.store.layout import TRAINING_LOG
from metareward.training import autocasts_bf16, step_rows, train_dpo


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


def test_on_log_gets_each_optimiser_step_as_it_is_logged(tiny_model, tmp_path):
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    rows, compact_on_cpu = [], []

    def on_log(row):
        rows.append(row)
        compact_on_cpu.append(trl_utils._use_triton(torch.device("cpu")))

    out_dir = tmp_path / "m1"
    result = train_dpo(tiny_model, _pairs(6), _settings(), out_dir, seed=0, on_log=on_log)
    assert result["global_steps"] == 3
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        for key in ("loss", "rewards/margins", "rewards/chosen", "learning_rate", "epoch", "step_seconds"):
            assert isinstance(row[key], float), key
        assert "train_runtime" not in row  # the end-of-training summary is not a step
    assert [row["step_seconds"] for row in rows] == result["step_seconds"]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and rows[-1]["rewards/margins"] > 0
    # The same rows, from the log saved with the model (which the accelerate launcher returns).
    saved = json.loads((out_dir / TRAINING_LOG).read_text())
    assert saved == json.loads(json.dumps(result))
    assert step_rows(saved) == rows
    assert [e["step"] for e in saved["log_history"] if "loss" in e] == [1, 2, 3]
    assert "train_runtime" in saved["log_history"][-1]
    # TRL scored completions only on CPU while our trainer ran, and nowhere else afterwards.
    assert compact_on_cpu == [True, True, True]
    assert trl_utils._use_triton is original
    assert original(torch.device("cpu")) is False


def test_trl_switch_is_restored_when_training_fails(tiny_model, tmp_path):
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton

    def on_log(row):
        raise RuntimeError("tracker down")

    with pytest.raises(RuntimeError, match="tracker down"):
        train_dpo(tiny_model, _pairs(2), _settings(), tmp_path / "m1", seed=0, on_log=on_log)
    assert trl_utils._use_triton is original
    assert not (tmp_path / "m1").exists()


def test_completion_only_scoring_on_cpu_gives_the_same_losses(tiny_model, tmp_path, monkeypatch):
    """Scoring only completion positions (fewer rows through the LM head) changes no number."""
    import trl.trainer.utils as trl_utils

    chunked = trl_utils._ChunkedLogProbFunction
    scored_rows: list[int] = []

    class CountingRows:
        @staticmethod
        def apply(hidden, *args):
            scored_rows.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingRows)
    settings = _settings(precision="fp32")

    def run(name: str) -> tuple[list[dict], int]:
        scored_rows.clear()
        result = train_dpo(tiny_model, _pairs(), settings, tmp_path / name, seed=0)
        return [e for e in result["log_history"] if "loss" in e], sum(scored_rows)

    compact, compact_rows = run("compact")
    monkeypatch.setattr(training, "_completions_only_on_cpu", contextlib.nullcontext)
    every, every_rows = run("every")
    assert 0 < compact_rows < every_rows
    assert len(compact) == len(every) == 2
    for ours, theirs in zip(compact, every, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert _state(tmp_path / "compact").keys() == _state(tmp_path / "every").keys()
    for key, value in _state(tmp_path / "compact").items():
        torch.testing.assert_close(value, _state(tmp_path / "every")[key], rtol=1e-4, atol=1e-6)


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


@pytest.mark.slow
def test_accelerate_launch_trains_in_a_separate_process(tiny_model, tmp_path):
    """train.launcher=accelerate: a real `accelerate launch` (one CPU process) runs the DPO step."""
    from metareward.training import launch_dpo

    config = ACCELERATE_CONFIGS / "single_process.yaml"
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


@pytest.mark.slow
def test_accelerate_launch_failure_names_the_log(tiny_model, tmp_path):
    from metareward.training import launch_dpo

    config = ACCELERATE_CONFIGS / "single_process.yaml"
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


def _deepspeed_config(tmp_path: Path, processes: int) -> Path:
    """The shipped ZeRO-3 accelerate config (bf16), with ``processes`` training processes."""
    import yaml

    config = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero3.yaml").read_text())
    config["num_processes"] = processes
    path = tmp_path / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _safetensors(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("processes", "precision", "use_lora"),
    [(2, "bf16", False), (2, "bf16", True), (3, "bf16", False), (2, "fp32", False)],
    ids=["full", "lora", "three-processes", "fp32"],
)
def test_deepspeed_zero3_saves_m_t_in_fp32_with_every_small_update_kept(
    tiny_model, tmp_path, processes, precision, use_lora
):
    """The shipped ZeRO-3 config (bf16 mixed precision) on CPU processes, at DPO's own learning rate: M_t
    is written in fp32 and every weight moved by at most what two Adam steps can move it. A bf16 copy of
    M_t, or a master started from M_{t-1} rounded to bf16, would move weights by bf16's rounding (about
    1e-4 here) and leave most of them where bf16 puts them. Three processes split some of the tiny
    model's weights unevenly (the last partition padded); train.dpo.precision=fp32 overrides the
    config's bf16."""
    pytest.importorskip("deepspeed")
    from metareward.training import launch_dpo

    lr = 5e-7
    out_dir = tmp_path / "m1"
    result = launch_dpo(
        tiny_model,
        _pairs(4 * processes),
        _settings(learning_rate=lr, precision=precision, use_lora=use_lora, lora_r=4),
        out_dir,
        seed=0,
        job_dir=tmp_path / "job",
        accelerate_config=str(_deepspeed_config(tmp_path, processes)),
    )
    assert result["processes"] == processes and result["global_steps"] == 2
    assert result["computes_in"] == ("bfloat16" if precision == "bf16" else "float32")
    before, after = _safetensors(tiny_model), _safetensors(out_dir)
    assert before.keys() == after.keys()
    assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    changed /= sum(tensor.numel() for tensor in before.values())
    # Adam moves a weight by at most about the learning rate a step.
    assert 0 < moved <= 3 * lr * result["global_steps"]
    # Full fine-tuning moves every weight; merged LoRA adapters (B starts at zero) move the adapted ones.
    assert changed > (0.9 if not use_lora else 0.05)
    _assert_trained_plain_model(tiny_model, out_dir)


# ---------------------------------------------------------------- DPO's own options


def test_each_dpo_option_reaches_dpoconfig(tmp_path):
    settings = _settings(
        loss_type="ipo", label_smoothing=0.1, rpo_alpha=0.5, weight_decay=0.01, max_grad_norm=0.5, beta=0.2
    )
    config = training._dpo_config(settings, tmp_path, seed=0, report_to="none", trust_remote_code=False)
    assert (config.loss_type, config.loss_weights) == (["ipo", "sft"], [1.0, 0.5])  # RPO: + alpha x NLL
    assert (config.label_smoothing, config.weight_decay, config.max_grad_norm, config.beta) == (
        0.1,
        0.01,
        0.5,
        0.2,
    )
    plain = training._dpo_config(_settings(), tmp_path, seed=0, report_to="none", trust_remote_code=False)
    assert (plain.loss_type, plain.loss_weights, plain.max_grad_norm) == (["sigmoid"], None, 1.0)


@pytest.mark.parametrize(
    ("options", "first_loss"),
    [
        # At the first step the policy is its reference: every log-ratio difference is 0.
        ({"loss_type": "ipo", "beta": 0.1}, (1 / (2 * 0.1)) ** 2),  # (0 - 1/(2 beta))^2
        ({"loss_type": "hinge"}, 1.0),  # relu(1 - beta * 0)
        ({"loss_type": "robust", "label_smoothing": 0.2}, 0.6931),  # ((1-e) ln 2 - e ln 2) / (1 - 2e)
    ],
)
def test_the_loss_type_is_the_loss_trained(tiny_model, tmp_path, options, first_loss):
    result = train_dpo(tiny_model, _pairs(2), _settings(**options), tmp_path / "m1", seed=0)
    steps = [entry for entry in result["log_history"] if "loss" in entry]
    assert steps[0]["loss"] == pytest.approx(first_loss, rel=1e-3)


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("train.dpo.loss_type=nope", "train.dpo.loss_type='nope'"),
        ("train.dpo.label_smoothing=0.5", "train.dpo.label_smoothing=0.5"),
        ("train.dpo.max_grad_norm=-1", "train.dpo.max_grad_norm=-1"),
        ("train.dpo.no_such_option=1", "train.dpo.no_such_option"),
    ],
)
def test_a_bad_dpo_option_is_refused_by_its_full_key(override, refused):
    from metareward.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(refused)):
        load_config(None, [override])
    with pytest.raises(ConfigError, match=r"train\.dpo\.rpo_alpha=0\.5: adds the sft term"):
        load_config(None, ["train.dpo.loss_type=sft", "train.dpo.rpo_alpha=0.5"])
