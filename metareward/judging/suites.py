"""Preference suites: pairwise human (or gold) verdicts in the field's formats, read into one row type.

``load_suite(entry, num_pairs=None, seed=0) -> (name, [SuitePair, ...])``, where ``entry`` is

- a bundled suite's name (:data:`BUNDLED_SUITES`: ``hh_rlhf``, ``llmbar_natural``, ``pandalm``; see
  metareward/data/README.md for sources and licences); a bundled name wins over a file of that name;
- a path to a JSONL or Parquet file (the suite is named after the file's stem);
- a dict ``{"path": ..., "name": ..., "format": ...}`` (``name`` and ``format`` optional): a given format
  is checked against every row instead of detected; or
- a Hugging Face dataset ``{"hf": NAME, "split": ..., "revision": ..., "subset": ..., "name": ...,
  "format": ...}`` read with ``datasets.load_dataset`` (offline, from its cache), named after NAME's
  last part; without ``split``, its only split.

With ``num_pairs``, a seeded sample of that many rows is returned, in file order (all rows when the file
has fewer); every row is read and checked whatever the sample. A row with several candidates
(``rewardbench2``, ``rmbench``) becomes one pair per (chosen, rejected) completion, labelled A, sharing
the row's id as ``group`` with ``slot`` = (chosen index, rejected index); a sample keeps rows whole.

Formats, detected from each row's fields: ``pairs`` is that of RewardBench, HH-RLHF and TRL preference
data, ``ab`` JudgeBench's, ``llmbar`` LLMBar's (and MT-Bench's human judgements as LLMBar ships them),
``pandalm`` PandaLM's (several annotators a pair: their votes give a distribution, their majority the
label), ``autoj`` Auto-J's:

========  =====================================================  ==========================================
format    fields                                                 label
========  =====================================================  ==========================================
pairs     ``prompt`` (string or chat turns), ``chosen``,         always A (A = chosen, B = rejected)
          ``rejected``, optional ``subset``, ``id``
ab        ``question``, ``response_A``, ``response_B``,          ``A>B``/``A>>B`` A, ``B>A``/``B>>A`` B,
          ``label``, optional ``source`` (the subset)            ``A=B`` tie
llmbar    ``input``, ``output_1``, ``output_2``, ``label``       1 or 2 = the better output
pandalm   ``instruction``, ``input``, ``response1``,             each annotator 0 = tie, 1, 2
          ``response2``, ``annotator1``..``annotatorK``
autoj     ``prompt``, ``response 1``, ``response 2``, ``label``,  0 = response 1 better, 1 = response 2,
          ``scenario`` (the subset)                              2 = tie
rewardbench2 ``prompt``, ``chosen`` and ``rejected`` (lists of   the ``num_correct`` chosen ones are better
          texts), ``num_correct``, ``subset``, ``id``
rmbench   ``prompt``, ``chosen`` [3], ``rejected`` [3] (concise,  chosen is better, in every style pairing
          detailed plain, detailed markdown), ``domain``, ``id``
========  =====================================================  ==========================================

Details:

- ``pairs``: ``chosen``/``rejected`` are strings, or lists of one assistant turn (TRL conversational).
  Without ``prompt`` (TRL's implicit-prompt rows) they must be whole conversations that agree up to
  their last turn, an assistant turn: the shared turns are the prompt.
- Integer labels (and annotator votes) may be JSON integers or strings of them (``"1"``); anything else
  is refused.
- PandaLM: the prompt is ``instruction + "\\n\\n" + input`` (a blank part is left out). ``human`` is the
  share of annotator mass on (A, B), a tie vote giving half to each; ``label`` is the value (1, 2 or 0)
  with the most votes, "tie" when that is 0 or when two values share the most votes. So votes
  [1, 1, 2] give A and (2/3, 1/3); [1, 2, 0] tie and (1/2, 1/2); [0, 0, 2] tie and (1/3, 2/3). A row
  with a single annotator gets ``human = None``. PandaLM testset-v1 ships six responses as JSON
  ``true`` (the model's text "True" turned into a boolean upstream); this format reads a boolean
  response as "True"/"False".
- A response may be the empty string (a model that said nothing is still a response to judge; the
  bundled HH-RLHF and PandaLM files hold such rows); a missing or non-string response is refused, as is
  a prompt whose last user turn is empty.
- A pair's id is its ``pair_id``, ``id`` or ``idx`` when present, else ``p<row index>``; ids must be
  unique.

Every refusal is a :class:`~metareward.store.records.RecordError` naming ``file:line`` (the file alone for an
empty one): a row of no format or of two, a file mixing formats (naming the earlier rows' format), a
row not of the declared format, missing or empty fields, bad labels (with the value), duplicate ids.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from metareward.config import SUITE_ENTRY_KEYS
from metareward.data import bundled_path
from metareward.store.records import RecordError, read_jsonl_numbered

BUNDLED_SUITES = {
    "hh_rlhf": "hh_rlhf_helpful_dev.jsonl",
    "llmbar_natural": "llmbar_natural_100.jsonl",
    "pandalm": "pandalm_testset_v1_3annotators.jsonl",
}

# Fields whose presence names a row's format (any one of them), then the fields the format needs.
_SIGNATURES = {
    "pairs": ("chosen", "rejected"),
    "ab": ("response_A", "response_B"),
    "llmbar": ("output_1", "output_2"),
    "pandalm": ("response1", "response2"),
    "autoj": ("response 1", "response 2"),
}
# Rows with several candidates: RewardBench 2's (best of N, ``num_correct`` chosen first) and RM-Bench's
# (three chosen and three rejected, one per style); told from TRL pairs by their lists of plain strings.
MULTI_FORMATS = ("rewardbench2", "rmbench")
FORMATS = (*_SIGNATURES, *MULTI_FORMATS)
# RM-Bench's styles, in its order: the rows of its 3x3 accuracy matrix.
RMBENCH_STYLES = ("concise", "detailed_plain", "detailed_markdown")
_REQUIRED = {
    "pairs": ("chosen", "rejected"),
    "ab": ("question", "response_A", "response_B", "label"),
    "llmbar": ("input", "output_1", "output_2", "label"),
    "pandalm": ("instruction", "response1", "response2"),
    "autoj": ("prompt", "response 1", "response 2", "label"),
}
_AB_LABELS = {"A>B": "A", "A>>B": "A", "B>A": "B", "B>>A": "B", "A=B": "tie"}
_ID_KEYS = ("pair_id", "id", "idx")
_ANNOTATOR = re.compile(r"annotator(\d+)")


@dataclass(frozen=True)
class SuitePair:
    """One judged pair: which of ``response_a`` / ``response_b`` answers ``prompt`` better.

    ``label`` is "A", "B" or "tie"; ``human`` the annotators' verdict distribution over (A, B) where a
    row has several annotators (a tie vote splits its mass), else None."""

    pair_id: str
    prompt: list[dict]
    response_a: str
    response_b: str
    label: str
    human: tuple[float, float] | None
    subset: str | None
    suite: str
    # The format the row was read in (its benchmark's official score follows it).
    format: str = "pairs"
    # A row with several candidates (rewardbench2, rmbench) is one pair per (chosen, rejected): its
    # row's id, and which chosen and which rejected completion this pair compares.
    group: str | None = None
    slot: tuple[int, int] | None = None


def is_suite_row(row: dict) -> bool:
    """Whether a row has the fields of some suite format (which one, :func:`detect_format` says)."""
    return any(key in row for keys in _SIGNATURES.values() for key in keys)


def _holds_candidates(row: dict) -> bool:
    """Whether ``chosen`` and ``rejected`` are lists of plain texts (several candidates, not chat turns)."""
    return all(
        isinstance(row.get(key), list) and row[key] and all(isinstance(t, str) for t in row[key])
        for key in ("chosen", "rejected")
    )


def detect_format(row: dict, where: str) -> str:
    """The format a row's fields name; refuses a row of none or of several."""
    found = [name for name, keys in _SIGNATURES.items() if any(key in row for key in keys)]
    if found == ["pairs"] and _holds_candidates(row):
        return "rewardbench2" if "num_correct" in row else "rmbench"
    if not found:
        raise RecordError(
            f"{where}: the row matches no suite format (fields: {', '.join(sorted(row)) or 'none'}); "
            f"expected one of {', '.join(FORMATS)} (see metareward/suites.py)"
        )
    if len(found) > 1:
        raise RecordError(
            f"{where}: the row has fields of several suite formats ({', '.join(found)}); declare the "
            'format with {"path": ..., "format": ...}'
        )
    return found[0]


