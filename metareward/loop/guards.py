"""Guards: alarms for the ways self-rewarding runs are known to fail, checked every iteration.

Pure functions over one iteration's records (and the previous iteration's guard values):

``top_score_share``
    share of scored judgements at the top of the scale (5): the judge drifting to "always 5"
    (score saturation; guard ``guards.max_top_score_share``).
``response_tokens_growth``, ``judgement_tokens_growth``
    mean response (judgement) ``num_tokens`` over the previous iteration's, minus 1: responses and
    judgements growing longer every iteration (length drift; ``guards.max_length_growth``).
    None in iteration 1, or when either mean is missing.
``judge_parse_failure_rate``, ``meta_judge_parse_failure_rate``
    share of scores (verdicts) not parsed from the text (``guards.max_parse_failure_rate``).
``first_position_win_share``
    W1 / (W1 + W2) of the meta-judge's verdicts: a meta-judge picking a position
    (``guards.max_position_win_share`` bounds the first and the second position alike).

:func:`guard_values` computes them, :func:`alarms` compares them with the thresholds, which may
change on resume (so the alarms are worked out again from the values, never read back).
"""

from __future__ import annotations

import math

from metareward.config import GuardsConfig

TOP_SCORE = 5.0


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _share(flags: list[bool]) -> float | None:
    return _mean([1.0 if flag else 0.0 for flag in flags])


def _growth(current: float | None, previous: float | None) -> float | None:
    if current is None or previous is None or previous <= 0:
        return None
    return current / previous - 1


def guard_values(
    responses: list[dict], judgements: list[dict], verdicts: list[dict], previous: dict | None
) -> dict:
    """The guarded numbers of one iteration (module docstring); ``previous``: the previous iteration's
    values (its metrics.json ``guards``), None for iteration 1."""
    previous = previous or {}
    scores = [float(j["score"]) for j in judgements if j.get("score") is not None]
    response_tokens = _mean([r["num_tokens"] for r in responses if r.get("num_tokens") is not None])
    judgement_tokens = _mean([j["num_tokens"] for j in judgements if j.get("num_tokens") is not None])
    first = sum(v.get("winner") == "first" for v in verdicts)
    second = sum(v.get("winner") == "second" for v in verdicts)
    return {
        "top_score_share": _share([s >= TOP_SCORE for s in scores]),
        "mean_response_tokens": response_tokens,
        "mean_judgement_tokens": judgement_tokens,
        "response_tokens_growth": _growth(response_tokens, previous.get("mean_response_tokens")),
        "judgement_tokens_growth": _growth(judgement_tokens, previous.get("mean_judgement_tokens")),
        "judge_parse_failure_rate": _share([j.get("score_source") != "text" for j in judgements]),
        "meta_judge_parse_failure_rate": _share([v.get("winner_source") != "text" for v in verdicts]),
        "first_position_win_share": first / (first + second) if first + second else None,
    }


def _above(value: float | None, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value > threshold


def alarms(values: dict, cfg: GuardsConfig) -> list[dict]:
    """``{"guard", "value", "threshold", "reason"}`` for each guard whose value passes its threshold."""
    found = []

    def alarm(guard: str, value: float, setting: str, reason: str) -> None:
        """An alarm of ``guard``, whose threshold is the setting ``guards.<setting>``."""
        threshold = getattr(cfg, setting)
        reason = f"{reason} (guards.{setting}={threshold})"
        found.append({"guard": guard, "value": value, "threshold": threshold, "reason": reason})

    share = values.get("top_score_share")
    if _above(share, cfg.max_top_score_share):
        alarm(
            "score_saturation",
            share,
            "max_top_score_share",
            f"score saturation: {share:.0%} of scored judgements give {TOP_SCORE:g}",
        )
    for what in ("response", "judgement"):
        growth = values.get(f"{what}_tokens_growth")
        if _above(growth, cfg.max_length_growth):
            alarm(
                f"{what}_length_drift",
                growth,
                "max_length_growth",
                f"length drift: mean {what} tokens grew {growth:+.0%} over the previous iteration",
            )
    for role, label in (("judge", "judge scores"), ("meta_judge", "meta-judge verdicts")):
        rate = values.get(f"{role}_parse_failure_rate")
        if _above(rate, cfg.max_parse_failure_rate):
            alarm(
                f"{role}_parse_failures",
                rate,
                "max_parse_failure_rate",
                f"parse failures: {rate:.0%} of {label} not parsed from the text",
            )
    first = values.get("first_position_win_share")
    if first is not None and cfg.max_position_win_share is not None:
        favoured, share = ("first", first) if first >= 0.5 else ("second", 1 - first)
        if share > cfg.max_position_win_share:
            alarm(
                "position_bias",
                first,
                "max_position_win_share",
                f"position bias: the {favoured} position wins {share:.0%} of meta-judge verdicts",
            )
    return found


def with_alarms(values: dict, cfg: GuardsConfig) -> dict:
    """``values`` with the alarms they raise under ``cfg`` (what metrics.json holds as ``guards``):
    ``alarms`` (a list), ``alarm_count``, and ``alarmed`` ({guard: 0|1}, for trackers)."""
    found = alarms(values, cfg)
    names = (
        "score_saturation",
        "response_length_drift",
        "judgement_length_drift",
        "judge_parse_failures",
        "meta_judge_parse_failures",
        "position_bias",
    )
    raised = {a["guard"] for a in found}
    return {
        **values,
        "alarms": found,
        "alarm_count": len(found),
        "alarmed": {name: int(name in raised) for name in names},
    }


def stop_reason(iteration: int, found: list[dict]) -> str:
    """One line: why ``guards.on_alarm=stop`` ends the run."""
    reasons = "; ".join(a["reason"] for a in found)
    return (
        f"iteration {iteration} raised {len(found)} guard alarm(s) before training: {reasons}; "
        "guards.on_alarm=warn goes on"
    )
