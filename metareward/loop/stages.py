"""The three roles of one iteration: actor, judge and meta-judge.

Each stage is records in, records out, through a :class:`~metareward.generation.Generator`.
Work is cut into fixed chunks; a chunk's output is written whole before the next starts,
and a chunk's sampling seed depends only on the run seed, the iteration, the stage and the
chunk's index, so a resumed stage reproduces exactly the rows an uninterrupted one writes.
The judge and meta-judge stages may escalate what the local judge is least sure of to a strong judge
(``judge.escalation``, ``meta_judge.escalation``; the signals and budgets are in escalation.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from metareward.config import ActorConfig, JudgeConfig, MetaJudgeConfig
from metareward.generation import Generator, SamplingParams, reads_probabilities
from metareward.judging import escalation as escalation_signals
from metareward.judging.escalation import StageEscalation
from metareward.judging.prompts import Templates
from metareward.judging.requests import judge_requests, verdict_requests
from metareward.loop import pairs
from metareward.store import faults
from metareward.store.records import ChunkedFile, read_stage_file, write_stage_file


@dataclass(frozen=True)
class StageContext:
    generator: Generator
    templates: Templates
    seed: int
    iteration: int
    chunk_size: int

    def chunk_seed(self, stage: str, chunk: int) -> int:
        return zlib.crc32(f"{self.seed}/{self.iteration}/{stage}/{chunk}".encode())

    def sampling(
        self, role: ActorConfig | JudgeConfig | MetaJudgeConfig, n: int, stage: str, chunk: int
    ) -> SamplingParams:
        """The role's sampling settings, seeded for one chunk of one stage."""
        return SamplingParams(
            n=n,
            temperature=role.temperature,
            top_p=role.top_p,
            max_new_tokens=role.max_new_tokens,
            seed=self.chunk_seed(stage, chunk),
        )


def finished_rows(out: ChunkedFile) -> list[dict] | None:
    """The rows of a stage file already complete, else None."""
    if not out.complete:
        return None
    out.discard_chunks()  # left behind if a run was killed right after joining them
    return read_stage_file(out.path)


def run_chunked(
    out: ChunkedFile,
    items: list,
    chunk_size: int,
    work: Callable[[Generator, list, int], list[dict]],
    generator: Generator,
) -> list[dict]:
    """Apply ``work(generator, chunk, index)`` to each chunk not yet on disk, then join the chunks.

    A generator that serves several engines (cluster.ReplicaPool) deals the chunks to them, handing
    ``work`` one engine at a time; the chunks are written here, in order, as they are without it."""
    if (done := finished_rows(out)) is not None:
        return done
    chunks = [items[start : start + chunk_size] for start in range(0, len(items), chunk_size)]
    todo = [index for index in range(len(chunks)) if not out.has_chunk(index)]

    def write(index: int, rows: list[dict]) -> None:
        out.write_chunk(index, rows)
        faults.point(f"chunk:{out.path.name}")

    deal = getattr(generator, "deal", None) if todo else None
    if deal is not None:
        name = out.path.name.removesuffix(".jsonl").replace("_", " ")
        deal(todo, lambda engine, index: work(engine, chunks[index], index), write, desc=name)
    else:
        for index in todo:
            write(index, work(generator, chunks[index], index))
    return out.finish(len(chunks))


