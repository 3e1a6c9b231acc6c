"""Recorded verdicts: a judge scored from outputs that already exist, with no model run
(``eval.recorded.judge``, and ``eval.recorded.strong`` for escalation's strong judge)::

    records = load_recorded("outputs/o1-mini.jsonl")
    judged = records.judged("judgebench", "pairwise", pairs)   # [JudgedPair], matched by pair id

Two formats, told apart by their fields:

- JudgeBench's outputs (``pair_id``, ``judgments``: [shown as given, shown swapped], each
  ``{"decision": "A>B" | "B>A" | other, "judgment": {...}}``): the swapped order's decision is mapped
  back to the pair's sides; "A=B" is a tie, anything else no verdict. A reward model's
  ``judgment.scores`` ([first shown, second shown]) become that order's probability that A is better,
  sigmoid(score A - score B) (Bradley-Terry), so its score margin is the escalation confidence. These
  are pairwise verdicts, whatever the suite.
- metareward-eval-judge's per-pair rows (``suite``, ``protocol``, ``pair_id``, ``verdicts``,
  ``prob_a``): yesterday's run, re-priced; a row counts for its own suite and protocol.

A suite pair with no recorded verdicts is refused (one line naming the file and the pair), as is a
protocol the file holds none of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from metareward.judging.judge_metrics import JudgedPair, Verdict
from metareward.judging.suites import SuitePair
from metareward.store.records import RecordError, read_jsonl_numbered

_DECISIONS = {"A>B": "A", "A>>B": "A", "B>A": "B", "B>>A": "B", "A=B": "tie"}
_SWAPPED = {"A": "B", "B": "A", "tie": "tie", None: None}
# The order each recorded verdict was shown in: the pair as given, then swapped.
_FIRSTS = ("A", "B")


@dataclass(frozen=True)
class _Record:
    verdicts: tuple[Verdict, ...]
    where: str
    # Pointwise rows of metareward-eval-judge: each side's mean score, as judgement rows.
    score_rows: tuple = ()


class RecordedVerdicts:
    """One file's verdicts by (suite, protocol, pair id); JudgeBench's rows answer any suite, pairwise."""

    def __init__(self, path: Path, rows: dict[tuple[str | None, str, str], _Record]):
        self.path = path
        self.rows = rows

    def judged(self, suite: str, protocol: str, pairs: list[SuitePair]) -> list[JudgedPair]:
        """The recorded verdicts on ``pairs`` of ``suite`` under ``protocol``, as judged pairs."""
        if not any(p == protocol for _, p, _ in self.rows):
            held = sorted({p for _, p, _ in self.rows})
            raise RecordError(
                f"{self.path}: holds {', '.join(held)} verdicts, none under protocol {protocol} (set "
                f"eval.protocols to {held})"
            )
        out = []
        for pair in pairs:
            record = self.rows.get((suite, protocol, pair.pair_id)) or self.rows.get(
                (None, protocol, pair.pair_id)
            )
            if record is None:
                raise RecordError(
                    f"{self.path}: no recorded verdicts for pair {pair.pair_id!r} of suite {suite} "
                    f"({protocol}); the file's pair ids must match the suite's (pair_id / id)"
                )
            out.append(
                JudgedPair(
                    label=pair.label,
                    len_a=len(pair.response_a),
                    len_b=len(pair.response_b),
                    verdicts=record.verdicts,
                    calls=len(record.verdicts),
                    unparsed=sum(v.winner is None for v in record.verdicts),
                    human=pair.human,
                    subset=pair.subset,
                    pair_id=pair.pair_id,
                    group=pair.group,
                    slot=pair.slot,
                    score_rows=record.score_rows,
                )
            )
        return out


def load_recorded(path: str | Path) -> RecordedVerdicts:
    """A file of recorded verdicts in either format (see the module); errors name file and line."""
    path = Path(path)
    rows: dict = {}
    for number, row in read_jsonl_numbered(path):
        where = f"{path}:{number}"
        if "judgments" in row:
            key, record = _judgebench_row(row, where)
        elif "verdicts" in row:
            key, record = _own_row(row, where)
        else:
            raise RecordError(
                f"{where}: neither JudgeBench's outputs (`pair_id`, `judgments`) nor metareward-eval-judge's "
                "per-pair rows (`suite`, `protocol`, `pair_id`, `verdicts`)"
            )
        if key in rows:
            raise RecordError(f"{where}: pair {key[2]!r} is recorded twice (first at {rows[key].where})")
        rows[key] = record
    if not rows:
        raise RecordError(f"{path}: no recorded verdicts")
    return RecordedVerdicts(path, rows)


def _pair_id(row: dict, where: str) -> str:
    raw = next((row[key] for key in ("pair_id", "id") if row.get(key) is not None), None)
    if raw is None or not str(raw).strip():
        raise RecordError(f"{where}: no `pair_id` (or `id`) to match the suite's pairs by")
    return str(raw)


def _judgebench_row(row: dict, where: str) -> tuple[tuple, _Record]:
    judgments = row["judgments"]
    if not isinstance(judgments, list) or not 1 <= len(judgments) <= 2:
        raise RecordError(f"{where}: `judgments` must be a list of one or two judgments (both orders)")
    verdicts = []
    for index, judgment in enumerate(judgments):
        decision = judgment.get("decision") if isinstance(judgment, dict) else None
        side = _DECISIONS.get(decision) if isinstance(decision, str) else None
        if index == 1:  # shown swapped: its "A" is the pair's B
            side = _SWAPPED[side]
        inner = judgment.get("judgment") if isinstance(judgment, dict) else None
        scores = inner.get("scores") if isinstance(inner, dict) else None
        verdicts.append(Verdict(side, first=_FIRSTS[index], prob_a=_score_prob_a(scores, index, where)))
    return (None, "pairwise", _pair_id(row, where)), _Record(tuple(verdicts), where)


def _score_prob_a(scores, index: int, where: str) -> float | None:
    """sigmoid(score of A - score of B) from a reward model's [first shown, second shown] scores."""
    if scores is None:
        return None
    ok = isinstance(scores, list) and len(scores) == 2
    if not ok or not all(isinstance(s, int | float) and math.isfinite(s) for s in scores):
        raise RecordError(f"{where}: `scores` must be two finite numbers [first shown, second shown]")
    a, b = scores if index == 0 else scores[::-1]
    return 1 / (1 + math.exp(max(-60.0, min(60.0, b - a))))


