"""Smoke test of scripts/bench.py on the tiny model: every section reports finite, positive numbers and
the resumed demo run generates nothing. No timing is asserted (the numbers depend on the machine).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_scripts_bench.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# Whole runs of the loop (make test-fast leaves it out).
@pytest.mark.slow
def test_quick_report_on_the_tiny_model(bench, tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--model", "tiny", "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == report

    matmul = report["matmul"]
    assert positive(matmul["float32_gflops"]) and positive(matmul["bfloat16_gflops"])
    # Probed before, between and after the sections; MFU is against the median probe.
    assert len(matmul["float32_probes"]) == 4
    assert matmul["float32_gflops"] == pytest.approx(statistics.median(matmul["float32_probes"]), abs=0.01)

    generation = report["generation"]
    assert positive(generation["parameters"]) and positive(generation["backend_vs_plain"])
    # The tiny model is a Llama: the backend's own decode loop served it, and the report says so.
    assert generation["engine"] == "fast" and "LlamaForCausalLM" in generation["engine_reason"]
    # The tiny model computes in fp32, so both yardsticks are the fp32 matmul rate.
    assert generation["computes_in"] == "float32"
    assert generation["backend"]["decode_mfu"] == generation["backend"]["decode_mfu_vs_float32"]
    for engine in ("backend", "plain"):
        for key in ("generated_tokens", "seconds", "tokens_per_s", "decode_mfu", "decode_mfu_vs_float32"):
            assert positive(generation[engine][key]), (engine, key)

    # The peers on the actor's and the judge's workload, each timed on the same requests.
    engines = generation["engines"]
    assert engines["judge"]["mean_prompt_tokens"] > 2 * engines["actor"]["mean_prompt_tokens"]
    for workload in ("actor", "judge"):
        row = engines[workload]
        peers = ["backend", "plain", "continuous", *(["vllm"] if "vllm_missing" not in engines else [])]
        for engine in peers:
            assert positive(row[engine]["tokens_per_s"]), (workload, engine)
        assert row["backend"]["vs_backend"] == 1.0
        assert row["plain"]["vs_backend"] == pytest.approx(
            row["plain"]["tokens_per_s"] / row["backend"]["tokens_per_s"], abs=1e-3
        )

    dpo = report["dpo"]
    for key in ("steps", "trained_tokens", "train_seconds", "seconds_per_step", "mfu", "mfu_with_first_step"):
        assert positive(dpo[key]), key
    # One warm-up step, reported on its own, then the measured ones.
    assert dpo["steps"] == len(dpo["step_seconds"]) == len(dpo["step_tokens"]) == 2
    assert dpo["trained_tokens"] == sum(dpo["step_tokens"][1:])
    assert dpo["first_step_seconds"] == dpo["step_seconds"][0]

    demo = report["demo"]
    assert positive(demo["wall_seconds"]) and positive(demo["peak_memory_gib"])
    stages = demo["stages"]
    for stage in ("actor", "judge"):
        assert positive(stages[stage]["generated_tokens"]) and positive(stages[stage]["seconds"]), stage
    # The meta-judge runs only when some response has two usable judgements.
    assert stages["meta_judge"]["generated_tokens"] >= 0
    assert positive(stages["dpo"]["seconds"])
    generated = sum(stages[s]["generated_tokens"] for s in ("actor", "judge", "meta_judge"))
    assert demo["generated_tokens"] == generated
    # A finished iteration, run again, is read back from disk: nothing is generated twice.
    assert demo["resumed"]["generated_tokens"] == 0
    check_endpoint(report["endpoint"], requests=128)


def check_endpoint(endpoint: dict, requests: int) -> None:
    assert endpoint["requests"] == endpoint["http_requests"] == requests
    assert endpoint["ideal_requests_per_s"] == pytest.approx(
        endpoint["max_in_flight"] / endpoint["delay_s"], 0.01
    )
    assert endpoint["rate_vs_ideal"] == pytest.approx(
        endpoint["requests_per_s"] / endpoint["ideal_requests_per_s"], abs=0.01
    )
    for key in ("requests_per_s", "mean_in_flight", "latency_p50_s", "latency_p95_s"):
        assert positive(endpoint[key]), key
    assert endpoint["mean_in_flight"] <= endpoint["ideal_in_flight"] == endpoint["max_in_flight"]
    assert endpoint["most_in_flight_at_the_server"] <= endpoint["max_in_flight"]
    assert endpoint["latency_p50_s"] >= endpoint["delay_s"]


def test_the_endpoint_section_alone(bench, tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(
        ["--endpoint-only", "--endpoint-requests", "100", "--endpoint-delay", "0.05", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == report
    assert set(report) == {"machine", "endpoint"}
    check_endpoint(report["endpoint"], requests=100)
