"""The vLLM backend against a stand-in for vLLM (tests/vllm_standin), for what vLLM's CPU build cannot
show: the GPU engine's settings (tensor parallelism, GPU memory share) and how the model spec reaches
it, plus two corner cases of the generator's own logic. Everything else (sampling, seeds, greedy
repeats, stop tokens, probabilities, shutdown, the loop) is tested on the real engine in tests/engines
(``make test-engines``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from metareward.config import GeneratorConfig, ModelConfig, VLLMSettings
from metareward.generation import SamplingParams, make_generator
from metareward.judging.prompts import WINNER_CUE, WINNER_TOKENS

STANDIN = Path(__file__).parent / "vllm_standin"
REQUESTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write a long poem."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
]
SAMPLED = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11)


def _is_vllm_module(name: str) -> bool:
    return name == "vllm" or name.startswith("vllm.") or name == "metareward.generation.vllm"


@pytest.fixture
def standin(monkeypatch):
    """``import vllm`` gives the stand-in, freshly imported (so its records start empty)."""
    for name in [n for n in sys.modules if _is_vllm_module(n)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(STANDIN))
    import vllm

    assert Path(vllm.__file__).is_relative_to(STANDIN)
    yield vllm
    for name in [n for n in sys.modules if _is_vllm_module(n)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rendered_ids(tokenizer, messages) -> list[int]:
    return encode(
        tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


class Replies:
    """Sample j of a prompt says "Answer j." and ends its turn; a prompt asking for a long poem gets
    words without end. The next token after anything: the ``logprobs`` table."""

    def __init__(self, logprobs: dict[int, float] | None = None):
        self.logprobs = logprobs or {}

    def reply(self, llm, prompt_token_ids, params, index):
        if "long poem" in llm.tokenizer.decode(prompt_token_ids):
            return encode(llm.tokenizer, " word" * 50)
        return [*encode(llm.tokenizer, f"Answer {index}."), llm.tokenizer.eos_token_id]

    def next_logprobs(self, llm, token_ids):
        return self.logprobs


def vllm_generator(model_dir: str, standin, script=None, model: ModelConfig | None = None, **settings):
    standin.LLM.script = script or Replies()
    config = GeneratorConfig(backend="vllm", progress=False, vllm=VLLMSettings(**settings))
    return make_generator(model_dir, model or ModelConfig(kind="tiny"), config)


# ---------------------------------------------------------------- the engine


def test_engine_gets_the_settings(tiny_model_dir, standin):
    vllm_generator(
        tiny_model_dir,
        standin,
        tensor_parallel_size=4,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        max_logprobs=7,
    )
    (llm,) = standin.LLM.instances
    sent = {
        "model": tiny_model_dir,
        "tokenizer": tiny_model_dir,
        # model.dtype's default, auto, as the transformers backend reads it (the stand-in's "GPU" has no
        # native bf16), not vLLM's own auto (the checkpoint's dtype: fp32 for every M_t).
        "dtype": "float32",
        "trust_remote_code": False,
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 2048,
        "enable_prefix_caching": True,
        "max_logprobs": 7,
        "load_format": "safetensors",
    }
    assert {key: llm.args[key] for key in sent} == sent


def test_engine_follows_the_model_spec(tiny_model_dir, standin):
    model = ModelConfig(kind="hf", path=tiny_model_dir, dtype="bfloat16", trust_remote_code=True)
    vllm_generator(tiny_model_dir, standin, model=model, enable_prefix_caching=False)
    (llm,) = standin.LLM.instances
    assert llm.args["dtype"] == "bfloat16"
    assert llm.args["trust_remote_code"] is True
    assert llm.args["enable_prefix_caching"] is False
    assert llm.args["max_model_len"] is None


# ---------------------------------------------------------------- generate


def test_no_requests_make_no_call(tiny_model_dir, standin):
    generator = vllm_generator(tiny_model_dir, standin)
    assert generator.generate([], SAMPLED) == []
    assert standin.LLM.instances[0].calls == []


# ---------------------------------------------------------------- next-token probabilities


def test_a_candidate_merging_with_the_text_is_read_after_the_shorter_context(
    tiny_model_dir, standin, tokenizer
):
    text = "Judgement A is more accurate.\n" + WINNER_CUE
    a_token = encode(tokenizer, text + "A")[-1]
    generator = vllm_generator(tiny_model_dir, standin, Replies({a_token: math.log(0.75)}))
    assert generator.next_token_probs([text], WINNER_TOKENS) == [pytest.approx([0.75, 0.0])]
    (prompts, _, _) = standin.LLM.instances[0].calls[0]
    # The cue's trailing space and "A" make one token, so the context stops before the space.
    assert encode(tokenizer, text)[-1] != a_token
    assert prompts == [{"prompt_token_ids": encode(tokenizer, text.rstrip())}]


# ---------------------------------------------------------------- close
