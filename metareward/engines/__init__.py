"""Which model runs where: the one seam through which every role, the evaluator, escalation's strong
judge and the prompter get their generator, and DPO and the judge alignment their trainer.

:func:`engines_for` is the one place that decides between this machine (:class:`Engines`, in
``local``) and a Ray cluster (:class:`~metareward.engines.cluster.RayEngines`, ``cluster=ray``).
"""

from __future__ import annotations

from pathlib import Path

from metareward.config import Config
from metareward.engines.local import ClusterError, Engines, Seat

__all__ = ["ClusterError", "Engines", "Seat", "engines_for"]


def engines_for(cfg: Config, run_dir: Path | None = None, cache_dir: Path | None = None) -> Engines:
    """The engines ``cfg.cluster`` asks for: Ray's with ``cluster=ray``, else this machine's."""
    if cfg.cluster.kind == "ray":
        from metareward.engines.cluster import RayEngines

        return RayEngines(cfg, run_dir, cache_dir)
    return Engines(cfg, run_dir, cache_dir)
