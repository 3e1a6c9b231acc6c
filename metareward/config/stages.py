"""The settings of an iteration's stages: the actor, judge and meta-judge (sampling, how answers are
read, escalation to a stronger judge), the preference pairs built from them, and the guards checked
before the iteration trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metareward.config.checks import Section, require, setting
from metareward.config.choices import (
    ON_ALARM,
    PAIRWISE_SIGNALS,
    POINTWISE_SIGNALS,
    SCORE_SOURCES,
    SIGNALS,
    WINNER_SOURCES,
)
from metareward.config.models import ModelSpec


@dataclass
class Sampling(Section):
    """How a role's answers are sampled; each role that generates has these three settings, and a
    subclass that changes a default keeps the rule."""

    temperature: float = setting(0.8, ">= 0")
    top_p: float = setting(0.95, "(0, 1]")
    max_new_tokens: int = setting(512, ">= 1")


@dataclass
class EscalationConfig(Section):
    """Hand what the local judge is least sure of to a stronger judge (``.judge``), whose answer then
    replaces the local one (escalation.py). The budget is ``fraction`` (the least-confident share of
    the stage's items) or ``threshold`` (every item whose confidence is below it); set one, the other
    null. An item without the signal's inputs (no distribution behind an API) is escalated first."""

    enabled: bool = False
    # The stronger judge; it answers in text (its score or verdict is parsed, never read from probabilities).
    judge: ModelSpec = field(default_factory=ModelSpec)
    # pointwise (judge stage, eval pointwise): margin, entropy, spread, random; pairwise (meta-judge stage,
    # eval pairwise): margin, order, random.
    signal: str = setting("margin", SIGNALS)
    # Each in [0, 1], checked in check() after the rule that exactly one is set, so that a threshold set
    # while fraction keeps its default is told about that rule first.
    fraction: float | None = 0.2
    threshold: float | None = None

    def check(self) -> None:
        require(
            (self.fraction is None) != (self.threshold is None),
            "threshold" if self.threshold is not None else "fraction",
            self.threshold if self.threshold is not None else self.fraction,
            "set exactly one budget: fraction (e.g. 0.2) or threshold (with fraction=null)",
        )
        for name in ("fraction", "threshold"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, name, value, "must be in [0, 1]")
        served = self.judge.generator.openai.model or (
            self.judge.model.kind == "hf" and self.judge.model.path
        )
        require(
            not self.enabled or self.judge.generator.backend != "openai" or bool(served),
            "judge.generator.openai.model",
            self.judge.generator.openai.model,
            "is required with judge.generator.backend=openai: the name the endpoint serves the strong "
            "judge under",
        )

    def check_signal(self, allowed: tuple[str, ...], judgements: int, what: str) -> None:
        """Refuse a signal the stage's answers cannot give (``what`` names them); ``spread`` needs two
        or more sampled scores per item."""
        require(self.signal in allowed, "escalation.signal", self.signal, f"{what} allow {allowed}")
        require(
            self.signal != "spread" or judgements >= 2,
            "escalation.signal",
            self.signal,
            f"spread needs 2 or more judgements per response (num_judgements={judgements})",
        )


@dataclass
class ActorConfig(Sampling):
    num_responses: int = setting(4, ">= 2")


@dataclass
class JudgeConfig(Sampling):
    num_judgements: int = setting(3, ">= 1")
    # text: a score only when the judge wrote one (the paper's rule); text_or_expected: otherwise
    # the expectation of 0..5 under the model's probabilities after "Score: ".
    score_from: str = setting("text", SCORE_SOURCES)
    # Optional path to a str.format template replacing the built-in rubric prompt (fields: {question},
    # {response}, both required, and {rubric}; a literal brace is written {{ or }}).
    template: str | None = setting(None, template="judge")
    # The judge stage's items are responses (N judgements each); escalated ones are judged N times by
    # escalation.judge instead.
    escalation: EscalationConfig = field(default_factory=EscalationConfig)

    def check(self) -> None:
        self.escalation.check_signal(POINTWISE_SIGNALS, self.num_judgements, "the judge's scores")


@dataclass
class MetaJudgeConfig(Sampling):
    # text: a verdict only when the meta-judge wrote one; text_or_probs: otherwise "A" or "B" drawn from
    # the model's probabilities after "Winner: Judgement" at this temperature (the likelier at 0).
    winner_from: str = setting("text", WINNER_SOURCES)
    # Optional path to a str.format template (fields: {question}, {response}, {rubric},
    # {judgement_a}, {judgement_b}; the last two and {response} required; literal braces {{ }}).
    template: str | None = setting(None, template="meta_judge")
    # The meta-judge stage's items are comparisons of two judgements (both orders); escalated ones are
    # answered, in both orders, by escalation.judge instead.
    escalation: EscalationConfig = field(default_factory=EscalationConfig)

    def check(self) -> None:
        self.escalation.check_signal(PAIRWISE_SIGNALS, 2, "the meta-judge's verdicts")


@dataclass
class PairsConfig(Section):
    # Length-control strength in [0, 0.5): a number, or one number per iteration (the last repeats).
    rho: Any = 0.0
    # L2 strength of the Elo (Bradley-Terry) fit over judgements.
    elo_l2: float = setting(0.01, "> 0")
    # Options, off by default (the paper's rules); pairs.py says what each does and where it comes from.
    # A judgement with more num_tokens is unusable, as a cut-off one is.
    max_judgement_tokens: int | None = setting(None, ">= 1")
    # A comparison of two judgements counts only when its two orders name the same winner.
    consistent_verdicts_only: bool = False
    # Actor pairs use only responses that finished (finish_reason "stop").
    exclude_cut_off_responses: bool = False
    # No chosen score value holds more than this share of an iteration's judge pairs (NeMo-Aligner: 0.4).
    judge_chosen_score_cap: float | None = setting(None, "(0, 1]")

    def check(self) -> None:
        values = self._rho_values()
        require(bool(values), "rho", self.rho, "needs at least one value")
        for value in values:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 0.5
            require(ok, "rho", self.rho, "every value must be a number in [0, 0.5)")

    def rho_for(self, iteration: int) -> float:
        """The rho of 1-based ``iteration``; a list's last value repeats."""
        values = self._rho_values()
        return float(values[min(iteration, len(values)) - 1])

    def _rho_values(self) -> list:
        return list(self.rho) if isinstance(self.rho, list | tuple) else [self.rho]


@dataclass
class GuardsConfig(Section):
    """Alarms for the ways self-rewarding runs are known to fail, checked each iteration before it trains
    (guards.py). A threshold left empty turns its guard off; ``guards.*`` may change on resume."""

    # Score saturation: the share of scored judgements at the top of the scale (5) is above this.
    max_top_score_share: float | None = setting(0.9, "[0, 1]")
    # Length drift: mean response or judgement tokens grew by more than this share over the previous
    # iteration (0.5: by more than half).
    max_length_growth: float | None = setting(0.5, ">= 0")
    # The share of judge scores, or of meta-judge verdicts, not parsed from the text is above this.
    max_parse_failure_rate: float | None = setting(0.5, "[0, 1]")
    # Position bias: the meta-judge's first (or second) position wins more than this share of verdicts.
    max_position_win_share: float | None = setting(0.8, "[0.5, 1]")
    # warn: log the alarm and go on; stop: end the run, saying why, before the iteration trains.
    on_alarm: str = setting("warn", ON_ALARM)
