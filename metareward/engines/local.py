"""Engines on this machine: which model directory and which backend serve each seat, and where training runs.

:class:`Engines` is the one seam between the run and its models. The loop, the evaluation and the
commands ask it for a generator for a role, the evaluator, the strong judge or the prompter, and for a
DPO or judge-alignment training; they never choose a model directory, a backend or a place themselves.
:func:`metareward.engines.engines_for` picks this class or the Ray one
(:class:`metareward.engines.cluster.RayEngines`); tests hand in a subclass with stand-in generators.

    engines = engines_for(cfg, run_dir)
    with engines.session():
        actor = engines.start(engines.seat(cfg.roles.actor, model_dir))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from metareward.compute.models import resolve_model
from metareward.config import Config, GeneratorConfig, ModelConfig, ModelSpec
from metareward.generation import Generator, make_generator
from metareward.store import layout


class ClusterError(RuntimeError):
    """The cluster cannot do what the run asks (too few resources, engines lost too often)."""


@dataclass(frozen=True)
class Seat:
    """What serves one seat (a role, the evaluator, the strong judge, the prompter): the model's
    directory (or, behind an endpoint, its served name), its model settings and its backend."""

    model_dir: str
    model: ModelConfig
    generator: GeneratorConfig

    def key(self) -> str:
        """Seats with equal keys can share one engine."""
        return json.dumps([self.model_dir, asdict(self.model), asdict(self.generator)], sort_keys=True)


class Engines:
    """Engines in this process; DPO inline or through ``accelerate launch`` (``train.launcher``).

    ``run_dir`` holds the answer cache of endpoint backends (``cache/``), so that a resumed run pays for
    no call twice; ``cache_dir`` overrides where that cache is (None: no cache)."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, cache_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.cache_dir = cache_dir if cache_dir is not None or run_dir is None else run_dir / layout.CACHE

    # --- which model, which backend ----------------------------------------------------------------

    def seed(self) -> str:
        """The seed model M_0's directory (``model.*``), converted or built on first use."""
        return resolve_model(self.cfg.model)

    def locate(self, model: ModelConfig, generator: GeneratorConfig, local_tokenizer: bool = True) -> str:
        """Where a model is: a directory, or behind an endpoint its served name. With ``local_tokenizer``
        a model kind that ships a tokenizer (the embedded or tiny model) is still resolved to its
        directory for counting tokens; without it, an endpoint model needs nothing local."""
        if generator.backend == "openai" and (model.kind == "hf" or not local_tokenizer):
            return model.path or ""
        return resolve_model(model)

    def seat(self, spec: ModelSpec | None, model_dir: str) -> Seat:
        """A seat's own model where it has one (``own_model``), else the run's model in ``model_dir``
        (M_{t-1} for a role, M_0 for the evaluator and the prompter) with ``model.*`` and ``generator.*``."""
        if spec is not None and spec.own_model:
            return Seat(self.locate(spec.model, spec.generator), spec.model, spec.generator)
        return Seat(model_dir, self.cfg.model, self.cfg.generator)

    # --- where ----------------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[None]:
        """The span in which engines and trainings may start (on a cluster: connected to it)."""
        yield

    def start(self, seat: Seat, replicas: int | None = None, cached: bool = True) -> Generator:
        """A generator serving ``seat``; on a cluster ``replicas`` engines (default ``cluster.replicas``)."""
        return make_generator(seat.model_dir, seat.model, seat.generator, self.cache_dir if cached else None)

    def for_roles(self, model_dir: str, roles: list[str]) -> tuple[dict[str, Generator], list[Generator]]:
        """A generator for each of ``roles`` (actor, judge, meta_judge) and the engines made: roles on the
        same seat share one (the paper's default: one engine for all three roles on M_{t-1})."""
        made: dict[str, Generator] = {}
        by_role = {}
        for role in roles:
            seat = self.seat(getattr(self.cfg.roles, role), model_dir)
            if seat.key() not in made:
                made[seat.key()] = self.start(seat)
            by_role[role] = made[seat.key()]
        return by_role, list(made.values())

    def strong_seat(self, spec: ModelSpec) -> Seat:
        """Escalation's stronger judge. Behind an endpoint it answers in text: nothing local is needed."""
        model_dir = self.locate(spec.model, spec.generator, local_tokenizer=False)
        return Seat(model_dir, spec.model, spec.generator)

    def strong_judge(self, spec: ModelSpec) -> Generator:
        return self.start(self.strong_seat(spec), replicas=1)

    # --- training -------------------------------------------------------------------------------

    def train_dpo(
        self,
        model_dir: str,
        rows: list[dict],
        out: Path,
        *,
        job_dir: Path,
        name: str,
        seed: int,
        on_log: Callable[[dict], None],
    ) -> None:
        """M_t in ``out``: DPO from ``model_dir`` (also the reference) on ``rows``. ``on_log`` gets each
        logged step (after the fact where training runs in other processes); ``job_dir`` holds the job's
        files where it runs elsewhere, ``name`` names it there."""
        from metareward.training import launch_dpo, step_rows, train_dpo

        train = self.cfg.train
        common = {"seed": seed, "trust_remote_code": self.cfg.model.trust_remote_code}
        if train.launcher == "accelerate":
            result = launch_dpo(
                model_dir,
                rows,
                train.dpo,
                out,
                job_dir=job_dir,
                accelerate_config=train.accelerate_config,
                **common,
            )
            for row in step_rows(result):  # the processes' log, after the fact
                on_log(row)
        else:
            train_dpo(model_dir, rows, train.dpo, out, on_log=on_log, **common)

    def align(self, seed_dir: str, train: list, heldout: list, *, out_dir: Path, work_dir: Path) -> dict:
        """The judge alignment (``align.*``) of ``seed_dir`` into ``out_dir``; its result dict."""
        from metareward.align.trainer import align_judge

        trust = self.cfg.model.trust_remote_code
        return align_judge(
            seed_dir,
            self.cfg.align,
            train,
            heldout,
            out_dir=out_dir,
            work_dir=work_dir,
            trust_remote_code=trust,
        )
