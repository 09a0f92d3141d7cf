"""Deciders: for each component call at each step, compute or reuse. One executor carries out any decider."""

from __future__ import annotations

import torch

from .context import StepContext
from .schedule import Schedule


class Decider:
    """Base class. A decider lives for one pipeline call; the executor asks it once per component call."""

    def decide(self, ctx: StepContext, block: int, comp: int) -> bool:
        """True to compute the component, False to reuse its cached output."""
        raise NotImplementedError

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
