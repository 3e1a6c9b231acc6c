"""Which engine serves which architecture, and that each is right for what it serves.

Tiny random models, built here in code (two layers, 64 wide, the tiny model's code-built tokenizer):
Llama (also with attention and MLP biases), Qwen2 (random q/k/v biases), Mistral without and with a
sliding window shorter than the test sequences, Qwen2 with sliding layers, and two architectures the
fast engine does not implement (GPT-2, Gemma). For each: the engine chosen, greedy completions equal to
``model.generate``'s token for token, and next-token probabilities equal to a plain forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from metareward.compute.models import build_tiny_tokenizer
from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation import SamplingParams, hf
from metareward.generation.tokens import encode, next_token_query
from metareward.judging.prompts import SCORE_CUE, SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS

WINDOW = 16
REQUESTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon, a knight and a very old castle."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0)
SAMPLED = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
}
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# name: (config class, its settings, the engine that must serve it)
ARCHITECTURES = {
    "llama": (LlamaConfig, dict(LAYERS), "fast"),
    "llama-biases": (LlamaConfig, dict(LAYERS, attention_bias=True, mlp_bias=True), "fast"),
    # Scaled RoPE with fixed frequencies (and, for YaRN, a cos/sin scale): the model's rotary embedding.
    "llama-llama3-rope": (LlamaConfig, dict(LAYERS, rope_parameters=dict(LLAMA3_ROPE)), "fast"),
    "llama-yarn-rope": (LlamaConfig, dict(LAYERS, rope_parameters=dict(YARN_ROPE)), "fast"),
    "qwen2": (Qwen2Config, dict(LAYERS), "fast"),
    "mistral": (MistralConfig, dict(LAYERS, sliding_window=None), "fast"),
    "mistral-window": (MistralConfig, dict(LAYERS, sliding_window=WINDOW), "transformers"),
    "qwen2-window": (
        Qwen2Config,
        dict(LAYERS, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "transformers",
    ),
    "gpt2": (GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), "transformers"),
    "gemma": (GemmaConfig, dict(LAYERS, head_dim=16), "transformers"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def build(directory: Path, tokenizer, name: str) -> Path:
    """A random model of architecture ``name`` with the tiny tokenizer, saved in ``directory``."""
    config_class, settings, _ = ARCHITECTURES[name]
    sizes = {} if config_class is GPT2Config else {"hidden_size": 64, "intermediate_size": 128}
    config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
        **settings,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases are initialised to zero: make them count
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def served(request, tokenizer, tmp_path_factory):
    """(architecture name, its generator, the same weights loaded the plain way)."""
    directory = build(tmp_path_factory.mktemp(request.param), tokenizer, request.param)
    gen = hf.HFGenerator(
        str(directory),
        ModelConfig(kind="hf", path=str(directory), dtype="float32"),
        GeneratorConfig(batch_size=4, device="cpu", progress=False),
    )
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    reference.eval()
    yield request.param, gen, reference
    gen.close()


@torch.inference_mode()
def plain_probs(model, ids: list[int]) -> torch.Tensor:
    return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_the_engine_serving_each_architecture(served):
    name, gen, _ = served
    assert gen.engine == ARCHITECTURES[name][2], gen.engine_reason
    assert gen.engine_reason
    if name.endswith("-window"):
        assert f"sliding-window attention ({WINDOW} tokens" in gen.engine_reason
    if name in ("gpt2", "gemma"):
        assert repr(gen.model.config.model_type) in gen.engine_reason


def test_the_test_sequences_are_longer_than_the_window(served):
    name, gen, _ = served
    shortest = min(len(encode(gen.tokenizer, gen.render(r))) for r in REQUESTS)
    assert shortest > WINDOW


def test_greedy_completions_equal_model_generate(served):
    """Batched, padded and (on the fast engine) on shared-prefix caches, each greedy completion is
    ``model.generate``'s for that prompt alone."""
    _, gen, reference = served
    out = gen.generate(REQUESTS, GREEDY)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY.max_new_tokens,
        eos_token_id=gen.stop_ids,
        pad_token_id=gen.tokenizer.pad_token_id,
    )
    for request, (completion,) in zip(REQUESTS, out, strict=True):
        prompt = encode(gen.tokenizer, gen.render(request))
        with torch.inference_mode():
            tokens = reference.generate(input_ids=torch.tensor([prompt]), generation_config=config)
        tokens = tokens[0, len(prompt) :].tolist()
        stop = next((k for k, t in enumerate(tokens) if t in gen.stop_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        assert completion.text == gen.tokenizer.decode(kept, skip_special_tokens=True)
        assert completion.num_tokens == len(kept)
        assert completion.finish_reason == ("length" if stop is None else "stop")


def test_next_token_probs_equal_a_plain_forward_pass(served):
    _, gen, reference = served
    judged = gen.generate(REQUESTS, SAMPLED)  # the fast engine then scores on its kept caches
    score_texts = [
        gen.render(request) + c.text + "\n" + SCORE_CUE
        for request, completions in zip(REQUESTS, judged, strict=True)
        for c in completions
    ] + [SCORE_CUE, "A longer judgement text that needs left padding in the batch.\n" + SCORE_CUE]
    winner_texts = [gen.render(REQUESTS[1]) + "Both are fine; the first is more careful.\n" + WINNER_CUE]
    for texts, candidates in ((score_texts, SCORE_TOKENS), (winner_texts, WINNER_TOKENS)):
        probs = gen.next_token_probs(texts, candidates)
        for text, row in zip(texts, probs, strict=True):
            (context, _), *_ = queries = [next_token_query(gen.tokenizer, text, c) for c in candidates]
            expected = plain_probs(reference, context)
            assert row == pytest.approx([float(expected[token]) for _, token in queries], rel=1e-4, abs=1e-9)


def test_the_fast_engine_would_be_wrong_under_a_sliding_window(tokenizer, tmp_path, monkeypatch):
    """Why a window sends Mistral to transformers: forced onto the fast engine (full attention), its
    probabilities past the window are not the model's."""
    directory = build(tmp_path, tokenizer, "mistral-window")
    monkeypatch.setattr(hf, "choose_engine", lambda model: ("fast", "forced"))
    gen = hf.HFGenerator(
        str(directory),
        ModelConfig(kind="hf", path=str(directory), dtype="float32"),
        GeneratorConfig(device="cpu", progress=False),
    )
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    text = gen.render(REQUESTS[1]) + SCORE_CUE
    (row,) = gen.next_token_probs([text], SCORE_TOKENS)
    queries = [next_token_query(gen.tokenizer, text, c) for c in SCORE_TOKENS]
    expected = plain_probs(reference, queries[0][0])
    assert row != pytest.approx([float(expected[token]) for _, token in queries], rel=1e-3)
    gen.close()


@pytest.mark.parametrize("name", ["gpt2", "mistral-window"])
def test_on_the_transformers_path_a_sample_does_not_depend_on_its_batch(
    name, tokenizer, tmp_path, monkeypatch
):
    directory = build(tmp_path, tokenizer, name)
    gen = hf.HFGenerator(
        str(directory),
        ModelConfig(kind="hf", path=str(directory), dtype="float32"),
        GeneratorConfig(batch_size=8, device="cpu", progress=False),
    )
    assert gen.engine == "transformers"
    rows_per_call = []
    plain = gen._generate_plain

    def counting(prompts, params):
        rows_per_call.append(len(prompts) * params.n)
        return plain(prompts, params)

    monkeypatch.setattr(gen, "_generate_plain", counting)
    (alone,) = gen.generate([REQUESTS[0]], SAMPLED)
    gen.memo = {}  # recompute, not recall
    together = gen.generate([REQUESTS[1], REQUESTS[0], REQUESTS[2]], SAMPLED)
    assert rows_per_call == [2, 6]  # alone, then in one batch with the others
    assert together[1] == alone
    assert alone[0] != alone[1]  # two draws, not one copied
    # Another seed, other samples; the same seed again, from memory, the same.
    assert gen.generate([REQUESTS[0]], SamplingParams(**{**SAMPLED.__dict__, "seed": 4}))[0] != alone
    before = gen.usage.copy()
    assert gen.generate([REQUESTS[0]], SAMPLED) == [alone]
    spent = gen.usage.since(before)
    assert spent["cached_samples"] == spent["samples"] == 2 and spent["generated_tokens"] == 0
    gen.close()


def test_a_forward_without_position_ids_scores_each_context_alone(tokenizer, tmp_path, monkeypatch):
    """Remote code whose forward takes no position_ids would read left padding as positions: its contexts
    are scored unpadded, one at a time."""
    directory = build(tmp_path, tokenizer, "gpt2")
    gen = hf.HFGenerator(
        str(directory),
        ModelConfig(kind="hf", path=str(directory), dtype="float32"),
        GeneratorConfig(device="cpu", progress=False),
    )
    own, widths = gen.model.forward, []

    def forward(input_ids, attention_mask=None):
        widths.append(input_ids.shape)
        return own(input_ids=input_ids, attention_mask=attention_mask)

    monkeypatch.setattr(gen.model, "forward", forward)
    texts = [SCORE_CUE, gen.render(REQUESTS[1]) + "Fine.\n" + SCORE_CUE]
    probs = gen.next_token_probs(texts, SCORE_TOKENS)
    assert [shape[0] for shape in widths] == [1, 1]
    monkeypatch.setattr(gen.model, "forward", own)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for text, row in zip(texts, probs, strict=True):
        queries = [next_token_query(gen.tokenizer, text, c) for c in SCORE_TOKENS]
        expected = plain_probs(reference, queries[0][0])
        assert row == pytest.approx([float(expected[token]) for _, token in queries], rel=1e-4, abs=1e-9)
    gen.close()


def test_the_choice_is_logged(tokenizer, tmp_path, caplog):
    directory = build(tmp_path, tokenizer, "gpt2")
    with caplog.at_level(logging.INFO, logger="metareward.generation.hf"):
        gen = hf.HFGenerator(
            str(directory),
            ModelConfig(kind="hf", path=str(directory), dtype="float32"),
            GeneratorConfig(device="cpu", progress=False),
        )
    (record,) = [r for r in caplog.records if r.name == "metareward.generation.hf"]
    assert "transformers" in record.getMessage() and gen.engine_reason in record.getMessage()
    gen.close()


# ---------------------------------------------------------------- the choice, on configs alone


class RemoteLlama(LlamaForCausalLM):
    """Stands in for remote code that reuses Llama's model_type."""


@pytest.mark.parametrize(
    ("config_class", "settings", "model_class", "engine", "reason"),
    [
        (LlamaConfig, {}, None, "fast", "LlamaForCausalLM"),
        (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, None, "fast", ""),
        (
            LlamaConfig,
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
            None,
            "transformers",
            "dynamic",
        ),
        (LlamaConfig, {}, RemoteLlama, "transformers", "RemoteLlama"),
        # Qwen2's window applies only with use_sliding_window, from layer max_window_layers on.
        (Qwen2Config, {"sliding_window": 16}, None, "fast", ""),
        (
            Qwen2Config,
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
            None,
            "fast",
            "",
        ),
        (
            Qwen2Config,
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
            None,
            "transformers",
            "16",
        ),
        # Mistral's applies to every layer; one as long as the context never cuts anything off.
        (MistralConfig, {"sliding_window": 16}, None, "transformers", "sliding-window"),
        (MistralConfig, {"sliding_window": 512}, None, "fast", ""),
        (MistralConfig, {"sliding_window": None}, None, "fast", "MistralForCausalLM"),
        (GemmaConfig, {"head_dim": 16}, None, "transformers", "'gemma'"),
    ],
    ids=[
        "llama",
        "llama-linear-rope",
        "llama-dynamic-rope",
        "remote-code-llama",
        "qwen2-window-off",
        "qwen2-no-sliding-layer",
        "qwen2-sliding-layers",
        "mistral-window",
        "mistral-window-as-long-as-context",
        "mistral-no-window",
        "gemma",
    ],
)
def test_choose_engine(config_class, settings, model_class, engine, reason):
    config = config_class(vocab_size=64, hidden_size=64, intermediate_size=128, **LAYERS, **settings)
    with torch.device("meta"):
        model = model_class(config) if model_class else AutoModelForCausalLM.from_config(config)
    chosen, why = hf.choose_engine(model)
    assert chosen == engine, why
    assert reason in why


def test_quantized_weights_go_to_transformers():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, **LAYERS)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    assert hf.choose_engine(model) == ("transformers", "quantized weights")
