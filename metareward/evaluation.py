"""Evaluation: how well the model judges (against human preferences) and how well it answers.

- Judge skill: ``load_human_pairs`` then ``judge_human_agreement``, which scores both responses of
  each human preference pair with the judge prompt and reports how often the judge agrees with
  the human choice, with a bootstrap confidence interval. ``metareward-eval-judge [overrides]``
  (cli.py) runs it from the command line and prints the result as JSON.
- Actor skill: ``load_heldout_prompts``, ``generate_responses`` (for M_t and M_0), then
  ``win_rate``, where a fixed evaluator compares the two models' answers in both orders.

- ``evaluate_model``: both, for one model of a run (what the loop runs on M_0 and after each iteration).

Everything but ``evaluate_model`` takes a :class:`~metareward.generation.Generator`, so tests can pass
stand-ins.
"""

from __future__ import annotations

import random
from pathlib import Path

from metareward import stages
from metareward.config import Config, EvalConfig
from metareward.data import bundled_path, to_prompt_rows
from metareward.generation import Generator, SamplingParams, make_generator
from metareward.judge_metrics import agreement_stats
from metareward.metrics import mean_or_none
from metareward.prompts import Templates
from metareward.records import RecordError, read_jsonl_numbered

BUNDLED_HUMAN_PAIRS = "hh_rlhf_helpful_dev.jsonl"
BUNDLED_HELDOUT = "vicuna_bench_questions.jsonl"


# ------------------------------------------------------------------ judge vs humans


