"""Stand-in for ``vllm.logprobs``: one token's log-probability, as the real dataclass."""

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
