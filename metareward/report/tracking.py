"""Where numbers go besides ``metrics.json``: a W&B run (online or offline) or nowhere.

:func:`make_tracker` always returns an object with the same methods (``log``, ``log_table``,
``log_dpo_step``, ``finish``; also a context manager), so no caller branches on whether tracking is on.

One metareward run is one W&B run: its id is made once and kept in ``<run_dir>/wandb_run_id``;
a resumed metareward run reads it and continues that W&B run (``resume="allow"``). Offline data
lands in ``<run_dir>/wandb/offline-run-<time>-<id>/`` (one folder per process, all with the same
run id); ``wandb sync <run_dir>/wandb`` uploads them, the files of one run in order of start time.

Two x-axes share the run, as W&B custom step metrics (``define_metric``): iteration-level numbers
and tables are logged with ``iteration`` (0 = before iteration 1), DPO's per-step rows as
``dpo/<name>`` with ``dpo/global_step`` (optimiser steps counted across iterations) and
``dpo/iteration``. No explicit W&B ``step`` is passed: ``_step`` is W&B's own row counter.

The tables of an iteration (:func:`log_iteration_tables`) are built here from its files and metrics:
sample pairs (:func:`pair_rows`), guard alarms (:func:`alarm_rows`) and cascade curves.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from metareward.config import TrackingConfig
from metareward.store import layout
from metareward.store.layout import ACTOR_PAIRS, JUDGE_PAIRS
from metareward.store.records import read_jsonl, write_text

RUN_ID_FILE = layout.WANDB_RUN_ID
# The step metrics (x-axes) of iteration-level and of DPO-step rows.
ITERATION = "iteration"
DPO_PREFIX = "dpo/"
DPO_STEP = DPO_PREFIX + "global_step"
WANDB_MODES = {"offline": "offline", "wandb": "online"}
# Config keys that name a credential are never sent, whatever the caller passes ("max_new_tokens" is fine).
SECRET_KEY = re.compile(r"(^|[_.-])(api_?key|token|secret|password|passwd|credentials?)([_.-]|$)", re.I)
# The columns of an iteration's ``actor_pairs`` / ``judge_pairs`` and ``guard_alarms`` tables.
PAIR_COLUMNS = ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
ALARM_COLUMNS = ["guard", "value", "threshold", "reason"]


def flatten(metrics: dict, prefix: str = "") -> dict[str, float | int]:
    """``{"judge": {"mean_score": 3.5}}`` -> ``{"judge/mean_score": 3.5}``; numbers only (bools as 0/1).

    None, strings and lists (histograms) are left out.
    """
    flat: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool):
            flat[name] = int(value)
        elif isinstance(value, int | float):
            flat[name] = value
    return flat


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None: ...

    def log_dpo_step(self, iteration: int, global_step: int, row: dict) -> None: ...

    def log_artifact(self, artifact: ArtifactSpec) -> None: ...

    def finish(self) -> None: ...

    def __enter__(self) -> Tracker: ...

    def __exit__(self, *exc_info) -> None: ...


@dataclass(frozen=True)
class ArtifactSpec:
    """A W&B Artifact of the run: ``files`` uploaded (name in the artifact: path), ``references`` only
    pointed at (``file://`` URIs: a model stays where it is), under ``aliases`` (e.g. ``iter_2``)."""

    name: str
    kind: str
    files: dict[str, Path] = field(default_factory=dict)
    references: dict[str, Path] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)


def _artifact_name(run_name: str, what: str) -> str:
    return re.sub(r"[^\w.-]", "-", f"{run_name}-{what}")


def iteration_artifacts(
    run_name: str, directory: Path, iteration: int, upload_models: bool
) -> list[ArtifactSpec]:
    """Iteration ``iteration``'s artifacts (``directory`` is its ``iter_<t>``): its pairs with their
    dataset card (type ``dataset``), its evaluation (``evaluation``), and M_t (``model``: a reference
    to the folder, or the folder itself with ``upload_models``); one version per iteration, aliased
    ``iter_<t>``."""
    alias = (f"iter_{iteration}",)
    pair_files = [layout.ACTOR_PAIRS, layout.JUDGE_PAIRS, layout.DATASET_CARD]
    pairs = {name: directory / name for name in pair_files if (directory / name).is_file()}
    trained = directory / layout.TRAIN_JOB / layout.JOB_PAIRS
    if trained.is_file():
        pairs[f"{layout.TRAIN_JOB}/{layout.JOB_PAIRS}"] = trained
    meta = {"iteration": iteration}
    found = [ArtifactSpec(_artifact_name(run_name, "pairs"), "dataset", pairs, aliases=alias, metadata=meta)]
    if (directory / layout.EVAL).is_file():
        files = {layout.EVAL: directory / layout.EVAL}
        found.append(
            ArtifactSpec(_artifact_name(run_name, "eval"), "evaluation", files, aliases=alias, metadata=meta)
        )
    model = directory / layout.MODEL
    if model.is_dir():
        kept = {"files": {"": model}} if upload_models else {"references": {layout.MODEL: model}}
        found.append(
            ArtifactSpec(_artifact_name(run_name, "model"), "model", aliases=alias, metadata=meta, **kept)
        )
    return found


