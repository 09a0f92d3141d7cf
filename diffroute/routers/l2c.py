"""Learning-to-Cache (Ma et al., arXiv 2406.01733): a router of one logit per (step, block, component).

`beta = sigmoid(theta)` is the weight of computing a component at a step; training blends `beta * fresh +
(1 - beta) * cached` (the executor's soft decisions) and at inference a component computes where `beta > threshold`.
The router takes no input, so its decisions form a static schedule: `L2CRouter.schedule()` is an ordinary
`Schedule` (ECAD can seed its population with it, the executor runs it like any other).

As in the paper, inference alternates: even steps compute everything (they refresh every cache) and only the odd
steps are routed, so at most half of the component calls are saved. `alternate=False` routes every step after the
first, which the training pairs (cache from the step just before) do not cover: a deviation, off by default.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from diffroute.core.arch import ArchitectureMap
from diffroute.core.schedule import Schedule
from diffroute.plans import SchedulePlan
from diffroute.routers.fit import TrainedRouterChecks


class L2CRouter(ModelMixin, ConfigMixin):
    """Per-step, per-(block, component) logits; forward returns beta = sigmoid(theta)."""

    @register_to_config
    def __init__(
        self,
        num_steps: int,
        num_blocks: int,
        components: tuple[str, ...],
        model_class: str,
        scheduler: str = "",
        threshold: float = 0.1,
        alternate: bool = True,
        lam: float = 0.0,
        backbone_probe: list[float] | None = None,  # routing/backbone.py: the weights it was trained on
        backbone_dtype: str = "",
    ):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(num_steps, num_blocks, len(components)))  # N(0, 1) as the paper

    @classmethod
    def for_model(cls, arch: ArchitectureMap, num_steps: int, scheduler=None, **kwargs) -> L2CRouter:
        """A fresh router for `arch` at `num_steps` steps of `scheduler` (its class name is recorded and checked)."""
        name = "" if scheduler is None else type(scheduler).__name__
        return cls(num_steps, arch.num_blocks, tuple(arch.components), arch.model_class, name, **kwargs)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)

    def routed_steps(self) -> list[int]:
        """The steps whose components the router decides (the others compute everything)."""
        steps = range(1, self.config.num_steps)
        return [s for s in steps if s % 2 == 1] if self.config.alternate else list(steps)

    def schedule(self, threshold: float | None = None) -> Schedule:
        """The router's decisions as a static schedule: compute where beta > threshold on routed steps."""
        thr = self.config.threshold if threshold is None else threshold
        beta = self().detach().float().cpu()
        compute = torch.ones_like(beta, dtype=torch.bool)
        routed = self.routed_steps()
        compute[routed] = beta[routed] > thr
        prov = {"rule": "l2c", "lambda": self.config.lam, "threshold": thr, "alternate": self.config.alternate}
        return Schedule(compute, self.config.model_class, tuple(self.config.components), prov)


class RouterPlan(TrainedRouterChecks, SchedulePlan):
    """A trained router as a plan: its schedule, refused at any other step count or scheduler than it was trained
    for (a router learns one trajectory's steps; resample its schedule explicitly to use it elsewhere)."""

    def __init__(self, router: L2CRouter, name: str):
        super().__init__(router.schedule(), name=name)
        self.router = router

    def retrain_hint(self, num_steps: int | None) -> str:
        return (
            f"train one for {num_steps} steps (`diffroute train l2c --steps {num_steps}`), or run its schedule "
            f"resampled (`diffroute.routers.load_router(...).schedule().resample({num_steps})`)."
        )

    def decider(self, arch: ArchitectureMap, num_steps: int):
        self.check_call(num_steps)
        return super().decider(arch, num_steps)
