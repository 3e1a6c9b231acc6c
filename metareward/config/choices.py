"""The names each choice setting accepts, one tuple per setting (its refusal lists them in this order).

They stay plain strings: a config's values are what the YAML files, the saved ``config.yaml``, W&B and
every ``cfg.kind == "hf"`` in the code see.
"""

from __future__ import annotations

MODEL_KINDS = ("smollm2_135m", "hf", "tiny")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
GENERATOR_BACKENDS = ("hf", "vllm", "openai")
LAUNCHERS = ("inline", "accelerate")
# TRL's DPO losses that train on chosen/rejected pairs as the iterations write them (aot_unpaired is for
# unpaired batches); RPO is train.dpo.rpo_alpha, which adds TRL's "sft" term to the loss.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# Where a run's engines and training processes run: this process and its machine, or a Ray cluster.
CLUSTER_KINDS = ("none", "ray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ON_NO_PAIRS = ("stop", "carry")
LONG_PROMPTS = ("skip", "truncate")
DATA_KINDS = ("bundled", "jsonl", "hf", "synthetic")
# What a guard alarm does: log a warning and go on, or end the run before the iteration trains.
ON_ALARM = ("warn", "stop")
TRACKING_MODES = ("wandb", "offline", "none")
SCORE_SOURCES = ("text", "text_or_expected")
# How a judge is asked about a preference pair: each response scored with the rubric, or both in one prompt.
EVAL_PROTOCOLS = ("pointwise", "pairwise")
# A suite entry: a file ({path}) or a Hugging Face dataset ({hf, split, revision, subset}), named and
# of a declared format where given.
SUITE_ENTRY_KEYS = ("path", "hf", "split", "revision", "subset", "name", "format")
WINNER_SOURCES = ("text", "text_or_probs")
# What metareward-align-judge trains toward: the human label distribution, or its majority label.
ALIGN_OBJECTIVES = ("distribution", "point")
# How sure the local judge is of an answer (escalation.py defines each): pointwise judgements (the rubric
# judge's 0..5 scores) and pairwise verdicts (A or B) each have their own; random is the control.
POINTWISE_SIGNALS = ("margin", "entropy", "spread", "random")
PAIRWISE_SIGNALS = ("margin", "order", "random")
# Any of them, in that order without repeats (escalation.signal before the stage's own check).
SIGNALS = tuple(dict.fromkeys(POINTWISE_SIGNALS + PAIRWISE_SIGNALS))
