"""Behaviour tests for the transformers generation backend on the tiny random model: counts, order,
seeding, finish reasons, and next-token probabilities checked against a plain forward pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation import Completion, SamplingParams, hf_engine, hf_layers, make_generator, sampling
from metareward.generation.sampling import sample
from metareward.judging.prompts import SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS

REQUESTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon, a knight and a very old castle."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
]
SAMPLED = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    """The generator in fp32, as the reference computes. ``dtype: auto`` would pick bf16 on a CPU with
    AVX512-BF16 or AMX and fp32 elsewhere, and bf16 rounding (unit roundoff 2**-9) moves the tiny
    model's probabilities by about 1e-3 relative and its draws from the second token: the tolerances
    below (rel 1e-4) sit far above fp32 rounding (2**-24) and far below that, so they hold the engine
    to the plain forward pass's function on every machine."""
    gen = make_generator(
        tiny_model_dir,
        ModelConfig(kind="tiny", dtype="float32"),
        GeneratorConfig(progress=False, batch_size=4),
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


# The tiny model spreads its probability over ~4k tokens (each about 2e-4), so probabilities are
# compared relatively: an absolute 1e-3 would accept the probability of any token.
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
    """Each sample draws from its own seed (seed, prompt, sample index). With a sampler that writes its
    uniforms out as tokens, every completion shows which request and sample it came from: sorting,
    sharing prefixes and batching must not mix them up."""
    tokenizer = generator.tokenizer
    monkeypatch.setattr(sampling, "sample", lambda logits, params, uniforms: (uniforms * 1000).long() + 100)
    requests = [[{"role": "user", "content": "word " * k}] for k in (3, 40, 1, 17, 9)]
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=0)
    expected = []
    for request in requests:
        prompt = encode(tokenizer, generator.render(request))
        draws = [
            torch.rand(5, generator=torch.Generator().manual_seed(sampling.sample_seed(0, prompt, j)))
            for j in (0, 1)
        ]
        expected.append([tokenizer.decode((u * 1000).long() + 100) for u in draws])
    rows_per_batch = []
    decode = generator._decode

    def counting_decode(prompts, p):
        rows_per_batch.append(len(prompts) * p.n)
        return decode(prompts, p)

    monkeypatch.setattr(generator, "_decode", counting_decode)
    for batch_size in (1, 3, 4, 16):
        rows_per_batch.clear()
        monkeypatch.setattr(generator, "memo", {})  # recompute, not recall
        monkeypatch.setattr(generator.settings, "batch_size", batch_size)
        out = generator.generate(requests, params)
        assert [[c.text for c in cs] for cs in out] == expected
        assert all(c.finish_reason == "length" and c.num_tokens == 5 for cs in out for c in cs)
        assert sum(rows_per_batch) == len(requests) * params.n
        assert all(rows <= max(batch_size, params.n) for rows in rows_per_batch)
    assert len({text for texts in expected for text in texts}) == 2 * len(requests)


def test_identical_requests_are_computed_once(generator):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=4, seed=5)
    before = generator.usage.copy()
    out = generator.generate([REQUESTS[0], REQUESTS[1], REQUESTS[0]], params)
    spent = generator.usage.since(before)
    assert out[0] == out[2]
    assert spent["samples"] == 6 and spent["cached_samples"] == 2
    assert spent["generated_tokens"] == sum(c.num_tokens for c in out[0] + out[1])
    # Asked again in a later call: answered from memory, nothing generated.
    before = generator.usage.copy()
    again = generator.generate([REQUESTS[1], REQUESTS[0]], params)
    spent = generator.usage.since(before)
    assert again == [out[1], out[0]]
    assert spent["cached_samples"] == 4 and spent["generated_tokens"] == 0 and spent["prompt_tokens"] == 0


def test_sampling_keeps_the_top_p_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.8 keeps the first two (0.5 < 0.8, then 0.8 reached).
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(1000, 1)
    uniforms = (torch.arange(1000) + 0.5) / 1000
    tokens = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), uniforms)
    assert set(tokens.tolist()) == {0, 1}
    assert (tokens == 0).sum().item() == 625  # 0.5 / 0.8 of the mass, by inverse CDF
    every = sample(logits, SamplingParams(temperature=1.0, top_p=1.0), uniforms)
    assert [(every == t).sum().item() for t in range(4)] == [500, 300, 150, 50]
    greedy = sample(logits, SamplingParams(temperature=0.0), uniforms)
    assert set(greedy.tolist()) == {0}
    # A flat distribution over more tokens than the first top-k look: the nucleus is still exact.
    flat = torch.zeros(1000, 1000)
    wide = sample(flat, SamplingParams(temperature=1.0, top_p=0.5), uniforms)
    assert 495 <= len(set(wide.tolist())) <= 505


