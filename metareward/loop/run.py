"""Iterations and resume: the one place that decides the order of work.

Iteration t uses M_{t-1} (M_0 = the seed) in all three roles and trains M_t from it:
prompts -> actor -> judge -> meta-judge -> pairs -> DPO. A stage whose file is complete is
skipped on resume; an iteration is finished once its ``metrics.json`` exists. Every generator and
training comes from the run's engines (:mod:`metareward.engines`); the stages, pairs and synthesis
write their own files, named in :mod:`metareward.store.layout`.

    Run(config).run()    # config: metareward.config.Config, e.g. from load_config(None, overrides)
    Run(config, engines=my_engines).run()    # other engines (e.g. stand-ins in tests)

Over 400 lines: the order of work reads top to bottom here, and splitting ``Run`` would scatter it.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from metareward import report
from metareward.align.data import ALIGN_METRICS, align_paths, load_align_split
from metareward.compute.models import check_models
from metareward.config import Config, ConfigError
from metareward.data import fit_to_model, load_prompts, prompts_for_iteration, reuse_notice, to_prompt_rows
from metareward.engines import ClusterError, Engines, engines_for
from metareward.generation import Generator, Usage
from metareward.judging import escalation
from metareward.judging.evaluation import evaluate_model, load_suites
from metareward.judging.exports import write_heldout_exports
from metareward.judging.heldout import load_heldout_prompts
from metareward.judging.prompts import Templates
from metareward.loop import guards, pairs, stages, synthesis
from metareward.loop.dataset_card import played_by, write_dataset_card
from metareward.loop.metrics import iteration_metrics
from metareward.loop.model_card import write_model_card
from metareward.report import tracking
from metareward.report.runs import metric_at, num
from metareward.report.tracking import make_tracker
from metareward.store import layout, records, runlock
from metareward.store.layout import iter_dir
from metareward.store.records import ChunkedFile, read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

ROLE_FILES = {"actor": layout.RESPONSES, "judge": layout.JUDGEMENTS, "meta_judge": layout.META_JUDGEMENTS}
# Settings that may change between a run and its resumption without changing any finished work.
RESUMABLE_CHANGES = {
    "iterations",
    "allow_config_change",
    "generator.progress",
    "generator.device",
    # Synthesis chunks depend on their index only, so a larger budget goes on from the ones written.
    "data.synthetic.request_budget",
    # What the run returns to a sweeper.
    "objective",
}
# Guards only decide whether the run goes on: a rerun with guards.on_alarm=warn goes past a stop. Where
# engines run changes no row (a run may resume on a cluster, or off it); the number of training
# processes does change what DPO averages over, so it is not among them.
RESUMABLE_PREFIXES = ("guards.", "cluster.")
UNRESUMABLE = {"cluster.train_workers"}
# How an endpoint is reached and paced, wherever one is configured (generator.openai.*, a role's, a strong
# judge's): an endpoint that moved, or a longer timeout, changes no answer (the cache key leaves them out).
CONNECTION_SETTINGS = {
    "base_urls",
    "api_key_env",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_in_flight",
    "requests_per_minute",
    "tokens_per_minute",
}


def resumable(key: str) -> bool:
    """Whether the setting ``key`` (dotted) may change between a run and its resumption."""
    if key in UNRESUMABLE:
        return False
    parts = key.split(".")
    endpoint = (
        len(parts) >= 3 and parts[-3:-1] == ["generator", "openai"] and parts[-1] in CONNECTION_SETTINGS
    )
    return key in RESUMABLE_CHANGES or key.startswith(RESUMABLE_PREFIXES) or endpoint


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. an iteration produced no preference pairs); the message says why."""


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def check_run_config(run_dir: Path, cfg: Config) -> None:
    """Write the run's config.yaml once; on resume refuse a changed config unless allowed."""
    path = run_dir / layout.CONFIG
    if path.is_file():
        # A setting newer than the saved file reads as its default there: a run started before the
        # setting existed resumes unless the setting was changed from it.
        saved = {**_flatten(asdict(Config())), **_flatten(OmegaConf.to_container(OmegaConf.load(path)))}
        current = _flatten(asdict(cfg))
        changed = sorted(
            key
            for key in saved.keys() | current.keys()
            if not resumable(key) and saved.get(key) != current.get(key)
        )
        if changed and not cfg.allow_config_change:
            listing = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise RunStopped(
                f"{run_dir} was started with another config ({listing}); "
                "use another run_name, or allow_config_change=true to go on anyway"
            )
        if not changed:
            return
    records.write_text(path, config_yaml(cfg))


