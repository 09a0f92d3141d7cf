"""Deciders: for each component call at each step, compute or reuse. One executor carries out any decider."""

from __future__ import annotations

import torch

from .context import StepContext
from .schedule import Schedule

# A decision to approximate the component by a first-order forecast from its last two computed outputs.
FORECAST = "forecast"


class Decider:
    """Base class. A decider lives for one pipeline call; the executor asks it once per component call."""

    def decide(self, ctx: StepContext, block: int, comp: int):
        """True to compute, False to reuse the cached output, FORECAST to extrapolate it, or a bool tensor with
        one entry per sample (True: that sample computes)."""
        raise NotImplementedError

    def on_block_start(self, ctx: StepContext, block: int, module, args: tuple, kwargs: dict) -> None:
        """Called before each block the plan observes (see Plan.observed_blocks)."""

    def on_block_end(self, ctx: StepContext, block: int, output) -> None:
        """Called after each block the plan observes."""

    def must_store(self, ctx: StepContext, block: int, comp: int) -> bool:
        """Whether a computed output may be reused later (so the executor keeps a copy)."""
        return True

    def info(self) -> dict:
        return {}


class ScheduleDecider(Decider):
    """Follows a static schedule; decisions are plain Python bools, so the loop never waits on the device."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        c = schedule.compute
        reused_next = torch.cat([~c[1:], torch.zeros_like(c[:1])])
        self._compute = c.tolist()
        self._store = (c & reused_next).tolist()  # keep an output only if the very next step reuses it

    def decide(self, ctx: StepContext, block: int, comp: int) -> bool:
        return ctx.step >= len(self._compute) or self._compute[ctx.step][block][comp]

    def must_store(self, ctx: StepContext, block: int, comp: int) -> bool:
        return ctx.step < len(self._store) and self._store[ctx.step][block][comp]

    def info(self) -> dict:
        return {"schedule_provenance": self.schedule.provenance, "planned_fraction": self.schedule.computed_fraction()}
