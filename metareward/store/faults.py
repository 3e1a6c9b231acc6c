"""Kill points: places where a fault-injection test may SIGKILL the run, to prove a restart loses nothing.

``METAREWARD_KILL_AT=<point>`` (or ``<point>:<hit>``) makes the process kill itself with SIGKILL the
``<hit>``-th time (default: the first) it reaches the point named ``<point>``. Nothing is cleaned up,
flushed or closed, exactly as if the machine had lost power at that moment. Without the variable a
point costs one comparison.

``METAREWARD_KILL_WITH`` picks another fault at that point: ``SIGINT`` (Ctrl-C) or ``SIGTERM`` (a
scheduler's stop), sent to the process itself and handled as a real one would be, or ``ENOSPC``, the
``OSError`` a write on a full disk raises.

The points:

=================  =====================================================================================
``chunk:<file>``   a chunk of the stage file ``<file>`` (e.g. ``judgements.jsonl``) has just been written
``write:<name>``   an atomic write of ``<name>`` has its temp file on disk, not yet renamed over ``<name>``
``joined:<file>``  a stage's chunks are joined into ``<file>`` but not yet removed
``train_step``     a DPO optimiser step has ended; the model is not saved
``align_step``     a judge-alignment optimiser step has ended (alignment.py); the model is not saved
``save_model``     M_t's weights are in the model's temp directory; its tokenizer and log are not, and
                   nothing is renamed into place
=================  =====================================================================================

E.g. ``METAREWARD_KILL_AT=chunk:judgements.jsonl:2`` kills the run mid-judge, right after the second
judge chunk this process writes.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "METAREWARD_KILL_AT"
WITH_ENV = "METAREWARD_KILL_WITH"
FAULTS = ("SIGKILL", "SIGINT", "SIGTERM", "ENOSPC")


def parse(spec: str | None) -> tuple[str, int] | None:
    """``"name"`` or ``"name:hit"`` -> (name, hit); None when no point is armed. Names may hold colons."""
    if not spec:
        return None
    name, sep, hit = spec.rpartition(":")
    if sep and name and hit.isdigit():
        return name, max(int(hit), 1)
    return spec, 1


# Read once: the variable is set by whoever starts the process, never changed inside it.
_ARMED = parse(os.environ.get(ENV))
_WITH = os.environ.get(WITH_ENV) or "SIGKILL"
if _WITH not in FAULTS:
    raise ValueError(f"{WITH_ENV}={_WITH!r}: one of {FAULTS}")
_hits = 0


def point(name: str) -> None:
    """Kill this process here if ``METAREWARD_KILL_AT`` names this point (and its hit has come)."""
    global _hits
    if _ARMED is None or name != _ARMED[0]:
        return
    _hits += 1
    if _hits != _ARMED[1]:  # once: a stopped process does not stop again
        return
    if _WITH == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # A signal the process handles (SIGINT, SIGTERM) is raised in it right after this call returns.
    os.kill(os.getpid(), getattr(signal, _WITH))
