"""cluster=ray on a local Ray cluster of this machine's CPUs: engines as actors, DPO on Ray Train.

One cluster serves the whole module (started as the loop would, by cluster.connect); the loop,
finding this process connected, uses it and leaves it running. The transformers backend stands for
vLLM in the engines (no GPU here); a vLLM engine's bundle is checked on its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metareward.align.trainer import align_judge
from metareward.config import (
    DEFAULT_ACCELERATE_CONFIG,
    ActorConfig,
    ClusterConfig,
    ConfigError,
    GeneratorConfig,
    ModelConfig,
    VLLMSettings,
    load_config,
)
from metareward.engines import cluster
from metareward.generation import make_generator
from metareward.judging.prompts import Templates
from metareward.loop.run import Run, stages
from metareward.loop.stages import StageContext
from metareward.store import faults, layout, records
from metareward.store.records import ChunkedFile
from tests.helpers import run_cli, small_settings, small_split, tiny_config

pytestmark = pytest.mark.slow

STAGE_ROWS = (layout.RESPONSES, layout.JUDGEMENTS, layout.META_JUDGEMENTS)
SINGLE_PROCESS = str(DEFAULT_ACCELERATE_CONFIG.parent / "single_process.yaml")


@pytest.fixture(scope="module")
def ray_cluster():
    assert cluster.connect(ClusterConfig(kind="ray", local_cpus=2))
    yield
    cluster.shutdown()


# Two workers average their gradients where one process sums one batch: equal up to fp32 rounding, which
# the comparisons allow for. Where the CPU has native bf16, precision=auto would train in bf16 autocast,
# whose rounding differs between the two by far more.
FP32_TRAINING = ("train.dpo.precision=fp32",)


@pytest.fixture(scope="module")
def plain_iteration(tmp_path_factory, tiny_model_dir) -> Path:
    """One iteration without Ray: the rows a Ray run must write."""
    runs = tmp_path_factory.mktemp("plain")
    Run(tiny_config(runs, "run_name=plain", "iterations=1", *FP32_TRAINING)).run()
    return runs / "plain" / "iter_1"


def scheduling(resources: dict) -> dict:
    """What engines and workers are scheduled on: CPUs, GPUs and memory (the object store's figure is
    what objects it holds now, not what is reserved)."""
    return {k: resources.get(k, 0) for k in ("CPU", "GPU", "memory")}


def test_two_replicas_write_the_rows_of_one_engine_through_a_lost_engine_and_free_the_cluster_to_train(
    ray_cluster, plain_iteration, tiny_model_dir, tmp_path, monkeypatch
):
    pools: list[cluster.ReplicaPool] = []
    served: set[tuple[str, int]] = set()
    before_training: list[tuple[dict, dict]] = []
    killed = []

    call = cluster.ReplicaPool.call

    def count(self, replica, method, *args):
        served.add((method, replica.index))
        return call(self, replica, method, *args)

    point = faults.point

    def kill_an_engine_mid_judge(name: str) -> None:
        point(name)
        # The first judge chunk is written while the other engine works on the second: kill that one.
        if name == "chunk:judgements.jsonl" and not killed:
            killed.append(pools[-1].replicas[1].actor)
            ray.kill(killed[-1])

    class WatchedRayEngines(cluster.RayEngines):
        """The run's Ray engines, keeping each pool they start and looking at the cluster before DPO."""

        def start(self, *args, **kwargs):
            pools.append(super().start(*args, **kwargs))
            return pools[-1]

        def train_dpo(self, *args, **kwargs):
            before_training.append((ray.available_resources(), ray.cluster_resources()))
            return super().train_dpo(*args, **kwargs)

    monkeypatch.setattr(cluster.ReplicaPool, "call", count)
    monkeypatch.setattr(faults, "point", kill_an_engine_mid_judge)

    cfg = tiny_config(
        tmp_path,
        "run_name=ray",
        "iterations=1",
        "cluster=ray",
        "cluster.replicas=2",
        "cluster.train_workers=2",
        # Two workers of 2 pairs a step: the 4 pairs a step of the run without Ray (its default batch).
        "train.dpo.batch_size=2",
        *FP32_TRAINING,
    )
    Run(cfg, engines=WatchedRayEngines(cfg, tmp_path / "ray")).run()
    directory = tmp_path / "ray" / "iter_1"

    for name in STAGE_ROWS:
        assert records.read_jsonl(directory / name) == records.read_jsonl(plain_iteration / name), name
    # One pool (M_0 plays all three roles), both engines worked, one was lost and replaced.
    assert len(pools) == 1 and pools[0].lost == 1 and len(killed) == 1
    assert {index for method, index in served if method == "generate"} == {0, 1}
    assert pools[0].replicas[1].actor is not killed[0]
    # The engines were gone, and every resource free again, when training started.
    ((available, total),) = before_training
    assert scheduling(available) == scheduling(total) and scheduling(total)["CPU"] == 2
    assert not any(key.startswith("bundle_group_") for key in available)
    # M_1 was trained by two Ray Train workers, loads, is not M_0, and equals the inline trainer's M_1 on
    # the same pairs and seed up to float rounding in the all-reduce (1e-4, where training moves weights
    # by over 1e-3): accelerate deals each process every other batch of the same shuffled order, so two
    # workers of 2 average the gradient one process takes over 4. They would differ in the last step
    # when the pairs are not a multiple of 4 (accelerate then evens out the last batch by repeating pairs).
    log = records.read_json(directory / layout.MODEL / layout.TRAINING_LOG)
    assert log["processes"] == 2 and log["global_steps"] >= 1
    AutoModelForCausalLM.from_pretrained(directory / layout.MODEL)
    trained = tensors(directory / layout.MODEL)
    assert (
        len(
            records.read_jsonl(directory / layout.ACTOR_PAIRS)
            + records.read_jsonl(directory / layout.JUDGE_PAIRS)
        )
        % 4
        == 0
    )
    assert largest_difference(trained, tensors(tiny_model_dir)) > 1e-3
    assert largest_difference(trained, tensors(plain_iteration / layout.MODEL)) < 1e-4


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_judge_alignment_on_two_ray_train_workers_equals_the_inline_alignment(
    ray_cluster, tiny_model_dir, tmp_path
):
    train, heldout = small_split(tmp_path)
    settings = (
        "batch_size=1 save_steps=2 learning_rate=1e-3 progress=false max_length=1024 eval_batch_size=4 "
        "precision=fp32"
    )
    cfg = load_config(
        None,
        ["model=tiny", "cluster=ray", "cluster.train_workers=2", *(f"align.{s}" for s in settings.split())],
    )
    on_ray = cluster.align_on_cluster(
        cfg, tiny_model_dir, train, heldout, out_dir=tmp_path / "ray", work_dir=tmp_path / "ray_work"
    )
    inline = align_judge(
        tiny_model_dir,
        small_settings(batch_size=2, precision="fp32"),
        train,
        heldout,
        out_dir=tmp_path / "inline",
        work_dir=tmp_path / "inline_work",
    )
    assert on_ray == records.read_json(tmp_path / "ray" / layout.TRAINING_LOG)["alignment"]
    assert on_ray["train"]["steps"] == inline["train"]["steps"] == 9
    assert on_ray["heldout"]["before"] == inline["heldout"]["before"]
    assert not (tmp_path / "ray_work" / "checkpoints").exists()
    weights = tensors(tmp_path / "ray")
    assert largest_difference(weights, tensors(tiny_model_dir)) > 1e-3
    assert largest_difference(weights, tensors(tmp_path / "inline")) < 1e-4


