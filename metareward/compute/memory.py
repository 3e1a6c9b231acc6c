"""How much memory a new process (an engine, its KV cache) may take on this machine.

available_gib()     # the machine's available memory, or less where a cgroup limits this process
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import psutil


def cgroup_room(root: Path, membership: str) -> float:
    """Bytes this process's memory cgroup (a container's, a Slurm job's) still lets it take: the least
    room (limit minus use) of the cgroups mounted at ``root`` (v2) and ``root/memory`` (v1), and of this
    process's own below them as ``membership`` (/proc/self/cgroup's text) names them; inf where none is
    limited or readable."""
    places = [
        (root, "memory.max", "memory.current"),
        (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ]
    for line in membership.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # v2
            places.append((root / path.lstrip("/"), "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):  # v1
            places.append(
                (root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes")
            )
    room = math.inf
    for directory, limit_file, usage_file in places:
        with contextlib.suppress(OSError, ValueError):
            limit = (directory / limit_file).read_text().strip()
            if limit != "max":
                room = min(room, int(limit) - int((directory / usage_file).read_text()))
    return room


def available_gib() -> float:
    """Memory available to new processes, in GiB: the machine's, or less where a cgroup limits this
    process."""
    membership = ""
    with contextlib.suppress(OSError):
        membership = Path("/proc/self/cgroup").read_text()
    room = cgroup_room(Path("/sys/fs/cgroup"), membership)
    return min(psutil.virtual_memory().available, room) / 2**30
