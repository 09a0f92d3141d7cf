"""Deciders: for each component call at each step, a decision (`core.decisions`). One executor carries out any
decider."""

from __future__ import annotations

import torch

from diffroute.core.context import StepContext

# the decision types live in core.decisions; deciders import them from here as before
from diffroute.core.decisions import FORECAST, SKIP, Fit, Fitted, SkipRows, SoftReuse, SoftWidth, Width  # noqa: F401
from diffroute.core.schedule import Schedule, run_starts, span_ends


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
        """A component's decision (`core.decisions`): True (COMPUTE), False (REUSE), FORECAST, a bool tensor with
        one entry per sample (`Rows`: True computes), `Width(f)` (an FFN at a fraction f of its hidden units, not
        stored for reuse); in training a float tensor (`Soft`: `w * fresh + (1 - w) * cached`, differentiable in
        `w`, a scalar or one weight per sample) or `SoftWidth`."""
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
        """For the blocks a plan decides as a whole (`Plan.block_level`): True (COMPUTE), False (REUSE: its input
        plus what it added at its last computation), SKIP (its input), a bool tensor (`Rows`: True computes, False
        reuses) or `SkipRows`; in training a float tensor (`Soft`: `w * block(x) + (1 - w) * x`) or `SoftReuse`
        (`w * block(x) + (1 - w) * (x + cached residual)`)."""
        return True

    def must_store_block(self, ctx: StepContext, block: int) -> bool:
        """Whether a computed block's residual may be reused later (so the executor keeps it)."""
        return True

    def block_span(self, ctx: StepContext, block: int) -> int:
        """For a block reused whole at this step: the last block of the run that the executor may reuse as one
        residual with it (the blocks after it then pass their input through); `block` itself: no run."""
        return block

    def info(self) -> dict:
        return {}


class ScheduleDecider(Decider):
    """Follows a static schedule; decisions are plain Python values, so the loop never waits on the device.

    With fitted weights (`schedule.fit`) a reused cell or block is stood in for by `Fitted(a, c)`. `stand_in(step,
    block, index)` (index: the component, or the number of components for the block as a whole) replaces that rule
    where it returns a decision (None: the stored weights): the calibration's `Fit`, which computes the true output
    and records the least-squares terms of its extrapolation weight, or `Fitted` with weights that carry gradients
    (the final-image refinement)."""

    def __init__(self, schedule: Schedule, spans: bool = False, stand_in=None):
        self.schedule = schedule
        c, f, whole = schedule.compute, schedule.forecast, schedule.block_reuse
        fitted = schedule.fit is not None or stand_in is not None
        nxt = computed_at_next_run(schedule)
        # Keep an output if the block's next run reuses it; in a column that forecasts (or whose reuses are fitted),
        # every computed output that is one of the last two before a later stand-in (both extrapolate from them).
        stood_in = ~c & ~whole[..., None]
        two = f.any(dim=0, keepdim=True) | (fitted & (~c).any(dim=0, keepdim=True))
        store = c & (~nxt | (two & one_of_last_two(c, stood_in)))
        self._decision = [
            [[True if cc else (FORECAST if ff else False) for cc, ff in zip(cb, fb)] for cb, fb in zip(cs, fs)]
            for cs, fs in zip(c.tolist(), f.tolist())
        ]
        self._store = store.tolist()
        self._block = (~whole).tolist()  # True: the block runs (its components decide), False: reused whole
        # keep a block's residual when the very next step reuses the block whole (consecutive reuses share it); with
        # fitted reuse, each one of the last two computed before a later reuse (only those are read: each kept one
        # costs a subtraction and a copy, as much as a fitted stand-in)
        keep = one_of_last_two(~whole, whole) if fitted else reused_whole_next(schedule)
        self._store_block = (~whole & keep).tolist()
        # runs of blocks reused whole as one residual: `+spans`, or a schedule fitted with one weight per run (at
        # inference; its calibration and refinement take the run block by block, with the run's weight tied)
        collapse = (spans and not fitted) or (schedule.fit_spans and stand_in is None)
        self._span_end = span_ends(whole) if collapse else None
        if fitted:
            self._fit_decisions(schedule, stand_in)

    def _fit_decisions(self, schedule: Schedule, given) -> None:
        """Plain reuses (False) become what `given(step, block, index)` says, else what the stored weights say. With
        `fit_spans` a block reused whole is asked for as its run's first block: the run shares one weight."""
        n = len(schedule.components)
        first = run_starts(schedule.block_reuse) if schedule.fit_spans else None

        def stand_in(t: int, b: int, i: int):
            decision = None if given is None else given(t, b, i)
            if decision is not None:
                return decision
            a, c = schedule.fit[t, b, i].tolist()
            return False if (a, c) == (1.0, 0.0) else Fitted(a, c)  # (1, 0): plain reuse

        for t, step in enumerate(self._decision):
            for b, row in enumerate(step):
                if not self._block[t][b]:
                    self._block[t][b] = stand_in(t, b if first is None else first[t][b], n)
                    continue
                for i, d in enumerate(row):
                    if d is False:
                        row[i] = stand_in(t, b, i)

    def block_span(self, ctx: StepContext, block: int) -> int:
        if self._span_end is None or ctx.step >= len(self._span_end):
            return block
        return self._span_end[ctx.step][block]

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


def computed_at_next_run(schedule: Schedule) -> torch.Tensor:
    """[steps, blocks, components]: whether each cell computes at its block's next run after that step (a component's
    next call is at the next step its block runs: a block reused whole calls no component; past the last step
    nothing is reused, so True)."""
    c = schedule.compute
    padded = torch.cat([c, torch.ones_like(c[:1])])
    return padded.gather(0, next_run(schedule.block_reuse)[..., None].expand_as(c))


def one_of_last_two(computed: torch.Tensor, stood_in: torch.Tensor) -> torch.Tensor:
    """[steps, ...]: whether each computed step is one of the last two computed before some later stood-in step (at
    most one computed step between them): the outputs a stand-in from the last two reads. Steps that neither compute
    nor stand in (a component while its block is reused whole) do not count."""
    out = torch.zeros_like(computed)
    ahead = torch.full(computed.shape[1:], -1, dtype=torch.long)  # computes since the next stand-in; -1: none
    for s in range(computed.shape[0] - 1, -1, -1):
        out[s] = computed[s] & (ahead >= 0) & (ahead <= 1)
        ahead = torch.where(stood_in[s], 0, torch.where(computed[s] & (ahead >= 0), ahead + 1, ahead))
    return out


def reused_whole_next(schedule: Schedule) -> torch.Tensor:
    """[steps, blocks]: whether the very next step reuses each block whole (False at the last step)."""
    whole = schedule.block_reuse
    return torch.cat([whole[1:], torch.zeros_like(whole[:1])])


def next_run(whole: torch.Tensor) -> torch.Tensor:
    """[steps, blocks]: for each step, the first later step at which the block is not reused whole (steps: none)."""
    steps = whole.shape[0]
    out = torch.empty(whole.shape, dtype=torch.long)
    nxt = torch.full(whole.shape[1:], steps, dtype=torch.long)
    for s in range(steps - 1, -1, -1):
        out[s] = nxt
        nxt = torch.where(~whole[s], torch.tensor(s), nxt)
    return out
