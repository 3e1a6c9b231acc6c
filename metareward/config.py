"""Typed configuration of a metareward run.

The dataclasses here are registered in Hydra's ConfigStore as the schema behind
``conf/config.yaml``; Hydra composes the YAML files on top of them, and
:func:`to_config` turns the result into these dataclasses, running every
``__post_init__`` check before any model is loaded. Code below the entry points
only ever sees these dataclasses, never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

MODEL_KINDS = ("smollm2_135m", "hf", "tiny")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
GENERATOR_BACKENDS = ("hf", "vllm", "openai")
LAUNCHERS = ("inline", "accelerate")
ON_NO_PAIRS = ("stop", "carry")
LONG_PROMPTS = ("skip", "truncate")
DATA_KINDS = ("bundled", "jsonl", "hf")
TRACKING_MODES = ("wandb", "offline", "none")
SCORE_SOURCES = ("text", "text_or_expected")
WINNER_SOURCES = ("text", "text_or_probs")


class ConfigError(ValueError):
    """A setting has a value metareward cannot run with; the message names the setting."""


def _require(ok: bool, setting: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}={value!r}: {why}")


def _check_sampling(prefix: str, temperature: float, top_p: float, max_new_tokens: int) -> None:
    _require(temperature >= 0, f"{prefix}.temperature", temperature, "must be >= 0")
    _require(0 < top_p <= 1, f"{prefix}.top_p", top_p, "must be in (0, 1]")
    _require(max_new_tokens >= 1, f"{prefix}.max_new_tokens", max_new_tokens, "must be >= 1")


def _check_template(setting: str, path: str | None) -> None:
    _require(not path or Path(path).is_file(), setting, path, "no such file")


@dataclass
class ModelConfig:
    """Which seed model M_0 is: the embedded SmolLM2, any Hugging Face model, or a tiny random one."""

    kind: str = "smollm2_135m"
    # For kind=hf: a local directory or a hub id (hub ids need network access).
    path: str | None = None
    # Generation dtype; auto: bf16 on GPUs and on CPUs with native bf16, else fp32 (training's is
    # train.dpo.precision).
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in MODEL_KINDS, "model.kind", self.kind, f"must be one of {MODEL_KINDS}")
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, f"must be one of {DTYPES}")
        _require(self.kind != "hf" or bool(self.path), "model.path", self.path, "is required with model=hf")


@dataclass
class VLLMSettings:
    """vLLM engine settings (``generator=vllm``, needs ``pip install metareward[vllm]`` and a GPU)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    # Empty: the model's own context length.
    max_model_len: int | None = None
    # The judge rubric and the meta-judge prompt are long shared prefixes; their KV cache is reused.
    enable_prefix_caching: bool = True
    # Log-probabilities returned per scored position; a score or verdict token outside them counts as 0.
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        _require(
            self.tensor_parallel_size >= 1,
            "generator.vllm.tensor_parallel_size",
            self.tensor_parallel_size,
            "must be >= 1",
        )
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "generator.vllm.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 16,
            "generator.vllm.max_model_len",
            self.max_model_len,
            "must be >= 16",
        )
        _require(self.max_logprobs >= 1, "generator.vllm.max_logprobs", self.max_logprobs, "must be >= 1")


@dataclass
class OpenAISettings:
    """An OpenAI-compatible chat endpoint, or a pool of them (``generator=openai``)."""

    # One or more base URLs ending in /v1; requests are spread over them (e.g. a pool of vLLM servers).
    base_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    # The served model name; empty: model.path.
    model: str | None = None
    # The name of the environment variable holding the API key; the key itself is never stored.
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 6
    # First retry delay; it doubles with each retry (with jitter), or follows Retry-After.
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    # Answers are cached on disk (under the run directory) so a resumed run repeats no paid call.
    cache: bool = True
    # US dollars per million tokens; empty: cost is not reported.
    prompt_price_per_mtok: float | None = None
    completion_price_per_mtok: float | None = None

    def __post_init__(self) -> None:
        _require(bool(self.base_urls), "generator.openai.base_urls", self.base_urls, "needs at least one URL")
        for url in self.base_urls:
            _require(
                url.startswith(("http://", "https://")),
                "generator.openai.base_urls",
                url,
                "must start with http:// or https://",
            )
        _require(bool(self.api_key_env), "generator.openai.api_key_env", self.api_key_env, "must be a name")
        for name in ("max_concurrency",):
            _require(
                getattr(self, name) >= 1, f"generator.openai.{name}", getattr(self, name), "must be >= 1"
            )
        _require(self.max_retries >= 0, "generator.openai.max_retries", self.max_retries, "must be >= 0")
        _require(self.backoff_s >= 0, "generator.openai.backoff_s", self.backoff_s, "must be >= 0")
        _require(self.timeout_s > 0, "generator.openai.timeout_s", self.timeout_s, "must be > 0")
        for name in ("prompt_price_per_mtok", "completion_price_per_mtok"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"generator.openai.{name}", value, "must be >= 0")


