"""Where a run's time goes, measured on this machine in one run: a JSON report.

Run it (about 4 minutes on 2 CPU cores)::

    make bench
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench.py --out bench.json
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench.py --model tiny --quick   # seconds, a smoke test
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench.py --endpoint-only        # the endpoint section alone

Sections of the report:

- ``matmul``: the fp32 (and bf16) matmul rate of this machine, the yardstick for MFU. A shared VM's
  rate wanders from second to second, so it is probed before, between and after the sections
  (``*_probes``) and MFU is given against the median probe.
- ``generation``: tokens/s of the transformers backend and of a plain batched ``model.generate``
  loop on the same prompts, dtype and sampling settings, their ratio, and decode MFU
  (tokens/s x 2 x parameters / the matmul rate of the dtype the model computes in, ``computes_in``:
  ``model.dtype: auto`` is bf16 on CPUs with native bf16) for both; ``decode_mfu_vs_float32``
  divides by the fp32 rate instead, to compare with machines without bf16. The two are timed in
  turns after one uncounted warm-up turn each, so a busy machine slows both alike; compare the
  ratio, not the absolute rates, across machines. ``engine`` says which engine of the backend
  served the model ("fast": its own decode loop; "transformers": ``model.generate``, for
  architectures the fast one is not proven on) and ``engine_reason`` why.
- ``generation.engines``: peers side by side on two workloads shaped like a run's (``actor``: short
  prompts, 128 new tokens; ``judge``: the rubric prompt with an answer, about 500 tokens, 16 new
  tokens): the project's transformers engine (``backend``), plain ``model.generate`` (``plain``),
  transformers' continuous batching (``continuous``, ``model.generate_batch``) and vLLM's CPU engine
  (``vllm``, eager, only where vLLM is installed, e.g. ``.venv-engines/bin/python scripts/bench.py``;
  else ``vllm_missing`` says why), all in the same dtype and sampling; tokens/s and ``vs_backend``.
- ``dpo``: DPO training MFU: (6 x parameters x trained tokens + 2 x parameters x tokens for the
  reference forward, unless it is precomputed before the first step, as the demo does) / training
  time / matmul rate of the dtype training computes in, over the optimiser steps after the first
  (which also allocates the optimiser state and gradients; ``mfu_with_first_step`` counts it).
  Training autocasts to bf16 where ``train.dpo.precision: auto`` finds native bf16
  (``computes_in``; ``mfu_vs_float32`` divides by the fp32 rate instead). The count is the usual
  one: the LM head, which runs on completion positions only, is counted on every token.
- ``endpoint``: the OpenAI-compatible backend (``generator=openai``) at its default settings against a
  stand-in server on 127.0.0.1 (tests/openai_standin.py, in a process of its own) that answers each
  request after a fixed delay: requests per second and the mean number of requests in flight (the
  stand-in's request-seconds / wall time), against the ideal ``max_in_flight / delay`` (every slot
  busy all the time), after one uncounted round of ``max_in_flight`` requests that opens the
  connections. Even a perfect client loses the last partial round of a run
  (600 requests, 64 in flight: at most 600 / 640 of the ideal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metareward.compute import allocator

GIB = 1024**3


def peak_memory_gib() -> float:
    """This process's peak resident memory. Linux's VmHWM, where ru_maxrss would carry over the peak
    of the process that forked it (the bench itself, for the demo child)."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return round(int(line.split()[1]) * 1024 / GIB, 3)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def matmul_rate(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of a square matmul in ``dtype`` on all torch threads (best of several timed runs)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: first calls pick kernels and allocate
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def count_parameters(model) -> int:
    # Tied embeddings count once: the LM head matmul uses them on every token.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def bench_requests(count: int) -> list[list[dict]]:
    from metareward.config import DataConfig
    from metareward.data import load_prompts

    return [p["messages"] for p in load_prompts(DataConfig())[:count]]


