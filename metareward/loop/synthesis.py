"""Prompt synthesis (``data=synthetic``): the prompter writes new tasks from k-shot samples of a seed set.

Self-Rewarding (Yuan et al. 2024) makes each iteration's prompts this way, following Self-Instruct
(Wang et al. 2023): a request shows ``num_shots`` seed tasks as "Task 1: ..." lines and leaves the
next one open. A completion's first task is kept unless a filter refuses it, counted by reason:

========================  ===========================================================================
``empty``                 nothing but whitespace
``truncated``             cut off (``finish_reason == "length"``) before the task was seen to end
``too_short``/``too_long`` fewer than ``min_words`` or more than ``max_words`` words
``duplicate``             the same text (case and spacing aside) as a seed task or a pooled one
``similar_to_seed``       ROUGE-L F1 above ``max_rouge_l`` with a seed task
``similar_to_pool``       the same with a task already in the pool
``surplus``               written after the pool was full (the last chunk's extra)
========================  ===========================================================================

The pool, ``runs/<name>/prompt_pool.jsonl``, is written once, chunk by chunk: a chunk's requests and
sampling seed depend only on the run seed and the chunk's index, and its filters on the pool of the
chunks before it, so a killed synthesis resumes and ends with the pool an uninterrupted one writes.
What the filters left out is kept beside it in ``prompt_pool_rejected.jsonl`` (text and reason), and
the counts in ``prompt_pool.json``.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections import Counter
from pathlib import Path

from metareward.config import SynthesisConfig
from metareward.generation import Generator, SamplingParams
from metareward.store import faults, layout
from metareward.store.records import (
    ChunkedFile,
    read_chunk,
    read_json,
    read_stage_file,
    write_json,
)

POOL = layout.POOL
REJECTED = layout.POOL_REJECTED
POOL_STATS = layout.POOL_STATS
REASONS = (
    "empty",
    "truncated",
    "too_short",
    "too_long",
    "duplicate",
    "similar_to_seed",
    "similar_to_pool",
    "surplus",
)

# Self-Instruct's prompt, as one user turn for a chat model; the open "Task k+1:" is the request.
PROMPTER_TEMPLATE = """\
Come up with a new task for an AI assistant: a question or an instruction a user could give it. Make \
it different from the examples below in topic and in wording, and write only the task.

{tasks}
Task {next}:"""
# Where a completion goes on to a task after its first (then the first is whole even if cut off).
NEXT_TASK = re.compile(r"\n\s*\**Task\s*\d+\s*\**\s*[:.]", re.IGNORECASE)
LEADING_TASK = re.compile(r"^\s*\**Task\s*\d+\s*\**\s*[:.]\s*\**\s*", re.IGNORECASE)


class SynthesisError(RuntimeError):
    """The pool could not be filled within the request budget; the message says what was left out."""


# ------------------------------------------------------------------ ROUGE-L


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation: lower case, runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0  # row[j - 1] of the line before
        for j, y in enumerate(b, start=1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[len(b)]


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 of two token lists (rouge_score's ``rougeL`` f-measure): 2PR / (P + R) with
    P = LCS / len(candidate), R = LCS / len(reference); 0 when either is empty."""
    if not candidate or not reference:
        return 0.0
    lcs = _lcs(candidate, reference)
    return 2 * lcs / (len(candidate) + len(reference))


