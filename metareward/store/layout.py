"""Every file and folder name of a run directory, ``runs/<run_name>/``, in one place.

    runs/<run_name>/
      config.yaml  .metareward.lock  eval_0.json  best.json  report.html  report/  wandb/  wandb_run_id
      cache/         answers of endpoint backends (a resumed run pays for no call twice)
      ray_train/     Ray Train's own files of each training job (cluster=ray)
      heldout/M_<t>/ each evaluated model's held-out answers (AlpacaEval's and FastChat's formats:
                     alpaca_eval_model_outputs.json, model_answer/<run>-M_<t>.jsonl)
      prompt_pool.jsonl  prompt_pool.json  prompt_pool_rejected.jsonl   (data=synthetic)
      align/         the judge alignment: metrics.json, heldout_before.json, checkpoints/, model/
      iter_<t>/      prompts.jsonl responses.jsonl judgements.jsonl meta_judgements.jsonl
                     actor_pairs.jsonl judge_pairs.jsonl metrics.json eval.json prompt_fit.json
                     model/ (with training_log.json)  train_job/ (job.json, pairs.jsonl)
                     checksums.json (what each finished stage file holds)
                     README.md (the dataset card: configs actor, judge and trained)
                     <stage file>.parts/ while a stage is under way

Names only: the modules that write these files import them from here, and nothing else spells one.
"""

from __future__ import annotations

import re
from pathlib import Path

# --- the run directory ----------------------------------------------------------------------------
CONFIG = "config.yaml"
LOCK = ".metareward.lock"
# Judge skill of the seed model M_0 (before iteration 1); M_t's is EVAL in iter_<t>/.
EVAL_0 = "eval_0.json"
# The iteration whose judge is most accurate on eval.select_by.
BEST = "best.json"
CACHE = "cache"
RAY_TRAIN = "ray_train"
HELDOUT = "heldout"
REPORT_HTML = "report.html"
REPORT_PLOTS = "report"
WANDB_DIR = "wandb"
WANDB_RUN_ID = "wandb_run_id"
# data=synthetic: the prompter's pool, its statistics and what it left out.
POOL = "prompt_pool.jsonl"
POOL_STATS = "prompt_pool.json"
POOL_REJECTED = "prompt_pool_rejected.jsonl"

# --- align/: the judge alignment (the EFT step, metareward-align-judge) ----------------------------
ALIGN_DIR = "align"
ALIGN_METRICS = "metrics.json"
ALIGN_BEFORE = "heldout_before.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_SETTINGS = "settings.json"

# --- iter_<t>/ ------------------------------------------------------------------------------------
ITERATION_PREFIX = "iter_"
PROMPTS = "prompts.jsonl"
RESPONSES = "responses.jsonl"
JUDGEMENTS = "judgements.jsonl"
META_JUDGEMENTS = "meta_judgements.jsonl"
ACTOR_PAIRS = "actor_pairs.jsonl"
JUDGE_PAIRS = "judge_pairs.jsonl"
METRICS = "metrics.json"
EVAL = "eval.json"
# The iteration's dataset card: its YAML configs make the folder a Hugging Face dataset.
DATASET_CARD = "README.md"
# How many of an iteration's prompts were kept, skipped as too long, or truncated (data.long_prompts).
PROMPT_FIT = "prompt_fit.json"
MODEL = "model"
# Saved inside the model directory, so that a model and its training log appear together or not at all.
TRAINING_LOG = "training_log.json"
# M_t's model card (written into the model directory once the iteration is measured).
MODEL_CARD = "README.md"
# A DPO job run in other processes (accelerate or Ray Train): its settings and the pairs it trains on.
TRAIN_JOB = "train_job"
JOB = "job.json"
JOB_PAIRS = "pairs.jsonl"
# Row count and per-row checksums of each finished stage file of the folder (prompts, responses, ...,
# the prompt pool), recorded before the file is written: a file edited, cut or extended since is found.
CHECKSUMS = "checksums.json"
# A stage file's chunks while the stage is under way, and a damaged one set aside.
PARTS_SUFFIX = ".parts"
DAMAGED_SUFFIX = ".damaged"
# The files whose rows are checked against checksums.json (with the escalation stages' *_local and
# *_strong files beside them).
STAGE_FILES = (PROMPTS, RESPONSES, JUDGEMENTS, META_JUDGEMENTS, POOL, POOL_REJECTED)
# An iteration's files in the order the loop makes them (where_stopped reports the first one missing).
ITERATION_FILES = [PROMPTS, RESPONSES, JUDGEMENTS, META_JUDGEMENTS, ACTOR_PAIRS, JUDGE_PAIRS, MODEL, METRICS]

# --- heldout/M_<t>/ -------------------------------------------------------------------------------
ALPACA_EVAL_OUTPUTS = "alpaca_eval_model_outputs.json"
# FastChat's layout: model_answer/<model_id>.jsonl (MT-Bench's judge names the model by the file).
FASTCHAT_ANSWER_DIR = "model_answer"


def iter_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"{ITERATION_PREFIX}{iteration}"


def iteration_of(directory: Path) -> int | None:
    """t for a folder named iter_<t>, else None."""
    match = re.fullmatch(rf"{ITERATION_PREFIX}(\d+)", directory.name)
    return int(match[1]) if match else None


def iteration_dirs(run_dir: Path) -> list[Path]:
    """The run's iter_<t>/ folders, by t."""
    found = [(t, p) for p in run_dir.glob(f"{ITERATION_PREFIX}*") if (t := iteration_of(p)) is not None]
    return [p for _, p in sorted(found) if p.is_dir()]


def heldout_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / HELDOUT / f"M_{iteration}"
