"""Typed configuration of a metareward run, and building it from Hydra overrides.

The dataclasses here are registered in Hydra's ConfigStore as the schema behind
``conf/config.yaml``; Hydra composes the YAML files on top of them, and :func:`to_config`
turns the result into these dataclasses, running every section's checks before any model
is loaded. Each default lives here, once: the YAML files set only what differs.
Code below the entry points only ever sees these dataclasses, never a ``DictConfig``.

A refused setting is named by its full dotted key as the user typed it: a section's
checks name its own fields, and :func:`to_config` prefixes them with the section's place
in the tree (``roles.meta_judge.generator.batch_size``, not ``generator.batch_size``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from metareward.judging.prompts import template_problem

# `accelerate launch` config files shipped with metareward (train.accelerate_config); not Hydra options.
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "accelerate_configs"
DEFAULT_ACCELERATE_CONFIG = ACCELERATE_CONFIGS / "deepspeed_zero3.yaml"

MODEL_KINDS = ("smollm2_135m", "hf", "tiny")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
GENERATOR_BACKENDS = ("hf", "vllm", "openai")
LAUNCHERS = ("inline", "accelerate")
# Where a run's engines and training processes run: this process and its machine, or a Ray cluster.
CLUSTER_KINDS = ("none", "ray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ON_NO_PAIRS = ("stop", "carry")
LONG_PROMPTS = ("skip", "truncate")
DATA_KINDS = ("bundled", "jsonl", "hf", "synthetic")
# What a guard alarm does: log a warning and go on, or end the run before the iteration trains.
ON_ALARM = ("warn", "stop")
TRACKING_MODES = ("wandb", "offline", "none")
SCORE_SOURCES = ("text", "text_or_expected")
# How a judge is asked about a preference pair: each response scored with the rubric, or both in one prompt.
EVAL_PROTOCOLS = ("pointwise", "pairwise")
SUITE_ENTRY_KEYS = ("path", "name", "format")
WINNER_SOURCES = ("text", "text_or_probs")
# What metareward-align-judge trains toward: the human label distribution, or its majority label.
ALIGN_OBJECTIVES = ("distribution", "point")
# How sure the local judge is of an answer (escalation.py defines each): pointwise judgements (the rubric
# judge's 0..5 scores) and pairwise verdicts (A or B) each have their own; random is the control.
POINTWISE_SIGNALS = ("margin", "entropy", "spread", "random")
PAIRWISE_SIGNALS = ("margin", "order", "random")


NO_VALUE = object()  # a refusal that names a key but no value (e.g. an unknown key)


class ConfigError(ValueError):
    """A setting has a value metareward cannot run with; the message names the setting.

    ``key`` is the setting's dotted key within the section that refused it (``batch_size``),
    ``where`` the section's place in the whole config (``roles.judge.generator.``)."""

    def __init__(self, key: str, value: Any = NO_VALUE, why: str = "", where: str = ""):
        self.key, self.value, self.why, self.where = key, value, why, where
        shown = f"{where}{key}" if value is NO_VALUE else f"{where}{key}={value!r}"
        super().__init__(f"{shown}: {why}")

    def at(self, where: str) -> ConfigError:
        """The same refusal, named from another place in the tree."""
        return ConfigError(self.key, self.value, self.why, where)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(key, value, why)


class Section:
    """A group of settings. ``check`` names its own fields; ``where`` is the section's usual place in
    :class:`Config`, used when the section is built directly (``GeneratorConfig(batch_size=0)``)."""

    where: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            self.check()
        except ConfigError as error:
            raise error.at(self.where) from None

    def check(self) -> None:
        pass


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    _require(temperature >= 0, "temperature", temperature, "must be >= 0")
    _require(0 < top_p <= 1, "top_p", top_p, "must be in (0, 1]")
    _require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "must be >= 1")


def _check_template(key: str, path: str | None, kind: str | None = None) -> None:
    """The file exists and, for a prompt template (``kind``: judge, meta_judge, pairwise), its
    placeholders are the ones that template is given, required ones included."""
    _require(not path or Path(path).is_file(), key, path, "no such file")
    if path and kind:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(key, path, "not UTF-8 text") from None
        except OSError as error:
            raise ConfigError(key, path, error.strerror or str(error)) from None
        problem = template_problem(text, kind)
        _require(problem is None, key, path, problem or "")


@dataclass
class ModelConfig(Section):
    """Which seed model M_0 is: the embedded SmolLM2, any Hugging Face model, or a tiny random one."""

    where: ClassVar[str] = "model."

    kind: str = "smollm2_135m"
    # For kind=hf: a local directory or a hub id (hub ids need network access).
    path: str | None = None
    # Generation dtype; auto: bf16 on GPUs and on CPUs that multiply bf16 natively (AVX512-BF16, AMX;
    # about 2x fp32 there), else fp32 (training's is train.dpo.precision).
    dtype: str = "auto"
    trust_remote_code: bool = False

    def check(self) -> None:
        _require(self.kind in MODEL_KINDS, "kind", self.kind, f"must be one of {MODEL_KINDS}")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        _require(
            self.kind != "hf" or bool(self.path), "path", self.path, "is required with kind=hf (model=hf)"
        )


