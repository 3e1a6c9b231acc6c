"""Human evaluation rows for judge alignment (``align.train``, ``align.heldout``), read into one item type.

    items = load_align_items("pandalm", Templates())        # a bundled suite name, or a JSONL path
    train, heldout = split_by_prompt(items, fraction=0.2, seed=0)

Each :class:`AlignItem` is one judge prompt, the cue its answer begins with, the labels the verdict is
one of, and the human distribution over those labels; the model's distribution, set against it, is the
probabilities of each label's first token after the cue, renormalised. Three kinds of rows, told apart
by their fields:

- **pairwise**: a row of any preference-suite format (suites.py: chosen/rejected, A/B, LLMBar, PandaLM,
  Auto-J). The pairwise judge's prompt, cue ``Winner: Response `` and labels A, B; the distribution is
  the annotators' (a tie vote splits its mass), one-hot from a single label (a tie label: one half
  each). Every row gives two items, one per order shown, the distribution swapped with the responses.
- **pointwise**: ``{"prompt", "response", "ratings": [0..5, ...]}`` or ``"distribution"`` (six numbers
  over scores 0..5). The rubric judge's prompt, cue ``Score: ``, labels 0..5.
- **generic**: ``{"messages" | "prompt", "labels": [...], "distribution": [...] | "votes": [...]}``,
  optional ``"cue"`` (default ``Answer: ``): any judgement whose verdict is one of a few labels.

A distribution must be non-negative and sum to 1 (within 0.001, then it is renormalised); votes are
non-negative integers, not all zero. Every refusal is a :class:`~metareward.store.records.RecordError`
naming ``file:line`` (the file alone for an empty or missing one).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from metareward.config import Config
from metareward.data import bundled_path
from metareward.judging.prompts import (
    PAIRWISE_CUE,
    SCORE_CUE,
    SCORE_TOKENS,
    WINNER_TOKENS,
    Templates,
    question_text,
)
from metareward.judging.suites import BUNDLED_SUITES, detect_format, is_suite_row, prompt_messages, suite_pair
from metareward.store import layout
from metareward.store.records import RecordError, read_jsonl_numbered

GENERIC_CUE = "Answer: "
# Under the run directory: the aligned model, its checkpoints while it trains, and its metrics.
ALIGN_DIR = layout.ALIGN_DIR
ALIGN_METRICS = layout.ALIGN_METRICS
# How far a given distribution's sum may be from 1 (rounding in the file) before it is refused.
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AlignItem:
    """One judgement to align: the judge sees ``messages``, its answer begins with ``cue``, and the
    verdict is one of ``labels``, which the annotators chose with the frequencies ``target``.
    ``group`` is the prompt being judged (no prompt is on both sides of a split); ``where`` is the
    row's file:line."""

    messages: tuple[dict, ...]
    cue: str
    labels: tuple[str, ...]
    target: tuple[float, ...]
    kind: str
    group: str
    where: str

    def majority(self) -> int | None:
        """The index of the label most annotators chose; None when several share the most."""
        top = max(self.target)
        leaders = [i for i, p in enumerate(self.target) if math.isclose(p, top, abs_tol=1e-9)]
        return leaders[0] if len(leaders) == 1 else None


def _distribution(values, size: int, field: str, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or len(values) != size:
        raise RecordError(f"{where}: `{field}` must be a list of {size} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RecordError(f"{where}: `{field}` must hold numbers only, got {values!r}")
    if any(v < 0 for v in values):
        raise RecordError(f"{where}: `{field}` has a negative value: {values!r}")
    total = sum(values)
    if abs(total - 1) > SUM_TOLERANCE:
        raise RecordError(f"{where}: `{field}` must sum to 1, but sums to {total:g}: {values!r}")
    return tuple(v / total for v in values)


def _votes(values, size: int, field: str, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or len(values) != size:
        raise RecordError(f"{where}: `{field}` must be a list of {size} counts, one per label")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RecordError(f"{where}: `{field}` must hold whole numbers, got {values!r}")
    if any(v < 0 for v in values):
        raise RecordError(f"{where}: `{field}` has a negative count: {values!r}")
    total = sum(values)
    if total == 0:
        raise RecordError(f"{where}: `{field}` counts no vote at all")
    return tuple(v / total for v in values)


def _ratings(values, where: str) -> tuple[float, ...]:
    ok = isinstance(values, list) and values
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 5 for v in values):
        raise RecordError(f"{where}: `ratings` must be a non-empty list of whole scores 0..5, got {values!r}")
    return tuple(values.count(score) / len(values) for score in range(6))


def _pairwise(row: dict, templates: Templates, suite: str, index: int, where: str) -> list[AlignItem]:
    pair = suite_pair(row, detect_format(row, where), suite, f"p{index}", where)
    if pair.human is not None:
        p_a, p_b = pair.human
    else:
        p_a, p_b = {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}[pair.label]
    group = question_text(pair.prompt)
    shown = [(pair.response_a, pair.response_b, (p_a, p_b)), (pair.response_b, pair.response_a, (p_b, p_a))]
    return [
        AlignItem(
            tuple(templates.pairwise_messages(pair.prompt, first, second)),
            PAIRWISE_CUE,
            tuple(WINNER_TOKENS),
            target,
            "pairwise",
            group,
            where,
        )
        for first, second, target in shown
    ]


def _pointwise(row: dict, templates: Templates, where: str) -> AlignItem:
    for field in ("prompt", "response"):
        if field not in row:
            raise RecordError(f"{where}: a pointwise row needs `{field}`")
    if not isinstance(row["response"], str):
        raise RecordError(f"{where}: `response` must be a string")
    if ("ratings" in row) == ("distribution" in row):
        raise RecordError(f"{where}: a pointwise row needs exactly one of `ratings` and `distribution`")
    if "ratings" in row:
        target = _ratings(row["ratings"], where)
    else:
        target = _distribution(row["distribution"], 6, "distribution", where)
    prompt = prompt_messages(row["prompt"], "prompt", where)
    messages = templates.judge_messages(prompt, row["response"])
    return AlignItem(
        tuple(messages), SCORE_CUE, tuple(SCORE_TOKENS), target, "pointwise", question_text(prompt), where
    )


def _generic(row: dict, where: str) -> AlignItem:
    labels = row["labels"]
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels)):
        raise RecordError(f"{where}: `labels` must be a list of at least two non-empty strings")
    if len(set(labels)) != len(labels):
        raise RecordError(f"{where}: `labels` repeats a label: {labels!r}")
    if ("distribution" in row) == ("votes" in row):
        raise RecordError(f"{where}: a generic row needs exactly one of `distribution` and `votes`")
    if "distribution" in row:
        target = _distribution(row["distribution"], len(labels), "distribution", where)
    else:
        target = _votes(row["votes"], len(labels), "votes", where)
    if ("messages" in row) == ("prompt" in row):
        raise RecordError(f"{where}: a generic row needs exactly one of `messages` and `prompt`")
    field = "messages" if "messages" in row else "prompt"
    messages = prompt_messages(row[field], field, where)
    cue = row.get("cue", GENERIC_CUE)
    if not isinstance(cue, str):
        raise RecordError(f"{where}: `cue` must be a string")
    group = json.dumps(messages, sort_keys=True)
    return AlignItem(tuple(messages), cue, tuple(labels), target, "generic", group, where)


