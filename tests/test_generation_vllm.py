"""The vLLM backend against a stand-in for vLLM (tests/vllm_standin): what is sent to the engine,
how its outputs become completions and probabilities, shutdown, and a two-iteration loop in which
each iteration's one engine serves all three roles and is shut down before DPO."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from metareward.config import GeneratorConfig, ModelConfig, VLLMSettings, load_config
from metareward.generation import Completion, SamplingParams, make_generator
from metareward.judging.prompts import SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS
from metareward.store import layout, records

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


def test_one_call_carries_every_prompt_and_the_sampling_settings(tiny_model_dir, standin, tokenizer):
    generator = vllm_generator(tiny_model_dir, standin)
    generator.generate(REQUESTS, SAMPLED)
    (llm,) = standin.LLM.instances
    (call,) = llm.calls
    prompts, params, use_tqdm = call
    assert prompts == [{"prompt_token_ids": rendered_ids(tokenizer, m)} for m in REQUESTS]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (
        2,
        0.7,
        0.9,
        5,
        11,
    )
    assert tokenizer.eos_token_id in params.stop_token_ids
    assert params.logprobs is None
    assert use_tqdm is False


def test_outputs_become_completions_in_request_order(tiny_model_dir, standin):
    generator = vllm_generator(tiny_model_dir, standin)
    results = generator.generate(REQUESTS, SAMPLED)
    answer_tokens = len(encode(generator.tokenizer, "Answer 0."))
    prompt_lengths = [len(rendered_ids(generator.tokenizer, m)) for m in REQUESTS]
    assert results[0] == [
        Completion(
            "Answer 0.", num_tokens=answer_tokens, finish_reason="stop", prompt_tokens=prompt_lengths[0]
        ),
        Completion(
            "Answer 1.", num_tokens=answer_tokens, finish_reason="stop", prompt_tokens=prompt_lengths[0]
        ),
    ]
    # Cut off at max_new_tokens: "length", every token counted.
    cut = Completion(" word" * 5, num_tokens=5, finish_reason="length", prompt_tokens=prompt_lengths[1])
    assert results[1] == [cut] * 2
    assert [c.text for c in results[2]] == ["Answer 0.", "Answer 1."]
    usage = generator.usage
    assert (usage.generate_calls, usage.samples) == (1, 6)
    assert usage.generated_tokens == 4 * answer_tokens + 2 * 5
    assert usage.prompt_tokens == 2 * sum(prompt_lengths)


def test_greedy_sends_one_sample_and_repeats_it(tiny_model_dir, standin):
    generator = vllm_generator(tiny_model_dir, standin)
    greedy = SamplingParams(n=3, temperature=0.0, top_p=0.9, max_new_tokens=5, seed=1)
    results = generator.generate(REQUESTS[:1], greedy)
    (_, params, _) = standin.LLM.instances[0].calls[0]
    # vLLM refuses n > 1 when greedy (the stand-in too); the three samples are the one greedy answer.
    assert (params.n, params.temperature, params.top_p) == (1, 0.0, 1.0)
    assert [c.text for c in results[0]] == ["Answer 0."] * 3
    assert generator.usage.samples == 3


def test_no_requests_make_no_call(tiny_model_dir, standin):
    generator = vllm_generator(tiny_model_dir, standin)
    assert generator.generate([], SAMPLED) == []
    assert standin.LLM.instances[0].calls == []


# ---------------------------------------------------------------- next-token probabilities


def test_next_token_probs_come_from_the_returned_logprobs(tiny_model_dir, standin, tokenizer):
    digit = {d: encode(tokenizer, "Score: " + d)[-1] for d in SCORE_TOKENS}
    table = {digit["0"]: math.log(0.1), digit["3"]: math.log(0.5), digit["5"]: math.log(0.2)}
    table[tokenizer.eos_token_id] = math.log(0.15)
    table[digit["1"]] = math.log(0.05)  # fifth likeliest: outside the top 4 the engine returns
    generator = vllm_generator(tiny_model_dir, standin, Replies(table), max_logprobs=4)
    texts = ["It is fine. Score: ", "Bad. Score: ", "It is fine. Score: "]
    probs = generator.next_token_probs(texts, SCORE_TOKENS)
    assert probs[0] == pytest.approx([0.1, 0.0, 0.0, 0.5, 0.0, 0.2])
    assert probs == [probs[0]] * 3
    (llm,) = standin.LLM.instances
    (call,) = llm.calls
    prompts, params, _ = call
    # One prompt per distinct context, one greedy step, as many log-probabilities as the engine allows.
    assert prompts == [{"prompt_token_ids": encode(tokenizer, t)} for t in texts[:2]]
    assert (params.n, params.max_tokens, params.temperature, params.logprobs) == (1, 1, 0.0, 4)
    assert generator.usage.scored_texts == 3


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


def test_close_shuts_the_engine_down_once(tiny_model_dir, standin):
    from vllm.distributed import parallel_state

    generator = vllm_generator(tiny_model_dir, standin)
    (llm,) = standin.LLM.instances
    generator.close()
    assert llm.shutdowns == 1
    assert parallel_state.calls == ["cleanup_dist_env_and_memory"]
    generator.close()
    assert llm.shutdowns == 1
    assert parallel_state.calls == ["cleanup_dist_env_and_memory"]
    with pytest.raises(RuntimeError, match="closed"):
        generator.generate(REQUESTS, SAMPLED)


# ---------------------------------------------------------------- the loop

LOOP = [
    "model=tiny",
    "generator=vllm",
    "generator.progress=false",
    "data.prompts_per_iteration=4",
    "actor.num_responses=3",
    "actor.max_new_tokens=24",
    "judge.num_judgements=3",
    "judge.max_new_tokens=32",
    "meta_judge.max_new_tokens=16",
    "train.dpo.learning_rate=1e-3",
    # DPO on the long judge prompts would triple the run time; the actor pairs train here.
    "train.judge_iterations=[]",
    "tracking=none",
    "eval.enabled=false",
    "run_name=vllm",
    "iterations=2",
]


def role(llm, call) -> str:
    prompts, params, _ = call
    if params.logprobs is not None:
        return "scoring"
    text = llm.tokenizer.decode(prompts[0]["prompt_token_ids"])
    if "along with two judgments" in text:
        return "meta-judge"
    return "judge" if "additive 5-point scoring system" in text else "actor"


class RolePlay:
    """Answers like a model that follows the prompts: response k of a prompt is "Answer k."; its
    judgement j gives (k + j) % 6 points, so responses differ in mean score and judgements of one
    response disagree; the meta-judge prefers the judgement with more points."""

    def reply(self, llm, prompt_token_ids, params, index):
        prompt = llm.tokenizer.decode(prompt_token_ids)
        if "along with two judgments" in prompt:
            a, b = (int(re.search(rf"Judgment {x}: Points given\. Score: (\d)", prompt)[1]) for x in "AB")
            text = f"Winner: Judgement {'A' if a >= b else 'B'}"
        elif "additive 5-point scoring system" in prompt:
            k = int(re.search(r"<response>Answer (\d)\.</response>", prompt)[1])
            text = f"Points given. Score: {(k + index) % 6}"
        else:
            text = f"Answer {index}."
        return [*encode(llm.tokenizer, text), llm.tokenizer.eos_token_id]

    def next_logprobs(self, llm, token_ids):
        return {llm.tokenizer.eos_token_id: 0.0}


@pytest.mark.slow
def test_loop_uses_one_engine_per_iteration_and_frees_it_before_training(
    tiny_model_dir, standin, monkeypatch, tmp_path
):
    import metareward.training
    from metareward.loop.run import Run

    standin.LLM.script = RolePlay()
    events = standin.LLM.events
    train_dpo = metareward.training.train_dpo

    def recorded_train_dpo(*args, **kwargs):
        events.append(("train",))
        return train_dpo(*args, **kwargs)

    monkeypatch.setattr(metareward.training, "train_dpo", recorded_train_dpo)
    cfg = load_config(None, [*LOOP, f"runs_dir={tmp_path}"])
    history = Run(cfg).run()

    assert [m["iteration"] for m in history] == [1, 2]
    assert len(standin.LLM.instances) == 2
    trains = [i for i, event in enumerate(events) if event == ("train",)]
    assert len(trains) == 2 and trains[1] == len(events) - 1
    for t, (start, end) in enumerate([(0, trains[0]), (trains[0] + 1, trains[1])]):
        segment = events[start:end]
        # Iteration t+1: its engine is built first, serves every call, and is shut down before DPO.
        assert segment[0] == ("engine", t) and segment[-1] == ("shutdown", t)
        llm = standin.LLM.instances[t]
        assert segment[1:-1] == [("generate", t)] * len(llm.calls)
        # All rows of a stage go to vLLM in one call (chunk_size 4096); scoring calls may come in between.
        sampling = [(role(llm, call), len(call[0])) for call in llm.calls if role(llm, call) != "scoring"]
        assert sampling == [("actor", 4), ("judge", 12), ("meta-judge", 24)]
        iteration = tmp_path / "vllm" / f"iter_{t + 1}"
        assert (iteration / layout.MODEL / "config.json").is_file()
        responses = records.read_jsonl(iteration / layout.RESPONSES)
        assert len(responses) == 12 and all(r["text"].startswith("Answer ") for r in responses)
        assert history[t]["pairs"]["actor"]["pairs"] == 4
        assert history[t]["pairs"]["judge"]["pairs"] == 4
    # Iteration 2 is served by M_1, the model iteration 1 trained.
    assert standin.LLM.instances[1].args["model"] == str(tmp_path / "vllm" / "iter_1" / layout.MODEL)