@dataclass
class VLLMSettings(Section):
    """vLLM engine settings (``generator=vllm``, needs ``pip install metareward[vllm]`` and a GPU)."""

    where: ClassVar[str] = "generator.vllm."

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    # Empty: the model's own context length.
    max_model_len: int | None = None
    # The judge rubric and the meta-judge prompt are long shared prefixes; their KV cache is reused.
    enable_prefix_caching: bool = True
    # Log-probabilities returned per scored position; a score or verdict token outside them counts as 0.
    max_logprobs: int = 20

    def check(self) -> None:
        _require(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            self.tensor_parallel_size,
            "must be >= 1",
        )
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 16,
            "max_model_len",
            self.max_model_len,
            "must be >= 16",
        )
        _require(self.max_logprobs >= 1, "max_logprobs", self.max_logprobs, "must be >= 1")


@dataclass
class OpenAISettings(Section):
    """An OpenAI-compatible chat endpoint, or a pool of them (``generator=openai``)."""

    where: ClassVar[str] = "generator.openai."

    # One or more base URLs ending in /v1; requests are spread over them (e.g. a pool of vLLM servers).
    base_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    # The served model name; empty: model.path.
    model: str | None = None
    # The name of the environment variable holding the API key; the key itself is never stored.
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight per base URL; a vLLM server batches hundreds of sequences at once.
    max_in_flight: int = 64
    # Optional limits of a rate-limited API, over all base URLs together; requests are spaced evenly.
    # Tokens are estimated (prompt characters / 4 + max_new_tokens) until the server counts them.
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    # Tries after the first of a request that got a 429, a 5xx, a timeout or a dropped connection; the
    # client waits Retry-After, else 0.5 s doubling with each try (up to 8 s).
    max_retries: int = 6
    # After a 429 without Retry-After, the whole pool pauses this long, doubling while 429s go on.
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    # Answers are cached on disk (under the run directory) so a resumed run repeats no paid call.
    cache: bool = True
    # US dollars per million tokens; empty: cost is not reported.
    prompt_price_per_mtok: float | None = None
    completion_price_per_mtok: float | None = None

    def check(self) -> None:
        _require(bool(self.base_urls), "base_urls", self.base_urls, "needs at least one URL")
        for url in self.base_urls:
            _require(
                url.startswith(("http://", "https://")),
                "base_urls",
                url,
                "must start with http:// or https://",
            )
        _require(bool(self.api_key_env), "api_key_env", self.api_key_env, "must be a name")
        _require(self.max_in_flight >= 1, "max_in_flight", self.max_in_flight, "must be >= 1")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "must be > 0 (or null: no limit)")
        _require(self.max_retries >= 0, "max_retries", self.max_retries, "must be >= 0")
        _require(self.backoff_s >= 0, "backoff_s", self.backoff_s, "must be >= 0")
        _require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        for name in ("prompt_price_per_mtok", "completion_price_per_mtok"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name}", value, "must be >= 0")


@dataclass
class GeneratorConfig(Section):
    """The generation backend shared by the actor, judge and meta-judge."""

    where: ClassVar[str] = "generator."

    backend: str = "hf"
    # Sequences decoded together; the transformers backend sorts requests by length first.
    batch_size: int = 16
    # Forward passes batched together by the scoring call (probabilities of score/verdict tokens).
    score_batch_size: int = 8
    # Rows per chunk written to disk; a killed stage loses at most one chunk.
    chunk_size: int = 32
    device: str = "auto"
    progress: bool = True
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)

    def check(self) -> None:
        _require(
            self.backend in GENERATOR_BACKENDS,
            "backend",
            self.backend,
            f"must be one of {GENERATOR_BACKENDS}",
        )
        for name in ("batch_size", "score_batch_size", "chunk_size"):
            _require(getattr(self, name) >= 1, f"{name}", getattr(self, name), "must be >= 1")


