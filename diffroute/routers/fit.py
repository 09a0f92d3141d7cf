"""Whether a trained router fits a call: the step count and scheduler it was trained for."""

from __future__ import annotations

from diffroute.errors import PlanError


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
