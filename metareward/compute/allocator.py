"""How the process's C allocator hands memory back to the system: set once by each entry point.

glibc serves every allocation above a threshold (128 KiB, rising to at most 32 MiB) with fresh pages
from ``mmap`` and unmaps them on free, so each new logits, KV or gradient buffer of a generation or
training step page-faults in again; on a small VM those faults are a large share of a decode step.
``keep_freed_memory`` keeps freed memory in the heap for the next buffer instead. The process's peak
is what it is anyway; memory it no longer uses is reused rather than given back to the system (as
PyTorch's CUDA caching allocator does on GPUs).

CPU processes only: where CUDA does the work those buffers live in GPU memory, and host memory kept
at its peak (weights loaded on the way to the GPU) would only be lost to the rest of the machine.
Linux with glibc only. A ``GLIBC_TUNABLES`` that sets ``glibc.malloc.*`` is left to rule.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory at the top of the heap beyond this is given back to the system.
TRIM_THRESHOLD = 2**31 - 1
# Whether keep_freed_memory took effect in this process.
keeping = False
# Present where a GPU driver is loaded (NVIDIA; AMD's ROCm): without any, no process can use CUDA.
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def uses_cuda() -> bool:
    """Whether this process's PyTorch sees a CUDA (or ROCm) device. Where no GPU driver is loaded (a
    CPU machine, e.g. a dry run there) it answers without importing torch; elsewhere it counts devices
    through NVML, which, unlike ``torch.cuda.is_available()``, leaves CUDA uninitialised, so that
    processes forked later (vLLM's workers) can still use it."""
    if "torch" not in sys.modules and not any(Path(path).exists() for path in GPU_DRIVER_FILES):
        return False
    import torch

    return torch.cuda.device_count() > 0


def keep_freed_memory(cuda: bool | None = None) -> bool:
    """Serve allocations from the heap (no per-buffer ``mmap``) and keep freed memory for reuse, in a
    process that computes on CPU: a no-op where ``cuda`` is true (default: :func:`uses_cuda`).
    Returns whether the setting took effect."""
    if not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if uses_cuda() if cuda is None else cuda:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) or none by that name
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    global keeping
    keeping = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return keeping
