"""Generation backends behind one small protocol.

A :class:`Generator` turns chat requests into sampled completions and reads the
probabilities of chosen next tokens (the judge's score digit, the meta-judge's A/B).
``make_generator`` picks the backend named by ``generator.backend``; heavy engines are
imported only inside their own module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from metareward.config import GeneratorConfig, ModelConfig

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
    http_requests: int = 0
    # US dollars, when the backend has prices (the OpenAI-compatible backend); else 0.
    cost_usd: float = 0.0

    def since(self, before: Usage) -> dict:
        """The counts spent between ``before`` (a copy taken earlier) and now."""
        now, then = asdict(self), asdict(before)
        return {key: now[key] - then[key] for key in now}

    def copy(self) -> Usage:
        return Usage(**asdict(self))


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


def make_generator(
    model_dir: str, model: ModelConfig, settings: GeneratorConfig, cache_dir: Path | None = None
) -> Generator:
    """The backend ``settings.backend`` serving ``model_dir``; ``cache_dir`` (in the run directory) holds
    answers a backend keeps on disk so that a resumed run pays for no call twice."""
    if settings.backend == "hf":
        from metareward.generation.hf import HFGenerator

        return HFGenerator(model_dir, model, settings)
    if settings.backend == "vllm":
        from metareward.generation.vllm import VLLMGenerator

        return VLLMGenerator(model_dir, model, settings)
    if settings.backend == "openai":
        from metareward.generation.openai import OpenAIGenerator

        return OpenAIGenerator(model_dir, model, settings, cache_dir=cache_dir)
    raise ValueError(f"generator.backend={settings.backend!r} is not available")
