"""Where the actor's prompts come from (``data``), including the pool the prompter writes
(``data=synthetic``, settings under ``data.synthetic``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metareward.config.checks import Section, require, setting
from metareward.config.choices import DATA_KINDS, LONG_PROMPTS
from metareward.config.stages import Sampling


@dataclass
class SynthesisConfig(Sampling):
    """Prompts written by the prompter (``roles.prompter``) from k-shot samples of a seed set
    (``data=synthetic``), as Self-Instruct (Wang et al. 2023) and Self-Rewarding (Yuan et al. 2024) do."""

    # Self-Instruct's sampling settings.
    temperature: float = 0.7
    top_p: float = 0.5
    max_new_tokens: int = 256
    # Prompts in runs/<name>/prompt_pool.jsonl, written once; iterations draw from it without reuse.
    pool_size: int = setting(256, ">= 1")
    # Prompt rows in any shape data.path accepts; empty: the bundled Self-Instruct seed tasks.
    seed_path: str | None = setting(None, file=True)
    # Seed tasks shown in each request (Self-Instruct shows 8).
    num_shots: int = setting(8, ">= 1")
    # Length bounds in words (Self-Instruct keeps 4..150).
    min_words: int = setting(4, ">= 1")
    max_words: int = 150
    # A task whose ROUGE-L F1 with a seed task or a pooled one is above this is a near-duplicate
    # (Self-Instruct: 0.7).
    max_rouge_l: float = setting(0.7, "(0, 1]")
    # Requests allowed per pool prompt before synthesis gives up, saying what its filters left out.
    request_budget: float = setting(4.0, ">= 1")

    def check(self) -> None:
        require(self.max_words >= self.min_words, "max_words", self.max_words, "must be >= min_words")


@dataclass
class DataConfig(Section):
    """Where actor prompts come from: the bundled set, a JSONL file, a Hugging Face dataset, or a pool
    the prompter writes (``data=synthetic``)."""

    # bundled: the Self-Instruct seed tasks shipped with metareward; jsonl: `path`; hf: `hf_name`;
    # synthetic: a pool written from data.synthetic.seed_path (see data.synthetic).
    # A `path`, when given, is read whatever the kind (except hf and synthetic).
    kind: str = setting("bundled", DATA_KINDS, says="must be one of")
    # JSONL rows with `messages`, or `prompt` / `instruction` (+ optional `input`).
    path: str | None = setting(None, file=True)
    # A Hugging Face dataset name (needs network access).
    hf_name: str | None = None
    hf_split: str = "train"
    # Prompts drawn (without replacement while they last) for each iteration.
    prompts_per_iteration: int = setting(64, ">= 1")
    # Prompt tokens allowed (chat template included); empty: the model's context minus the actor's
    # max_new_tokens. Longer prompts are skipped and counted, or truncated (keeping their start).
    max_prompt_tokens: int | None = setting(None, ">= 8")
    long_prompts: str = setting("skip", LONG_PROMPTS)
    synthetic: SynthesisConfig = field(default_factory=SynthesisConfig)

    def check(self) -> None:
        require(self.kind != "jsonl" or bool(self.path), "path", self.path, "is required with data=jsonl")
        if self.kind == "hf":
            require(bool(self.hf_name), "hf_name", self.hf_name, "is required with data=hf_dataset")
