"""Generation backends behind one small protocol.

A :class:`Generator` turns chat requests into sampled completions and reads the
probabilities of chosen next tokens (the judge's score digit, the meta-judge's A/B).
``make_generator`` picks the backend named by ``generator.backend``; heavy engines are
imported only inside their own module.
"""

from __future__ import annotations

from pathlib import Path

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation.base import (
    Completion,
    Generator,
    Messages,
    SamplingParams,
    Usage,
    reads_probabilities,
)

__all__ = [
    "Completion",
    "Generator",
    "Messages",
    "SamplingParams",
    "Usage",
    "make_generator",
    "reads_probabilities",
]


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
