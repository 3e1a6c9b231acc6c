"""Building a :class:`~metareward.config.schema.Config` from Hydra: the schema registered in Hydra's
ConfigStore (``conf/config.yaml`` composes on top of it), a composed config turned into the dataclasses
and checked, the defaults or a run's saved ``config.yaml`` with overrides, and one line for an override
Hydra or OmegaConf refused."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from metareward.config.checks import ConfigError, check, unchecked
from metareward.config.schema import Config


def register_configs() -> None:
    """Make the schema available to Hydra as ``metareward_schema`` (used by conf/config.yaml)."""
    ConfigStore.instance().store(name="metareward_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed Hydra config into :class:`Config`, validating every setting.

    Raises :class:`ConfigError` naming the setting by its full key; no model is loaded here.
    """
    if "hydra" in cfg:  # a callback's view: Hydra's own node holds values only set once the job runs
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    try:
        # Merging onto the schema checks every key and type (OmegaConf names the full key).
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=True))
        with unchecked():  # checked below as one tree, so that each refusal is named at its place
            config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        message = getattr(error, "msg", None) or str(error)
        raise ConfigError(key, why=message.splitlines()[0]) from None
    check(config)
    return config


def load_config(run_config: Path | None, overrides: list[str]) -> Config:
    """The defaults (or a run's saved ``config.yaml``) with ``key=value`` overrides, validated.

    For the commands that are not Hydra apps (``metareward-pairs``, ``metareward-eval-judge``) and
    for scripts and tests; raises :class:`ConfigError` naming the setting."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_configs()
    try:
        if run_config is not None and run_config.is_file():
            base = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_config))
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        else:
            with initialize_config_module("metareward.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
    except (OmegaConfBaseException, HydraException) as error:
        raise override_error(error) from None
    return to_config(cfg)


def override_error(error: Exception) -> ConfigError:
    """One line for an override Hydra or OmegaConf refused: the key as typed and why.

    Read from the exceptions' public attributes: a missing group option's ``missing_cfg_file`` and
    ``options``, a malformed override's ``override``, OmegaConf's ``full_key`` and its error type (an
    unknown key is a ``ConfigKeyError`` or ``ConfigAttributeError``); else the message's first line."""
    cause = error.__cause__ or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if isinstance(cause, MissingConfigException) and cause.options is not None:  # no such group option
        group, _, option = (cause.missing_cfg_file or "").rpartition("/")
        listing = f" (options: {', '.join(cause.options)})" if cause.options else ""
        return ConfigError(group, option, f"no such option{listing}")
    if isinstance(error, OverrideParseException):  # a malformed override, e.g. an unclosed bracket
        return ConfigError(error.override, why=f"not a valid override ({lines[0] if lines else 'syntax'})")
    key = getattr(cause, "full_key", None) or getattr(error, "full_key", None)
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        why = "no such setting"
    else:  # anything else: the first line says what
        why = lines[0] if lines else type(error).__name__
    return ConfigError(key or "override", why=why)
