"""The fast engine: a Llama-family forward pass of its own on shared-prefix KV caches.

It owns the KV caches (:class:`Level`, :class:`Kept`) and the passes that fill and read them:
:meth:`FastEngine.prefill` runs a batch's common token prefix once and each prompt's remainder once on
top of it; :meth:`FastEngine.decode` draws ``n`` samples per prompt on top of those, reading each shared
level once per step for all the rows that share it and dropping prompts whose samples have all finished;
the caches of the last decoded batches stay, so :meth:`FastEngine.score_on_kept` runs only the tokens of
a scored text past its cached prompt and completion. Which models it serves is decided in
:mod:`metareward.generation.hf`; the layers' math is in :mod:`metareward.generation.hf_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import metareward.generation.sampling as sampling
from metareward.generation.base import SamplingParams
from metareward.generation.hf_layers import Linear, attend, layer_linears, mask_bias, rms_norm, rope

# Tokens per prefill forward pass: bounds the attention scores and activations held at once.
PREFILL_TOKENS = 4096
# Cache positions are allocated, and read while decoding, in blocks of this many.
OWN_BLOCK = 32
# KV caches kept after a call for the scoring call that follows it, and how many tokens past a kept
# completion a scored text may run (the score or verdict cue; a longer tail is prefilled on its own).
KEEP_BYTES = 2 * 1024**3
SCORE_TAIL = 64


def kv_layout(config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim) of a decoder config."""
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