class DriverStopped(Exception):
    """Stands in for the driver being killed at a kill point (the process would die there)."""


def test_a_stage_stopped_mid_way_resumes_on_the_cluster_making_only_its_missing_chunks(
    ray_cluster, tiny_model_dir, tmp_path, monkeypatch
):
    prompts = [
        {"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Say something about {i}."}]}
        for i in range(8)
    ]
    role = ActorConfig(num_responses=2, max_new_tokens=8)
    model, settings = ModelConfig(kind="tiny"), GeneratorConfig(progress=False)
    plain = make_generator(tiny_model_dir, model, settings)
    expected = stages.actor(
        StageContext(plain, Templates(), 0, 1, 2), prompts, role, ChunkedFile(tmp_path / "plain.jsonl")
    )
    pool = cluster.ReplicaPool(tiny_model_dir, model, settings, None, ClusterConfig(kind="ray", replicas=2))
    on_pool = StageContext(pool, Templates(), 0, 1, 2)
    out = ChunkedFile(tmp_path / "resumed.jsonl")
    point, hits = faults.point, []

    def stop_after_the_second_chunk(name: str) -> None:
        point(name)
        hits.append(name)
        if name == "chunk:resumed.jsonl" and hits.count(name) == 2:
            raise DriverStopped

    monkeypatch.setattr(faults, "point", stop_after_the_second_chunk)
    with pytest.raises(DriverStopped):
        stages.actor(on_pool, prompts, role, out)
    assert sorted(p.name for p in out.parts.glob("*.jsonl")) == ["000000.jsonl", "000001.jsonl"]

    write_chunk, written = ChunkedFile.write_chunk, []

    def record(self, index, rows):
        written.append(index)
        write_chunk(self, index, rows)

    monkeypatch.setattr(ChunkedFile, "write_chunk", record)
    try:
        assert stages.actor(on_pool, prompts, role, out) == expected
    finally:
        pool.close()
    assert written == [2, 3]


