"""Behaviour tests for the config: every shipped YAML composes and validates, bad values fail early
with a message naming the setting, and the console script fails before loading any model."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from metareward.config import (
    ACCELERATE_CONFIGS,
    ActorConfig,
    AlignConfig,
    Config,
    ConfigError,
    FineTuning,
    GeneratorConfig,
    JudgeConfig,
    MetaJudgeConfig,
    PairsConfig,
    Sampling,
    Section,
    SynthesisConfig,
    load_config,
    register_configs,
    to_config,
)
from metareward.config.checks import OneOf, Range, place_of, rules_of
from tests.helpers import REPO, run_cli

# The configs as the installed package finds them (the top-level conf/ in an editable install).
CONF = Path(str(resources.files("metareward.conf")))
NOT_GROUPS = ("experiment", "__pycache__")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_GROUPS)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

register_configs()


def compose_config(overrides: list[str]):
    with initialize_config_module("metareward.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def build(overrides: list[str]) -> Config:
    return to_config(compose_config(overrides))


def leaves(node, prefix: str = ""):
    """(dotted key, value) for every non-dict value of a parsed YAML mapping."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def lookup(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def required_extras(group: str, option: str, tmp_path: Path) -> list[str]:
    """Overrides an option needs to be complete (its `???` values)."""
    if (group, option) == ("model", "hf"):
        return [f"model.path={tmp_path}"]
    if (group, option) == ("data", "jsonl"):
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "hello"}\n', encoding="utf-8")
        return [f"data.path={prompts}"]
    if (group, option) in {("data", "hf"), ("data", "hf_dataset")}:
        return ["data.hf_name=x"]
    return []


# ---------------------------------------------------------------- the YAML files


def test_conf_layout_is_found():
    # Guards the parametrisation below against silently testing nothing.
    assert {"model", "data", "generator"} <= set(GROUPS)
    assert "demo" in EXPERIMENTS
    assert {"hf", "smollm2_135m", "tiny"} <= {p.stem for p in (CONF / "model").glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_starts_with_a_comment(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines, f"{path} is empty"
    first = lines[0]
    if path.parent.name == "experiment" and first.strip() == "# @package _global_":
        # The package directive is not documentation: a real comment must follow it.
        assert len(lines) > 1 and lines[1].startswith("#") and lines[1].strip("# "), path
    else:
        assert first.startswith("#") and first.strip("# "), f"{path} does not start with a comment line"
        assert not first.startswith("# @package"), f"{path}: only a package directive, no comment"


OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path):
    extras = required_extras(group, option, tmp_path)
    config = build([f"{group}={option}", *extras])
    assert isinstance(config, Config)
    # Every value the option's file sets reaches the typed config (unless an extra override set it).
    overridden = {extra.split("=", 1)[0] for extra in extras}
    values = yaml.safe_load((CONF / group / f"{option}.yaml").read_text(encoding="utf-8")) or {}
    values.pop("defaults", None)  # another option this one pulls in (a former name), not settings
    for key, value in leaves(values, f"{group}."):
        if key in overridden:
            continue
        assert value != "???", f"{group}={option}: {key} is mandatory but no extra override was given"
        assert lookup(config, key) == value, key


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name: str):
    config = build([f"experiment={name}"])
    values = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text(encoding="utf-8"))
    values.pop("defaults", None)  # group choices (e.g. `override /generator: vllm`), not settings
    for key, value in leaves(values):
        assert lookup(config, key) == value, key


def test_demo_experiment_values():
    config = build(["experiment=demo"])
    assert config.run_name == "demo"
    assert config.iterations == 2
    assert config.model.kind == "smollm2_135m"
    assert config.judge.score_from == "text_or_expected"
    assert config.meta_judge.winner_from == "text_or_probs"
    assert config.actor.num_responses == 3


def test_overrides_apply_on_top_of_an_experiment():
    config = build(["experiment=demo", "iterations=3", "model=tiny"])
    assert config.iterations == 3
    assert config.model.kind == "tiny"
    assert config.run_name == "demo"


def test_defaults_are_the_paper_settings():
    config = build([])
    assert config.model.kind == "smollm2_135m"
    assert config.data.path is None and config.data.hf_name is None
    assert config.actor.num_responses == 4
    assert config.judge.num_judgements == 3
    assert config.judge.score_from == "text"
    assert config.pairs.rho == 0.0


