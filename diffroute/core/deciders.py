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


def per_prompt(values: torch.Tensor) -> torch.Tensor:
    """Per-row values (a decider's measure or probability) made one per prompt: rows i and i + n/2 (diffusers batches
    CFG as [unconditional rows, conditional rows]) both take their mean, so both rows of a sample decide alike and a
    batch splits half as often. An odd batch (no CFG pair) is left per row."""
    n = values.shape[0]
    if n % 2:
        return values
    mean = (values[: n // 2] + values[n // 2 :]) / 2
    return torch.cat([mean, mean])


class Decider:
    """Base class. A decider lives for one pipeline call; the executor asks it once per component call."""

    # Deciders that read a block-level block's inputs before deciding it (`block_inputs`) set this.
    reads_block_inputs: bool = False
    # Deciders that read a component's input before deciding it (`component_inputs`: per-image gates) set this.
    reads_component_inputs: bool = False

    def block_inputs(self, ctx: StepContext, block: int, arguments: dict) -> None:
        """Called before `decide_block` with the block's forward arguments by name, when `reads_block_inputs`."""

    def component_inputs(self, ctx: StepContext, block: int, comp: int, hidden: torch.Tensor) -> None:
        """Called before `decide` with the component's input hidden states, when `reads_component_inputs`."""

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
        """Whether a computed output may be reused later (so the executor keeps a copy). Under a soft (training)
        decision: whether the blended output, detached, becomes the cached one (the cache a rolled-out student
        would have at inference)."""
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
        c, f, whole = schedule.compute, schedule.forecast, schedule.block_reuse
        # A component's next call is at the next step its block runs (a block reused whole calls no component).
        later = _next_run(whole)  # [steps, blocks]: the next step at which each block runs (steps: none)
        padded = torch.cat([c, torch.ones_like(c[:1])])  # past the last step nothing is reused
        nxt = padded.gather(0, later[..., None].expand_as(c))  # each cell's value at its block's next run
        # Keep an output if the block's next run reuses it; in a column that forecasts, keep every computed output
        # (a forecast extrapolates from the last two).
        store = c & (~nxt | f.any(dim=0, keepdim=True))
        self._decision = [
            [[True if cc else (FORECAST if ff else False) for cc, ff in zip(cb, fb)] for cb, fb in zip(cs, fs)]
            for cs, fs in zip(c.tolist(), f.tolist())
        ]
        self._store = store.tolist()
        self._block = (~whole).tolist()  # True: the block runs (its components decide), False: reused whole
        # keep a block's residual when the very next step reuses the block whole (consecutive reuses share it)
        self._store_block = (~whole & torch.cat([whole[1:], torch.zeros_like(whole[:1])])).tolist()

    def decide(self, ctx: StepContext, block: int, comp: int):
        return True if ctx.step >= len(self._decision) else self._decision[ctx.step][block][comp]

    def must_store(self, ctx: StepContext, block: int, comp: int) -> bool:
        return ctx.step < len(self._store) and self._store[ctx.step][block][comp]

    def decide_block(self, ctx: StepContext, block: int):
        return True if ctx.step >= len(self._block) else self._block[ctx.step][block]

    def must_store_block(self, ctx: StepContext, block: int) -> bool:
        return ctx.step < len(self._store_block) and self._store_block[ctx.step][block]

    def info(self) -> dict:
        return {"schedule_provenance": self.schedule.provenance, "planned_fraction": self.schedule.computed_fraction()}


def _next_run(whole: torch.Tensor) -> torch.Tensor:
    """[steps, blocks]: for each step, the first later step at which the block is not reused whole (steps: none)."""
    steps = whole.shape[0]
    out = torch.empty(whole.shape, dtype=torch.long)
    nxt = torch.full(whole.shape[1:], steps, dtype=torch.long)
    for s in range(steps - 1, -1, -1):
        out[s] = nxt
        nxt = torch.where(~whole[s], torch.tensor(s), nxt)
    return out