@dataclass
class GeneratorConfig:
    """The generation backend shared by the actor, judge and meta-judge."""

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

    def __post_init__(self) -> None:
        _require(
            self.backend in GENERATOR_BACKENDS,
            "generator.backend",
            self.backend,
            f"must be one of {GENERATOR_BACKENDS}",
        )
        for name in ("batch_size", "score_batch_size", "chunk_size"):
            _require(getattr(self, name) >= 1, f"generator.{name}", getattr(self, name), "must be >= 1")


@dataclass
class DataConfig:
    """Where actor prompts come from: the bundled set, a JSONL file or a Hugging Face dataset."""

    # bundled: the Self-Instruct seed tasks shipped with metareward; jsonl: `path`; hf: `hf_name`.
    # A `path`, when given, is read whatever the kind (except hf).
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

    def __post_init__(self) -> None:
        _require(self.kind in DATA_KINDS, "data.kind", self.kind, f"must be one of {DATA_KINDS}")
        _require(
            self.kind != "jsonl" or bool(self.path), "data.path", self.path, "is required with data=jsonl"
        )
        if self.path:
            _require(Path(self.path).is_file(), "data.path", self.path, "no such file")
        if self.kind == "hf":
            _require(bool(self.hf_name), "data.hf_name", self.hf_name, "is required with data=hf_dataset")
        _require(
            self.prompts_per_iteration >= 1,
            "data.prompts_per_iteration",
            self.prompts_per_iteration,
            "must be >= 1",
        )
        _require(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 8,
            "data.max_prompt_tokens",
            self.max_prompt_tokens,
            "must be >= 8",
        )
        _require(
            self.long_prompts in LONG_PROMPTS,
            "data.long_prompts",
            self.long_prompts,
            f"one of {LONG_PROMPTS}",
        )


@dataclass
class ActorConfig:
    num_responses: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        _require(self.num_responses >= 2, "actor.num_responses", self.num_responses, "must be >= 2")
        _check_sampling("actor", self.temperature, self.top_p, self.max_new_tokens)


@dataclass
class JudgeConfig:
    num_judgements: int = 3
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    # text: a score only when the judge wrote one (the paper's rule); text_or_expected: otherwise
    # the expectation of 0..5 under the model's probabilities after "Score: ".
    score_from: str = "text"
    # Optional path to a str.format template replacing the built-in rubric prompt
    # (fields: {question}, {response}).
    template: str | None = None

    def __post_init__(self) -> None:
        _require(self.num_judgements >= 1, "judge.num_judgements", self.num_judgements, "must be >= 1")
        _check_sampling("judge", self.temperature, self.top_p, self.max_new_tokens)
        _require(
            self.score_from in SCORE_SOURCES, "judge.score_from", self.score_from, f"one of {SCORE_SOURCES}"
        )
        _check_template("judge.template", self.template)


@dataclass
class MetaJudgeConfig:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    # text: a verdict only when the meta-judge wrote one; text_or_probs: otherwise "A" or "B" drawn from
    # the model's probabilities after "Winner: Judgement" at this temperature (the likelier at 0).
    winner_from: str = "text"
    # Optional path to a str.format template (fields: {question}, {response}, {rubric},
    # {judgement_a}, {judgement_b}).
    template: str | None = None

    def __post_init__(self) -> None:
        _check_sampling("meta_judge", self.temperature, self.top_p, self.max_new_tokens)
        _require(
            self.winner_from in WINNER_SOURCES,
            "meta_judge.winner_from",
            self.winner_from,
            f"one of {WINNER_SOURCES}",
        )
        _check_template("meta_judge.template", self.template)


@dataclass
class PairsConfig:
    # Length-control strength in [0, 0.5): a number, or one number per iteration (the last repeats).
    rho: Any = 0.0
    # L2 strength of the Elo (Bradley-Terry) fit over judgements.
    elo_l2: float = 0.01

    def __post_init__(self) -> None:
        values = list(self.rho) if isinstance(self.rho, list | tuple) else [self.rho]
        _require(bool(values), "pairs.rho", self.rho, "needs at least one value")
        for value in values:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 0.5
            _require(ok, "pairs.rho", self.rho, "every value must be a number in [0, 0.5)")
        _require(self.elo_l2 > 0, "pairs.elo_l2", self.elo_l2, "must be > 0")

    def rho_for(self, iteration: int) -> float:
        """The rho of 1-based ``iteration``; a list's last value repeats."""
        values = list(self.rho) if isinstance(self.rho, list | tuple) else [self.rho]
        return float(values[min(iteration, len(values)) - 1])