def plain_generate(model, tokenizer, stop_ids, requests, params, batch_size) -> int:
    """The baseline: left-padded batches through ``model.generate``; returns the tokens generated
    (up to each row's first stop token, as the backend counts them)."""
    from metareward.generation.sampling import generation_config

    config = generation_config(params, tokenizer.pad_token_id, stop_ids)
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in requests]
    rows = [text for text in texts for _ in range(params.n)]
    tokenizer.padding_side = "left"
    torch.manual_seed(params.seed)
    generated = 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = tokenizer(
                rows[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
            )
            out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
            for row in out.tolist():
                generated += next((k for k, t in enumerate(row) if t in stop_ids), len(row))
    return generated


def generation_section(model_dir: str, model_cfg, prompts: int, params, batch_size: int, rounds: int):
    """Backend and plain loop in turns on the same requests, after one uncounted warm-up turn of each
    (first calls allocate buffers and set up kernels); each round uses a fresh seed."""
    from dataclasses import replace

    from metareward.config import GeneratorConfig
    from metareward.generation.hf import HFGenerator

    requests = bench_requests(prompts)
    gen = HFGenerator(model_dir, model_cfg, GeneratorConfig(batch_size=batch_size, progress=False))
    totals = {"backend": [0, 0.0], "plain": [0, 0.0]}
    for round_ in range(-1, rounds):
        seeded = replace(params, seed=params.seed + round_)
        start = time.perf_counter()
        tokens = plain_generate(gen.model, gen.tokenizer, gen.stop_ids, requests, seeded, batch_size)
        if round_ >= 0:
            totals["plain"][0] += tokens
            totals["plain"][1] += time.perf_counter() - start
        gen.memo = {}  # the warm-up's answers must not be served from memory
        start = time.perf_counter()
        out = gen.generate(requests, seeded)
        if round_ >= 0:
            totals["backend"][1] += time.perf_counter() - start
            totals["backend"][0] += sum(c.num_tokens for cs in out for c in cs)
    report = {
        "requests": len(requests),
        "n": params.n,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "batch_size": batch_size,
        "dtype": model_cfg.dtype,
        "computes_in": str(gen.model.dtype).removeprefix("torch."),
        "engine": gen.engine,
        "engine_reason": gen.engine_reason,
        "rounds": rounds,
        "parameters": count_parameters(gen.model),
    }
    gen.close()
    for name, (tokens, seconds) in totals.items():
        report[name] = {"generated_tokens": tokens, "seconds": round(seconds, 3)}
        report[name]["tokens_per_s"] = round(tokens / seconds, 2)
    report["backend_vs_plain"] = round(report["backend"]["tokens_per_s"] / report["plain"]["tokens_per_s"], 3)
    return report


def continuous_generate(model, tokenizer, stop_ids, requests, params) -> int:
    """transformers' continuous batching (``model.generate_batch``): every request queued at once;
    returns the tokens generated, counted as the backend counts them."""
    from transformers import ContinuousBatchingConfig

    from metareward.generation.sampling import generation_config

    config = generation_config(params, tokenizer.pad_token_id, stop_ids)
    config.num_return_sequences = params.n
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in requests]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    # Left to itself the paged cache takes 90% of the machine's free memory on a CPU; size it to the
    # requests instead (every sample's prompt and answer), as the other engines are sized.
    page = ContinuousBatchingConfig().page_size
    blocks = sum(math.ceil((len(row) + params.max_new_tokens) / page) for row in ids) * params.n
    cache = ContinuousBatchingConfig(num_blocks=blocks)
    torch.manual_seed(params.seed)
    # No inference_mode here: the batching runs in a thread of its own, and an inference tensor made
    # in this one fails its in-place updates there (every request then fails, empty).
    outputs = model.generate_batch(
        ids, generation_config=config, continuous_batching_config=cache, progress_bar=False
    )
    generated = 0
    for output in outputs.values():
        if output.error:
            raise RuntimeError(f"continuous batching failed a request: {output.error}")
        row = list(output.generated_tokens)
        generated += next((k for k, t in enumerate(row) if t in stop_ids), len(row))
    return generated


def generated_tokens(generator, requests, params) -> int:
    return sum(c.num_tokens for samples in generator.generate(requests, params) for c in samples)


def workloads(prompts: int, quick: bool) -> dict[str, tuple[list[list[dict]], int]]:
    """The two shapes of a run's generation, as (requests, max_new_tokens): the actor's (short prompts,
    long answers) and the judge's (the rubric prompt, about 500 tokens with an answer in it, shared by
    every request, and a short verdict)."""
    from metareward.judging.prompts import Templates

    requests = bench_requests(prompts)
    answer = " ".join(["The answer explains each step in turn and gives an example."] * 12)
    judge = [Templates().judge_messages(messages, answer) for messages in requests]
    return {"actor": (requests, 8 if quick else 128), "judge": (judge, 4 if quick else 16)}


