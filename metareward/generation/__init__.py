"""Generation backends behind one small protocol.

A :class:`Generator` turns chat requests into sampled completions and reads the
probabilities of chosen next tokens (the judge's score digit, the meta-judge's A/B).
``make_generator`` picks the backend named by ``generator.backend``; heavy engines are
imported only inside their own module.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class Generator(Protocol):
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


def make_generator(model_dir: str, model: ModelConfig, settings: GeneratorConfig) -> Generator:
    if settings.backend == "hf":
        from metareward.generation.hf import HFGenerator

        return HFGenerator(model_dir, model, settings)
    raise ValueError(f"generator.backend={settings.backend!r} is not available")
