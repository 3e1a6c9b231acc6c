"""Behaviour tests for the transformers generation backend on the tiny random model: counts, order,
seeding, finish reasons, and next-token probabilities checked against a plain forward pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation import Completion, SamplingParams, make_generator
from metareward.prompts import SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS

REQUESTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon, a knight and a very old castle."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
]
SAMPLED = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    gen = make_generator(
        tiny_model_dir, ModelConfig(kind="tiny"), GeneratorConfig(progress=False, batch_size=4)
    )
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The same weights, used the plain way: one unpadded sequence per forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def sampled(generator):
    return generator.generate(REQUESTS, SAMPLED)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# The tiny model spreads its probability over ~49k tokens (each about 2e-5), so probabilities are
# compared relatively: an absolute 1e-4 would accept the probability of any token.
@torch.inference_mode()
def direct_probs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------- render


def test_render_uses_the_chat_template(generator):
    text = generator.render([{"role": "user", "content": "Where is Paris?"}])
    assert "<|im_start|>user\nWhere is Paris?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with_system = generator.render(REQUESTS[2])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in with_system
    assert with_system.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- generate


def test_n_completions_per_request_in_request_order(generator, sampled):
    lengths = [len(encode(generator.tokenizer, generator.render(r))) for r in REQUESTS]
    assert len(set(lengths)) == len(lengths)  # the requests really differ in length
    assert len(sampled) == len(REQUESTS)
    for completions in sampled:
        assert len(completions) == SAMPLED.n
        assert all(isinstance(c, Completion) for c in completions)
    # Samples are independent draws, not copies of one.
    for completions in sampled:
        assert len({c.text for c in completions}) > 1


def test_finish_reasons_and_token_counts(generator, sampled):
    for completions in sampled:
        for c in completions:
            assert c.finish_reason in {"stop", "length"}
            assert 0 <= c.num_tokens <= SAMPLED.max_new_tokens
            if c.finish_reason == "length":
                assert c.num_tokens == SAMPLED.max_new_tokens
            else:
                assert c.num_tokens < SAMPLED.max_new_tokens
            assert "<|im_end|>" not in c.text


def test_same_seed_same_outputs_other_seed_other_outputs(generator, sampled):
    again = generator.generate(REQUESTS, SAMPLED)
    assert again == sampled
    other = generator.generate(REQUESTS, replace(SAMPLED, seed=SAMPLED.seed + 1))
    assert [len(c) for c in other] == [len(c) for c in sampled]
    assert other != sampled


def test_max_new_tokens_two_cuts_off(generator):
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=3)
    out = generator.generate(REQUESTS[:2], params)
    rows = [c for completions in out for c in completions]
    assert len(rows) == 8
    for c in rows:
        assert c.finish_reason in {"stop", "length"}
        if c.finish_reason == "length":
            assert c.num_tokens == 2
        else:
            assert c.num_tokens < 2
    assert any(c.finish_reason == "length" for c in rows)


def test_greedy_in_a_batch_matches_each_request_alone(generator, monkeypatch):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=4, seed=0)
    batched = generator.generate(REQUESTS, greedy)
    monkeypatch.setattr(generator.settings, "batch_size", 1)
    alone = [generator.generate([request], greedy)[0] for request in REQUESTS]
    assert [len(c) for c in batched] == [1, 1, 1]
    assert [[(c.num_tokens, c.finish_reason) for c in cs] for cs in batched] == [
        [(c.num_tokens, c.finish_reason) for c in cs] for cs in alone
    ]
    assert batched == alone


def test_results_belong_to_their_request_whatever_the_batching(generator, monkeypatch):
    """Replace the model's decoding by one that answers each row with its own prompt length, so every
    result shows which request it came from; sorting, padding and batching must not mix them up."""
    tokenizer = generator.tokenizer
    eos, pad = generator.stop_ids[0], tokenizer.pad_token_id
    calls = []

    def fake_generate(input_ids, attention_mask, generation_config):
        calls.append((tuple(input_ids.shape), generation_config))
        new = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            real = sum(mask)
            # Left padding: pads first, then the real tokens.
            assert mask == [0] * (len(mask) - real) + [1] * real
            assert all(token == pad for token in ids[: len(mask) - real])
            new.append([tokenizer.convert_tokens_to_ids(d) for d in str(real)] + [eos])
        width = max(len(n) for n in new)
        new = [n + [pad] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype)], dim=1)

    monkeypatch.setattr(generator.model, "generate", fake_generate)
    requests = [[{"role": "user", "content": "word " * k}] for k in (3, 40, 1, 17, 9)]
    expected = [str(len(encode(tokenizer, generator.render(r)))) for r in requests]
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=0)
    for batch_size in (1, 3, 4, 16):
        calls.clear()
        monkeypatch.setattr(generator.settings, "batch_size", batch_size)
        out = generator.generate(requests, params)
        assert [[c.text for c in cs] for cs in out] == [[e, e] for e in expected]
        assert all(c.finish_reason == "stop" and c.num_tokens == len(c.text) for cs in out for c in cs)
        assert sum(shape[0] for shape, _ in calls) == len(requests) * params.n
        assert all(shape[0] <= batch_size for shape, _ in calls)
        assert len(calls) == -(-len(requests) * params.n // batch_size)
    config = calls[0][1]
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    assert config.max_new_tokens == 5


# ---------------------------------------------------------------- next_token_probs


def test_score_probs_match_a_plain_forward_pass(generator, reference):
    tokenizer, model = reference
    texts = [
        generator.render([{"role": "user", "content": "Rate this."}]) + "Good.\nScore: ",
        generator.render(REQUESTS[1]) + "The response is relevant and answers well. " * 4 + "Score: ",
        "Score: ",
    ]
    assert len({len(encode(tokenizer, t)) for t in texts}) == len(texts)  # padding is exercised
    probs = generator.next_token_probs(texts, SCORE_TOKENS)
    assert len(probs) == len(texts)
    for text, row in zip(texts, probs, strict=True):
        assert len(row) == 6
        assert all(0.0 <= p <= 1.0 for p in row)
        assert sum(row) <= 1.0 + 1e-6
        ids = encode(tokenizer, text)
        expected = direct_probs(model, ids)
        for candidate, p in zip(SCORE_TOKENS, row, strict=True):
            full = encode(tokenizer, text + candidate)
            assert full[:-1] == ids
            assert p == pytest.approx(float(expected[full[-1]]), rel=1e-4, abs=1e-12)
    # Rows are not all the same distribution: each text was scored on its own context.
    assert probs[0] != probs[1]


def test_score_probs_do_not_depend_on_the_scoring_batch(generator, monkeypatch):
    texts = ["Score: ", "A much longer judgement text that needs left padding.\nScore: "]
    batched = generator.next_token_probs(texts, SCORE_TOKENS)
    monkeypatch.setattr(generator.settings, "score_batch_size", 1)
    single = generator.next_token_probs(texts, SCORE_TOKENS)
    for a, b in zip(batched, single, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-12)


def test_winner_probs_use_the_common_prefix_context(generator, reference):
    tokenizer, model = reference
    texts = [
        generator.render([{"role": "user", "content": "Compare."}]) + "A is better.\n" + WINNER_CUE,
        "Both judgements are fine, but the first is more careful.\n" + WINNER_CUE,
    ]
    assert all(t.endswith("Judgement ") for t in texts)
    probs = generator.next_token_probs(texts, WINNER_TOKENS)
    for text, row in zip(texts, probs, strict=True):
        context = encode(tokenizer, text[:-1])  # without the trailing space token
        assert encode(tokenizer, text)[:-1] == context
        expected = direct_probs(model, context)
        for candidate, p in zip(WINNER_TOKENS, row, strict=True):
            (token,) = encode(tokenizer, " " + candidate)  # BPE merges " A" into one token
            assert encode(tokenizer, text + candidate) == [*context, token]
            assert p == pytest.approx(float(expected[token]), rel=1e-4, abs=1e-12)
        assert sum(row) <= 1.0 + 1e-6


def test_multi_token_candidate_is_refused(generator):
    with pytest.raises(ValueError, match="12345678"):
        generator.next_token_probs(["Score: "], ["1", "12345678"])
