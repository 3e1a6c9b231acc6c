"""Behaviour tests for metareward.models: the embedded SmolLM2 conversion, model=hf paths, the tiny
model, and the crash-safe cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import metareward.models
from metareward.config import ConfigError, ModelConfig
from metareward.models import SMOLLM2_DIR, TINY_DIR, resolve_model

# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_converts_once_and_answers(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAREWARD_CACHE", str(cache))

    model_dir = Path(resolve_model(ModelConfig()))
    assert model_dir == cache / SMOLLM2_DIR
    assert (model_dir / "model.safetensors").is_file()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    # The conversion was renamed into place: no temporary directory is left beside it.
    assert sorted(p.name for p in cache.iterdir()) == [SMOLLM2_DIR]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer
    # Dequantised correctly, the 135M model knows this one (random weights would not).
    assert "Paris" in answer

    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(out_dir):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(metareward.models, "_convert_smollm2", must_not_convert)
    assert Path(resolve_model(ModelConfig())) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- model=hf


def test_hf_dir_without_config_json_is_refused(tmp_path: Path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        resolve_model(ModelConfig(kind="hf", path=str(empty)))


@pytest.mark.parametrize("path", ["/nonexistent/x", "./no-such-model", "~/no-such-model-dir", "a/b/c"])
def test_hf_missing_local_path_is_refused(path: str):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(ModelConfig(kind="hf", path=path))
    assert path in str(info.value)


def test_hf_local_model_dir_is_used_as_it_is(tiny_model_dir):
    assert resolve_model(ModelConfig(kind="hf", path=tiny_model_dir)) == tiny_model_dir


def test_hf_hub_id_is_passed_through():
    assert resolve_model(ModelConfig(kind="hf", path="HuggingFaceTB/SmolLM2-135M-Instruct")) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_model_config_defaults_and_checks():
    config = ModelConfig()
    assert config.kind == "smollm2_135m"
    assert config.trust_remote_code is False
    assert ModelConfig(kind="hf", path="x/y").trust_remote_code is False
    with pytest.raises(ConfigError, match="model.path"):
        ModelConfig(kind="hf")
    with pytest.raises(ConfigError, match="model.dtype"):
        ModelConfig(dtype="int3")


# ---------------------------------------------------------------- the tiny model


def test_tiny_model_loads_and_has_a_chat_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "hello" in rendered
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id is not None
    assert Path(tiny_model_dir).name == TINY_DIR
    assert resolve_model(ModelConfig(kind="tiny")) == tiny_model_dir


def test_tiny_model_can_end_its_turn(tiny_model_dir):
    """Random weights would give end-of-turn ~1/vocab; the tiny model ends turns at a few percent of steps."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(100, 40000, (32, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        p_eos = torch.softmax(model(input_ids=ids).logits, dim=-1)[..., tokenizer.eos_token_id]
    assert 0.005 < float(p_eos.mean()) < 0.5


# ---------------------------------------------------------------- the cache


def test_cache_builds_once_and_replaces_a_leftover(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAREWARD_CACHE", str(cache))
    leftover = cache / TINY_DIR
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_text("half-written")
    builds = []

    def fake_build(out_dir: Path) -> None:
        builds.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(metareward.models, "build_tiny_model", fake_build)
    first = resolve_model(ModelConfig(kind="tiny"))
    second = resolve_model(ModelConfig(kind="tiny"))
    assert first == second == str(leftover)
    assert len(builds) == 1
    assert builds[0] != leftover  # built elsewhere, then renamed into place
    assert sorted(p.name for p in leftover.iterdir()) == ["config.json"]
    assert sorted(p.name for p in cache.iterdir()) == [TINY_DIR]


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAREWARD_CACHE", str(cache))

    def failing_build(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(metareward.models, "build_tiny_model", failing_build)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(ModelConfig(kind="tiny"))
    assert not (cache / TINY_DIR).exists()
    assert list(cache.iterdir()) == []
