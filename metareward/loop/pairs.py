"""DPO preference pairs for Meta-Rewarding (Wu et al., 2024).

Pure functions over the JSONL records of one iteration (prompts, responses,
judgements, meta-judgements). Two kinds of pairs come out, both in TRL's
conversational preference format plus provenance fields:

* actor pairs: per prompt, a high-scoring response over a low-scoring one, with
  length control ``rho`` (shortest of the top tier over longest of the bottom tier);
* judge pairs: per prompt, for the response whose judge scores vary most, the
  judgement with the highest Elo (from meta-judge verdicts, debiased for position)
  over the one with the lowest.

Results never depend on row order: rows are grouped by id, sums are exact or
correctly rounded, and ties are broken by score and by the integer in the id.
``build_pairs`` reads an iteration's stage files and applies both rules; ``write_pairs``
saves the two pair files.

Options (``pairs.*``, each off by default, which is the paper's rule):

* ``max_judgement_tokens``: a judgement with more ``num_tokens`` is unusable, as a cut-off one is:
  left out of the variance that picks the meta-judged response and out of its battles. Accounts of the
  Meta-Rewarding recipe keep over-long judgements out of judge pairs.
* ``consistent_verdicts_only``: a comparison of two judgements counts only when its two orders name
  the same winner, adding w1 + w2 = 1 to B[winner][loser]; one whose orders disagree or lack a
  verdict adds nothing (NeMo-Aligner's self-rewarding trainer counts only such wins).
* ``exclude_cut_off_responses``: actor pairs use only responses with ``finish_reason == "stop"``
  (NeMo-Aligner picks chosen and rejected among responses that ended).
* ``judge_chosen_score_cap``: no chosen score value holds more than this share of the iteration's
  judge pairs, against a judge collapsing to one score (NeMo-Aligner's ``meta_max_relative_pcnt``,
  0.4, applied there as pairs stream in; here to the whole iteration, see :func:`cap_chosen_scores`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from metareward.config import PairsConfig
from metareward.loop.elo import (
    battle_matrix,
    consistent_battle_matrix,
    fit_elo,
    position_wins,
    positional_weights,
)
from metareward.store import layout, records

# Slack in the actor tier thresholds, so float rounding in S_max - rho*(S_max - S_min)
# does not drop a response whose mean sits exactly on the threshold.
SCORE_TOL = 1e-9
# Judge-score variances closer than this are a tie (broken by lower k).
VARIANCE_TOL = 1e-12
# A judge pair needs max(elo) - min(elo) >= ELO_TIE; within the top (bottom) tier,
# Elos closer than ELO_SAME to the max (min) tie and the lower n wins.
ELO_TIE = 1e-6
ELO_SAME = 1e-9


def _index_after(record_id: str, marker: str, what: str) -> int:
    head, sep, tail = record_id.rpartition(marker)
    if not sep or not head or not tail.isdigit():
        raise ValueError(f"{what} {record_id!r} does not end in '{marker}<integer>'")
    return int(tail)


def response_k(response_id: str) -> int:
    """The k of ``"<prompt_id>/r<k>"``: the integer after the last ``/r``."""
    return _index_after(response_id, "/r", "response_id")


def judgement_n(judgement_id: str) -> int:
    """The n of ``"<response_id>/j<n>"``: the integer after the last ``/j``."""
    return _index_after(judgement_id, "/j", "judgement_id")


def _score(judgement: dict) -> float | None:
    """The parsed score as a float; None when missing (NaN/inf count as missing too)."""
    score = judgement.get("score")
    return None if score is None or not math.isfinite(score) else float(score)


def _mean(values: list[float]) -> float:
    # fsum is correctly rounded, hence independent of the order of the values.
    return math.fsum(values) / len(values)


def _pvariance(values: list[float]) -> float:
    if max(values) == min(values):  # exactly 0, whatever the rounding of the mean
        return 0.0
    mean = _mean(values)
    return math.fsum((v - mean) ** 2 for v in values) / len(values)


def within_token_limit(judgements: Iterable[dict], max_tokens: int | None) -> list[dict]:
    """Judgements of at most ``max_tokens`` ``num_tokens`` (all of them when no limit is set)."""
    if max_tokens is None:
        return list(judgements)
    return [j for j in judgements if j.get("num_tokens") is None or j["num_tokens"] <= max_tokens]


def usable_judgements(judgements: Iterable[dict], max_tokens: int | None = None) -> list[dict]:
    """Judgements that have a parsed score and were not cut off (``finish_reason != "length"``), nor
    longer than ``max_tokens`` when it is set."""
    return [
        j
        for j in within_token_limit(judgements, max_tokens)
        if _score(j) is not None and j.get("finish_reason") != "length"
    ]


def _by_key(rows: Iterable[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


def judge_target_responses(
    responses: list[dict], judgements: list[dict], max_tokens: int | None = None
) -> dict[str, str]:
    """prompt_id -> the response to meta-judge: largest population variance of its usable scores.

    A response is eligible with >= 2 usable judgements whose scores are not all equal;
    variance ties go to the lower k. Prompts with no eligible response are absent.
    """
    usable = _by_key(usable_judgements(judgements, max_tokens), "response_id")
    best: dict[str, tuple[float, str]] = {}
    # Walking in k order and replacing only on a strictly larger variance keeps the lower k on ties.
    for response in sorted(responses, key=lambda r: (r["prompt_id"], response_k(r["response_id"]))):
        scores = [_score(j) for j in usable.get(response["response_id"], [])]
        variance = _pvariance(scores) if len(scores) >= 2 else 0.0
        if variance <= 0:
            continue
        current = best.get(response["prompt_id"])
        if current is None or variance > current[0] + VARIANCE_TOL:
            best[response["prompt_id"]] = (variance, response["response_id"])
    return {prompt_id: response_id for prompt_id, (_, response_id) in best.items()}


def actor_pairs(
    prompts: list[dict],
    responses: list[dict],
    judgements: list[dict],
    rho: float,
    exclude_cut_off: bool = False,
) -> tuple[list[dict], dict]:
    """One length-controlled (chosen, rejected) response pair per prompt, where possible.

    S = mean of a response's parsed judge scores. With spread D = S_max - S_min > 0,
    chosen = shortest response with S >= S_max - rho*D (ties: higher S, lower k) and
    rejected = longest with S <= S_min + rho*D (ties: lower S, lower k). With ``exclude_cut_off``
    only responses with ``finish_reason == "stop"`` take part.
    """
    if not 0 <= rho < 0.5:
        raise ValueError(f"rho={rho!r}: must be in [0, 0.5)")
    scores = {
        rid: [s for j in rows if (s := _score(j)) is not None]
        for rid, rows in _by_key(judgements, "response_id").items()
    }
    finished = [r for r in responses if r.get("finish_reason") == "stop"] if exclude_cut_off else responses
    by_prompt = _by_key(finished, "prompt_id")

    stats = {
        "prompts": len(prompts),
        "pairs": 0,
        "skipped_no_scored_responses": 0,
        "skipped_one_scored_response": 0,
        "skipped_all_equal_scores": 0,
    }
    if exclude_cut_off:
        stats["cut_off_responses_left_out"] = len(responses) - len(finished)
    pairs = []
    for prompt in prompts:
        prompt_id = prompt["prompt_id"]
        scored = [
            (_mean(scores[r["response_id"]]), response_k(r["response_id"]), r)
            for r in by_prompt.get(prompt_id, [])
            if scores.get(r["response_id"])
        ]
        if not scored:
            stats["skipped_no_scored_responses"] += 1
            continue
        if len(scored) == 1:
            stats["skipped_one_scored_response"] += 1
            continue
        s_max, s_min = max(t[0] for t in scored), min(t[0] for t in scored)
        spread = s_max - s_min
        if spread <= 0:
            stats["skipped_all_equal_scores"] += 1
            continue
        # Capping the slack at a quarter of the gap between the tiers keeps them disjoint
        # even when the spread is tiny, so chosen and rejected are always different rows.
        tol = min(SCORE_TOL, 0.25 * (1 - 2 * rho) * spread)
        top = [t for t in scored if t[0] >= s_max - rho * spread - tol]
        bottom = [t for t in scored if t[0] <= s_min + rho * spread + tol]
        s_c, _, chosen = min(top, key=lambda t: (t[2]["num_tokens"], -t[0], t[1]))
        s_r, _, rejected = min(bottom, key=lambda t: (-t[2]["num_tokens"], t[0], t[1]))
        pairs.append(
            {
                "prompt": prompt["messages"],
                "chosen": [{"role": "assistant", "content": chosen["text"]}],
                "rejected": [{"role": "assistant", "content": rejected["text"]}],
                "prompt_id": prompt_id,
                "chosen_id": chosen["response_id"],
                "rejected_id": rejected["response_id"],
                "chosen_score": s_c,
                "rejected_score": s_r,
                "chosen_tokens": int(chosen["num_tokens"]),
                "rejected_tokens": int(rejected["num_tokens"]),
            }
        )
    stats["pairs"] = len(pairs)
    return pairs, stats


def judge_pairs(
    prompts: list[dict],
    responses: list[dict],
    judgements: list[dict],
    meta_judgements: list[dict],
    judge_prompt: Callable[[list[dict], str], list[dict]],
    l2: float = 0.01,
    max_tokens: int | None = None,
    consistent_only: bool = False,
) -> tuple[list[dict], dict]:
    """One (chosen, rejected) judgement pair per prompt, ranked by Elo from meta-judge verdicts.

    The judged response is :func:`judge_target_responses`'s pick; positional weights come
    from all ``meta_judgements`` rows of the iteration. ``judge_prompt(messages, response_text)``
    builds the judge's input messages, which become the pair's prompt. ``max_tokens`` and
    ``consistent_only`` are the options ``pairs.max_judgement_tokens`` and
    ``pairs.consistent_verdicts_only`` (module docstring).
    """
    first_wins, second_wins = position_wins(meta_judgements)
    w1, w2 = positional_weights(meta_judgements)
    targets = judge_target_responses(responses, judgements, max_tokens)
    response_by_id = {r["response_id"]: r for r in responses}
    usable = _by_key(usable_judgements(judgements, max_tokens), "response_id")
    meta_by_response = _by_key(meta_judgements, "response_id")

    stats = {
        "prompts": len(prompts),
        "pairs": 0,
        "skipped_no_variance": 0,
        "skipped_no_verdicts": 0,
        "skipped_elo_tie": 0,
        "first_position_wins": first_wins,
        "second_position_wins": second_wins,
        "w1": w1,
        "w2": w2,
    }
    pairs = []
    for prompt in prompts:
        prompt_id = prompt["prompt_id"]
        response_id = targets.get(prompt_id)
        if response_id is None:
            stats["skipped_no_variance"] += 1
            continue
        # Sorted by n, so "first index in a tier" means "lower n".
        rows = sorted(usable[response_id], key=lambda j: judgement_n(j["judgement_id"]))
        ids = [j["judgement_id"] for j in rows]
        verdicts = meta_by_response.get(response_id, [])
        if consistent_only:
            battles = consistent_battle_matrix(ids, verdicts)
        else:
            battles = battle_matrix(ids, verdicts, w1, w2)
        if not battles.any():
            stats["skipped_no_verdicts"] += 1
            continue
        elo = fit_elo(battles, l2)
        best, worst = float(elo.max()), float(elo.min())
        if best - worst < ELO_TIE:
            stats["skipped_elo_tie"] += 1
            continue
        c = next(i for i in range(len(ids)) if elo[i] >= best - ELO_SAME)
        r = next(i for i in range(len(ids)) if elo[i] <= worst + ELO_SAME)
        pairs.append(
            {
                "prompt": judge_prompt(prompt["messages"], response_by_id[response_id]["text"]),
                "chosen": [{"role": "assistant", "content": rows[c]["text"]}],
                "rejected": [{"role": "assistant", "content": rows[r]["text"]}],
                "prompt_id": prompt_id,
                "response_id": response_id,
                "chosen_id": ids[c],
                "rejected_id": ids[r],
                "chosen_score": _score(rows[c]),
                "rejected_score": _score(rows[r]),
                "chosen_elo": float(elo[c]),
                "rejected_elo": float(elo[r]),
            }
        )
    stats["pairs"] = len(pairs)
    return pairs, stats


def cap_chosen_scores(rows: list[dict], cap: float) -> list[dict]:
    """The most judge pairs such that no ``chosen_score`` value holds more than ``cap`` of them.

    Keeping at most L pairs of each value, the largest L with min(n_max, L) <= cap * kept(L) keeps the
    most pairs any valid subset can (a valid subset's largest count M gives L = M at least as many).
    Within a value, the pairs with the widest Elo gap (the meta-judge's clearest) stay; ties: earlier
    prompt. Rows keep their order."""
    by_value = _by_key(rows, "chosen_score")
    counts = sorted(len(group) for group in by_value.values())
    limit = next(
        (
            level
            for level in range(counts[-1] if counts else 0, -1, -1)
            if min(counts[-1], level) <= cap * sum(min(n, level) for n in counts) + 1e-9
        ),
        0,
    )
    kept = set()
    for group in by_value.values():
        order = sorted(group, key=lambda r: -(r["chosen_elo"] - r["rejected_elo"]))  # stable: prompt order
        kept.update(id(r) for r in order[:limit])
    return [r for r in rows if id(r) in kept]


def build_pairs(
    directory: Path, rho: float, elo_l2: float, judge_messages: Callable, options: PairsConfig | None = None
) -> tuple[list[dict], list[dict], dict]:
    """Actor and judge pairs from the stage files in ``directory`` (no model needed), with the
    selection statistics of both: ``(actor_rows, judge_rows, {"actor": ..., "judge": ...})``.
    ``options``: the ``pairs.*`` options (module docstring); None, all off."""
    options = options or PairsConfig()
    prompts = records.read_jsonl(directory / layout.PROMPTS)
    responses = records.read_jsonl(directory / layout.RESPONSES)
    judgements = records.read_jsonl(directory / layout.JUDGEMENTS)
    verdicts = records.read_jsonl(directory / layout.META_JUDGEMENTS)
    actor_rows, actor_stats = actor_pairs(
        prompts, responses, judgements, rho, exclude_cut_off=options.exclude_cut_off_responses
    )
    judge_rows, judge_stats = judge_pairs(
        prompts,
        responses,
        judgements,
        verdicts,
        judge_messages,
        l2=elo_l2,
        max_tokens=options.max_judgement_tokens,
        consistent_only=options.consistent_verdicts_only,
    )
    if options.judge_chosen_score_cap is not None:
        capped = cap_chosen_scores(judge_rows, options.judge_chosen_score_cap)
        judge_stats["dropped_score_cap"] = len(judge_rows) - len(capped)
        judge_rows = capped
        judge_stats["pairs"] = len(judge_rows)
    return actor_rows, judge_rows, {"actor": actor_stats, "judge": judge_stats}


def write_pairs(out_dir: Path, actor_rows: list[dict], judge_rows: list[dict]) -> None:
    records.write_jsonl(out_dir / layout.ACTOR_PAIRS, actor_rows)
    records.write_jsonl(out_dir / layout.JUDGE_PAIRS, judge_rows)
