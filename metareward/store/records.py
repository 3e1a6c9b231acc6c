"""Run-directory layout and crash-safe JSON/JSONL files.

Every file is written whole or not at all: to a temporary file in the same directory,
flushed to disk, renamed over the target, and the directory flushed too (so the rename itself
survives a crash). Files get the mode the process umask gives any new file (0644 under 0022), so
others on a shared cluster can read a run. A long stage writes its output as numbered chunk files
in ``<file>.parts/`` (each one written whole, with its row count and checksum on its first line)
and joins them into the final file when the stage ends, so a killed stage loses at most the chunk
it was working on, and a chunk damaged on disk is found, set aside and made again.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from metareward.store import faults, layout

log = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which would race with other threads.
UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK
HOST = socket.gethostname()


class RecordError(ValueError):
    """A file holds something metareward cannot read; the message names the file and line."""


class NoSpace(OSError):
    """The disk filled up while writing ``path``; the message says how much space the write needs."""

    def __init__(self, path: Path, needed: int):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed = Path(path), needed

    def __str__(self) -> str:
        where = next((p for p in [self.path, *self.path.parents] if p.is_dir()), Path("/"))
        free = shutil.disk_usage(where).free
        return (
            f"no space left on device writing {self.path}: it needs at least {human_size(self.needed)} "
            f"free in {where} ({human_size(free)} free now); free some space and run the same command "
            "to resume"
        )


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full (safetensors reports it in its message only)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def share_tree(directory: Path) -> None:
    """Give a directory written by other libraries (a saved model) the umask's modes: some write their
    files 0600 (safetensors does), which would hide a model from everyone else on the machine."""
    directory.chmod(DIR_MODE)
    for path in directory.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` to disk (before the rename that says it is finished)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _temp_pattern(name: str) -> re.Pattern:
    # .<target>.<writer pid>-<writer host>.<random>.tmp (mkstemp's random part is [a-z0-9_]).
    return re.compile(rf"\.{re.escape(name)}\.(\d+)-(.+)\.\w+\.tmp")


def _writer_gone(temp: Path, name: str) -> bool:
    """True only when the process that wrote ``temp`` is provably dead: it ran on this host and no
    process has its pid. Another host's temp file, or a live writer's, is never touched here."""
    match = _temp_pattern(name).fullmatch(temp.name)
    if not match or match.group(2) != HOST or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temps(directory: Path) -> None:
    """Remove every temp file of this module's writes in ``directory``, its iterations and their chunk
    directories: only for a caller that holds the run lock, which proves every writer of them gone."""
    for folder in [
        directory,
        *layout.iteration_dirs(directory),
        *directory.glob(f"iter_*/*{layout.PARTS_SUFFIX}"),
    ]:
        for temp in folder.glob(".*.tmp"):
            if temp.is_file():
                temp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp files of this target left by a writer that was killed while writing it.
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if _writer_gone(stale, path.name):
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}-{HOST}.", suffix=".tmp", dir=path.parent
        )
    except OSError as error:
        if is_no_space(error):
            raise NoSpace(path, len(data)) from None
        raise
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide the file from everyone else
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            faults.point(f"write:{path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, NoSpace) and is_no_space(error):
            raise NoSpace(path, len(data)) from None
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


def _chunk_text(rows: list[dict]) -> str:
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    header = {"chunk": {"rows": len(rows), "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()}}
    return json.dumps(header) + "\n" + body


def read_chunk(path: Path) -> tuple[list[dict] | None, str]:
    """A chunk's rows, or None and why it is not whole: its first line records the row count and the
    SHA-256 of the rest, so an emptied, cut or edited chunk does not pass for a finished one."""
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    try:
        expected = json.loads(head)["chunk"]
        rows_expected, digest = int(expected["rows"]), str(expected["sha256"])
    except (ValueError, KeyError, TypeError):
        return None, "empty" if not data.strip() else "no row count and checksum on its first line"
    lines = body.count(b"\n")
    if lines != rows_expected or (body and not body.endswith(b"\n")):
        cut = " and a cut line" if body and not body.endswith(b"\n") else ""
        return None, f"{lines} of {rows_expected} rows{cut}"
    if hashlib.sha256(body).hexdigest() != digest:
        return None, "its rows do not match its checksum"
    try:
        rows = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:  # whole but never valid: not ours
        return None, f"not valid JSONL ({error})"
    if len(rows) != rows_expected:
        return None, f"{len(rows)} of {rows_expected} rows"
    return rows, ""


def _line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:16]


def _sums_of(data: bytes) -> dict:
    """A stage file's record in checksums.json: its row count and each row's digest."""
    lines = [_line_digest(line) for line in data.splitlines(keepends=True)]
    return {"rows": len(lines), "lines": lines}


def _adopted(directory: Path) -> dict:
    """The checksums of stage files a folder already holds when its first checksum is recorded: files
    written before checksums were kept (a run resumed from an older metareward), taken as they are."""
    return {
        path.name: _sums_of(path.read_bytes())
        for path in sorted(directory.glob("*.jsonl"))
        if path.name in layout.STAGE_FILES or path.stem.endswith(("_local", "_strong"))
    }


def write_stage_file(path: Path, rows: list[dict]) -> None:
    """A finished stage file, whole, with its row count and each row's checksum recorded first in the
    folder's ``checksums.json`` (so that a crash between the two leaves a record and no file: the stage
    is made again and the record rewritten)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sums_path = path.parent / layout.CHECKSUMS
    sums = read_json(sums_path) if sums_path.is_file() else _adopted(path.parent)
    sums[path.name] = _sums_of(text.encode("utf-8"))
    write_json(sums_path, sums)
    _atomic_write_text(path, text)


