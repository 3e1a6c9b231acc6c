"""Prompt synthesis (data=synthetic): ROUGE-L, the filters and their counts on a scripted stand-in
prompter, a pool written by the tiny model, resuming after SIGKILL, and the dry run's count."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from metareward.config import SynthesisConfig, load_config
from metareward.generation import Completion, Usage, make_generator
from metareward.loop import synthesis
from metareward.loop.plan import plan
from metareward.loop.synthesis import NearDuplicates, first_task, rouge_l, rouge_tokens
from metareward.store import layout, records
from tests.helpers import run_cli

SEEDS = [
    {"prompt_id": "sea", "messages": [{"role": "user", "content": "Write a short poem about the sea."}]},
    {"prompt_id": "trees", "messages": [{"role": "user", "content": "Name three kinds of trees."}]},
]


# ---------------------------------------------------------------- ROUGE-L and parsing


def test_rouge_l_is_the_lcs_f_measure():
    a, b = rouge_tokens("The cat sat on the mat."), rouge_tokens("the cat lay on a MAT")
    assert a == ["the", "cat", "sat", "on", "the", "mat"]
    # LCS "the cat on mat" = 4 of 6 and 6 tokens: F1 = 2 * 4 / 12.
    assert rouge_l(a, b) == pytest.approx(2 / 3)
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0
    index = NearDuplicates(0.6)
    index.add(b)
    index.add(rouge_tokens("something else entirely"))
    assert index.similar(a)
    index.threshold = 0.7
    assert not index.similar(a)


def test_first_task_is_whole_when_the_completion_goes_on_or_stops():
    assert first_task("Task 3: Explain tides.", "stop") == ("Explain tides.", True)
    assert first_task("Explain tides.\nTask 4: Name a river and", "length") == ("Explain tides.", True)
    assert first_task("Explain tides and the", "length") == ("Explain tides and the", False)
    assert first_task("**Task 3:** Sum 2 and 3.\n**Task 4:** more", "stop") == ("Sum 2 and 3.", True)


# ---------------------------------------------------------------- the filters, on a scripted prompter


class ScriptedPrompterStandIn:
    """Stand-in for the prompter model: chunk i's completions are ``script[i]`` (text, finish)."""

    def __init__(self, script: list[list[tuple[str, str]]], run_seed: int = 0, fail_at: int | None = None):
        self.by_seed = {synthesis.chunk_seed(run_seed, i): chunk for i, chunk in enumerate(script)}
        self.index_of = {synthesis.chunk_seed(run_seed, i): i for i in range(len(script))}
        self.fail_at, self.usage, self.requests, self.closed = fail_at, Usage(), [], False

    def generate(self, requests, params, desc=""):
        if self.index_of[params.seed] == self.fail_at:
            raise RuntimeError("the stand-in prompter fails here, as a killed process would stop")
        self.requests += requests
        chunk = self.by_seed[params.seed]
        assert len(chunk) == len(requests) and params.n == 1
        return [[Completion(text, len(text.split()), finish)] for text, finish in chunk]

    def close(self):
        self.closed = True


SCRIPT = [
    [
        ("", "stop"),  # empty
        ("Describe the long history of ancient Rome and", "length"),  # truncated
        ("Hi there", "stop"),  # too_short (min_words=4)
        (" ".join(["word"] * 15), "stop"),  # too_long (max_words=12)
    ],
    [
        ("Task 3: write a short poem about  the sea.", "stop"),  # duplicate of a seed
        ("Write a short poem about the blue sea.", "stop"),  # ROUGE-L 14/15 with a seed
        ("List three uses of copper in industry.\nTask 4: And another", "length"),  # kept: s0
        ("List three uses of copper in modern industry.", "stop"),  # ROUGE-L 14/15 with s0
    ],
    [
        ("Explain how vaccines train the immune system.", "stop"),  # kept: s1
        ("Explain why the sky looks blue at noon.", "stop"),  # the pool is full: surplus
        ("Give two tips for learning a language.", "stop"),
        ("Summarise the plot of a famous novel.", "stop"),
    ],
]
# Three chunks of four requests: a budget of 6 requests per pool prompt.
SMALL = SynthesisConfig(pool_size=2, num_shots=2, max_words=12, request_budget=6.0)