def _no_pairs_reason(stats: dict) -> str:
    actor = stats["actor"]
    reasons = [
        f"{key.removeprefix('skipped_').replace('_', ' ')}: {value} prompt(s)"
        for key, value in actor.items()
        if key.startswith("skipped_") and value
    ]
    return "; ".join(reasons) or "no prompts"


def check_run_models(cfg: Config) -> None:
    """Refuse, before the run starts, settings that would have it judged by anything but the models it
    trains: recorded verdicts (metareward-eval-judge's), and endpoints serving one fixed model in place
    of M_t (:func:`check_endpoint_models`)."""
    for key in ("judge", "strong"):
        if (value := getattr(cfg.eval.recorded, key)) is not None:
            raise ConfigError(
                f"eval.recorded.{key}",
                value,
                "is for metareward-eval-judge: a run evaluates each model it trains",
            )
    check_endpoint_models(cfg)


def check_endpoint_models(cfg: Config) -> None:
    """Refuse a run that would have an endpoint answer for a model it cannot serve: with
    ``generator=openai`` every role without a model of its own, and the evaluation of M_t, are sent to
    servers started on one fixed model (the seed), while the run asks them for M_1, M_2, ... A role's own
    model, the evaluator and a strong judge behind an endpoint are fixed models, and unaffected."""
    if cfg.generator.backend != "openai":
        return
    plays = [role for role in ("actor", "judge", "meta_judge") if not getattr(cfg.roles, role).own_model]
    served = cfg.generator.openai.model or cfg.model.path or "the seed model"
    where = iter_dir(Path(cfg.runs_dir) / cfg.run_name, 1) / layout.MODEL
    then = (
        f"run iterations=1, serve M_1 ({where}) and start the next run from it (model.path=<M_1> "
        f"generator.openai.model=<its served name>), or use generator=hf or generator=vllm, which load "
        f"each M_t themselves"
    )
    if plays and cfg.iterations >= 2:
        raise ConfigError(
            "iterations",
            cfg.iterations,
            f"from iteration 2 the {', '.join(plays)} role(s) are played by M_1, but generator=openai "
            f"sends them to endpoints serving one fixed model ({served}); {then}",
        )
    if cfg.eval.enabled:
        raise ConfigError(
            "eval.enabled",
            True,
            f"the evaluation after iteration 1 is of M_1, but generator=openai sends it to endpoints "
            f"serving one fixed model ({served}); set eval.enabled=false (then evaluate each model with "
            "metareward-eval-judge), or use generator=hf or generator=vllm",
        )
    if plays and cfg.judge_alignment.enabled:
        raise ConfigError(
            "judge_alignment.enabled",
            True,
            f"the roles of iteration 1 are played by the aligned seed, but generator=openai sends them to "
            f"endpoints serving one fixed model ({served}); align with metareward-align-judge first, serve "
            "the aligned model and start the run from it",
        )


