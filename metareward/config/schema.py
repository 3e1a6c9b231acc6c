"""The whole run's config (:class:`Config`, the root of the schema behind ``conf/config.yaml``) and the
sections of where a run's numbers go (``tracking``) and where its engines run (``cluster``).

Each default lives in these dataclasses, once; the YAML files set only what differs. Every other
section comes from the module that owns it (models, data, stages, evaluation, training).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from metareward.config.checks import Section, require, setting
from metareward.config.choices import CLUSTER_KINDS, PLACEMENT_STRATEGIES, TRACKING_MODES
from metareward.config.data import DataConfig
from metareward.config.evaluation import EvalConfig
from metareward.config.models import GeneratorConfig, ModelConfig, RolesConfig
from metareward.config.stages import ActorConfig, GuardsConfig, JudgeConfig, MetaJudgeConfig, PairsConfig
from metareward.config.training import AlignConfig, JudgeAlignmentConfig, TrainConfig


@dataclass
class TrackingConfig(Section):
    """Where numbers go besides metrics.json: W&B online, W&B offline (in the run directory), or nowhere."""

    # wandb: online (needs `wandb login`); offline: a W&B offline run under <run_dir>/wandb, syncable
    # later with `wandb sync`; none: metrics.json only.
    mode: str = setting("offline", TRACKING_MODES, says="must be one of")
    project: str = "metareward"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    # Rows of sample actor and judge pairs logged as W&B Tables each iteration.
    table_rows: int = setting(8, ">= 0")
    # Each iteration's pairs (a "dataset" artifact) and evaluation are W&B Artifacts of the run; M_t is
    # a "model" artifact by reference to its folder, or with its weights uploaded when this is true.
    upload_models: bool = False
    # The W&B group; empty: none, and a multirun's jobs share one named after the sweep's run_name.
    group: str | None = None


@dataclass
class ClusterConfig(Section):
    """``cluster=ray``: the run's generation engines are Ray actors and its training a Ray Train job, on a
    Ray cluster (``pip install metareward[ray]``; cluster.py). The loop stays the one process writing
    the run directory, so ``runs_dir`` must be on storage every node sees."""

    kind: str = setting("none", CLUSTER_KINDS, note="(cluster=ray)")
    # A running cluster ("auto": the one `ray start` made on this node; "ray://HEAD:10001": a remote
    # one); empty: start a local one inside this process.
    address: str | None = None
    # A local cluster's CPUs; empty: this machine's.
    local_cpus: int | None = setting(None, ">= 0", note="(or null: chosen for you)")
    # Engines per iteration for each model that generates (M_{t-1}, and each role on a model of its own);
    # a stage's chunks are dealt to them.
    replicas: int = setting(1, ">= 1")
    cpus_per_replica: float = setting(1.0, "> 0")
    # Empty: generator.vllm.tensor_parallel_size with generator=vllm, else none (the transformers
    # backend then runs on CPU).
    gpus_per_replica: int | None = setting(None, ">= 0", note="(or null: chosen for you)")
    # How the engines' placement group spreads them over nodes (Ray's strategies).
    placement_strategy: str = setting("PACK", PLACEMENT_STRATEGIES)
    # How long to wait for the cluster to have room for the engines before saying it has not.
    placement_timeout_s: float = setting(600.0, "> 0")
    # Engines lost during one stage (a dead node, an out-of-memory kill) that are replaced before the
    # stage gives up; a lost engine's chunk is made again on its replacement.
    max_restarts: int = setting(3, ">= 0")
    # Ray Train workers for DPO and the judge-alignment step (one process each, DDP or DeepSpeed as
    # train.accelerate_config says); gpus_per_worker empty: 1 when the cluster has GPUs, else 0 (gloo).
    train_workers: int = setting(1, ">= 1")
    train_cpus_per_worker: float = setting(1.0, "> 0")
    train_gpus_per_worker: int | None = setting(None, ">= 0", note="(or null: chosen for you)")

    def check(self) -> None:
        require(
            self.kind != "ray" or importlib.util.find_spec("ray") is not None,
            "kind",
            self.kind,
            "needs Ray, which is not installed: pip install 'metareward[ray]'",
        )


@dataclass
class Config(Section, root=True):
    """A whole run. ``metareward --cfg job`` prints it resolved."""

    run_name: str = "default"
    runs_dir: str = "runs"
    iterations: int = setting(2, ">= 1")
    seed: int = 0
    # Resuming with a config that differs from the run's config.yaml is refused unless this is true.
    allow_config_change: bool = False
    # Load no model; print per iteration and stage the generation calls and a bound on generated tokens.
    dry_run: bool = False
    # What the run returns to an optimising sweeper (hydra/sweeper=optuna): a dotted key of the last
    # iteration's metrics.json (e.g. eval_actor.win_rate); empty: the judge's accuracy on eval.select_by.
    objective: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    meta_judge: MetaJudgeConfig = field(default_factory=MetaJudgeConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    judge_alignment: JudgeAlignmentConfig = field(default_factory=JudgeAlignmentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def check(self) -> None:
        require(
            self.cluster.kind != "ray" or self.train.launcher == "inline",
            "train.launcher",
            self.train.launcher,
            "with cluster=ray training is a Ray Train job on cluster.train_workers; leave train.launcher "
            "inline (accelerate is for one machine without Ray)",
        )
        # "." and ".." would put the run's files into runs_dir itself or above it.
        plain = bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", "..")
        require(plain, "run_name", self.run_name, "a plain name")
