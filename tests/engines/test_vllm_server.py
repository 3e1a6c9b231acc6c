"""vLLM's own OpenAI-compatible server (its CPU build, serving the embedded SmolLM2-135M), started here on
127.0.0.1, behind ``generator=openai``: for a run's roles, for ``metareward-eval-judge`` reading the
server's log-probabilities, and as escalation's strong judge.

    make test-engines          # or: .venv-engines/bin/python -m pytest tests/engines/test_vllm_server.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from metareward.compute.models import resolve_model
from metareward.config import ModelConfig
from metareward.store import layout, records
from tests.helpers import cli_env, run_cli

SERVED = "smol"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _served_requests(url: str) -> float:
    """Requests the server has finished (its Prometheus counter), all outcomes."""
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server's base URL; it is stopped (SIGTERM) after the module."""
    model_dir = resolve_model(ModelConfig(kind="smollm2_135m"))
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        # What metareward's own CPU engine sets (generation.vllm): a bounded KV cache, and no chunked
        # prefill, on which seeded requests crash the CPU engine.
        "--kv-cache-memory-bytes", str(2**30), "--no-enable-chunked-prefill",
    ]  # fmt: skip
    env = cli_env(VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the vLLM server did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=60)


def _eval_judge(out, *overrides: str) -> dict:
    """``metareward-eval-judge`` on 4 LLMBar pairs with ``overrides``; its result for the suite."""
    result = run_cli(
        "eval.suites=[llmbar_natural]",
        "eval.num_pairs=4",
        "eval.bootstrap_samples=20",
        "eval.winner_from=text_or_probs",
        *overrides,
        "--out",
        str(out),
        script="metareward-eval-judge",
        cwd=out.parent,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["suites"]["llmbar_natural"]


def _endpoint(url: str, where: str = "") -> list[str]:
    return [
        f"{where}generator.backend=openai",
        f"{where}generator.openai.base_urls=[{url}]",
        f"{where}generator.openai.model={SERVED}",
        f"{where}generator.progress=false",
    ]


@pytest.mark.slow
def test_a_runs_roles_are_served_by_the_vllm_server(server, tmp_path):
    before = _served_requests(server)
    result = run_cli(
        "model=smollm2_135m",
        *_endpoint(server),
        "iterations=1",
        "data.prompts_per_iteration=2",
        "actor.num_responses=2",
        "actor.max_new_tokens=48",
        "judge.num_judgements=2",
        "judge.max_new_tokens=96",
        "meta_judge.max_new_tokens=48",
        "judge.score_from=text_or_expected",
        "meta_judge.winner_from=text_or_probs",
        "train.on_no_pairs=carry",
        "tracking=none",
        "eval.enabled=false",
        f"runs_dir={tmp_path}",
        "run_name=served",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    iteration = tmp_path / "served" / "iter_1"
    responses = records.read_jsonl(iteration / layout.RESPONSES)
    judgements = records.read_jsonl(iteration / layout.JUDGEMENTS)
    assert len(responses) == 4 and all(r["text"] for r in responses)
    assert len(judgements) == 2 * len(responses)
    # Every judgement has a score: from its "Score: N", else from the server's log-probabilities.
    assert all(j["score"] is not None for j in judgements)
    assert {j["score_source"] for j in judgements} <= {"text", "expected"}
    # The actor's and judge's samples, and the scoring requests, all reached the server.
    assert _served_requests(server) - before >= len(responses) + len(judgements)


@pytest.mark.slow
def test_eval_judge_reads_the_servers_log_probabilities(server, tmp_path):
    out = tmp_path / "eval.json"
    # The model's own directory, for its tokenizer: the probability fallbacks render the chat template
    # here and ask the server to continue it.
    model_dir = resolve_model(ModelConfig(kind="smollm2_135m"))
    suite = _eval_judge(
        out,
        "model=hf",
        f"model.path={model_dir}",
        *_endpoint(server),
        "eval.protocols=[pointwise,pairwise]",
        "eval.max_new_tokens=32",
        "judge.score_from=text_or_expected",
    )
    for protocol in ("pointwise", "pairwise"):
        assert suite[protocol]["pairs"] == 4
    # With 32 tokens the model rarely finishes a verdict: the probabilities decide, and they came back.
    assert suite["pairwise"]["brier"] is not None
    rows = [json.loads(line) for line in (tmp_path / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 8


@pytest.mark.slow
def test_the_vllm_server_is_escalations_strong_judge(server, tmp_path):
    before = _served_requests(server)
    out = tmp_path / "cascade.json"
    suite = _eval_judge(
        out,
        "model=tiny",
        "generator.progress=false",
        "eval.protocols=[pairwise]",
        "eval.max_new_tokens=8",
        "eval.escalation.enabled=true",
        *_endpoint(server, "eval.escalation.judge."),
        "eval.escalation.judge.model.kind=hf",
        f"eval.escalation.judge.model.path={SERVED}",
    )
    curve = suite["pairwise"]["escalation"]
    assert curve, "no cascade curve"
    # The strong judge answered every pair, in both orders.
    assert _served_requests(server) - before >= 4 * 2