def check_writable(run_dir: Path) -> None:
    """Fail before any model loads if the run directory cannot be created or written."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunStopped(f"cannot write to the run directory {run_dir}: {error.strerror or error}") from None


@contextmanager
def spending(generator: Generator | None, usage: dict, role: str):
    """Record in ``usage[role]`` what ``generator`` spends inside the block (nothing for a stage found
    finished on disk, which has no generator)."""
    before = generator.usage.copy() if generator else Usage()
    yield
    usage[role] = (generator.usage if generator else Usage()).since(before)


class Run:
    """One metareward run directory, driven iteration by iteration."""

    def __init__(self, cfg: Config, engines: Engines | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / cfg.run_name
        # Every generator and training of the run comes from here (tests hand in stand-ins).
        self.engines = engines or engines_for(cfg, self.dir)
        self.templates = Templates.load(
            cfg.judge.template, cfg.meta_judge.template, cfg.eval.pairwise_template
        )

    def run(self) -> list[dict]:
        """Run (or resume) iterations 1..T; returns each iteration's metrics. The run directory is
        locked for the whole run: a second process on it is refused (runlock.RunLocked)."""
        check_writable(self.dir)
        with runlock.hold(self.dir):
            # Holding the lock proves every earlier writer of the directory gone: its temp files are stale.
            records.remove_stale_temps(self.dir)
            try:
                with self.engines.session():
                    return self._run_locked()
            except ClusterError as error:  # one line: what the cluster cannot do, and what to change
                raise RunStopped(str(error)) from None

    def _run_locked(self) -> list[dict]:
        cfg = self.cfg
        # Bad prompts or a bad model path fail before config.yaml exists: a run that never started
        # leaves no config that would then refuse the corrected one.
        all_prompts = load_prompts(cfg.data)
        try:
            check_models(cfg)
            check_run_models(cfg)
        except ConfigError as error:
            raise RunStopped(str(error)) from None
        if cfg.eval.enabled:
            load_suites(cfg.eval)  # a bad suite file fails here, not after minutes of generation
        if cfg.judge_alignment.enabled:
            alignment_rows = load_align_split(cfg)  # so do bad alignment rows
        self.seed_dir = model_dir = self.engines.seed()
        check_run_config(self.dir, cfg)
        history = []
        with make_tracker(cfg.tracking, self.dir, cfg.run_name, asdict(cfg)) as tracker:
            if cfg.judge_alignment.enabled:
                self.seed_dir = model_dir = self._aligned_seed(model_dir, alignment_rows, tracker)
            if cfg.data.kind == "synthetic":  # the prompter writes from the seed set loaded above
                all_prompts = self._prompt_pool(all_prompts, model_dir, tracker)
            if cfg.eval.enabled and not (self.dir / layout.EVAL_0).is_file():
                # M_0's judge skill is the baseline every later iteration is compared with.
                write_json(self.dir / layout.EVAL_0, self._evaluate(model_dir, iteration=0))
                judge_0 = records.read_json(self.dir / layout.EVAL_0)["judge"]
                tracker.log({"eval": judge_0}, step=0)
                tracking.log_cascade_curves(tracker, judge_0, step=0)
                tracker.log_artifact(tracking.seed_eval_artifact(cfg.run_name, self.dir / layout.EVAL_0))
            if cfg.eval.enabled:
                judge_0 = records.read_json(self.dir / layout.EVAL_0)["judge"]
                log.info("\n".join(["== the seed model M_0 ==", *report.eval_lines(judge_0)]))
            for t in range(1, cfg.iterations + 1):
                directory = iter_dir(self.dir, t)
                if not (directory / layout.METRICS).is_file():
                    chosen = prompts_for_iteration(all_prompts, t, cfg.data.prompts_per_iteration, cfg.seed)
                    if notice := reuse_notice(len(all_prompts), t, cfg.data.prompts_per_iteration):
                        log.warning("metareward: %s", notice)
                    self._iteration(t, directory, model_dir, chosen, tracker)
                    self._track(tracker, t, directory)
                metrics = records.read_json(directory / layout.METRICS)
                history.append(metrics)
                log.info("%s\n%s", report.summary(metrics), report.sample(directory))
                model_dir = str(directory / layout.MODEL)
        if cfg.eval.enabled:
            self._select_best(history)
        return history

    def _aligned_seed(self, seed_dir: str, rows: tuple[list, list], tracker) -> str:
        """The EFT step: the seed trained as a judge toward human label distributions (``align.*``),
        once; the aligned model is M_0 for every role. Its metrics are in align/metrics.json."""
        from metareward.align.trainer import result_lines

        work_dir, model_dir = align_paths(self.cfg)
        metrics_path = work_dir / ALIGN_METRICS
        saved_log = model_dir / layout.TRAINING_LOG
        if not metrics_path.is_file() and saved_log.is_file():  # killed between the model and its metrics
            write_json(metrics_path, {**records.read_json(saved_log)["alignment"], "seed_model": seed_dir})
        if not metrics_path.is_file():
            log.info("== aligning the seed model as a judge (%s objective) ==", self.cfg.align.objective)
            result = self.engines.align(seed_dir, *rows, out_dir=model_dir, work_dir=work_dir)
            write_json(metrics_path, {**result, "seed_model": seed_dir})
            tracker.log({"align": {"heldout": result["heldout"], "train": result["train"]}}, step=0)
        result = records.read_json(metrics_path)
        log.info("\n".join(["== the aligned seed model (M_0) ==", *result_lines(result)]))
        return result["model_dir"]

    def _select_best(self, history: list[dict]) -> None:
        """``best.json``: the iteration (0 = M_0) whose judge is most accurate on ``eval.select_by`` (the
        first suite and protocol by default); the earliest among equals."""
        evaluated = [records.read_json(self.dir / layout.EVAL_0)["judge"], *(m["eval"] for m in history)]
        suite, protocol = select_key(self.cfg, evaluated[0])
        scored = [(t, e.get(suite, {}).get(protocol, {})) for t, e in enumerate(evaluated)]
        scored = [(t, m) for t, m in scored if m.get("accuracy") is not None]
        if not scored:
            return
        t, m = max(scored, key=lambda item: (item[1]["accuracy"], -item[0]))
        model = self.seed_dir if t == 0 else str(iter_dir(self.dir, t) / layout.MODEL)
        best = {"iteration": t, "model": model, "select_by": f"{suite}/{protocol}"}
        write_json(self.dir / layout.BEST, {**best, **{k: m[k] for k in ("accuracy", "ci_low", "ci_high")}})
        log.info(
            "best judge: iteration %d (%s/%s accuracy %.3f), %s", t, suite, protocol, m["accuracy"], model
        )

    def _iteration(
        self, t: int, directory: Path, model_dir: str, chosen_prompts: list[dict], tracker
    ) -> None:
        cfg = self.cfg
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / layout.PROMPTS).is_file():
            fitted, counts = fit_to_model(
                chosen_prompts, model_dir, cfg.data, cfg.actor.max_new_tokens, cfg.model.trust_remote_code
            )
            write_json(directory / layout.PROMPT_FIT, counts)
            records.write_stage_file(directory / layout.PROMPTS, fitted)
        try:
            prompts = records.read_stage_file(directory / layout.PROMPTS)
        except records.RecordError as error:
            raise RunStopped(str(error)) from None
        if not prompts:
            raise RunStopped(
                f"iteration {t} has no prompts that fit the model's context "
                f"({records.read_json(directory / layout.PROMPT_FIT)}); "
                "see data.max_prompt_tokens and data.long_prompts"
            )

        # A generator for each role whose stage still has work (None for a stage finished on disk).
        pending = [role for role, name in ROLE_FILES.items() if not (directory / name).is_file()]
        generators, engines = self.engines.for_roles(model_dir, pending)
        escalations = escalation.for_iteration(self.cfg, t, self.engines.strong_judge)
        usage: dict[str, dict] = {}
        try:
            actor, judge, meta_judge = (generators.get(role) for role in ROLE_FILES)
            with spending(actor, usage, "actor"):
                responses = stages.actor(
                    self._context(actor, t), prompts, cfg.actor, ChunkedFile(directory / layout.RESPONSES)
                )
            with spending(judge, usage, "judge"):
                judgements = stages.judge(
                    self._context(judge, t),
                    prompts,
                    responses,
                    cfg.judge,
                    ChunkedFile(directory / layout.JUDGEMENTS),
                    escalations.get("judge"),
                )
            with spending(meta_judge, usage, "meta_judge"):
                verdicts = stages.meta_judge(
                    self._context(meta_judge, t),
                    prompts,
                    responses,
                    # Over-long judgements are unusable (pairs.max_judgement_tokens): never compared.
                    pairs.within_token_limit(judgements, cfg.pairs.max_judgement_tokens),
                    cfg.meta_judge,
                    ChunkedFile(directory / layout.META_JUDGEMENTS),
                    escalations.get("meta_judge"),
                )
        finally:
            # The engines give their (GPU) memory back before training starts.
            for engine in engines:
                engine.close()
            for role, esc in escalations.items():
                usage[f"{role}_strong"] = esc.strong.usage().since(Usage())
                esc.strong.close()

        try:
            records.check_stage_files(directory)
        except records.RecordError as error:  # finished work no longer fits together: stop, do not guess
            raise RunStopped(str(error)) from None
        actor_rows, judge_rows, pair_stats = pairs.build_pairs(
            directory, cfg.pairs.rho_for(t), cfg.pairs.elo_l2, self.templates.judge_messages, cfg.pairs
        )
        if not ((directory / layout.ACTOR_PAIRS).is_file() and (directory / layout.JUDGE_PAIRS).is_file()):
            pairs.write_pairs(directory, actor_rows, judge_rows)
        guard = self._guard(t, responses, judgements, verdicts, tracker)
        # What is trained is what is on disk: pairs rebuilt there (metareward-pairs) since count.
        actor_rows = read_jsonl(directory / layout.ACTOR_PAIRS)
        judge_rows = read_jsonl(directory / layout.JUDGE_PAIRS)
        pair_stats["actor"]["pairs"], pair_stats["judge"]["pairs"] = len(actor_rows), len(judge_rows)
        train_judge = t in cfg.train.judge_iterations
        rows = actor_rows + (judge_rows if train_judge else [])
        # Exactly what DPO trains on, whichever launcher runs it; then the card naming the files.
        from metareward.training import trained_rows  # with TRL: imported only where it trains

        job_pairs = directory / layout.TRAIN_JOB / layout.JOB_PAIRS
        if rows:
            write_jsonl(job_pairs, trained_rows(rows))
        else:
            job_pairs.unlink(missing_ok=True)
        write_dataset_card(directory, cfg, t, played_by(cfg, self.dir, t))
        if rows:
            training = self._train(model_dir, rows, directory, t, tracker)
        else:
            reason = (
                f"iteration {t} produced no preference pairs ({_no_pairs_reason(pair_stats)}); "
                f"see {directory} for the responses and judgements"
            )
            if cfg.train.on_no_pairs == "stop":
                raise RunStopped(reason + "; train.on_no_pairs=carry would go on with the model unchanged")
            log.warning("metareward: %s; M_%d = M_%d (train.on_no_pairs=carry)", reason, t, t - 1)
            training = carry_forward(model_dir, directory / layout.MODEL, reason)

        if cfg.eval.enabled and not (directory / layout.EVAL).is_file():
            write_json(directory / layout.EVAL, self._evaluate(str(directory / layout.MODEL), iteration=t))
        evaluated = records.read_json(directory / layout.EVAL) if cfg.eval.enabled else {}
        metrics = {
            "iteration": t,
            "prompts": len(prompts),
            "prompt_fit": records.read_json(directory / layout.PROMPT_FIT)
            if (directory / layout.PROMPT_FIT).is_file()
            else {},
            **iteration_metrics(
                prompts, responses, judgements, verdicts, actor_rows, judge_rows, pair_stats, training
            ),
            # TRL's own log, step by step, beside the summary numbers above.
            "train_log": training["log_history"],
            "pairs": {**pair_stats, "rho": cfg.pairs.rho_for(t), "trained_on_judge_pairs": train_judge},
            "guards": guard,
            "escalation": escalation.iteration_metrics(directory, escalations),
            "eval": evaluated.get("judge", {}),
            "eval_actor": evaluated.get("actor", {}),
            # Generation spent by each stage in the invocation that ran it (0 for a stage found on disk),
            # and by each stage's strong judge (judge_strong, meta_judge_strong) where it escalates.
            "usage": {
                role: usage.get(role, Usage().since(Usage()))
                for role in [*ROLE_FILES, *(f"{role}_strong" for role in escalations)]
            },
        }
        write_model_card(directory / layout.MODEL, cfg, t, model_dir, metrics)
        write_json(directory / layout.METRICS, metrics)

    def _guard(self, t: int, responses: list, judgements: list, verdicts: list, tracker) -> dict:
        """Iteration t's guard values and alarms (guards.py), against the previous iteration's values;
        an alarm is logged, or with guards.on_alarm=stop ends the run before the iteration trains."""
        previous = iter_dir(self.dir, t - 1) / layout.METRICS
        prior = records.read_json(previous).get("guards") if t > 1 and previous.is_file() else None
        values = guards.guard_values(responses, judgements, verdicts, prior)
        guard = guards.with_alarms(values, self.cfg.guards)
        if guard["alarms"] and self.cfg.guards.on_alarm == "stop":
            tracker.log({"guards": guard}, step=t)
            raise RunStopped(guards.stop_reason(t, guard["alarms"]))
        for alarm in guard["alarms"]:
            log.warning("metareward: iteration %d guard alarm: %s", t, alarm["reason"])
        return guard

    def _prompt_pool(self, seeds: list[dict], seed_dir: str, tracker) -> list[dict]:
        """data=synthetic: the run's prompt pool, written by the prompter (M_0, unless roles.prompter has
        a model of its own) the first time, read back after."""
        cfg = self.cfg
        if not synthesis.pool_complete(self.dir):
            seat = self.engines.seat(cfg.roles.prompter, seed_dir)
            generator, chunk_size = self.engines.start(seat), seat.generator.chunk_size
            try:
                synthesis.build_pool(generator, seeds, cfg.data.synthetic, self.dir, cfg.seed, chunk_size)
            except synthesis.SynthesisError as error:
                raise RunStopped(str(error)) from None
            finally:
                generator.close()
            tracker.log({"prompt_pool": synthesis.read_pool(self.dir)[1]}, step=0)
        rows, stats = synthesis.read_pool(self.dir)
        left_out = ", ".join(f"{reason} {n}" for reason, n in stats["left_out"].items() if n) or "none"
        log.info(
            "prompt pool: %d prompts from %d requests (left out: %s)",
            stats["kept"],
            stats["requests"],
            left_out,
        )
        return to_prompt_rows(rows, str(self.dir / synthesis.POOL))

    def _context(self, generator: Generator | None, t: int) -> stages.StageContext:
        return stages.StageContext(generator, self.templates, self.cfg.seed, t, self.cfg.generator.chunk_size)

    def _track(self, tracker, t: int, directory: Path) -> None:
        metrics = records.read_json(directory / layout.METRICS)
        tracker.log(metrics, step=t)
        tracking.log_iteration_tables(tracker, directory, metrics, step=t, limit=self.cfg.tracking.table_rows)
        upload = self.cfg.tracking.upload_models
        for artifact in tracking.iteration_artifacts(self.cfg.run_name, directory, t, upload):
            tracker.log_artifact(artifact)

    def _evaluate(self, model_dir: str, iteration: int) -> dict:
        """Judge-human agreement of M_``iteration`` and, after iteration 1.., its actor's win rate
        against M_0 on held-out prompts, judged by the fixed evaluator."""
        baseline = None
        if iteration > 0:
            baseline = records.read_json(self.dir / layout.EVAL_0)["heldout_responses"]
        result = evaluate_model(
            self.cfg, self.engines, model_dir, self.seed_dir, iteration, self.templates, baseline
        )
        if result["heldout_responses"]:
            # M_t's answers for alpaca_eval and MT-Bench's judge, to score it elsewhere.
            prompts = load_heldout_prompts(self.cfg.eval.heldout_prompts, self.cfg.eval.num_heldout)
            name = f"{self.cfg.run_name}-M_{iteration}"
            write_heldout_exports(
                layout.heldout_dir(self.dir, iteration), prompts, result["heldout_responses"], name
            )
        return result

    def _train(self, model_dir: str, rows: list[dict], directory: Path, t: int, tracker) -> dict:
        out = directory / layout.MODEL
        if not (out / "config.json").is_file():
            # W&B's DPO series counts optimiser steps across iterations, so iterations stay apart.
            offset = self._steps_before(t)

            def on_log(row: dict) -> None:
                tracker.log_dpo_step(t, offset + int(row["step"]), row)

            job_dir = directory / layout.TRAIN_JOB
            self.engines.train_dpo(
                model_dir,
                rows,
                out,
                job_dir=job_dir,
                name=f"iter_{t}_dpo",
                seed=self.cfg.seed + t,
                on_log=on_log,
            )
        return records.read_json(out / layout.TRAINING_LOG)

    def _steps_before(self, t: int) -> int:
        """Optimiser steps of iterations 1..t-1, from their models' training logs."""
        logs = [iter_dir(self.dir, s) / layout.MODEL / layout.TRAINING_LOG for s in range(1, t)]
        return sum(records.read_json(path).get("global_steps", 0) for path in logs if path.is_file())