# ---------------------------------------------------------------- bad values


BAD = [
    (["actor.num_responses=1"], "actor.num_responses", "1"),
    (["judge.num_judgements=0"], "judge.num_judgements", "0"),
    (["pairs.rho=0.5"], "pairs.rho", "0.5"),
    (["pairs.rho=[0.1,0.6]"], "pairs.rho", "0.6"),
    (["actor.temperature=-1"], "actor.temperature", "-1"),
    (["data.path=/nonexistent"], "data.path", "/nonexistent"),
    (["model=hf"], "model.path", "None"),
    (["judge.score_from=bogus"], "judge.score_from", "bogus"),
    (["meta_judge.winner_from=bogus"], "meta_judge.winner_from", "bogus"),
    (["actor.top_p=0"], "actor.top_p", "0"),
    (["iterations=0"], "iterations", "0"),
    (["model.kind=gpt5"], "model.kind", "gpt5"),
    (["train.dpo.precision=fp16"], "train.dpo.precision", "fp16"),
    # Nested role and evaluator specs are named where the user set them, not where the section
    # usually sits.
    (["roles.meta_judge.generator.batch_size=0"], "roles.meta_judge.generator.batch_size", "0"),
    (["roles.judge.model.dtype=fp8"], "roles.judge.model.dtype", "fp8"),
    (["roles.actor.model.kind=hf"], "roles.actor.model.path", "None"),
    (["roles.judge.generator.vllm.max_model_len=8"], "roles.judge.generator.vllm.max_model_len", "8"),
    (["generator.vllm.cpu_kv_cache_gib=0"], "generator.vllm.cpu_kv_cache_gib", "0"),
    (["generator.vllm.cpu_threads=0"], "generator.vllm.cpu_threads", "0"),
    (["generator.vllm.enforce_eager=maybe"], "generator.vllm.enforce_eager", "maybe"),
    (
        ["roles.meta_judge.generator.openai.base_urls=[ftp://x]"],
        "roles.meta_judge.generator.openai.base_urls",
        "ftp://x",
    ),
    (["roles.judge.generator.backend=tgi"], "roles.judge.generator.backend", "tgi"),
    (["eval.evaluator.model.kind=gpt5"], "eval.evaluator.model.kind", "gpt5"),
    (["eval.evaluator.generator.chunk_size=0"], "eval.evaluator.generator.chunk_size", "0"),
    (["eval.evaluator.generator.openai.timeout_s=0"], "eval.evaluator.generator.openai.timeout_s", "0"),
    (["eval.evaluator.kind=tiny"], "eval.evaluator.kind", "no such setting"),
    (["roles.meta_judge.generator.batch_sise=2"], "roles.meta_judge.generator.batch_sise", "no such setting"),
    (["roles.judge.generator.batch_size=abc"], "roles.judge.generator.batch_size", "abc"),
    (["foo=1"], "foo", "no such setting"),
    (["model=gpt5"], "model", "gpt5"),
    # An unbounded number is no bound: a timeout or budget of inf would never end a wait or a pool.
    (["generator.openai.timeout_s=inf"], "generator.openai.timeout_s", "inf"),
    (["data.synthetic.request_budget=inf"], "data.synthetic.request_budget", "inf"),
    (["actor.temperature=nan"], "actor.temperature", "nan"),
    # "." and ".." would write the run's files into runs_dir itself, or above it.
    (["run_name=."], "run_name", "'.'"),
    (["run_name=.."], "run_name", "'..'"),
]


