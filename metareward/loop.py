"""Iterations and resume: the one place that decides the order of work and touches the run directory.

Iteration t uses M_{t-1} (M_0 = the seed) in all three roles and trains M_t from it:
prompts -> actor -> judge -> meta-judge -> pairs -> DPO. A stage whose file is complete is
skipped on resume; an iteration is finished once its ``metrics.json`` exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from metareward import evaluation, pairs, records, stages
from metareward.config import Config
from metareward.data import fit_prompts, load_prompts, prompts_for_iteration
from metareward.generation import Generator, Usage, make_generator
from metareward.metrics import iteration_metrics
from metareward.models import resolve_model
from metareward.prompts import Templates
from metareward.records import ChunkedFile, iter_dir, read_jsonl, write_json, write_jsonl
from metareward.tracking import make_tracker

# Settings that may change between a run and its resumption without changing any finished work.
EVAL_0 = "eval_0.json"
EVAL = "eval.json"
CACHE = "cache"
# How many of an iteration's prompts were kept, skipped as too long, or truncated (data.long_prompts).
PROMPT_FIT = "prompt_fit.json"
ROLE_FILES = {"actor": records.RESPONSES, "judge": records.JUDGEMENTS, "meta_judge": records.META_JUDGEMENTS}
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


# Each stage file's rows point at rows of the file before it: (file, key, file it points into, key there).
STAGE_LINKS = [
    (records.RESPONSES, "prompt_id", records.PROMPTS, "prompt_id"),
    (records.JUDGEMENTS, "response_id", records.RESPONSES, "response_id"),
    (records.META_JUDGEMENTS, "first_id", records.JUDGEMENTS, "judgement_id"),
    (records.META_JUDGEMENTS, "second_id", records.JUDGEMENTS, "judgement_id"),
]
ROW_IDS = {records.RESPONSES: "response_id", records.JUDGEMENTS: "judgement_id"}


def check_stage_files(directory: Path) -> None:
    """Refuse stage files that no longer fit together (e.g. edited by hand): every row must point at
    an existing row of the stage before it, and ids must be unique. The error names file and line."""
    for name, key, parent, parent_key in STAGE_LINKS:
        known = {row.get(parent_key) for row in read_jsonl(directory / parent)}
        for line, row in records.read_jsonl_numbered(directory / name):
            if row.get(key) not in known:
                raise RunStopped(
                    f"{directory / name}:{line}: {key} {row.get(key)!r} is not in {parent}; the stage "
                    f"files of {directory.name} no longer match (delete {name} and later files to redo them)"
                )
    for name, key in ROW_IDS.items():
        first_line: dict = {}
        for line, row in records.read_jsonl_numbered(directory / name):
            value = row.get(key)
            if value in first_line:
                raise RunStopped(
                    f"{directory / name}:{line}: {key} {value!r} already on line {first_line[value]}"
                )
            first_line[value] = line


def _no_pairs_reason(stats: dict) -> str:
    actor = stats["actor"]
    reasons = [
        f"{key.removeprefix('skipped_').replace('_', ' ')}: {value} prompt(s)"
        for key, value in actor.items()
        if key.startswith("skipped_") and value
    ]
    return "; ".join(reasons) or "no prompts"


def check_writable(run_dir: Path) -> None:
    """Fail before any model loads if the run directory cannot be created or written."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunStopped(f"cannot write to the run directory {run_dir}: {error.strerror or error}") from None