def actor(ctx: StageContext, prompts: list[dict], cfg: ActorConfig, out: ChunkedFile) -> list[dict]:
    """K sampled responses per prompt; exact duplicates of an earlier sample are dropped."""
    num_chunks = -(-len(prompts) // ctx.chunk_size)

    def work(generator: Generator, chunk: list[dict], index: int) -> list[dict]:
        params = ctx.sampling(cfg, cfg.num_responses, "actor", index)
        outputs = generator.generate(
            [p["messages"] for p in chunk], params, desc=f"actor {index + 1}/{num_chunks}"
        )
        rows = []
        for prompt, completions in zip(chunk, outputs, strict=True):
            seen: set[str] = set()
            for k, completion in enumerate(completions):
                if completion.text in seen:
                    continue
                seen.add(completion.text)
                rows.append(
                    {
                        "prompt_id": prompt["prompt_id"],
                        "response_id": f"{prompt['prompt_id']}/r{k}",
                        "text": completion.text,
                        "num_tokens": completion.num_tokens,
                        "finish_reason": completion.finish_reason,
                    }
                )
        return rows

    return run_chunked(out, prompts, ctx.chunk_size, work, ctx.generator)


def judge(
    ctx: StageContext,
    prompts: list[dict],
    responses: list[dict],
    cfg: JudgeConfig,
    out: ChunkedFile,
    escalation: StageEscalation | None = None,
) -> list[dict]:
    """N judgements per response, each with its parsed score and the model's distribution over 0..5.

    With ``escalation`` the local judge's rows go to ``judgements_local.jsonl``; the responses its
    budget picks are judged N times by the strong judge (``judgements_strong.jsonl``), whose rows
    replace the local ones in ``out``. Every row then says ``escalated``, the ``judge`` that answered
    and the local judge's ``confidence`` in the response."""
    if (done := finished_rows(out)) is not None:
        return done
    messages_of = {p["prompt_id"]: p["messages"] for p in prompts}
    read_probs = escalation is not None and escalation_signals.needs_probabilities(escalation.cfg.signal)

    def judged_rows(
        generator: Generator, stage: str, score_from: str, chunk: list[dict], index: int, of: int
    ):
        requests = [ctx.templates.judge_messages(messages_of[r["prompt_id"]], r["text"]) for r in chunk]
        params = ctx.sampling(cfg, cfg.num_judgements, stage, index)
        desc = f"{stage.replace('_', ' ')} {index + 1}/{of}"
        # Only the local judge's probabilities are read (for its confidence), where it has them (not an
        # endpoint without a local tokenizer: its items then have no signal); the strong judge's never are.
        reads = read_probs and stage == "judge" and reads_probabilities(generator)
        judged = judge_requests(generator, requests, params, score_from, desc, read_probs=reads)
        return [
            {"response_id": response["response_id"], "judgement_id": f"{response['response_id']}/j{n}", **row}
            for response, rows in zip(chunk, judged, strict=True)
            for n, row in enumerate(rows)
        ]

    num_chunks = -(-len(responses) // ctx.chunk_size)
    local = run_chunked(
        out if escalation is None else ChunkedFile(escalation_signals.local_path(out.path)),
        responses,
        ctx.chunk_size,
        lambda generator, chunk, index: judged_rows(
            generator, "judge", cfg.score_from, chunk, index, num_chunks
        ),
        ctx.generator,
    )
    if escalation is None:
        return local

    by_response: dict[str, list[dict]] = {}
    for row in local:
        by_response.setdefault(row["response_id"], []).append(row)
    confidence = {
        r["response_id"]: _confidence(escalation, r["response_id"], by_response.get(r["response_id"], []))
        for r in responses
    }
    return _escalated(
        ctx,
        out,
        local,
        confidence,
        escalation,
        item_of=lambda row: row["response_id"],
        units_of=lambda chosen: [r for r in responses if r["response_id"] in chosen],
        strong_rows=lambda generator, chunk, index, of: judged_rows(
            generator, "judge_strong", "text", chunk, index, of
        ),
    )


def _confidence(escalation: StageEscalation, item: str, rows: list[dict]) -> float | None:
    signal = escalation.cfg.signal
    if signal == "random":
        return escalation_signals.draw(escalation.seed, item)
    if rows and "first_id" in rows[0]:  # meta-judge rows, one per order: winners as judgement ids
        winners = [r[f"{r['winner']}_id"] if r["winner"] else None for r in rows]
        margins = [escalation_signals.probability_margin(r.get("winner_probs")) for r in rows]
        return escalation_signals.verdict_confidence(signal, winners, margins)
    return escalation_signals.score_confidence(signal, rows)


def _escalated(
    ctx: StageContext,
    out: ChunkedFile,
    local: list[dict],
    confidence: dict,
    escalation: StageEscalation,
    item_of: Callable[[dict], str],
    units_of: Callable[[set], list],
    strong_rows: Callable[[Generator, list, int, int], list[dict]],
) -> list[dict]:
    """The items the budget picks (``units_of(chosen)``: the work for the strong judge) answered by it
    in chunks (``strong_rows(generator, chunk, index, chunks)``, in text: its probabilities are not at hand
    behind an API), then the stage's rows: each escalated item's strong rows in place of its local
    ones, in the local order, every row marked; written to ``out``."""
    chosen = escalation_signals.choose(confidence, escalation.cfg, escalation.seed)
    units = units_of(chosen)
    chunks = -(-len(units) // ctx.chunk_size)
    strong_out = ChunkedFile(escalation_signals.strong_path(out.path))
    # The strong judge is made only when some item is escalated and not yet answered on disk.
    strong = run_chunked(
        strong_out,
        units,
        ctx.chunk_size,
        lambda generator, chunk, index: strong_rows(generator, chunk, index, chunks),
        _Lazy(escalation.strong.generator),
    )
    strong_of: dict = {}
    for row in strong:
        strong_of.setdefault(item_of(row), []).append(row)
    rows, placed = [], set()
    for row in local:
        item = item_of(row)
        if item not in strong_of:
            marks = {"escalated": False, "judge": escalation.local_name, "confidence": confidence[item]}
            rows.append({**row, **marks})
        elif item not in placed:
            placed.add(item)
            marks = {"escalated": True, "judge": escalation.strong.name, "confidence": confidence[item]}
            rows += [{**answer, **marks} for answer in strong_of[item]]
    write_stage_file(out.path, rows)
    return rows


class _Lazy:
    """A generator made by ``make()`` on its first use (the strong judge: nothing is loaded or sent
    when no chunk of its stage is left to make)."""

    def __init__(self, make: Callable[[], Generator]):
        self.make = make

    def __getattr__(self, name: str):
        return getattr(self.make(), name)


def comparisons(responses: list[dict], judgements: list[dict]) -> list[tuple[str, str, str]]:
    """(response_id, first_id, second_id): every pair of usable judgements of each prompt's
    meta-judged response, in both orders."""
    targets = pairs.judge_target_responses(responses, judgements)
    usable = pairs.usable_judgements(judgements)
    position = {r["response_id"]: i for i, r in enumerate(responses)}
    items = []
    for response_id in sorted(targets.values(), key=position.__getitem__):
        ids = sorted(
            (j["judgement_id"] for j in usable if j["response_id"] == response_id), key=pairs.judgement_n
        )
        for m, first in enumerate(ids):
            for second in ids[m + 1 :]:
                items.append((response_id, first, second))
                items.append((response_id, second, first))
    return items


def meta_judge(
    ctx: StageContext,
    prompts: list[dict],
    responses: list[dict],
    judgements: list[dict],
    cfg: MetaJudgeConfig,
    out: ChunkedFile,
    escalation: StageEscalation | None = None,
) -> list[dict]:
    """The meta-judge's verdict on each comparison: which of two judgements is more accurate.

    With ``escalation`` the comparisons (both orders together) the budget picks are answered by the
    strong meta-judge, as :func:`judge` does for responses."""
    if (done := finished_rows(out)) is not None:
        return done
    messages_of = {p["prompt_id"]: p["messages"] for p in prompts}
    response_of = {r["response_id"]: r for r in responses}
    judgement_text = {j["judgement_id"]: j["text"] for j in judgements}
    items = comparisons(responses, judgements)
    read_probs = escalation is not None and escalation_signals.needs_probabilities(escalation.cfg.signal)

    def verdict_rows(generator: Generator, stage: str, winner_from: str, chunk: list, index: int, of: int):
        requests = []
        for response_id, first, second in chunk:
            response = response_of[response_id]
            requests.append(
                ctx.templates.meta_judge_messages(
                    messages_of[response["prompt_id"]],
                    response["text"],
                    judgement_text[first],
                    judgement_text[second],
                )
            )
        params = ctx.sampling(cfg, 1, stage, index)
        desc = f"{stage.replace('_', '-', 1).replace('_', ' ')} {index + 1}/{of}"
        reads = read_probs and stage == "meta_judge" and reads_probabilities(generator)
        verdicts = verdict_requests(generator, requests, params, winner_from, desc=desc, read_probs=reads)
        return [
            {
                "response_id": response_id,
                "first_id": first,
                "second_id": second,
                **verdict,
                "winner": {"A": "first", "B": "second"}.get(verdict["winner"]),
            }
            for (response_id, first, second), verdict in zip(chunk, verdicts, strict=True)
        ]

    num_chunks = -(-len(items) // ctx.chunk_size)
    local = run_chunked(
        out if escalation is None else ChunkedFile(escalation_signals.local_path(out.path)),
        items,
        ctx.chunk_size,
        lambda generator, chunk, index: verdict_rows(
            generator, "meta_judge", cfg.winner_from, chunk, index, num_chunks
        ),
        ctx.generator,
    )
    if escalation is None:
        return local

    by_comparison: dict[str, list[dict]] = {}
    for row in local:
        by_comparison.setdefault(escalation_signals.comparison_of(row), []).append(row)
    confidence = {item: _confidence(escalation, item, rows) for item, rows in by_comparison.items()}
    return _escalated(
        ctx,
        out,
        local,
        confidence,
        escalation,
        item_of=escalation_signals.comparison_of,
        units_of=lambda chosen: [
            (r["response_id"], r["first_id"], r["second_id"])
            for r in local
            if escalation_signals.comparison_of(r) in chosen
        ],
        strong_rows=lambda generator, chunk, index, of: verdict_rows(
            generator, "meta_judge_strong", "text", chunk, index, of
        ),
    )
