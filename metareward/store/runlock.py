"""One writer per run directory: an OS file lock on ``<run dir>/.metareward.lock``, held for the run's life.

The lock is ``flock`` on an open file, so the kernel releases it when the process ends in any way
(SIGKILL and a lost node's NFS lease included); the file itself stays and is never trusted on its
own. While held, the file names its holder (host, pid, start time), which a second run on the same
directory is refused with::

    with hold(run_dir):        # RunLocked when another process has it
        ...

NFS passes ``flock`` on to the server's locks; Lustre needs the ``flock`` mount option. On a file
system that has no locks at all the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from metareward.store import layout
from metareward.store.records import FILE_MODE, HOST

log = logging.getLogger(__name__)

LOCK = layout.LOCK


class RunLocked(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _holder(fd: int) -> str:
    # The holder writes its name right after taking the lock: wait a moment for it if it is not there yet.
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict):
            return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
        time.sleep(0.05)
    return "holder not known"


def _try_lock(run_dir: Path) -> int | None:
    """The locked file's descriptor, or None when the file system has no locks; RunLocked when held."""
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{run_dir} is in use by another metareward run ({holder}); wait for it to end, or use "
                "another run_name"
            ) from None
        os.close(fd)
        log.warning("metareward: cannot lock %s (%s); nothing stops a second run on it", path, error.strerror)
        return None
    return fd


def check_free(run_dir: Path) -> None:
    """Refuse (RunLocked) a run directory another process holds, without taking it."""
    if not (run_dir / LOCK).is_file():
        return
    fd = _try_lock(run_dir)
    if fd is not None:
        os.close(fd)


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock inside the block; RunLocked when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(run_dir)
    try:
        if fd is not None:
            started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            info = json.dumps({"host": HOST, "pid": os.getpid(), "started": started}) + "\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # the next holder's name, not ours, is what a refused run should read
            os.close(fd)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on ``path`` (e.g. one cache entry being built)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # no locks on this file system: build unguarded
            log.warning("metareward: cannot lock %s (%s)", path, error.strerror)
        yield
    finally:
        os.close(fd)
