"""``cluster=ray`` with two replicas of the real vLLM engine (its CPU build) as Ray actors: the rows of
one engine without Ray.

    make test-engines          # or: .venv-engines/bin/python -m pytest tests/engines/test_vllm_ray.py
"""

from __future__ import annotations

import pytest

from metareward.config import ClusterConfig, load_config
from metareward.engines import cluster
from metareward.loop.run import Run
from metareward.store import layout, records
from tests.engines.test_vllm_loop import ENGINE, model_args
from tests.helpers import TINY_RUN

STAGE_ROWS = (layout.RESPONSES, layout.JUDGEMENTS, layout.META_JUDGEMENTS)
# Chunks of two rows, so that both replicas get some of each stage; M_1 is not needed.
RUN = [*TINY_RUN, *ENGINE, "generator.chunk_size=2", "iterations=1", "train.on_no_pairs=carry"]


@pytest.mark.slow
def test_two_vllm_replicas_on_ray_write_the_rows_of_one_engine(tiny32_dir, tmp_path, monkeypatch):
    plain = load_config(None, [*RUN, *model_args(tiny32_dir), f"runs_dir={tmp_path}", "run_name=plain"])
    Run(plain).run()

    served = set()
    call = cluster.ReplicaPool.call

    def count(self, replica, method, *args):
        served.add((method, replica.index))
        return call(self, replica, method, *args)

    monkeypatch.setattr(cluster.ReplicaPool, "call", count)
    assert cluster.connect(ClusterConfig(kind="ray", local_cpus=2))
    try:
        overrides = [*RUN, *model_args(tiny32_dir), "cluster=ray", "cluster.replicas=2"]
        overrides.append("cluster.placement_timeout_s=120")  # engines that cannot be placed fail soon
        Run(load_config(None, [*overrides, f"runs_dir={tmp_path}", "run_name=ray"])).run()
    finally:
        cluster.shutdown()

    assert {index for method, index in served if method == "generate"} == {0, 1}
    for name in STAGE_ROWS:
        rows = records.read_jsonl(tmp_path / "ray" / "iter_1" / name)
        assert rows == records.read_jsonl(tmp_path / "plain" / "iter_1" / name), name
        assert rows