def stage_file_problem(path: Path) -> str | None:
    """Why the finished stage file ``path`` is not what its stage wrote (``file:line: ...``), or None.
    A folder with no ``checksums.json`` (stage files put together by hand) is not checked here."""
    sums_path = path.parent / layout.CHECKSUMS
    if not sums_path.is_file():
        return None
    sums = read_json(sums_path)
    if not isinstance(sums, dict) or path.name not in sums:
        return f"{path}: no checksum recorded in {layout.CHECKSUMS}; it was not written by its stage"
    recorded = sums[path.name].get("lines", []) if isinstance(sums[path.name], dict) else []
    with open(path, "rb") as handle:
        lines = handle.read().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if number > len(recorded):
            return f"{path}:{number}: a row more than the {len(recorded)} its stage wrote"
        if _line_digest(line) != recorded[number - 1]:
            return f"{path}:{number}: not the row its stage wrote (edited, removed or added since)"
    if len(lines) < len(recorded):
        missing = len(recorded) - len(lines)
        return f"{path}:{len(lines) + 1}: {missing} of the {len(recorded)} rows its stage wrote are missing"
    return None


def read_stage_file(path: Path) -> list[dict]:
    """A finished stage file's rows, refused (RecordError naming file and line) when it is not what
    its stage wrote."""
    if problem := stage_file_problem(path):
        raise RecordError(f"{problem}; delete it and the stage files after it to make them again")
    return read_jsonl(path)


class ChunkedFile:
    """A stage's output, built chunk by chunk; ``path`` exists only once every chunk is in."""

    def __init__(self, path: Path):
        self.path = path
        self.parts = path.with_name(path.name + layout.PARTS_SUFFIX)
        # Damaged chunks are moved here (kept for a look) rather than deleted.
        self.damaged = path.with_name(path.name + layout.DAMAGED_SUFFIX)

    @property
    def complete(self) -> bool:
        return self.path.is_file()

    def _chunk_path(self, index: int) -> Path:
        return self.parts / f"{index:06d}.jsonl"

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` is on disk and whole; a damaged one is set aside (with a warning)
        and counts as missing, so the stage makes it again."""
        path = self._chunk_path(index)
        if not path.is_file():
            return False
        rows, problem = read_chunk(path)
        if rows is None:
            aside = self._set_aside(path)
            log.warning(
                "metareward: chunk %s is damaged (%s); set aside as %s and made again", path, problem, aside
            )
            return False
        return True

    def _set_aside(self, path: Path) -> Path:
        self.damaged.mkdir(parents=True, exist_ok=True)
        aside = self.damaged / path.name
        number = 1
        while aside.exists():
            aside, number = self.damaged / f"{path.name}.{number}", number + 1
        os.replace(path, aside)
        fsync_dir(self.parts)
        return aside

    def write_chunk(self, index: int, rows: list[dict]) -> None:
        _atomic_write_text(self._chunk_path(index), _chunk_text(rows))

    def finish(self, num_chunks: int) -> list[dict]:
        """Join chunks 0..num_chunks-1 into the final file and return its rows."""
        rows = []
        for index in range(num_chunks):
            path = self._chunk_path(index)
            chunk, problem = read_chunk(path)
            if chunk is None:  # damaged after has_chunk checked it
                aside = self._set_aside(path)
                raise RecordError(
                    f"{path}: damaged ({problem}); set aside as {aside}: run the same command again to "
                    "make it again"
                )
            rows.extend(chunk)
        write_stage_file(self.path, rows)
        faults.point(f"joined:{self.path.name}")
        self.discard_chunks()
        return rows

    def discard_chunks(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)


def where_stopped(run_dir: Path) -> str:
    """Where a run stopped, from what is on disk: the first missing file of its last iteration."""
    numbered = layout.iteration_dirs(run_dir)
    if not numbered:
        return "before iteration 1"
    last = numbered[-1]
    for name in layout.ITERATION_FILES:
        if not (last / name).exists():
            parts = last / (name + layout.PARTS_SUFFIX)
            saved = len(list(parts.glob("*.jsonl"))) if parts.is_dir() else 0
            return f"in {last.name} at {name}" + (f" ({saved} chunk(s) saved)" if saved else "")
    return f"after {last.name}"


# Each stage file's rows point at rows of the file before it: (file, key, file it points into, key there).
STAGE_LINKS = [
    (layout.RESPONSES, "prompt_id", layout.PROMPTS, "prompt_id"),
    (layout.JUDGEMENTS, "response_id", layout.RESPONSES, "response_id"),
    (layout.META_JUDGEMENTS, "first_id", layout.JUDGEMENTS, "judgement_id"),
    (layout.META_JUDGEMENTS, "second_id", layout.JUDGEMENTS, "judgement_id"),
]
ROW_IDS = {layout.RESPONSES: "response_id", layout.JUDGEMENTS: "judgement_id"}


def check_stage_files(directory: Path) -> None:
    """Refuse stage files that are not what their stages wrote (their recorded checksums), or that no
    longer fit together (e.g. put together by hand): every row must point at an existing row of the
    stage before it, and ids must be unique. The error names file and line."""
    recorded = read_json(directory / layout.CHECKSUMS) if (directory / layout.CHECKSUMS).is_file() else {}
    names = {
        layout.PROMPTS,
        *ROW_IDS,
        layout.META_JUDGEMENTS,
        *(recorded if isinstance(recorded, dict) else {}),
    }
    for name in sorted(names):
        if (directory / name).is_file() and (problem := stage_file_problem(directory / name)):
            raise RecordError(
                f"{problem}; the stage files of {directory.name} no longer match what was made (delete "
                f"{name} and later files to redo them)"
            )
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
