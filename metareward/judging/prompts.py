"""The judge and meta-judge prompts; nothing else.

The judge prompt is the additive 5-point rubric of Self-Rewarding Language Models
(Yuan et al. 2024, Figure 2); the meta-judge prompt follows Meta-Rewarding Language
Models (Wu et al. 2024, Figure 2). Both are ``str.format`` templates; ``judge.template``
and ``meta_judge.template`` in the config may name files that replace them (their placeholders are
checked by ``metareward.config.templates`` before any model loads).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

RUBRIC = """\
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, \
even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically \
found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing \
the user's question directly and comprehensively, and is well-organized and helpful, even if there is \
slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI \
Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, \
engaging, and insightful answer."""

JUDGE_TEMPLATE = """\
Review the user's question and the corresponding response using the additive 5-point scoring system \
described below. Points are accumulated based on the satisfaction of each criterion:
{rubric}

User: {question}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To \
evaluate the response in alignment with this additive scoring model, we'll systematically attribute \
points based on the outlined criteria."""

META_JUDGE_TEMPLATE = """\
Review the user's question and the corresponding response, along with two judgments. Determine which \
judgment is more accurate according to the rubric provided below. The rubric used for the initial \
judgments is as follows:
{rubric}

User: {question}
Response: {response}

Judgment A: {judgement_a}

Judgment B: {judgement_b}

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why. Consider factors \
such as adherence to the rubric, accuracy in evaluating the response, and consistency in applying the \
criteria.
- Conclude with a clear statement of which judgment is better using the format: \
"Winner: [Judgement A | Judgement B]\""""

# Appended after a judgement (or its last "Score:") to read the model's distribution over 0..5.
SCORE_CUE = "Score: "
SCORE_TOKENS = ["0", "1", "2", "3", "4", "5"]
# Appended after a meta-judgement to read the model's preference between A and B.
WINNER_CUE = "Winner: Judgement "
# Where the pairwise judge's verdict token follows (see PAIRWISE_TEMPLATE).
PAIRWISE_CUE = "Winner: Response "
WINNER_TOKENS = ["A", "B"]


def question_text(messages: list[dict]) -> str:
    """The user's side of a conversation as the judge sees it: the question, or the whole exchange."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


# The pairwise judge's prompt (the win-rate evaluator, and judging preference suites pairwise). It asks
# for "Winner: Response A" / "Winner: Response B", which parse_pairwise_winner reads; a verdict the text
# does not give is read from the probabilities of "A"/"B" after PAIRWISE_CUE, the same words.
PAIRWISE_TEMPLATE = """\
Review the user's question and two responses to it, Response A and Response B. Determine which response \
is better: more helpful, accurate and relevant to what the user asked, and well-written. Do not prefer a \
response for being longer; extra length counts only when it adds something useful. The order in which \
the responses are shown does not matter.

User: {question}

Response A:
<response_a>{response_a}</response_a>

Response B:
<response_b>{response_b}</response_b>

After examining the user's question and both responses:
- Briefly explain which response is better and why, up to 100 words.
- Conclude with the winner using exactly the format: "Winner: Response A" or "Winner: Response B\""""


# A template's delimiters: the tags it wraps a placed text in (<response>, </response_a>, ...).
_TAG = re.compile(r"</?([A-Za-z_][\w-]*)>")


def delimiters(template: str) -> tuple[str, ...]:
    """The names of the tags ``template`` itself opens or closes."""
    return tuple(sorted({match[1] for match in _TAG.finditer(template)}))


def neutralised(text: str, names: tuple[str, ...]) -> str:
    """``text`` with every opening or closing tag of ``names`` (any case, with spaces) escaped as
    ``&lt;...>``: a response placed in a template cannot end its own block and forge the next."""
    if not names:
        return text
    pattern = rf"<(\s*/?\s*(?:{'|'.join(map(re.escape, names))})\s*>)"
    return re.sub(pattern, r"&lt;\1", text, flags=re.IGNORECASE)


@dataclass(frozen=True)
class Templates:
    judge: str = JUDGE_TEMPLATE
    meta_judge: str = META_JUDGE_TEMPLATE
    pairwise: str = PAIRWISE_TEMPLATE

    @classmethod
    def load(
        cls, judge_path: str | None, meta_judge_path: str | None, pairwise_path: str | None = None
    ) -> Templates:
        """Built-in templates, each replaced by a file's text where a path is given."""

        def read(path: str | None, default: str) -> str:
            return Path(path).read_text(encoding="utf-8") if path else default

        return cls(
            judge=read(judge_path, JUDGE_TEMPLATE),
            meta_judge=read(meta_judge_path, META_JUDGE_TEMPLATE),
            pairwise=read(pairwise_path, PAIRWISE_TEMPLATE),
        )

    @functools.cached_property
    def _delimiters(self) -> dict[str, tuple[str, ...]]:
        return {name: delimiters(getattr(self, name)) for name in ("judge", "meta_judge", "pairwise")}

    def _filled(self, name: str, **fields: str) -> list[dict]:
        """Template ``name`` with ``fields`` placed, each with the template's delimiters neutralised."""
        tags = self._delimiters[name]
        placed = {key: neutralised(value, tags) for key, value in fields.items()}
        return [{"role": "user", "content": getattr(self, name).format(rubric=RUBRIC, **placed)}]

    def judge_messages(self, prompt: list[dict], response: str) -> list[dict]:
        return self._filled("judge", question=question_text(prompt), response=response)

    def meta_judge_messages(
        self, prompt: list[dict], response: str, judgement_a: str, judgement_b: str
    ) -> list[dict]:
        return self._filled(
            "meta_judge",
            question=question_text(prompt),
            response=response,
            judgement_a=judgement_a,
            judgement_b=judgement_b,
        )

    def pairwise_messages(self, prompt: list[dict], response_a: str, response_b: str) -> list[dict]:
        """A request asking which of two responses to ``prompt`` is better (the pairwise judge)."""
        return self._filled(
            "pairwise", question=question_text(prompt), response_a=response_a, response_b=response_b
        )