@dataclass
class SynthesisConfig(Section):
    """Prompts written by the prompter (``roles.prompter``) from k-shot samples of a seed set
    (``data=synthetic``), as Self-Instruct (Wang et al. 2023) and Self-Rewarding (Yuan et al. 2024) do."""

    where: ClassVar[str] = "data.synthetic."

    # Prompts in runs/<name>/prompt_pool.jsonl, written once; iterations draw from it without reuse.
    pool_size: int = 256
    # Prompt rows in any shape data.path accepts; empty: the bundled Self-Instruct seed tasks.
    seed_path: str | None = None
    # Seed tasks shown in each request (Self-Instruct shows 8).
    num_shots: int = 8
    # Self-Instruct's sampling settings.
    temperature: float = 0.7
    top_p: float = 0.5
    max_new_tokens: int = 256
    # Length bounds in words (Self-Instruct keeps 4..150).
    min_words: int = 4
    max_words: int = 150
    # A task whose ROUGE-L F1 with a seed task or a pooled one is above this is a near-duplicate
    # (Self-Instruct: 0.7).
    max_rouge_l: float = 0.7
    # Requests allowed per pool prompt before synthesis gives up, saying what its filters left out.
    request_budget: float = 4.0

    def check(self) -> None:
        _require(self.pool_size >= 1, "pool_size", self.pool_size, "must be >= 1")
        _check_template("seed_path", self.seed_path)
        _require(self.num_shots >= 1, "num_shots", self.num_shots, "must be >= 1")
        _check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        _require(self.min_words >= 1, "min_words", self.min_words, "must be >= 1")
        _require(self.max_words >= self.min_words, "max_words", self.max_words, "must be >= min_words")
        _require(0 < self.max_rouge_l <= 1, "max_rouge_l", self.max_rouge_l, "must be in (0, 1]")
        _require(self.request_budget >= 1, "request_budget", self.request_budget, "must be >= 1")


@dataclass
class DataConfig(Section):
    """Where actor prompts come from: the bundled set, a JSONL file, a Hugging Face dataset, or a pool
    the prompter writes (``data=synthetic``)."""

    where: ClassVar[str] = "data."

    # bundled: the Self-Instruct seed tasks shipped with metareward; jsonl: `path`; hf: `hf_name`;
    # synthetic: a pool written from data.synthetic.seed_path (see data.synthetic).
    # A `path`, when given, is read whatever the kind (except hf and synthetic).
    kind: str = "bundled"
    # JSONL rows with `messages`, or `prompt` / `instruction` (+ optional `input`).
    path: str | None = None
    # A Hugging Face dataset name (needs network access).
    hf_name: str | None = None
    hf_split: str = "train"
    # Prompts drawn (without replacement while they last) for each iteration.
    prompts_per_iteration: int = 64
    # Prompt tokens allowed (chat template included); empty: the model's context minus the actor's
    # max_new_tokens. Longer prompts are skipped and counted, or truncated (keeping their start).
    max_prompt_tokens: int | None = None
    long_prompts: str = "skip"
    synthetic: SynthesisConfig = field(default_factory=SynthesisConfig)

    def check(self) -> None:
        _require(self.kind in DATA_KINDS, "kind", self.kind, f"must be one of {DATA_KINDS}")
        _require(self.kind != "jsonl" or bool(self.path), "path", self.path, "is required with data=jsonl")
        if self.path:
            _require(Path(self.path).is_file(), "path", self.path, "no such file")
        if self.kind == "hf":
            _require(bool(self.hf_name), "hf_name", self.hf_name, "is required with data=hf_dataset")
        _require(
            self.prompts_per_iteration >= 1,
            "prompts_per_iteration",
            self.prompts_per_iteration,
            "must be >= 1",
        )
        _require(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 8,
            "max_prompt_tokens",
            self.max_prompt_tokens,
            "must be >= 8",
        )
        _require(
            self.long_prompts in LONG_PROMPTS,
            "long_prompts",
            self.long_prompts,
            f"one of {LONG_PROMPTS}",
        )


@dataclass
class ModelSpec(Section):
    """A model and the backend that serves it, e.g. a GPT-4-class endpoint:
    ``generator.backend=openai generator.openai.base_urls=[URL] generator.openai.model=NAME``."""

    where: ClassVar[str] = "<role>."

    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class EscalationConfig(Section):
    """Hand what the local judge is least sure of to a stronger judge (``.judge``), whose answer then
    replaces the local one (escalation.py). The budget is ``fraction`` (the least-confident share of
    the stage's items) or ``threshold`` (every item whose confidence is below it); set one, the other
    null. An item without the signal's inputs (no distribution behind an API) is escalated first."""

    where: ClassVar[str] = "<stage>.escalation."

    enabled: bool = False
    # The stronger judge; it answers in text (its score or verdict is parsed, never read from probabilities).
    judge: ModelSpec = field(default_factory=ModelSpec)
    # pointwise (judge stage, eval pointwise): margin, entropy, spread, random; pairwise (meta-judge stage,
    # eval pairwise): margin, order, random.
    signal: str = "margin"
    fraction: float | None = 0.2
    threshold: float | None = None

    def check(self) -> None:
        signals = POINTWISE_SIGNALS + PAIRWISE_SIGNALS
        _require(self.signal in signals, "signal", self.signal, f"one of {tuple(dict.fromkeys(signals))}")
        _require(
            (self.fraction is None) != (self.threshold is None),
            "threshold" if self.threshold is not None else "fraction",
            self.threshold if self.threshold is not None else self.fraction,
            "set exactly one budget: fraction (e.g. 0.2) or threshold (with fraction=null)",
        )
        for name in ("fraction", "threshold"):
            value = getattr(self, name)
            _require(value is None or 0 <= value <= 1, name, value, "must be in [0, 1]")

    def check_signal(self, allowed: tuple[str, ...], judgements: int, what: str) -> None:
        """Refuse a signal the stage's answers cannot give (``what`` names them); ``spread`` needs two
        or more sampled scores per item."""
        _require(self.signal in allowed, "escalation.signal", self.signal, f"{what} allow {allowed}")
        _require(
            self.signal != "spread" or judgements >= 2,
            "escalation.signal",
            self.signal,
            f"spread needs 2 or more judgements per response (num_judgements={judgements})",
        )


