"""The placeholders each prompt template is given, and whether a template's text uses them rightly.

A pure string check, here so that ``judge.template``, ``meta_judge.template`` and
``eval.pairwise_template`` are refused before any model loads; ``metareward.judging.prompts`` holds the
templates themselves and imports this check from here.
"""

from __future__ import annotations

import string

# Each template's placeholders: those it may use, and those it must (without them the model never sees
# what it is asked to judge). Literal braces are written doubled: {{ and }}.
PLACEHOLDERS = {
    "judge": ({"rubric", "question", "response"}, {"question", "response"}),
    "meta_judge": (
        {"rubric", "question", "response", "judgement_a", "judgement_b"},
        {"response", "judgement_a", "judgement_b"},
    ),
    "pairwise": ({"question", "response_a", "response_b"}, {"response_a", "response_b"}),
}
BRACE_HINT = "write {{ and }} for a literal brace"


def template_problem(text: str, kind: str) -> str | None:
    """Why ``text`` cannot be the ``kind`` template ("judge", "meta_judge", "pairwise"), or None: a stray
    brace, a placeholder it is not given (or one with a format spec, conversion, index or attribute),
    or a required placeholder missing."""
    allowed, required = PLACEHOLDERS[kind]
    listing = ", ".join(f"{{{name}}}" for name in sorted(allowed))
    try:
        parsed = list(string.Formatter().parse(text))
        fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    except ValueError as error:
        return f"a stray brace ({error}); {BRACE_HINT}"
    for name, spec, conv in fields:
        if name not in allowed:
            return f"unknown placeholder {{{name}}} (it may use {listing}); {BRACE_HINT}"
        if spec or conv:
            return f"placeholder {{{name}}} takes no format spec or conversion; {BRACE_HINT}"
    missing = sorted(required - {name for name, _, _ in fields})
    if missing:
        must = ", ".join(f"{{{name}}}" for name in sorted(required))
        return f"missing placeholder {{{missing[0]}}} (it must use {must})"
    return None
