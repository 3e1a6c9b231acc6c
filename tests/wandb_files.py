"""Read back what W&B wrote offline, for tests.

wandb 0.31 writes no ``files/wandb-summary.json`` (nor config.yaml) offline; everything is in the
run's ``.wandb`` transaction log: a 7-byte header (":W&B", magic 0xBEE1, version) and then LevelDB-log
records (32 KiB blocks; each chunk has a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)
whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every protobuf Record in a ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run's file, once W&B has written its exit record.

    ``run.finish()`` returns before wandb-core has flushed the file: it only publishes
    "inform_finish", and the stream closes (flushing the log) a moment later; a record read while it is
    being written does not parse, and is read again.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
        except DecodeError:  # read while wandb-core was writing a record: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(wandb_file: Path) -> dict:
    """One .wandb file: its run record, final summary {key: value}, history {_step: {key: value}},
    rows (the history rows in the order logged), metrics {name: step metric, "" for none}, from
    the run's ``define_metric`` calls, and artifacts [{"type", "name", "aliases", "metadata",
    "files": {path: ref or ""}}] in the order logged."""
    run, summary, history, metrics, artifacts = None, {}, {}, {}, []
    for record in finished_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            row = history.setdefault(record.history.step.num, {})
            row.update({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "metric":
            metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "artifact":
            made = record.artifact
            artifacts.append(
                {
                    "type": made.type,
                    "name": made.name,
                    "aliases": list(made.aliases),
                    "metadata": json.loads(made.metadata or "{}"),
                    "files": {entry.path: entry.ref for entry in made.manifest.contents},
                }
            )
    rows = [history[step] for step in sorted(history)]
    return {
        "run": run,
        "summary": summary,
        "history": history,
        "rows": rows,
        "metrics": metrics,
        "artifacts": artifacts,
    }


def rows_at(logged: dict, step_metric: str, value) -> dict:
    """Every key logged where ``step_metric`` was ``value``, merged (e.g. an iteration's metrics
    and tables, which are separate rows)."""
    merged: dict = {}
    for row in logged["rows"]:
        if row.get(step_metric) == value:
            merged.update(row)
    return merged


def series(logged: dict, key: str, step_metric: str) -> list[tuple]:
    """``(step metric, value)`` of each row that logged ``key``, in the order logged."""
    return [(row.get(step_metric), row[key]) for row in logged["rows"] if key in row]


def offline_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