class NearDuplicates:
    """Texts seen so far, answering "is this one within ``threshold`` ROUGE-L of any of them?".

    An inverted index bounds each candidate's LCS with a text by their shared tokens (counted with
    multiplicity), so the exact LCS is computed only where the bound could pass the threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.texts: list[list[str]] = []
        self.index: dict[str, list[tuple[int, int]]] = {}

    def add(self, tokens: list[str]) -> None:
        number = len(self.texts)
        self.texts.append(tokens)
        for token, count in Counter(tokens).items():
            self.index.setdefault(token, []).append((number, count))

    def similar(self, tokens: list[str]) -> bool:
        shared: Counter = Counter()
        for token, count in Counter(tokens).items():
            for number, theirs in self.index.get(token, ()):
                shared[number] += min(count, theirs)
        for number, bound in shared.items():
            other = self.texts[number]
            if (
                2 * bound / (len(tokens) + len(other)) > self.threshold
                and rouge_l(tokens, other) > self.threshold
            ):
                return True
        return False


# ------------------------------------------------------------------ one completion


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def first_task(text: str, finish_reason: str | None) -> tuple[str, bool]:
    """The first task of a completion and whether it is whole: it is when the completion went on to
    another "Task N:" line, or stopped by itself."""
    body = LEADING_TASK.sub("", text, count=1)
    match = NEXT_TASK.search(body)
    if match:
        return body[: match.start()].strip(), True
    return body.strip(), finish_reason != "length"


def prompter_messages(shots: list[str]) -> list[dict]:
    tasks = "".join(f"Task {i}: {' '.join(shot.split())}\n" for i, shot in enumerate(shots, start=1))
    return [{"role": "user", "content": PROMPTER_TEMPLATE.format(tasks=tasks, next=len(shots) + 1)}]


def seed_text(prompt: dict) -> str:
    """A seed prompt as the prompter sees it: its last user turn."""
    return prompt["messages"][-1]["content"]


class Filters:
    """The pool's filters and its state: seed and pooled texts, exact and near."""

    def __init__(self, cfg: SynthesisConfig, seeds: list[str]):
        self.cfg = cfg
        self.exact = {normalised(text) for text in seeds}
        self.seeds = NearDuplicates(cfg.max_rouge_l)
        for text in seeds:
            self.seeds.add(rouge_tokens(text))
        self.pool = NearDuplicates(cfg.max_rouge_l)

    def reason(self, text: str, whole: bool) -> str | None:
        """Why ``text`` is left out, or None to keep it (it is then added to the pool's state)."""
        cfg = self.cfg
        if not text.strip():
            return "empty"
        if not whole:
            return "truncated"
        words = len(text.split())
        if words < cfg.min_words:
            return "too_short"
        if words > cfg.max_words:
            return "too_long"
        if normalised(text) in self.exact:
            return "duplicate"
        tokens = rouge_tokens(text)
        if self.seeds.similar(tokens):
            return "similar_to_seed"
        if self.pool.similar(tokens):
            return "similar_to_pool"
        return None

    def keep(self, text: str) -> None:
        self.exact.add(normalised(text))
        self.pool.add(rouge_tokens(text))


# ------------------------------------------------------------------ the pool


def chunk_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"{seed}/synthesis/{index}".encode())


def max_chunks(cfg: SynthesisConfig, chunk_size: int) -> int:
    return math.ceil(math.ceil(cfg.request_budget * cfg.pool_size) / chunk_size)


def pool_complete(run_dir: Path) -> bool:
    return (run_dir / POOL).is_file() and (run_dir / POOL_STATS).is_file()


def read_pool(run_dir: Path) -> tuple[list[dict], dict]:
    """The finished pool's rows and its counts (``prompt_pool.json``)."""
    ChunkedFile(run_dir / POOL).discard_chunks()  # left behind if a run was killed right after joining
    ChunkedFile(run_dir / REJECTED).discard_chunks()
    return read_stage_file(run_dir / POOL), read_json(run_dir / POOL_STATS)


def _chunk_rows(out: ChunkedFile, index: int) -> list[dict]:
    """A written chunk's rows (none for one that is missing or damaged)."""
    path = out.parts / f"{index:06d}.jsonl"
    rows = read_chunk(path)[0] if path.is_file() else None
    return rows or []