def engines_section(model_dir: str, model_cfg, prompts: int, params, batch_size: int, quick: bool) -> dict:
    """The project's transformers engine, plain ``model.generate``, transformers' continuous batching
    and vLLM's CPU engine (where it is installed: ``make test-engines`` builds such an environment) on
    the same requests, sampling and dtype, for each workload: tokens/s and each one's ratio to the
    project's engine. Per workload every engine runs one uncounted warm-up turn, then one timed turn,
    one engine after the other."""
    from dataclasses import replace

    from metareward.compute.availability import vllm_problem
    from metareward.config import GeneratorConfig, VLLMSettings
    from metareward.generation.hf import HFGenerator

    hf = HFGenerator(model_dir, model_cfg, GeneratorConfig(batch_size=batch_size, progress=False))
    runners = {
        "backend": lambda requests, p: generated_tokens(hf, requests, p),
        "plain": lambda requests, p: plain_generate(
            hf.model, hf.tokenizer, hf.stop_ids, requests, p, batch_size
        ),
        "continuous": lambda requests, p: continuous_generate(
            hf.model, hf.tokenizer, hf.stop_ids, requests, p
        ),
    }
    report: dict = {"computes_in": str(hf.model.dtype).removeprefix("torch."), "engine": hf.engine}
    vllm = None
    if (problem := vllm_problem()) is None:
        from metareward.generation.vllm import VLLMGenerator

        # Eager, as small runs and the tests use it: compiling would add about two minutes of start-up.
        settings = GeneratorConfig(backend="vllm", progress=False, vllm=VLLMSettings(enforce_eager=True))
        vllm_model = replace(model_cfg, dtype=report["computes_in"])  # the same dtype as the others
        start = time.perf_counter()
        vllm = VLLMGenerator(model_dir, vllm_model, settings)
        report["vllm_start_seconds"] = round(time.perf_counter() - start, 1)
        runners["vllm"] = lambda requests, p: generated_tokens(vllm, requests, p)
    else:
        report["vllm_missing"] = problem
    for name, (requests, max_new_tokens) in workloads(prompts, quick).items():
        shaped = replace(params, max_new_tokens=max_new_tokens)
        texts = [
            hf.tokenizer.apply_chat_template(r, tokenize=False, add_generation_prompt=True) for r in requests
        ]
        lengths = [len(hf.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        row: dict = {"requests": len(requests), "mean_prompt_tokens": round(statistics.mean(lengths), 1)}
        row["max_new_tokens"] = max_new_tokens
        for turn in ("warm-up", "timed"):
            for engine, generate in runners.items():
                hf.memo = {}  # no answer from an earlier turn is served from memory
                if vllm is not None:  # nor a prompt's KV from vLLM's prefix cache (its own batch's may)
                    vllm.llm.reset_prefix_cache()
                started = time.perf_counter()
                tokens = generate(requests, replace(shaped, seed=shaped.seed + (turn == "timed")))
                seconds = time.perf_counter() - started
                if turn == "timed":
                    row[engine] = {"generated_tokens": tokens, "seconds": round(seconds, 3)}
                    row[engine]["tokens_per_s"] = round(tokens / seconds, 2)
        for engine in runners:
            row[engine]["vs_backend"] = round(row[engine]["tokens_per_s"] / row["backend"]["tokens_per_s"], 3)
        report[name] = row
    hf.close()
    if vllm is not None:
        vllm.close()
    return report


def endpoint_section(requests: int, delay_s: float) -> dict:
    """The endpoint backend at its default settings against a stand-in server answering after ``delay_s``."""
    from dataclasses import replace

    from metareward.config import GeneratorConfig, ModelConfig, OpenAISettings
    from metareward.generation import SamplingParams
    from metareward.generation.openai import OpenAIGenerator

    # The stand-in lives with the tests, which import from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.openai_standin import stand_in_process

    defaults = OpenAISettings()
    params = SamplingParams(n=1, max_new_tokens=16, seed=0)
    with stand_in_process(delay_s) as (url, stats):
        api = replace(defaults, base_urls=[url], model="stand-in")
        gen = OpenAIGenerator(
            "no-local-model", ModelConfig(kind="tiny"), GeneratorConfig(progress=False, openai=api)
        )
        warm_up = [[{"role": "user", "content": f"warm-up {i}"}] for i in range(defaults.max_in_flight)]
        gen.generate(warm_up, params)
        before, spent_before = stats(), gen.usage.copy()
        start = time.perf_counter()
        gen.generate([[{"role": "user", "content": f"request {i}"}] for i in range(requests)], params)
        seconds = time.perf_counter() - start
        after, spent = stats(), gen.usage.since(spent_before)
        gen.close()
    ideal = defaults.max_in_flight / delay_s
    return {
        "delay_s": delay_s,
        "requests": requests,
        "max_in_flight": defaults.max_in_flight,
        "warm_up_requests": len(warm_up),
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 2),
        "ideal_requests_per_s": round(ideal, 2),
        "rate_vs_ideal": round(requests / seconds / ideal, 3),
        "mean_in_flight": round((after["busy_seconds"] - before["busy_seconds"]) / seconds, 2),
        "ideal_in_flight": defaults.max_in_flight,
        "most_in_flight_at_the_server": after["max_in_flight"],
        "http_requests": spent["http_requests"],
        "retries": spent["retries"],
        "latency_p50_s": spent["latency_p50_s"],
        "latency_p95_s": spent["latency_p95_s"],
    }


def mfu(flops_per_s: float, gflops: float) -> float:
    return round(flops_per_s / (gflops * 1e9), 4)


def add_decode_mfu(report: dict, rates: dict) -> None:
    """Decode MFU against the matmul rate of the dtype the model computes in (and against fp32's)."""
    own = rates[getattr(torch, report["computes_in"])]
    for name in ("backend", "plain"):
        flops_per_s = report[name]["tokens_per_s"] * 2 * report["parameters"]
        report[name]["decode_mfu"] = mfu(flops_per_s, own)
        report[name]["decode_mfu_vs_float32"] = mfu(flops_per_s, rates[torch.float32])


def dpo_pairs(count: int) -> list[dict]:
    """Human preference pairs (hh-rlhf, bundled) as TRL conversational rows."""
    from metareward.data import bundled_path
    from metareward.store.records import read_jsonl

    rows = read_jsonl(bundled_path("hh_rlhf_helpful_dev.jsonl"))[:count]
    return [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def dpo_section(model_dir: str, settings, steps: int) -> dict:
    """One warm-up optimiser step, then ``steps`` more, of the demo's DPO settings on bundled human
    preference pairs. The first step also allocates the optimiser state and gradient buffers (about
    1.5 GiB of fresh pages for this model), which later steps reuse: it is reported on its own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from metareward.training import train_dpo

    rows = dpo_pairs((1 + steps) * settings.batch_size * settings.gradient_accumulation_steps)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        start = time.perf_counter()
        log = train_dpo(model_dir, rows, settings, Path(tmp) / "model", seed=0)
        wall = time.perf_counter() - start
    with torch.device("meta"):
        params_count = count_parameters(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        )
    # TRL logs the tokens trained so far (prompt and completion of both sides, no padding) each step.
    seen = [e["num_tokens"] for e in log["log_history"] if "loss" in e]
    tokens = [int(b - a) for a, b in zip([0, *seen[:-1]], seen, strict=True)]
    seconds = log["step_seconds"]
    return {
        "pairs": len(rows),
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "computes_in": log["computes_in"],
        # Precomputed: the reference forward runs before the first step, outside the timed steps.
        "reference_forward": "precomputed" if settings.precompute_ref_log_probs else "in each step",
        "parameters": params_count,
        "steps": log["global_steps"],
        "step_tokens": tokens,
        "step_seconds": seconds,
        "first_step_seconds": seconds[0],
        "seconds_per_step": round(sum(seconds[1:]) / len(seconds[1:]), 3),
        "trained_tokens": sum(tokens[1:]),
        "train_seconds": round(sum(seconds[1:]), 3),
        "wall_seconds_with_load_and_save": round(wall, 3),
    }


def add_dpo_mfu(report: dict, rates: dict) -> None:
    """(6 x parameters x tokens + 2 x parameters x tokens of the reference forward, where it runs in the
    steps) / seconds / rate, over the steps after the first; ``mfu_with_first_step`` counts every step."""
    flops_per_token = (6 + (2 if report["reference_forward"] == "in each step" else 0)) * report["parameters"]
    own = rates[getattr(torch, report["computes_in"])]
    steady = flops_per_token * report["trained_tokens"] / report["train_seconds"]
    every = flops_per_token * sum(report["step_tokens"]) / sum(report["step_seconds"])
    report["mfu"] = mfu(steady, own)
    report["mfu_vs_float32"] = mfu(steady, rates[torch.float32])
    report["mfu_with_first_step"] = mfu(every, own)


# ---------------------------------------------------------------- the demo iteration (child process)


def instrument(stats: dict) -> None:
    """Wrap the loop's stage functions so that each adds its seconds and generator usage to ``stats``."""
    import metareward.engines.local as engines
    import metareward.loop.pairs as pairs
    import metareward.loop.run as loop
    import metareward.loop.stages as stages
    import metareward.training as training

    def wrap(module, name: str, label: str, has_ctx: bool) -> None:
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            generator = getattr(args[0], "generator", None) if has_ctx else None
            before = generator.usage.copy() if generator is not None else None
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                entry = stats.setdefault(label, {"seconds": 0.0})
                entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 3)
                # The process's peak after the stage first ran: the stage that raises it needs the memory.
                entry.setdefault("peak_memory_gib", peak_memory_gib())
                if before is not None:
                    for key, value in generator.usage.since(before).items():
                        # Percentiles do not add up: a stage run again reports its latest.
                        is_sum = not key.startswith("latency_")
                        entry[key] = entry.get(key, 0) + value if is_sum else value

        setattr(module, name, wrapper)

    for name in ("actor", "judge", "meta_judge"):
        wrap(stages, name, name, has_ctx=True)
    wrap(engines, "make_generator", "load_model", has_ctx=False)
    # The loop calls the pair builder as pairs.build_pairs, or under its own name if it imports it.
    wrap(loop if hasattr(loop, "build_pairs") else pairs, "build_pairs", "pairs", has_ctx=False)
    wrap(training, "train_dpo", "dpo", has_ctx=False)


def demo_child(out: Path, overrides: list[str]) -> None:
    from metareward.cli import load_config
    from metareward.loop.run import Run
    from metareward.store import records

    stats: dict = {}
    instrument(stats)
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    history = Run(cfg).run()
    wall = time.perf_counter() - start
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    judge_pairs = sum(
        len(records.read_jsonl(run_dir / f"iter_{m['iteration']}" / "judge_pairs.jsonl")) for m in history
    )
    usage = [m["usage"] for m in history if "usage" in m]
    result = {
        "wall_seconds": round(wall, 3),
        "peak_memory_gib": peak_memory_gib(),
        "stages": stats,
        "generated_tokens": sum(s.get("generated_tokens", 0) for s in stats.values()),
        "judge_pairs": judge_pairs,
        "actor_pairs": sum(m["pairs"]["actor"]["pairs"] for m in history),
    }
    if usage:
        result["metrics_usage"] = usage
    write_json(out, result)


def demo_section(overrides: list[str], runs_dir: Path) -> dict:
    """One demo run in a child process (fresh memory peak), then the same run again: a resume."""

    def child(label: str) -> dict:
        out = runs_dir / f"{label}.json"
        command = [sys.executable, __file__, "--demo-child", str(out), "--", *overrides]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        result = json.loads(out.read_text())
        result["process_seconds"] = round(time.perf_counter() - start, 3)
        return result

    first = child("first")
    resumed = child("resumed")
    meta, pairs = first["stages"].get("meta_judge", {}), first["judge_pairs"]
    return {
        "overrides": overrides,
        **first,
        # None when no judge pair formed (then the meta-judge's work bought nothing).
        "meta_judge_calls_per_judge_pair": round(meta.get("samples", 0) / pairs, 3) if pairs else None,
        "meta_judge_tokens_per_judge_pair": round(meta.get("generated_tokens", 0) / pairs, 3)
        if pairs
        else None,
        "resumed": {
            "wall_seconds": resumed["wall_seconds"],
            "generated_tokens": resumed["generated_tokens"],
        },
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run(args) -> dict:
    from dataclasses import replace

    if args.endpoint_only:
        return {"machine": {"cpus": os.cpu_count(), "load_average_start": load_average()}, **endpoint(args)}

    from metareward.cli import load_config
    from metareward.compute.models import resolve_model
    from metareward.generation import SamplingParams

    quick = args.quick
    # The demo's own settings (model dtype, DPO batch) are the ones measured, unless overridden here.
    chosen = [f"model={args.model}", *([f"model.dtype={args.dtype}"] if args.dtype else [])]
    demo_cfg = load_config(None, ["experiment=demo", *chosen])
    model_cfg = demo_cfg.model
    model_dir = resolve_model(model_cfg)
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_start": load_average(),
            "allocator_keeps_freed_memory": allocator.keeping,
        },
        "model": {"kind": model_cfg.kind, "dtype": model_cfg.dtype},
    }
    size = 256 if quick else 2048
    # fp16 only when generation computes in it: CPUs without native fp16 take minutes for one matmul.
    dtypes = (torch.float32, torch.bfloat16, *([torch.float16] if model_cfg.dtype == "float16" else []))
    # The rate of a shared VM wanders from second to second (here: fp32 from 130 to 190 GFLOP/s), so
    # it is probed before, between and after the sections, and MFU is given against the median probe.
    probes: dict = {dtype: [] for dtype in dtypes}

    def probe() -> None:
        for dtype in dtypes:
            probes[dtype].append(round(matmul_rate(dtype, size, seconds=1.0), 2))

    probe()
    params = SamplingParams(
        n=1, temperature=0.8, top_p=0.95, max_new_tokens=8 if quick else args.max_new_tokens, seed=1
    )
    report["generation"] = generation_section(
        model_dir,
        model_cfg,
        4 if quick else args.prompts,
        params,
        args.batch_size,
        1 if quick else args.rounds,
    )
    report["generation"]["engines"] = engines_section(
        model_dir, model_cfg, 4 if quick else args.prompts, params, args.batch_size, quick
    )
    probe()
    dpo = demo_cfg.train.dpo
    if quick:
        dpo = replace(dpo, batch_size=1, gradient_accumulation_steps=1)
    report["dpo"] = dpo_section(model_dir, dpo, 1 if quick else args.dpo_steps)
    probe()
    if not args.skip_demo:
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
            overrides = [
                "experiment=demo",
                *chosen,
                f"iterations={args.demo_iterations}",
                "run_name=bench",
                f"runs_dir={tmp}",
                "tracking=none",
                "generator.progress=false",
                *(QUICK_DEMO if quick else []),
                *args.overrides,
            ]
            report["demo"] = demo_section(overrides, Path(tmp))
        probe()
    report |= endpoint(args)
    rates = {dtype: statistics.median(values) for dtype, values in probes.items()}
    report["matmul"] = {
        **{f"{str(d).removeprefix('torch.')}_gflops": round(r, 2) for d, r in rates.items()},
        **{f"{str(d).removeprefix('torch.')}_probes": values for d, values in probes.items()},
        "size": size,
    }
    add_decode_mfu(report["generation"], rates)
    add_dpo_mfu(report["dpo"], rates)
    report["machine"]["load_average_end"] = load_average()
    return report


