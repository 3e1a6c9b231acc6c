"""Kill points: places where a fault-injection test may SIGKILL the run, to prove a restart loses nothing.

``METAREWARD_KILL_AT=<point>`` (or ``<point>:<hit>``) makes the process kill itself with SIGKILL the
``<hit>``-th time (default: the first) it reaches the point named ``<point>``. Nothing is cleaned up,
flushed or closed, exactly as if the machine had lost power at that moment. Without the variable a
point costs one comparison.

The points:

=================  =====================================================================================
``chunk:<file>``   a chunk of the stage file ``<file>`` (e.g. ``judgements.jsonl``) has just been written
``write:<name>``   an atomic write of ``<name>`` has its temp file on disk, not yet renamed over ``<name>``
``joined:<file>``  a stage's chunks are joined into ``<file>`` but not yet removed
``train_step``     a DPO optimiser step has ended; the model is not saved
``save_model``     M_t's weights are in the model's temp directory; its tokenizer and log are not, and
                   nothing is renamed into place
=================  =====================================================================================

E.g. ``METAREWARD_KILL_AT=chunk:judgements.jsonl:2`` kills the run mid-judge, right after the second
judge chunk this process writes.
"""

from __future__ import annotations

import os
import signal

ENV = "METAREWARD_KILL_AT"


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
_hits = 0


def point(name: str) -> None:
    """Kill this process here if ``METAREWARD_KILL_AT`` names this point (and its hit has come)."""
    global _hits
    if _ARMED is None or name != _ARMED[0]:
        return
    _hits += 1
    if _hits >= _ARMED[1]:
        os.kill(os.getpid(), signal.SIGKILL)