def seed_eval_artifact(run_name: str, eval_path: Path) -> ArtifactSpec:
    """M_0's evaluation (``eval_0.json``), the first version of the run's evaluation artifact."""
    return ArtifactSpec(
        _artifact_name(run_name, "eval"),
        "evaluation",
        {layout.EVAL: eval_path},
        aliases=("iter_0",),
        metadata={"iteration": 0},
    )


class NullTracker:
    """Tracking off (``tracking.mode=none``): every method does nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def log_dpo_step(self, iteration: int, global_step: int, row: dict) -> None:
        pass

    def log_artifact(self, artifact: ArtifactSpec) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.finish()


def stable_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from ``wandb_run_id``, or made and stored (atomically) once."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file() and (run_id := path.read_text(encoding="utf-8").strip()):
        return run_id
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    write_text(path, run_id + "\n")
    return run_id


def wandb_mode(mode: str) -> str:
    """W&B's mode for ``tracking.mode``; ``WANDB_MODE=offline|disabled`` may turn it down, never up."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled"
    return "offline" if env in ("offline", "dryrun") else WANDB_MODES[mode]


def _without_secrets(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {
            key: _without_secrets(value) for key, value in tree.items() if not SECRET_KEY.search(str(key))
        }
    return tree


def _histograms(metrics: dict, prefix: str = "") -> dict[str, list]:
    """Lists of bin counts under keys naming a histogram, by flattened key."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            found.update(_histograms(value, f"{prefix}{key}/"))
        elif isinstance(value, list) and "histogram" in str(key):
            found[f"{prefix}{key}"] = value
    return found


class TrackingError(RuntimeError):
    """W&B could not start the run; the message says what to do."""


class WandbTracker:
    """A W&B run: ``log`` flattens nested metrics to ``"judge/mean_score"`` keys at an iteration,
    ``log_dpo_step`` logs one DPO optimiser step as ``"dpo/loss"``... at a global step."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict):
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = stable_run_id(run_dir)
        try:
            self.run = self._init(cfg, run_dir, run_name, config)
        except wandb.errors.UsageError as error:  # e.g. tracking=wandb without `wandb login`
            raise TrackingError(
                f"W&B refused to start ({error}); log in with `wandb login`, or use tracking=offline"
            ) from None
        self._finished = False
        # Each key's step metric, defined (once per process: a resumed run defines them again) before
        # the key is first logged. Keys are named one by one, not by glob, so no two definitions overlap.
        self._step_metric: dict[str, str | None] = {}
        self._define([ITERATION, DPO_STEP], None)

    def _init(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict):
        wandb = self._wandb
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            mode=wandb_mode(cfg.mode),
            config=_without_secrets(config),
            tags=list(cfg.tags) or None,
            group=cfg.group,
            # A resumed run may have been started with another config (allow_config_change).
            allow_val_change=True,
            # Our run object is used directly, so another active run in the process is left alone.
            reinit="create_new",
        )

    def _define(self, keys, step_metric: str | None) -> None:
        for key in keys:
            if key not in self._step_metric:
                self._step_metric[key] = step_metric
                if step_metric is None or key == step_metric:
                    self.run.define_metric(key)
                else:
                    self.run.define_metric(key, step_metric=step_metric)

    def log(self, metrics: dict, step: int) -> None:
        """Log every number in ``metrics`` (nested dicts allowed) at iteration ``step`` (0 = before
        iteration 1), which is logged as ``iteration``.

        A list under a key containing "histogram" is bin counts over unit bins from 0 (the judge's
        score bins) and is logged as a ``wandb.Histogram``. Numbers also go into the run summary.
        """
        flat = {**flatten(metrics), ITERATION: step}
        payload: dict[str, Any] = dict(flat)
        for key, counts in _histograms(metrics).items():
            edges = list(range(len(counts) + 1))
            payload[key] = self._wandb.Histogram(np_histogram=(list(counts), edges))
        self._define(payload, ITERATION)
        self.run.log(payload)
        self.run.summary.update(flat)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table of ``rows`` at iteration ``step``."""
        self._define([name], ITERATION)
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table, ITERATION: step})

    def log_dpo_step(self, iteration: int, global_step: int, row: dict) -> None:
        """One DPO optimiser step: every number in ``row`` (TRL's log row: ``loss``, ``rewards/margins``,
        ..., ``step_seconds``) as ``dpo/<name>``, at ``dpo/global_step`` = ``global_step`` (steps of
        all iterations so far, this one included), with ``dpo/iteration``. The row's ``step`` (within
        the iteration) becomes ``dpo/iteration_step``."""
        flat = flatten(row)
        if "step" in flat:
            flat["iteration_step"] = flat.pop("step")
        payload = {DPO_PREFIX + key: value for key, value in flat.items()}
        payload[DPO_STEP] = global_step
        payload[DPO_PREFIX + "iteration"] = iteration
        self._define(payload, DPO_STEP)
        self.run.log(payload)

    def log_artifact(self, artifact: ArtifactSpec) -> None:
        """``artifact`` as a W&B Artifact logged by (and linked to) this run; offline, it is kept in the
        run's files and uploaded by ``wandb sync`` with them."""
        made = self._wandb.Artifact(artifact.name, type=artifact.kind, metadata=artifact.metadata)
        for name, path in artifact.files.items():
            if path.is_dir():
                made.add_dir(str(path), name=name)
            elif path.is_file():
                made.add_file(str(path), name=name)
        for name, path in artifact.references.items():
            # No checksum: a model's weights are not read just to be pointed at.
            made.add_reference(Path(path).resolve().as_uri(), name=name, checksum=False)
        self.run.log_artifact(made, aliases=list(artifact.aliases) or None)

    def finish(self, exit_code: int | None = None) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def make_tracker(cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict) -> Tracker:
    """The tracker ``cfg.mode`` asks for: W&B online (``wandb``), W&B offline, or none."""
    if cfg.mode == "none":
        return NullTracker()
    return WandbTracker(cfg, run_dir, run_name, config)


