"""The transformers backend: a batched decode loop with shared-prefix KV caches, on CPU or CUDA.

    gen = HFGenerator(model_dir, ModelConfig(), GeneratorConfig(batch_size=32))
    completions = gen.generate(requests, SamplingParams(n=3, max_new_tokens=128, seed=7))

How a ``generate`` call spends its compute (the judge and meta-judge prompts share a long rubric):

- identical requests (same prompt and sampling settings) are computed once, also across calls to the
  same generator; the answer comes from memory and counts as ``usage.cached_samples``;
- unique prompts, longest first, go in batches of up to ``batch_size // n`` prompts; a batch's common
  token prefix is prefilled once, each prompt's remainder once, and its ``n`` samples decode on top;
- while decoding, attention reads each shared part once per step for all the rows that share it (its
  keys meet all their queries in one matmul, under one softmax), so long shared prompts cost little;
  a prompt whose samples have all finished leaves the batch;
- each sample draws its uniforms from its own generator, seeded by (seed, prompt, sample index): a
  completion does not depend on what else is in its batch, and the same request and seed give the
  same outputs however requests are batched (up to float rounding between batch shapes);
- the KV caches of the last call are kept, so ``next_token_probs`` on a prompt + its completion + a cue
  (the judge's "Score: ") runs only the tokens after the cached part.

``model.dtype: auto`` computes in bf16 on CPUs with native bf16 (AVX512-BF16, AMX), about twice as
fast as fp32 there.

The decode loop and prefill above are a forward pass of their own (the "fast" engine), rebuilt from the
model's modules. It serves only what it is proven equal on (tests/test_generation_architectures.py):
transformers' Llama, Qwen2 (q/k/v biases) and Mistral, with a RoPE whose frequencies are fixed, and no layer
that attends through a sliding window shorter than the model's context. Anything else (another
architecture, remote code, a sliding window, dynamic or long-context RoPE, quantized weights) goes
through transformers' own ``model.generate`` and plain forward passes, under the same contract: each
sample draws with the same sampler and its own uniforms (a logits processor hands the drawn token to
greedy decoding), finish reasons, the memo and usage counts. ``HFGenerator.engine`` says which engine
serves the model ("fast" or "transformers") and ``engine_reason`` why; both are logged at load.

This module holds the generator (the memo, batching, usage, finish reasons), the engine choice and the
transformers path; the fast engine's caches and passes are in :mod:`metareward.generation.hf_engine`,
its layers' math in :mod:`metareward.generation.hf_layers`, and the seeded sampler both engines draw
with in :mod:`metareward.generation.sampling`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList

from metareward.compute.hardware import bf16_is_native
from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation.base import Completion, Messages, SamplingParams, Usage
from metareward.generation.hf_engine import FastEngine, kv_layout
from metareward.generation.sampling import SeededSampler, draw_uniforms
from metareward.generation.tokens import encode, next_token_query, stop_token_ids

logger = logging.getLogger(__name__)

# The model classes the fast engine computes exactly, by model_type: Llama's layers (q/k/v/o projections,
# RoPE, pre-norm RMSNorm, gated MLP; optional attention and MLP biases), Qwen2's (q/k/v biases) and
# Mistral's (Llama's, plus a sliding window, see sliding_window).
FAST_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# RoPE types whose frequencies are fixed (the engine takes cos/sin from the model's own rotary embedding).
# "dynamic" and "longrope" recompute them from the longest position of each forward pass, which the
# engine's prefill slices and decode steps do not reproduce.
FAST_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if bf16_is_native(device) else torch.float32
    return getattr(torch, setting)


def sliding_window(config) -> int | None:
    """The attention window of a Llama-family config where it could matter, else None: Mistral attends
    through ``sliding_window`` in every layer; Qwen2 only with ``use_sliding_window``, in the layers
    ``layer_types`` marks "sliding_attention" (from ``max_window_layers``); Llama has none. A window at
    least ``max_position_embeddings`` long never cuts anything off."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "llama" or not window:
        return None
    if config.model_type == "qwen2" and (
        not getattr(config, "use_sliding_window", False)
        or "sliding_attention" not in (getattr(config, "layer_types", None) or [])
    ):
        return None
    if window >= getattr(config, "max_position_embeddings", window + 1):
        return None
    return int(window)


