"""End an engine's processes when the process that started them dies without shutting them down.

vLLM runs its engine core and workers in processes of their own. A run killed outright (SIGKILL, the
out-of-memory killer) cannot shut them down, and they live on: holding their memory (the KV cache, GPU
memory), the cores they are bound to and the run's output pipes, so that the resumed run's engine finds
the machine taken. A watcher started beside them ends them once the run is gone::

    with new_processes() as started:
        llm = LLM(...)                          # the processes it starts are collected in ``started``
    watcher = watch(started)                    # a small process of its own
    ...
    watcher.stop()                              # after the engine was shut down cleanly

Run as ``python -m metareward.generation.orphans PARENT PID...``, it is the watcher itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil

POLL_SECONDS = 1.0


@contextlib.contextmanager
def new_processes() -> Iterator[list[psutil.Process]]:
    """The processes this process started (directly or not) inside the ``with`` block."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    started: list[psutil.Process] = []
    yield started
    started += [child for child in psutil.Process().children(recursive=True) if child.pid not in before]


class Watcher:
    def __init__(self, process: subprocess.Popen | None):
        self.process = process

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def watch(targets: list[psutil.Process]) -> Watcher:
    """Start the watcher of ``targets`` (nothing when there are none). It sits in a session of its own,
    so a Ctrl-C meant for the run leaves it alone, and writes nowhere, so it holds none of its pipes."""
    if not targets:
        return Watcher(None)
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid()), *(str(target.pid) for target in targets)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Watcher(process)


def _alive(process: psutil.Process) -> bool:
    # is_running also compares the start time, so a recycled pid is not taken for the process.
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def watch_until_gone(parent: psutil.Process | None, targets: list[psutil.Process]) -> None:
    """Wait while ``parent`` lives; when it is gone (or None), kill whichever ``targets`` still run."""
    while parent is not None and _alive(parent):
        if not any(_alive(target) for target in targets):
            return
        time.sleep(POLL_SECONDS)
    for target in targets:
        with contextlib.suppress(psutil.Error):
            if _alive(target):
                target.kill()


def _process(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid)
    return None


def main(argv: list[str]) -> None:
    parent, *pids = (int(arg) for arg in argv)
    targets = [process for process in map(_process, pids) if process is not None]
    watch_until_gone(_process(parent), targets)


if __name__ == "__main__":
    main(sys.argv[1:])
