"""Run-directory layout and crash-safe JSON/JSONL files.

Every file is written whole or not at all: to a temporary file in the same directory,
flushed to disk, then renamed over the target. A long stage writes its output as numbered
chunk files in ``<file>.parts/`` (each one written whole) and joins them into the final
file when the stage ends, so a killed stage loses at most the chunk it was working on.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from metareward import faults

PROMPTS = "prompts.jsonl"
RESPONSES = "responses.jsonl"
JUDGEMENTS = "judgements.jsonl"
META_JUDGEMENTS = "meta_judgements.jsonl"
ACTOR_PAIRS = "actor_pairs.jsonl"
JUDGE_PAIRS = "judge_pairs.jsonl"
METRICS = "metrics.json"
MODEL = "model"
CONFIG = "config.yaml"
# Judge skill of the seed model M_0 (before iteration 1), and of M_t in iter_<t>/.
EVAL_0 = "eval_0.json"
EVAL = "eval.json"
# Saved inside the model directory, so that a model and its training log appear together or not at all.
TRAINING_LOG = "training_log.json"


class RecordError(ValueError):
    """A file holds something metareward cannot read; the message names the file and line."""


def iter_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"iter_{iteration}"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp files of this target left by a run killed while writing it.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write_text(path, text)


def write_json(path: Path, obj) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    _atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not valid JSON ({error})") from None


def read_jsonl_numbered(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; errors name the file and line."""
    rows = []
    offset = 0  # of the current line in the file, for the byte position of a decoding error
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # A byte-order mark opens some files written on Windows; it is no part of the JSON.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise RecordError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {offset + error.start} "
                    "of the file)"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl_numbered(path)]


class ChunkedFile:
    """A stage's output, built chunk by chunk; ``path`` exists only once every chunk is in."""

    def __init__(self, path: Path):
        self.path = path
        self.parts = path.with_name(path.name + ".parts")

    @property
    def complete(self) -> bool:
        return self.path.is_file()

    def _chunk_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.jsonl"

    def has_chunk(self, index: int) -> bool:
        return self._chunk_path(index).is_file()

    def write_chunk(self, index: int, rows: list[dict]) -> None:
        write_jsonl(self._chunk_path(index), rows)

    def finish(self, num_chunks: int) -> list[dict]:
        """Join chunks 0..num_chunks-1 into the final file and return its rows."""
        rows = []
        for index in range(num_chunks):
            rows.extend(read_jsonl(self._chunk_path(index)))
        write_jsonl(self.path, rows)
        faults.point(f"joined:{self.path.name}")
        self.discard_chunks()
        return rows

    def discard_chunks(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)


# Each stage file's rows point at rows of the file before it: (file, key, file it points into, key there).
STAGE_LINKS = [
    (RESPONSES, "prompt_id", PROMPTS, "prompt_id"),
    (JUDGEMENTS, "response_id", RESPONSES, "response_id"),
    (META_JUDGEMENTS, "first_id", JUDGEMENTS, "judgement_id"),
    (META_JUDGEMENTS, "second_id", JUDGEMENTS, "judgement_id"),
]
ROW_IDS = {RESPONSES: "response_id", JUDGEMENTS: "judgement_id"}


def check_stage_files(directory: Path) -> None:
    """Refuse stage files that no longer fit together (e.g. edited by hand): every row must point at
    an existing row of the stage before it, and ids must be unique. The error names file and line."""
    for name, key, parent, parent_key in STAGE_LINKS:
        known = {row.get(parent_key) for row in read_jsonl(directory / parent)}
        for line, row in read_jsonl_numbered(directory / name):
            if row.get(key) not in known:
                raise RecordError(
                    f"{directory / name}:{line}: {key} {row.get(key)!r} is not in {parent}; the stage "
                    f"files of {directory.name} no longer match (delete {name} and later files to redo them)"
                )
    for name, key in ROW_IDS.items():
        first_line: dict = {}
        for line, row in read_jsonl_numbered(directory / name):
            value = row.get(key)
            if value in first_line:
                raise RecordError(
                    f"{directory / name}:{line}: {key} {value!r} already on line {first_line[value]}"
                )
            first_line[value] = line