def test_engines_that_do_not_fit_are_refused_naming_what_to_lower(ray_cluster, tiny_model_dir):
    settings = ClusterConfig(kind="ray", replicas=3, placement_timeout_s=2)
    with pytest.raises(cluster.ClusterError, match=r"3 engine\(s\) of \{'CPU': 1.0\}.*cluster.replicas"):
        cluster.ReplicaPool(tiny_model_dir, ModelConfig(kind="tiny"), GeneratorConfig(), None, settings)
    assert scheduling(ray.available_resources()) == scheduling(ray.cluster_resources())


# ------------------------------------------------------------------ settings, without a cluster


def test_a_vllm_engine_takes_its_tensor_parallel_gpus_in_one_bundle():
    vllm = GeneratorConfig(backend="vllm", vllm=VLLMSettings(tensor_parallel_size=4))
    assert cluster.engine_bundle(ClusterConfig(cpus_per_replica=8), vllm) == {"CPU": 8, "GPU": 4}
    assert cluster.engine_bundle(ClusterConfig(), GeneratorConfig()) == {"CPU": 1.0}
    assert cluster.engine_bundle(ClusterConfig(gpus_per_replica=1), GeneratorConfig()) == {
        "CPU": 1.0,
        "GPU": 1,
    }


def test_training_workers_get_the_deepspeed_settings_accelerate_launch_would_give():
    env = cluster.accelerate_env(None, use_gpu=True)
    assert env == {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
        "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    # CPU workers: the shipped (GPU) default falls back to DDP; one named explicitly is refused.
    assert cluster.accelerate_env(None, use_gpu=False) == {}
    assert cluster.accelerate_env(SINGLE_PROCESS, use_gpu=True) == {}
    with pytest.raises(cluster.ClusterError, match="DeepSpeed, which metareward runs on GPU workers only"):
        cluster.accelerate_env(str(DEFAULT_ACCELERATE_CONFIG), use_gpu=False)


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.replicas=0", "cluster.replicas=0: must be >= 1"),
        ("cluster.placement_strategy=RANDOM", "cluster.placement_strategy='RANDOM': one of"),
        (
            "train.launcher=accelerate",
            "train.launcher='accelerate': with cluster=ray training is a Ray Train",
        ),
    ],
)
def test_bad_cluster_settings_are_refused_by_their_full_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["cluster=ray", override])
    assert str(error.value).startswith(message)


def test_where_engines_run_may_change_on_resume_but_not_the_training_processes(tmp_path):
    from metareward.loop.run import RunStopped, check_run_config

    check_run_config(tmp_path, load_config(None, []))
    check_run_config(tmp_path, load_config(None, ["cluster=ray", "cluster.replicas=4"]))
    with pytest.raises(RunStopped, match="cluster.train_workers: 1 -> 2"):
        check_run_config(tmp_path, load_config(None, ["cluster=ray", "cluster.train_workers=2"]))
    shutil.rmtree(tmp_path)


def test_cluster_ray_without_ray_installed_is_refused_before_anything_runs(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"cluster.kind='ray': needs Ray, which is not installed"):
        load_config(None, ["cluster=ray"])


def test_a_cluster_that_is_not_there_is_one_line_naming_the_address(tmp_path):
    command = [
        "model=tiny",
        "tracking=none",
        f"runs_dir={tmp_path}",
        "cluster=ray",
        "cluster.address=127.0.0.1:1",
    ]
    done = run_cli(*command, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("metareward: error: cluster.address='127.0.0.1:1': ")
        and "Traceback" not in done.stderr
    )
