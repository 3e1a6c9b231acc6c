"""Asking a judge through a generator: judgements with their scores, and verdicts with their winners.

Both the loop's judge and meta-judge stages and the evaluation on preference suites ask this way. A score
or winner comes from the text ("Score: N", "Winner: ... A|B"); where the text gives none, it may come from
the model's probabilities of the next token after the same words (``judge.score_from``,
``meta_judge.winner_from``, ``eval.winner_from``).
"""

from __future__ import annotations

import math
import random

from metareward.generation import Generator, Messages, SamplingParams
from metareward.judging.parsing import SCORE_KEY, WINNER_KEY, parse_pairwise_winner, parse_score, parse_winner
from metareward.judging.prompts import PAIRWISE_CUE, SCORE_CUE, SCORE_TOKENS, WINNER_CUE, WINNER_TOKENS


def score_cue_text(judgement: str) -> str:
    """The judgement up to its last "Score:", followed by the cue whose next token is the score."""
    matches = list(SCORE_KEY.finditer(judgement))
    head = judgement[: matches[-1].start()] if matches else judgement.rstrip() + "\n"
    return head + SCORE_CUE


def winner_cue_text(verdict: str, cue: str = WINNER_CUE) -> str:
    """The verdict up to its last "Winner:", followed by ``cue`` (the meta-judge's, or PAIRWISE_CUE)."""
    matches = list(WINNER_KEY.finditer(verdict))
    head = verdict[: matches[-1].start()] if matches else verdict.rstrip() + "\n"
    return head + cue


def judge_requests(
    generator: Generator,
    requests: list[Messages],
    params: SamplingParams,
    score_from: str,
    desc: str = "",
    read_probs: bool = False,
) -> list[list[dict]]:
    """``params.n`` judgements per judge request: text, parsed score (or, with
    ``score_from="text_or_expected"``, the expectation under the model's 0..5 distribution),
    where the score came from, and that distribution (read with ``score_from="text"`` too when
    ``read_probs``: an escalation signal needs it)."""
    outputs = generator.generate(requests, params, desc=desc)
    all_probs = iter([])
    if score_from == "text_or_expected" or read_probs:
        # The distribution costs one more forward pass per judgement (a paid call behind an API),
        # so it is read only when a score or a confidence may come from it.
        cue_texts = [
            generator.render(request) + score_cue_text(c.text)
            for request, completions in zip(requests, outputs, strict=True)
            for c in completions
        ]
        all_probs = iter(generator.next_token_probs(cue_texts, SCORE_TOKENS))
    results = []
    for completions in outputs:
        judged = []
        for completion in completions:
            probs = next(all_probs, None)
            mass = sum(probs) if probs is not None else None
            distribution = [p / mass for p in probs] if mass else None
            score, source = parse_score(completion.text), "text"
            if score is None:
                source = None
                if score_from == "text_or_expected" and distribution is not None:
                    score, source = sum(i * p for i, p in enumerate(distribution)), "expected"
            judged.append(
                {
                    "text": completion.text,
                    "score": score,
                    "score_source": source,
                    "score_probs": distribution,
                    "score_probs_mass": mass,
                    "num_tokens": completion.num_tokens,
                    "finish_reason": completion.finish_reason,
                    "prompt_tokens": completion.prompt_tokens,
                }
            )
        results.append(judged)
    return results


def sample_verdict(probs: list[float], temperature: float, rng: random.Random) -> str | None:
    """ "A" or "B" drawn from the model's two probabilities at the meta-judge's temperature, as its
    written verdict would have been (greedy at temperature 0); None if the model gives neither mass."""
    p_a, p_b = probs
    if p_a + p_b <= 0:
        return None
    if temperature == 0:
        return None if p_a == p_b else ("A" if p_a > p_b else "B")
    log_a, log_b = (math.log(max(p, 1e-300)) / temperature for p in (p_a, p_b))
    share_a = 1 / (1 + math.exp(min(log_b - log_a, 700)))
    return "A" if rng.random() < share_a else "B"


def verdict_requests(
    generator: Generator,
    requests: list[Messages],
    params: SamplingParams,
    winner_from: str,
    desc: str = "",
    pairwise: bool = False,
    all_probs: bool = False,
    read_probs: bool = False,
) -> list[dict]:
    """One verdict per request: text, winner "A" | "B" | None and where it came from. The meta-judge
    answers "Winner: Judgement A|B"; with ``pairwise`` the pairwise judge, "Winner: Response A|B".

    With ``winner_from="text_or_probs"`` a verdict the text does not give is drawn from the model's
    probabilities of A and B after the same words (the cue), at ``params.temperature``; with
    ``all_probs`` too, those probabilities are read for every verdict and returned as ``winner_probs``
    ([p(A), p(B)] renormalised, None where the model puts no mass on either). ``read_probs`` reads and
    returns them for every verdict whatever ``winner_from`` (an escalation signal needs them)."""
    parse, cue = (parse_pairwise_winner, PAIRWISE_CUE) if pairwise else (parse_winner, WINNER_CUE)
    outputs = [c[0] for c in generator.generate(requests, params, desc=desc)]
    winners = [parse(c.text) for c in outputs]
    sources = ["text" if w else None for w in winners]
    probs_of: dict[int, list[float]] = {}
    all_probs = all_probs or read_probs
    if winner_from == "text_or_probs" or read_probs:
        # Only verdicts the text does not give need the extra forward pass, unless all are asked for.
        read = [i for i, w in enumerate(winners) if all_probs or w is None]
        cue_texts = [generator.render(requests[i]) + winner_cue_text(outputs[i].text, cue) for i in read]
        probs_of = dict(zip(read, generator.next_token_probs(cue_texts, WINNER_TOKENS), strict=True))
        rng = random.Random(params.seed)
        for i in read:
            if winner_from != "text_or_probs" or winners[i] is not None:
                continue
            if winner := sample_verdict(probs_of[i], params.temperature, rng):
                winners[i], sources[i] = winner, "probs"
    return [
        {
            "text": c.text,
            "winner": winner,
            "winner_source": source,
            "num_tokens": c.num_tokens,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            **({"winner_probs": _normalised(probs_of.get(i))} if all_probs else {}),
        }
        for i, (c, winner, source) in enumerate(zip(outputs, winners, sources, strict=True))
    ]


def _normalised(probs: list[float] | None) -> list[float] | None:
    mass = sum(probs) if probs else 0.0
    return [p / mass for p in probs] if mass > 0 else None