@dataclass
class DPOSettings:
    """Our DPO settings; ``training.py`` turns them into ``trl.DPOConfig``."""

    beta: float = 0.1
    learning_rate: float = 5e-7
    num_epochs: float = 1.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    precompute_ref_log_probs: bool = False
    gradient_checkpointing: bool = False
    # fp32 master weights always; bf16 autocasts the compute. auto: bf16 where the device multiplies
    # bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        _require(self.beta > 0, "train.dpo.beta", self.beta, "must be > 0")
        _require(self.learning_rate > 0, "train.dpo.learning_rate", self.learning_rate, "must be > 0")
        _require(self.num_epochs > 0, "train.dpo.num_epochs", self.num_epochs, "must be > 0")
        _require(self.batch_size >= 1, "train.dpo.batch_size", self.batch_size, "must be >= 1")
        _require(
            self.gradient_accumulation_steps >= 1,
            "train.dpo.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be >= 1",
        )
        _require(self.max_length >= 16, "train.dpo.max_length", self.max_length, "must be >= 16")
        _require(0 <= self.warmup_ratio < 1, "train.dpo.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _require(self.lora_r >= 1, "train.dpo.lora_r", self.lora_r, "must be >= 1")
        _require(self.precision in PRECISIONS, "train.dpo.precision", self.precision, f"one of {PRECISIONS}")


@dataclass
class TrainConfig:
    # Iterations whose DPO data also holds the judge pairs (the paper: 1 and 2).
    judge_iterations: list[int] = field(default_factory=lambda: [1, 2])
    dpo: DPOSettings = field(default_factory=DPOSettings)
    # inline: train in this process; accelerate: `accelerate launch --config_file <accelerate_config>`
    # (multi-GPU, DeepSpeed ZeRO-3 with the shipped conf/accelerate/deepspeed_zero3.yaml).
    launcher: str = "inline"
    # Empty: conf/accelerate/deepspeed_zero3.yaml from the installed package.
    accelerate_config: str | None = None
    # When an iteration yields no preference pairs: stop the run (saying why), or carry M_{t-1}
    # forward unchanged as M_t and go on.
    on_no_pairs: str = "stop"

    def __post_init__(self) -> None:
        for value in self.judge_iterations:
            _require(value >= 1, "train.judge_iterations", self.judge_iterations, "iterations count from 1")
        _require(self.launcher in LAUNCHERS, "train.launcher", self.launcher, f"must be one of {LAUNCHERS}")
        _check_template("train.accelerate_config", self.accelerate_config)
        _require(
            self.on_no_pairs in ON_NO_PAIRS, "train.on_no_pairs", self.on_no_pairs, f"one of {ON_NO_PAIRS}"
        )


@dataclass
class RoleModelConfig:
    """A fixed model for one role instead of the model being trained, e.g. a stronger meta-judge
    behind an API: ``roles.meta_judge.own_model=true roles.meta_judge.generator.backend=openai``."""

    # false (the paper): the role is played by M_{t-1} through the run's `generator`.
    own_model: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class RolesConfig:
    actor: RoleModelConfig = field(default_factory=RoleModelConfig)
    judge: RoleModelConfig = field(default_factory=RoleModelConfig)
    meta_judge: RoleModelConfig = field(default_factory=RoleModelConfig)


@dataclass
class TrackingConfig:
    """Where numbers go besides metrics.json: W&B online, W&B offline (in the run directory), or nowhere."""

    # wandb: online (needs `wandb login`); offline: a W&B offline run under <run_dir>/wandb, syncable
    # later with `wandb sync`; none: metrics.json only.
    mode: str = "offline"
    project: str = "metareward"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    # Rows of sample actor and judge pairs logged as W&B Tables each iteration.
    table_rows: int = 8

    def __post_init__(self) -> None:
        _require(self.mode in TRACKING_MODES, "tracking.mode", self.mode, f"must be one of {TRACKING_MODES}")
        _require(self.table_rows >= 0, "tracking.table_rows", self.table_rows, "must be >= 0")


@dataclass
class EvalConfig:
    """Judge skill against human preferences, and the actor's win rate against M_0."""

    # Run before iteration 1 (on M_0) and after each iteration (on M_t).
    enabled: bool = True
    # JSONL with `prompt` (string or chat turns), `chosen`, `rejected`; empty: the bundled HH-RLHF pairs.
    human_pairs: str | None = None
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
    # The fixed evaluator: empty means M_0 (the seed model).
    evaluator: ModelConfig | None = None

    def __post_init__(self) -> None:
        counts = ("num_pairs", "num_judgements", "max_new_tokens", "num_heldout", "response_max_new_tokens")
        for name in counts:
            _require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), "must be >= 1")
        _require(self.temperature >= 0, "eval.temperature", self.temperature, "must be >= 0")
        _require(self.bootstrap_samples >= 10, "eval.bootstrap_samples", self.bootstrap_samples, ">= 10")
        for name in ("human_pairs", "heldout_prompts"):
            path = getattr(self, name)
            _require(not path or Path(path).is_file(), f"eval.{name}", path, "no such file")


@dataclass
class Config:
    """A whole run. ``metareward --cfg job`` prints it resolved."""

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

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        _require(bool(self.run_name) and "/" not in self.run_name, "run_name", self.run_name, "a plain name")


def register_configs() -> None:
    """Make the schema available to Hydra as ``metareward_schema`` (used by conf/config.yaml)."""
    ConfigStore.instance().store(name="metareward_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed Hydra config into :class:`Config`, validating every setting.

    Raises :class:`ConfigError` naming the setting; no model is loaded here.
    """
    if "hydra" in cfg:  # a callback's view: Hydra's own node holds values only set once the job runs
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), container)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        raise ConfigError(f"{key}: {error.msg if hasattr(error, 'msg') else error}".splitlines()[0]) from None