@dataclass
class EvalEscalationConfig(EscalationConfig):
    """Escalation in evaluation: the local and the strong judge answer every pair, and the cascade curve
    says what accuracy and cost each escalated fraction gives; the budget is the operating point."""

    where: ClassVar[str] = "eval.escalation."

    # Fractions 0, 1/(points-1), ..., 1 reported on the curve.
    curve_points: int = 11

    def check(self) -> None:
        super().check()
        _require(self.curve_points >= 2, "curve_points", self.curve_points, "must be >= 2")


@dataclass
class ActorConfig(Section):
    where: ClassVar[str] = "actor."
    num_responses: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512

    def check(self) -> None:
        _require(self.num_responses >= 2, "num_responses", self.num_responses, "must be >= 2")
        _check_sampling(self.temperature, self.top_p, self.max_new_tokens)


@dataclass
class JudgeConfig(Section):
    where: ClassVar[str] = "judge."
    num_judgements: int = 3
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    # text: a score only when the judge wrote one (the paper's rule); text_or_expected: otherwise
    # the expectation of 0..5 under the model's probabilities after "Score: ".
    score_from: str = "text"
    # Optional path to a str.format template replacing the built-in rubric prompt (fields: {question},
    # {response}, both required, and {rubric}; a literal brace is written {{ or }}).
    template: str | None = None
    # The judge stage's items are responses (N judgements each); escalated ones are judged N times by
    # escalation.judge instead.
    escalation: EscalationConfig = field(default_factory=EscalationConfig)

    def check(self) -> None:
        _require(self.num_judgements >= 1, "num_judgements", self.num_judgements, "must be >= 1")
        _check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        _require(self.score_from in SCORE_SOURCES, "score_from", self.score_from, f"one of {SCORE_SOURCES}")
        _check_template("template", self.template, "judge")
        self.escalation.check_signal(POINTWISE_SIGNALS, self.num_judgements, "the judge's scores")


@dataclass
class MetaJudgeConfig(Section):
    where: ClassVar[str] = "meta_judge."
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    # text: a verdict only when the meta-judge wrote one; text_or_probs: otherwise "A" or "B" drawn from
    # the model's probabilities after "Winner: Judgement" at this temperature (the likelier at 0).
    winner_from: str = "text"
    # Optional path to a str.format template (fields: {question}, {response}, {rubric},
    # {judgement_a}, {judgement_b}; the last two and {response} required; literal braces {{ }}).
    template: str | None = None
    # The meta-judge stage's items are comparisons of two judgements (both orders); escalated ones are
    # answered, in both orders, by escalation.judge instead.
    escalation: EscalationConfig = field(default_factory=EscalationConfig)

    def check(self) -> None:
        _check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        _require(
            self.winner_from in WINNER_SOURCES,
            "winner_from",
            self.winner_from,
            f"one of {WINNER_SOURCES}",
        )
        _check_template("template", self.template, "meta_judge")
        self.escalation.check_signal(PAIRWISE_SIGNALS, 2, "the meta-judge's verdicts")


@dataclass
class PairsConfig(Section):
    where: ClassVar[str] = "pairs."
    # Length-control strength in [0, 0.5): a number, or one number per iteration (the last repeats).
    rho: Any = 0.0
    # L2 strength of the Elo (Bradley-Terry) fit over judgements.
    elo_l2: float = 0.01
    # Options, off by default (the paper's rules); pairs.py says what each does and where it comes from.
    # A judgement with more num_tokens is unusable, as a cut-off one is.
    max_judgement_tokens: int | None = None
    # A comparison of two judgements counts only when its two orders name the same winner.
    consistent_verdicts_only: bool = False
    # Actor pairs use only responses that finished (finish_reason "stop").
    exclude_cut_off_responses: bool = False
    # No chosen score value holds more than this share of an iteration's judge pairs (NeMo-Aligner: 0.4).
    judge_chosen_score_cap: float | None = None

    def check(self) -> None:
        values = list(self.rho) if isinstance(self.rho, list | tuple) else [self.rho]
        _require(bool(values), "rho", self.rho, "needs at least one value")
        for value in values:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 0.5
            _require(ok, "rho", self.rho, "every value must be a number in [0, 0.5)")
        _require(self.elo_l2 > 0, "elo_l2", self.elo_l2, "must be > 0")
        tokens = self.max_judgement_tokens
        _require(tokens is None or tokens >= 1, "max_judgement_tokens", tokens, "must be >= 1")
        cap = self.judge_chosen_score_cap
        _require(cap is None or 0 < cap <= 1, "judge_chosen_score_cap", cap, "must be in (0, 1]")

    def rho_for(self, iteration: int) -> float:
        """The rho of 1-based ``iteration``; a list's last value repeats."""
        values = list(self.rho) if isinstance(self.rho, list | tuple) else [self.rho]
        return float(values[min(iteration, len(values)) - 1])


