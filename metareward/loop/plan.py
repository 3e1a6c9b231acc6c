"""What a run will cost before it starts: ``metareward ... dry_run=true``.

Loads no model. For each iteration and stage it counts generation calls (sampled completions)
and bounds the tokens they generate (every sample running to ``max_new_tokens``), so a run can
be priced against a GPU-hour or per-token rate; with ``data=synthetic`` a first row ("pool") counts
the prompter's requests, up to ``data.synthetic.request_budget`` per pool prompt. Counts are upper
bounds: the actor drops duplicate responses, and the meta-judge only compares judgements that parsed.
Rows marked "(strong)" are what a stage escalates to its strong judge (``*.escalation``): the budget's
share of the stage's items (all of them under a threshold), priced by the strong judge's own rates.
"""

from __future__ import annotations

import math

from metareward.config import DEFAULT_ACCELERATE_CONFIG, Config

COLUMNS = ("iteration", "stage", "requests", "samples", "scored_texts", "max_generated_tokens")


def _row(iteration: int | str, stage: str, requests: int, n: int, max_new: int, scored: int = 0) -> dict:
    samples = requests * n
    return {
        "iteration": iteration,
        "stage": stage,
        "requests": requests,
        "samples": samples,
        "scored_texts": scored,
        "max_generated_tokens": samples * max_new,
    }


def _evaluation(cfg: Config, iteration: int) -> list[dict]:
    ev = cfg.eval
    # Per suite (at most num_pairs pairs each): pointwise judges both responses num_judgements times,
    # pairwise both orders once; their probabilities are read as the judge's settings say.
    pairs = 2 * ev.num_pairs * len(ev.suites)
    rows = []
    reads = _reads_probabilities(ev.escalation)
    if "pointwise" in ev.protocols:
        scored = pairs * ev.num_judgements if cfg.judge.score_from == "text_or_expected" or reads else 0
        rows.append(_row(iteration, "eval pointwise", pairs, ev.num_judgements, ev.max_new_tokens, scored))
    if "pairwise" in ev.protocols:
        scored = pairs if ev.winner_from == "text_or_probs" or reads else 0
        rows.append(_row(iteration, "eval pairwise", pairs, 1, ev.max_new_tokens, scored))
    if ev.escalation.enabled:  # the strong judge answers every pair too, in text (cached across models)
        if "pointwise" in ev.protocols:
            rows.append(
                _row(iteration, "eval pointwise (strong)", pairs, ev.num_judgements, ev.max_new_tokens)
            )
        if "pairwise" in ev.protocols:
            rows.append(_row(iteration, "eval pairwise (strong)", pairs, 1, ev.max_new_tokens))
    if ev.win_rate:
        from metareward.judging.heldout import load_heldout_prompts

        heldout = load_heldout_prompts(ev.heldout_prompts, ev.num_heldout)
        answers = sum(1 + len(p.get("later_turns", [])) for p in heldout)  # one per turn
        rows.append(_row(iteration, "eval responses", answers, 1, ev.response_max_new_tokens))
        if iteration > 0:
            rows.append(_row(iteration, "eval win rate", 2 * len(heldout), 1, ev.max_new_tokens))
    return rows


def _synthesis(cfg: Config) -> list[dict]:
    """data=synthetic: the prompter's requests, once per run, up to its budget (it stops once the pool is
    full)."""
    from metareward.loop.synthesis import plan_requests

    spec = cfg.roles.prompter
    chunk_size = (spec.generator if spec.own_model else cfg.generator).chunk_size
    syn = cfg.data.synthetic
    return [_row("pool", "prompter", plan_requests(syn, chunk_size), 1, syn.max_new_tokens)]


def _reads_probabilities(settings) -> bool:
    from metareward.judging.escalation import needs_probabilities

    return settings.enabled and needs_probabilities(settings.signal)


def _escalated(settings, items: int) -> int:
    """Items a budget escalates at most: its fraction of them, or all of them under a threshold."""
    from metareward.judging.escalation import fraction_count

    return items if settings.threshold is not None else fraction_count(settings.fraction, items)


