"""Guards: the guarded numbers worked out by hand, their alarms, and a run whose stand-in judge scores
everything 5 (stopped with one line, then resumed with guards.on_alarm=warn)."""

from __future__ import annotations

import pytest

from metareward import report
from metareward.config import ConfigError, GuardsConfig, load_config
from metareward.generation import Completion, Usage
from metareward.loop import guards
from metareward.loop import run as loop
from metareward.loop.run import Run, RunStopped
from metareward.store import layout, records
from tests.engines_standin import StandInEngines

RESPONSES = [{"response_id": "p/r0", "num_tokens": 10}, {"response_id": "p/r1", "num_tokens": 30}]
JUDGEMENTS = [
    {"score": 5.0, "score_source": "text", "num_tokens": 10},
    {"score": 5.0, "score_source": "text", "num_tokens": 20},
    {"score": 3.2, "score_source": "expected", "num_tokens": 30},
    {"score": None, "score_source": None, "num_tokens": 40},
]
VERDICTS = [
    {"winner": "first", "winner_source": "text"},
    {"winner": "first", "winner_source": "text"},
    {"winner": "first", "winner_source": "probs"},
    {"winner": "second", "winner_source": "text"},
]
PREVIOUS = {"mean_response_tokens": 10.0, "mean_judgement_tokens": 20.0}


def test_guard_values_by_hand():
    values = guards.guard_values(RESPONSES, JUDGEMENTS, VERDICTS, PREVIOUS)
    assert values == {
        "top_score_share": pytest.approx(2 / 3),  # two of the three scored judgements give 5
        "mean_response_tokens": 20.0,
        "mean_judgement_tokens": 25.0,
        "response_tokens_growth": 1.0,  # 20 over 10
        "judgement_tokens_growth": 0.25,  # 25 over 20
        "judge_parse_failure_rate": 0.5,  # "expected" and None are not parsed from the text
        "meta_judge_parse_failure_rate": 0.25,
        "first_position_win_share": 0.75,
    }
    first = guards.guard_values(RESPONSES, [], [], None)
    assert first["response_tokens_growth"] is None and first["top_score_share"] is None
    assert first["first_position_win_share"] is None


def test_each_guard_alarms_above_its_threshold_and_not_when_off():
    values = guards.guard_values(RESPONSES, JUDGEMENTS, VERDICTS, PREVIOUS)
    cfg = GuardsConfig(
        max_top_score_share=0.5, max_length_growth=0.5, max_parse_failure_rate=0.4, max_position_win_share=0.7
    )
    found = guards.alarms(values, cfg)
    assert [a["guard"] for a in found] == [
        "score_saturation",
        "response_length_drift",
        "judge_parse_failures",
        "position_bias",
    ]
    assert found[0]["reason"] == (
        "score saturation: 67% of scored judgements give 5 (guards.max_top_score_share=0.5)"
    )
    assert "grew +100%" in found[1]["reason"] and "the first position wins 75%" in found[3]["reason"]
    # A meta-judge favouring the second position alarms the same way.
    second = guards.alarms({**values, "first_position_win_share": 0.2}, cfg)
    assert "the second position wins 80%" in second[-1]["reason"]
    off = GuardsConfig(
        max_top_score_share=None,
        max_length_growth=None,
        max_parse_failure_rate=None,
        max_position_win_share=None,
    )
    assert guards.alarms(values, off) == []
    # At the threshold is no alarm: only above it.
    assert (
        guards.alarms(
            values,
            GuardsConfig(
                max_top_score_share=2 / 3,
                max_length_growth=1.0,
                max_parse_failure_rate=0.5,
                max_position_win_share=0.75,
            ),
        )
        == []
    )
    marked = guards.with_alarms(values, cfg)
    assert marked["alarm_count"] == 4 and marked["alarmed"]["score_saturation"] == 1
    assert marked["alarmed"]["judgement_length_drift"] == 0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("guards.on_alarm=panic", "guards.on_alarm"),
        ("guards.max_top_score_share=1.5", "guards.max_top_score_share"),
        ("guards.max_position_win_share=0.3", "guards.max_position_win_share"),
        ("guards.max_length_growth=-1", "guards.max_length_growth"),
    ],
)
def test_bad_guard_settings_are_refused_by_their_full_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}="):
        load_config(None, [override])


# ---------------------------------------------------------------- a run with a saturated judge


class AlwaysFiveJudgeStandIn:
    """Stand-in for the model in every role: varied responses, and a judge that gives every one 5."""

    def __init__(self):
        self.usage = Usage()

    def generate(self, requests, params, desc=""):
        out = []
        for request in requests:
            is_judge = "Score: <total points>" in request[-1]["content"]
            texts = ["Perfect. Score: 5" if is_judge else "word " * (2 + j) for j in range(params.n)]
            out.append([Completion(t, num_tokens=len(t.split()), finish_reason="stop") for t in texts])
            self.usage.samples += params.n
        return out

    def close(self):
        pass


