"""The vLLM backend on the real engine (vLLM's CPU build) and the embedded SmolLM2-135M in fp32: the
generator contract the loop relies on, checked against the transformers backend on the same model.

    make test-engines          # or: .venv-engines/bin/python -m pytest tests/engines/test_vllm_engine.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import psutil
import pytest

from metareward.config import GeneratorConfig, ModelConfig, VLLMSettings
from metareward.data import read_prompt_file
from metareward.generation import SamplingParams, make_generator
from metareward.judging.prompts import SCORE_TOKENS, Templates
from tests.helpers import ASSETS

KV_GIB = 1
ENGINE = VLLMSettings(enforce_eager=True, cpu_kv_cache_gib=KV_GIB, max_model_len=2048)
PROMPTS = read_prompt_file(ASSETS / "prompts_self_instruct_user_oriented.jsonl")
SAMPLED = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=5)
GREEDY = SamplingParams(n=3, temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0)


def smollm2() -> tuple[str, ModelConfig]:
    from metareward.compute.models import resolve_model

    model = ModelConfig(kind="smollm2_135m", dtype="float32")
    return resolve_model(model), model


def start(engine: VLLMSettings = ENGINE):
    model_dir, model = smollm2()
    return make_generator(model_dir, model, GeneratorConfig(backend="vllm", progress=False, vllm=engine))


@pytest.fixture(scope="module")
def vllm_gen():
    generator = start()
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def hf_gen():
    model_dir, model = smollm2()
    return make_generator(model_dir, model, GeneratorConfig(backend="hf", progress=False))


def engine_processes() -> set[psutil.Process]:
    """This process's live vLLM engine cores and workers (vLLM titles them ``VLLM::...``)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "VLLM::" in " ".join(child.cmdline()):
                found.add(child)
    return found


def test_the_settings_reach_the_engine(vllm_gen):
    config = vllm_gen.llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager is True
    assert config.model_config.max_model_len == 2048
    assert str(config.model_config.dtype) == "torch.float32"
    assert config.cache_config.kv_cache_memory_bytes == KV_GIB * 2**30
    assert config.cache_config.enable_prefix_caching is True
    # Seeded prompts are never computed over several steps on the CPU engine (see the judge-length test).
    assert config.scheduler_config.enable_chunked_prefill is False
    # The worker's OpenMP threads, one bound to each core, compute on every core this process may use.
    workers = [p for p in engine_processes() if "Worker" in " ".join(p.cmdline())]
    assert workers, [p.cmdline() for p in engine_processes()]
    bound = {core for w in workers for thread in w.threads() for core in os.sched_getaffinity(thread.id)}
    assert bound == set(os.sched_getaffinity(0))


def test_a_requests_samples_depend_on_its_seed_alone(vllm_gen):
    alone = vllm_gen.generate([PROMPTS[3]["messages"]], SAMPLED)[0]
    among = vllm_gen.generate(
        [PROMPTS[0]["messages"], PROMPTS[3]["messages"], PROMPTS[7]["messages"]], SAMPLED
    )[1]
    assert [c.text for c in among] == [c.text for c in alone]
    assert len(alone) == SAMPLED.n and alone[0].text != alone[1].text
    other_seed = vllm_gen.generate([PROMPTS[3]["messages"]], dataclasses.replace(SAMPLED, seed=6))[0]
    assert [c.text for c in other_seed] != [c.text for c in alone]


