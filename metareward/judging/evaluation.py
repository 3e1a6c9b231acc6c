"""Evaluation: how well the model judges (on the field's preference suites) and how well it answers.

- Judge skill: ``load_suites`` (``eval.suites``, read by ``judging.suites``), then
  ``evaluate_suites``, which judges every pair under each protocol of ``eval.protocols``
  (``judge_pointwise``: the rubric judge scores each response; ``judge_pairwise``: both responses in
  one prompt, both orders) and measures the verdicts with ``judging.judge_metrics``.
  ``metareward-eval-judge [overrides]`` (cli.py) runs it from the command line. With
  ``eval.escalation`` a strong judge answers every pair too and the cascade curve of the two
  (``judging.escalation``) is added per suite and protocol.
- Actor skill (in ``heldout``): ``load_heldout_prompts``, ``generate_responses`` (for M_t and M_0),
  then ``win_rate``, where a fixed evaluator compares the two models' answers in both orders.
- ``evaluate_model``: both, for one model of a run (what the loop runs on M_0 and after each iteration).

Everything but ``evaluate_model`` takes a :class:`~metareward.generation.Generator`, so tests can pass
stand-ins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

from metareward.config import Config, ConfigError, EvalConfig
from metareward.generation import Generator, SamplingParams, reads_probabilities
from metareward.judging import cascade as cascades
from metareward.judging import escalation
from metareward.judging.cascade import Cascade
from metareward.judging.context_fit import ContextFit
from metareward.judging.escalation import StrongJudge, prices_of
from metareward.judging.heldout import generate_responses, load_heldout_prompts, win_rate
from metareward.judging.judge_metrics import JudgedPair, Verdict, mean_score, suite_metrics
from metareward.judging.official import official_score, pair_credit
from metareward.judging.prompts import Templates
from metareward.judging.recorded import RecordedVerdicts
from metareward.judging.requests import judge_requests, verdict_requests
from metareward.judging.suites import SuiteEntryError, SuitePair, load_suite

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ judge skill on preference suites


def load_suites(cfg: EvalConfig) -> list[tuple[str, list[SuitePair]]]:
    """(name, pairs) of every ``eval.suites`` entry, ``eval.num_pairs`` of each (a seeded sample). An
    entry that names no suite is a :class:`ConfigError` on ``eval.suites``; a bad file's error names
    file and line."""
    loaded = []
    for entry in cfg.suites:
        try:
            loaded.append(load_suite(entry, cfg.num_pairs, cfg.seed))
        except SuiteEntryError as error:
            raise ConfigError("suites", entry, str(error), where="eval.") from None
    names = [name for name, _ in loaded]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            "suites", cfg.suites, f"two suites named {duplicates[0]!r} (give one a name)", "eval."
        )
    if cfg.select_by and cfg.select_by.partition("/")[0] not in names:
        why = f"names no suite of eval.suites ({', '.join(names)})"
        raise ConfigError("select_by", cfg.select_by, why, "eval.")
    return loaded


def _sampling(cfg: EvalConfig, n: int, seed: int) -> SamplingParams:
    return SamplingParams(
        n=n, temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=seed
    )


def _prob_first_wins(a: list[float], b: list[float]) -> float:
    """P(score A > score B) + half P(equal) for independent draws from two 0..5 distributions."""
    below_b = [sum(b[:k]) for k in range(len(b))]
    return sum(pa * (below_b[k] + b[k] / 2) for k, pa in enumerate(a))


def _mean_distribution(rows: list[dict]) -> list[float] | None:
    dists = [r["score_probs"] for r in rows if r.get("score_probs")]
    return [sum(column) / len(dists) for column in zip(*dists, strict=True)] if dists else None


def judge_pointwise(
    generator: Generator,
    templates: Templates,
    pairs: list[SuitePair],
    cfg: EvalConfig,
    score_from: str,
    seed: int,
    read_probs: bool = False,
    desc: str = "eval pointwise",
) -> list[JudgedPair]:
    """The paper's judge on each pair: both responses scored with the rubric (``cfg.num_judgements``
    samples each); the higher mean score wins. Where the judge gives 0..5 distributions
    (``score_from=text_or_expected``, or ``read_probs``), its probability that A wins is read from them."""
    # Each distinct response is scored once: a candidate of a best-of-N row, met in several pairs,
    # keeps one score.
    requests, index_of, sides_of = [], {}, []
    for pair in pairs:
        sides = []
        for response in (pair.response_a, pair.response_b):
            key = (json.dumps(pair.prompt, sort_keys=True), response)
            if key not in index_of:
                index_of[key] = len(requests)
                requests.append(templates.judge_messages(pair.prompt, response))
            sides.append(index_of[key])
        sides_of.append(tuple(sides))
    judged = judge_requests(
        generator, requests, _sampling(cfg, cfg.num_judgements, seed), score_from, desc, read_probs
    )
    out, charged = [], set()
    for pair, sides in zip(pairs, sides_of, strict=True):
        rows_a, rows_b = judged[sides[0]], judged[sides[1]]
        # Calls and tokens count once, on the first pair that shows the response (cost is not doubled).
        paid = [row for index in dict.fromkeys(sides) if index not in charged for row in judged[index]]
        charged.update(sides)
        score_a, score_b = mean_score(rows_a), mean_score(rows_b)
        if score_a is None or score_b is None:
            winner = None
        else:
            winner = "A" if score_a > score_b else "B" if score_b > score_a else "tie"
        dist_a, dist_b = _mean_distribution(rows_a), _mean_distribution(rows_b)
        prob_a = _prob_first_wins(dist_a, dist_b) if dist_a and dist_b else None
        judged_pair = _judged(pair, (Verdict(winner, prob_a=prob_a),), rows_a + rows_b, "score_source", paid)
        out.append(dataclasses.replace(judged_pair, score_rows=(tuple(rows_a), tuple(rows_b))))
    return out


def judge_pairwise(
    generator: Generator,
    templates: Templates,
    pairs: list[SuitePair],
    cfg: EvalConfig,
    seed: int,
    winner_from: str | None = None,
    read_probs: bool = False,
    desc: str = "eval pairwise",
) -> list[JudgedPair]:
    """Both responses in one prompt ("Winner: Response A|B"), every pair in both orders; with
    ``winner_from=text_or_probs`` (default ``cfg.winner_from``) the A/B probabilities after the cue back
    missing verdicts and give the judge's probability that A wins (``read_probs``: read them whatever
    ``winner_from``)."""
    requests = []
    for pair in pairs:
        requests.append(templates.pairwise_messages(pair.prompt, pair.response_a, pair.response_b))
        requests.append(templates.pairwise_messages(pair.prompt, pair.response_b, pair.response_a))
    verdicts = verdict_requests(
        generator,
        requests,
        _sampling(cfg, 1, seed),
        winner_from or cfg.winner_from,
        desc,
        pairwise=True,
        all_probs=True,
        read_probs=read_probs,
    )
    out = []
    for index, pair in enumerate(pairs):
        shown_a_first, shown_b_first = verdicts[2 * index], verdicts[2 * index + 1]
        # The second order shows B in position A: its position verdicts map back to the pair's sides.
        swap = {"A": "B", "B": "A", None: None}
        probs_1, probs_2 = shown_a_first.get("winner_probs"), shown_b_first.get("winner_probs")
        answers = (
            Verdict(shown_a_first["winner"], first="A", prob_a=probs_1[0] if probs_1 else None),
            Verdict(swap[shown_b_first["winner"]], first="B", prob_a=probs_2[1] if probs_2 else None),
        )
        out.append(_judged(pair, answers, [shown_a_first, shown_b_first], "winner_source"))
    return out


def _judged(
    pair: SuitePair,
    verdicts: tuple[Verdict, ...],
    answers: list[dict],
    source_key: str,
    paid: list[dict] | None = None,
) -> JudgedPair:
    """A judged pair; an answer counts as unparsed when its verdict or score did not come from its text.
    ``paid``: the answers this pair is charged for (default all; a shared answer is charged once)."""
    paid = answers if paid is None else paid
    return JudgedPair(
        label=pair.label,
        len_a=len(pair.response_a),
        len_b=len(pair.response_b),
        verdicts=verdicts,
        calls=len(paid),
        unparsed=sum(a[source_key] != "text" for a in paid),
        human=pair.human,
        subset=pair.subset,
        pair_id=pair.pair_id,
        prompt_tokens=sum(a.get("prompt_tokens") or 0 for a in paid),
        completion_tokens=sum(a.get("num_tokens") or 0 for a in paid),
        group=pair.group,
        slot=pair.slot,
    )


def evaluate_suites(
    generator: Generator | None,
    templates: Templates,
    suites: list[tuple[str, list[SuitePair]]],
    cfg: EvalConfig,
    score_from: str,
    fit: ContextFit | None = None,
    cascade: Cascade | None = None,
    recorded: RecordedVerdicts | None = None,
) -> tuple[dict, list[dict]]:
    """Every suite under every protocol of ``cfg.protocols``: ``({"suites": {name: {protocol:
    metrics}}}, per-pair rows)``, metrics as
    :func:`~metareward.judging.judge_metrics.suite_metrics` gives them,
    plus what was left out before judging: ``identical_pairs`` (both responses the same text: no
    preference to find), and with ``fit`` the pairs too long for the judge's context,
    ``skipped_too_long`` and ``truncated`` (null when not checked).

    With ``cascade`` (``eval.escalation``) its strong judge answers every pair too, in text, and each
    suite and protocol gets ``"escalation"``: the cascade curve of
    :func:`~metareward.judging.cascade.cascade`; per-pair rows then hold the strong judge's outcome, the
    local judge's confidence and whether the budget escalates the pair.

    With ``recorded`` (``eval.recorded.judge``) the judge's verdicts are read from it, no generator
    needed; a cascade's strong judge likewise from ``cascade.recorded``."""
    result: dict = {"suites": {}}
    per_pair = []
    for name, all_pairs in suites:
        result["suites"][name] = {}
        fmt = all_pairs[0].format if all_pairs else "pairs"
        pairs = [p for p in all_pairs if p.response_a.strip() != p.response_b.strip()]
        identical = len(all_pairs) - len(pairs)
        if identical:
            log.warning("metareward: suite %s: %d pair(s) with identical responses left out", name, identical)
        for protocol in cfg.protocols:
            fitted, counts = fit.fit(templates, pairs, protocol) if fit else (pairs, None)
            # A row with several candidates is scored whole: one left out (identical, too long) drops it.
            fitted = _whole_groups(all_pairs, fitted)
            if counts and any(counts.values()):
                log.warning(
                    "metareward: suite %s (%s): %d pair(s) too long for the judge's context skipped, %d "
                    "truncated (data.long_prompts)",
                    name,
                    protocol,
                    counts["skipped_too_long"],
                    counts["truncated"],
                )
            if recorded is not None:
                judged = recorded.judged(name, protocol, fitted)
            else:
                read_probs = (
                    cascade is not None
                    and escalation.needs_probabilities(cascade.cfg.signal)
                    and reads_probabilities(generator)
                )
                judged = _judge_suite(generator, templates, fitted, cfg, protocol, score_from, read_probs)
            metrics = {
                **suite_metrics(judged, cfg.bootstrap_samples, cfg.seed),
                "official": official_score(fmt, judged),
                "identical_pairs": identical,
                "skipped_too_long": counts["skipped_too_long"] if counts else None,
                "truncated": counts["truncated"] if counts else None,
            }
            rows = [
                {
                    "suite": name,
                    "protocol": protocol,
                    "pair_id": j.pair_id,
                    "label": j.label,
                    "outcome": j.outcome(),
                    "verdicts": [v.winner for v in j.verdicts],
                    "prob_a": j.prob_a(),
                    "subset": j.subset,
                    # Pointwise: each side's mean score, so a recorded re-scoring has what best-of-N needs.
                    "scores": [mean_score(rows) for rows in j.score_rows] if j.score_rows else None,
                }
                for j in judged
            ]
            if cascade is not None:
                if cascade.recorded is not None:
                    strong = cascade.recorded.judged(name, protocol, fitted)
                else:  # in text: an endpoint gives no probabilities to read
                    strong = _judge_suite(
                        cascade.strong, templates, fitted, cfg, protocol, "text", False, "strong"
                    )
                prices = (cascade.local_prices, cascade.strong_prices)
                credit_of = pair_credit(fmt) or cascades.outcome_credit
                curve = cascades.cascade(judged, strong, cascade.cfg, prices, cfg.seed, credit_of)
                escalated = set(curve.pop("escalated_pairs", []))
                confidences = curve.pop("confidences", [])
                for index, (row, confidence) in enumerate(zip(rows, confidences, strict=True)):
                    row.update(strong_outcome=strong[index].outcome(), confidence=confidence)
                    row["escalated"] = index in escalated
                metrics["escalation"] = curve
            result["suites"][name][protocol] = metrics
            per_pair += rows
    return result, per_pair


