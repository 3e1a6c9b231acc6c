"""Evaluation: how well the model judges (on the field's preference suites) and how well it answers.

- Judge skill: ``load_suites`` (``eval.suites``, read by metareward/suites.py), then
  ``evaluate_suites``, which judges every pair under each protocol of ``eval.protocols``
  (``judge_pointwise``: the rubric judge scores each response; ``judge_pairwise``: both responses in
  one prompt, both orders) and measures the verdicts with metareward/judge_metrics.py.
  ``metareward-eval-judge [overrides]`` (cli.py) runs it from the command line. With
  ``eval.escalation`` a strong judge answers every pair too and the cascade curve of the two
  (escalation.py) is added per suite and protocol.
- Actor skill: ``load_heldout_prompts``, ``generate_responses`` (for M_t and M_0), then
  ``win_rate``, where a fixed evaluator compares the two models' answers in both orders.
- ``evaluate_model``: both, for one model of a run (what the loop runs on M_0 and after each iteration).

Everything but ``evaluate_model`` takes a :class:`~metareward.generation.Generator`, so tests can pass
stand-ins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from metareward.config import Config, ConfigError, EvalConfig
from metareward.data import bundled_path, to_prompt_rows
from metareward.generation import Generator, SamplingParams, make_generator, reads_probabilities
from metareward.judging import escalation
from metareward.judging.escalation import Cascade, StrongJudge, prices_of
from metareward.judging.judge_metrics import JudgedPair, Verdict, agreement_stats, mean_or_none, suite_metrics
from metareward.judging.prompts import Templates
from metareward.judging.suites import SuiteEntryError, SuitePair, load_suite
from metareward.loop import stages
from metareward.store.records import RecordError, read_jsonl_numbered

log = logging.getLogger(__name__)

BUNDLED_HELDOUT = "vicuna_bench_questions.jsonl"
# Tokens kept free beyond eval.max_new_tokens for the cue a score or verdict is read after.
CUE_TOKENS = 8


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
    requests = [
        templates.judge_messages(pair.prompt, response)
        for pair in pairs
        for response in (pair.response_a, pair.response_b)
    ]
    judged = stages.judge_requests(
        generator, requests, _sampling(cfg, cfg.num_judgements, seed), score_from, desc, read_probs
    )
    out = []
    for index, pair in enumerate(pairs):
        rows_a, rows_b = judged[2 * index], judged[2 * index + 1]
        score_a = mean_or_none([r["score"] for r in rows_a if r["score"] is not None])
        score_b = mean_or_none([r["score"] for r in rows_b if r["score"] is not None])
        if score_a is None or score_b is None:
            winner = None
        else:
            winner = "A" if score_a > score_b else "B" if score_b > score_a else "tie"
        dist_a, dist_b = _mean_distribution(rows_a), _mean_distribution(rows_b)
        prob_a = _prob_first_wins(dist_a, dist_b) if dist_a and dist_b else None
        rows = rows_a + rows_b
        judged_pair = _judged(pair, (Verdict(winner, prob_a=prob_a),), rows, "score_source")
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
    verdicts = stages.verdict_requests(
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
    pair: SuitePair, verdicts: tuple[Verdict, ...], answers: list[dict], source_key: str
) -> JudgedPair:
    """A judged pair; an answer counts as unparsed when its verdict or score did not come from its text."""
    return JudgedPair(
        label=pair.label,
        len_a=len(pair.response_a),
        len_b=len(pair.response_b),
        verdicts=verdicts,
        calls=len(answers),
        unparsed=sum(a[source_key] != "text" for a in answers),
        human=pair.human,
        subset=pair.subset,
        pair_id=pair.pair_id,
        prompt_tokens=sum(a.get("prompt_tokens") or 0 for a in answers),
        completion_tokens=sum(a.get("num_tokens") or 0 for a in answers),
    )


@dataclass(frozen=True)
class ContextFit:
    """The judge's context: a pair whose judge prompts (under a protocol) do not fit ``limit`` tokens is
    skipped, or with ``mode="truncate"`` has its responses cut to the same number of tokens, keeping
    their start (skipped after all when nothing of them fits) — the rule of ``data.long_prompts``."""

    tokenizer: object
    limit: int
    mode: str

    @classmethod
    def for_model(
        cls, model_dir: str, trust_remote_code: bool, max_new_tokens: int, mode: str
    ) -> ContextFit | None:
        """The fit for the model in ``model_dir``; None when it has no local tokenizer or states no
        context length (a served model known only by name): its pairs are then not checked."""
        from transformers import AutoConfig, AutoTokenizer

        if not model_dir or not (Path(model_dir) / "config.json").is_file():
            return None
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            return None
        context = getattr(config.get_text_config(), "max_position_embeddings", None)
        if context is None:
            return None
        return cls(tokenizer, max(context - max_new_tokens - CUE_TOKENS, 1), mode)

    def _tokens(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fits(self, templates: Templates, pair: SuitePair, a: str, b: str, protocol: str) -> bool:
        if protocol == "pointwise":
            requests = [templates.judge_messages(pair.prompt, a), templates.judge_messages(pair.prompt, b)]
        else:
            requests = [
                templates.pairwise_messages(pair.prompt, a, b),
                templates.pairwise_messages(pair.prompt, b, a),
            ]
        return all(self._tokens(messages) <= self.limit for messages in requests)

    def _cut(self, text: str, keep: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= keep:
            return text
        cut = self.tokenizer.decode(ids[:keep], skip_special_tokens=True)
        return cut if text.startswith(cut) else cut.rstrip("\ufffd")  # a cut inside a character

    def _truncated(self, templates: Templates, pair: SuitePair, protocol: str) -> SuitePair | None:
        """``pair`` with both responses cut to the most tokens that fit; None if none do."""
        low, high = (
            0,
            max(
                len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                for text in (pair.response_a, pair.response_b)
            ),
        )
        while low < high:  # binary search on the tokens kept of each response
            middle = (low + high + 1) // 2
            a, b = self._cut(pair.response_a, middle), self._cut(pair.response_b, middle)
            if self._fits(templates, pair, a, b, protocol):
                low = middle
            else:
                high = middle - 1
        a, b = self._cut(pair.response_a, low), self._cut(pair.response_b, low)
        if low == 0 or not (a.strip() and b.strip()):
            return None
        return dataclasses.replace(pair, response_a=a, response_b=b)

    def fit(self, templates: Templates, pairs: list[SuitePair], protocol: str) -> tuple[list, dict]:
        """The pairs that fit (truncated ones included) and ``{"skipped_too_long", "truncated"}``."""
        kept, counts = [], {"skipped_too_long": 0, "truncated": 0}
        for pair in pairs:
            if self._fits(templates, pair, pair.response_a, pair.response_b, protocol):
                kept.append(pair)
                continue
            cut = self._truncated(templates, pair, protocol) if self.mode == "truncate" else None
            if cut is None:
                counts["skipped_too_long"] += 1
            else:
                kept.append(cut)
                counts["truncated"] += 1
        return kept, counts


def evaluate_suites(
    generator: Generator,
    templates: Templates,
    suites: list[tuple[str, list[SuitePair]]],
    cfg: EvalConfig,
    score_from: str,
    fit: ContextFit | None = None,
    cascade: Cascade | None = None,
) -> tuple[dict, list[dict]]:
    """Every suite under every protocol of ``cfg.protocols``: ``({"suites": {name: {protocol:
    metrics}}}, per-pair rows)``, metrics as
    :func:`~metareward.judging.judge_metrics.suite_metrics` gives them,
    plus what was left out before judging: ``identical_pairs`` (both responses the same text: no
    preference to find), and with ``fit`` the pairs too long for the judge's context,
    ``skipped_too_long`` and ``truncated`` (null when not checked).

    With ``cascade`` (``eval.escalation``) its strong judge answers every pair too, in text, and each
    suite and protocol gets ``"escalation"``: the cascade curve of :func:`escalation.cascade`; per-pair
    rows then hold the strong judge's outcome, the local judge's confidence and whether the budget
    escalates the pair."""
    result: dict = {"suites": {}}
    per_pair = []
    for name, all_pairs in suites:
        result["suites"][name] = {}
        pairs = [p for p in all_pairs if p.response_a.strip() != p.response_b.strip()]
        identical = len(all_pairs) - len(pairs)
        if identical:
            log.warning("metareward: suite %s: %d pair(s) with identical responses left out", name, identical)
        for protocol in cfg.protocols:
            fitted, counts = fit.fit(templates, pairs, protocol) if fit else (pairs, None)
            if counts and any(counts.values()):
                log.warning(
                    "metareward: suite %s (%s): %d pair(s) too long for the judge's context skipped, %d "
                    "truncated (data.long_prompts)",
                    name,
                    protocol,
                    counts["skipped_too_long"],
                    counts["truncated"],
                )
            read_probs = (
                cascade is not None
                and escalation.needs_probabilities(cascade.cfg.signal)
                and reads_probabilities(generator)
            )
            judged = _judge_suite(generator, templates, fitted, cfg, protocol, score_from, read_probs)
            metrics = {
                **suite_metrics(judged, cfg.bootstrap_samples, cfg.seed),
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
                }
                for j in judged
            ]
            if cascade is not None:
                # The strong judge answers in text: an endpoint gives no probabilities to read.
                strong = _judge_suite(
                    cascade.strong, templates, fitted, cfg, protocol, "text", False, "strong"
                )
                curve = escalation.cascade(
                    judged, strong, cascade.cfg, (cascade.local_prices, cascade.strong_prices), cfg.seed
                )
                escalated = set(curve.pop("escalated_pairs", []))
                confidences = curve.pop("confidences", [])
                for index, (row, confidence) in enumerate(zip(rows, confidences, strict=True)):
                    row.update(strong_outcome=strong[index].outcome(), confidence=confidence)
                    row["escalated"] = index in escalated
                metrics["escalation"] = curve
            result["suites"][name][protocol] = metrics
            per_pair += rows
    return result, per_pair


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


# ------------------------------------------------------------------ actor win rate


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


def load_heldout_prompts(path: str | None, num: int) -> list[dict]:
    """The first ``num`` held-out prompts ``{"prompt_id", "messages"}`` of a JSONL file, or of a JSON
    list (``.json``: alpaca_eval's evaluation set, whose rows have ``instruction``; "line" then means
    the row's place in the list).

    None reads the bundled Vicuna-bench questions. Rows with ``turns`` (Vicuna / MT-Bench) become
    their first turn as one user message, id from ``question_id``; any other row may take any
    shape ``data.path`` accepts. The first rows, not a sample, so M_0 and every M_t see the same."""
    source = Path(path) if path else bundled_path(BUNDLED_HELDOUT)
    numbered = _json_list(source) if source.suffix == ".json" else read_jsonl_numbered(source)
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
    make=make_generator,
) -> dict:
    """The judge skill of M_``iteration`` in ``model_dir`` on every suite and protocol, and its greedy
    answers to the held-out prompts; with ``baseline`` (M_0's answers) also its actor's win rate
    against them, judged by the fixed evaluator in ``evaluator_dir`` (``eval.evaluator``: M_0 unless
    it has a model of its own).

    M_t also judges its own answers against M_0's: ``actor.self_preference`` is that win rate minus
    the fixed evaluator's.

    Returns ``{"judge": {suite: {protocol: metrics}}, "per_pair": rows, "heldout_responses": rows[,
    "actor": win rate]}``. ``make`` makes the generators (``make_generator``'s arguments; the loop's
    puts them on the cluster with cluster=ray)."""
    suites = load_suites(cfg.eval)
    heldout = load_heldout_prompts(cfg.eval.heldout_prompts, cfg.eval.num_heldout)
    fit = ContextFit.for_model(
        model_dir, cfg.model.trust_remote_code, cfg.eval.max_new_tokens, cfg.data.long_prompts
    )
    generator = make(model_dir, cfg.model, cfg.generator, cache_dir)
    strong = StrongJudge(cfg.eval.escalation.judge, cache_dir) if cfg.eval.escalation.enabled else None
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
        spec = cfg.eval.evaluator
        model, settings = (spec.model, spec.generator) if spec.own_model else (cfg.model, cfg.generator)
        evaluator = make(evaluator_dir, model, settings, cache_dir)
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
