"""Read the judge's score and the meta-judge's verdict out of generated text.

Both parsers are pure, never raise, and return ``None`` rather than guess: a judgement
without a readable verdict is dropped by the caller, whereas a wrong number (a 0 for
"no score", say) would silently poison the preference pairs built from it.

Shared rule: find every occurrence of the key ("Score:"/"Points:" or "Winner:"), take the
last one, and read only what follows it on the same line. The last occurrence wins even when
it is malformed, because models often restate the format early ("... using the format
'Score: <total points>'") and give the real verdict at the end; an earlier, well-formed
occurrence is not a safe fallback for a garbled final one.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["SCORE_KEY", "WINNER_KEY", "parse_pairwise_winner", "parse_score", "parse_winner"]

MAX_SCORE = 5.0

# The key must start a word (so "subscore:" does not count), but markdown such as "__Score__:" may
# sit directly before it, hence the look-behind excludes letters and digits only. Markdown and
# spaces may sit between the word and the colon ("**Score**: 4"), never a line break.
SCORE_KEY = re.compile(r"(?<![^\W_])(?:score|points)[ \t*_]*:", re.IGNORECASE)
WINNER_KEY = re.compile(r"(?<![^\W_])winner[ \t*_]*:", re.IGNORECASE)
_REST_OF_LINE = re.compile(r"[^\r\n]*")

# Emphasis, code and bracket characters carry no meaning in a verdict: "**4**", "[4]", "(4)",
# "`Judgement A`" all say the same thing once removed.
_DECORATION = re.compile(r"[*_`\[\]()]")

# ASCII digits only: \d would admit other scripts' digits, which no judge writes on purpose.
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# Applied to text whose whitespace has been collapsed to single spaces, so " ?" suffices and there
# are no adjacent unbounded runs to backtrack over. The whole remainder must match: trailing words
# ("Score: 4 on a scale of 10", "Score: 3 or 4") would make any number we picked a guess.
_SCORE_VALUE = re.compile(
    rf"(?P<num>{_NUMBER})(?: ?(?:/|out of) ?(?P<den>{_NUMBER}))?(?: ?(?:points?|pts))? ?\.?",
    re.IGNORECASE,
)
# "Judgement A", "Judgment b", a bare "A"; a trailing period is tolerated. The format line's echo
# ("Judgement A | Judgement B", "Judgement A|B") cannot match, so it reads as no verdict.
_WINNER_VALUE = re.compile(r"(?:judge?ment ?)?(?P<who>[ab]) ?\.?", re.IGNORECASE)
# The pairwise judge's "Response A", "response b", a bare "A"; the echo "Response A | Response B" is none.
_PAIRWISE_VALUE = re.compile(r"(?:response ?)?(?P<who>[ab]) ?\.?", re.IGNORECASE)


def _last_value(key: re.Pattern[str], text: str) -> str | None:
    """What follows the last occurrence of ``key`` on its line, undecorated and space-normalised."""
    last = None
    for match in key.finditer(text):
        last = match
    if last is None:
        return None
    rest = _REST_OF_LINE.match(text, last.end())
    line = rest.group() if rest else ""
    return " ".join(_DECORATION.sub(" ", line).split())


def parse_score(text: str) -> float | None:
    """The judge's total from the last "Score: <points>" (or "Points: <points>") in ``text``.

    Accepts any case and spacing, markdown emphasis, brackets, decimals, a trailing "points" and
    a denominator of 5 ("4/5", "4 out of 5" read as 4). Any other denominator ("4/10") is another
    scale we cannot map safely, so it gives None. A value outside 0..5, a missing score, a
    malformed last score, or a non-str input all give None, never 0.
    """
    if not isinstance(text, str):
        return None
    value = _last_value(SCORE_KEY, text)
    if value is None:
        return None
    match = _SCORE_VALUE.fullmatch(value)
    if match is None:
        return None
    den = match.group("den")
    if den is not None and float(den) != MAX_SCORE:
        return None
    # float() of a very long digit string gives inf rather than raising; the range check rejects it.
    score = float(match.group("num"))
    if not 0.0 <= score <= MAX_SCORE:
        return None
    # "or 0.0" turns "-0" into 0.0 so callers never see a negative zero.
    return score or 0.0


def parse_winner(text: str) -> Literal["A", "B"] | None:
    """The meta-judge's verdict from the last "Winner: Judgement A|B" in ``text``.

    Accepts "Judgement"/"Judgment", any case and spacing, markdown, brackets, a trailing period
    and a bare "Winner: A". An echo of the format line or anything other than A or B gives None.
    """
    return _winner(text, _WINNER_VALUE)


def parse_pairwise_winner(text: str) -> Literal["A", "B"] | None:
    """The pairwise judge's verdict from the last "Winner: Response A|B" in ``text`` (the same
    tolerances as :func:`parse_winner`, "Response" in place of "Judgement")."""
    return _winner(text, _PAIRWISE_VALUE)


def _winner(text: str, value_pattern: re.Pattern[str]) -> Literal["A", "B"] | None:
    if not isinstance(text, str):
        return None
    value = _last_value(WINNER_KEY, text)
    if value is None:
        return None
    match = value_pattern.fullmatch(value)
    if match is None:
        return None
    return "A" if match.group("who").upper() == "A" else "B"
