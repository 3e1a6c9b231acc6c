"""Escalation: what the local judge is least sure of goes to a stronger judge, whose answer replaces it.

Fine-tuned judges are strong in their domain and weak outside it; handing the cases they are least
confident about to a strong judge reaches the strong judge's accuracy at a fraction of its cost
(Huang et al., "An Empirical Study of LLM-as-a-Judge"). Settings: ``judge.escalation``,
``meta_judge.escalation`` (``loop.stages`` applies them in a run) and ``eval.escalation``
(``judging.cascade`` draws the cascade curve in evaluation).

Confidence signals, each in [0, 1] (higher: surer), None when an item lacks the signal's inputs (such an
item is escalated first, and counted as ``no_signal``):

- pointwise items (the judge stage: a response and its N judgements; in evaluation, a pair: its two
  responses' judgements, as sure as the less sure response)
  - ``margin``: the top-two margin p(1st) - p(2nd) of the judge's 0..5 score distribution, averaged over
    the judgements that have a distribution;
  - ``entropy``: 1 - H(p) / ln 6 of that distribution (1: one score certain; 0: all six equally likely),
    averaged likewise;
  - ``spread``: 1 - (max - min) / 5 over the item's parsed scores (needs two of them);
- pairwise items (the meta-judge stage: a comparison of two judgements; in evaluation, a pair; both
  shown in both orders)
  - ``margin``: |p(A) - p(B)| of the renormalised A/B probabilities after the verdict cue, averaged over
    the orders that have them;
  - ``order``: 1 when both orders name the same winner, 0 when they disagree (None when one has none);
- ``random``: a seeded uniform draw per item, the control.

A budget picks the escalated items: ``fraction`` f escalates the floor(f x n + 1/2) least confident of
the stage's n items; ``threshold`` t every item whose confidence is below t. Equal confidences are
ordered by a seeded draw per item, so a run escalates the same items every time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from metareward.config import EscalationConfig, GeneratorConfig, ModelSpec
from metareward.generation import Generator, Usage
from metareward.judging.judge_metrics import JudgedPair, mean_or_none, mean_score
from metareward.store.layout import JUDGEMENTS, META_JUDGEMENTS
from metareward.store.records import read_jsonl

NUM_SCORES = 6  # the rubric's 0..5
# "Within 1 accuracy point of the strong judge alone" (fraction_to_match_strong).
MATCH_TOLERANCE = 0.01


# ------------------------------------------------------------------ confidence signals


def needs_probabilities(signal: str) -> bool:
    """Whether ``signal`` reads the judge's probabilities (an extra forward pass per answer)."""
    return signal in ("margin", "entropy")


