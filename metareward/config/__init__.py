"""Typed configuration of a metareward run, and building it from Hydra overrides.

The dataclasses are registered in Hydra's ConfigStore as the schema behind ``conf/config.yaml``; Hydra
composes the YAML files on top of them, and :func:`to_config` turns the result into these dataclasses,
checking every setting before any model is loaded. Each default lives in the dataclasses, once: the YAML
files set only what differs. Code below the entry points only ever sees these dataclasses, never a
``DictConfig``. Config is the bottom layer: it imports nothing else of metareward.

A refused setting is named by its full dotted key as the user typed it
(``roles.meta_judge.generator.batch_size``, not ``generator.batch_size``).

Where things are:

- ``schema``: :class:`Config`, the root, and the tracking and cluster sections;
  ``models``, ``data``, ``stages``, ``evaluation``, ``training``: the other sections.
- ``checks``: how a field declares what it allows (:func:`~metareward.config.checks.setting`), and the
  one loop that checks a config and names each refusal at its place.
- ``choices``: the names each choice setting accepts; ``templates``: the prompt templates' placeholders.
- ``loading``: Hydra glue (:func:`register_configs`, :func:`to_config`, :func:`load_config`,
  :func:`override_error`).

Every name the rest of metareward imports is importable from here.
"""

from metareward.config.checks import NO_VALUE, ConfigError, Section
from metareward.config.choices import (
    ALIGN_OBJECTIVES,
    CLUSTER_KINDS,
    DATA_KINDS,
    DTYPES,
    EVAL_PROTOCOLS,
    GENERATOR_BACKENDS,
    LAUNCHERS,
    LONG_PROMPTS,
    MODEL_KINDS,
    ON_ALARM,
    ON_NO_PAIRS,
    PAIRWISE_SIGNALS,
    PLACEMENT_STRATEGIES,
    POINTWISE_SIGNALS,
    PRECISIONS,
    SCORE_SOURCES,
    SUITE_ENTRY_KEYS,
    TRACKING_MODES,
    WINNER_SOURCES,
)
from metareward.config.data import DataConfig, SynthesisConfig
from metareward.config.evaluation import EvalConfig, EvalEscalationConfig, RecordedConfig
from metareward.config.loading import load_config, override_error, register_configs, to_config
from metareward.config.models import (
    GeneratorConfig,
    ModelConfig,
    ModelSpec,
    OpenAISettings,
    RoleModelConfig,
    RolesConfig,
    VLLMSettings,
)
from metareward.config.schema import ClusterConfig, Config, TrackingConfig
from metareward.config.stages import (
    ActorConfig,
    EscalationConfig,
    GuardsConfig,
    JudgeConfig,
    MetaJudgeConfig,
    PairsConfig,
    Sampling,
)
from metareward.config.training import (
    ACCELERATE_CONFIGS,
    DEFAULT_ACCELERATE_CONFIG,
    AlignConfig,
    DPOSettings,
    FineTuning,
    JudgeAlignmentConfig,
    TrainConfig,
)

__all__ = [
    "ACCELERATE_CONFIGS",
    "ALIGN_OBJECTIVES",
    "CLUSTER_KINDS",
    "DATA_KINDS",
    "DEFAULT_ACCELERATE_CONFIG",
    "DTYPES",
    "EVAL_PROTOCOLS",
    "GENERATOR_BACKENDS",
    "LAUNCHERS",
    "LONG_PROMPTS",
    "MODEL_KINDS",
    "NO_VALUE",
    "ON_ALARM",
    "ON_NO_PAIRS",
    "PAIRWISE_SIGNALS",
    "PLACEMENT_STRATEGIES",
    "POINTWISE_SIGNALS",
    "PRECISIONS",
    "SCORE_SOURCES",
    "SUITE_ENTRY_KEYS",
    "TRACKING_MODES",
    "WINNER_SOURCES",
    "ActorConfig",
    "AlignConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DPOSettings",
    "DataConfig",
    "EscalationConfig",
    "EvalConfig",
    "EvalEscalationConfig",
    "RecordedConfig",
    "FineTuning",
    "GeneratorConfig",
    "GuardsConfig",
    "JudgeAlignmentConfig",
    "JudgeConfig",
    "MetaJudgeConfig",
    "ModelConfig",
    "ModelSpec",
    "OpenAISettings",
    "PairsConfig",
    "RoleModelConfig",
    "RolesConfig",
    "Sampling",
    "Section",
    "SynthesisConfig",
    "TrackingConfig",
    "TrainConfig",
    "VLLMSettings",
    "load_config",
    "override_error",
    "register_configs",
    "to_config",
]
