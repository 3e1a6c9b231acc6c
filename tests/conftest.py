"""Shared test set-up: offline Hub, a per-session model cache, and the tiny model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# Tests share one fresh cache per session, so conversions they make never touch the user's cache;
# subprocesses (CLI runs) inherit it.
os.environ["METAREWARD_CACHE"] = tempfile.mkdtemp(prefix="metareward-test-cache-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The tiny random Llama (SmolLM2 tokenizer), built once per session."""
    from metareward.config import ModelConfig
    from metareward.models import resolve_model

    return resolve_model(ModelConfig(kind="tiny"))