def training_processes(cfg: Config) -> int:
    """Data-parallel DPO processes: the accelerate config's num_processes, or 1 in-process."""
    if cfg.train.launcher != "accelerate":
        return 1
    from omegaconf import OmegaConf

    launch = OmegaConf.load(cfg.train.accelerate_config or DEFAULT_ACCELERATE_CONFIG)
    return int(launch.get("num_processes", 1)) * int(launch.get("num_machines", 1))


def plan(cfg: Config, available_prompts: int | None = None) -> list[dict]:
    """One row per iteration and stage, plus the DPO steps; ``available_prompts`` caps prompts per
    iteration when the prompt set is smaller than ``data.prompts_per_iteration``."""
    prompts = cfg.data.prompts_per_iteration
    if available_prompts is not None:
        prompts = min(prompts, available_prompts)
    k, n = cfg.actor.num_responses, cfg.judge.num_judgements
    responses = prompts * k
    # One response per prompt is meta-judged: every ordered pair of its n judgements.
    comparisons = prompts * n * (n - 1)
    rows = _synthesis(cfg) if cfg.data.kind == "synthetic" else []
    rows += _evaluation(cfg, 0) if cfg.eval.enabled else []
    for t in range(1, cfg.iterations + 1):
        # A confidence signal that reads probabilities reads them for every judgement or verdict.
        scored = responses * n if cfg.judge.score_from == "text_or_expected" else 0
        if _reads_probabilities(cfg.judge.escalation):
            scored = responses * n
        verdict_scored = comparisons if cfg.meta_judge.winner_from == "text_or_probs" else 0
        if _reads_probabilities(cfg.meta_judge.escalation):
            verdict_scored = comparisons
        rows += [
            _row(t, "actor", prompts, k, cfg.actor.max_new_tokens),
            _row(t, "judge", responses, n, cfg.judge.max_new_tokens, scored),
        ]
        if cfg.judge.escalation.enabled:
            strong = _escalated(cfg.judge.escalation, responses)
            rows.append(_row(t, "judge (strong)", strong, n, cfg.judge.max_new_tokens))
        rows.append(_row(t, "meta_judge", comparisons, 1, cfg.meta_judge.max_new_tokens, verdict_scored))
        if cfg.meta_judge.escalation.enabled:  # a comparison is escalated in both its orders
            strong = 2 * _escalated(cfg.meta_judge.escalation, comparisons // 2)
            rows.append(_row(t, "meta_judge (strong)", strong, 1, cfg.meta_judge.max_new_tokens))
        pairs = prompts * (2 if t in cfg.train.judge_iterations else 1)
        dpo = cfg.train.dpo
        batch = dpo.batch_size * dpo.gradient_accumulation_steps * training_processes(cfg)
        steps = math.ceil(math.ceil(pairs / batch) * dpo.num_epochs)
        rows.append({"iteration": t, "stage": "dpo", "max_pairs": pairs, "max_optimizer_steps": steps})
        if cfg.eval.enabled:
            rows += _evaluation(cfg, t)
    return rows


def totals(rows: list[dict]) -> dict:
    keys = ("requests", "samples", "scored_texts", "max_generated_tokens")
    return {key: sum(row.get(key, 0) for row in rows) for key in keys}


def format_plan(rows: list[dict]) -> str:
    """The plan as a table a person can read, with totals."""
    lines = [f"{'iter':>4}  {'stage':<24}{'requests':>10}{'samples':>12}{'scored':>10}{'max tokens':>16}"]
    for row in rows:
        if row["stage"] == "dpo":
            lines.append(
                f"{row['iteration']:>4}  {'dpo':<24}{'≤ ' + str(row['max_pairs']) + ' pairs':>22}"
                f"{'≤ ' + str(row['max_optimizer_steps']) + ' optimizer steps':>36}"
            )
            continue
        lines.append(
            f"{row['iteration']:>4}  {row['stage']:<24}{row['requests']:>10,}{row['samples']:>12,}"
            f"{row['scored_texts']:>10,}{row['max_generated_tokens']:>16,}"
        )
    total = totals(rows)
    lines.append(
        f"{'all':>4}  {'':<24}{total['requests']:>10,}{total['samples']:>12,}"
        f"{total['scored_texts']:>10,}{total['max_generated_tokens']:>16,}"
    )
    return "\n".join(lines)