class Run:
    """One metareward run directory, driven iteration by iteration."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / cfg.run_name
        self.templates = Templates.load(cfg.judge.template, cfg.meta_judge.template)

    def run(self) -> list[dict]:
        """Run (or resume) iterations 1..T; returns each iteration's metrics."""
        cfg = self.cfg
        check_writable(self.dir)
        # Bad prompts or a bad model path fail before config.yaml exists: a run that never started
        # leaves no config that would then refuse the corrected one.
        all_prompts = load_prompts(cfg.data)
        self.seed_dir = model_dir = resolve_model(cfg.model)
        check_run_config(self.dir, cfg)
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
        generator = make_generator(model_dir, cfg.model, cfg.generator, cache_dir=self.dir / CACHE)
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
            evaluator = make_generator(
                evaluator_dir, evaluator_spec or cfg.model, cfg.generator, cache_dir=self.dir / CACHE
            )
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
            fitted, counts = self._fit_prompts(chosen_prompts, model_dir)
            write_json(directory / PROMPT_FIT, counts)
            write_jsonl(directory / records.PROMPTS, fitted)
        prompts = read_jsonl(directory / records.PROMPTS)
        if not prompts:
            raise RunStopped(
                f"iteration {t} has no prompts that fit the model's context "
                f"({records.read_json(directory / PROMPT_FIT)}); "
                "see data.max_prompt_tokens and data.long_prompts"
            )

        generators, shared = self._role_generators(directory, model_dir)
        usage: dict[str, dict] = {}
        try:

            def context(role: str) -> stages.StageContext:
                return stages.StageContext(
                    generators[role], self.templates, cfg.seed, t, cfg.generator.chunk_size
                )

            def spend(role: str, stage):
                generator = generators[role]
                before = generator.usage.copy() if generator else Usage()
                result = stage()
                usage[role] = (generator.usage if generator else Usage()).since(before)
                return result

            responses = spend(
                "actor",
                lambda: stages.actor(
                    context("actor"), prompts, cfg.actor, ChunkedFile(directory / records.RESPONSES)
                ),
            )
            judgements = spend(
                "judge",
                lambda: stages.judge(
                    context("judge"),
                    prompts,
                    responses,
                    cfg.judge,
                    ChunkedFile(directory / records.JUDGEMENTS),
                ),
            )
            verdicts = spend(
                "meta_judge",
                lambda: stages.meta_judge(
                    context("meta_judge"),
                    prompts,
                    responses,
                    judgements,
                    cfg.meta_judge,
                    ChunkedFile(directory / records.META_JUDGEMENTS),
                ),
            )
        finally:
            # The engines give their (GPU) memory back before training starts.
            for generator in shared:
                generator.close()

        check_stage_files(directory)
        actor_rows, judge_rows, pair_stats = build_pairs(directory, cfg, t, self.templates)
        if not ((directory / records.ACTOR_PAIRS).is_file() and (directory / records.JUDGE_PAIRS).is_file()):
            write_pairs(directory, actor_rows, judge_rows)
        train_judge = t in cfg.train.judge_iterations
        rows = actor_rows + (judge_rows if train_judge else [])
        if rows:
            training = self._train(model_dir, rows, directory, t)
        else:
            reason = (
                f"iteration {t} produced no preference pairs ({_no_pairs_reason(pair_stats)}); "
                f"see {directory} for the responses and judgements"
            )
            if cfg.train.on_no_pairs == "stop":
                raise RunStopped(reason + "; train.on_no_pairs=carry would go on with the model unchanged")
            print(f"metareward: {reason}; M_{t} = M_{t - 1} (train.on_no_pairs=carry)", flush=True)
            training = carry_forward(model_dir, directory / records.MODEL, reason)
        if cfg.eval.enabled and not (directory / EVAL).is_file():
            write_json(directory / EVAL, self._evaluate(str(directory / records.MODEL), iteration=t))
        evaluated = records.read_json(directory / EVAL) if cfg.eval.enabled else {}
        metrics = {
            "iteration": t,
            "prompts": len(prompts),
            "prompt_fit": records.read_json(directory / PROMPT_FIT)
            if (directory / PROMPT_FIT).is_file()
            else {},
            **iteration_metrics(
                prompts, responses, judgements, verdicts, actor_rows, judge_rows, pair_stats, training
            ),
            # TRL's own log, step by step, beside the summary numbers above.
            "train_log": training["log_history"],
            "pairs": {**pair_stats, "rho": cfg.pairs.rho_for(t), "trained_on_judge_pairs": train_judge},
            "eval": evaluated.get("judge", {}),
            "eval_actor": evaluated.get("actor", {}),
            # Generation spent by each stage in the invocation that ran it (0 for a stage found on disk).
            "usage": {role: usage.get(role, asdict(Usage())) for role in ROLE_FILES},
        }
        write_json(directory / records.METRICS, metrics)

    def _train(self, model_dir: str, rows: list[dict], directory: Path, t: int) -> dict:
        from metareward.training import TRAINING_LOG, train_dpo

        out = directory / records.MODEL
        train = self.cfg.train
        if not (out / "config.json").is_file():
            common = {"seed": self.cfg.seed + t, "trust_remote_code": self.cfg.model.trust_remote_code}
            if train.launcher == "accelerate":
                from metareward.training import launch_dpo

                job_dir = directory / "train_job"
                launch_dpo(
                    model_dir,
                    rows,
                    train.dpo,
                    out,
                    job_dir=job_dir,
                    accelerate_config=train.accelerate_config,
                    **common,
                )
            else:
                train_dpo(model_dir, rows, train.dpo, out, **common)
        return records.read_json(out / TRAINING_LOG)

    def _fit_prompts(self, prompts: list[dict], model_dir: str) -> tuple[list[dict], dict]:
        """Leave out (or truncate) prompts too long for the model, counting them."""
        from transformers import AutoConfig, AutoTokenizer

        trust = self.cfg.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        limit = self.cfg.data.max_prompt_tokens
        if limit is None:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
            # Text models keep it at the top; some multimodal configs only in their text part.
            context = getattr(config.get_text_config(), "max_position_embeddings", None)
            if context is None:  # the model states no context length: nothing to check against
                return prompts, {"kept": len(prompts), "skipped_too_long": 0, "truncated": 0}
            limit = max(context - self.cfg.actor.max_new_tokens, 1)
        return fit_prompts(prompts, tokenizer, limit, self.cfg.data.long_prompts)

    def _role_generators(self, directory: Path, model_dir: str) -> tuple[dict, list[Generator]]:
        """A generator for each role whose stage still has work; roles played by the same model through
        the same backend share one (the paper's default: one engine for all three roles)."""
        made: dict[str, Generator] = {}
        by_role: dict[str, Generator | None] = {}
        for role, name in ROLE_FILES.items():
            if (directory / name).is_file():
                by_role[role] = None
                continue
            spec = getattr(self.cfg.roles, role)
            if spec.own_model:
                key = json.dumps([asdict(spec.model), asdict(spec.generator)], sort_keys=True)
            else:
                key = "trained"
            if key not in made:
                if spec.own_model:
                    made[key] = make_generator(
                        self._own_model_dir(spec), spec.model, spec.generator, cache_dir=self.dir / CACHE
                    )
                else:
                    made[key] = make_generator(
                        model_dir, self.cfg.model, self.cfg.generator, self.dir / CACHE
                    )
            by_role[role] = made[key]
        return by_role, list(made.values())

    @staticmethod
    def _own_model_dir(spec) -> str:
        # A model behind an API is a name, not a directory; its tokenizer is used when one is at hand.
        if spec.generator.backend == "openai" and spec.model.kind == "hf":
            return spec.model.path or ""
        return resolve_model(spec.model)


def carry_forward(model_dir: str, out: Path, reason: str) -> dict:
    """M_t = M_{t-1}: copy the model directory whole (temp dir, then rename), with a training log
    that says why nothing was trained."""
    from metareward.training import TRAINING_LOG

    log = {"log_history": [], "train_pairs": 0, "global_steps": 0, "carried_forward": True, "reason": reason}
    if not (out / "config.json").is_file():
        tmp = out.parent / (out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns(TRAINING_LOG))
        (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
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
