"""What the views of a run read from its directory: one summary row per iteration (the table's
columns, the plots' series), the unfinished iterations, sample pairs with their scores and lengths,
and the latest cascade curves.

A key missing from metrics.json is None in a row. Iteration 0 is the seed model M_0, from
RUN_DIR/eval_0.json.
"""

from __future__ import annotations

import math
from pathlib import Path

from metareward.store import layout, records

# fmt: off
# (summary-row key, column header, format, dotted paths into metrics.json: the first found wins)
COLUMNS = [
    ("iteration", "iter", "{}", ()),
    ("prompts", "prompts", "{}", ("actor.prompts", "prompts")),
    ("responses", "resp", "{}", ("actor.responses",)),
    ("mean_score", "score", "{:.2f}", ("actor.mean_response_score", "judge.mean_score")),
    ("judge_parse_failure_rate", "parse-fail", "{:.0%}", ("judge.parse_failure_rate",)),
    ("first_position_win_share", "1st-wins", "{:.0%}", ("meta_judge.first_position_win_share",)),
    ("actor_pairs", "a-pairs", "{}", ("actor.num_pairs", "pairs.actor.pairs")),
    ("judge_pairs", "j-pairs", "{}", ("pairs.judge.pairs",)),
    ("chosen_mean_tokens", "ch-tok", "{:.1f}", ("actor.chosen_mean_tokens",)),
    ("rejected_mean_tokens", "rej-tok", "{:.1f}", ("actor.rejected_mean_tokens",)),
    ("dpo_loss", "DPO-loss", "{:.4f}", ()),  # from TRAIN_KEYS
    ("judge_accuracy", "judge-acc", "{:.3f}", ()),  # the first suite and protocol, see _suite_keys
]
# more row keys, for the plots and --json
PATHS = {
    "actor_win_rate": ("eval_actor.win_rate",),
    "actor_win_rate_ci_low": ("eval_actor.ci_low",), "actor_win_rate_ci_high": ("eval_actor.ci_high",),
    "mean_response_tokens": ("actor.mean_response_tokens",),
    "order_agreement": ("meta_judge.order_agreement",),
}
# DPO numbers: train.<key minus "dpo_">, else this key of the last TRL log-history entry with a loss
TRAIN_KEYS = {"dpo_loss": "loss", "rewards_margins": "rewards/margins",
              "rewards_accuracies": "rewards/accuracies"}
# fmt: on
LEGEND = (
    "iter 0 = the seed model M_0; score = mean response score (0-5); parse-fail = judge scores not parsed "
    "from text; 1st-wins = meta-judge verdicts won by the first position; ch-tok / rej-tok = mean tokens "
    "of chosen / rejected responses; DPO-loss = last logged loss; judge-acc = the judge's accuracy on the "
    "first suite and protocol of eval.suites and eval.protocols (all of them: --json, and the report)"
)
# Row keys per suite and protocol ("acc:pandalm/pointwise"), from metrics.json's "eval".
SUITE_KEYS = {
    "acc:": "accuracy",
    "consistency:": "position_consistency",
    "longer:": "longer_preference",
    # The benchmark's own score, 0..100 (judging/official.py).
    "official:": "official.score",
}