def choose_engine(model) -> tuple[str, str]:
    """("fast", why) where the fast engine computes ``model`` exactly, else ("transformers", why not)."""
    config, cls = model.config, type(model)
    expected = FAST_ARCHITECTURES.get(config.model_type)
    if expected is None:
        served = ", ".join(FAST_ARCHITECTURES)
        return "transformers", f"model_type {config.model_type!r} is none of the fast engine's ({served})"
    if cls.__name__ != expected or not cls.__module__.startswith("transformers.models."):
        return "transformers", f"{cls.__module__}.{cls.__name__} is not transformers' {expected}"
    if getattr(config, "quantization_config", None) is not None:
        return "transformers", "quantized weights"
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope.get("rope_type", "default"), str):
        return "transformers", "RoPE parameters per layer type"
    if rope.get("rope_type", "default") not in FAST_ROPE_TYPES:
        return "transformers", f"RoPE type {rope['rope_type']!r} (frequencies that change with the sequence)"
    window = sliding_window(config)
    if window is not None:
        return "transformers", f"sliding-window attention ({window} tokens; the fast engine attends to all)"
    return "fast", f"{expected} with full attention"


class HFGenerator:
    def __init__(self, model_dir: str, model: ModelConfig, settings: GeneratorConfig):
        self.settings = settings
        self.usage = Usage()
        self.device = pick_device(settings.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=pick_dtype(model.dtype, self.device),
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,
        ).to(self.device)
        self.model.eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        # model.generate fills what a call leaves unset from the model's generation config (a
        # checkpoint's repetition_penalty, say); the fast engine applies none of it, so neither does it.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.engine, self.engine_reason = choose_engine(self.model)
        logger.info("generation engine for %s: %s (%s)", model_dir, self.engine, self.engine_reason)
        # Bytes of keys and values per position, which decides how much padding a batch may hold.
        _, kv_heads, head_dim = kv_layout(self.model.config)
        layers = getattr(self.model.config, "num_hidden_layers", 1)
        self.key_bytes = layers * 2 * kv_heads * head_dim * self.model.dtype.itemsize
        self.fast = None
        if self.engine == "fast":
            self.fast = FastEngine(
                self.model, self.device, self.tokenizer.pad_token_id, self.stop_ids, settings.batch_size
            )
        self.memo: dict[tuple, list[Completion]] = {}

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- generate ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        prompts = [encode(self.tokenizer, self.render(messages)) for messages in requests]
        settings = (params.n, params.temperature, params.top_p, params.max_new_tokens, params.seed)
        keys = [(tuple(p), *settings) for p in prompts]
        todo = sorted({key for key in keys if key not in self.memo}, key=lambda key: -len(key[0]))
        self.usage.generate_calls += 1
        self.usage.samples += len(keys) * params.n
        self.usage.cached_samples += (len(keys) - len(todo)) * params.n
        self.usage.prompt_tokens += sum(len(key[0]) for key in todo) * params.n
        if todo and self.fast is not None:
            self.fast.kept = []  # the caches a following scoring call may use are this call's
        bar = tqdm(
            total=len(todo) * params.n,
            desc=desc or "generate",
            unit="seq",
            disable=not self.settings.progress,
        )
        with bar:
            for batch in self._batches(todo, params.n):
                ids = [list(key[0]) for key in batch]
                fast = self.engine == "fast"
                decoded = self._decode(ids, params) if fast else self._generate_plain(ids, params)
                for key, completions in zip(batch, decoded, strict=True):
                    self.memo[key] = completions
                    self.usage.generated_tokens += sum(c.num_tokens for c in completions)
                bar.update(len(batch) * params.n)
        return [[replace(c, prompt_tokens=len(key[0])) for c in self.memo[key]] for key in keys]

    def _batches(self, todo: list[tuple], n: int) -> list[list[tuple]]:
        """Prompts (longest first) in batches of ``batch_size // n``, cut early where padding every row to
        the batch's longest prompt would make decoding read more padded keys per step than weights."""
        per_batch = max(1, self.settings.batch_size // n)
        key_bytes = self.key_bytes
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        batches: list[list[tuple]] = []
        for key in todo:
            padding = (
                n * sum(len(batches[-1][0][0]) - len(k[0]) for k in [*batches[-1], key]) if batches else 0
            )
            if batches and len(batches[-1]) < per_batch and padding * key_bytes <= weight_bytes:
                batches[-1].append(key)
            else:
                batches.append([key])
        return batches

    def _completion(self, generated: list[int]) -> Completion:
        stop = next((k for k, token in enumerate(generated) if token in self.stop_ids), None)
        tokens = generated if stop is None else generated[:stop]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(
            text=text, num_tokens=len(tokens), finish_reason="length" if stop is None else "stop"
        )

    def _decode(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` samples of each prompt, decoded together on the prompts' shared caches."""
        n = params.n
        generated = self.fast.decode(prompts, params, draw_uniforms(prompts, params, self.device))
        completions = [self._completion(g) for g in generated]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    # -- next-token probabilities ----------------------------------------------------------------------

    @torch.inference_mode()
    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        queries = [[next_token_query(self.tokenizer, text, c) for c in candidates] for text in texts]
        self.usage.scored_texts += len(texts)
        contexts = sorted({tuple(ctx) for per_text in queries for ctx, _ in per_text}, key=len, reverse=True)
        probs_of: dict[tuple[int, ...], torch.Tensor] = {}
        fast = self.engine == "fast"
        if fast:
            contexts = self.fast.score_on_kept(contexts, probs_of)
        size = self.settings.score_batch_size
        for start in range(0, len(contexts), size):
            batch = contexts[start : start + size]
            if fast:
                logits = self.fast.prefill([list(c) for c in batch])[1]
            else:
                logits = self._plain_logits([list(c) for c in batch])
            for context, row in zip(batch, torch.softmax(logits, dim=-1).cpu(), strict=True):
                probs_of[context] = row
        return [[float(probs_of[tuple(ctx)][token]) for ctx, token in per_text] for per_text in queries]

    # -- other architectures: model.generate and plain forward passes ----------------------------------

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        return ids, mask

    def _generate_plain(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` samples of each prompt by ``model.generate``, left-padded in one batch. Decoding is
        greedy over the scores :class:`SeededSampler` leaves: the token that ``sampling.sample`` draws with
        the sample's own uniforms, as in the fast engine."""
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
        )
        ids, mask = self._left_pad([p for p in prompts for _ in range(params.n)])
        sampler = SeededSampler(params, draw_uniforms(prompts, params, self.device), ids.shape[1])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
        completions = [self._completion(g) for g in out[:, ids.shape[1] :].tolist()]
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _plain_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """Logits after each context, by the model's own forward pass, left-padded in one batch."""
        accepts = inspect.signature(self.model.forward).parameters
        if "position_ids" not in accepts:  # padding would shift its positions (remote code): one at a time
            alone = [torch.tensor([c], device=self.device) for c in contexts]
            return torch.stack([self.model(input_ids=ids).logits[0, -1] for ids in alone]).float()
        ids, mask = self._left_pad(contexts)
        # Positions count from each row's first real token, as in an unpadded forward pass.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep)
        return out.logits[:, -1, :].float()

    def close(self) -> None:
        self.memo, self.fast = {}, None
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
