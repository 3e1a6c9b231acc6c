"""The allocator setting the entry points make (metareward/allocator.py), checked in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

# Frees a 256 MiB buffer and prints whether the setting took effect and how much of the buffer the
# process still holds (resident) afterwards.
PROBE = """
import sys
from metareward import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
buffer = bytearray(256 * 1024 * 1024)  # zero-filled, so every page is touched
before_free = resident()
del buffer
print(kept, round((resident() - before_free) / 2**20))
"""


def probe(mode: str, **env) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, change_mib = done.stdout.split()
    return kept, int(change_mib)


def test_freed_buffers_stay_in_the_process_for_reuse():
    if os.environ.get("GLIBC_TUNABLES"):
        pytest.skip("GLIBC_TUNABLES is set in this environment")
    assert probe("keep") == ("True", pytest.approx(0, abs=16))
    # By default glibc unmaps a buffer this size on free: the next one page-faults in again.
    kept, change_mib = probe("default")
    assert kept == "False" and change_mib < -200


def test_glibc_tunables_for_malloc_are_left_to_rule():
    kept, change_mib = probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert kept == "False" and change_mib < -200
