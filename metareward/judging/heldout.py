"""The actor's skill on held-out prompts: the prompts (``eval.heldout_prompts``, Vicuna-bench by default),
each model's greedy answers, and the win rate of M_t's answers against M_0's, judged by a fixed evaluator
in both orders.
"""

from __future__ import annotations

import json
from pathlib import Path

from metareward.config import EvalConfig
from metareward.data import bundled_path, to_prompt_rows
from metareward.generation import Generator, SamplingParams
from metareward.judging.judge_metrics import agreement_stats, mean_or_none
from metareward.judging.prompts import Templates
from metareward.judging.requests import verdict_requests
from metareward.store.records import RecordError, read_jsonl_numbered

BUNDLED_HELDOUT = "vicuna_bench_questions.jsonl"


def _json_list(source: Path) -> list[tuple[int, dict]]:
    try:
        rows = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{source}: not a JSON list of prompt rows ({error})") from None
    if not isinstance(rows, list):
        raise RecordError(f"{source}: expected a JSON list of prompt rows, got {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise RecordError(f"{source}:{number}: expected a JSON object, got {type(row).__name__}")
    return list(enumerate(rows, start=1))


def load_heldout_prompts(path: str | None, num: int | None) -> list[dict]:
    """The first ``num`` (None: every) held-out prompts ``{"prompt_id", "messages"[, "later_turns"]}``
    of a JSONL file, or of a JSON list (``.json``: alpaca_eval's evaluation set, whose rows have
    ``instruction``; "line" then means the row's place in the list).

    None reads the bundled Vicuna-bench questions. Rows with ``turns`` (Vicuna / MT-Bench) become
    their first turn as one user message, id from ``question_id``, the turns after it in
    ``later_turns`` (each asked after the model's answer to the one before); any other row may take
    any shape ``data.path`` accepts. The first rows, not a sample, so M_0 and every M_t see the same."""
    source = Path(path) if path else bundled_path(BUNDLED_HELDOUT)
    numbered = _json_list(source) if source.suffix == ".json" else read_jsonl_numbered(source)
    rows, later = [], {}
    for number, row in numbered:
        if "turns" in row:
            turns = row["turns"]
            if not (
                isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)
            ):
                raise RecordError(f"{source}:{number}: `turns` must be a non-empty list of non-empty strings")
            ids = {k: row[k] for k in ("prompt_id", "id", "question_id") if k in row}
            row = {**ids, "prompt": turns[0]}
            later[number] = turns[1:]
        rows.append(row)
    prompts = to_prompt_rows(rows, str(source), [number for number, _ in numbered])
    for prompt, (number, _) in zip(prompts, numbered, strict=True):
        if later.get(number):
            prompt["later_turns"] = later[number]
    return prompts if num is None else prompts[:num]


def generate_responses(
    generator: Generator, prompts: list[dict], max_new_tokens: int, seed: int
) -> list[dict]:
    """Greedy answers, ``{"prompt_id", "text", "num_tokens", "turns"}``: ``text`` answers the first
    turn (what the win rate compares), ``turns`` every turn in order, each asked after the answer to
    the one before (MT-Bench's two turns). Greedy, so a model's answers are its most likely ones and
    do not vary between evaluations."""
    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    conversations = {p["prompt_id"]: list(p["messages"]) for p in prompts}
    answers: dict[str, list] = {p["prompt_id"]: [] for p in prompts}
    turn = 0
    while asked := [p for p in prompts if turn <= len(p.get("later_turns", []))]:
        if turn:
            for p in asked:
                conversations[p["prompt_id"]].append({"role": "user", "content": p["later_turns"][turn - 1]})
        desc = "eval responses" + (f" (turn {turn + 1})" if turn else "")
        outputs = generator.generate([list(conversations[p["prompt_id"]]) for p in asked], params, desc=desc)
        for p, completions in zip(asked, outputs, strict=True):
            answer = completions[0]
            answers[p["prompt_id"]].append(answer)
            conversations[p["prompt_id"]].append({"role": "assistant", "content": answer.text})
        turn += 1
    return [
        {
            "prompt_id": pid,
            "text": given[0].text,
            "num_tokens": given[0].num_tokens,
            "turns": [answer.text for answer in given],
        }
        for pid, given in answers.items()
    ]


def win_rate(
    evaluator: Generator,
    templates: Templates,
    prompts: list[dict],
    candidate: list[dict],
    baseline: list[dict],
    cfg: EvalConfig,
    seed: int,
) -> dict:
    """How often ``evaluator`` prefers ``candidate``'s response to ``baseline``'s (rows from
    ``generate_responses``, matched by prompt id).

    Each prompt is judged in both orders, which cancels the evaluator's position bias; a prompt's
    score is the mean over the orders of 1 (candidate won), 0 (lost) or 0.5 (no verdict)."""
    cand = {r["prompt_id"]: r for r in candidate}
    base = {r["prompt_id"]: r for r in baseline}
    requests = []
    for prompt in prompts:
        a, b = cand[prompt["prompt_id"]]["text"], base[prompt["prompt_id"]]["text"]
        requests.append(templates.pairwise_messages(prompt["messages"], a, b))  # candidate first
        requests.append(templates.pairwise_messages(prompt["messages"], b, a))  # baseline first
    params = SamplingParams(
        n=1, temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=seed
    )
    verdicts = verdict_requests(
        evaluator, requests, params, "text_or_probs", desc="eval win rate", pairwise=True
    )
    winners = [v["winner"] for v in verdicts]

    # The candidate is "A" in the first order and "B" in the second; no verdict counts 0.5.
    won = [0.5 if w is None else float(w == "AB"[i % 2]) for i, w in enumerate(winners)]
    scores = [(won[2 * i] + won[2 * i + 1]) / 2 for i in range(len(prompts))]
    decided = [w for w in winners if w is not None]
    stats = agreement_stats(scores, cfg.bootstrap_samples, cfg.seed)
    return {
        "win_rate": stats["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "candidate_mean_tokens": mean_or_none([cand[p["prompt_id"]]["num_tokens"] for p in prompts]),
        "baseline_mean_tokens": mean_or_none([base[p["prompt_id"]]["num_tokens"] for p in prompts]),
        "first_position_win_share": mean_or_none([float(w == "A") for w in decided]),
        "num_prompts": len(prompts),
    }