def log_cascade_curves(tracker, evaluated: dict, step: int) -> None:
    """Each suite and protocol's cascade curve (eval.escalation) as a W&B table
    ``escalation_curve/<suite>/<protocol>``: the signal's points and random's, one row each."""
    columns = ["curve", "fraction", "accuracy", "cost_usd", "escalated", "strong_tokens"]
    for suite, protocols in evaluated.items():
        for protocol, metrics in protocols.items():
            found = metrics.get("escalation") if isinstance(metrics, dict) else None
            if not found:
                continue
            rows = [
                [name, *(point[key] for key in columns[1:])]
                for name, key in ((found["signal"], "curve"), ("random", "random_curve"))
                for point in found[key]
            ]
            tracker.log_table(f"escalation_curve/{suite}/{protocol}", columns, rows, step=step)


def pair_rows(pairs: list[dict]) -> list[list]:
    """One row of :data:`PAIR_COLUMNS` per DPO pair (a row of ``actor_pairs.jsonl`` or
    ``judge_pairs.jsonl``): the prompt's last message, the chosen and rejected texts, their scores."""
    return [
        [
            r["prompt"][-1]["content"],
            r["chosen"][0]["content"],
            r["rejected"][0]["content"],
            r["chosen_score"],
            r["rejected_score"],
        ]
        for r in pairs
    ]


def alarm_rows(metrics: dict) -> list[list]:
    """One row of :data:`ALARM_COLUMNS` per guard alarm in an iteration's metrics (none: no rows)."""
    alarms = metrics.get("guards", {}).get("alarms", [])
    return [[a["guard"], a["value"], a["threshold"], a["reason"]] for a in alarms]


def log_iteration_tables(tracker, directory: Path, metrics: dict, step: int, limit: int) -> None:
    """The tables of a finished iteration (its ``directory`` and ``metrics.json``'s ``metrics``) at
    iteration ``step``, in this order: ``actor_pairs`` and ``judge_pairs`` (the first ``limit`` pairs
    of each, ``tracking.table_rows``), each suite and protocol's cascade curve
    (:func:`log_cascade_curves`), and ``guard_alarms`` (logged, empty, without alarms too)."""
    for role, name in (("actor", ACTOR_PAIRS), ("judge", JUDGE_PAIRS)):
        pairs = read_jsonl(Path(directory) / name)[:limit]
        tracker.log_table(f"{role}_pairs", list(PAIR_COLUMNS), pair_rows(pairs), step=step)
    log_cascade_curves(tracker, metrics.get("eval", {}), step=step)
    tracker.log_table("guard_alarms", list(ALARM_COLUMNS), alarm_rows(metrics), step=step)