def draw(seed: int, item: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the item's id: ``random``'s confidence, and the
    tie-break between equal confidences."""
    return zlib.crc32(f"{seed}/{item}".encode()) / 2**32


def _score_distribution_confidence(signal: str, probs: Sequence[float]) -> float:
    if signal == "margin":
        first, second = sorted(probs, reverse=True)[:2]
        return first - second
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return max(0.0, 1 - entropy / math.log(NUM_SCORES))


def score_confidence(signal: str, judgements: Sequence[dict]) -> float | None:
    """How sure the judge is of one response's score, from its judgement rows (``score``,
    ``score_probs``); ``random`` is drawn by the caller."""
    if signal == "spread":
        scores = [j["score"] for j in judgements if j.get("score") is not None]
        return 1 - (max(scores) - min(scores)) / (NUM_SCORES - 1) if len(scores) >= 2 else None
    values = [
        _score_distribution_confidence(signal, j["score_probs"]) for j in judgements if j.get("score_probs")
    ]
    return mean_or_none(values)


def verdict_confidence(
    signal: str, winners: Sequence[str | None], margins: Sequence[float | None]
) -> float | None:
    """How sure the judge is of one comparison shown in both orders: ``winners`` are what each order
    named, in one frame (a judgement id, or the pair's side; None: no verdict), ``margins`` each order's
    |p(A) - p(B)| (None: no probabilities)."""
    if signal == "order":
        if len(winners) < 2 or any(w is None for w in winners):
            return None
        return 1.0 if len(set(winners)) == 1 else 0.0
    return mean_or_none([m for m in margins if m is not None])


def probability_margin(probs: Sequence[float] | None) -> float | None:
    """|p(A) - p(B)| of renormalised A/B probabilities."""
    return abs(probs[0] - probs[1]) if probs else None


def pair_confidence(signal: str, judged: JudgedPair, seed: int) -> float | None:
    """How sure the judge is of an evaluation pair: pointwise, the less sure of its two responses;
    pairwise, from its verdicts in both orders."""
    if signal == "random":
        return draw(seed, judged.pair_id)
    if judged.score_rows:
        sides = [score_confidence(signal, rows) for rows in judged.score_rows]
        return None if None in sides else min(sides)
    winners = [v.winner for v in judged.verdicts]
    margins = [None if v.prob_a is None else abs(2 * v.prob_a - 1) for v in judged.verdicts]
    return verdict_confidence(signal, winners, margins)


# ------------------------------------------------------------------ choosing what to escalate


def escalation_order(confidences: dict[str, float | None], seed: int) -> list[str]:
    """Item ids, least confident first: those without a confidence, then by confidence, equal ones in a
    seeded order."""
    return sorted(
        confidences,
        key=lambda item: (confidences[item] is not None, confidences[item] or 0.0, draw(seed, item)),
    )


def fraction_count(fraction: float, items: int) -> int:
    return min(items, math.floor(fraction * items + 0.5))


def choose(confidences: dict[str, float | None], cfg: EscalationConfig, seed: int) -> set[str]:
    """The items the budget escalates (``cfg.fraction`` or ``cfg.threshold``)."""
    if cfg.threshold is not None:
        return {item for item, c in confidences.items() if c is None or c < cfg.threshold}
    return set(escalation_order(confidences, seed)[: fraction_count(cfg.fraction, len(confidences))])


# ------------------------------------------------------------------ the strong judge and its price


@dataclass(frozen=True)
class Prices:
    """US dollars per million prompt and completion tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


def prices_of(settings: GeneratorConfig) -> Prices | None:
    """The prices of an endpoint (``generator.openai.*_price_per_mtok``); None for a local model or an
    endpoint without prices (its cost is then not reported)."""
    api = settings.openai
    if settings.backend != "openai" or (
        api.prompt_price_per_mtok is None and api.completion_price_per_mtok is None
    ):
        return None
    return Prices(api.prompt_price_per_mtok or 0.0, api.completion_price_per_mtok or 0.0)


def model_name(spec: ModelSpec) -> str:
    """The name rows and cards give a model: its served name behind an endpoint, else its model."""
    if spec.generator.backend == "openai":
        return spec.generator.openai.model or spec.model.path or "endpoint"
    return spec.model.path or spec.model.kind


class StrongJudge:
    """A stage's stronger judge, started (a model loaded, or an endpoint's client) only once an item is
    escalated, and closed by its owner: ``strong.generator()``, ``strong.usage()``, ``strong.close()``.
    ``start`` makes its generator from its settings (the engines' ``strong_judge``)."""

    def __init__(self, spec: ModelSpec, start: Callable[[ModelSpec], Generator]):
        self.spec, self.start = spec, start
        self.name = model_name(spec)
        self.prices = prices_of(spec.generator)
        self._generator: Generator | None = None

    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = self.start(self.spec)
        return self._generator

    def usage(self) -> Usage:
        return self._generator.usage if self._generator is not None else Usage()

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None


@dataclass(frozen=True)
class StageEscalation:
    """What the judge or meta-judge stage needs to escalate: the settings, the strong judge, the name of
    the local judge (for the rows) and the seed of the stage's draws."""

    cfg: EscalationConfig
    strong: StrongJudge
    local_name: str
    local_prices: Prices | None
    seed: int


def for_iteration(cfg, t: int, start: Callable[[ModelSpec], Generator]) -> dict[str, StageEscalation]:
    """Iteration ``t``'s escalating stages (``judge.escalation``, ``meta_judge.escalation``, where
    enabled) by role; ``start`` makes a strong judge's generator."""
    found = {}
    for role in ("judge", "meta_judge"):
        settings = getattr(cfg, role).escalation
        if not settings.enabled:
            continue
        spec = getattr(cfg.roles, role)
        if spec.own_model:
            local_name, local_generator = model_name(spec), spec.generator
        else:
            local_name, local_generator = f"M_{t - 1}", cfg.generator
        found[role] = StageEscalation(
            cfg=settings,
            strong=StrongJudge(settings.judge, start),
            local_name=local_name,
            local_prices=prices_of(local_generator),
            seed=zlib.crc32(f"{cfg.seed}/{t}/{role}_escalation".encode()),
        )
    return found


def local_path(path: Path) -> Path:
    """Where an escalating stage keeps the local judge's rows (``judgements_local.jsonl``)."""
    return path.with_name(f"{path.stem}_local{path.suffix}")


def strong_path(path: Path) -> Path:
    """Where an escalating stage keeps the strong judge's rows (``judgements_strong.jsonl``)."""
    return path.with_name(f"{path.stem}_strong{path.suffix}")


def comparison_of(row: dict) -> str:
    """The comparison a meta-judge row belongs to, the same for both of its orders."""
    first, second = sorted((row["first_id"], row["second_id"]))
    return f"{first}|{second}"


# ------------------------------------------------------------------ what a stage's escalation did


def _spent(rows: list[dict], name: str, prices: Prices | None) -> dict:
    prompt = sum(r.get("prompt_tokens") or 0 for r in rows)
    completion = sum(r.get("num_tokens") or 0 for r in rows)
    return {
        "name": name,
        "answers": len(rows),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": prices.cost(prompt, completion) if prices else None,
    }


def stage_metrics(
    local_rows: list[dict], final_rows: list[dict], item_of, agree, esc: StageEscalation
) -> dict:
    """The escalated share of a stage's items, the agreement of the local and strong answers on the
    escalated ones (``agree(local rows, strong rows)`` of one item: True, False or None when either has
    no answer), and the answers, tokens and cost of each judge (the local judge answered every item)."""
    confidence = {item_of(r): r.get("confidence") for r in final_rows}
    strong_rows = [r for r in final_rows if r.get("escalated")]
    strong_of: dict = {}
    for row in strong_rows:
        strong_of.setdefault(item_of(row), []).append(row)
    local_of: dict = {}
    for row in local_rows:
        if item_of(row) in strong_of:
            local_of.setdefault(item_of(row), []).append(row)
    escalated = set(strong_of)
    agreements = []
    for item, strong in strong_of.items():
        verdict = agree(local_of.get(item, []), strong)
        if verdict is not None:
            agreements.append(float(verdict))
    return {
        "signal": esc.cfg.signal,
        "budget": {"fraction": esc.cfg.fraction, "threshold": esc.cfg.threshold},
        "items": len(confidence),
        "escalated": len(escalated),
        "escalated_share": len(escalated) / len(confidence) if confidence else None,
        "no_signal": sum(c is None for c in confidence.values()),
        "agreement": mean_or_none(agreements),
        "agreement_items": len(agreements),
        "judges": {
            "local": _spent(local_rows, esc.local_name, esc.local_prices),
            "strong": _spent(strong_rows, esc.strong.name, esc.strong.prices),
        },
    }


def iteration_metrics(directory: Path, escalations: dict[str, StageEscalation]) -> dict:
    """Per escalating stage of an iteration: :func:`stage_metrics` from the stage's files (what the
    work cost, whichever invocation did it)."""
    found = {}
    for role, esc in escalations.items():
        path = directory / (JUDGEMENTS if role == "judge" else META_JUDGEMENTS)
        local = read_jsonl(local_path(path)) if local_path(path).is_file() else []
        if role == "judge":
            found[role] = stage_metrics(
                local, read_jsonl(path), lambda r: r["response_id"], scores_agree, esc
            )
        else:
            found[role] = stage_metrics(local, read_jsonl(path), comparison_of, verdicts_agree, esc)
    return found


def scores_agree(local: list[dict], strong: list[dict]) -> bool | None:
    """A response's local and strong mean scores are within half a point of each other."""
    a, b = mean_score(local), mean_score(strong)
    return None if a is None or b is None else abs(a - b) <= 0.5


def verdicts_agree(local: list[dict], strong: list[dict]) -> bool | None:
    """Each order's local and strong verdicts name the same winning judgement (orders where both have one)."""
    by_order = {(r["first_id"], r["second_id"]): r["winner"] for r in local}
    same = [
        by_order.get((r["first_id"], r["second_id"])) == r["winner"]
        for r in strong
        if r["winner"] is not None and by_order.get((r["first_id"], r["second_id"])) is not None
    ]
    return None if not same else all(same)