def prompt_messages(value, field: str, where: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in value)
        and value[-1]["role"] == "user"
        and value[-1]["content"].strip()
    )
    if not ok:
        raise RecordError(
            f"{where}: `{field}` must be a non-empty string or a list of {{role, content}} ending with a "
            "non-empty user turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(row: dict, field: str, where: str, allow_bool: bool = False) -> str:
    value = row[field]
    if allow_bool and isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RecordError(f"{where}: `{field}` must be a string, got {type(value).__name__}")
    return value


def _int_label(value, allowed: tuple[int, ...], field: str, where: str) -> int:
    """An integer, or a string of one, among ``allowed``."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        number = int(value)
    if number not in allowed:
        raise RecordError(
            f"{where}: `{field}` must be one of {', '.join(map(str, allowed))} (an integer or a string of "
            f"one), got {value!r}"
        )
    return number


def _turn_content(turn, field: str, where: str) -> str:
    if not (
        isinstance(turn, dict) and turn.get("role") == "assistant" and isinstance(turn.get("content"), str)
    ):
        raise RecordError(f"{where}: `{field}` must end with an assistant turn {{role, content}}")
    return turn["content"]


def _pairs(row: dict, where: str) -> tuple[list[dict], str, str]:
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = prompt_messages(row["prompt"], "prompt", where)
        answers = []
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, str):
                answers.append(value)
            elif isinstance(value, list) and len(value) == 1:
                answers.append(_turn_content(value[0], field, where))
            else:
                raise RecordError(
                    f"{where}: with `prompt` given, `{field}` must be a string or a list of one "
                    "assistant turn"
                )
        return prompt, answers[0], answers[1]
    # TRL implicit prompt: two whole conversations, alike but for the last (assistant) turn.
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, list) and len(value) >= 2):
            raise RecordError(
                f"{where}: a pairs row without `prompt` needs `{field}` as a conversation (a list of "
                "turns ending with the assistant's answer)"
            )
    head = prompt_messages(chosen[:-1], "chosen", where)
    if head != prompt_messages(rejected[:-1], "rejected", where):
        raise RecordError(f"{where}: `chosen` and `rejected` differ before their last turn")
    return head, _turn_content(chosen[-1], "chosen", where), _turn_content(rejected[-1], "rejected", where)


def _pandalm(row: dict, where: str) -> tuple[list[dict], str, str, str, tuple[float, float] | None]:
    extra = row.get("input")
    if extra is None:
        extra = ""
    if not isinstance(row["instruction"], str) or not isinstance(extra, str):
        raise RecordError(f"{where}: `instruction` and `input` must be strings")
    content = "\n\n".join(part for part in (row["instruction"], extra) if part.strip())
    if not content:
        raise RecordError(f"{where}: `instruction` and `input` are both empty")
    numbers = sorted(int(m.group(1)) for key in row if (m := _ANNOTATOR.fullmatch(key)))
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise RecordError(
            f"{where}: a pandalm row needs annotator1..annotatorK (K >= 1), got "
            f"{', '.join(f'annotator{n}' for n in numbers) or 'none'}"
        )
    votes = [_int_label(row[f"annotator{n}"], (0, 1, 2), f"annotator{n}", where) for n in numbers]
    counts = {value: votes.count(value) for value in (1, 2, 0)}
    top = max(counts.values())
    leaders = [value for value, count in counts.items() if count == top]
    label = {1: "A", 2: "B", 0: "tie"}[leaders[0]] if len(leaders) == 1 else "tie"
    human = None
    if len(votes) > 1:
        half = 0.5 * counts[0]
        human = ((counts[1] + half) / len(votes), (counts[2] + half) / len(votes))
    a = _text(row, "response1", where, allow_bool=True)
    b = _text(row, "response2", where, allow_bool=True)
    return [{"role": "user", "content": content}], a, b, label, human


def _subset(row: dict, field: str, where: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: `{field}` must be a non-empty string when given, got {value!r}")
    return value


def suite_pair(row: dict, fmt: str, suite: str, pair_id: str, where: str) -> SuitePair:
    """One row of format ``fmt`` as a :class:`SuitePair`; errors name ``where``."""
    missing = [field for field in _REQUIRED[fmt] if field not in row or row[field] is None]
    if missing:
        raise RecordError(f"{where}: a {fmt} row needs {', '.join(f'`{f}`' for f in missing)}")
    human, subset = None, None
    if fmt == "pairs":
        prompt, a, b = _pairs(row, where)
        label, subset = "A", _subset(row, "subset", where)
    elif fmt == "ab":
        prompt = prompt_messages(row["question"], "question", where)
        a, b = _text(row, "response_A", where), _text(row, "response_B", where)
        raw = row["label"]
        if not isinstance(raw, str) or raw.strip() not in _AB_LABELS:
            raise RecordError(f"{where}: `label` must be one of {', '.join(_AB_LABELS)}, got {raw!r}")
        label, subset = _AB_LABELS[raw.strip()], _subset(row, "source", where)
    elif fmt == "llmbar":
        prompt = prompt_messages(row["input"], "input", where)
        a, b = _text(row, "output_1", where), _text(row, "output_2", where)
        label = {1: "A", 2: "B"}[_int_label(row["label"], (1, 2), "label", where)]
    elif fmt == "pandalm":
        prompt, a, b, label, human = _pandalm(row, where)
    else:  # autoj
        prompt = prompt_messages(row["prompt"], "prompt", where)
        a, b = _text(row, "response 1", where), _text(row, "response 2", where)
        label = {0: "A", 1: "B", 2: "tie"}[_int_label(row["label"], (0, 1, 2), "label", where)]
        subset = _subset(row, "scenario", where)
    return SuitePair(pair_id, prompt, a, b, label, human, subset, suite, fmt)


def candidate_pairs(row: dict, fmt: str, suite: str, item_id: str, where: str) -> list[SuitePair]:
    """A rewardbench2 or rmbench row as one pair per (chosen, rejected) completion, in that order, each
    labelled A (the chosen one), grouped by the row's id."""
    missing = [field for field in ("prompt", "chosen", "rejected") if row.get(field) is None]
    if fmt == "rewardbench2":
        missing += [field for field in ("num_correct", "subset") if row.get(field) is None]
    if missing:
        raise RecordError(f"{where}: a {fmt} row needs {', '.join(f'`{f}`' for f in missing)}")
    if not _holds_candidates(row):
        raise RecordError(f"{where}: a {fmt} row needs `chosen` and `rejected` as non-empty lists of strings")
    prompt = prompt_messages(row["prompt"], "prompt", where)
    chosen, rejected = row["chosen"], row["rejected"]
    if fmt == "rewardbench2":
        num_correct = _int_label(row["num_correct"], tuple(range(1, 1000)), "num_correct", where)
        if num_correct != len(chosen):
            raise RecordError(
                f"{where}: `num_correct` is {num_correct} but `chosen` holds {len(chosen)} completions"
            )
        subset = _subset(row, "subset", where)
    else:
        if len(chosen) != len(RMBENCH_STYLES) or len(rejected) != len(RMBENCH_STYLES):
            raise RecordError(
                f"{where}: an rmbench row needs three `chosen` and three `rejected` completions "
                f"({', '.join(RMBENCH_STYLES)}), got {len(chosen)} and {len(rejected)}"
            )
        subset = _subset(row, "domain", where)
    return [
        SuitePair(f"{item_id}/c{c}r{r}", prompt, a, b, "A", None, subset, suite, fmt, item_id, (c, r))
        for c, a in enumerate(chosen)
        for r, b in enumerate(rejected)
    ]


def read_suite_file(path: str | os.PathLike, suite: str, fmt: str | None = None) -> list[SuitePair]:
    """Every row of a suite file, JSONL or Parquet (all of one format: ``fmt``, or the first row's)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such suite file")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else read_jsonl_numbered(path)
    return read_suite_rows(rows, str(path), suite, fmt)


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow's errors have no common base beyond these
        raise RecordError(f"{path}: not a Parquet file ({error})") from None
    return [(number, row) for number, row in enumerate(table.to_pylist(), start=1)]


def read_hf_suite(entry: dict, suite: str, fmt: str | None = None) -> list[SuitePair]:
    """Every row of a Hugging Face dataset entry ``{hf, split, revision, subset}`` (from the local cache
    when offline); a dataset that cannot be loaded is one line naming it."""
    import datasets

    name, split = entry["hf"], entry.get("split")
    try:
        dataset = datasets.load_dataset(
            name, entry.get("subset"), split=split, revision=entry.get("revision")
        )
    except Exception as error:  # the hub client's and the builders' errors share no base class
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecordError(
            f"suite {suite}: the Hugging Face dataset {name} cannot be loaded ({first}); offline, it must "
            "be in the local datasets cache (load it once with network access)"
        ) from None
    if split is None:  # every split came back: one is the suite, several need a choice
        if len(dataset) != 1:
            raise RecordError(
                f"suite {suite}: the Hugging Face dataset {name} has splits {', '.join(dataset)}; choose "
                "one with `split`"
            )
        split, dataset = next(iter(dataset.items()))
    return read_suite_rows(enumerate(dataset, start=1), f"{name}[{split}]", suite, fmt)


def read_suite_rows(rows, origin: str, suite: str, fmt: str | None = None) -> list[SuitePair]:
    """Suite pairs from ``(line or row number, row)`` of ``origin`` (a file, or a dataset's split)."""
    if fmt is not None and fmt not in FORMATS:
        raise RecordError(f"{origin}: unknown suite format {fmt!r}; known: {', '.join(FORMATS)}")
    pairs, seen = [], {}
    first: tuple[str, int] | None = None  # (format, line) of the first row, when detected
    for index, (number, row) in enumerate(rows):
        where = f"{origin}:{number}"
        if fmt is not None:
            if not any(key in row for key in _SIGNATURES.get(fmt, _SIGNATURES["pairs"])):
                try:
                    other = f"the fields of format {detect_format(row, where)}"
                except RecordError:
                    other = f"fields {', '.join(sorted(row)) or 'none'}"
                raise RecordError(f"{where}: the entry declares format {fmt}, but the row has {other}")
            row_fmt = fmt
        else:
            row_fmt = detect_format(row, where)
            if first is None:
                first = (row_fmt, number)
            elif row_fmt != first[0]:
                raise RecordError(
                    f"{where}: the row is of format {row_fmt}, but the rows before it are of format "
                    f"{first[0]} (from line {first[1]}); a suite file holds one format"
                )
        raw_id = next((row[key] for key in _ID_KEYS if row.get(key) is not None), None)
        pair_id = str(raw_id) if raw_id is not None else f"p{index}"
        if not pair_id.strip():
            raise RecordError(f"{where}: the pair id is empty")
        if pair_id in seen:
            raise RecordError(f"{where}: duplicate pair id {pair_id!r}, already at line {seen[pair_id]}")
        seen[pair_id] = number
        if row_fmt in MULTI_FORMATS:
            pairs += candidate_pairs(row, row_fmt, suite, pair_id, where)
        else:
            pairs.append(suite_pair(row, row_fmt, suite, pair_id, where))
    if not pairs:
        raise RecordError(f"{origin}: no pairs (the file is empty or holds only blank lines)")
    return pairs


class SuiteEntryError(RecordError):
    """A suite entry names no bundled suite or file, or is malformed (a setting, not a file's content)."""


def resolve_entry(entry) -> tuple[str, Path | dict, str | None]:
    """(name, path or Hugging Face entry, declared format) of a suite entry; :class:`SuiteEntryError`
    when it is not one."""
    if isinstance(entry, str) and entry in BUNDLED_SUITES:
        return entry, bundled_path(BUNDLED_SUITES[entry]), None
    if isinstance(entry, (str, os.PathLike)):
        path = Path(entry).expanduser()
        if not path.is_file():
            raise SuiteEntryError(
                f"suite {str(entry)!r}: neither a bundled suite ({', '.join(BUNDLED_SUITES)}) nor a file"
            )
        return path.stem, path, None
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(SUITE_ENTRY_KEYS))
        if unknown:
            raise SuiteEntryError(
                f"suite entry {entry!r}: unknown keys {', '.join(unknown)} (known: "
                f"{', '.join(SUITE_ENTRY_KEYS)})"
            )
        fmt = entry.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise SuiteEntryError(
                f"suite entry {entry!r}: unknown format {fmt!r}; known: {', '.join(FORMATS)}"
            )
        if "hf" in entry:
            hf = entry["hf"]
            if not isinstance(hf, str) or not hf.strip() or "path" in entry:
                raise SuiteEntryError(f"suite entry {entry!r}: `hf` must name one dataset (and no `path`)")
            name = entry.get("name") or hf.rstrip("/").rpartition("/")[2]
            return name, dict(entry), fmt
        raw_path = entry.get("path")
        if not isinstance(raw_path, (str, os.PathLike)) or not str(raw_path).strip():
            raise SuiteEntryError(f"suite entry {entry!r}: `path` must name a JSONL or Parquet file")
        path = Path(raw_path).expanduser()
        name = entry.get("name")
        if name is None:
            name = path.stem
        if not isinstance(name, str) or not name.strip():
            raise SuiteEntryError(f"suite entry {entry!r}: `name` must be a non-empty string")
        return name, path, fmt
    raise SuiteEntryError(
        f"suite entry {entry!r}: expected a bundled suite name, a file path, {{path, name, format}} or "
        "{hf, split, revision, subset, name, format}"
    )


def load_suite(entry, num_pairs: int | None = None, seed: int = 0) -> tuple[str, list[SuitePair]]:
    """(suite name, pairs) of a bundled suite name, a JSONL path, or ``{"path", "name"?, "format"?}``.

    With ``num_pairs``, a seeded sample of that many pairs in file order (all pairs if there are fewer);
    every row is checked whatever the sample. Errors are RecordErrors naming file:line."""
    if num_pairs is not None and (
        isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1
    ):
        raise ValueError(f"num_pairs must be a positive integer or None, got {num_pairs!r}")
    name, source, fmt = resolve_entry(entry)
    pairs = (
        read_hf_suite(source, name, fmt) if isinstance(source, dict) else read_suite_file(source, name, fmt)
    )
    # A row with several candidates is sampled whole: its pairs are scored together.
    items = list(dict.fromkeys(p.group or p.pair_id for p in pairs))
    if num_pairs is None or num_pairs >= len(items):
        return name, pairs
    # Sorted indices keep file order, so a larger sample reads like the file, not a shuffle.
    keep = {items[i] for i in random.Random(seed).sample(range(len(items)), num_pairs)}
    return name, [p for p in pairs if (p.group or p.pair_id) in keep]