def metric_at(data, path: str):
    """The value at dotted ``path`` ("eval_actor.win_rate") of nested dicts, or None."""
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def num(value) -> float | int | None:
    """``value`` if it is a finite number (not a bool), else None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _row(iteration: int, metrics: dict) -> dict:
    row: dict = {"iteration": iteration}
    for key, paths in [*((key, paths) for key, _, _, paths in COLUMNS[1:]), *PATHS.items()]:
        row[key] = next((v for path in paths if (v := num(metric_at(metrics, path))) is not None), None)
    train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    history = train.get("log_history") or metrics.get("train_log") or []
    last = next((e for e in reversed(history) if isinstance(e, dict) and "loss" in e), {})
    for key, logged in TRAIN_KEYS.items():
        value = num(train.get(key.removeprefix("dpo_")))
        row[key] = value if value is not None else num(last.get(logged))
    for key, value in _suite_keys(metrics.get("eval")).items():
        row[key] = value
    row["judge_accuracy"] = next(
        (v for k, v in row.items() if k.startswith("acc:") and "_ci_" not in k), None
    )
    histogram = metric_at(metrics, "actor.score_histogram")
    ok = isinstance(histogram, list) and histogram and all(num(c) is not None for c in histogram)
    row["score_histogram"] = histogram if ok else None
    return row


def _suite_keys(evaluated) -> dict:
    """``{"acc:<suite>/<protocol>": accuracy, ..._ci_low, ..._ci_high, "consistency:...", "longer:...",
    "official:...": the benchmark's own score}``
    of an iteration's judge evaluation ``{suite: {protocol: metrics}}``, in its order."""
    found: dict = {}
    for suite, protocols in (evaluated or {}).items():
        for protocol, m in (protocols if isinstance(protocols, dict) else {}).items():
            if not isinstance(m, dict):
                continue
            for prefix, metric in SUITE_KEYS.items():
                found[f"{prefix}{suite}/{protocol}"] = num(metric_at(m, metric))
            found[f"acc:{suite}/{protocol}_ci_low"] = num(m.get("ci_low"))
            found[f"acc:{suite}/{protocol}_ci_high"] = num(m.get("ci_high"))
    return found


def iterations(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, directory) of each ``iter_<t>`` directory of a run, in order."""
    return [(layout.iteration_of(p), p) for p in layout.iteration_dirs(run_dir)]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / layout.CONFIG).is_file() or bool(iterations(path)))


def load_summary(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(summary rows, unfinished iterations) of a run directory."""
    rows, unfinished = [], []
    data = records.read_json(run_dir / layout.EVAL_0) if (run_dir / layout.EVAL_0).is_file() else None
    if isinstance(data, dict):  # the loop writes {"judge": {...}, ...}; a bare eval dict works too
        rows.append(_row(0, {"eval": data["judge"] if isinstance(data.get("judge"), dict) else data}))
    for t, directory in iterations(run_dir):
        if (directory / layout.METRICS).is_file():
            metrics = records.read_json(directory / layout.METRICS)
            rows.append(_row(t, metrics if isinstance(metrics, dict) else {}))
        else:
            files = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))  # + *.parts
            unfinished.append({"iteration": t, "files": files})
    return rows, unfinished


def _text(messages) -> str:
    last = messages[-1] if isinstance(messages, list) and messages else {"content": messages or ""}
    return str(last.get("content", "") if isinstance(last, dict) else last)


def sample_pairs(directory: Path, role: str, n: int | None) -> list[dict]:
    """The first ``n`` (None: all) ``role`` pairs of an iteration directory, with scores and lengths."""
    actor = role == "actor"
    pairs = records.read_jsonl(directory / (layout.ACTOR_PAIRS if actor else layout.JUDGE_PAIRS))[:n]
    responses = directory / layout.RESPONSES
    rows = records.read_jsonl(responses) if actor and responses.is_file() else []
    tokens = {r.get("response_id"): r.get("num_tokens") for r in rows}
    out = []
    for pair in pairs:
        prompt_id = pair.get("prompt_id") or str(pair.get("response_id")).rpartition("/")[0]
        row = {"role": role, "prompt_id": prompt_id}
        if actor:  # the judge prompt holds the response; judge pairs show its id instead
            users = [m for m in pair.get("prompt") or [] if isinstance(m, dict) and m.get("role") == "user"]
            row["prompt"] = _text(users or pair.get("prompt"))
        else:
            row["response_id"] = pair.get("response_id")
        for side in ("chosen", "rejected"):
            row[side] = text = _text(pair.get(side))
            row[f"{side}_id"] = pair.get(f"{side}_id")
            row[f"{side}_score"] = num(pair.get(f"{side}_score"))
            if not actor:
                row[f"{side}_elo"] = num(pair.get(f"{side}_elo"))
            count = num(tokens.get(row[f"{side}_id"], pair.get(f"{side}_tokens"))) if actor else None
            row[f"{side}_length"] = count if count is not None else len(text)
            row[f"{side}_length_unit"] = "tokens" if count is not None else "chars"
        out.append(row)
    return out


def _json_object(path: Path) -> dict:
    data = records.read_json(path)
    if not isinstance(data, dict):
        raise records.RecordError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def latest_cascades(run: Path) -> tuple[str, dict]:
    """(which model, {"suite/protocol": escalation}) of the last evaluated model with cascade curves
    (eval.escalation): the last finished iteration's, else M_0's."""
    evaluated = [
        (f"M_{t}", _json_object(d / layout.METRICS).get("eval", {}))
        for t, d in iterations(run)
        if (d / layout.METRICS).is_file()
    ]
    if (run / layout.EVAL_0).is_file():
        evaluated.insert(0, ("M_0", _json_object(run / layout.EVAL_0).get("judge", {})))
    for model, judge in reversed(evaluated):
        found = {
            f"{suite}/{protocol}": m["escalation"]
            for suite, protocols in judge.items()
            for protocol, m in protocols.items()
            if isinstance(m, dict) and m.get("escalation")
        }
        if found:
            return model, found
    return "", {}
