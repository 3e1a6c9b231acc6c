"""The fast engine's building blocks for a Llama-family decoder layer: attention of new queries over
key/value parts that many rows share (:func:`attend`, :func:`mask_bias`), rotate-half RoPE, RMSNorm as
one op, and linears with their weights fused (q/k/v, gate/up) and, on CPU, laid out once for oneDNN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, parts: list[tuple], scale: float) -> torch.Tensor:
    """Attention of one new query per row, ``q`` (rows, heads, d), over key/value parts, exactly.

    Each part is (k, v, bias) with k, v (groups, kv_heads, L, d) and bias (groups * kv_heads, 1 or
    rows per group * heads per kv head, L) from :func:`mask_bias`, or None: the queries of a group's
    rows meet its keys in one matmul, so a part that many rows share is read once. One softmax runs
    over the scores of all parts together."""
    rows, heads, d = q.shape
    q = q * scale
    scores, shapes = [], []
    for k, _, bias in parts:
        groups, kv_heads, length, _ = k.shape
        per, share = rows // groups, heads // kv_heads
        grouped = q.view(groups, per, kv_heads, share, d).transpose(1, 2).reshape(groups * kv_heads, -1, d)
        keys = k.reshape(groups * kv_heads, length, d).transpose(1, 2)
        # The mask as an added bias inside the matmul: one op instead of a matmul and a masked fill.
        s = torch.bmm(grouped, keys) if bias is None else torch.baddbmm(bias, grouped, keys)
        scores.append(
            s.view(groups, kv_heads, per, share, length).transpose(1, 2).reshape(rows, heads, length)
        )
        shapes.append((groups, kv_heads, per, share, length))
    weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out = 0
    for (_, v, _), w, (groups, kv_heads, per, share, length) in zip(
        parts, weights.split([shape[-1] for shape in shapes], dim=-1), shapes, strict=True
    ):
        w = (
            w.reshape(groups, per, kv_heads, share, length)
            .transpose(1, 2)
            .reshape(groups * kv_heads, -1, length)
        )
        o = torch.bmm(w, v.reshape(groups * kv_heads, length, d)).view(groups, kv_heads, per, share, d)
        out = out + o.transpose(1, 2).reshape(rows, heads * d)
    return out


def mask_bias(
    mask: torch.Tensor | None, kv_heads: int, share: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """A level's mask (groups, 1 or rows per group, L) as the additive bias :func:`attend` takes: 0 where
    valid, -inf elsewhere, laid out per (group, kv head) and (row, query head)."""
    if mask is None:
        return None
    groups, per, length = mask.shape
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    bias = bias[:, None, :, None, :].expand(groups, kv_heads, per, share if per > 1 else 1, length)
    return bias.reshape(groups * kv_heads, -1, length)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Llama's rotate-half form) of ``x`` (rows, T, heads, d)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Linear:
    """``x @ weight.T + bias``. On CPU the weight is laid out once, at load, the way oneDNN's matmul
    kernels read it (what torch.compile's freezing does): a plain linear re-lays it on every call,
    and at decode sizes that costs about as much as the multiply (measured: 1.6x faster for the LM
    head at 32 rows in bf16, 2x in fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
        self.weight, self.out_features = weight, weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        self.packed = None
        if weight.device.type == "cpu" and cpu_packs_weights(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


@functools.cache
def cpu_packs_weights(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's pre-packed linear for ``dtype`` on this CPU (the ops
    torch.compile's CPU freezing uses; private, so checked once per dtype on a small matrix, with a
    plain linear as the fallback; bf16 needs AVX512 or AVX-NE-CONVERT)."""
    try:
        w, x = torch.randn(8, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        return torch.backends.mkldnn.is_available() and torch.allclose(
            out.float(), (x @ w.T).float(), atol=tolerance, rtol=tolerance
        )
    except (AttributeError, RuntimeError):
        return False


def fuse(linears: tuple, rows_hint: int) -> Linear:
    """One Linear computing ``linears`` side by side (outputs concatenated). Their weights move into
    one matrix and the modules keep views into it, so the model still works and holds no copy."""
    weight = torch.cat([linear.weight.data for linear in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([linear.bias.data for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        end = start + linear.weight.shape[0]
        linear.weight.data = weight[start:end]
        if has_bias:
            linear.bias.data = bias[start:end]
        start = end
    return Linear(weight, bias, rows_hint)


@dataclass
class LayerLinears:
    """A decoder layer's projections: q/k/v fused into one matmul, then o, gate/up fused, down."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """A Llama RMSNorm module's function as one fused op."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def layer_linears(layer, rows: int) -> LayerLinears:
    """The layer's projections, q/k/v and gate/up each fused into one matmul (larger, instead of
    several small ones per token)."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerLinears(
        qkv=fuse((attn.q_proj, attn.k_proj, attn.v_proj), rows),
        o=fuse((attn.o_proj,), rows),
        gate_up=fuse((mlp.gate_proj, mlp.up_proj), rows),
        down=fuse((mlp.down_proj,), rows),
    )
