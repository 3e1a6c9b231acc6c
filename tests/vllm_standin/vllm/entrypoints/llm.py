"""Stand-in for ``vllm.entrypoints.llm``: the offline ``LLM`` engine, driven by a test's script.

    LLM.script = MyScript()               # what the "model" generates and its next-token log-probs
    llm = LLM(model=model_dir, enable_prefix_caching=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(n=2, max_tokens=8))
    llm.llm_engine.engine_core.shutdown()

Like the real engine it loads the tokenizer from ``tokenizer`` (else ``model``), stops a sample at
the tokenizer's end-of-sequence token or a ``stop_token_ids`` token (kept in ``token_ids``, left out
of ``text``), cuts it at ``max_tokens``, refuses more log-probabilities than ``max_logprobs`` and
returns one ``RequestOutput`` per prompt, in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from transformers import AutoTokenizer

from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

# Engine arguments the real LLM forwards to EngineArgs through **kwargs (a subset); others are refused.
ENGINE_ARGS = {
    "enable_prefix_caching",
    "enforce_eager",
    "enable_chunked_prefill",
    "kv_cache_memory_bytes",
    "load_format",
    "max_model_len",
    "max_logprobs",
    "max_num_seqs",
    "max_num_batched_tokens",
    "pipeline_parallel_size",
    "distributed_executor_backend",
    "download_dir",
}


class Script(Protocol):
    """What a test's "model" does."""

    def reply(self, llm: LLM, prompt_token_ids: list[int], params: SamplingParams, index: int) -> list[int]:
        """The tokens sample ``index`` generates: ending with a stop token, or at least max_tokens long."""

    def next_logprobs(self, llm: LLM, token_ids: list[int]) -> dict[int, float]:
        """Log-probabilities of the tokens that may follow ``token_ids`` (others are less likely)."""


class _EngineCoreClient:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def shutdown(self) -> None:
        self.llm.shutdowns += 1
        LLM.events.append(("shutdown", self.llm.number))


class _LLMEngine:
    def __init__(self, llm: LLM) -> None:
        self.engine_core = _EngineCoreClient(llm)


class LLM:
    script: ClassVar[Script | None] = None
    # Every engine built, in order, and what happened to them: ("engine" | "generate" | "shutdown", number).
    instances: ClassVar[list[LLM]] = []
    events: ClassVar[list[tuple]] = []

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(
                f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}"
            )
        self.args = {
            "model": model,
            "tokenizer": tokenizer,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            **kwargs,
        }
        self.max_logprobs = kwargs.get("max_logprobs", 20)
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or model, trust_remote_code=trust_remote_code
        )
        self.llm_engine = _LLMEngine(self)
        # What tests check: each generate call as (prompts, sampling_params, use_tqdm), and shutdowns.
        self.calls: list[tuple[list, SamplingParams, bool]] = []
        self.shutdowns = 0
        self._requests = 0
        self.number = len(LLM.instances)
        LLM.instances.append(self)
        LLM.events.append(("engine", self.number))

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: int | Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if self.shutdowns:
            raise RuntimeError("EngineCore has been shut down")
        if self.script is None:
            raise RuntimeError("set LLM.script before generating with the vLLM stand-in")
        prompts = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        self.calls.append((prompts, params, use_tqdm))
        LLM.events.append(("generate", self.number))
        return [self._request(prompt, p) for prompt, p in zip(prompts, per_prompt, strict=True)]

    def _request(self, prompt: str | dict, params: SamplingParams) -> RequestOutput:
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(
                f"Requested sample logprobs of {params.logprobs}, which is greater than max allowed: "
                f"{self.max_logprobs}"
            )
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer(prompt)["input_ids"]
        else:
            text, ids = None, list(prompt["prompt_token_ids"])
        outputs = [self._sample(ids, params, index) for index in range(params.n)]
        request_id = str(self._requests)
        self._requests += 1
        return RequestOutput(request_id, text, ids, None, outputs, finished=True)

    def _sample(self, prompt_ids: list[int], params: SamplingParams, index: int) -> CompletionOutput:
        reply = list(self.script.reply(self, prompt_ids, params, index))
        stops = {self.tokenizer.eos_token_id, *params.stop_token_ids}
        limit = params.max_tokens or len(reply)
        end = next((k for k, token in enumerate(reply[:limit]) if token in stops), None)
        if end is not None:
            tokens, reason, stop_reason = reply[: end + 1], "stop", None
            if tokens[-1] != self.tokenizer.eos_token_id:
                stop_reason = tokens[-1]
        elif len(reply) >= limit:
            tokens, reason, stop_reason = reply[:limit], "length", None
        else:
            raise ValueError("a stand-in reply must end with a stop token or reach max_tokens")
        text = self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)
        logprobs = None
        if params.logprobs is not None:
            logprobs = [
                self._top(prompt_ids + tokens[:k], tokens[k], params.logprobs) for k in range(len(tokens))
            ]
        return CompletionOutput(index, text, tokens, None, logprobs, reason, stop_reason)

    def _top(self, context: list[int], sampled: int, k: int) -> dict[int, Logprob]:
        """The k likeliest next tokens, plus the sampled one, as the real engine returns them."""
        scores = self.script.next_logprobs(self, context)
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        chosen = {
            token: Logprob(logprob=value, rank=rank) for rank, (token, value) in enumerate(ranked[:k], 1)
        }
        if sampled in scores and sampled not in chosen:
            rank = 1 + next(r for r, (token, _) in enumerate(ranked) if token == sampled)
            chosen[sampled] = Logprob(logprob=scores[sampled], rank=rank)
        return chosen
