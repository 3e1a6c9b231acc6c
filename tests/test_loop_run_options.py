"""Run-level options and failures: the dry-run plan, configs refused before anything is written,
degenerate models (stop or carry the model forward), roles on their own models, hand-edited files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from metareward.config import load_config
from metareward.generation import Completion, Usage
from metareward.loop.run import Run, RunStopped
from metareward.store import layout, records
from tests.engines_standin import StandInEngines
from tests.helpers import run_cli

# Text-only scores and verdicts, so what the stand-ins write is all there is.
STAND_IN_RUN = [
    "model=tiny",
    "data.prompts_per_iteration=3",
    "actor.num_responses=3",
    "judge.num_judgements=3",
    "generator.chunk_size=4",
    "generator.progress=false",
    "train.dpo.learning_rate=1e-3",
    "train.dpo.max_length=256",
    "tracking=none",
    "eval.enabled=false",
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, extra_env={"HF_HUB_OFFLINE": "1"}, cwd=cwd, timeout=300)


# --- dry run -------------------------------------------------------------------------------------


def _plan_rows(stdout: str) -> dict[tuple[str, str], list[int]]:
    rows = {}
    for line in stdout.splitlines():
        match = re.match(
            r"\s*(\d+)\s+(actor|judge|meta_judge)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", line
        )
        if match:
            numbers = [int(x.replace(",", "")) for x in match.groups()[2:]]
            rows[(match.group(1), match.group(2))] = numbers
    return rows


def test_paper_dry_run_prices_the_run_without_a_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6000)))
    done = cli(
        "experiment=paper",
        "dry_run=true",
        f"data.path={prompts}",
        f"runs_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = _plan_rows(done.stdout)
    # 5,000 prompts x K=7; x N=11 judgements; one response per prompt meta-judged over 11*10 ordered pairs.
    assert rows[("1", "actor")] == [5000, 35000, 0, 35000 * 1024]
    assert rows[("1", "judge")] == [35000, 385000, 0, 385000 * 1024]
    assert rows[("1", "meta_judge")] == [550000, 550000, 0, 550000 * 1024]
    assert {t for t, _ in rows} == {"1", "2", "3", "4"}
    # DPO over 8 data-parallel processes (the shipped ZeRO-3 accelerate config), 4 pairs each.
    assert "≤ 10000 pairs" in done.stdout and "≤ 313 optimizer steps" in done.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_dry_run_counts_the_probability_fallbacks_and_notes_a_small_prompt_set(tmp_path):
    done = cli(
        "experiment=demo",
        "dry_run=true",
        "data.prompts_per_iteration=500",
        "judge.num_judgements=3",
        "meta_judge.max_new_tokens=48",
        f"runs_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "the prompt set holds 175" in done.stdout
    rows = _plan_rows(done.stdout)
    # The demo's judge reads a 0..5 distribution for every judgement (score_from=text_or_expected); the
    # evaluation of M_0 and each M_t is planned in rows of its own.
    assert rows[("1", "judge")] == [525, 1575, 1575, 1575 * 192]
    assert rows[("2", "meta_judge")] == [175 * 6, 175 * 6, 175 * 6, 175 * 6 * 48]


# --- refused before anything is written -----------------------------------------------------------


def test_a_bad_setting_is_refused_before_the_run_directory_exists(tmp_path):
    done = cli("actor.num_responses=1", f"runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "actor.num_responses=1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_directory_is_refused_before_any_model_loads(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the runs directory should be")
    done = cli("model=tiny", "tracking=none", f"runs_dir={blocker / 'runs'}", cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot write to the run directory" in done.stderr and str(blocker) in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# --- stand-in models ------------------------------------------------------------------------------


class ScriptedModelStandIn:
    """Stand-in for a model in all three roles: ``reply(role, content)`` writes every completion."""

    def __init__(self, reply, model_dir: str = ""):
        self.reply, self.model_dir, self.usage, self.closed = reply, model_dir, Usage(), False

    def render(self, messages):
        return "\n".join(m["content"] for m in messages)

    def generate(self, requests, params, desc=""):
        out = []
        for request in requests:
            content = request[-1]["content"]
            role = "meta_judge" if "Judgement A" in content else "judge" if "Score:" in content else "actor"
            texts = [self.reply(role, content, j) for j in range(params.n)]
            out.append([Completion(t, num_tokens=len(t.split()), finish_reason="stop") for t in texts])
            self.usage.samples += params.n
        return out

    def next_token_probs(self, texts, candidates):
        raise AssertionError("text-only settings never read probabilities")

    def close(self):
        self.closed = True


def _varied(role, content, j):
    """Responses of varied length, scores that differ, verdicts for both positions."""
    if role == "actor":
        return "word " * (3 + 4 * j)
    if role == "judge":
        # Responses of 3, 7 and 11 words score differently; judgements of one response disagree.
        return f"Reasoning {j}. Score: {1 + (content.count('word') + j) % 5}"
    return f"Judgement {'A' if j % 2 == 0 and len(content) % 2 else 'B'} is better. Winner: Judgement A"


DEGENERATE = {
    # Nothing the judge writes parses as a score.
    "unparsable judgements": lambda role, c, j: (
        "I would rather not say." if role == "judge" else _varied(role, c, j)
    ),
    # Every response gets the same score: no pair has a winner.
    "equal scores": lambda role, c, j: "Fine. Score: 3" if role == "judge" else _varied(role, c, j),
    # The actor says nothing: one distinct (empty) response per prompt.
    "empty responses": lambda role, c, j: "" if role == "actor" else _varied(role, c, j),
}


def _stand_in(cfg, reply, **options) -> StandInEngines:
    return StandInEngines(cfg, lambda seat: ScriptedModelStandIn(reply, seat.model_dir), **options)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_a_degenerate_model_stops_the_run_with_the_reason(case, tmp_path, tiny_model_dir):
    cfg = load_config(None, [*STAND_IN_RUN, f"runs_dir={tmp_path}", "iterations=2"])
    with pytest.raises(RunStopped, match="iteration 1 produced no preference pairs") as stopped:
        Run(cfg, engines=_stand_in(cfg, DEGENERATE[case])).run()
    reason = {
        "unparsable judgements": "no scored responses: 3 prompt",
        "equal scores": "all equal scores: 3 prompt",
        "empty responses": "one scored response: 3 prompt",
    }[case]
    assert reason in str(stopped.value) and "train.on_no_pairs=carry" in str(stopped.value)
    directory = tmp_path / "default" / "iter_1"
    assert (directory / layout.JUDGEMENTS).is_file(), "the stage files stay for a person to read"
    assert not (directory / layout.MODEL).exists() and not (directory / layout.METRICS).exists()


def test_carry_forward_keeps_the_model_and_goes_on(tmp_path, tiny_model_dir):
    cfg = load_config(
        None, [*STAND_IN_RUN, f"runs_dir={tmp_path}", "iterations=2", "train.on_no_pairs=carry"]
    )
    history = Run(cfg, engines=_stand_in(cfg, DEGENERATE["unparsable judgements"])).run()
    assert [m["iteration"] for m in history] == [1, 2]
    for t in (1, 2):
        model = tmp_path / "default" / f"iter_{t}" / layout.MODEL
        log = json.loads((model / "training_log.json").read_text())
        assert log["carried_forward"] and log["global_steps"] == 0 and "no scored responses" in log["reason"]
        # M_t is M_{t-1}, byte for byte.
        assert (model / "model.safetensors").read_bytes() == (
            Path(tiny_model_dir) / "model.safetensors"
        ).read_bytes()
        assert history[t - 1]["judge"]["parse_failure_rate"] == 1.0


def test_a_meta_judge_that_always_answers_a_gives_no_judge_pairs_but_the_actor_trains(
    tmp_path, tiny_model_dir
):
    cfg = load_config(None, [*STAND_IN_RUN, f"runs_dir={tmp_path}", "iterations=1"])
    (metrics,) = Run(cfg, engines=_stand_in(cfg, _varied)).run()  # every verdict ends "Winner: Judgement A"
    assert metrics["meta_judge"]["first_position_win_share"] == 1.0
    assert metrics["pairs"]["judge"]["pairs"] == 0
    assert metrics["pairs"]["actor"]["pairs"] > 0 and metrics["train"]["steps"] >= 1


# --- roles on their own models --------------------------------------------------------------------


def test_a_role_on_its_own_model_keeps_it_while_the_others_move_to_m_t(tmp_path, tiny_model_dir):
    overrides = [
        "iterations=2",
        "roles.meta_judge.own_model=true",
        "roles.meta_judge.model.kind=hf",
        "roles.meta_judge.model.path=acme/external-judge",  # a hub id: checked as a name only
    ]
    cfg = load_config(None, [*STAND_IN_RUN, f"runs_dir={tmp_path}", *overrides])
    # The seed stays the real tiny model (it is trained); the meta-judge's model is only a name here.
    engines = _stand_in(cfg, _varied, own_model_dirs=lambda model: f"/models/{model.path}")
    Run(cfg, engines=engines).run()
    calls, made = engines.role_calls, engines.made
    run_dir = tmp_path / "default"
    # Iteration 1: actor and judge share M_0's generator; iteration 2 they move to M_1.
    assert calls[0]["actor"] is calls[0]["judge"] and calls[0]["actor"].model_dir == tiny_model_dir
    assert calls[1]["actor"].model_dir == str(run_dir / "iter_1" / layout.MODEL)
    # The meta-judge is its own, fixed model in both iterations, and every generator was closed.
    for per_role in calls:
        assert per_role["meta_judge"] is not per_role["actor"]
        assert per_role["meta_judge"].model_dir == "/models/acme/external-judge"
    assert len(made) == 4 and all(g.closed for g in made)
    assert all(g.usage.samples > 0 for g in made)
    # Each iteration's dataset card says who played which role.
    card = (run_dir / "iter_2" / layout.DATASET_CARD).read_text()
    m1 = run_dir / "iter_1" / layout.MODEL
    assert f"Actor: M_1 (`{m1}`); judge: M_1 (`{m1}`); meta-judge: `acme/external-judge` (a fixed" in card


def test_roles_default_to_the_trained_model_and_accept_overrides():
    cfg = load_config(None, ["roles.judge.own_model=true", "roles.judge.generator.backend=openai"])
    assert cfg.roles.judge.own_model and cfg.roles.judge.generator.backend == "openai"
    assert not cfg.roles.actor.own_model and not cfg.roles.meta_judge.own_model


# --- hand-edited stage files ----------------------------------------------------------------------


@pytest.mark.parametrize("with_checksums", [True, False], ids=["as-written", "hand-assembled"])
@pytest.mark.parametrize(
    ("edit", "line", "message"),
    [
        (
            lambda rows: rows[2].update(response_id="ghost/r9"),
            3,
            r"judgements.jsonl:3: response_id 'ghost/r9'",
        ),
        (
            lambda rows: rows[4].update(judgement_id=rows[1]["judgement_id"]),
            5,
            r"judgements.jsonl:5: .* already on line 2",
        ),
    ],
)
def test_a_hand_edited_stage_file_is_refused_with_file_and_line(
    edit, line, message, with_checksums, tmp_path, tiny_model_dir
):
    """Against the checksums its stage recorded; in a folder put together by hand (no checksums.json),
    by the links between the files."""
    cfg = load_config(
        None, [*STAND_IN_RUN, f"runs_dir={tmp_path}", "iterations=1", "train.on_no_pairs=carry"]
    )
    engines = _stand_in(cfg, DEGENERATE["equal scores"])
    Run(cfg, engines=engines).run()
    directory = tmp_path / "default" / "iter_1"
    for name in (layout.METRICS, layout.ACTOR_PAIRS, layout.JUDGE_PAIRS):
        (directory / name).unlink()
    rows = records.read_jsonl(directory / layout.JUDGEMENTS)
    edit(rows)
    records.write_jsonl(directory / layout.JUDGEMENTS, rows)
    if not with_checksums:
        (directory / layout.CHECKSUMS).unlink()
    else:
        message = rf"judgements.jsonl:{line}: not the row its stage wrote"
    with pytest.raises((RunStopped, records.RecordError), match=message):
        Run(cfg, engines=engines).run()
    assert not (directory / layout.METRICS).exists() and not (directory / layout.ACTOR_PAIRS).exists()


# --- prompts too long for the model ---------------------------------------------------------------


@pytest.mark.parametrize(("mode", "kept", "counts"), [("skip", 3, (1, 0)), ("truncate", 4, (0, 1))])
def test_prompts_too_long_are_skipped_or_truncated_and_counted(mode, kept, counts, tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    texts = ["Short one?", "Another short one?", "word " * 400 + "end?", "Last short one?"]
    data.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    overrides = [
        f"runs_dir={tmp_path}",
        "iterations=1",
        "train.on_no_pairs=carry",
        "data=jsonl",
        f"data.path={data}",
        "data.prompts_per_iteration=4",
        "data.max_prompt_tokens=64",
        f"data.long_prompts={mode}",
    ]
    cfg = load_config(None, [*STAND_IN_RUN, *overrides])
    (metrics,) = Run(cfg, engines=_stand_in(cfg, DEGENERATE["equal scores"])).run()
    prompts = records.read_jsonl(tmp_path / "default" / "iter_1" / layout.PROMPTS)
    assert len(prompts) == kept == metrics["prompts"]
    assert (metrics["prompt_fit"]["skipped_too_long"], metrics["prompt_fit"]["truncated"]) == counts
    if mode == "truncate":
        long_one = next(p for p in prompts if p["messages"][-1]["content"].startswith("word"))
        assert "end?" not in long_one["messages"][-1]["content"]


def test_the_plan_counts_every_suite_under_every_protocol():
    from metareward.loop.plan import plan

    cfg = load_config(
        None,
        [
            "iterations=1",
            "eval.suites=[pandalm,llmbar_natural]",
            "eval.protocols=[pointwise,pairwise]",
            "eval.num_pairs=10",
            "eval.num_judgements=2",
            "eval.winner_from=text_or_probs",
            "eval.win_rate=false",
        ],
    )
    rows = {(r["iteration"], r["stage"]): r for r in plan(cfg)}
    # 2 suites x 10 pairs x 2 responses (pointwise) or 2 orders (pairwise).
    assert rows[(0, "eval pointwise")]["requests"] == 40 and rows[(0, "eval pointwise")]["samples"] == 80
    assert rows[(0, "eval pointwise")]["scored_texts"] == 0  # judge.score_from=text reads no distribution
    assert rows[(1, "eval pairwise")]["requests"] == 40 and rows[(1, "eval pairwise")]["scored_texts"] == 40


def test_the_dataset_card_names_a_role_behind_an_endpoint_by_its_served_name(tmp_path):
    from metareward.loop.dataset_card import dataset_card

    overrides = [
        "roles.meta_judge.own_model=true",
        "roles.meta_judge.generator.backend=openai",
        "roles.meta_judge.generator.openai.model=gpt-4o",
    ]
    card = dataset_card(tmp_path, load_config(None, overrides), 2, "/runs/x/iter_1/model")
    assert "; meta-judge: `gpt-4o` (a fixed model of its own, behind an endpoint)." in card