def _whole_groups(all_pairs: list[SuitePair], kept: list[SuitePair]) -> list[SuitePair]:
    """``kept`` without the pairs of any row with several candidates that lost one of its pairs."""
    sizes = Counter(pair.group for pair in all_pairs if pair.group is not None)
    left = Counter(pair.group for pair in kept if pair.group is not None)
    dropped = {group for group, size in sizes.items() if left[group] not in (0, size)}
    if dropped:
        log.warning(
            "metareward: %d row(s) with several candidates left out whole (a pair could not be judged)",
            len(dropped),
        )
    return [p for p in kept if p.group not in dropped]


def _judge_suite(
    generator: Generator,
    templates: Templates,
    pairs: list[SuitePair],
    cfg: EvalConfig,
    protocol: str,
    score_from: str,
    read_probs: bool,
    who: str = "",
) -> list[JudgedPair]:
    """One judge on a suite's pairs under ``protocol``; ``score_from="text"`` also means verdicts from
    text alone (a strong judge behind an API)."""
    if not pairs:
        return []
    desc = f"eval {protocol}" + (f" ({who})" if who else "")
    if protocol == "pointwise":
        return judge_pointwise(generator, templates, pairs, cfg, score_from, cfg.seed, read_probs, desc)
    winner_from = "text" if who else None
    return judge_pairwise(generator, templates, pairs, cfg, cfg.seed, winner_from, read_probs, desc)