def test_the_tiny_model_is_served_by_the_fast_engine(generator):
    assert generator.engine == "fast"
    assert "LlamaForCausalLM" in generator.engine_reason


def test_the_transformers_path_draws_what_the_fast_engine_draws(generator, sampled, monkeypatch):
    """model.generate with the seeded sampler: each sample draws with the same sampler and its own
    uniforms, so the same request and seed give the fast engine's samples (float rounding between the
    two forward passes could move a draw only at a boundary of the nucleus CDF)."""
    monkeypatch.setattr(generator, "engine", "transformers")
    monkeypatch.setattr(generator, "memo", {})
    out = generator.generate(REQUESTS, SAMPLED)
    assert [len(c) for c in out] == [SAMPLED.n] * len(REQUESTS)
    assert out == sampled
    assert generator.generate(REQUESTS, SAMPLED) == out
    monkeypatch.setattr(generator, "memo", {})
    assert generator.generate(REQUESTS, SAMPLED) == out  # recomputed: the seed fixes the outputs
    (plain,) = generator.next_token_probs(["Score: "], SCORE_TOKENS)
    monkeypatch.setattr(generator, "engine", "fast")
    (fast,) = generator.next_token_probs(["Score: "], SCORE_TOKENS)
    assert plain == pytest.approx(fast, rel=1e-4)


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


def test_prefill_leaves_padding_out_of_the_projections(generator, reference, monkeypatch):
    """Rows of one prefill slice that differ in length run their projections and MLP on their real
    tokens only (packed); each row's probabilities are still those of a plain forward pass."""
    tokenizer, model = reference
    base = generator.render(REQUESTS[1]) + "The response is relevant and answers well. "
    endings = ["It is good.", "It is good and kind.", "It is good, kind and exact in all parts."]
    texts = [base + ending + "\nScore: " for ending in endings]
    packed = []
    forward = generator.fast.forward

    def spy(ids, positions, past, k_out, v_out, offset, last, lengths=None):
        packed.append(lengths is not None and bool((lengths < ids.shape[1]).any()))
        return forward(ids, positions, past, k_out, v_out, offset, last, lengths)

    monkeypatch.setattr(generator.fast, "forward", spy)
    monkeypatch.setattr(generator.fast, "kept", [])
    probs = generator.next_token_probs(texts, SCORE_TOKENS)
    assert any(packed)
    for text, row in zip(texts, probs, strict=True):
        expected = direct_probs(model, encode(tokenizer, text))
        for candidate, p in zip(SCORE_TOKENS, row, strict=True):
            assert p == pytest.approx(float(expected[encode(tokenizer, text + candidate)[-1]]), rel=1e-4)


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


def test_scoring_a_completion_reuses_its_cached_prompt(generator, reference, monkeypatch):
    """The judge scores prompt + judgement + cue right after generating the judgement: only the tokens
    after the kept cache run, and the probabilities are those of a plain forward pass."""
    tokenizer, model = reference
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=2)
    monkeypatch.setattr(generator, "memo", {})
    out = generator.generate(REQUESTS, params)
    texts = [
        generator.render(request) + c.text.rstrip() + "\nScore: "
        for request, completions in zip(REQUESTS, out, strict=True)
        for c in completions
    ]

    def no_prefill(prompts):
        raise AssertionError("scored from scratch, not on the kept cache")

    monkeypatch.setattr(generator.fast, "prefill", no_prefill)
    probs = generator.next_token_probs(texts, SCORE_TOKENS)
    for text, row in zip(texts, probs, strict=True):
        ids = encode(tokenizer, text)
        expected = direct_probs(model, ids)
        for candidate, p in zip(SCORE_TOKENS, row, strict=True):
            assert p == pytest.approx(float(expected[encode(tokenizer, text + candidate)[-1]]), rel=1e-4)


