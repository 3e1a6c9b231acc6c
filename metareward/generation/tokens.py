"""Token-level rules every local backend must apply the same way (no torch, no engine).

    ids = encode(tokenizer, generator.render(messages))          # the rendered text, exactly
    context, token = next_token_query(tokenizer, text, "A")      # read P(token | context)
    stops = stop_token_ids(tokenizer, generation_config.eos_token_id)

``tokenizer`` is any Hugging Face tokenizer (``AutoTokenizer.from_pretrained``).
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text``; a rendered chat text already holds every special token it needs."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def next_token_query(tokenizer: Any, text: str, candidate: str) -> tuple[list[int], int]:
    """The context and the token a candidate continues ``text`` with.

    BPE may merge the candidate with the text's last characters (" A" is one token), so the
    context is the longest common token prefix of ``text`` and ``text + candidate``.
    """
    base, full = encode(tokenizer, text), encode(tokenizer, text + candidate)
    common = 0
    while common < min(len(base), len(full)) and base[common] == full[common]:
        common += 1
    if len(full) - common != 1:
        raise ValueError(f"candidate {candidate!r} is not a single token after the given text")
    return full[:common], full[common]


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> list[int]:
    """The tokens that end a turn: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
