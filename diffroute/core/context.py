"""Step context: where the denoising loop is (step, timestep, total steps, CFG branch) at each transformer call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

# Returns (step_index or None, num_steps or None) without reading device memory.
StepSource = Callable[[], "tuple[int | None, int | None]"]


@dataclass
class StepContext:
    """Where the loop is at the current transformer call.

    `branch` tells apart the transformer calls made at the same step (pipelines that run CFG as two calls: 0 and
    1): by the name the pipeline gives the call where it names it (diffusers' `cache_context`: "cond" 0, "uncond" 1),
    else by counting the calls at the step. Pipelines that batch CFG make one call per step, and each row of the
    batch is its own sample to the cache.
    """

    step: int = -1
    num_steps: int | None = None
    branch: int = 0
    timestep: torch.Tensor | float | None = None
    batch_size: int = 0


def scheduler_step_source(scheduler) -> StepSource:
    """Read the step count, and the step from the scheduler's own counter where it keeps one (no device sync)."""
    has_counter = hasattr(type(scheduler), "step_index")

    def source():
        timesteps = getattr(scheduler, "timesteps", None)
        num_steps = None if timesteps is None else len(timesteps)
        if not has_counter or num_steps is None:
            return None, num_steps
        index = scheduler.step_index
        return (0 if index is None else int(index)), num_steps

    return source


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CallName(StateManager):
    """The name a diffusers pipeline gives each denoiser call (`with transformer.cache_context("cond"):`; FLUX's
    true CFG names "cond" and "uncond"). diffusers hands that context to every `StateManager` that a stateful hook on
    the transformer holds; a hook holding one of these reads the name back (None where the pipeline names none)."""

    def __init__(self):
        super().__init__(_NoState)

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name


class NamedCallHook(ModelHook):
    """A transformer hook that learns each call's name from the pipeline (see `CallName`): `self.call_name.name`."""

    _is_stateful = True  # (what makes diffusers' `cache_context` reach it)

    def __init__(self):
        super().__init__()
        self.call_name = CallName()

    def reset_state(self, module):
        return module  # the name is the pipeline's, set per call: nothing of ours to reset


# Branches of the names diffusers' pipelines give; other names get the next free branch on first sight.
NAMED_BRANCHES = {"cond": 0, "uncond": 1, "cond_uncond": 0}


class StepTracker:
    """Recovers the step context from the sequence of transformer calls.

    Our pipelines bracket each call with `begin_call`/`end_call`; for pipelines we do not subclass, a new call is
    detected when the step goes backwards (or the timestep rises: denoising runs from high noise to low). With no
    scheduler counter the step is read from the timestep's value, which costs one device sync per call.
    """

    def __init__(self, step_source: StepSource | None = None, default_num_steps: int | None = None):
        self.step_source = step_source
        self.default_num_steps = default_num_steps
        self.ctx = StepContext()
        self._last_t: float | None = None
        self._pinned: tuple[int, int] | None = None
        self._names = dict(NAMED_BRANCHES)

    def reset(self) -> None:
        self.ctx = StepContext()
        self._last_t = None

    def pin(self, step: int, branch: int = 0, num_steps: int | None = None) -> None:
        """Fix the context of the next transformer calls (training and calibration replay recorded steps out of
        order, which the call sequence cannot tell; an ensemble calls each expert at the steps it routes to it);
        `unpin` returns to tracking."""
        self._pinned = (step, branch, num_steps)

    def unpin(self) -> None:
        self._pinned = None

    def advance(self, timestep, batch_size: int, name: str | None = None) -> tuple[StepContext, bool]:
        """Update for one transformer call; returns (context, whether this call starts a new pipeline call). `name`:
        what the pipeline calls this call ("cond", "uncond"), which fixes its branch; None: the calls are counted."""
        prev = self.ctx
        pinned = self._pinned
        if pinned is not None:
            new_call = prev.step < 0
            self.ctx = StepContext(pinned[0], pinned[2] or self.default_num_steps, pinned[1], timestep, batch_size)
            return self.ctx, new_call
        step, num_steps = self.step_source() if self.step_source is not None else (None, None)
        num_steps = num_steps or self.default_num_steps
        if step is not None:
            new_call = prev.step < 0 or step < prev.step
            same_step = not new_call and step == prev.step
        else:
            t = _scalar(timestep)
            rising = t is not None and self._last_t is not None and t > self._last_t
            same_step = t is not None and t == self._last_t
            new_call = prev.step < 0 or rising
            step = 0 if new_call else (prev.step if same_step else prev.step + 1)
            if num_steps is not None and step >= num_steps:  # ran past the end: a new call
                new_call, same_step, step = True, False, 0
            self._last_t = t
        branch = prev.branch + 1 if same_step else 0
        if new_call:
            branch = 0
        if name is not None:
            branch = self._names.setdefault(name, max(self._names.values()) + 1)
        self.ctx = StepContext(step, num_steps, branch, timestep, batch_size)
        return self.ctx, new_call


def _scalar(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)