@dataclass
class Level:
    """Keys and values of a run of positions, (layers, groups, kv_heads, length, head_dim). Rows are
    grouped contiguously, rows // groups per group; ``mask`` (groups, 1 or rows per group, length) marks
    the valid positions (None: all)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class Kept:
    """The caches of one decoded batch: the prompts' common prefix (``shared`` tokens), each prompt's
    remainder (``n`` rows per prompt) and each row's generated tokens; per row, its tokens (prompt +
    completion), its prompt length and how many leading tokens have cached keys."""

    levels: list[Level]
    shared: int
    n: int
    sequences: list[np.ndarray]
    prompt_lens: list[int]
    cached: list[int]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for level in self.levels for t in (level.k, level.v))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class FastEngine:
    """Prefill, decode and scoring of a Llama-family ``model`` (on ``device``) on shared-prefix KV caches.
    The model's q/k/v and gate/up projections are fused at construction (the modules keep views into the
    fused weights); ``rows_hint`` is the batch rows the CPU weight layout is tuned for. ``kept`` holds
    the caches of the last call's decoded batches, for a scoring call on their completions."""

    def __init__(self, model, device: torch.device, pad_token_id: int, stop_ids: list[int], rows_hint: int):
        self.model, self.device = model, device
        self.pad_token_id, self.stop_ids = pad_token_id, stop_ids
        heads, self.kv_heads, self.head_dim = kv_layout(model.config)
        # The fused q/k/v output splits into q and k (rotated together) and v.
        self.qk_v_heads = [heads + self.kv_heads, self.kv_heads]
        rows = max(1, rows_hint)
        self.linears = [layer_linears(layer, rows) for layer in model.model.layers]
        self.lm_head = Linear(model.lm_head.weight.data, model.lm_head.bias, rows)
        self.kept: list[Kept] = []

    def decode(
        self, prompts: list[list[int]], params: SamplingParams, uniforms: torch.Tensor
    ) -> list[list[int]]:
        """``params.n`` samples of each prompt, decoded together on the prompts' shared caches, each row
        drawing with its own ``uniforms`` (rows, max_new_tokens): each row's drawn tokens, all rows as
        long as the longest (past a row's stop token come the draws of the steps it still ran)."""
        n, steps = params.n, params.max_new_tokens
        levels, logits = self.prefill(prompts)
        rows = len(prompts) * n
        logits = logits.repeat_interleave(n, 0)
        start = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(n)
        stops = torch.tensor(self.stop_ids, device=self.device)
        tokens = torch.zeros(rows, steps, dtype=torch.long, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        # Every row's generated keys end up in k_all/v_all. The rows still decoding work in k_new/v_new,
        # which grow a block at a time: the keys a step reads are then one whole tensor, where a slice
        # of a longer buffer would be copied by every attention matmul.
        k_all, v_all = self._buffers(rows, -(-steps // OWN_BLOCK) * OWN_BLOCK)
        k_new, v_new = self._buffers(rows, 0)
        work, alive = levels, torch.arange(rows, device=self.device)
        for t in range(steps):
            tokens[alive, t] = sampling.sample(logits, params, uniforms[alive, t])
            done[alive] |= torch.isin(tokens[alive, t], stops)
            if t == steps - 1 or bool(done.all()):
                break
            finished = done[alive].view(-1, n).all(1)
            if int(finished.sum()) * 8 >= len(finished):  # drop finished prompts once an eighth are
                keep_group = ~finished
                keep = keep_group.repeat_interleave(n)
                k_all[:, alive[~keep], :, :t] = k_new[:, ~keep, :, :t]
                v_all[:, alive[~keep], :, :t] = v_new[:, ~keep, :, :t]
                k_new, v_new, logits, alive = k_new[:, keep], v_new[:, keep], logits[keep], alive[keep]
                work = [
                    *work[:-1],
                    Level(*(x[:, keep_group] for x in (work[-1].k, work[-1].v)), work[-1].mask[keep_group]),
                ]
            if t == k_new.shape[3]:
                block = self._buffers(len(alive), OWN_BLOCK)
                k_new, v_new = (
                    torch.cat([x, more], dim=3) for x, more in zip((k_new, v_new), block, strict=True)
                )
            ids, positions = tokens[alive, t : t + 1], (start[alive] + t)[:, None]
            last = torch.zeros(len(alive), dtype=torch.long, device=self.device)
            logits = self.forward(ids, positions, work, k_new, v_new, t, last)
        k_all[:, alive, :, :t] = k_new[:, :, :, :t]
        v_all[:, alive, :, :t] = v_new[:, :, :, :t]
        generated = tokens[:, : t + 1].tolist()
        self._keep(levels + [Level(k_all[:, :, :, :t], v_all[:, :, :, :t])], prompts, n, generated, t)
        return generated

    def _keep(self, levels: list[Level], prompts: list[list[int]], n: int, generated, cached: int) -> None:
        """Keep a decoded batch's caches (within KEEP_BYTES) for a scoring call on its completions;
        ``cached`` generated tokens of each row have keys in the last level."""
        sequences, prompt_lens, lengths = [], [], []
        for r, tokens in enumerate(generated):
            prompt = prompts[r // n]
            kept = next((k for k, token in enumerate(tokens) if token in self.stop_ids), len(tokens))
            sequences.append(np.asarray(prompt + tokens[:kept], dtype=np.int64))
            prompt_lens.append(len(prompt))
            lengths.append(len(prompt) + min(kept, cached))
        shared = levels[0].k.shape[3] if len(levels) == 3 else 0
        batch = Kept(levels, shared, n, sequences, prompt_lens, lengths)
        if batch.nbytes() + sum(k.nbytes() for k in self.kept) <= KEEP_BYTES:
            self.kept.append(batch)

    # -- the forward pass -------------------------------------------------------------------------------

    def _buffers(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for ``length`` positions of ``rows`` rows; zeros, so that masked positions
        read while decoding hold no NaN to multiply by a zero weight."""
        shape = (len(self.model.model.layers), rows, self.kv_heads, length, self.head_dim)
        return (
            torch.zeros(shape, dtype=self.model.dtype, device=self.device),
            torch.zeros(shape, dtype=self.model.dtype, device=self.device),
        )

    def forward(
        self, ids, positions, past: list[Level], k_out, v_out, offset: int, last, lengths=None
    ) -> torch.Tensor:
        """Run new tokens ``ids`` (rows, T) at ``positions`` on top of the ``past`` levels; their keys and
        values go into ``k_out``/``v_out`` at ``offset`` (attended causally). Returns fp32 logits at
        column ``last`` (rows,) of each row. ``lengths`` (rows,): how many leading tokens of each row
        are real; where some row has padding, the projections and MLP run on the real tokens only,
        packed, and padding gets zero keys."""
        core = self.model.model
        rows, T = ids.shape
        h = core.embed_tokens(ids)
        cos, sin = (x.unsqueeze(2) for x in core.rotary_emb(h, positions))
        packed = None
        if lengths is not None and bool((lengths < T).any()):
            packed = (torch.arange(T, device=self.device) < lengths[:, None]).view(-1).nonzero().squeeze(1)
            h = h.view(rows * T, -1)[packed]
        if T == 1:  # the masks of the levels, as attention biases, once for every layer
            # A new matmul shape costs CPU backends a kernel set-up (oneDNN: ~1 ms in bf16): decoding
            # reads its own keys in whole blocks, masked, so the shapes repeat for OWN_BLOCK steps.
            span = min(k_out.shape[3], -(-(offset + 1) // OWN_BLOCK) * OWN_BLOCK)
            share, dtype = self.model.config.num_attention_heads // self.kv_heads, self.model.dtype
            own_mask = (torch.arange(span, device=self.device) <= offset).expand(rows, 1, span)
            biases = [mask_bias(level.mask, self.kv_heads, share, dtype) for level in past]
            own_bias = mask_bias(own_mask, self.kv_heads, share, dtype)
        for i, layer in enumerate(core.layers):
            attn, linears = layer.self_attn, self.linears[i]
            qkv = linears.qkv(rms_norm(h, layer.input_layernorm))
            if packed is not None:
                qkv = qkv.new_zeros(rows * T, qkv.shape[-1]).index_copy_(0, packed, qkv)
            qk, v = qkv.view(rows, T, -1, self.head_dim).split(self.qk_v_heads, dim=2)
            q, k = rope(qk, cos, sin).split(self.qk_v_heads[0] - self.kv_heads, dim=2)
            k_out[i, :, :, offset : offset + T] = k.transpose(1, 2)
            v_out[i, :, :, offset : offset + T] = v.transpose(1, 2)
            if T == 1:  # decoding: each shared level is read once for all the rows that share it
                parts = [(level.k[i], level.v[i], bias) for level, bias in zip(past, biases, strict=True)]
                own = (k_out[i, :, :, :span], v_out[i, :, :, :span], own_bias)
                out = attend(q.view(rows, -1, self.head_dim), [*parts, own], attn.scaling)
            else:  # prefill: many queries per row, so one fused attention over all keys is faster
                own = (k_out[i, :, :, : offset + T], v_out[i, :, :, : offset + T])
                out = self._attend_dense(q, past, i, own, offset, attn.scaling)
            out = out.view(rows, T, -1) if packed is None else out.view(rows * T, -1)[packed]
            h = h + linears.o(out)
            gate, up = linears.gate_up(rms_norm(h, layer.post_attention_layernorm)).chunk(2, -1)
            h = h + linears.down(layer.mlp.act_fn(gate) * up)
        if packed is None:
            h = h[torch.arange(rows, device=self.device), last]
        else:  # a row's tokens follow the rows before it; a row with none here is not read
            before = lengths.cumsum(0) - lengths
            h = h[(before + torch.minimum(last, lengths - 1)).clamp(0, len(h) - 1)]
        return self.lm_head(rms_norm(h, core.norm)).float()

    def _attend_dense(self, q, past: list[Level], layer: int, own, offset: int, scale: float) -> torch.Tensor:
        """Attention of several new tokens per row over every past level and their own part, the levels
        laid out per row for ``scaled_dot_product_attention``."""
        rows, T, heads, d = q.shape
        keys, values, masks = [], [], []
        for level in past:
            groups, length = level.k.shape[1], level.k.shape[3]
            per = rows // groups

            def per_row(x: torch.Tensor, per=per) -> torch.Tensor:
                return x.unsqueeze(1).expand(x.shape[0], per, *x.shape[1:]).flatten(0, 1)

            keys.append(per_row(level.k[layer]))
            values.append(per_row(level.v[layer]))
            mask = level.mask if level.mask is not None else torch.ones(1, 1, length, dtype=torch.bool)
            masks.append(
                mask.to(q.device).expand(groups, per, length).reshape(rows, 1, length).expand(-1, T, -1)
            )
        span = offset + T
        causal = torch.arange(span, device=q.device) <= offset + torch.arange(T, device=q.device)[:, None]
        masks.append(causal.expand(rows, T, span))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            torch.cat([*keys, own[0]], dim=2),
            torch.cat([*values, own[1]], dim=2),
            attn_mask=torch.cat(masks, dim=-1)[:, None],
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(rows, T, heads * d)

    def _run(self, ids: list[list[int]], first: int, past: list[Level], k_out, v_out) -> torch.Tensor:
        """Prefill token rows (their first position is ``first``) on top of ``past`` (one shared level
        or none); returns the logits after each row's last token. Rows go in slices of at most
        PREFILL_TOKENS tokens, each padded to its own first row (callers pass rows longest first)."""
        rows, pad = len(ids), self.pad_token_id
        logits = torch.empty(rows, self.model.config.vocab_size, device=self.device)
        a = 0
        while a < rows:
            # A slice ends where padding would pass half its tokens (rows come longest first).
            b, width = a + 1, len(ids[a])
            while b < rows and (b + 1 - a) * width <= PREFILL_TOKENS and width // 2 <= len(ids[b]) <= width:
                b += 1
            tokens = torch.tensor([r + [pad] * (width - len(r)) for r in ids[a:b]], device=self.device)
            lengths = torch.tensor([len(r) for r in ids[a:b]], device=self.device)
            last = lengths - 1
            step = max(1, PREFILL_TOKENS // (b - a))  # a single row longer than that runs in pieces
            for offset in range(0, width, step):
                chunk = tokens[:, offset : offset + step]
                positions = first + offset + torch.arange(chunk.shape[1], device=self.device)
                here = last.clamp(offset, offset + chunk.shape[1] - 1) - offset
                real = (lengths - offset).clamp(0, chunk.shape[1])
                out = self.forward(
                    chunk, positions.expand(b - a, -1), past, k_out[:, a:b], v_out[:, a:b], offset, here, real
                )
                inside = (last >= offset) & (last < offset + chunk.shape[1])
                logits[a:b][inside] = out[inside]
            a = b
        return logits

    def prefill(self, prompts: list[list[int]]) -> tuple[list[Level], torch.Tensor]:
        """Caches for ``prompts``: their common prefix once (kept short of every prompt's last token),
        then each prompt's remainder; and the logits after each prompt."""
        arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
        shared = min(len(p) for p in prompts) - 1
        for a in arrays[1:]:
            shared = min(shared, common_prefix(arrays[0], a))
        levels = []
        if shared > 0:
            k, v = self._buffers(1, shared)
            self._run([prompts[0][:shared]], 0, [], k, v)
            levels.append(Level(k, v))
        rest = [p[shared:] for p in prompts]
        k, v = self._buffers(len(rest), max(len(r) for r in rest))
        logits = self._run(rest, shared, levels, k, v)
        mask = torch.arange(k.shape[3], device=self.device) < torch.tensor(
            [[len(r)] for r in rest], device=self.device
        )
        return levels + [Level(k, v, mask[:, None, :])], logits

    # -- scoring on the kept caches ------------------------------------------------------------------

    def score_on_kept(self, contexts: list[tuple[int, ...]], probs_of: dict) -> list[tuple[int, ...]]:
        """Score the contexts that continue a row of the last call's kept caches (at most SCORE_TAIL
        tokens past its cached part), running only those tokens; returns the contexts left over."""
        claims: dict[int, dict[int, tuple]] = {}  # kept batch -> row -> (context, cached tokens it uses)
        left = []
        for context in contexts:
            array, best = np.asarray(context, dtype=np.int64), None
            for b, batch in enumerate(self.kept):
                if common_prefix(batch.sequences[0][: batch.shared], array) < batch.shared:
                    continue
                for r, sequence in enumerate(batch.sequences):
                    used = min(common_prefix(sequence, array), batch.cached[r], len(context) - 1)
                    free = r not in claims.get(b, {})
                    if free and used >= batch.shared and (best is None or used > best[2]):
                        best = (b, r, used)
            if best is None or len(context) - best[2] > SCORE_TAIL:
                left.append(context)
            else:
                claims.setdefault(best[0], {})[best[1]] = (context, best[2])
        for b, claimed in claims.items():
            self._score_rows(self.kept[b], claimed, probs_of)
        return left

    def _score_rows(self, batch: Kept, claimed: dict[int, tuple], probs_of: dict) -> None:
        """Run each claimed row's context past its cached part on top of the batch's caches; every row
        runs (the shared levels need whole groups), unclaimed ones a single pad token."""
        rows, pad = len(batch.sequences), self.pad_token_id
        used = [claimed[r][1] if r in claimed else batch.prompt_lens[r] for r in range(rows)]
        new = [list(claimed[r][0][used[r] :]) if r in claimed else [pad] for r in range(rows)]
        width = max(len(x) for x in new)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in new], device=self.device)
        used_t = torch.tensor(used, device=self.device)
        positions = used_t[:, None] + torch.arange(width, device=self.device)
        *shared, prompts, generated = batch.levels
        # A context may leave its row's prompt or completion early: cut each row's cached part there.
        in_prompt = (used_t - batch.shared).clamp(max=prompts.mask.sum(-1).repeat_interleave(batch.n))
        in_generated = used_t - torch.tensor(batch.prompt_lens, device=self.device)
        span1 = torch.arange(prompts.k.shape[3], device=self.device)
        span2 = torch.arange(generated.k.shape[3], device=self.device)
        past = shared + [
            Level(prompts.k, prompts.v, (span1 < in_prompt[:, None]).view(-1, batch.n, len(span1))),
            Level(generated.k, generated.v, (span2 < in_generated[:, None])[:, None, :]),
        ]
        k, v = self._buffers(rows, width)
        lengths = torch.tensor([len(x) for x in new], device=self.device)
        logits = self.forward(ids, positions, past, k, v, 0, lengths - 1, lengths)
        for r, row in enumerate(torch.softmax(logits, dim=-1).cpu()):
            if r in claimed:
                probs_of[claimed[r][0]] = row
