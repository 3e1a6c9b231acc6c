"""The settings of evaluation: the judge's accuracy on human-labelled preference suites, the actor's
win rate against M_0, and the cascade of the judge with a stronger one measured there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metareward.config.checks import Section, require, setting
from metareward.config.choices import (
    EVAL_PROTOCOLS,
    PAIRWISE_SIGNALS,
    POINTWISE_SIGNALS,
    SUITE_ENTRY_KEYS,
    WINNER_SOURCES,
)
from metareward.config.models import RoleModelConfig
from metareward.config.stages import EscalationConfig


@dataclass
class EvalEscalationConfig(EscalationConfig):
    """Escalation in evaluation: the local and the strong judge answer every pair, and the cascade curve
    says what accuracy and cost each escalated fraction gives; the budget is the operating point."""

    # Fractions 0, 1/(points-1), ..., 1 reported on the curve.
    curve_points: int = setting(11, ">= 2")


@dataclass
class RecordedConfig(Section):
    """Verdicts that already exist, scored instead of running a judge (metareward-eval-judge only):
    JudgeBench's outputs format or metareward-eval-judge's own per-pair rows, matched by pair id."""

    # The judge's recorded verdicts: no model is loaded.
    judge: str | None = setting(None, file=True)
    # With eval.escalation.enabled, the strong judge's: the cascade's accuracy is priced on them (its
    # cost only where the generator's prices are set and the file holds token counts: else null or 0).
    strong: str | None = setting(None, file=True)


@dataclass
class EvalConfig(Section):
    """Judge skill on human-labelled preference suites, and the actor's win rate against M_0."""

    # Run before iteration 1 (on M_0) and after each iteration (on M_t).
    enabled: bool = True
    num_pairs: int = setting(64, ">= 1")
    # Judgements per response; a response's score is their mean (judge.score_from applies).
    num_judgements: int = setting(1, ">= 1")
    temperature: float = setting(0.0, ">= 0")
    max_new_tokens: int = setting(256, ">= 1")
    bootstrap_samples: int = setting(1000, ">= 10", says="")
    seed: int = 0
    # Actor win rate of M_t against M_0 on held-out prompts, judged pairwise in both orders.
    win_rate: bool = True
    # JSONL prompts (any shape data.path accepts, or Vicuna/MT-Bench `turns`); empty: bundled Vicuna-bench.
    heldout_prompts: str | None = setting(None, file=True)
    # The first this many prompts of the file; null: every one (MT-Bench's judge needs every question).
    num_heldout: int | None = setting(16, ">= 1", note="(or null: every prompt of the file)")
    response_max_new_tokens: int = setting(256, ">= 1")
    # Preference suites the judge is measured on (metareward-eval-judge): bundled suites (hh_rlhf,
    # llmbar_natural, pandalm), JSONL files in any suite format, or {path, name, format} entries;
    # num_pairs pairs of each (a seeded sample).
    suites: list[Any] = field(default_factory=lambda: ["hh_rlhf"])
    # pointwise: the rubric judge scores each response (num_judgements samples, judge.score_from), the
    # higher mean wins; pairwise: one prompt shows both responses, judged in both orders.
    protocols: list[str] = setting(factory=lambda: ["pointwise"], allowed=EVAL_PROTOCOLS)
    # Where a pairwise verdict comes from: text ("Winner: Response A|B"), or text_or_probs (otherwise the
    # probabilities of A/B after "Winner: Response ", read for every verdict, for calibration).
    winner_from: str = setting("text", WINNER_SOURCES)
    # Optional path to a str.format template replacing the built-in pairwise judge prompt (fields:
    # {question}, {response_a}, {response_b}); it should end asking for "Winner: Response A|B".
    pairwise_template: str | None = setting(None, template="pairwise")
    # The suite and protocol ("<suite>/<protocol>") whose accuracy names the best iteration (summary,
    # runs/<name>/best.json); empty: the first suite under the first protocol.
    select_by: str | None = None
    # The fixed evaluator of win rates: M_0 (the seed model), or with own_model=true any model and
    # backend, e.g. eval.evaluator.own_model=true eval.evaluator.model.kind=hf eval.evaluator.model.path=...
    evaluator: RoleModelConfig = field(default_factory=RoleModelConfig)
    # The cascade of the judge with a stronger one, per suite and protocol (escalation.py).
    escalation: EvalEscalationConfig = field(default_factory=EvalEscalationConfig)
    recorded: RecordedConfig = field(default_factory=RecordedConfig)

    def check(self) -> None:
        require(bool(self.suites), "suites", self.suites, "needs at least one suite")
        for entry in self.suites:
            ok = isinstance(entry, str) or (
                isinstance(entry, dict)
                and ("path" in entry) != ("hf" in entry)
                and set(entry) <= set(SUITE_ENTRY_KEYS)
            )
            require(
                ok,
                "suites",
                entry,
                "a bundled suite name, a JSONL or Parquet path, {path, name, format}, or a Hugging Face "
                "dataset {hf, split, revision, subset, name, format}",
            )
        require(bool(self.protocols), "protocols", self.protocols, f"one or more of {EVAL_PROTOCOLS}")
        require(
            self.recorded.strong is None or self.escalation.enabled,
            "recorded.strong",
            self.recorded.strong,
            "prices a cascade: set eval.escalation.enabled=true",
        )
        if "pointwise" in self.protocols:
            self.escalation.check_signal(POINTWISE_SIGNALS, self.num_judgements, "pointwise judgements")
        if "pairwise" in self.protocols:
            self.escalation.check_signal(PAIRWISE_SIGNALS, 2, "pairwise verdicts")