def test_finished_prompts_leave_the_batch_and_keep_their_cache(generator, reference, monkeypatch):
    """Samples that stop early (here: a uniform below 0.1 draws the stop token) leave the batch once
    their prompt is done; completions stay exact, and scoring them afterwards still uses their cache."""
    tokenizer, model = reference
    eos = generator.stop_ids[0]

    def stopping_sample(logits, params, uniforms):
        return torch.where(uniforms < 0.1, eos, (uniforms * 1000).long() + 100)

    rows_per_step = []
    forward = generator.fast.forward

    def counting_forward(ids, *args):
        rows_per_step.append(ids.shape)
        return forward(ids, *args)

    monkeypatch.setattr(sampling, "sample", stopping_sample)
    monkeypatch.setattr(generator.fast, "forward", counting_forward)
    monkeypatch.setattr(generator, "memo", {})
    monkeypatch.setattr(generator.settings, "batch_size", 16)
    requests = [[{"role": "user", "content": "word " * k}] for k in (3, 40, 1, 17, 9)]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=4)
    out = generator.generate(requests, params)
    for request, completions in zip(requests, out, strict=True):
        prompt = encode(tokenizer, generator.render(request))
        for j, c in enumerate(completions):
            u = torch.rand(12, generator=torch.Generator().manual_seed(sampling.sample_seed(4, prompt, j)))
            stop = next((t for t in range(12) if u[t] < 0.1), None)
            drawn = (u[:stop] * 1000).long() + 100
            assert (c.num_tokens, c.finish_reason) == (len(drawn), "length" if stop is None else "stop")
            assert c.text == tokenizer.decode(drawn)
    assert {c.finish_reason for cs in out for c in cs} == {"stop", "length"}
    decoding = [rows for rows, width in rows_per_step if width == 1]
    assert decoding[0] == 10 and min(decoding) < 10  # the batch shrank as prompts finished

    texts = [
        generator.render(r) + c.text + "\nScore: " for r, cs in zip(requests, out, strict=True) for c in cs
    ]
    monkeypatch.setattr(
        generator.fast, "prefill", lambda prompts: pytest.fail("not scored on the kept cache")
    )
    for text, row in zip(texts, generator.next_token_probs(texts, SCORE_TOKENS), strict=True):
        expected = direct_probs(model, encode(tokenizer, text))
        for candidate, p in zip(SCORE_TOKENS, row, strict=True):
            assert p == pytest.approx(float(expected[encode(tokenizer, text + candidate)[-1]]), rel=1e-4)


def test_long_decodes_stay_exact_across_key_blocks(generator, reference, monkeypatch):
    """Past the first block of generated keys (OWN_BLOCK positions) and after a finished prompt has
    left the batch, each step's logits are those of a plain forward pass over the text so far."""
    tokenizer, model = reference
    eos, steps, finish_at = generator.stop_ids[0], hf_engine.OWN_BLOCK + 8, hf_engine.OWN_BLOCK + 2
    seen = []

    def fixed_sample(logits, params, uniforms):
        t = len(seen)
        seen.append(logits.clone())
        tokens = 100 + 7 * t + torch.arange(len(logits))
        if t == finish_at:  # the first prompt's two samples stop here; the other prompt's go on
            tokens[:2] = eos
        return tokens

    monkeypatch.setattr(sampling, "sample", fixed_sample)
    monkeypatch.setattr(generator, "memo", {})
    monkeypatch.setattr(generator.settings, "batch_size", 4)
    requests = [[{"role": "user", "content": "word " * 9}], [{"role": "user", "content": "Hi"}]]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=steps, seed=5)
    out = generator.generate(requests, params)
    assert [c.num_tokens for c in out[0]] == [finish_at] * 2
    assert [c.num_tokens for c in out[1]] == [steps] * 2
    prompt = encode(tokenizer, generator.render(requests[1]))
    for t in (hf_engine.OWN_BLOCK - 1, hf_engine.OWN_BLOCK, hf_engine.OWN_BLOCK + 1, steps - 1):
        # The second prompt's samples are rows 2 and 3, then rows 0 and 1 once the first has left.
        for sample_index in range(2):
            logits = seen[t][sample_index + (2 if t <= finish_at else 0)]
            ids = prompt + [100 + 7 * u + sample_index + (2 if u <= finish_at else 0) for u in range(t)]
            expected = direct_probs(model, ids)
            torch.testing.assert_close(torch.softmax(logits, -1), expected, rtol=1e-3, atol=1e-6)


def test_multi_token_candidate_is_refused(generator):
    with pytest.raises(ValueError, match="12345678"):
        generator.next_token_probs(["Score: "], ["1", "12345678"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_equals_a_plain_one(dtype):
    """The CPU linear with a weight laid out once for oneDNN computes F.linear (3-D input, bias); where
    this CPU cannot pack a dtype (bf16 without AVX512), it is a plain linear and computes the same."""
    weight, bias = torch.randn(48, 16, dtype=dtype), torch.randn(48, dtype=dtype)
    x = torch.randn(5, 3, 16, dtype=dtype)
    linear = hf_layers.Linear(weight, bias, rows_hint=4)
    assert (linear.packed is not None) == hf_layers.cpu_packs_weights(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=tolerance, atol=tolerance)