def _pair_messages(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    ok = (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)
        and prompt[-1]["role"] == "user"
        and prompt[-1]["content"].strip()
    )
    if not ok:
        raise RecordError(
            f"{where}: `prompt` must be a non-empty string or a list of {{role, content}} ending with a "
            "non-empty user turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def load_human_pairs(path: str | None, num_pairs: int, seed: int) -> list[dict]:
    """Human preference pairs ``{"pair_id", "prompt": [messages], "chosen", "rejected"}``.

    ``path`` is a JSONL file with ``prompt`` (a string or chat turns), ``chosen`` and ``rejected``
    (strings), optionally ``pair_id`` or ``id``; None reads the bundled HH-RLHF helpful pairs.
    Returns a seeded sample of ``num_pairs`` rows in file order (all rows if there are fewer).
    Every row is checked, so a bad row fails the same way whatever the sample; errors name file:line.
    """
    source = Path(path) if path else bundled_path(BUNDLED_HUMAN_PAIRS)
    pairs, seen = [], set()
    for index, (number, row) in enumerate(read_jsonl_numbered(source)):
        where = f"{source}:{number}"
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise RecordError(f"{where}: a human pair needs `{key}` as a string")
        raw_id = row.get("pair_id", row.get("id"))
        pair_id = str(raw_id) if raw_id is not None else f"p{index}"
        if pair_id in seen:
            raise RecordError(f"{where}: duplicate pair id {pair_id!r}")
        seen.add(pair_id)
        messages = _pair_messages(row.get("prompt"), where)
        pairs.append({"pair_id": pair_id, "prompt": messages, **{k: row[k] for k in ("chosen", "rejected")}})
    if not pairs:
        raise RecordError(f"{source}: no human pairs")
    if num_pairs >= len(pairs):
        return pairs
    # Sorted indices keep file order, so a larger sample reads like the file, not a shuffle.
    keep = sorted(random.Random(seed).sample(range(len(pairs)), num_pairs))
    return [pairs[i] for i in keep]


def judge_human_agreement(
    generator: Generator, templates: Templates, pairs: list[dict], cfg: EvalConfig, score_from: str, seed: int
) -> dict:
    """Agreement of the model-as-judge with human choices on ``pairs`` (from ``load_human_pairs``).

    Both responses of a pair are judged separately with the judge prompt (``cfg.num_judgements``
    samples each, mean of the parsed scores). A pair counts 1 if the chosen response scores higher,
    0 if lower, 0.5 on a tie or when either response got no score. The result holds the summary
    numbers plus ``per_pair`` rows, which the caller saves and removes before logging."""
    requests = [
        templates.judge_messages(pair["prompt"], response)
        for pair in pairs
        for response in (pair["chosen"], pair["rejected"])
    ]
    n, temperature, max_new = cfg.num_judgements, cfg.temperature, cfg.max_new_tokens
    params = SamplingParams(n=n, temperature=temperature, top_p=1.0, max_new_tokens=max_new, seed=seed)
    judged = stages.judge_requests(generator, requests, params, score_from, desc="eval judge")
    scores = [mean_or_none([j["score"] for j in rows if j["score"] is not None]) for rows in judged]

    per_pair, outcomes, longer_preferred = [], [], []
    for index, pair in enumerate(pairs):
        chosen, rejected = scores[2 * index], scores[2 * index + 1]
        if chosen is None or rejected is None or chosen == rejected:
            outcome = 0.5
        else:
            outcome = 1.0 if chosen > rejected else 0.0
        outcomes.append(outcome)
        row = {"pair_id": pair["pair_id"], "chosen_score": chosen, "rejected_score": rejected}
        per_pair.append({**row, "outcome": outcome})
        # Length bias: of the pairs the judge decided, how often did it pick the longer response?
        # Equal lengths say nothing about it and are left out.
        len_chosen, len_rejected = len(pair["chosen"]), len(pair["rejected"])
        if outcome != 0.5 and len_chosen != len_rejected:
            longer_preferred.append((outcome == 1.0) == (len_chosen > len_rejected))

    stats = agreement_stats(outcomes, cfg.bootstrap_samples, cfg.seed)
    chosen_scores = [r["chosen_score"] for r in per_pair if r["chosen_score"] is not None]
    rejected_scores = [r["rejected_score"] for r in per_pair if r["rejected_score"] is not None]
    scored = [r for r in per_pair if r["chosen_score"] is not None and r["rejected_score"] is not None]
    return {
        "judge_human_agreement": stats["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "tie_rate": stats["tie_rate"],
        "unscored_rate": (len(pairs) - len(scored)) / len(pairs),
        "num_pairs": len(pairs),
        "mean_score_chosen": mean_or_none(chosen_scores),
        "mean_score_rejected": mean_or_none(rejected_scores),
        "length_preference": mean_or_none([float(x) for x in longer_preferred]),
        "per_pair": per_pair,
    }


# ------------------------------------------------------------------ actor win rate


def load_heldout_prompts(path: str | None, num: int) -> list[dict]:
    """The first ``num`` held-out prompts ``{"prompt_id", "messages"}`` of a JSONL file.

    None reads the bundled Vicuna-bench questions. Rows with ``turns`` (Vicuna / MT-Bench) become
    their first turn as one user message, id from ``question_id``; any other row may take any
    shape ``data.path`` accepts. The first rows, not a sample, so M_0 and every M_t see the same."""
    source = Path(path) if path else bundled_path(BUNDLED_HELDOUT)
    numbered = read_jsonl_numbered(source)
    rows = []
    for number, row in numbered:
        if "turns" in row:
            turns = row["turns"]
            if not (isinstance(turns, list) and turns and isinstance(turns[0], str)):
                raise RecordError(f"{source}:{number}: `turns` must be a non-empty list of strings")
            # Only the first turn: later MT-Bench turns refer to an answer the model has not given.
            ids = {k: row[k] for k in ("prompt_id", "id", "question_id") if k in row}
            row = {**ids, "prompt": turns[0]}
        rows.append(row)
    prompts = to_prompt_rows(rows, str(source), [number for number, _ in numbered])
    return prompts[:num]


def generate_responses(
    generator: Generator, prompts: list[dict], max_new_tokens: int, seed: int
) -> list[dict]:
    """One greedy response per prompt, ``{"prompt_id", "text", "num_tokens"}``: greedy so a model's
    answers are its most likely ones and do not vary between evaluations."""
    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    outputs = generator.generate([p["messages"] for p in prompts], params, desc="eval responses")
    firsts = [(prompt["prompt_id"], c[0]) for prompt, c in zip(prompts, outputs, strict=True)]
    return [{"prompt_id": pid, "text": c.text, "num_tokens": c.num_tokens} for pid, c in firsts]


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
    verdicts = stages.verdict_requests(
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


# ------------------------------------------------------------------ one model, as the loop evaluates it


def evaluate_model(
    cfg: Config,
    model_dir: str,
    iteration: int,
    evaluator_dir: str,
    templates: Templates,
    cache_dir: Path,
    baseline: list | None = None,
) -> dict:
    """Judge-human agreement of M_``iteration`` in ``model_dir`` and its greedy answers to the held-out
    prompts; with ``baseline`` (M_0's answers) also its actor's win rate against them, judged by the
    fixed evaluator in ``evaluator_dir`` (``eval.evaluator``: M_0 unless it has a model of its own).

    Returns ``{"judge": summary, "per_pair": rows, "heldout_responses": rows[, "actor": win rate]}``."""
    human_pairs = load_human_pairs(cfg.eval.human_pairs, cfg.eval.num_pairs, cfg.eval.seed)
    heldout = load_heldout_prompts(cfg.eval.heldout_prompts, cfg.eval.num_heldout)
    generator = make_generator(model_dir, cfg.model, cfg.generator, cache_dir=cache_dir)
    try:
        judge = judge_human_agreement(
            generator, templates, human_pairs, cfg.eval, cfg.judge.score_from, seed=cfg.eval.seed
        )
        responses = []
        if cfg.eval.win_rate:
            responses = generate_responses(
                generator, heldout, cfg.eval.response_max_new_tokens, cfg.eval.seed
            )
    finally:
        generator.close()
    per_pair = judge.pop("per_pair")
    result = {"judge": judge, "per_pair": per_pair, "heldout_responses": responses}
    if baseline is not None and cfg.eval.win_rate:
        spec = cfg.eval.evaluator
        model, settings = (spec.model, spec.generator) if spec.own_model else (cfg.model, cfg.generator)
        evaluator = make_generator(evaluator_dir, model, settings, cache_dir=cache_dir)
        try:
            seed = cfg.eval.seed + iteration
            result["actor"] = win_rate(
                evaluator, templates, heldout, responses, baseline, cfg.eval, seed=seed
            )
        finally:
            evaluator.close()
    return result
