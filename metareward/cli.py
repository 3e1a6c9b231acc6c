"""Every console entry point: parse the command line, call a library, print. The config is built here,
once, and handed down as dataclasses. Over 400 lines: every console script lives in this one module.

- ``metareward [overrides]``: run or resume a self-training run (a Hydra app; ``-m`` for a multirun,
  each job in its own run directory ``<run_name>_<job number>``).
- ``metareward-pairs ITER_DIR [--out DIR] [overrides]``: rebuild the pair files of one iteration.
- ``metareward-inspect RUN_DIR [...]``, ``metareward-report RUN_DIR [--out FILE]``: look at a run.
- ``metareward-eval-judge [--out PATH] [overrides]``: judge skill of any model against human pairs.
- ``metareward-align-judge [--out PATH] [overrides]``: train a judge toward human label distributions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metareward import report
from metareward.config import Config, ConfigError, load_config, override_error, register_configs, to_config
from metareward.store import layout, records, runlock
from metareward.store.records import RecordError

log = logging.getLogger("metareward")
register_configs()


def _log_like_the_run() -> None:
    """The argparse commands' logging, as the Hydra app's console has it (conf/config.yaml): other
    libraries' warnings and metareward's INFO lines, as they are; on stderr, so stdout holds only
    what the command prints."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("metareward").setLevel(logging.INFO)


def _fail(message: str, code: int = 2, prog: str = "metareward") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Terminated(BaseException):
    """SIGTERM (a scheduler's stop), raised like KeyboardInterrupt so no ``except Exception`` stops it."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _signal_of(stop: BaseException) -> tuple[str, int]:
    """The signal that stopped a command and its exit code: SIGTERM 143, SIGINT (Ctrl-C) 130."""
    return ("SIGTERM", 143) if isinstance(stop, Terminated) else ("SIGINT", 130)


def _first_line(error: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    return _first_line(error)


def _stopped(stop: BaseException, run_dir: Path | None) -> None:
    """One line for a run stopped by SIGINT (exit 130) or SIGTERM (exit 143): where, and how to go on."""
    name, code = _signal_of(stop)
    where = f"{records.where_stopped(run_dir)} of {run_dir}" if run_dir else "before the run started"
    print(f"metareward: stopped by {name} {where}; run the same command to resume", file=sys.stderr)
    raise SystemExit(code)


def _no_space_line(error: OSError) -> str:
    if isinstance(error, records.NoSpace):
        return str(error)
    return (
        f"no space left on device writing {error.filename}; free some space and run the same command to "
        "resume"
    )


def _check_out(path: Path, prog: str) -> None:
    """Refuse, in one line and before any work, a result file that could not be written (nothing is
    created here: the folders it needs are made when it is written)."""
    where = next(p for p in [path.parent, *path.parent.parents] if p.exists() or p == p.parent)
    if path.is_dir():
        problem = "it is a directory"
    elif not where.is_dir():
        problem = f"{where} is not a directory"
    elif not os.access(where, os.W_OK | os.X_OK):
        problem = f"{where} is not writable"
    else:
        return
    _fail(f"--out {path} cannot be written: {problem}", code=1, prog=prog)


def _interrupted(stop: BaseException, prog: str, kept: str) -> None:
    """One line for a command stopped by SIGINT (exit 130) or SIGTERM (exit 143): what is kept."""
    name, code = _signal_of(stop)
    print(f"{prog}: stopped by {name}; {kept}: run the same command to go on", file=sys.stderr)
    raise SystemExit(code)


def _on_cuda(device: str) -> bool | None:
    """Whether ``generator.device`` computes on CUDA; None (auto) lets the allocator module find out."""
    return None if device == "auto" else device.startswith("cuda")


# ------------------------------------------------------------------ metareward


def job_config(config: Config, job_num: int | None) -> Config:
    """A multirun job's config: its own run directory, ``<run_name>_<job number>``."""
    if job_num is None:
        return config
    # The jobs of one sweep share a W&B group, named after it (unless one is given).
    tracking = dataclasses.replace(config.tracking, group=config.tracking.group or config.run_name)
    return dataclasses.replace(config, run_name=f"{config.run_name}_{job_num}", tracking=tracking)


# Hydra's flags that print something and run no job: their configs are not checked beforehand.
_INFO_FLAGS = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "experimental_rerun")


