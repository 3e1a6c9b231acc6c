"""Fitting preference-suite pairs to the judge's context: a pair whose judge prompts do not fit is skipped,
or its responses are cut to the same number of tokens (``data.long_prompts``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from metareward.generation.context import ContextBudget, most_kept
from metareward.judging.prompts import Templates
from metareward.judging.suites import SuitePair

# Tokens kept free beyond eval.max_new_tokens for the cue a score or verdict is read after.
CUE_TOKENS = 8


@dataclass(frozen=True)
class ContextFit:
    """The judge's context: a pair whose judge prompts (under a protocol) do not fit the budget is
    skipped, or with ``mode="truncate"`` has its responses cut to the same number of tokens, keeping
    their start (skipped after all when nothing of them fits) — the rule of ``data.long_prompts``."""

    budget: ContextBudget
    mode: str

    @classmethod
    def for_model(
        cls, model_dir: str, trust_remote_code: bool, max_new_tokens: int, mode: str
    ) -> ContextFit | None:
        """The fit for the model in ``model_dir``; None when it has no local tokenizer or states no
        context length (a served model known only by name): its pairs are then not checked."""
        budget = ContextBudget.for_model(model_dir, trust_remote_code, reserved=max_new_tokens + CUE_TOKENS)
        return None if budget is None else cls(budget, mode)

    def _fits(self, templates: Templates, pair: SuitePair, a: str, b: str, protocol: str) -> bool:
        if protocol == "pointwise":
            return self.budget.fits(
                templates.judge_messages(pair.prompt, a), templates.judge_messages(pair.prompt, b)
            )
        return self.budget.fits(
            templates.pairwise_messages(pair.prompt, a, b), templates.pairwise_messages(pair.prompt, b, a)
        )

    def _truncated(self, templates: Templates, pair: SuitePair, protocol: str) -> SuitePair | None:
        """``pair`` with both responses cut to the most tokens that fit; None if none do."""
        budget = self.budget

        def fits(keep: int) -> bool:
            a, b = budget.cut(pair.response_a, keep), budget.cut(pair.response_b, keep)
            return self._fits(templates, pair, a, b, protocol)

        longest = max(budget.text_tokens(text) for text in (pair.response_a, pair.response_b))
        keep = most_kept(longest, fits)
        a, b = budget.cut(pair.response_a, keep), budget.cut(pair.response_b, keep)
        if keep == 0 or not (a.strip() and b.strip()):
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
