"""The real-engine tier (``make test-engines``): vLLM's CPU build, not the stand-in of tests/vllm_standin.

It runs in ``.venv-engines`` (vLLM's CPU build pins torch and transformers of its own), one test at a
time, since every engine computes on all cores. Where vLLM cannot run, the tier is skipped, except under
``METAREWARD_ENGINE_TESTS=1`` (what ``make test-engines`` sets): there a missing engine fails it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metareward.compute.availability import vllm_problem

PROBLEM = vllm_problem()
if PROBLEM is not None and os.environ.get("METAREWARD_ENGINE_TESTS") == "1":
    raise pytest.UsageError(f"the real-engine tier cannot run: {PROBLEM}")


def pytest_collection_modifyitems(config, items) -> None:
    if PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=f"real vLLM engine tier (make test-engines): {PROBLEM}")
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny32_dir(tmp_path_factory) -> str:
    """The tiny random Llama with 32-wide attention heads (vLLM's CPU attention needs at least 32)."""
    from metareward.compute.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny32")
    build_tiny_model(path, head_dim=32)
    return str(path)
