"""Console entry points; the config is built here, once, and handed down as dataclasses.

- ``metareward [overrides]``: run or resume a self-training run (a Hydra app).
- ``metareward-pairs ITER_DIR [--out DIR] [overrides]``: rebuild the pair files of one iteration.
- ``metareward-inspect``, ``metareward-report``: metareward/report.py; ``metareward-eval-judge``:
  metareward/evaluation.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metareward import records
from metareward.allocator import keep_freed_memory
from metareward.config import Config, ConfigError, register_configs, to_config
from metareward.records import RecordError

register_configs()


def _fail(message: str, code: int = 2) -> None:
    print(f"metareward: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class CheckBeforeRun(Callback):
    """Runs before Hydra creates the run directory (conf/config.yaml names it in hydra.callbacks):
    a refused config, or a dry run, leaves nothing on disk."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # Hydra turns a callback's exceptions into warnings and runs the job anyway: exit here instead.
        from metareward.loop import RunStopped, check_writable

        try:
            checked = to_config(config)
            if checked.dry_run:
                print_plan(checked)
                raise SystemExit(0)
            check_writable(Path(checked.runs_dir) / checked.run_name)
        except ConfigError as error:
            _fail(str(error))
        except RunStopped as error:
            _fail(str(error), code=1)
        except Exception as error:
            _fail(f"{type(error).__name__}: {error}", code=1)


def print_plan(config: Config) -> None:
    """The dry run: generation calls and a bound on generated tokens, per iteration and stage."""
    from metareward.data import load_prompts
    from metareward.plan import format_plan, plan

    try:
        available = len(load_prompts(config.data))
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
    print(format_plan(plan(config, available)))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    from metareward.generation.openai import OpenAIError
    from metareward.loop import Run, RunStopped
    from metareward.tracking import TrackingError

    try:
        config = to_config(cfg)
    except ConfigError as error:
        _fail(str(error))
    if config.dry_run:  # answered by CheckBeforeRun unless hydra.callbacks was overridden
        print_plan(config)
        return
    try:
        run = Run(config)
        run.run()
    except (RunStopped, RecordError, FileNotFoundError, TrackingError, OpenAIError) as error:
        _fail(str(error), code=1)
    except (ValueError, OSError) as error:
        # E.g. transformers refusing a model (remote code not trusted, no safetensors weights).
        _fail(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}", code=1)
    print(f"run directory: {run.dir}")


def main() -> None:
    keep_freed_memory()
    _run()


def load_config(run_config: Path | None, overrides: list[str]) -> Config:
    """The run's saved config (or the defaults) with ``key=value`` overrides, validated."""
    from hydra import compose, initialize_config_module

    try:
        if run_config is not None and run_config.is_file():
            base = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_config))
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        else:
            with initialize_config_module("metareward.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    return to_config(cfg)


def pairs_main(argv: list[str] | None = None) -> None:
    """Rebuild actor_pairs.jsonl and judge_pairs.jsonl from an iteration's stage files."""
    from metareward.loop import build_pairs, write_pairs
    from metareward.prompts import Templates

    parser = argparse.ArgumentParser(prog="metareward-pairs", description=pairs_main.__doc__)
    parser.add_argument("iter_dir", type=Path, help="an iteration directory, runs/<name>/iter_<t>")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the pair files (default: ITER_DIR)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pairs.rho=0.2")
    args = parser.parse_intermixed_args(argv)
    match = re.fullmatch(r"iter_(\d+)", args.iter_dir.resolve().name)
    if not match or not args.iter_dir.is_dir():
        _fail(f"{args.iter_dir} is not an iteration directory (iter_<t>)")
    try:
        config = load_config(args.iter_dir.resolve().parent / records.CONFIG, args.overrides)
        templates = Templates.load(config.judge.template, config.meta_judge.template)
        actor_rows, judge_rows, stats = build_pairs(args.iter_dir, config, int(match.group(1)), templates)
    except (ConfigError, RecordError, FileNotFoundError) as error:
        _fail(str(error))
    out = args.out or args.iter_dir
    write_pairs(out, actor_rows, judge_rows)
    rho = config.pairs.rho_for(int(match.group(1)))
    print(f"{out}: {len(actor_rows)} actor pairs, {len(judge_rows)} judge pairs (rho {rho})")