@dataclass
class FineTuning(Section):
    """What DPO (``train.dpo``) and judge alignment (``align``) share: optimiser steps, batches,
    precision, LoRA. Each subclass gives its own learning rate and length."""

    learning_rate: float = 5e-7
    num_epochs: float = 1.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    # fp32 master weights always; bf16 autocasts the compute. auto: bf16 where the device multiplies
    # bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def check(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _require(self.num_epochs > 0, "num_epochs", self.num_epochs, "must be > 0")
        for name in ("batch_size", "gradient_accumulation_steps", "lora_r"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.max_length >= 16, "max_length", self.max_length, "must be >= 16")
        _require(self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}")


@dataclass
class DPOSettings(FineTuning):
    """Our DPO settings; ``training.py`` turns them into ``trl.DPOConfig``."""

    where: ClassVar[str] = "train.dpo."

    beta: float = 0.1
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    precompute_ref_log_probs: bool = False
    gradient_checkpointing: bool = False

    def check(self) -> None:
        super().check()
        _require(self.beta > 0, "beta", self.beta, "must be > 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")


@dataclass
class TrainConfig(Section):
    where: ClassVar[str] = "train."
    # Iterations whose DPO data also holds the judge pairs (the paper: 1 and 2).
    judge_iterations: list[int] = field(default_factory=lambda: [1, 2])
    dpo: DPOSettings = field(default_factory=DPOSettings)
    # inline: train in this process; accelerate: `accelerate launch --config_file <accelerate_config>`
    # (multi-GPU, DeepSpeed ZeRO-3 with the shipped accelerate_configs/deepspeed_zero3.yaml).
    launcher: str = "inline"
    # Empty: metareward/accelerate_configs/deepspeed_zero3.yaml from the installed package.
    accelerate_config: str | None = None
    # When an iteration yields no preference pairs: stop the run (saying why), or carry M_{t-1}
    # forward unchanged as M_t and go on.
    on_no_pairs: str = "stop"

    def check(self) -> None:
        for value in self.judge_iterations:
            _require(value >= 1, "judge_iterations", self.judge_iterations, "iterations count from 1")
        _require(self.launcher in LAUNCHERS, "launcher", self.launcher, f"must be one of {LAUNCHERS}")
        _check_template("accelerate_config", self.accelerate_config)
        _require(self.on_no_pairs in ON_NO_PAIRS, "on_no_pairs", self.on_no_pairs, f"one of {ON_NO_PAIRS}")


@dataclass
class RoleModelConfig(ModelSpec):
    """A fixed model for one role instead of the model being trained, e.g. a stronger meta-judge
    behind an API: ``roles.meta_judge.own_model=true roles.meta_judge.generator.backend=openai``."""

    where: ClassVar[str] = "roles.<role>."

    # false (the paper): the role is played by M_{t-1} through the run's `generator` (for
    # eval.evaluator: by the seed model M_0).
    own_model: bool = False


@dataclass
class RolesConfig(Section):
    """Which model plays each role; by default M_{t-1} plays all three (the paper)."""

    where: ClassVar[str] = "roles."

    actor: RoleModelConfig = field(default_factory=RoleModelConfig)
    judge: RoleModelConfig = field(default_factory=RoleModelConfig)
    meta_judge: RoleModelConfig = field(default_factory=RoleModelConfig)
    # Writes the prompt pool of data=synthetic; own_model=false: the seed model M_0.
    prompter: RoleModelConfig = field(default_factory=RoleModelConfig)


@dataclass
class GuardsConfig(Section):
    """Alarms for the ways self-rewarding runs are known to fail, checked each iteration before it trains
    (guards.py). A threshold left empty turns its guard off; ``guards.*`` may change on resume."""

    where: ClassVar[str] = "guards."

    # Score saturation: the share of scored judgements at the top of the scale (5) is above this.
    max_top_score_share: float | None = 0.9
    # Length drift: mean response or judgement tokens grew by more than this share over the previous
    # iteration (0.5: by more than half).
    max_length_growth: float | None = 0.5
    # The share of judge scores, or of meta-judge verdicts, not parsed from the text is above this.
    max_parse_failure_rate: float | None = 0.5
    # Position bias: the meta-judge's first (or second) position wins more than this share of verdicts.
    max_position_win_share: float | None = 0.8
    # warn: log the alarm and go on; stop: end the run, saying why, before the iteration trains.
    on_alarm: str = "warn"

    def check(self) -> None:
        shares = ("max_top_score_share", "max_parse_failure_rate")
        for name in shares:
            value = getattr(self, name)
            _require(value is None or 0 <= value <= 1, name, value, "must be in [0, 1]")
        growth = self.max_length_growth
        _require(growth is None or growth >= 0, "max_length_growth", growth, "must be >= 0")
        position = self.max_position_win_share
        ok = position is None or 0.5 <= position <= 1
        _require(ok, "max_position_win_share", position, "must be in [0.5, 1]")
        _require(self.on_alarm in ON_ALARM, "on_alarm", self.on_alarm, f"one of {ON_ALARM}")


