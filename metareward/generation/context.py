"""Fitting chat requests into a model's context window: the one rule for prompts and evaluation pairs.

A request's length is what the model reads: the chat template and the generation prompt included. What
does not fit is cut at the end of its text, keeping its start; the cut is found by binary search on the
tokens kept, each candidate rendered in full, so only the rendered length decides.

    budget = ContextBudget.for_model(model_dir, trust_remote_code=False, reserved=256)
    budget.fits(messages); budget.cut(text, keep=100)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def context_length(model_dir: str, trust_remote_code: bool) -> int | None:
    """The model's context (``max_position_embeddings``), or None where its config states none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    # Text models keep it at the top; some multimodal configs only in their text part.
    return getattr(config.get_text_config(), "max_position_embeddings", None)


@dataclass(frozen=True)
class ContextBudget:
    """A tokenizer and the most tokens a rendered request may take (``limit``)."""

    tokenizer: object
    limit: int

    @classmethod
    def for_model(cls, model_dir: str, trust_remote_code: bool, reserved: int) -> ContextBudget | None:
        """The model's context minus ``reserved`` tokens (for what it generates); None where there is
        no local model (a served name), its files do not load, or it states no context length."""
        from transformers import AutoTokenizer

        if not model_dir or not (Path(model_dir) / "config.json").is_file():
            return None
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            context = context_length(model_dir, trust_remote_code)
        except (OSError, ValueError):
            return None
        return None if context is None else cls(tokenizer, max(context - reserved, 1))

    def tokens(self, messages: list[dict]) -> int:
        """Tokens the model reads for ``messages``: chat template and generation prompt included."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fits(self, *requests: list[dict]) -> bool:
        return all(self.tokens(messages) <= self.limit for messages in requests)

    def text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cut(self, text: str, keep: int) -> str:
        """``text`` cut to its first ``keep`` tokens (whole when it has no more)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= keep:
            return text
        cut = self.tokenizer.decode(ids[:keep], skip_special_tokens=True)
        return cut if text.startswith(cut) else cut.rstrip("\ufffd")  # a cut inside a character's bytes


def most_kept(high: int, fits: Callable[[int], bool]) -> int:
    """The largest ``keep`` in 0..``high`` with ``fits(keep)`` (0 when none above it fits), by binary
    search: what fits with ``keep`` tokens fits with fewer."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low
