"""Engines that hand the run stand-in generators: the seam a test uses in place of real models.

    Run(cfg, engines=StandInEngines(cfg, lambda seat: MyGeneratorStandIn(seat.model_dir))).run()

Training and the seed model stay real (the tiny model); only generation is scripted. ``made`` lists
every generator started, ``role_calls`` each iteration's generator per role.
"""

from __future__ import annotations

from collections.abc import Callable

from metareward.config import Config, GeneratorConfig, ModelConfig
from metareward.engines import Engines, Seat


class StandInEngines(Engines):
    def __init__(
        self,
        cfg: Config,
        make: Callable[[Seat], object],
        own_model_dirs: Callable[[ModelConfig], str] | None = None,
    ):
        super().__init__(cfg)
        self.make, self.own_model_dirs = make, own_model_dirs
        self.made: list = []
        self.role_calls: list[dict] = []

    def start(self, seat: Seat, replicas: int | None = None, cached: bool = True):
        generator = self.make(seat)
        self.made.append(generator)
        return generator

    def locate(self, model: ModelConfig, generator: GeneratorConfig, local_tokenizer: bool = True) -> str:
        if self.own_model_dirs is not None and model.kind == "hf":
            return self.own_model_dirs(model)
        return super().locate(model, generator, local_tokenizer)

    def for_roles(self, model_dir: str, roles: list[str]):
        by_role, made = super().for_roles(model_dir, roles)
        self.role_calls.append(by_role)
        return by_role, made
