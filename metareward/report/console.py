"""The console summary the loop prints after each iteration (and of the seed model M_0 before the
first): what each stage made, the guards and their alarms, the escalated share, the judge's accuracy
and the actor's win rate, then one sample pair and judgement to read."""

from __future__ import annotations

from pathlib import Path

from metareward.report.text import number
from metareward.store import layout, records


def eval_lines(evaluated: dict) -> list[str]:
    """The judge's accuracy with its 95% interval, per suite and protocol of an evaluation."""
    lines = []
    for suite, protocols in evaluated.items():
        for protocol, m in protocols.items():
            official = m.get("official") or {}
            theirs = (
                f", {official['metric']} score {number(official.get('score'), '.1f')}" if official else ""
            )
            lines.append(
                f"eval       {suite}/{protocol} judge accuracy {number(m['accuracy'], '.2f')} "
                f"[{number(m['ci_low'], '.2f')}, {number(m['ci_high'], '.2f')}]{theirs}"
            )
    return lines


def summary(metrics: dict) -> str:
    """A one-screen account of one iteration."""
    actor, judge, meta = metrics["actor"], metrics["judge"], metrics["meta_judge"]
    pair, train = metrics["pairs"], metrics["train"]
    agreement, actor_eval = metrics.get("eval") or {}, metrics.get("eval_actor") or {}
    tokens, score = number(actor["mean_response_tokens"], ".0f"), number(actor.get("mean_response_score"))
    judge_failures, meta_failures = (
        number(judge["parse_failure_rate"], ".0%"),
        number(meta["parse_failure_rate"], ".0%"),
    )
    first_wins = number(meta["first_position_win_share"], ".0%")
    losses = f"{number(train.get('first_loss'), '.4f')} -> {number(train.get('loss'), '.4f')}"
    lines = [
        f"== iteration {metrics['iteration']} ==",
        f"actor      {metrics['prompts']} prompts -> {actor['responses']} responses, "
        f"mean {tokens} tokens, mean score {score}",
        f"judge      {judge['judgements']} judgements, {judge['scored']} scored, "
        f"parse failures {judge_failures}, mean score {number(judge['mean_score'])}",
        f"meta-judge {meta['verdicts']} verdicts, parse failures {meta_failures}, "
        f"first-position wins {first_wins}",
        f"pairs      actor {pair['actor']['pairs']}, judge {pair['judge']['pairs']} "
        f"(rho {pair['rho']}, judge pairs trained: {pair['trained_on_judge_pairs']})",
        f"DPO        {train.get('steps', 0)} steps, loss {losses}, "
        f"reward margin {number(train.get('rewards_margins'), '.4f')}",
    ]
    lines += guard_lines(metrics.get("guards"))
    lines += escalation_lines(metrics.get("escalation"))
    lines += eval_lines(agreement)
    if actor_eval:
        lines.append(f"eval       actor win rate vs M_0 {actor_eval['win_rate']:.2f}")
    return "\n".join(lines)


def guard_lines(guard: dict | None) -> list[str]:
    """The guarded numbers of an iteration (guards.py) on one line, then one line per alarm."""
    if not guard:
        return []
    lines = [
        f"guards     top scores {number(guard.get('top_score_share'), '.0%')}, length growth "
        f"responses {number(guard.get('response_tokens_growth'), '+.0%')} / judgements "
        f"{number(guard.get('judgement_tokens_growth'), '+.0%')}, parse failures "
        f"{number(guard.get('judge_parse_failure_rate'), '.0%')} / "
        f"{number(guard.get('meta_judge_parse_failure_rate'), '.0%')}, first-position wins "
        f"{number(guard.get('first_position_win_share'), '.0%')}"
    ]
    lines += [f"ALARM      {alarm['reason']}" for alarm in guard.get("alarms", [])]
    return lines


def escalation_lines(escalation: dict | None) -> list[str]:
    """Per escalating stage: how much went to the strong judge, how often it agreed, what it cost."""
    lines = []
    for role, m in (escalation or {}).items():
        strong = m["judges"]["strong"]
        cost = "" if strong["cost_usd"] is None else f", ${strong['cost_usd']:.4f}"
        lines.append(
            f"escalated  {role.replace('_', '-')}: {m['escalated']}/{m['items']} items "
            f"({number(m['escalated_share'], '.0%')}, {m['no_signal']} without a signal) to "
            f"{strong['name']}, agreement {number(m['agreement'], '.0%')}, "
            f"{strong['prompt_tokens']}+{strong['completion_tokens']} tokens{cost}"
        )
    return lines


def _clip_line(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def sample(directory: Path) -> str:
    """One actor pair and one judgement of the iteration, for a person to read."""
    actor = records.read_jsonl(directory / layout.ACTOR_PAIRS)
    judge = records.read_jsonl(directory / layout.JUDGE_PAIRS)
    lines = []
    if actor:
        pair = actor[0]
        lines += [
            f"  prompt    {_clip_line(pair['prompt'][-1]['content'])}",
            f"  chosen    [{pair['chosen_score']:.2f}] {_clip_line(pair['chosen'][0]['content'])}",
            f"  rejected  [{pair['rejected_score']:.2f}] {_clip_line(pair['rejected'][0]['content'])}",
        ]
    if judge:
        pair = judge[0]
        lines.append(
            f"  judgement [elo {pair['chosen_elo']:+.2f}] {_clip_line(pair['chosen'][0]['content'])}"
        )
    else:
        judgement = next(iter(records.read_jsonl(directory / layout.JUDGEMENTS)), None)
        if judgement is not None:
            lines.append(f"  judgement [{number(judgement['score'])}] {_clip_line(judgement['text'])}")
    return "\n".join(lines)