def run_objective(cfg: Config, history: list[dict]) -> float | None:
    """The figure a run returns to an optimising sweeper: the last iteration's ``objective`` (a dotted
    key of its metrics.json, e.g. ``eval_actor.win_rate``), else its judge's accuracy on
    ``eval.select_by``; None (with a warning) when the run has no such number."""
    last = history[-1] if history else {}
    if cfg.objective:
        value = num(metric_at(last, cfg.objective))
    elif last.get("eval"):
        suite, protocol = select_key(cfg, last["eval"])
        value = num(last["eval"].get(suite, {}).get(protocol, {}).get("accuracy"))
    else:
        value = None
    if value is None:
        what = cfg.objective or "the judge's accuracy (eval.enabled=false?)"
        log.warning("metareward: the run has no number at %s to return to a sweeper", what)
        return None
    return float(value)


def select_key(cfg: Config, evaluated: dict) -> tuple[str, str]:
    """(suite, protocol) that names the best iteration: ``eval.select_by``, else the first evaluated."""
    if cfg.eval.select_by:
        suite, _, protocol = cfg.eval.select_by.partition("/")
        return suite, protocol
    suite = next(iter(evaluated))
    return suite, next(iter(evaluated[suite]))


def carry_forward(model_dir: str, out: Path, reason: str) -> dict:
    """M_t = M_{t-1}: copy the model directory whole (temp dir, then rename), with a training log
    that says why nothing was trained."""
    log_row = {
        "log_history": [],
        "train_pairs": 0,
        "global_steps": 0,
        "carried_forward": True,
        "reason": reason,
    }
    if not (out / "config.json").is_file():
        tmp = out.parent / (out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns(layout.TRAINING_LOG))
        (tmp / layout.TRAINING_LOG).write_text(json.dumps(log_row, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return records.read_json(out / layout.TRAINING_LOG)
