"""Iterations and resume: the one place that decides the order of work and touches the run directory.

Iteration t uses M_{t-1} (M_0 = the seed) in all three roles and trains M_t from it:
prompts -> actor -> judge -> meta-judge -> pairs -> DPO. A stage whose file is complete is
skipped on resume; an iteration is finished once its ``metrics.json`` exists.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from metareward import evaluation, pairs, records, stages
from metareward.config import Config
from metareward.data import load_prompts, prompts_for_iteration
from metareward.generation import Generator, make_generator
from metareward.metrics import iteration_metrics
from metareward.models import resolve_model
from metareward.prompts import Templates
from metareward.records import ChunkedFile, iter_dir, read_jsonl, write_json, write_jsonl
from metareward.tracking import make_tracker

# Settings that may change between a run and its resumption without changing any finished work.
EVAL_0 = "eval_0.json"
EVAL = "eval.json"
RESUMABLE_CHANGES = {"iterations", "allow_config_change", "generator.progress", "generator.device"}


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
    path = run_dir / records.CONFIG
    if path.is_file():
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(path)))
        current = _flatten(asdict(cfg))
        changed = sorted(
            key
            for key in saved.keys() | current.keys()
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
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


def build_pairs(
    directory: Path, cfg: Config, iteration: int, templates: Templates
) -> tuple[list, list, dict]:
    """Actor and judge pairs from the stage files in ``directory`` (no model needed)."""
    prompts = read_jsonl(directory / records.PROMPTS)
    responses = read_jsonl(directory / records.RESPONSES)
    judgements = read_jsonl(directory / records.JUDGEMENTS)
    verdicts = read_jsonl(directory / records.META_JUDGEMENTS)
    actor_rows, actor_stats = pairs.actor_pairs(prompts, responses, judgements, cfg.pairs.rho_for(iteration))
    judge_rows, judge_stats = pairs.judge_pairs(
        prompts, responses, judgements, verdicts, templates.judge_messages, l2=cfg.pairs.elo_l2
    )
    return actor_rows, judge_rows, {"actor": actor_stats, "judge": judge_stats}


def write_pairs(out_dir: Path, actor_rows: list, judge_rows: list) -> None:
    write_jsonl(out_dir / records.ACTOR_PAIRS, actor_rows)
    write_jsonl(out_dir / records.JUDGE_PAIRS, judge_rows)


def _no_pairs_reason(stats: dict) -> str:
    actor = stats["actor"]
    reasons = [
        f"{key.removeprefix('skipped_').replace('_', ' ')}: {value} prompt(s)"
        for key, value in actor.items()
        if key.startswith("skipped_") and value
    ]
    return "; ".join(reasons) or "no prompts"


class Run:
    """One metareward run directory, driven iteration by iteration."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / cfg.run_name
        self.templates = Templates.load(cfg.judge.template, cfg.meta_judge.template)

    def run(self) -> list[dict]:
        """Run (or resume) iterations 1..T; returns each iteration's metrics."""
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        check_run_config(self.dir, cfg)
        all_prompts = load_prompts(cfg.data)
        self.seed_dir = model_dir = resolve_model(cfg.model)
        history = []
        with make_tracker(cfg.tracking, self.dir, cfg.run_name, asdict(cfg)) as tracker:
            if cfg.eval.enabled and not (self.dir / EVAL_0).is_file():
                # M_0's judge skill is the baseline every later iteration is compared with.
                write_json(self.dir / EVAL_0, self._evaluate(model_dir, iteration=0))
                tracker.log({"eval": records.read_json(self.dir / EVAL_0)["judge"]}, step=0)
            for t in range(1, cfg.iterations + 1):
                directory = iter_dir(self.dir, t)
                if not (directory / records.METRICS).is_file():
                    chosen = prompts_for_iteration(all_prompts, t, cfg.data.prompts_per_iteration, cfg.seed)
                    self._iteration(t, directory, model_dir, chosen)
                    self._track(tracker, t, directory)
                metrics = records.read_json(directory / records.METRICS)
                history.append(metrics)
                print(summary(metrics), sample(directory), sep="\n", flush=True)
                model_dir = str(directory / records.MODEL)
        return history

    def _track(self, tracker, t: int, directory: Path) -> None:
        tracker.log(records.read_json(directory / records.METRICS), step=t)
        limit = self.cfg.tracking.table_rows
        for role, name in (("actor", records.ACTOR_PAIRS), ("judge", records.JUDGE_PAIRS)):
            rows = read_jsonl(directory / name)[:limit]
            columns = ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
            table = [
                [
                    r["prompt"][-1]["content"],
                    r["chosen"][0]["content"],
                    r["rejected"][0]["content"],
                    r["chosen_score"],
                    r["rejected_score"],
                ]
                for r in rows
            ]
            tracker.log_table(f"{role}_pairs", columns, table, step=t)

    def _evaluate(self, model_dir: str, iteration: int) -> dict:
        """Judge-human agreement of ``model_dir`` and, after iteration 1.., its actor's win rate
        against M_0 on held-out prompts, judged by the fixed evaluator."""
        cfg = self.cfg
        human_pairs = evaluation.load_human_pairs(cfg.eval.human_pairs, cfg.eval.num_pairs, cfg.eval.seed)
        heldout = evaluation.load_heldout_prompts(cfg.eval.heldout_prompts, cfg.eval.num_heldout)
        generator = make_generator(model_dir, cfg.model, cfg.generator)
        try:
            judge = evaluation.judge_human_agreement(
                generator, self.templates, human_pairs, cfg.eval, cfg.judge.score_from, seed=cfg.eval.seed
            )
            responses = []
            if cfg.eval.win_rate:
                responses = evaluation.generate_responses(
                    generator, heldout, cfg.eval.response_max_new_tokens, seed=cfg.eval.seed
                )
        finally:
            generator.close()
        result = {"judge": {k: v for k, v in judge.items() if k != "per_pair"}, "per_pair": judge["per_pair"]}
        result["heldout_responses"] = responses
        if iteration > 0 and cfg.eval.win_rate:
            baseline = records.read_json(self.dir / EVAL_0)["heldout_responses"]
            evaluator_spec = cfg.eval.evaluator
            evaluator_dir = resolve_model(evaluator_spec) if evaluator_spec else self.seed_dir
            evaluator = make_generator(evaluator_dir, evaluator_spec or cfg.model, cfg.generator)
            try:
                result["actor"] = evaluation.win_rate(
                    evaluator,
                    self.templates,
                    heldout,
                    responses,
                    baseline,
                    cfg.eval,
                    seed=cfg.eval.seed + iteration,
                )
            finally:
                evaluator.close()
        return result

    def _iteration(self, t: int, directory: Path, model_dir: str, chosen_prompts: list[dict]) -> None:
        cfg = self.cfg
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / records.PROMPTS).is_file():
            write_jsonl(directory / records.PROMPTS, chosen_prompts)
        prompts = read_jsonl(directory / records.PROMPTS)

        generator: Generator | None = None
        stage_files = [records.RESPONSES, records.JUDGEMENTS, records.META_JUDGEMENTS]
        if not all((directory / name).is_file() for name in stage_files):
            generator = make_generator(model_dir, cfg.model, cfg.generator)
        try:
            ctx = stages.StageContext(generator, self.templates, cfg.seed, t, cfg.generator.chunk_size)
            responses = stages.actor(ctx, prompts, cfg.actor, ChunkedFile(directory / records.RESPONSES))
            judgements = stages.judge(
                ctx, prompts, responses, cfg.judge, ChunkedFile(directory / records.JUDGEMENTS)
            )
            verdicts = stages.meta_judge(
                ctx,
                prompts,
                responses,
                judgements,
                cfg.meta_judge,
                ChunkedFile(directory / records.META_JUDGEMENTS),
            )
        finally:
            if generator is not None:
                generator.close()

        actor_rows, judge_rows, pair_stats = build_pairs(directory, cfg, t, self.templates)
        if not ((directory / records.ACTOR_PAIRS).is_file() and (directory / records.JUDGE_PAIRS).is_file()):
            write_pairs(directory, actor_rows, judge_rows)
        train_judge = t in cfg.train.judge_iterations
        rows = actor_rows + (judge_rows if train_judge else [])
        if not rows:
            raise RunStopped(
                f"iteration {t} produced no preference pairs ({_no_pairs_reason(pair_stats)}); "
                f"see {directory} for the responses and judgements"
            )
        training = self._train(model_dir, rows, directory, t)
        if cfg.eval.enabled and not (directory / EVAL).is_file():
            write_json(directory / EVAL, self._evaluate(str(directory / records.MODEL), iteration=t))
        evaluated = records.read_json(directory / EVAL) if cfg.eval.enabled else {}
        metrics = {
            "iteration": t,
            "prompts": len(prompts),
            **iteration_metrics(
                prompts, responses, judgements, verdicts, actor_rows, judge_rows, pair_stats, training
            ),
            # TRL's own log, step by step, beside the summary numbers above.
            "train_log": training["log_history"],
            "pairs": {**pair_stats, "rho": cfg.pairs.rho_for(t), "trained_on_judge_pairs": train_judge},
            "eval": evaluated.get("judge", {}),
            "eval_actor": evaluated.get("actor", {}),
        }
        write_json(directory / records.METRICS, metrics)

    def _train(self, model_dir: str, rows: list[dict], directory: Path, t: int) -> dict:
        from metareward.training import TRAINING_LOG, train_dpo

        out = directory / records.MODEL
        if not (out / "config.json").is_file():
            train_dpo(
                model_dir,
                rows,
                self.cfg.train.dpo,
                out,
                seed=self.cfg.seed + t,
                trust_remote_code=self.cfg.model.trust_remote_code,
            )
        return records.read_json(out / TRAINING_LOG)