def row_kind(row: dict) -> str | None:
    """Which kind of alignment row ``row`` is, from its fields; None when it is none of them."""
    if "labels" in row:
        return "generic"
    if "ratings" in row or ("response" in row and "distribution" in row):
        return "pointwise"
    if is_suite_row(row):
        return "pairwise"
    return None


def resolve_source(entry: str) -> tuple[str, Path]:
    """(name, path) of a bundled suite name or a JSONL file."""
    if entry in BUNDLED_SUITES:
        return entry, bundled_path(BUNDLED_SUITES[entry])
    path = Path(entry).expanduser()
    if not path.is_file():
        raise RecordError(
            f"{entry}: neither a bundled suite ({', '.join(BUNDLED_SUITES)}) nor a file of alignment rows"
        )
    return path.stem, path


def load_align_items(entry: str, templates: Templates) -> list[AlignItem]:
    """Every item of an alignment file (pairwise rows give two, one per order)."""
    name, path = resolve_source(entry)
    items: list[AlignItem] = []
    for index, (number, row) in enumerate(read_jsonl_numbered(path)):
        where = f"{path}:{number}"
        kind = row_kind(row)
        if kind == "pairwise":
            items.extend(_pairwise(row, templates, name, index, where))
        elif kind == "pointwise":
            items.append(_pointwise(row, templates, where))
        elif kind == "generic":
            items.append(_generic(row, where))
        else:
            raise RecordError(
                f"{where}: the row is no alignment row (fields: {', '.join(sorted(row)) or 'none'}); "
                "expected a pairwise row of a suite format, {prompt, response, ratings|distribution} or "
                "{messages|prompt, labels, distribution|votes}"
            )
    if not items:
        raise RecordError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return items


def split_by_prompt(items: list[AlignItem], fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded ``fraction`` of the distinct prompts (at least one) and all their
    items held out, so that no prompt is on both sides."""
    groups = list(dict.fromkeys(item.group for item in items))
    if len(groups) < 2:
        raise RecordError(
            f"{items[0].where.rsplit(':', 1)[0]}: holding out part of the rows needs at least two distinct "
            "prompts; give align.heldout instead"
        )
    random.Random(seed).shuffle(groups)
    count = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    held = set(groups[:count])
    return [i for i in items if i.group not in held], [i for i in items if i.group in held]


def load_align_split(cfg: Config) -> tuple[list[AlignItem], list[AlignItem]]:
    """(train, heldout) items of ``align.*``: two files, or one split by prompt."""
    templates = Templates.load(cfg.judge.template, cfg.meta_judge.template, cfg.eval.pairwise_template)
    items = load_align_items(cfg.align.train, templates)
    if cfg.align.heldout is not None:
        return items, load_align_items(cfg.align.heldout, templates)
    return split_by_prompt(items, cfg.align.heldout_fraction, cfg.align.seed)


def align_paths(cfg: Config) -> tuple[Path, Path]:
    """(the alignment's own directory, where its model goes): runs/<run_name>/align and, unless
    ``align.model_dir`` says otherwise, its model/ inside."""
    work_dir = Path(cfg.runs_dir) / cfg.run_name / ALIGN_DIR
    return work_dir, Path(cfg.align.model_dir) if cfg.align.model_dir else work_dir / layout.MODEL