class RecordingTrackerStandIn:
    """Stand-in for the W&B tracker: keeps what is logged."""

    def __init__(self):
        self.logged, self.tables = [], []

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def log_table(self, name, columns, rows, step):
        self.tables.append((name, rows, step))

    def log_dpo_step(self, iteration, global_step, row):
        pass

    def log_artifact(self, artifact):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def _always_five(cfg) -> StandInEngines:
    return StandInEngines(cfg, lambda seat: AlwaysFiveJudgeStandIn())


RUN = [
    "model=tiny",
    "iterations=1",
    "data.prompts_per_iteration=2",
    "actor.num_responses=2",
    "judge.num_judgements=2",
    "generator.progress=false",
    "tracking=none",
    "eval.enabled=false",
    "train.on_no_pairs=carry",
]


def test_a_judge_that_scores_everything_5_stops_the_run_then_warn_goes_on(
    monkeypatch, tmp_path, tiny_model_dir
):
    trackers = []
    monkeypatch.setattr(
        loop, "make_tracker", lambda *args: trackers.append(RecordingTrackerStandIn()) or trackers[-1]
    )
    cfg = load_config(None, [*RUN, f"runs_dir={tmp_path}", "guards.on_alarm=stop"])
    with pytest.raises(RunStopped) as stopped:
        Run(cfg, engines=_always_five(cfg)).run()
    reason = str(stopped.value)
    assert "\n" not in reason
    assert reason.startswith("iteration 1 raised 1 guard alarm(s) before training: score saturation: 100%")
    assert reason.endswith("guards.on_alarm=warn goes on")
    directory = tmp_path / "default" / "iter_1"
    assert not (directory / layout.MODEL).exists() and not (directory / layout.METRICS).exists()
    ((step, logged),) = trackers[0].logged
    assert step == 1 and logged["guards"]["top_score_share"] == 1.0

    # guards.* may change on resume: with warn the run goes on (here carrying M_0 forward, as no pair
    # has a winner when every score is 5).
    cfg = load_config(None, [*RUN, f"runs_dir={tmp_path}", "guards.on_alarm=warn"])
    (metrics,) = Run(cfg, engines=_always_five(cfg)).run()
    assert [a["guard"] for a in metrics["guards"]["alarms"]] == ["score_saturation"]
    assert metrics["guards"]["alarmed"]["score_saturation"] == 1
    assert records.read_json(directory / layout.METRICS)["guards"] == metrics["guards"]
    assert "ALARM      score saturation: 100% of scored judgements give 5" in report.summary(metrics)
    (step, logged), *_ = trackers[1].logged
    assert step == 1 and logged["guards"]["alarm_count"] == 1
    ((name, rows, _),) = [t for t in trackers[1].tables if t[0] == "guard_alarms"]
    assert rows[0][:3] == ["score_saturation", 1.0, 0.9]


@pytest.mark.slow
def test_a_stopping_alarm_is_one_line_from_the_command(tmp_path, tiny_model_dir):
    from tests.helpers import run_cli

    # The random tiny model never writes "Score: N": every judge score comes from its probabilities.
    args = [*RUN, "judge.score_from=text_or_expected", "meta_judge.winner_from=text_or_probs"]
    args += ["actor.max_new_tokens=8", "judge.max_new_tokens=8", "meta_judge.max_new_tokens=4"]
    args += [f"runs_dir={tmp_path}", "guards.on_alarm=stop", "guards.max_parse_failure_rate=0.9"]
    done = run_cli(*args)
    assert done.returncode == 1
    # The last line (transformers may draw a loading bar above it) is the whole reason.
    line = done.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("metareward: error: iteration 1 raised")
        and "parse failures: 100% of judge scores" in line
    )
    assert "Traceback" not in done.stdout


def test_guard_numbers_and_alarms_reach_the_offline_wandb_run(tmp_path, tiny_model_dir):
    from tests.wandb_files import offline_files, read_run, rows_at

    cfg = load_config(None, [*RUN, f"runs_dir={tmp_path}", "tracking=offline"])
    Run(cfg, engines=_always_five(cfg)).run()
    logged = read_run(offline_files(tmp_path / "default")[0])
    assert logged["summary"]["guards/top_score_share"] == 1.0
    assert logged["summary"]["guards/alarmed/score_saturation"] == 1
    assert logged["summary"]["guards/alarm_count"] == 1
    assert rows_at(logged, "iteration", 1)["guard_alarms/_type"] == "table-file"
