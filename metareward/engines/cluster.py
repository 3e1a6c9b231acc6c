"""Ray (``cluster=ray``, ``pip install metareward[ray]``): engines as actors, training as a Ray Train job.

The loop stays the one process that decides the order of work and writes the run directory. Here:

- :func:`connect` joins the cluster at ``cluster.address`` (``auto``: the one ``ray start`` made on
  this node; ``ray://HEAD:10001``; empty: a local one started in this process);
- :class:`ReplicaPool` serves one model with ``cluster.replicas`` engines, Ray actors in a placement
  group of their own (a bundle of ``cpus_per_replica`` CPUs and ``gpus_per_replica`` GPUs each). A
  stage deals its chunks to them (:meth:`ReplicaPool.deal`): the chunk stays the unit of work, of
  seeding and of resume, so each engine computes exactly the batches one engine would, and the
  chunks are written back in order by this process alone. An engine lost mid-chunk (its node died,
  it was killed) is replaced in its bundle and the chunk made again on the new one; its rows are
  written once. :meth:`ReplicaPool.close` kills the engines and removes the placement group, and
  returns once its resources are free again, before training starts;
- :class:`RayEngines` is the run's engines seam on the cluster (:mod:`metareward.engines.local`);
- :func:`train_job` runs DPO or the judge alignment as a Ray Train ``TorchTrainer`` on
  ``cluster.train_workers`` workers (DDP over gloo or NCCL, or DeepSpeed as ``train.accelerate_config``
  says), which read their job from and save the model into the run directory.

This is the only module that imports ray; over 400 lines because of it (the engines and the training
jobs share its connection, resources and environment).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from metareward.config import DEFAULT_ACCELERATE_CONFIG, ClusterConfig, Config, GeneratorConfig, ModelConfig
from metareward.engines.local import ClusterError, Engines, Seat
from metareward.generation.base import Completion, Generator, Messages, SamplingParams, Usage
from metareward.store import layout
from metareward.store.records import read_json

log = logging.getLogger(__name__)

# Environment the engines and training workers get from the driver (on a remote cluster too): the
# Hugging Face and model caches' settings, and no print patching (Ray Train's would print what
# libraries capture, e.g. dill's disassembly while datasets hashes a function).
PASSED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "METAREWARD_CACHE")
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}
# How long close() waits for Ray to report a removed placement group's resources free.
RELEASE_TIMEOUT_S = 60.0


class ReplicaLost(RuntimeError):
    """An engine actor died while it worked (the chunk it had is made again on its replacement)."""


def connect(cfg: ClusterConfig) -> bool:
    """Join (or, without ``cluster.address``, start) the Ray cluster; False when this process is already
    connected (to a cluster someone else started, e.g. a Ray program that runs metareward)."""
    if ray.is_initialized():
        return False
    env = {**{k: os.environ[k] for k in PASSED_ENV if k in os.environ}, **WORKER_ENV}
    options: dict = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
    if cfg.address:
        _check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, **options)
        except ConnectionError as error:
            raise ClusterError(f"cluster.address={cfg.address!r}: {error}") from None
    else:
        # A local cluster: a small object store (what passes through it is requests and answers).
        cpus = cfg.local_cpus or os.cpu_count()
        ray.init(num_cpus=cpus, object_store_memory=256 * 2**20, **options)
    log.info("ray cluster: %s", _resources(ray.cluster_resources()))
    return True


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT head address nothing listens on (Ray itself would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ClusterError(
            f"cluster.address={address!r}: no Ray head answers there ({error.strerror or error}); start one "
            "with `ray start --head` on that node, or use cluster.address=auto on a node of the cluster"
        ) from None


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def engine_gpus(cfg: ClusterConfig, settings: GeneratorConfig) -> int:
    """GPUs per engine: ``cluster.gpus_per_replica``, else vLLM's tensor-parallel size (its GPU build;
    the CPU build's workers are processes on the actor's CPUs), else none."""
    if cfg.gpus_per_replica is not None:
        return cfg.gpus_per_replica
    if settings.backend != "vllm":
        return 0
    from metareward.compute.availability import cpu_build

    return 0 if cpu_build() else settings.vllm.tensor_parallel_size


def engine_bundle(cfg: ClusterConfig, settings: GeneratorConfig) -> dict:
    gpus = engine_gpus(cfg, settings)
    return {"CPU": cfg.cpus_per_replica, **({"GPU": gpus} if gpus else {})}


class _Engine:
    """One generation engine (an actor): the backend ``settings.backend`` serving ``model_dir``. Each
    call returns its answer and the usage it spent, which the driver adds up."""

    def __init__(self, model_dir: str, model: ModelConfig, settings: GeneratorConfig, cache_dir):
        if settings.backend == "vllm":
            from metareward.generation.vllm import VLLMGenerator

            # Its tensor-parallel workers are processes of this actor, on the GPUs Ray gave it (not
            # Ray workers of their own, which would need bundles of their own).
            executor = "mp" if settings.vllm.tensor_parallel_size > 1 else None
            self.generator = VLLMGenerator(model_dir, model, settings, executor=executor)
        else:
            from metareward.generation import make_generator

            self.generator = make_generator(model_dir, model, settings, cache_dir)

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[Messages], params: SamplingParams, desc: str):
        return self._measured(self.generator.generate, requests, params, desc)

    def next_token_probs(self, texts: list[str], candidates: list[str]):
        return self._measured(self.generator.next_token_probs, texts, candidates)

    def _measured(self, method: Callable, *args):
        before = self.generator.usage.copy()
        return method(*args), self.generator.usage.minus(before)


class Replica:
    """One engine of a pool, as a :class:`~metareward.generation.Generator` (what a dealt chunk's work
    is handed); prompts are rendered here, with the pool's tokenizer, exactly as the engine would."""

    reads_probabilities = True

    def __init__(self, pool: ReplicaPool, index: int, actor):
        self.pool, self.index, self.actor = pool, index, actor

    @property
    def usage(self) -> Usage:
        return self.pool.usage

    def render(self, messages: Messages) -> str:
        return self.pool.render(messages)

    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        return self.pool.call(self, "generate", requests, params, desc)

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        return self.pool.call(self, "next_token_probs", texts, candidates)

    def close(self) -> None:
        """The pool closes its engines."""