def endpoint(args) -> dict:
    requests, delay = (128, 0.05) if args.quick else (args.endpoint_requests, args.endpoint_delay)
    return {"endpoint": endpoint_section(requests, delay)}


# Sizes that keep the smoke test of the demo section to seconds on the tiny model.
QUICK_DEMO = [
    "data.prompts_per_iteration=2",
    "actor.max_new_tokens=8",
    "judge.max_new_tokens=8",
    "meta_judge.max_new_tokens=4",
    "generator.chunk_size=4",
]


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where the report is written")
    parser.add_argument("--model", default="smollm2_135m", choices=["smollm2_135m", "tiny"])
    parser.add_argument(
        "--dtype",
        default=None,
        help="model.dtype for generation (default: the demo's; training follows train.dpo.precision)",
    )
    parser.add_argument("--prompts", type=int, default=32, help="generation: bundled prompts, n=1 each")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="generation: turns of plain loop and backend")
    parser.add_argument("--dpo-steps", type=int, default=3, help="DPO: optimiser steps after the first")
    parser.add_argument("--demo-iterations", type=int, default=1)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--endpoint-requests", type=int, default=600, help="endpoint: requests timed")
    parser.add_argument(
        "--endpoint-delay", type=float, default=0.3, help="endpoint: the stand-in's delay (s)"
    )
    parser.add_argument("--endpoint-only", action="store_true", help="only the endpoint section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke test)")
    parser.add_argument("--demo-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the demo run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.demo_child is not None:
        demo_child(args.demo_child, args.overrides)
        return None
    report = run(args)
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    print(f"report written to {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    # As the metareward commands do, so that the figures are those of a run.
    allocator.keep_freed_memory()
    main()