def _number(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary(metrics: dict) -> str:
    """A one-screen account of one iteration."""
    actor, judge, meta = metrics["actor"], metrics["judge"], metrics["meta_judge"]
    pair, train = metrics["pairs"], metrics["train"]
    agreement, actor_eval = metrics.get("eval") or {}, metrics.get("eval_actor") or {}
    tokens, score = _number(actor["mean_response_tokens"], ".0f"), _number(actor.get("mean_response_score"))
    judge_failures, meta_failures = (
        _number(judge["parse_failure_rate"], ".0%"),
        _number(meta["parse_failure_rate"], ".0%"),
    )
    first_wins = _number(meta["first_position_win_share"], ".0%")
    losses = f"{_number(train.get('first_loss'), '.4f')} -> {_number(train.get('loss'), '.4f')}"
    lines = [
        f"== iteration {metrics['iteration']} ==",
        f"actor      {metrics['prompts']} prompts -> {actor['responses']} responses, "
        f"mean {tokens} tokens, mean score {score}",
        f"judge      {judge['judgements']} judgements, {judge['scored']} scored, "
        f"parse failures {judge_failures}, mean score {_number(judge['mean_score'])}",
        f"meta-judge {meta['verdicts']} verdicts, parse failures {meta_failures}, "
        f"first-position wins {first_wins}",
        f"pairs      actor {pair['actor']['pairs']}, judge {pair['judge']['pairs']} "
        f"(rho {pair['rho']}, judge pairs trained: {pair['trained_on_judge_pairs']})",
        f"DPO        {train.get('steps', 0)} steps, loss {losses}, "
        f"reward margin {_number(train.get('rewards_margins'), '.4f')}",
    ]
    if agreement:
        lines.append(
            f"eval       judge-human agreement {agreement['judge_human_agreement']:.2f} "
            f"[{agreement['ci_low']:.2f}, {agreement['ci_high']:.2f}]"
            + (f", actor win rate vs M_0 {actor_eval['win_rate']:.2f}" if actor_eval else "")
        )
    return "\n".join(lines)


def _clip(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def sample(directory: Path) -> str:
    """One actor pair and one judgement of the iteration, for a person to read."""
    actor = read_jsonl(directory / records.ACTOR_PAIRS)
    judge = read_jsonl(directory / records.JUDGE_PAIRS)
    lines = []
    if actor:
        pair = actor[0]
        lines += [
            f"  prompt    {_clip(pair['prompt'][-1]['content'])}",
            f"  chosen    [{pair['chosen_score']:.2f}] {_clip(pair['chosen'][0]['content'])}",
            f"  rejected  [{pair['rejected_score']:.2f}] {_clip(pair['rejected'][0]['content'])}",
        ]
    if judge:
        pair = judge[0]
        lines.append(f"  judgement [elo {pair['chosen_elo']:+.2f}] {_clip(pair['chosen'][0]['content'])}")
    else:
        judgement = next(iter(read_jsonl(directory / records.JUDGEMENTS)), None)
        if judgement is not None:
            lines.append(f"  judgement [{_number(judgement['score'])}] {_clip(judgement['text'])}")
    return "\n".join(lines)