@dataclass
class TrackingConfig(Section):
    """Where numbers go besides metrics.json: W&B online, W&B offline (in the run directory), or nowhere."""

    where: ClassVar[str] = "tracking."

    # wandb: online (needs `wandb login`); offline: a W&B offline run under <run_dir>/wandb, syncable
    # later with `wandb sync`; none: metrics.json only.
    mode: str = "offline"
    project: str = "metareward"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    # Rows of sample actor and judge pairs logged as W&B Tables each iteration.
    table_rows: int = 8

    def check(self) -> None:
        _require(self.mode in TRACKING_MODES, "mode", self.mode, f"must be one of {TRACKING_MODES}")
        _require(self.table_rows >= 0, "table_rows", self.table_rows, "must be >= 0")


@dataclass
class EvalConfig(Section):
    """Judge skill on human-labelled preference suites, and the actor's win rate against M_0."""

    where: ClassVar[str] = "eval."

    # Run before iteration 1 (on M_0) and after each iteration (on M_t).
    enabled: bool = True
    num_pairs: int = 64
    # Judgements per response; a response's score is their mean (judge.score_from applies).
    num_judgements: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    bootstrap_samples: int = 1000
    seed: int = 0
    # Actor win rate of M_t against M_0 on held-out prompts, judged pairwise in both orders.
    win_rate: bool = True
    # JSONL prompts (any shape data.path accepts, or Vicuna/MT-Bench `turns`); empty: bundled Vicuna-bench.
    heldout_prompts: str | None = None
    num_heldout: int = 16
    response_max_new_tokens: int = 256
    # Preference suites the judge is measured on (metareward-eval-judge): bundled suites (hh_rlhf,
    # llmbar_natural, pandalm), JSONL files in any suite format, or {path, name, format} entries;
    # num_pairs pairs of each (a seeded sample).
    suites: list[Any] = field(default_factory=lambda: ["hh_rlhf"])
    # pointwise: the rubric judge scores each response (num_judgements samples, judge.score_from), the
    # higher mean wins; pairwise: one prompt shows both responses, judged in both orders.
    protocols: list[str] = field(default_factory=lambda: ["pointwise"])
    # Where a pairwise verdict comes from: text ("Winner: Response A|B"), or text_or_probs (otherwise the
    # probabilities of A/B after "Winner: Response ", read for every verdict, for calibration).
    winner_from: str = "text"
    # Optional path to a str.format template replacing the built-in pairwise judge prompt (fields:
    # {question}, {response_a}, {response_b}); it should end asking for "Winner: Response A|B".
    pairwise_template: str | None = None
    # The suite and protocol ("<suite>/<protocol>") whose accuracy names the best iteration (summary,
    # runs/<name>/best.json); empty: the first suite under the first protocol.
    select_by: str | None = None
    # The fixed evaluator of win rates: M_0 (the seed model), or with own_model=true any model and
    # backend, e.g. eval.evaluator.own_model=true eval.evaluator.model.kind=hf eval.evaluator.model.path=...
    evaluator: RoleModelConfig = field(default_factory=RoleModelConfig)
    # The cascade of the judge with a stronger one, per suite and protocol (escalation.py).
    escalation: EvalEscalationConfig = field(default_factory=EvalEscalationConfig)

    def check(self) -> None:
        counts = ("num_pairs", "num_judgements", "max_new_tokens", "num_heldout", "response_max_new_tokens")
        for name in counts:
            _require(getattr(self, name) >= 1, f"{name}", getattr(self, name), "must be >= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _require(self.bootstrap_samples >= 10, "bootstrap_samples", self.bootstrap_samples, ">= 10")
        path = self.heldout_prompts
        _require(not path or Path(path).is_file(), "heldout_prompts", path, "no such file")
        _check_template("pairwise_template", self.pairwise_template, "pairwise")
        _require(bool(self.suites), "suites", self.suites, "needs at least one suite")
        for entry in self.suites:
            ok = isinstance(entry, str) or (
                isinstance(entry, dict) and "path" in entry and set(entry) <= set(SUITE_ENTRY_KEYS)
            )
            _require(ok, "suites", entry, "a bundled suite name, a JSONL path, or {path, name, format}")
        _require(bool(self.protocols), "protocols", self.protocols, f"one or more of {EVAL_PROTOCOLS}")
        for protocol in self.protocols:
            _require(protocol in EVAL_PROTOCOLS, "protocols", protocol, f"one of {EVAL_PROTOCOLS}")
        _require(
            self.winner_from in WINNER_SOURCES, "winner_from", self.winner_from, f"one of {WINNER_SOURCES}"
        )
        if "pointwise" in self.protocols:
            self.escalation.check_signal(POINTWISE_SIGNALS, self.num_judgements, "pointwise judgements")
        if "pairwise" in self.protocols:
            self.escalation.check_signal(PAIRWISE_SIGNALS, 2, "pairwise verdicts")


@dataclass
class AlignConfig(FineTuning):
    """Training a judge toward the spread of human labels (``metareward-align-judge``, and the EFT step
    before iteration 1 with ``judge_alignment.enabled``); alignment.py says what each objective is."""

    where: ClassVar[str] = "align."

    # Human evaluation rows: a bundled suite (pandalm, llmbar_natural, hh_rlhf) or a JSONL file of
    # pairwise, pointwise or generic rows (align_data.py).
    train: str = "pandalm"
    # Held-out rows (the same kinds); empty: hold out `heldout_fraction` of train's prompts.
    heldout: str | None = None
    heldout_fraction: float = 0.2
    # distribution: KL(human || model) against the worst target within adversarial_epsilon (total
    # variation) of the human one, + ce_weight * CE(majority); point: CE(majority) alone.
    objective: str = "distribution"
    ce_weight: float = 0.1
    adversarial_epsilon: float = 0.05
    # The settings shared with train.dpo (FineTuning), with a judge's learning rate; items with more
    # tokens than max_length (prompt and cue) are left out of training and evaluation, and counted.
    learning_rate: float = 1e-5
    max_length: int = 2048
    seed: int = 0
    # A checkpoint every this many optimiser steps: a killed alignment resumes from the last one.
    save_steps: int = 20
    eval_batch_size: int = 8
    progress: bool = True
    # Where the aligned model is saved; empty: runs/<run_name>/align/model.
    model_dir: str | None = None

    def check(self) -> None:
        super().check()
        _require(bool(self.train), "train", self.train, "must name a bundled suite or a file")
        _require(
            0 <= self.heldout_fraction < 1, "heldout_fraction", self.heldout_fraction, "must be in [0, 1)"
        )
        _require(
            self.heldout is not None or self.heldout_fraction > 0,
            "heldout_fraction",
            self.heldout_fraction,
            "must be > 0 when align.heldout is not set (held-out rows are what the judge is measured on)",
        )
        _require(
            self.objective in ALIGN_OBJECTIVES, "objective", self.objective, f"one of {ALIGN_OBJECTIVES}"
        )
        _require(self.ce_weight >= 0, "ce_weight", self.ce_weight, "must be >= 0")
        _require(
            0 <= self.adversarial_epsilon <= 1,
            "adversarial_epsilon",
            self.adversarial_epsilon,
            "must be in [0, 1] (a total-variation radius)",
        )
        for name in ("save_steps", "eval_batch_size"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


@dataclass
class JudgeAlignmentConfig(Section):
    """The EFT step: align the seed as a judge (``align.*``) once, before iteration 1; the aligned
    model is then M_0 for every role."""

    where: ClassVar[str] = "judge_alignment."

    enabled: bool = False


@dataclass
class ClusterConfig(Section):
    """``cluster=ray``: the run's generation engines are Ray actors and its training a Ray Train job, on a
    Ray cluster (``pip install metareward[ray]``; cluster.py). The loop stays the one process writing
    the run directory, so ``runs_dir`` must be on storage every node sees."""

    where: ClassVar[str] = "cluster."

    kind: str = "none"
    # A running cluster ("auto": the one `ray start` made on this node; "ray://HEAD:10001": a remote
    # one); empty: start a local one inside this process.
    address: str | None = None
    # A local cluster's CPUs; empty: this machine's.
    local_cpus: int | None = None
    # Engines per iteration for each model that generates (M_{t-1}, and each role on a model of its own);
    # a stage's chunks are dealt to them.
    replicas: int = 1
    cpus_per_replica: float = 1.0
    # Empty: generator.vllm.tensor_parallel_size with generator=vllm, else none (the transformers
    # backend then runs on CPU).
    gpus_per_replica: int | None = None
    # How the engines' placement group spreads them over nodes (Ray's strategies).
    placement_strategy: str = "PACK"
    # How long to wait for the cluster to have room for the engines before saying it has not.
    placement_timeout_s: float = 600.0
    # Engines lost during one stage (a dead node, an out-of-memory kill) that are replaced before the
    # stage gives up; a lost engine's chunk is made again on its replacement.
    max_restarts: int = 3
    # Ray Train workers for DPO and the judge-alignment step (one process each, DDP or DeepSpeed as
    # train.accelerate_config says); gpus_per_worker empty: 1 when the cluster has GPUs, else 0 (gloo).
    train_workers: int = 1
    train_cpus_per_worker: float = 1.0
    train_gpus_per_worker: int | None = None

    def check(self) -> None:
        _require(self.kind in CLUSTER_KINDS, "kind", self.kind, f"one of {CLUSTER_KINDS} (cluster=ray)")
        _require(
            self.kind != "ray" or importlib.util.find_spec("ray") is not None,
            "kind",
            self.kind,
            "needs Ray, which is not installed: pip install 'metareward[ray]'",
        )
        for name in ("replicas", "train_workers"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.max_restarts >= 0, "max_restarts", self.max_restarts, "must be >= 0")
        for name in ("cpus_per_replica", "train_cpus_per_worker", "placement_timeout_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        for name in ("gpus_per_replica", "train_gpus_per_worker", "local_cpus"):
            value = getattr(self, name)
            _require(value is None or value >= 0, name, value, "must be >= 0 (or null: chosen for you)")
        _require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            self.placement_strategy,
            f"one of {PLACEMENT_STRATEGIES}",
        )


@dataclass
class Config(Section):
    """A whole run. ``metareward --cfg job`` prints it resolved."""

    where: ClassVar[str] = ""

    run_name: str = "default"
    runs_dir: str = "runs"
    iterations: int = 2
    seed: int = 0
    # Resuming with a config that differs from the run's config.yaml is refused unless this is true.
    allow_config_change: bool = False
    # Load no model; print per iteration and stage the generation calls and a bound on generated tokens.
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    meta_judge: MetaJudgeConfig = field(default_factory=MetaJudgeConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    judge_alignment: JudgeAlignmentConfig = field(default_factory=JudgeAlignmentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def check(self) -> None:
        _require(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        _require(
            self.cluster.kind != "ray" or self.train.launcher == "inline",
            "train.launcher",
            self.train.launcher,
            "with cluster=ray training is a Ray Train job on cluster.train_workers; leave train.launcher "
            "inline (accelerate is for one machine without Ray)",
        )
        _require(bool(self.run_name) and "/" not in self.run_name, "run_name", self.run_name, "a plain name")


def register_configs() -> None:
    """Make the schema available to Hydra as ``metareward_schema`` (used by conf/config.yaml)."""
    ConfigStore.instance().store(name="metareward_schema", node=Config)


def _build(cls: type, values: dict, where: str):
    """``cls`` from plain ``values``, sections inside it first, each refusal named at its place."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            value = _build(hints[f.name], value, f"{where}{f.name}.")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.at(where) from None


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed Hydra config into :class:`Config`, validating every setting.

    Raises :class:`ConfigError` naming the setting by its full key; no model is loaded here.
    """
    if "hydra" in cfg:  # a callback's view: Hydra's own node holds values only set once the job runs
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    try:
        # Merging onto the schema checks every key and type (OmegaConf names the full key).
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=True))
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        message = getattr(error, "msg", None) or str(error)
        raise ConfigError(key, why=message.splitlines()[0]) from None
    return _build(Config, values, "")


def load_config(run_config: Path | None, overrides: list[str]) -> Config:
    """The defaults (or a run's saved ``config.yaml``) with ``key=value`` overrides, validated.

    For the commands that are not Hydra apps (``metareward-pairs``, ``metareward-eval-judge``) and
    for scripts and tests; raises :class:`ConfigError` naming the setting."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_configs()
    try:
        if run_config is not None and run_config.is_file():
            base = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_config))
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        else:
            with initialize_config_module("metareward.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
    except (OmegaConfBaseException, HydraException) as error:
        raise override_error(error) from None
    return to_config(cfg)


def override_error(error: Exception) -> ConfigError:
    """One line for an override Hydra or OmegaConf refused: the key as typed and why."""
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None) or getattr(error, "full_key", None)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    why = next(
        (line for line in lines if not line.startswith(("full_key:", "object_type=", "Could not"))), ""
    )
    if key is None and "Could not find '" in str(cause):  # a group option that does not exist
        group, option = str(cause).split("Could not find '", 1)[1].split("'", 1)[0].rsplit("/", 1)
        options = [line for line in lines if not line.endswith(":") and " " not in line]
        return ConfigError(
            group, option, "no such option" + (f" (options: {', '.join(options)})" if options else "")
        )
    if getattr(error, "override", None):  # a malformed override, e.g. an unclosed bracket
        return ConfigError(error.override, why=f"not a valid override ({lines[0] if lines else 'syntax'})")
    if key is None:  # anything else: Hydra's first line says what
        key, why = "override", lines[0] if lines else type(error).__name__
    if re.search(r"Key '[^']*' (is )?not in", why):
        why = "no such setting"
    return ConfigError(key, why=why)
