"""What every generation backend shares: the request and answer types, usage counts, the protocol.

Backends import this module, never the package ``metareward.generation`` (which imports them).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Protocol

Messages = list[dict]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    # "stop": the model ended its turn; "length": cut off at max_new_tokens.
    finish_reason: str
    # Tokens of the prompt it answered (None where a cached answer predates the count).
    prompt_tokens: int | None = None


@dataclass
class Usage:
    """What a generator has spent so far; the loop records the difference over each stage."""

    generate_calls: int = 0
    # Sampled completions asked for (requests x n), and how many came from a cache instead of the model.
    samples: int = 0
    cached_samples: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Texts whose next-token probabilities were read (score and verdict fallbacks).
    scored_texts: int = 0
    # Endpoint backends: HTTP tries, the requests they served (answers not found in a cache), the tries
    # beyond each request's first, and the seconds from each request's first try to its answer.
    http_requests: int = 0
    requests: int = 0
    retries: int = 0
    latencies_s: list[float] = field(default_factory=list)
    # US dollars, when the backend has prices (the OpenAI-compatible backend); else 0.
    cost_usd: float = 0.0

    def since(self, before: Usage) -> dict:
        """The counts spent between ``before`` (a copy taken earlier) and now, and the median and 95th
        percentile latency of the requests sent since (None when there were none)."""
        spent = self.minus(before)
        counts = asdict(spent)
        latencies = counts.pop("latencies_s")
        counts["latency_p50_s"] = percentile(latencies, 50)
        counts["latency_p95_s"] = percentile(latencies, 95)
        return counts

    def minus(self, before: Usage) -> Usage:
        """What was spent since ``before`` (a copy taken earlier), as a Usage of its own."""
        now, then = asdict(self), asdict(before)
        spent = {key: now[key] - then[key] for key in now if key != "latencies_s"}
        return Usage(**spent, latencies_s=self.latencies_s[len(before.latencies_s) :])

    def add(self, spent: Usage) -> None:
        """Count ``spent`` (another generator's, e.g. an engine replica's) in this one."""
        for key, value in asdict(spent).items():
            setattr(self, key, getattr(self, key) + value)

    def copy(self) -> Usage:
        return Usage(**asdict(self))


def percentile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile of ``values`` (linear between the closest ranks), rounded to 0.1 ms."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 4)


class Generator(Protocol):
    usage: Usage

    def render(self, messages: Messages) -> str:
        """The prompt text the model sees for ``messages`` (chat template, generation prompt added)."""

    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        """``params.n`` completions for each request, in request order; same seed, same outputs."""

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        """For each text, the probability that the model continues it with each candidate."""

    def close(self) -> None:
        """Release the model (and accelerator memory) before training starts."""


def reads_probabilities(generator: Generator) -> bool:
    """Whether ``generator`` can give next-token probabilities (an endpoint without a local tokenizer
    cannot); a backend says so with a ``reads_probabilities`` attribute, else it can."""
    return getattr(generator, "reads_probabilities", True)