def test_greedy_repeats_one_text_and_agrees_with_the_transformers_backend(vllm_gen, hf_gen):
    requests = [row["messages"] for row in PROMPTS[:12]]
    calls, samples = vllm_gen.usage.generate_calls, vllm_gen.usage.samples
    fast, reference = vllm_gen.generate(requests, GREEDY), hf_gen.generate(requests, GREEDY)
    # One engine call for the lot; each greedy request is asked once and its answer repeated n times.
    assert vllm_gen.usage.generate_calls == calls + 1 and vllm_gen.usage.samples == samples + 12 * 3
    assert [s[0].prompt_tokens for s in fast] == [s[0].prompt_tokens for s in reference]
    for samples in fast:
        assert len(samples) == 3 and len({c.text for c in samples}) == 1
    same = [v[0].text == h[0].text for v, h in zip(fast, reference, strict=True)]
    print(f"greedy texts equal to the transformers backend's: {sum(same)}/{len(same)}")
    assert sum(same) >= len(same) // 2
    # Where the texts agree, so do the token counts and how each ended.
    for v, h, equal in zip(fast, reference, same, strict=True):
        if equal:
            assert (v[0].num_tokens, v[0].finish_reason) == (h[0].num_tokens, h[0].finish_reason)


def test_stop_tokens_and_finish_reasons(vllm_gen):
    short = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=3, seed=0)
    (cut,) = vllm_gen.generate([PROMPTS[1]["messages"]], short)[0]
    assert (cut.finish_reason, cut.num_tokens) == ("length", 3)
    say = [{"role": "user", "content": "Reply with the single word: yes"}]
    (ended,) = vllm_gen.generate([say], SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=64))[0]
    assert ended.finish_reason == "stop" and ended.num_tokens < 64
    # The stop token is neither in the text nor counted.
    ids = vllm_gen.tokenizer(ended.text, add_special_tokens=False)["input_ids"]
    assert not set(ids) & set(vllm_gen.stop_ids)
    assert abs(len(ids) - ended.num_tokens) <= 1


def test_next_token_probabilities_equal_the_transformers_backends(vllm_gen, hf_gen):
    templates = Templates.load(None, None)
    texts = [
        vllm_gen.render(templates.judge_messages(row["messages"], "Here is my answer.")) + "Score: "
        for row in PROMPTS[:6]
    ]
    fast = vllm_gen.next_token_probs(texts, list(SCORE_TOKENS))
    reference = hf_gen.next_token_probs(texts, list(SCORE_TOKENS))
    worst = max(
        abs(a - b)
        for row_a, row_b in zip(fast, reference, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    print(f"largest difference in score-token probability: {worst:.2e}")
    assert worst < 1e-3
    assert max(max(row) for row in fast) > 0.05  # the digits do carry mass after "Score: "


def test_judge_length_seeded_prompts_run_in_one_batch(vllm_gen):
    """36 rubric-long judge prompts, each sampled with the seed: the batch vLLM 0.32's CPU engine dies
    on when their prompts are computed over several steps (chunked prefill)."""
    templates = Templates.load(None, None)
    requests = [
        templates.judge_messages(row["messages"], row["messages"][0]["content"]) for row in PROMPTS[:36]
    ]
    lengths = [len(vllm_gen.tokenizer(vllm_gen.render(r))["input_ids"]) for r in requests]
    assert min(lengths) > 350 and sum(lengths) > 4096  # more than one step's default token budget
    results = vllm_gen.generate(
        requests, SamplingParams(n=2, temperature=0.8, top_p=1.0, max_new_tokens=8, seed=1)
    )
    assert [len(samples) for samples in results] == [2] * 36


def test_close_frees_the_engine_and_another_starts_in_the_same_process(vllm_gen):
    before = engine_processes()
    first = start()
    own = engine_processes() - before
    assert own
    first.close()
    assert not own & engine_processes()
    with pytest.raises(RuntimeError, match="closed"):
        first.generate([PROMPTS[0]["messages"]], SAMPLED)
    second = start(VLLMSettings(enforce_eager=True, cpu_kv_cache_gib=1, max_model_len=1024))
    try:
        assert len(second.generate([PROMPTS[0]["messages"]], SAMPLED)[0]) == 2
        assert json.dumps(second.llm.llm_engine.vllm_config.model_config.max_model_len) == "1024"
    finally:
        second.close()