# ------------------------------------------------------------------ one model, as the loop evaluates it


def evaluate_model(
    cfg: Config,
    engines,
    model_dir: str,
    seed_dir: str,
    iteration: int,
    templates: Templates,
    baseline: list | None = None,
) -> dict:
    """The judge skill of M_``iteration`` in ``model_dir`` on every suite and protocol, and its greedy
    answers to the held-out prompts; with ``baseline`` (M_0's answers) also its actor's win rate
    against them, judged by the fixed evaluator (``eval.evaluator``: M_0 in ``seed_dir`` unless it has a
    model of its own).

    M_t also judges its own answers against M_0's: ``actor.self_preference`` is that win rate minus
    the fixed evaluator's.

    Returns ``{"judge": {suite: {protocol: metrics}}, "per_pair": rows, "heldout_responses": rows[,
    "actor": win rate]}``. ``engines`` (:class:`metareward.engines.Engines`) start the generators;
    evaluation is not dealt in chunks, so each is one engine wherever they run."""
    suites = load_suites(cfg.eval)
    heldout = load_heldout_prompts(cfg.eval.heldout_prompts, cfg.eval.num_heldout)
    fit = ContextFit.for_model(
        model_dir, cfg.model.trust_remote_code, cfg.eval.max_new_tokens, cfg.data.long_prompts
    )
    generator = engines.start(engines.seat(None, model_dir), replicas=1)
    strong = (
        StrongJudge(cfg.eval.escalation.judge, engines.strong_judge) if cfg.eval.escalation.enabled else None
    )
    try:
        cascade = None
        if strong is not None:
            cascade = Cascade(
                cfg.eval.escalation, strong.generator(), strong.prices, prices_of(cfg.generator)
            )
        judge, per_pair = evaluate_suites(
            generator, templates, suites, cfg.eval, cfg.judge.score_from, fit, cascade
        )
        responses, self_judged = [], None
        if cfg.eval.win_rate:
            responses = generate_responses(
                generator, heldout, cfg.eval.response_max_new_tokens, cfg.eval.seed
            )
            if baseline is not None:
                # M_t judging its own answers against M_0's: compared with the fixed evaluator below,
                # the self-preference a model judging its own outputs invites.
                self_judged = win_rate(
                    generator,
                    templates,
                    heldout,
                    responses,
                    baseline,
                    cfg.eval,
                    seed=cfg.eval.seed + iteration,
                )
    finally:
        generator.close()
        if strong is not None:
            strong.close()
    result = {"judge": judge["suites"], "per_pair": per_pair, "heldout_responses": responses}
    if baseline is not None and cfg.eval.win_rate:
        evaluator = engines.start(engines.seat(cfg.eval.evaluator, seed_dir), replicas=1)
        try:
            seed = cfg.eval.seed + iteration
            result["actor"] = win_rate(
                evaluator, templates, heldout, responses, baseline, cfg.eval, seed=seed
            )
        finally:
            evaluator.close()
        result["actor"]["self_judged_win_rate"] = self_judged["win_rate"]
        result["actor"]["self_preference"] = self_judged["win_rate"] - result["actor"]["win_rate"]
    return result