@pytest.mark.parametrize(("overrides", "setting", "value"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_raise_config_error_naming_setting_and_value(overrides, setting, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    # The full key starts the message: no shorter key (generator.batch_size) stands in for it.
    assert message.startswith(setting), message
    assert value in message
    assert "\n" not in message


@pytest.mark.parametrize(("overrides", "setting", "value"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_cli_names_every_bad_setting_in_one_line(overrides, setting, value, tmp_path: Path):
    cache = tmp_path / "cache"
    result = run_script(overrides, tmp_path, cache)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"metareward: error: {setting}") and value in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
    assert_no_model_loaded(cache)


def test_a_section_built_directly_is_named_at_its_usual_place():
    with pytest.raises(ConfigError, match=r"^generator\.batch_size=0: must be >= 1$"):
        GeneratorConfig(batch_size=0)


def test_the_evaluator_is_set_like_a_roles_model(tmp_path: Path):
    config = load_config(None, ["eval.evaluator.own_model=true", "eval.evaluator.model.kind=tiny"])
    assert config.eval.evaluator.own_model and config.eval.evaluator.model.kind == "tiny"
    assert load_config(None, []).eval.evaluator.own_model is False  # the default: M_0 judges


# ---------------------------------------------------------------- each default once


def _schema_defaults(section, prefix: str = "") -> dict:
    values = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            values.update(_schema_defaults(value, f"{prefix}{f.name}."))
        else:
            values[f"{prefix}{f.name}"] = value
    return values


SCHEMA_DEFAULTS = _schema_defaults(Config())
SETTING_FILES = [p for p in sorted(CONF.rglob("*.yaml")) if p.name != "config.yaml"]


@pytest.mark.parametrize("path", SETTING_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_files_set_only_what_differs_from_the_schema(path: Path):
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    values.pop("defaults", None)
    prefix = "" if path.parent.name == "experiment" else f"{path.parent.name}."
    for key, value in leaves(values, prefix):
        assert key in SCHEMA_DEFAULTS, f"{path.name}: {key} is not a setting of the schema"
        assert value != SCHEMA_DEFAULTS[key], f"{path.name}: {key}={value!r} repeats the schema default"


def test_a_roles_own_model_gets_the_same_defaults_as_the_run_model():
    config = load_config(None, ["model=hf", f"model.path={REPO}"])
    assert config.model.dtype == config.roles.judge.model.dtype == config.eval.evaluator.model.dtype == "auto"


# ---------------------------------------------------------------- installed as a wheel


def test_a_built_wheel_carries_the_configs_and_composes_the_default(tmp_path: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("metareward-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CONF.rglob("*.yaml"):
        assert f"metareward/conf/{path.relative_to(CONF).as_posix()}" in names
    assert "metareward/accelerate_configs/deepspeed_zero3.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # From the unpacked wheel alone (not the source tree): compose the default config and an experiment.
    code = (
        "import metareward, metareward.conf; from metareward.config import load_config; "
        "c = load_config(None, ['experiment=demo']); "
        "print(metareward.__file__); print(metareward.conf.__file__); print(c.run_name, c.model.kind)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    package, conf, composed = done.stdout.splitlines()
    assert package.startswith(str(site)) and conf.startswith(str(site))
    assert composed == "demo smollm2_135m"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_data_jsonl_without_path_is_refused():
    with pytest.raises(ConfigError, match=r"data\.path"):
        build(["data=jsonl"])


def test_data_hf_dataset_without_name_is_refused():
    with pytest.raises(ConfigError, match=r"data\.hf_name"):
        build(["data=hf_dataset"])


def test_rho_list_is_accepted_and_per_iteration():
    config = build(["pairs.rho=[0.1,0.2]"])
    assert [config.pairs.rho_for(t) for t in (1, 2, 3, 7)] == [0.1, 0.2, 0.2, 0.2]


def test_rho_for():
    assert [PairsConfig(rho=[0.0, 0.25, 0.4]).rho_for(t) for t in (1, 2, 3, 4, 10)] == [
        0.0,
        0.25,
        0.4,
        0.4,
        0.4,
    ]
    assert PairsConfig(rho=0.3).rho_for(1) == 0.3
    assert PairsConfig(rho=0.3).rho_for(5) == 0.3
    with pytest.raises(ConfigError, match="pairs.rho"):
        PairsConfig(rho=[])
    with pytest.raises(ConfigError, match="pairs.rho"):
        PairsConfig(rho=True)


# ---------------------------------------------------------------- the console script


def run_script(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return run_cli(
        *args,
        unset=["HYDRA_FULL_ERROR"],
        extra_env={"METAREWARD_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
        cwd=cwd,
        timeout=120,
    )


def assert_no_model_loaded(cache: Path) -> None:
    names = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert not [n for n in names if "smollm2" in n], names


def test_cli_invalid_value_fails_with_one_line_naming_the_setting(tmp_path: Path):
    cache = tmp_path / "cache"
    result = run_script(["actor.num_responses=1"], tmp_path, cache)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    assert "actor.num_responses" in lines[-1]
    assert "1" in lines[-1].split("actor.num_responses", 1)[1]
    assert_no_model_loaded(cache)
    assert not (tmp_path / "runs" / "default" / "config.yaml").exists()


def test_cli_unknown_key_fails_naming_it(tmp_path: Path):
    cache = tmp_path / "cache"
    result = run_script(["foo=1"], tmp_path, cache)
    assert result.returncode != 0
    assert "foo" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_model_loaded(cache)


def test_cli_help(tmp_path: Path):
    result = run_script(["--help"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "model: hf, smollm2_135m, tiny" in result.stdout
    assert "experiment: demo" in result.stdout
    assert_no_model_loaded(tmp_path / "cache")


def test_cli_cfg_job_prints_the_resolved_config(tmp_path: Path):
    result = run_script(["--cfg", "job", "experiment=demo"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["run_name"] == "demo"
    assert "run_name: demo" in result.stdout.splitlines()
    assert printed["judge"]["score_from"] == "text_or_expected"
    assert printed["model"]["kind"] == "smollm2_135m"
    assert_no_model_loaded(tmp_path / "cache")


def test_shipped_accelerate_configs_are_valid_launch_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    from metareward.config import DEFAULT_ACCELERATE_CONFIG

    zero3 = load_config_from_file(str(DEFAULT_ACCELERATE_CONFIG))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
    # M_t is gathered in fp32 from the master weights (compute.master_weights), not as 16-bit copies.
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is False
    single = load_config_from_file(str(ACCELERATE_CONFIGS / "single_process.yaml"))
    assert single.num_processes == 1


# ---------------------------------------------------------------- declared rules and places


def _sections(section, where: str = ""):
    """(place, section) for ``section`` and every section inside it."""
    yield where, section
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Section):
            yield from _sections(value, f"{where}{f.name}.")


def _refused_value(rule, is_list: bool):
    """A value ``rule`` refuses (below a range's lower bound, a name it does not list, no file)."""
    if isinstance(rule, Range):
        low = float(re.findall(r"-?[\d.]+", rule.text)[0])
        value = int(low) - 1 if low == int(low) else low - 1
    elif isinstance(rule, OneOf):
        value = "bogus"
    else:
        value = "/nonexistent/file"
    return [value] if is_list else value


SECTION_CLASSES = sorted(
    {type(section) for _, section in _sections(Config())} | {FineTuning, Sampling}, key=lambda c: c.__name__
)


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.__name__)
def test_every_declared_rule_is_enforced_where_the_section_is_made(cls):
    for name, (rule, _, is_list) in rules_of(cls).items():
        value = _refused_value(rule, is_list)
        with pytest.raises(ConfigError) as info:
            cls(**{name: value})
        error = info.value
        shown = value[0] if is_list else value
        assert (error.key, error.value, error.where) == (name, shown, place_of(cls)), str(error)
        assert str(error).startswith(f"{place_of(cls)}{name}={shown!r}: "), str(error)


def test_a_subclass_that_changes_a_default_keeps_the_rule():
    assert rules_of(AlignConfig)["learning_rate"] == rules_of(FineTuning)["learning_rate"]
    assert rules_of(SynthesisConfig)["top_p"] == rules_of(Sampling)["top_p"]
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.top_p=0: must be in \(0, 1\]$"):
        SynthesisConfig(top_p=0)


PLACES = [
    (where, name) for where, section in _sections(Config()) for name in list(rules_of(type(section)))[:1]
]


@pytest.mark.parametrize(("where", "name"), PLACES, ids=[f"{w}{n}" for w, n in PLACES])
def test_a_refusal_is_named_at_the_place_the_section_sits(where: str, name: str):
    section = Config()
    for part in where.split(".")[:-1]:
        section = getattr(section, part)
    rule, _, is_list = rules_of(type(section))[name]
    value = _refused_value(rule, is_list)
    tree: dict = {}
    node = tree
    for part in where.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[name] = value
    with pytest.raises(ConfigError) as info:
        to_config(OmegaConf.create(tree))
    assert str(info.value).startswith(f"{where}{name}="), str(info.value)


def test_the_sampling_settings_are_declared_once():
    for cls in (ActorConfig, JudgeConfig, MetaJudgeConfig, SynthesisConfig):
        assert issubclass(cls, Sampling), cls
    for cls, defaults in ((ActorConfig, (0.8, 0.95, 512)), (SynthesisConfig, (0.7, 0.5, 256))):
        made = cls()
        assert (made.temperature, made.top_p, made.max_new_tokens) == defaults, cls


def test_choice_values_stay_plain_strings():
    config = load_config(None, ["experiment=demo"])
    for value in (config.model.kind, config.judge.score_from, config.cluster.placement_strategy):
        assert type(value) is str
    assert json.loads(json.dumps(dataclasses.asdict(config)))["model"]["kind"] == "smollm2_135m"


# ---------------------------------------------------------------- the package's shape


CONFIG_PACKAGE = REPO / "metareward" / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_config_modules_are_small_documented_and_import_no_other_layer(path: Path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"{path.name} says nothing about what it owns"
    assert len(source.splitlines()) < 400, path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metareward"):
            assert node.module.startswith(("metareward.config.", "metareward.store")), node.module
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("metareward") or alias.name.startswith(
                    ("metareward.config.", "metareward.store")
                ), alias.name


# ---------------------------------------------------------------- the installed Hydra


def test_the_installed_hydra_behaves_as_the_override_checks_expect():
    """What override_error and the CLI's pre-check (cli.check_jobs) rely on in hydra-core 1.3: the
    attributes of the errors a bad override raises, and the argument parser and sweep splitting the
    pre-check calls before Hydra starts. A Hydra that changes any of them fails here first."""
    import hydra
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    assert hydra.__version__.startswith("1.3."), hydra.__version__

    def refusal(overrides: list[str]) -> Exception:
        with pytest.raises(Exception) as info:
            compose_config(overrides)
        return info.value

    missing = refusal(["data=gpt5"])
    assert isinstance(missing, MissingConfigException)
    assert missing.missing_cfg_file == "data/gpt5"
    assert {"bundled", "hf", "hf_dataset", "jsonl", "self_instruct_seed", "synthetic"} <= set(missing.options)
    malformed = refusal(["model.kind=[a"])
    assert isinstance(malformed, OverrideParseException) and malformed.override == "model.kind=[a"
    unknown = refusal(["roles.judge.generator.batch_sise=2"])
    assert isinstance(unknown, ConfigCompositionException)
    assert isinstance(unknown.__cause__, ConfigKeyError | ConfigAttributeError)
    assert unknown.__cause__.full_key == "roles.judge.generator.batch_sise"
    mistyped = refusal(["roles.judge.generator.batch_size=abc"])
    assert isinstance(mistyped.__cause__, ValidationError)
    assert mistyped.__cause__.full_key == "roles.judge.generator.batch_size"

    args, _ = get_args_parser().parse_known_args(["-m", "--config-dir", "mine", "iterations=1,2", "seed=3"])
    assert args.multirun and args.config_dir == "mine" and args.overrides == ["iterations=1,2", "seed=3"]
    assert args.config_path is None and args.config_name is None
    # The flags that print something and run no job (--version exits while parsing: no attribute).
    for flag in ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun"):
        assert hasattr(args, flag), flag
    parsed = OverridesParser.create().parse_overrides(["iterations=1,2", "seed=3,4"])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    assert jobs == [
        ["iterations=1", "seed=3"],
        ["iterations=1", "seed=4"],
        ["iterations=2", "seed=3"],
        ["iterations=2", "seed=4"],
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=gpt5"], "data='gpt5': no such option (options: bundled, hf, hf_dataset, jsonl, "),
        (["model.kind=[a"], "model.kind=[a: not a valid override (no viable alternative at input '[a')"),
        (["eval.evaluator.kind=tiny"], "eval.evaluator.kind: no such setting"),
        (["iterations=abc"], "iterations: Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)
def test_override_refusals_read_as_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message), str(info.value)


def test_the_former_data_option_names_still_work():
    assert build(["data=self_instruct_seed"]) == build(["data=bundled"]) == build([])
    assert build(["data=hf_dataset", "data.hf_name=x"]) == build(["data=hf", "data.hf_name=x"])
    assert build(["data=hf", "data.hf_name=x"]).data.kind == "hf"


def test_version_is_metarewards_own():
    import importlib.metadata

    from tests.helpers import run_cli

    done = run_cli("--version", timeout=120)
    assert (
        done.returncode == 0
        and done.stdout.strip() == f"metareward {importlib.metadata.version('metareward')}"
    )
