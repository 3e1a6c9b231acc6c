"""The allocator setting the entry points make (metareward/allocator.py), checked in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metareward.compute.allocator import GPU_DRIVER_FILES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

# Frees a 256 MiB buffer and prints whether the setting took effect, how much of the buffer the
# process still holds (resident) afterwards, and whether torch was imported on the way.
# argv[1]: "default" (no setting), "auto" (keep_freed_memory()), "cpu" / "cuda" (cuda=False / True);
# argv[2], if given, replaces the GPU driver files looked for.
PROBE = """
import sys
from metareward.compute import allocator
mode = sys.argv[1]
if len(sys.argv) > 2:
    allocator.GPU_DRIVER_FILES = (sys.argv[2],)
if mode == "default":
    kept = False
elif mode == "auto":
    kept = allocator.keep_freed_memory()
else:
    kept = allocator.keep_freed_memory(cuda=mode == "cuda")
imported_torch = "torch" in sys.modules
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
buffer = bytearray(256 * 1024 * 1024)  # zero-filled, so every page is touched
before_free = resident()
del buffer
print(kept, round((resident() - before_free) / 2**20), imported_torch)
"""


def probe(mode: str, *args: str, **env) -> tuple[str, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    kept, change_mib, imported_torch = done.stdout.split()
    return kept, int(change_mib), imported_torch


@pytest.fixture
def no_glibc_tunables():
    if os.environ.get("GLIBC_TUNABLES"):
        pytest.skip("GLIBC_TUNABLES is set in this environment")


def test_freed_buffers_stay_in_the_process_for_reuse(no_glibc_tunables):
    kept, change_mib, _ = probe("cpu")
    assert (kept, change_mib) == ("True", pytest.approx(0, abs=16))
    # By default glibc unmaps a buffer this size on free: the next one page-faults in again.
    kept, change_mib, _ = probe("default")
    assert kept == "False" and change_mib < -200


def test_a_cuda_process_is_left_as_it_is(no_glibc_tunables):
    kept, change_mib, _ = probe("cuda")
    assert kept == "False" and change_mib < -200


def test_without_a_gpu_driver_it_applies_without_importing_torch(no_glibc_tunables, tmp_path):
    assert probe("auto", str(tmp_path / "no-such-driver")) == ("True", pytest.approx(0, abs=16), "False")


def test_with_a_gpu_driver_torch_decides(no_glibc_tunables, tmp_path):
    driver = tmp_path / "driver"
    driver.write_text("")
    import torch

    cuda = torch.cuda.device_count() > 0
    kept, change_mib, imported_torch = probe("auto", str(driver))
    assert imported_torch == "True"
    assert kept == str(not cuda)
    assert (change_mib < -200) if cuda else change_mib == pytest.approx(0, abs=16)


def test_auto_on_this_machine(no_glibc_tunables):
    """keep_freed_memory() as the entry points call it: applied here unless a GPU is in use."""
    has_driver = any(Path(path).exists() for path in GPU_DRIVER_FILES)
    kept, _, imported_torch = probe("auto")
    if not has_driver:
        assert (kept, imported_torch) == ("True", "False")
    else:
        import torch

        assert kept == str(torch.cuda.device_count() == 0)


def test_glibc_tunables_for_malloc_are_left_to_rule():
    kept, change_mib, _ = probe("cpu", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert kept == "False" and change_mib < -200