def check_jobs(argv: list[str]) -> list[Config]:
    """The validated config of every job the command line asks for (one, or a multirun's sweep), before
    Hydra starts: a bad setting is one line naming it (exit 2), before any model loads or any run
    directory is made. Returns [] when Hydra is only asked to print something."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS) or args.config_path:
        return []
    overrides = list(args.overrides)
    if args.config_dir:  # a user's own experiment files, searched like ours
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if args.multirun:
            # An interval, which an optimising sweeper (Optuna's, Ax's) samples from and the basic one
            # cannot split, is checked at its midpoint: its key and the type of its values.
            parsed = OverridesParser.create().parse_overrides([_at_midpoint(o) for o in parsed])
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        else:
            jobs = [overrides]
        configs = []
        with initialize_config_module("metareward.conf", version_base="1.3"):
            for num, job in enumerate(jobs):
                composed = compose(args.config_name or "config", overrides=job)
                configs.append(job_config(to_config(composed), num if args.multirun else None))
    except ConfigError as error:
        _fail(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        _fail(str(override_error(error)))
    return configs


def _at_midpoint(override) -> str:
    """An ``interval(a, b)`` sweep override as ``key=(a+b)/2`` (an integer for integer bounds); any
    other override as typed."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if not isinstance(value, IntervalSweep):
        return override.input_line
    whole = isinstance(value.start, int) and isinstance(value.end, int)
    middle = (value.start + value.end) // 2 if whole else (value.start + value.end) / 2
    return f"{override.get_key_element()}={middle}"


def print_plan(config: Config) -> None:
    """The dry run: generation calls and a bound on generated tokens, per iteration and stage."""
    from metareward.data import load_prompts
    from metareward.loop.plan import format_plan, plan

    try:
        # data=synthetic loads its seed set; the iterations draw from the pool it writes.
        synthetic = config.data.kind == "synthetic"
        available = config.data.synthetic.pool_size if synthetic else len(load_prompts(config.data))
    except Exception as error:  # e.g. a hub dataset without network: plan with the configured count
        print(f"(prompts not loaded: {error}; planning {config.data.prompts_per_iteration} per iteration)")
        available = None
    print(f"dry run of {config.run_name}: {config.iterations} iterations, no model loaded")
    asked = config.data.prompts_per_iteration
    if available is not None and available < asked:
        print(
            f"note: data.prompts_per_iteration={asked} but the prompt set holds {available}; each "
            f"iteration uses all {available} (point data.path at a larger set to plan {asked})"
        )
    if config.judge_alignment.enabled:
        _print_alignment_plan(config)
    print(format_plan(plan(config, available)))