def build_pool(
    generator: Generator,
    seeds: list[dict],
    cfg: SynthesisConfig,
    run_dir: Path,
    seed: int,
    chunk_size: int,
) -> tuple[list[dict], dict]:
    """Fill ``run_dir/prompt_pool.jsonl`` with ``cfg.pool_size`` prompts (or resume filling it); returns
    its rows ``{"prompt_id", "messages", "shot_ids"}`` and the counts
    ``{"pool_size", "requests", "kept", "left_out": {reason: n}}``.

    ``chunk_size`` requests are generated at a time. Raises :class:`SynthesisError` when
    ``cfg.request_budget`` requests per pool prompt are spent before the pool is full; the chunks
    written so far stay, so a rerun with a larger budget goes on from them."""
    if pool_complete(run_dir):
        return read_pool(run_dir)
    pool, rejected = ChunkedFile(run_dir / POOL), ChunkedFile(run_dir / REJECTED)
    texts = [seed_text(p) for p in seeds]
    filters = Filters(cfg, texts)
    kept: list[dict] = []
    index = 0
    limit = max_chunks(cfg, chunk_size)
    while len(kept) < cfg.pool_size:
        if pool.has_chunk(index):
            rows = _chunk_rows(pool, index)
        else:
            if index >= limit:
                raise SynthesisError(_budget_message(cfg, len(kept), index * chunk_size, rejected, index))
            rows, left_out = _synthesise_chunk(
                generator, seeds, texts, cfg, filters, len(kept), seed, index, chunk_size
            )
            rejected.write_chunk(index, left_out)
            pool.write_chunk(index, rows)
            faults.point(f"chunk:{POOL}")
            index += 1
            kept += rows
            continue
        for row in rows:
            filters.keep(seed_text(row))
        kept += rows
        index += 1
    num_chunks = index
    left = read_stage_file(rejected.path) if rejected.complete else rejected.finish(num_chunks)
    counts = Counter(row["reason"] for row in left)
    stats = {
        "pool_size": cfg.pool_size,
        "requests": len(kept) + len(left),
        "kept": len(kept),
        "left_out": {reason: counts.get(reason, 0) for reason in REASONS},
    }
    write_json(run_dir / POOL_STATS, stats)
    return pool.finish(num_chunks), stats


def _synthesise_chunk(
    generator: Generator,
    seeds: list[dict],
    texts: list[str],
    cfg: SynthesisConfig,
    filters: Filters,
    pooled: int,
    seed: int,
    index: int,
    chunk_size: int,
) -> tuple[list[dict], list[dict]]:
    """One chunk's requests, generated and filtered: (kept rows, left-out rows)."""
    rng = random.Random(chunk_seed(seed, index))
    shots = [rng.sample(range(len(seeds)), min(cfg.num_shots, len(seeds))) for _ in range(chunk_size)]
    requests = [prompter_messages([texts[i] for i in picked]) for picked in shots]
    params = SamplingParams(
        n=1,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=chunk_seed(seed, index),
    )
    outputs = generator.generate(requests, params, desc=f"prompter {index + 1}")
    kept, left_out = [], []
    for picked, completions in zip(shots, outputs, strict=True):
        completion = completions[0]
        text, whole = first_task(completion.text, completion.finish_reason)
        reason = "surplus" if pooled + len(kept) >= cfg.pool_size else filters.reason(text, whole)
        if reason is not None:
            left_out.append({"chunk": index, "text": completion.text, "reason": reason})
            continue
        filters.keep(text)
        kept.append(
            {
                "prompt_id": f"s{pooled + len(kept)}",
                "messages": [{"role": "user", "content": text}],
                "shot_ids": [seeds[i]["prompt_id"] for i in picked],
            }
        )
    return kept, left_out


def _budget_message(
    cfg: SynthesisConfig, kept: int, requests: int, rejected: ChunkedFile, chunks: int
) -> str:
    counts = Counter(row["reason"] for index in range(chunks) for row in _chunk_rows(rejected, index))
    left = ", ".join(f"{reason} {counts[reason]}" for reason in REASONS if counts[reason]) or "nothing"
    return (
        f"prompt synthesis filled {kept} of data.synthetic.pool_size={cfg.pool_size} prompts in {requests} "
        f"requests (data.synthetic.request_budget={cfg.request_budget} per prompt); left out: {left}. "
        "Raise the budget, loosen data.synthetic.min_words/max_words/max_rouge_l, or give roles.prompter a "
        "stronger model; a rerun goes on from the chunks written"
    )


def plan_requests(cfg: SynthesisConfig, chunk_size: int) -> int:
    """The most prompter requests synthesis may make (the dry run's bound)."""
    return max_chunks(cfg, chunk_size) * chunk_size
