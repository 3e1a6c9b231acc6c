"""Safety: no remote code unless the config asks, weights only from safetensors, no code built from
config strings, and no secret from the environment in the run directory or the logs."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metareward.compute.models import resolve_model
from metareward.config import DPOSettings, GeneratorConfig, ModelConfig
from metareward.generation import make_generator
from tests.helpers import REPO, run_cli
from tests.wandb_files import offline_files

SOURCES = sorted((REPO / "metareward").rglob("*.py"))

# ---------------------------------------------------------------- the source, read as a syntax tree


def dotted(node: ast.AST) -> str:
    """``torch.load`` for ``torch.load(...)``'s func; ``""`` for anything not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def source_calls() -> list[tuple[str, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call):
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name``; ``...`` when absent, None when not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    return ...


# Calls that turn a string into running code, or unpickle.
CODE_FROM_STRINGS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "import_module",
    "importlib.import_module",
    "importlib.util.spec_from_file_location",
    "runpy.run_path",
    "runpy.run_module",
    "instantiate",
    "hydra.utils.instantiate",
    "hydra.utils.call",
    "hydra.utils.get_class",
    "hydra.utils.get_method",
    "pickle.load",
    "pickle.loads",
    "marshal.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "OmegaConf.register_new_resolver",
}


def test_the_scan_sees_the_calls_it_looks_for():
    tree = ast.parse("eval(s)\nimportlib.import_module(s)\nmodel.eval()\ntorch.load(p, weights_only=True)\n")
    names = [dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [n for n in names if n in CODE_FROM_STRINGS] == ["eval", "importlib.import_module"]
    assert len(source_calls()) > 500 and len(SOURCES) > 15


def test_nothing_from_a_config_string_is_imported_or_evaluated():
    offenders = [where for where, call in source_calls() if dotted(call.func) in CODE_FROM_STRINGS]
    assert offenders == []


def test_torch_load_only_with_weights_only():
    offenders = [
        where
        for where, call in source_calls()
        if dotted(call.func).endswith("torch.load") and keyword(call, "weights_only") is not True
    ]
    assert offenders == []


def test_remote_code_is_never_switched_on_by_the_code():
    offenders = [where for where, call in source_calls() if keyword(call, "trust_remote_code") is True]
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} default")
    assert offenders == []
    assert ModelConfig().trust_remote_code is False


def test_model_weights_are_loaded_from_safetensors_only():
    offenders = []
    for where, call in source_calls():
        name = dotted(call.func)
        if not name.endswith("from_pretrained"):
            continue
        # Pickled checkpoints are never allowed to run code on load.
        if keyword(call, "weights_only") is False or keyword(call, "use_safetensors") is False:
            offenders.append(where)
        # Plain models load from safetensors only; the embedded model is converted from the GGUF file
        # shipped in its package. (PEFT adapters load from safetensors or with weights_only=True.)
        plain = name.endswith("AutoModelForCausalLM.from_pretrained")
        if plain and keyword(call, "use_safetensors") is not True and keyword(call, "gguf_file") is ...:
            offenders.append(where)
    assert offenders == []


# ---------------------------------------------------------------- model directories that would run code


class TouchOnLoad:
    """Pickles to a call that creates ``marker``: loading it with pickle runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickled_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model with its safetensors weights swapped for a pickle that runs code; and the marker
    file that code would create."""
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pickle-code-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(TouchOnLoad(marker)))
    return model, marker


EVIL_CODE = """\
from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model with a config.json whose classes live in the directory's own Python file, which
    creates a marker file when it is imported."""
    model = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_the_remote_code_model_would_run_its_code_if_trusted(remote_code_model, tmp_path):
    model, marker = remote_code_model
    code = (
        "from transformers import AutoConfig\n"
        f"AutoConfig.from_pretrained({str(model)!r}, trust_remote_code=True)"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert marker.exists()


def test_generator_refuses_remote_code_unless_the_config_asks(remote_code_model):
    model, marker = remote_code_model
    with pytest.raises(ValueError, match="trust_remote_code"):
        make_generator(str(model), ModelConfig(kind="hf", path=str(model)), GeneratorConfig(progress=False))
    assert not marker.exists()


# One preference pair; the loaders refuse the model before it is read.
PAIR = {
    "prompt": [{"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello!"}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


def test_training_refuses_remote_code_unless_the_config_asks(remote_code_model, tmp_path):
    from metareward.training import train_dpo

    model, marker = remote_code_model
    with pytest.raises(ValueError, match="trust_remote_code"):
        train_dpo(str(model), [PAIR], DPOSettings(), tmp_path / "out", seed=0)
    assert not marker.exists()


def test_pickled_weights_are_never_loaded(pickled_model, tmp_path):
    from metareward.training import train_dpo

    model, marker = pickled_model
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*safetensors"):
        resolve_model(ModelConfig(kind="hf", path=str(model)))
    # M_t directories reach the loaders without resolve_model; they refuse the pickle too.
    with pytest.raises(OSError, match="safetensors"):
        make_generator(str(model), ModelConfig(kind="hf", path=str(model)), GeneratorConfig(progress=False))
    with pytest.raises(OSError, match="safetensors"):
        train_dpo(str(model), [PAIR], DPOSettings(), tmp_path / "out", seed=0)
    assert not marker.exists()


# ---------------------------------------------------------------- secrets


SECRETS = {
    "WANDB_API_KEY": "wandbkeymarker0123456789abcdef0123456789",
    "OPENAI_API_KEY": "sk-openaikeymarker-0123456789",
    "HF_TOKEN": "hf_tokenmarker0123456789",
}
# One iteration with W&B offline, as small as a run that reaches DPO can be.
SECRETS_RUN = [
    "model=tiny",
    "iterations=1",
    "data.prompts_per_iteration=1",
    "actor.num_responses=2",
    "actor.max_new_tokens=8",
    "judge.num_judgements=1",
    "judge.max_new_tokens=8",
    "judge.score_from=text_or_expected",
    "generator.progress=false",
    "tracking=offline",
    "eval.enabled=false",
    "run_name=secret-scan-run",
]


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_run_directory_or_the_logs(tmp_path, tiny_model_dir):
    result = run_cli(
        *SECRETS_RUN, f"runs_dir={tmp_path}", unset=["WANDB_MODE"], extra_env=SECRETS, text=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    run_dir = tmp_path / "secret-scan-run"
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    # W&B ran, and the scan reads its binary log: the run's name, logged in the config, is found there.
    (wandb_log,) = offline_files(run_dir)
    assert b"secret-scan-run" in wandb_log.read_bytes() and wandb_log in files
    assert (run_dir / "iter_1" / "model" / "model.safetensors") in files
    for name, secret in SECRETS.items():
        marker = secret.encode()
        assert marker not in result.stdout + result.stderr, f"{name} in the logs"
        leaks = [str(path) for path in files if marker in path.read_bytes()]
        assert leaks == [], f"{name} written to {leaks}"
