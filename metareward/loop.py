"""Iterations and resume: the one place that decides the order of work and touches the run directory.

Iteration t uses M_{t-1} (M_0 = the seed) in all three roles and trains M_t from it:
prompts -> actor -> judge -> meta-judge -> pairs -> DPO. A stage whose file is complete is
skipped on resume; an iteration is finished once its ``metrics.json`` exists.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from metareward import pairs, records, stages
from metareward.config import Config
from metareward.data import load_prompts, prompts_for_iteration
from metareward.generation import Generator, make_generator
from metareward.models import resolve_model
from metareward.prompts import Templates
from metareward.records import ChunkedFile, iter_dir, read_jsonl, write_json, write_jsonl

# Settings that may change between a run and its resumption without changing any finished work.
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


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def stage_metrics(responses: list[dict], judgements: list[dict], verdicts: list[dict]) -> dict:
    scores = [j["score"] for j in judgements if j["score"] is not None]
    written = sum(j.get("score_source") == "text" for j in judgements)
    first = sum(v["winner"] == "first" for v in verdicts)
    second = sum(v["winner"] == "second" for v in verdicts)
    verdicts_written = sum(v.get("winner_source") == "text" for v in verdicts)
    return {
        "actor": {
            "responses": len(responses),
            "mean_response_tokens": _mean([r["num_tokens"] for r in responses]),
            "cut_off_share": _share(sum(r["finish_reason"] == "length" for r in responses), len(responses)),
        },
        "judge": {
            "judgements": len(judgements),
            "scored": len(scores),
            "score_written_share": _share(written, len(judgements)),
            "parse_failure_rate": 1 - _share(written, len(judgements)),
            "mean_score": _mean(scores),
            "score_stdev": statistics.pstdev(scores) if scores else None,
        },
        "meta_judge": {
            "verdicts": len(verdicts),
            # A verdict the text does not give may still come from the A/B probabilities.
            "parse_failure_rate": 1 - _share(verdicts_written, len(verdicts)),
            "no_verdict_share": _share(sum(v["winner"] is None for v in verdicts), len(verdicts)),
            "first_position_win_share": first / (first + second) if first + second else None,
        },
    }


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
        model_dir = resolve_model(cfg.model)
        history = []
        for t in range(1, cfg.iterations + 1):
            directory = iter_dir(self.dir, t)
            if not (directory / records.METRICS).is_file():
                chosen = prompts_for_iteration(all_prompts, t, cfg.data.prompts_per_iteration, cfg.seed)
                self._iteration(t, directory, model_dir, chosen)
            metrics = records.read_json(directory / records.METRICS)
            history.append(metrics)
            print(summary(metrics), sample(directory), sep="\n", flush=True)
            model_dir = str(directory / records.MODEL)
        return history

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
        metrics = {
            "iteration": t,
            "prompts": len(prompts),
            **stage_metrics(responses, judgements, verdicts),
            "pairs": {**pair_stats, "rho": cfg.pairs.rho_for(t), "trained_on_judge_pairs": train_judge},
            "train": training,
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


def summary(metrics: dict) -> str:
    """A one-screen account of one iteration."""
    judge, meta, pair = metrics["judge"], metrics["meta_judge"], metrics["pairs"]
    losses = [e["loss"] for e in metrics["train"].get("log_history", []) if "loss" in e]
    mean_score = "n/a" if judge["mean_score"] is None else f"{judge['mean_score']:.2f}"
    first_share = meta["first_position_win_share"]
    lines = [
        f"== iteration {metrics['iteration']} ==",
        f"actor      {metrics['prompts']} prompts -> {metrics['actor']['responses']} responses, "
        f"mean {metrics['actor']['mean_response_tokens']:.0f} tokens",
        f"judge      {judge['judgements']} judgements, {judge['scored']} scored "
        f"({judge['score_written_share']:.0%} written), mean score {mean_score}",
        f"meta-judge {meta['verdicts']} verdicts, parse failures {meta['parse_failure_rate']:.0%}, "
        f"first-position wins {'n/a' if first_share is None else f'{first_share:.0%}'}",
        f"pairs      actor {pair['actor']['pairs']}, judge {pair['judge']['pairs']} "
        f"(rho {pair['rho']}, judge pairs trained: {pair['trained_on_judge_pairs']})",
        f"DPO        {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses
        else "DPO        no steps",
    ]
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
    return "\n".join(lines)