class ReplicaPool:
    """``replicas`` engines serving ``model_dir`` on the cluster, in a placement group of their own.

    As a Generator it answers each call on its first engine (for work that is not dealt in chunks);
    :meth:`deal` gives each engine a chunk at a time."""

    reads_probabilities = True

    def __init__(
        self,
        model_dir: str,
        model: ModelConfig,
        settings: GeneratorConfig,
        cache_dir: Path | None,
        cluster: ClusterConfig,
        replicas: int | None = None,
    ):
        from transformers import AutoTokenizer

        self.cluster = cluster
        self.progress = settings.progress
        self.usage = Usage()
        self.lost = 0  # engines lost and replaced so far
        self.closed = False
        self._lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
        count = replicas or cluster.replicas
        self.bundle = engine_bundle(cluster, settings)
        self.group = placement_group([self.bundle] * count, strategy=cluster.placement_strategy)
        ready, _ = ray.wait([self.group.ready()], timeout=cluster.placement_timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise ClusterError(
                f"cluster=ray: {count} engine(s) of {self.bundle} each did not fit on the cluster within "
                f"cluster.placement_timeout_s={cluster.placement_timeout_s} (free now: "
                f"{_resources(ray.available_resources())}); lower cluster.replicas or "
                "cluster.cpus_per_replica / gpus_per_replica, or add nodes"
            )
        # The engines show no progress bars of their own (their output interleaves on the driver's
        # console); deal() shows one over the chunks.
        self._engine_args = (model_dir, model, replace(settings, progress=False), cache_dir)
        self.replicas = [Replica(self, i, self._start(i)) for i in range(count)]
        try:
            ray.get([replica.actor.ready.remote() for replica in self.replicas])
        except BaseException:
            self.close()
            raise
        log.info("%d engine(s) serving %s on the cluster, %s each", count, model_dir, self.bundle)

    def _start(self, index: int):
        gpus = self.bundle.get("GPU", 0)
        actor_class = ray.remote(_Engine).options(
            num_cpus=self.bundle["CPU"],
            num_gpus=gpus,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=index
            ),
        )
        return actor_class.remote(*self._engine_args)

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def call(self, replica: Replica, method: str, *args):
        """``method`` on ``replica``'s engine; its usage is added to the pool's."""
        try:
            result, spent = ray.get(getattr(replica.actor, method).remote(*args))
        except RayActorError as error:
            raise ReplicaLost(f"engine {replica.index} was lost: {error}") from error
        with self._lock:
            self.usage.add(spent)
        return result

    def replace_lost(self, replica: Replica, error: ReplicaLost) -> None:
        """Start a new engine in the lost one's bundle, or give up after ``cluster.max_restarts``."""
        with self._lock:
            if self.closed:
                raise error
            self.lost += 1
            if self.lost > self.cluster.max_restarts:
                raise ClusterError(
                    f"{self.lost} engines were lost (cluster.max_restarts={self.cluster.max_restarts}); "
                    f"the last: {error}. Finished chunks are on disk: run the same command to go on"
                ) from error
            ray.kill(replica.actor, no_restart=True)
            log.warning("metareward: %s; starting another, which makes its chunk again", error)
            replica.actor = self._start(replica.index)
        try:
            ray.get(replica.actor.ready.remote())
        except RayActorError as again:  # the replacement died too: one more loss, within the same bound
            self.replace_lost(replica, ReplicaLost(f"engine {replica.index}'s replacement was lost: {again}"))

    def _until_done(self, replica: Replica, work: Callable[[Replica], Any]):
        """``work(replica)``, made again on a replacement each time the replica's engine is lost."""
        while True:
            try:
                return work(replica)
            except ReplicaLost as lost:
                self.replace_lost(replica, lost)

    def _on_one(self, method: str, *args):
        return self._until_done(self.replicas[0], lambda replica: self.call(replica, method, *args))

    # -- the Generator protocol, on the first engine ---------------------------------------------------

    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        return self._on_one("generate", requests, params, desc)

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        return self._on_one("next_token_probs", texts, candidates)

    # -- chunks dealt to every engine ------------------------------------------------------------------

    def deal(
        self,
        indices: list[int],
        compute: Callable[[Replica, int], list[dict]],
        write: Callable[[int, list[dict]], None],
        desc: str = "",
    ) -> None:
        """``compute(engine, index)`` for each chunk index, an engine each at a time, and
        ``write(index, rows)`` in index order, here: a chunk is written once, when it and every chunk
        before it are done. A chunk whose engine is lost is computed again on its replacement."""
        free: queue.Queue[Replica] = queue.Queue()
        for replica in self.replicas:
            free.put(replica)

        def task(index: int) -> list[dict]:
            replica = free.get()
            try:
                return self._until_done(replica, lambda engine: compute(engine, index))
            finally:
                free.put(replica)

        executor = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="replica")
        bar = tqdm(total=len(indices), desc=desc or "chunks", unit="chunk", disable=not self.progress)
        try:
            futures = [executor.submit(task, index) for index in indices]
            for index, future in zip(indices, futures, strict=True):
                write(index, future.result())
                bar.update(1)
        finally:
            bar.close()
            # On an error (or Ctrl-C) chunks not started are dropped; running ones end when close()
            # kills their engines.
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Kill the engines and remove the placement group; return once Ray reports its resources free."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for replica in getattr(self, "replicas", []):
            ray.kill(replica.actor, no_restart=True)
        remove_placement_group(self.group)
        wait_released(self.group.id.hex())


