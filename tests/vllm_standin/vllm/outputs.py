"""Stand-in for ``vllm.outputs``: one request's result and its ``n`` completions."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logprobs import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    # Ends with the stop token when generation stopped on one (the text leaves special tokens out).
    token_ids: list[int]
    cumulative_logprob: float | None
    # Per generated position, token id -> Logprob for the top `SamplingParams.logprobs` tokens.
    logprobs: list[dict[int, Logprob]] | None
    # "stop" (end-of-sequence or a stop token), "length" (max_tokens), or None while unfinished.
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: list | None,
        outputs: list[CompletionOutput],
        finished: bool,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