def test_filters_leave_out_each_kind_of_bad_task_and_count_it(tmp_path):
    prompter = ScriptedPrompterStandIn(SCRIPT)
    rows, stats = synthesis.build_pool(prompter, SEEDS, SMALL, tmp_path, seed=0, chunk_size=4)
    assert [(r["prompt_id"], r["messages"][0]["content"]) for r in rows] == [
        ("s0", "List three uses of copper in industry."),
        ("s1", "Explain how vaccines train the immune system."),
    ]
    assert sorted(rows[0]["shot_ids"]) == ["sea", "trees"]
    assert stats == {
        "pool_size": 2,
        "requests": 12,
        "kept": 2,
        "left_out": {
            "empty": 1,
            "truncated": 1,
            "too_short": 1,
            "too_long": 1,
            "duplicate": 1,
            "similar_to_seed": 1,
            "similar_to_pool": 1,
            "surplus": 3,
        },
    }
    # The request shows the shots as numbered tasks and leaves the next one open.
    content = prompter.requests[0][0]["content"]
    assert "Task 1: " in content and "Task 2: " in content and content.endswith("Task 3:")
    # On disk: the pool, what was left out and why, and the counts; no chunks left behind.
    assert records.read_jsonl(tmp_path / synthesis.POOL) == rows
    assert [r["reason"] for r in records.read_jsonl(tmp_path / synthesis.REJECTED)][:4] == [
        "empty",
        "truncated",
        "too_short",
        "too_long",
    ]
    assert records.read_json(tmp_path / synthesis.POOL_STATS) == stats
    assert not list(tmp_path.glob("*.parts"))
    # A finished pool is read back, the prompter never asked again.
    again = ScriptedPrompterStandIn([])
    assert synthesis.build_pool(again, SEEDS, SMALL, tmp_path, seed=0, chunk_size=4) == (rows, stats)
    assert again.requests == []


def test_a_synthesis_stopped_mid_way_resumes_to_the_same_pool(tmp_path):
    whole = synthesis.build_pool(ScriptedPrompterStandIn(SCRIPT), SEEDS, SMALL, tmp_path / "a", 0, 4)
    with pytest.raises(RuntimeError, match="stand-in prompter fails"):
        synthesis.build_pool(ScriptedPrompterStandIn(SCRIPT, fail_at=2), SEEDS, SMALL, tmp_path / "b", 0, 4)
    assert not (tmp_path / "b" / synthesis.POOL).exists()
    resumed = ScriptedPrompterStandIn(SCRIPT)
    assert synthesis.build_pool(resumed, SEEDS, SMALL, tmp_path / "b", 0, 4) == whole
    assert len(resumed.requests) == 4, "only the missing chunk is generated again"


def test_an_exhausted_budget_says_what_the_filters_left_out(tmp_path):
    prompter = ScriptedPrompterStandIn([[("", "stop")] * 4])
    cfg = SynthesisConfig(pool_size=2, num_shots=2, request_budget=1.0)
    with pytest.raises(synthesis.SynthesisError) as stopped:
        synthesis.build_pool(prompter, SEEDS, cfg, tmp_path, seed=0, chunk_size=4)
    message = str(stopped.value)
    assert "filled 0 of data.synthetic.pool_size=2 prompts in 4 requests" in message
    assert "left out: empty 4" in message and "data.synthetic.request_budget" in message
    assert "\n" not in message


# ---------------------------------------------------------------- the tiny model


def test_the_tiny_model_fills_a_pool_with_no_duplicate_and_nothing_near_a_seed(tmp_path, tiny_model_dir):
    cfg = load_config(
        None,
        [
            "model=tiny",
            "data=synthetic",
            "data.synthetic.pool_size=12",
            "data.synthetic.num_shots=3",
            "data.synthetic.max_new_tokens=32",
            "generator.progress=false",
        ],
    )
    from metareward.data import load_prompts

    seeds = load_prompts(cfg.data)
    assert len(seeds) == 175  # the bundled Self-Instruct seed tasks
    generator = make_generator(tiny_model_dir, cfg.model, cfg.generator)
    try:
        rows, stats = synthesis.build_pool(
            generator, seeds, cfg.data.synthetic, tmp_path, seed=0, chunk_size=6
        )
    finally:
        generator.close()
    texts = [r["messages"][0]["content"] for r in rows]
    assert len(rows) == 12 == stats["kept"] and len({r["prompt_id"] for r in rows}) == 12
    assert len({synthesis.normalised(t) for t in texts}) == 12
    seed_tokens = [rouge_tokens(synthesis.seed_text(s)) for s in seeds]
    for i, text in enumerate(texts):
        tokens = rouge_tokens(text)
        assert 4 <= len(text.split()) <= 150
        assert max(rouge_l(tokens, s) for s in seed_tokens) <= 0.7
        assert all(rouge_l(tokens, rouge_tokens(other)) <= 0.7 for other in texts[:i])
    assert stats["requests"] == 12 + sum(stats["left_out"].values())


