"""The transformers backend: batched ``generate`` on CPU or CUDA.

Requests are rendered with the model's chat template, expanded to ``n`` samples,
sorted by prompt length (so a batch pads little) and left-padded. The global torch RNG is
seeded once per call, so the same requests with the same seed give the same outputs.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation import Completion, Messages, SamplingParams, Usage


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, setting)


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
        self.stop_ids = self._stop_token_ids()

    def _stop_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        # The rendered chat text already holds every special token the template wants.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        return ids, mask

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc or "generate", unit="seq", disable=not self.settings.progress)

    @torch.inference_mode()
    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        prompts = [self._encode(self.render(messages)) for messages in requests]
        # One row per (request, sample); longest first so the first batch shows the peak memory.
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rows.sort(key=lambda row: (-len(prompts[row[0]]), row))
        config = GenerationConfig(
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            top_k=0 if params.temperature > 0 else None,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
        )
        torch.manual_seed(params.seed)
        self.usage.generate_calls += 1
        self.usage.samples += len(rows)
        self.usage.prompt_tokens += sum(len(prompts[i]) for i, _ in rows)
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        with self._progress(len(rows), desc) as bar:
            for start in range(0, len(rows), self.settings.batch_size):
                batch = rows[start : start + self.settings.batch_size]
                ids, mask = self._left_pad([prompts[i] for i, _ in batch])
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for (i, j), generated in zip(batch, out[:, ids.shape[1] :].tolist(), strict=True):
                    results[i][j] = self._completion(generated)
                    self.usage.generated_tokens += results[i][j].num_tokens
                bar.update(len(batch))
        return results

    def _completion(self, generated: list[int]) -> Completion:
        stops = [k for k, token in enumerate(generated) if token in self.stop_ids]
        if stops:
            tokens, reason = generated[: stops[0]], "stop"
        else:
            tokens, reason = generated, "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(text=text, num_tokens=len(tokens), finish_reason=reason)

    def _query(self, text: str, candidate: str) -> tuple[list[int], int]:
        """The context and the token a candidate continues it with.

        BPE may merge the candidate with the text's last characters (" A" is one token), so the
        context is the longest common token prefix of ``text`` and ``text + candidate``.
        """
        base, full = self._encode(text), self._encode(text + candidate)
        common = 0
        while common < min(len(base), len(full)) and base[common] == full[common]:
            common += 1
        if len(full) - common != 1:
            raise ValueError(f"candidate {candidate!r} is not a single token after the given text")
        return full[:common], full[common]

    @torch.inference_mode()
    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        queries = [[self._query(text, c) for c in candidates] for text in texts]
        self.usage.scored_texts += len(texts)
        contexts = sorted({tuple(ctx) for per_text in queries for ctx, _ in per_text}, key=len, reverse=True)
        probs_of: dict[tuple[int, ...], torch.Tensor] = {}
        size = self.settings.score_batch_size
        for start in range(0, len(contexts), size):
            batch = contexts[start : start + size]
            ids, mask = self._left_pad([list(c) for c in batch])
            # Positions count from each row's first real token, as in an unpadded forward pass.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            for context, row in zip(batch, torch.softmax(logits.float(), dim=-1).cpu(), strict=True):
                probs_of[context] = row
        return [[float(probs_of[tuple(ctx)][token]) for ctx, token in per_text] for per_text in queries]

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
