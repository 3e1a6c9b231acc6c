"""An engine's processes end with the run that started them, even when it is killed outright
(metareward.generation.orphans): real processes, a real SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from metareward.generation import orphans

# A "run" that starts an "engine" process, watches it and waits; it prints the engine's pid.
RUN = """
import subprocess, sys, time
from metareward.generation import orphans
with orphans.new_processes() as started:
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
watcher = orphans.watch(started)
print(engine.pid, watcher.process.pid, flush=True)
if sys.argv[1] == "close":
    engine.kill(); engine.wait(); watcher.stop()
    print("closed", flush=True)
time.sleep(600)
"""


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.2)
                continue
        return True
    return False


def _start(mode: str) -> tuple[subprocess.Popen, int, int]:
    run = subprocess.Popen([sys.executable, "-c", RUN, mode], stdout=subprocess.PIPE, text=True)
    engine, watcher = (int(pid) for pid in run.stdout.readline().split())
    return run, engine, watcher


def test_the_engine_of_a_run_killed_outright_is_ended():
    run, engine, watcher = _start("keep")
    assert psutil.Process(engine).is_running()
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert _gone(engine), "the engine outlived its run"
    assert _gone(watcher)


def test_a_watcher_stopped_after_a_clean_shutdown_leaves_the_run_alone():
    run, engine, watcher = _start("close")
    try:
        assert run.stdout.readline().strip() == "closed"
        assert _gone(engine) and _gone(watcher)
        assert run.poll() is None  # the run itself goes on
    finally:
        run.kill()
        run.wait()


def test_without_engine_processes_no_watcher_starts():
    with orphans.new_processes() as started:
        pass
    assert started == [] and orphans.watch(started).process is None
