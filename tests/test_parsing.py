"""Tests for metareward.parsing: one case per rule of the score and winner contracts, plus properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metareward.judging.parsing import parse_pairwise_winner
from metareward.parsing import parse_score, parse_winner

# ---------------------------------------------------------------- parse_score


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Score: 4", 4.0, id="plain"),
        pytest.param("Points: 2", 2.0, id="points-key"),
        pytest.param("The answer is fine.\nTotal points: 3", 3.0, id="points-key-with-prefix"),
        pytest.param("score: 4", 4.0, id="lower-case"),
        pytest.param("SCORE:4", 4.0, id="upper-case-no-space"),
        pytest.param("Score :   4  ", 4.0, id="spacing"),
        pytest.param("**Score:** 4", 4.0, id="bold-key"),
        pytest.param("**Score: 4**", 4.0, id="bold-line"),
        pytest.param("Score: **4**", 4.0, id="bold-value"),
        pytest.param("**Score**: 4", 4.0, id="bold-word-then-colon"),
        pytest.param("__Score__: 4", 4.0, id="underscore-emphasis"),
        pytest.param("Score: 4/5", 4.0, id="over-five"),
        pytest.param("Score: 4 / 5", 4.0, id="over-five-spaced"),
        pytest.param("Score: 4 out of 5", 4.0, id="out-of-five"),
        pytest.param("Score: [4]", 4.0, id="brackets"),
        pytest.param("Score: [4/5]", 4.0, id="brackets-over-five"),
        pytest.param("Score: 3 points", 3.0, id="trailing-points"),
        pytest.param("Score: 1 point", 1.0, id="trailing-point"),
        pytest.param("Score: 3.5", 3.5, id="decimal"),
        pytest.param("Score: 4.", 4.0, id="trailing-period"),
        pytest.param("Score: 0", 0.0, id="zero-is-a-score"),
        pytest.param("Score: 5", 5.0, id="upper-bound"),
        pytest.param("Score: 5.0/5.0", 5.0, id="decimal-denominator"),
        pytest.param("Score: -0", 0.0, id="negative-zero-normalised"),
    ],
)
def test_parse_score_accepts(text: str, expected: float) -> None:
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Score: 6", id="above-range"),
        pytest.param("Score: 5.5", id="above-range-decimal"),
        pytest.param("Score: -1", id="negative"),
        pytest.param("Score: <total points>", id="template-echo"),
        pytest.param("Score: 4/10", id="other-denominator"),
        pytest.param("Score: 4 out of 10", id="other-denominator-words"),
        pytest.param("Score: high", id="word"),
        pytest.param("Score:", id="empty"),
        pytest.param("Score:\n4", id="value-on-next-line"),
        pytest.param("Score: 3 or 4", id="alternatives"),
        pytest.param("Score: 4 on a scale of 10", id="trailing-words"),
        pytest.param("The response deserves a 4.", id="no-key"),
        pytest.param("", id="empty-string"),
        pytest.param("Subscore: 4", id="key-inside-word"),
        pytest.param("Score: ٤", id="non-ascii-digit"),
    ],
)
def test_parse_score_rejects(text: str) -> None:
    assert parse_score(text) is None


def test_parse_score_never_returns_zero_for_missing_score() -> None:
    # None and 0.0 are both falsy; the contract is that a missing score is None, not 0.
    result = parse_score("No verdict here.")
    assert result is None
    assert result != 0


def test_parse_score_last_occurrence_wins() -> None:
    assert parse_score("Format: 'Score: <total points>'\n...\nScore: 2\nOn reflection, Score: 3") == 3.0


def test_parse_score_malformed_last_occurrence_gives_none() -> None:
    assert parse_score("Score: 4\nScore: high") is None


def test_parse_score_last_key_may_be_points() -> None:
    assert parse_score("Score: 1\nPoints: 4") == 4.0


def test_parse_score_reads_only_the_key_line() -> None:
    # A number on a later line belongs to the next sentence, not to the score.
    assert parse_score("Score: 4\n10 is the maximum") == 4.0


@pytest.mark.parametrize("value", [None, 4, 4.0, b"Score: 4", ["Score: 4"]])
def test_parse_score_non_str_gives_none(value: object) -> None:
    assert parse_score(value) is None  # type: ignore[arg-type]


def test_parse_score_huge_number_gives_none() -> None:
    assert parse_score("Score: " + "9" * 5000) is None


# ---------------------------------------------------------------- parse_winner


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Winner: Judgement A", "A", id="plain-A"),
        pytest.param("Winner: Judgement B", "B", id="plain-B"),
        pytest.param("Winner: Judgment B", "B", id="judgment-spelling"),
        pytest.param("winner: judgement a", "A", id="lower-case"),
        pytest.param("WINNER:JUDGEMENT B", "B", id="upper-case-no-space"),
        pytest.param("Winner :   Judgement   A  ", "A", id="spacing"),
        pytest.param("**Winner:** Judgement B", "B", id="bold-key"),
        pytest.param("**Winner: Judgement A**", "A", id="bold-line"),
        pytest.param("Winner: **Judgement B**", "B", id="bold-value"),
        pytest.param("Winner: [Judgement A]", "A", id="brackets"),
        pytest.param("Winner: Judgement B.", "B", id="trailing-period"),
        pytest.param("Winner: A", "A", id="bare-A"),
        pytest.param("Winner: B", "B", id="bare-B"),
        pytest.param("Judgement A is better.\nWinner: Judgement B", "B", id="prose-before"),
    ],
)
def test_parse_winner_accepts(text: str, expected: str) -> None:
    assert parse_winner(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Winner: [Judgement A | Judgement B]", id="format-echo-brackets"),
        pytest.param("Winner: Judgement A | Judgement B", id="format-echo"),
        pytest.param("Winner: Judgement A|B", id="format-echo-short"),
        pytest.param("Winner: Judgement C", id="other-letter"),
        pytest.param("Winner: both", id="both"),
        pytest.param("Winner: Judgement Apple", id="word-starting-with-A"),
        pytest.param("Winner: a tie", id="article"),
        pytest.param("Winner:", id="empty"),
        pytest.param("Winner:\nJudgement A", id="value-on-next-line"),
        pytest.param("Judgement A is better.", id="no-key"),
        pytest.param("", id="empty-string"),
    ],
)
def test_parse_winner_rejects(text: str) -> None:
    assert parse_winner(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Winner: Response A", "A", id="plain-A"),
        pytest.param("Reasons.\n**Winner:** response b.", "B", id="markdown-lowercase-period"),
        pytest.param("Winner: [Response B]", "B", id="brackets"),
        pytest.param("Winner: A", "A", id="bare"),
        pytest.param("Winner: Response A\nOn reflection, Winner: Response B", "B", id="last-wins"),
        pytest.param("Winner: Response A | Response B", None, id="format-echo"),
        pytest.param("Winner: Judgement A", None, id="the-meta-judges-words"),
        pytest.param("Winner: Response C", None, id="other-letter"),
        pytest.param("Response A is better.", None, id="no-key"),
    ],
)
def test_parse_pairwise_winner(text: str, expected: str | None) -> None:
    assert parse_pairwise_winner(text) == expected


def test_parse_winner_last_occurrence_wins() -> None:
    assert parse_winner("Winner: Judgement A\nWait, reconsidering.\nWinner: Judgement B") == "B"


def test_parse_winner_malformed_last_occurrence_gives_none() -> None:
    assert parse_winner("Winner: Judgement A\nWinner: Judgement A | Judgement B") is None


@pytest.mark.parametrize("value", [None, 1, b"Winner: Judgement A", ["Winner: Judgement A"]])
def test_parse_winner_non_str_gives_none(value: object) -> None:
    assert parse_winner(value) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

_FRAGMENTS = [
    "Score:",
    "score",
    "Points:",
    "points",
    ":",
    "**",
    "*",
    "_",
    "`",
    " ",
    "\n",
    "\r",
    "\t",
    "0",
    "3",
    "4",
    "5",
    "6",
    "10",
    "-",
    "+",
    ".",
    "/",
    "[",
    "]",
    "(",
    ")",
    "<",
    ">",
    "out of",
    "Winner:",
    "winner",
    "Judgement",
    "Judgment",
    "A",
    "B",
    "a",
    "b",
    "|",
    "٤",
    "\u2028",
]
_texts = st.one_of(st.text(), st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join))


@given(_texts)
def test_parse_score_never_raises_and_stays_in_range(text: str) -> None:
    result = parse_score(text)
    assert result is None or (isinstance(result, float) and 0.0 <= result <= 5.0)


@given(_texts)
def test_parse_winner_never_raises_and_returns_a_verdict_or_none(text: str) -> None:
    assert parse_winner(text) in {None, "A", "B"}


@given(_texts)
def test_appended_score_wins(text: str) -> None:
    assert parse_score(text + "\nScore: 3") == 3.0


@given(_texts)
def test_appended_winner_wins(text: str) -> None:
    assert parse_winner(text + "\nWinner: Judgement B") == "B"