def _own_row(row: dict, where: str) -> tuple[tuple, _Record]:
    protocol, suite = row.get("protocol"), row.get("suite")
    if protocol not in ("pointwise", "pairwise") or not isinstance(suite, str):
        raise RecordError(f"{where}: a per-pair row needs `suite` and `protocol` (pointwise or pairwise)")
    winners = row["verdicts"]
    if not isinstance(winners, list) or not winners or any(w not in ("A", "B", "tie", None) for w in winners):
        raise RecordError(f"{where}: `verdicts` must list A, B, tie or null, got {winners!r}")
    prob_a = row.get("prob_a")
    if prob_a is not None and not (isinstance(prob_a, int | float) and 0 <= prob_a <= 1):
        raise RecordError(f"{where}: `prob_a` must be a probability or null, got {prob_a!r}")
    firsts = _FIRSTS if protocol == "pairwise" else (None,) * len(winners)
    verdicts = tuple(Verdict(w, first=f, prob_a=prob_a) for w, f in zip(winners, firsts, strict=False))
    scores = row.get("scores")
    ok = scores is None or (
        isinstance(scores, list)
        and len(scores) == 2
        and all(s is None or isinstance(s, int | float) for s in scores)
    )
    if not ok:
        raise RecordError(f"{where}: `scores` must be [score of A, score of B] (each a number or null)")
    score_rows = tuple(({"score": s},) for s in scores) if scores else ()
    return (suite, protocol, _pair_id(row, where)), _Record(verdicts, where, score_rows)