# ---------------------------------------------------------------- SIGKILL mid-synthesis (the whole CLI)

SYNTHETIC_RUN = [
    "model=tiny",
    "data=synthetic",
    "data.synthetic.pool_size=12",
    "data.synthetic.num_shots=3",
    "data.synthetic.max_new_tokens=32",
    "data.prompts_per_iteration=5",
    "generator.chunk_size=4",
    "generator.progress=false",
    "actor.max_new_tokens=8",
    "iterations=1",
    "tracking=none",
    "eval.enabled=false",
]


def run_synthetic(runs: Path, name: str, kill_at: str) -> subprocess.CompletedProcess:
    return run_cli(*SYNTHETIC_RUN, f"runs_dir={runs}", f"run_name={name}", kill_at=kill_at)


@pytest.mark.slow
def test_synthesis_killed_mid_way_resumes_to_the_pool_of_an_uninterrupted_run(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    # Both runs stop once the pool is written and the actor has written its first chunk.
    whole = run_synthetic(runs, "whole", "chunk:responses.jsonl")
    assert whole.returncode == -signal.SIGKILL, whole.stderr[-2000:]
    killed = run_synthetic(runs, "killed", f"chunk:{synthesis.POOL}:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = runs / "killed"
    assert not (run_dir / synthesis.POOL).exists()
    parts = sorted(p.name for p in (run_dir / (synthesis.POOL + ".parts")).iterdir())
    assert parts == ["000000.jsonl", "000001.jsonl"]
    resumed = run_synthetic(runs, "killed", "chunk:responses.jsonl")
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-2000:]
    for name in (synthesis.POOL, synthesis.REJECTED):
        assert records.read_jsonl(run_dir / name) == records.read_jsonl(runs / "whole" / name), name
    assert len(records.read_jsonl(run_dir / synthesis.POOL)) == 12
    stats = json.loads((run_dir / synthesis.POOL_STATS).read_text())
    assert stats == json.loads((runs / "whole" / synthesis.POOL_STATS).read_text())
    assert not list(run_dir.glob("*.parts"))
    # Iteration 1 draws its prompts from the pool.
    prompts = records.read_jsonl(run_dir / "iter_1" / layout.PROMPTS)
    pool = {r["prompt_id"]: r["messages"] for r in records.read_jsonl(run_dir / synthesis.POOL)}
    assert len(prompts) == 5 and all(pool[p["prompt_id"]] == p["messages"] for p in prompts)


# ---------------------------------------------------------------- the dry run


def test_dry_run_counts_the_prompters_requests(tmp_path):
    cfg = load_config(
        None,
        ["data=synthetic", "data.synthetic.pool_size=10", "generator.chunk_size=4", "eval.enabled=false"],
    )
    (pool_row,) = [row for row in plan(cfg) if row["stage"] == "prompter"]
    # A budget of 4 requests per prompt: 40 requests, in 10 chunks of 4; each up to 256 new tokens.
    assert (pool_row["iteration"], pool_row["requests"], pool_row["max_generated_tokens"]) == (
        "pool",
        40,
        10240,
    )
    done = run_cli(
        "data=synthetic", "data.synthetic.pool_size=10", "dry_run=true", f"runs_dir={tmp_path}", timeout=300
    )
    assert done.returncode == 0, done.stderr
    # generator.chunk_size 32: ceil(40 / 32) = 2 chunks, 64 requests.
    assert any(line.split()[:3] == ["pool", "prompter", "64"] for line in done.stdout.splitlines())
    assert "the prompt set holds 10" in done.stdout, "iterations draw from the pool, not the seed set"
    assert not (tmp_path / "default").exists()
