"""Whether a device multiplies bf16 natively: where it does, generation (``model.dtype: auto``) and
training (``train.dpo.precision: auto``) compute in bf16, about twice as fast as fp32 there."""

from __future__ import annotations

import torch

from metareward.compute.availability import cpu_flags


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX; elsewhere torch emulates bf16 on CPU and it is slower than fp32."""
    flags = cpu_flags() or set()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()
