"""Whether a trained router fits a call and a model: the step count and scheduler it was trained for, and the
backbone whose weights it was trained on."""

from __future__ import annotations

from diffroute.errors import PlanError
from diffroute.routers.backbone import check_backbone


def check_trained_call(name: str, config, num_steps: int | None, scheduler, remedy: str) -> None:
    """Refuse a call whose step count or scheduler differs from the ones a router was trained for (its `config`
    records `num_steps` and the scheduler class); `remedy` ends the step-count message (what to do instead)."""
    if num_steps is not None and num_steps != config.num_steps:
        raise PlanError(f"router {name!r} was trained for {config.num_steps} steps, not {num_steps}: {remedy}")
    used = None if scheduler is None else type(scheduler).__name__
    if used and config.scheduler and used != config.scheduler:
        raise PlanError(
            f"router {name!r} was trained with {config.scheduler}, the pipeline uses {used}: its steps visit other "
            "noise levels. Train one with this scheduler, or switch the pipeline's scheduler back."
        )


class TrainedRouterChecks:
    """What every plan running a trained router (`self.router`, named `self.name`) checks before it runs: the
    backbone's weights (`check_model`) and the call's step count and scheduler (`check_call`). `retrain_hint(steps)`
    says what to do instead when the step count differs."""

    def check_model(self, transformer) -> None:
        config = self.router.config
        check_backbone(self.name, config.backbone_probe, config.backbone_dtype, transformer)

    def check_call(self, num_steps: int | None, scheduler=None) -> None:
        check_trained_call(self.name, self.router.config, num_steps, scheduler, self.retrain_hint(num_steps))

    def retrain_hint(self, num_steps: int | None) -> str:
        raise NotImplementedError