def _resources(resources: dict) -> dict:
    """A cluster's resources without Ray's bookkeeping entries (nodes, placement-group bundles)."""
    return {k: v for k, v in sorted(resources.items()) if not k.startswith(("node:", "bundle_group_"))}


def wait_released(group_id: str, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Wait until no resource of the placement group ``group_id`` is left on the cluster."""
    deadline = time.monotonic() + timeout_s
    while any(key.endswith(group_id) for key in ray.available_resources()):
        if time.monotonic() > deadline:
            log.warning("metareward: ray still reports placement group %s after %.0f s", group_id, timeout_s)
            return
        time.sleep(0.05)


# -- training ----------------------------------------------------------------------------------------


def accelerate_env(config_path: str | None, use_gpu: bool) -> dict[str, str]:
    """What ``accelerate launch`` would set in each process for ``train.accelerate_config``
    (accelerate.utils.launch.prepare_deepspeed_cmd_env), for training workers Ray starts instead.

    DeepSpeed configs set DeepSpeed's variables; any other kind is DDP, which Ray Train sets up. On
    CPU workers only DDP is offered: a DeepSpeed config named there is refused."""
    path = Path(config_path) if config_path else DEFAULT_ACCELERATE_CONFIG
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if settings.get("distributed_type") != "DEEPSPEED":
        return {}
    if not use_gpu:
        if config_path is None:  # the shipped default is for GPUs: CPU workers train with DDP
            return {}
        raise ClusterError(
            f"train.accelerate_config={config_path!r} asks for DeepSpeed, which metareward runs on GPU "
            "workers only; the cluster's training workers have no GPU (cluster.train_gpus_per_worker)"
        )
    deepspeed = settings.get("deepspeed_config") or {}
    names = {
        "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
        "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
        "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
        "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    }
    env = {"ACCELERATE_USE_DEEPSPEED": "true"}
    for key, value in deepspeed.items():
        if key in names:  # accelerate writes the flags lower-case, and a file path as it is
            env[names[key]] = str(value) if key == "deepspeed_config_file" else str(value).lower()
    if "mixed_precision" in settings:
        env["ACCELERATE_MIXED_PRECISION"] = str(settings["mixed_precision"]).lower()
    return env


def _train_worker(job: dict) -> None:
    """A Ray Train worker: DDP is set up (RANK, WORLD_SIZE, LOCAL_RANK and the process group), and
    Trainer's accelerate state takes it from there."""
    os.environ.update(job["env"])
    if job["kind"] == "dpo":
        from metareward.training import run_job

        run_job(job["job_dir"])
    else:
        from metareward.align.trainer import align_judge

        align_judge(*job["args"], **job["kwargs"])


def train_job(cfg: ClusterConfig, accelerate_config: str | None, job: dict, storage: Path, name: str) -> None:
    """Run ``job`` (``{"kind": "dpo", "job_dir": ...}`` or ``{"kind": "align", "args", "kwargs"}``) on
    ``cluster.train_workers`` Ray Train workers; the run's files are its storage (``storage/name``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = cfg.train_gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    resources = {"CPU": cfg.train_cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={**job, "env": accelerate_env(accelerate_config, use_gpu=gpus > 0)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train_workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        # A failed training is not restarted by Ray: the loop reports it, and the same command resumes.
        run_config=RunConfig(
            storage_path=str(storage.absolute()), name=name, failure_config=FailureConfig(max_failures=0)
        ),
    )
    log.info("training on %d Ray Train worker(s), %s each", cfg.train_workers, resources)
    try:
        trainer.fit()
    except Exception as error:  # ray.train.TrainingFailedError: the worker's error is its message
        raise ClusterError(f"training on the cluster failed: {error}") from error


def align_on_cluster(
    cfg: Config, seed_dir: str, train: list, heldout: list, *, out_dir: Path, work_dir: Path
) -> dict:
    """alignment.align_judge as a Ray Train job (connecting to the cluster if this process is not);
    returns its result, read from the saved model's log. Ray Train's files go to ``work_dir/ray_train``."""
    started = connect(cfg.cluster)
    try:
        # The workers may start in another directory, on another node: absolute paths.
        seed = str(Path(seed_dir).absolute()) if Path(seed_dir).exists() else seed_dir
        options = {
            "out_dir": Path(out_dir).absolute(),
            "work_dir": Path(work_dir).absolute(),
            "trust_remote_code": cfg.model.trust_remote_code,
        }
        job = {"kind": "align", "args": [seed, cfg.align, train, heldout], "kwargs": options}
        train_job(cfg.cluster, cfg.train.accelerate_config, job, Path(work_dir) / layout.RAY_TRAIN, "align")
    finally:
        if started:
            shutdown()
    return read_json(Path(out_dir) / layout.TRAINING_LOG)["alignment"]


class RayEngines(Engines):
    """``cluster=ray``: engines as :class:`ReplicaPool` s on the cluster (an endpoint backend stays a
    client in this process), DPO and the judge alignment as Ray Train jobs."""

    @contextmanager
    def session(self) -> Iterator[None]:
        started = connect(self.cfg.cluster)
        try:
            yield
        finally:
            if started:
                shutdown()

    def start(self, seat: Seat, replicas: int | None = None, cached: bool = True) -> Generator:
        if seat.generator.backend == "openai":
            return super().start(seat, replicas, cached)
        cache_dir = self.cache_dir if cached else None
        return ReplicaPool(seat.model_dir, seat.model, seat.generator, cache_dir, self.cfg.cluster, replicas)

    def strong_judge(self, spec) -> Generator:
        # The strong judge runs in this process, as without Ray (behind an endpoint, a client).
        return Engines.start(self, self.strong_seat(spec))

    def train_dpo(self, model_dir, rows, out, *, job_dir, name, seed, on_log) -> None:
        from metareward.training import step_rows, write_job

        common = {"seed": seed, "trust_remote_code": self.cfg.model.trust_remote_code}
        write_job(model_dir, rows, self.cfg.train.dpo, out, job_dir=job_dir, **common)
        job = {"kind": "dpo", "job_dir": str(job_dir.absolute())}
        storage = (self.run_dir or job_dir.parent) / layout.RAY_TRAIN
        train_job(self.cfg.cluster, self.cfg.train.accelerate_config, job, storage, name)
        for row in step_rows(read_json(out / layout.TRAINING_LOG)):
            on_log(row)

    def align(self, seed_dir, train, heldout, *, out_dir, work_dir) -> dict:
        return align_on_cluster(self.cfg, seed_dir, train, heldout, out_dir=out_dir, work_dir=work_dir)
