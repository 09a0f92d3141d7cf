"""Deciders: for each component call at each step, compute or reuse. One executor carries out any decider."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffroute.core.context import StepContext
from diffroute.core.schedule import Schedule

# A decision to approximate the component by a first-order forecast from its last two computed outputs.
FORECAST = "forecast"
# A block-level decision: the block is skipped, its output is its input (Elastic-DiT's skip).
SKIP = "skip"


@dataclass(frozen=True)
class Width:
    """A component decision: compute the FFN with only this fraction of its hidden units (`diffroute.core.width`); a
    float, or a tensor with one fraction per sample of the call (samples are grouped by fraction; inside a block
    that runs for some samples only, the executor picks theirs)."""

    fraction: float | torch.Tensor


@dataclass(frozen=True)
class SoftWidth:
    """A training decision for an FFN: its hidden units times `mask` ([samples, hidden units]), with gradients."""

    mask: torch.Tensor


@dataclass(frozen=True)
class SkipRows:
    """A block decision per sample: rows where `compute` is True run the block, the others skip it (output = input)."""

    compute: torch.Tensor


class Decider:
    """Base class. A decider lives for one pipeline call; the executor asks it once per component call."""

    # Deciders that read a block-level block's inputs before deciding it (`block_inputs`) set this.
    reads_block_inputs: bool = False

    def block_inputs(self, ctx: StepContext, block: int, arguments: dict) -> None:
        """Called before `decide_block` with the block's forward arguments by name, when `reads_block_inputs`."""

    def decide(self, ctx: StepContext, block: int, comp: int):
        """True to compute, False to reuse the cached output, FORECAST to extrapolate it, or a bool tensor with
        one entry per sample (True: that sample computes), or Width(f) to compute an FFN at a fraction f of its
        hidden units (not stored for reuse). Training deciders return a float tensor instead (a
        scalar or one weight per sample): the output is `w * fresh + (1 - w) * cached`, differentiable in `w`."""
        raise NotImplementedError

    def on_block_start(self, ctx: StepContext, block: int, module, args: tuple, kwargs: dict) -> None:
        """Called before each block the plan observes (see Plan.observed_blocks)."""

    def on_block_end(self, ctx: StepContext, block: int, output) -> None:
        """Called after each block the plan observes."""

    def must_store(self, ctx: StepContext, block: int, comp: int) -> bool:
        """Whether a computed output may be reused later (so the executor keeps a copy)."""
        return True

    def decide_block(self, ctx: StepContext, block: int):
        """For the blocks a plan decides as a whole (`Plan.block_level`): True to compute the block, False to reuse
        its residual (input plus what it added at its last computation), SKIP to return its input, or a bool tensor
        with one entry per sample (True computes, False reuses). Training deciders return a float tensor (a scalar or
        one weight per sample): the output is `w * block(x) + (1 - w) * x`, differentiable in `w`."""
        return True

    def must_store_block(self, ctx: StepContext, block: int) -> bool:
        """Whether a computed block's residual may be reused later (so the executor keeps it)."""
        return True

    def info(self) -> dict:
        return {}


class ScheduleDecider(Decider):
    """Follows a static schedule; decisions are plain Python values, so the loop never waits on the device."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        c, f = schedule.compute, schedule.forecast
        reused_next = torch.cat([~c[1:], torch.zeros_like(c[:1])])
        # Keep an output if the very next step reuses it; in a column that forecasts, keep every computed output
        # (a forecast extrapolates from the last two).
        store = c & (reused_next | f.any(dim=0, keepdim=True))
        self._decision = [
            [[True if cc else (FORECAST if ff else False) for cc, ff in zip(cb, fb)] for cb, fb in zip(cs, fs)]
            for cs, fs in zip(c.tolist(), f.tolist())
        ]
        self._store = store.tolist()

    def decide(self, ctx: StepContext, block: int, comp: int):
        return True if ctx.step >= len(self._decision) else self._decision[ctx.step][block][comp]

    def must_store(self, ctx: StepContext, block: int, comp: int) -> bool:
        return ctx.step < len(self._store) and self._store[ctx.step][block][comp]

    def info(self) -> dict:
        return {"schedule_provenance": self.schedule.provenance, "planned_fraction": self.schedule.computed_fraction()}
