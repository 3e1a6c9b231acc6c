"""The seeded sampler that the transformers backend's two engines (fast and transformers) draw with.

Each sample draws its uniforms from its own generator, seeded by (seed, prompt, sample index)
(:func:`sample_seed`, :func:`draw_uniforms`), and :func:`sample` turns one uniform per row into a token:
greedy at temperature 0, else inverse-CDF sampling of the top-p nucleus. The fast engine calls it on its
own logits; on the transformers path :class:`SeededSampler` hands its token to ``model.generate``'s
greedy decoding. :func:`generation_config` is transformers' own sampler with the same settings (the
benchmark's baseline).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor

from metareward.generation.base import SamplingParams

# Top-p ranks only the tokens above the first of these probabilities whose tokens hold top_p.
NUCLEUS_FLOORS = (1e-3, 1e-4, 1e-5)


def sample(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else inverse-CDF sampling of the top-p nucleus of
    softmax(logits / temperature) with one uniform per row."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    rows, vocab = probs.shape
    if params.top_p >= 1:
        cdf = probs.double().cumsum(-1)
        return (cdf <= uniforms[:, None].double() * cdf[:, -1:]).sum(-1).clamp(max=vocab - 1)
    row, token, p = nucleus_candidates(probs, params.top_p)
    # The candidates side by side, one row each (zeros after a row's own), in token-id order.
    counts = torch.bincount(row, minlength=rows)
    col = torch.arange(len(row), device=row.device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    top = probs.new_zeros(rows, width).index_put_((row, col), p)
    index = torch.full((rows, width), vocab, device=row.device).index_put_((row, col), token)
    # The most likely tokens until their mass reaches top_p (the token that crosses it included).
    ranked, rank = top.sort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(top, dtype=torch.bool).scatter_(
        -1, rank, (ranked.cumsum(-1) - ranked) < params.top_p
    )
    # Drawn in token-id order, so a rounding-size change in the logits (another batch) moves a draw
    # only if it lies at a boundary, not whenever two near-equal tokens swap ranks.
    cdf = (top * keep).double().cumsum(-1)
    pick = torch.minimum((cdf <= uniforms[:, None].double() * cdf[:, -1:]).sum(-1), counts - 1)
    return index.gather(-1, pick[:, None]).squeeze(-1)


def nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, ...]:
    """(row, token, probability) of every token above the first of NUCLEUS_FLOORS above which every
    row's tokens hold top_p: tokens at or below such a floor are outside the nucleus, and the last
    floor always qualifies (everything below it weighs at most 1 - top_p). Rows come in order, and a
    row's tokens by id; one pass over the vocabulary per floor tried, instead of sorting it."""
    rows, vocab = probs.shape
    for floor in (*NUCLEUS_FLOORS, (1 - top_p) / vocab):
        row, token = (probs > floor).nonzero(as_tuple=True)
        p = probs[row, token]
        mass = probs.new_zeros(rows).index_add_(0, row, p)
        if bool((mass >= top_p).all()):
            break
    return row, token, p


def sample_seed(seed: int, prompt: list[int], j: int) -> int:
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), key=f"{seed}/{j}".encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def draw_uniforms(prompts: list[list[int]], params: SamplingParams, device: torch.device) -> torch.Tensor:
    """(prompts x n, max_new_tokens): each sample's uniforms, from its own generator seeded by (seed,
    prompt, sample index), so that a completion does not depend on what else is in its batch."""
    return torch.stack(
        [
            torch.rand(
                params.max_new_tokens,
                generator=torch.Generator().manual_seed(sample_seed(params.seed, p, j)),
            )
            for p in prompts
            for j in range(params.n)
        ]
    ).to(device)


class SeededSampler(LogitsProcessor):
    """For ``model.generate``: draws each row's next token with :func:`sample` and the row's own uniforms
    (``uniforms[row, step]``, as the fast engine does) and leaves greedy decoding only that token."""

    def __init__(self, params: SamplingParams, uniforms: torch.Tensor, prompt_width: int):
        self.params, self.uniforms, self.prompt_width = params, uniforms, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        tokens = sample(scores.float(), self.params, self.uniforms[:, step])
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens.long()[:, None], 0.0)


def generation_config(params: SamplingParams, pad_token_id: int, stop_ids: list[int]) -> GenerationConfig:
    """``params`` for ``model.generate``: the same nucleus sampling (no top-k), or greedy at 0."""
    sampled = params.temperature > 0
    return GenerationConfig(
        do_sample=sampled,
        temperature=params.temperature if sampled else None,
        top_p=params.top_p if sampled else None,
        top_k=0 if sampled else None,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=stop_ids,
    )