def _print_alignment_plan(config: Config) -> None:
    """The EFT step's share of the dry run: what it would train on."""
    from metareward.align.data import load_align_split

    align = config.align
    try:
        train, heldout = load_align_split(config)
    except RecordError as error:
        print(f"before iteration 1: the seed is aligned as a judge, but its rows do not load: {error}")
        return
    steps = -(-len(train) // (align.batch_size * align.gradient_accumulation_steps))
    print(
        f"before iteration 1: the seed is aligned as a judge ({align.objective} objective) on {len(train)} "
        f"items of {align.train}, {len(heldout)} held out; about {steps} optimiser steps an epoch, "
        f"{align.num_epochs:g} epoch(s)"
    )


@hydra.main(config_path="pkg://metareward.conf", config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> float | None:
    from metareward.compute.allocator import keep_freed_memory
    from metareward.generation.openai import OpenAIError
    from metareward.loop.run import Run, RunStopped, run_objective
    from metareward.report.tracking import TrackingError

    try:
        config = to_config(cfg)
    except ConfigError as error:
        _fail(str(error))
    hydra_cfg = HydraConfig.get()
    config = job_config(config, hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None)
    keep_freed_memory(cuda=_on_cuda(config.generator.device))
    try:
        run = Run(config)
        history = run.run()
    except (KeyboardInterrupt, Terminated) as stop:
        _stopped(stop, Path(config.runs_dir) / config.run_name)
    except OSError as error:
        if records.is_no_space(error):
            _fail(_no_space_line(error), code=1)
        if isinstance(error, FileNotFoundError):
            _fail(str(error), code=1)
        _fail(_first_line(error), code=1)
    except (RunStopped, runlock.RunLocked, RecordError, TrackingError, OpenAIError) as error:
        _fail(str(error), code=1)
    except ValueError as error:
        # E.g. transformers refusing a model (remote code not trusted, no safetensors weights).
        _fail(_first_line(error), code=1)
    log.info("run directory: %s", run.dir)
    # What an optimising sweeper (hydra/sweeper=optuna) optimises; the basic one ignores it.
    return run_objective(config, history)


def main() -> None:
    """``metareward [overrides]``: every job's config is checked (and a dry run answered) before Hydra
    creates a run directory."""
    from metareward.loop.run import RunStopped, check_run_models, check_writable

    if "--version" in sys.argv[1:]:  # metareward's own, not Hydra's
        print(f"metareward {importlib.metadata.version('metareward')}")
        return
    configs = check_jobs(sys.argv[1:])
    if configs and all(config.dry_run for config in configs):
        for config in configs:
            print_plan(config)
        return
    from metareward.compute.models import check_models
    from metareward.judging.evaluation import load_suites

    try:
        for config in configs:
            check_models(config)
            check_run_models(config)
            if config.eval.enabled:
                load_suites(config.eval)
            check_writable(Path(config.runs_dir) / config.run_name)
            # Refused before Hydra writes its files into a directory another run is using.
            runlock.check_free(Path(config.runs_dir) / config.run_name)
    except (ConfigError, FileNotFoundError) as error:  # a model path: named by its full key
        _fail(str(error))
    except (RunStopped, runlock.RunLocked, RecordError) as error:
        _fail(str(error), code=1)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _run()
    except (KeyboardInterrupt, Terminated) as stop:  # outside the run itself, e.g. while Hydra starts
        _stopped(stop, None)


# ------------------------------------------------------------------ metareward-pairs


def pairs_main(argv: list[str] | None = None) -> None:
    """Rebuild actor_pairs.jsonl and judge_pairs.jsonl from an iteration's stage files."""
    from metareward.judging.prompts import Templates
    from metareward.loop.dataset_card import played_by, write_dataset_card
    from metareward.loop.pairs import build_pairs, write_pairs

    prog = "metareward-pairs"
    _log_like_the_run()
    parser = argparse.ArgumentParser(prog=prog, description=pairs_main.__doc__)
    parser.add_argument("iter_dir", type=Path, help="an iteration directory, runs/<name>/iter_<t>")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the pair files (default: ITER_DIR)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pairs.rho=0.2")
    args = parser.parse_intermixed_args(argv)
    iteration = layout.iteration_of(args.iter_dir.resolve())
    if iteration is None or not args.iter_dir.is_dir():
        _fail(f"{args.iter_dir} is not an iteration directory (iter_<t>)", prog=prog)
    try:
        config = load_config(args.iter_dir.resolve().parent / layout.CONFIG, args.overrides)
        templates = Templates.load(
            config.judge.template, config.meta_judge.template, config.eval.pairwise_template
        )
        rho = config.pairs.rho_for(iteration)
        records.check_stage_files(args.iter_dir)  # the loop's checks, before any pair is built
        actor_rows, judge_rows, _ = build_pairs(
            args.iter_dir, rho, config.pairs.elo_l2, templates.judge_messages, config.pairs
        )
    except (ConfigError, RecordError, FileNotFoundError) as error:
        _fail(str(error), prog=prog)
    out = args.out or args.iter_dir
    run_dir = args.iter_dir.resolve().parent
    # Writing into the run directory takes its lock; writing elsewhere only reads the run.
    writes_run = out.resolve().is_relative_to(run_dir)
    try:
        with runlock.hold(run_dir) if writes_run else contextlib.nullcontext():
            write_pairs(out, actor_rows, judge_rows)
            # The card names what is now in `out` (a `trained` config only where DPO's rows are).
            write_dataset_card(out, config, iteration, played_by(config, run_dir, iteration))
    except (runlock.RunLocked, OSError) as error:
        _fail(str(error), code=1, prog=prog)
    print(f"{out}: {len(actor_rows)} actor pairs, {len(judge_rows)} judge pairs (rho {rho})")


# ------------------------------------------------------------------ metareward-inspect, -report


def _run_dir_arg(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    if not report.is_run_dir(run := Path(args.run_dir)):
        parser.error(f"{run} is not a run directory (no {layout.CONFIG} and no iter_* directories)")
    return args, run.resolve()  # resolved: "." has a name too


def inspect_main(argv: list[str] | None = None) -> None:
    _log_like_the_run()
    parser = argparse.ArgumentParser(prog="metareward-inspect", description="Summary table and sample pairs.")
    parser.add_argument("--iter", type=int, dest="iteration", metavar="K", help="sample pairs of iter_K")
    parser.add_argument("--role", choices=["actor", "judge"], default="actor", help="default: actor")
    parser.add_argument("-n", type=int, default=3, help="number of sample pairs (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args, run = _run_dir_arg(parser, argv)
    try:
        if args.iteration is None:
            print(report.inspect_run(run, args.json))
        else:
            print(report.inspect_pairs(run, args.iteration, args.role, args.n, args.json))
    except (RecordError, ValueError) as error:
        parser.error(str(error))


def report_main(argv: list[str] | None = None) -> None:
    _log_like_the_run()
    parser = argparse.ArgumentParser(prog="metareward-report", description="HTML report with plots of a run.")
    parser.add_argument("--out", metavar="FILE", help="HTML file to write (default RUN_DIR/report.html)")
    args, run = _run_dir_arg(parser, argv)
    try:
        print(report.write_report(run, Path(args.out) if args.out else run / layout.REPORT_HTML))
    except RecordError as error:
        parser.error(str(error))
    except OSError as error:  # where the report goes cannot be written
        _fail(str(error), code=1, prog="metareward-report")


# ------------------------------------------------------------------ metareward-eval-judge


def eval_judge_main(argv: list[str] | None = None) -> None:
    """``metareward-eval-judge [--out PATH] [overrides]``: the configured judge on the preference suites
    ``eval.suites`` under the protocols ``eval.protocols`` (``eval.*``, ``judge.score_from``,
    ``judge.template`` apply). The judge is the configured model, or an endpoint with no local model
    at all: ``generator=openai generator.openai.base_urls=[URL] generator.openai.model=NAME``.

    Prints a table per suite and protocol and writes the metrics as JSON to PATH (default
    ./eval_judge.json), with the per-pair outcomes in ``<stem>_pairs.jsonl`` beside it.

    With ``eval.escalation.enabled=true`` a stronger judge (``eval.escalation.judge.*``) answers every
    pair too, and each suite and protocol gets its cascade curve: accuracy and cost as the share of
    pairs escalated to it grows (``"escalation"`` in the JSON, a table printed).

    Answers from endpoints (the judge's behind ``generator=openai``, the strong judge's) are cached in
    ``<stem>_cache/`` beside PATH as they arrive: run again after a stop, or with another signal or
    budget, and nothing is paid twice. A model that is only served is known by its served name alone:
    evaluate another model under the same name with another --out."""
    from metareward.compute.allocator import keep_freed_memory
    from metareward.compute.models import check_models
    from metareward.engines import Engines
    from metareward.generation.openai import OpenAIError
    from metareward.judging.evaluation import load_suites

    prog = "metareward-eval-judge"
    _log_like_the_run()
    parser = argparse.ArgumentParser(prog=prog, description=eval_judge_main.__doc__)
    parser.add_argument("--out", type=Path, default=Path("eval_judge.json"), help="result JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny eval.num_pairs=32")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(None, args.overrides)
        check_models(config)
        # Suites first: a bad file should fail before minutes of model loading.
        suites = load_suites(config.eval)
    except (ConfigError, FileNotFoundError) as error:
        _fail(str(error), prog=prog)
    except RecordError as error:
        _fail(str(error), code=1, prog=prog)
    _check_out(args.out, prog)
    cache = args.out.with_name(f"{args.out.stem}_cache")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        keep_freed_memory(cuda=_on_cuda(config.generator.device))
        # Endpoint answers (the judge's and the strong judge's) are kept beside --out: run again after
        # a stop, or with another signal or budget, and nothing is paid twice.
        result, per_pair, cascaded = _evaluate_judge(config, suites, Engines(config, cache_dir=cache))
        records.write_json(args.out, result)
        records.write_jsonl(args.out.with_name(f"{args.out.stem}_pairs.jsonl"), per_pair)
    except (KeyboardInterrupt, Terminated) as stop:
        _interrupted(stop, prog, f"the endpoint answers received are kept in {cache}")
    except OSError as error:
        _fail(_no_space_line(error) if records.is_no_space(error) else str(error), code=1, prog=prog)
    except (RecordError, OpenAIError) as error:
        _fail(str(error), code=1, prog=prog)
    except ValueError as error:  # e.g. transformers refusing a model (remote code not trusted)
        _fail(_first_line(error), code=1, prog=prog)
    print(report.format_suite_table(result))
    if cascaded:
        print(report.format_cascade_table(result))
    print(f"wrote {args.out} and {args.out.stem}_pairs.jsonl")


def _evaluate_judge(config: Config, suites: list, engines) -> tuple[dict, list[dict], bool]:
    """metareward-eval-judge's evaluation of ``suites``: the result, its per-pair rows, and whether a
    cascade was measured. Recorded verdicts (``eval.recorded.*``) stand for the judge or the strong
    judge with no model run."""
    from metareward.judging.cascade import Cascade
    from metareward.judging.context_fit import ContextFit
    from metareward.judging.escalation import StrongJudge, prices_of
    from metareward.judging.evaluation import evaluate_suites
    from metareward.judging.prompts import Templates
    from metareward.judging.recorded import load_recorded

    templates = Templates.load(
        config.judge.template, config.meta_judge.template, config.eval.pairwise_template
    )
    recorded, escalation = config.eval.recorded, config.eval.escalation
    local_record = load_recorded(recorded.judge) if recorded.judge else None
    strong_record = load_recorded(recorded.strong) if recorded.strong else None
    generator = fit = None
    if local_record is None:
        # Behind an endpoint the model is a served name: nothing is loaded here.
        model_dir = engines.locate(config.model, config.generator, local_tokenizer=False)
        # Pairs too long for the judge's context follow data.long_prompts (skipped or truncated, counted).
        fit = ContextFit.for_model(
            model_dir, config.model.trust_remote_code, config.eval.max_new_tokens, config.data.long_prompts
        )
        generator = engines.start(engines.seat(None, model_dir))
    live = escalation.enabled and strong_record is None
    strong = StrongJudge(escalation.judge, engines.strong_judge) if live else None
    try:
        cascade = None
        local_prices = prices_of(config.generator)
        if strong is not None:
            cascade = Cascade(escalation, strong.generator(), strong.prices, local_prices)
        elif strong_record is not None:
            strong_prices = prices_of(escalation.judge.generator)
            cascade = Cascade(escalation, None, strong_prices, local_prices, strong_record)
        result, per_pair = evaluate_suites(
            generator, templates, suites, config.eval, config.judge.score_from, fit, cascade, local_record
        )
    finally:
        if generator is not None:
            generator.close()
        if strong is not None:
            strong.close()
    return result, per_pair, cascade is not None


# ------------------------------------------------------------------ metareward-align-judge


def align_judge_main(argv: list[str] | None = None) -> None:
    """``metareward-align-judge [--out PATH] [overrides]``: train the configured model (``model.*``) as
    a judge on human evaluation rows (``align.*``: ``align.train``, ``align.heldout`` or
    ``align.heldout_fraction``, ``align.objective`` distribution or point) and save it, loadable with
    ``model=hf model.path=DIR``, to ``align.model_dir`` (default runs/<run_name>/align/model).

    Prints the held-out metrics before and after training and writes them as JSON to PATH (default
    runs/<run_name>/align/metrics.json). Run again after a kill, it resumes from its last checkpoint."""
    from metareward.align.data import ALIGN_METRICS, align_paths, load_align_split
    from metareward.align.trainer import result_lines
    from metareward.engines import engines_for

    prog = "metareward-align-judge"
    _log_like_the_run()
    parser = argparse.ArgumentParser(prog=prog, description=align_judge_main.__doc__)
    parser.add_argument("--out", type=Path, default=None, help="result JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny align.num_epochs=2")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(None, args.overrides)
        # The rows first: a bad file fails before the model loads.
        train, heldout = load_align_split(config)
    except ConfigError as error:
        _fail(str(error), prog=prog)
    except RecordError as error:
        _fail(str(error), code=1, prog=prog)
    work_dir, model_dir = align_paths(config)
    out = args.out or work_dir / ALIGN_METRICS
    _check_out(out, prog)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # The run directory's lock, as a run takes it: a run's EFT step reads and writes align/ too.
        with runlock.hold(Path(config.runs_dir) / config.run_name):
            # With cluster=ray, a Ray Train job on cluster.train_workers.
            engines = engines_for(config)
            result = engines.align(engines.seed(), train, heldout, out_dir=model_dir, work_dir=work_dir)
            records.write_json(out, result)
    except (KeyboardInterrupt, Terminated) as stop:
        _interrupted(stop, prog, f"its checkpoints are kept in {work_dir / layout.CHECKPOINTS}")
    except (RecordError, OSError, runlock.RunLocked) as error:
        _fail(str(error), code=1, prog=prog)
    print("\n".join(result_lines(result)))
    print(f"saved the aligned judge to {model_dir} and its metrics to {out}")
