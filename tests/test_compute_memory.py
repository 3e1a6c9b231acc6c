"""The memory a new engine may take: a cgroup's limit (a container's, a Slurm job's) counts, v1 and v2."""

from __future__ import annotations

import math

from metareward.compute.memory import available_gib, cgroup_room

GIB = 2**30


def _cgroup(directory, limit_file, usage_file, limit, usage):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / limit_file).write_text(f"{limit}\n")
    (directory / usage_file).write_text(f"{usage}\n")


def test_the_tightest_v2_cgroup_on_the_way_to_this_process_bounds_it(tmp_path):
    _cgroup(tmp_path, "memory.max", "memory.current", "max", 5 * GIB)  # the namespace root: no limit
    _cgroup(tmp_path / "slurm/job_7", "memory.max", "memory.current", 16 * GIB, 10 * GIB)
    membership = "0::/slurm/job_7\n"
    assert cgroup_room(tmp_path, membership) == 6 * GIB


def test_a_v1_memory_cgroup_bounds_it(tmp_path):
    _cgroup(tmp_path / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", 2**63 - 4096, GIB)
    _cgroup(tmp_path / "memory/job", "memory.limit_in_bytes", "memory.usage_in_bytes", 8 * GIB, 3 * GIB)
    membership = "4:memory:/job\n1:cpu,cpuacct:/job\n0::/\n"
    assert cgroup_room(tmp_path, membership) == 5 * GIB


def test_no_readable_cgroup_leaves_the_machines_memory(tmp_path):
    assert cgroup_room(tmp_path, "0::/nowhere\n") == math.inf
    assert 0 < available_gib() < math.inf
