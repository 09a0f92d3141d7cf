"""Fitted reuse as a library call: run a schedule plan once over calibration prompts with every reused cell and
every block reused whole also computed, fit at each one the weights (a, c) of `a * newest + c * previous` that best
predict its true output (least squares over the batch), and return the schedule carrying them (`Schedule.fit`).

The run goes on from each fitted stand-in, not from the true output, so later weights are fitted on the state that
inference with the earlier ones will have (HarmoniCa's step-wise point, `../shared/ROUTING.md` §8); the weights are
shared by every image and both CFG rows (two numbers per cell: a static plan, no per-image decision). A `+spans`
plan is fitted with one weight per run of blocks reused whole (`Schedule.fit_spans`): the calibration takes the run
block by block, each block's least-squares terms pooled into its run's (so the weight fits each block's residual, not
the run's sum; the refinement, `policies/refining.py`, then trains it on the final image)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from diffroute.core.arch import architecture_map
from diffroute.core.deciders import ScheduleDecider
from diffroute.core.decisions import Fit
from diffroute.core.fitted import weights
from diffroute.core.schedule import Schedule
from diffroute.errors import PlanError
from diffroute.plans.base import Plan, SchedulePlan, is_schedule_plan


class _Calibrating(SchedulePlan):
    """The schedule, with each reuse computed too (`core.decisions.Fit`); the least-squares terms of each cell's
    weight are summed over the calls and CFG branches of the calibration (a pooled fit)."""

    def __init__(self, schedule: Schedule, name: str):
        super().__init__(schedule, name)
        self.cache_history = 2
        self.terms = torch.zeros(*schedule.compute.shape[:2], schedule.compute.shape[2] + 1, 2, dtype=torch.float64)
        self.reached = torch.zeros(self.terms.shape[:3], dtype=torch.bool)

    def decider(self, arch, num_steps: int) -> ScheduleDecider:
        def record(t: int, b: int, i: int, num: float, den: float) -> None:
            self.terms[t, b, i] += torch.tensor([num, den], dtype=torch.float64)
            self.reached[t, b, i] = True

        def fit(t: int, b: int, i: int) -> Fit:
            return Fit(lambda num, den: record(t, b, i, num, den))

        return ScheduleDecider(self.schedule_at(arch, num_steps), stand_in=fit)

    def weights(self) -> torch.Tensor:
        """[steps, blocks, components + 1, 2]: (a, c) per cell; plain reuse (1, 0) where nothing was fitted."""
        out = torch.zeros_like(self.terms)
        out[..., 0] = 1.0
        for t, b, i in self.reached.nonzero().tolist():
            out[t, b, i] = torch.tensor(weights(*self.terms[t, b, i].tolist()), dtype=torch.float64)
        return out


def fit_schedule(pipe, plan: Plan, run: Callable[[], None], num_steps: int) -> tuple[Schedule, dict]:
    """The schedule `plan` runs at `num_steps` on `pipe`, with weights fitted by `run()` (one or more pipeline calls
    of `pipe` at `num_steps` steps; each call's stand-ins use the weights fitted on that call, the stored weights pool
    all of them). Returns it and a summary (cells fitted, mean |w|)."""
    import diffroute

    if not is_schedule_plan(plan):
        raise PlanError(
            f"plan {plan.name!r} is not a static schedule: only schedules (fora-N, searched and shipped ones, their "
            "+blocks) take fitted reuse weights; per-image policies and routers decide differently at every call."
        )
    arch = architecture_map(pipe.transformer)
    schedule = plan.schedule_at(arch, num_steps)
    if schedule.fit is not None:
        schedule = replace(schedule, fit=None)  # fitted afresh, on this model and these prompts
    # a `+spans` plan: each run of blocks reused whole gets one weight, its terms pooled over the run's blocks
    schedule = replace(schedule, fit_spans=schedule.fit_spans or plan.collapse_spans)
    if bool(schedule.compute.all()):
        raise PlanError(f"plan {plan.name!r} computes every cell at {num_steps} steps: there is no reuse to fit.")
    calibrating = _Calibrating(schedule, plan.name)
    diffroute.apply(pipe, calibrating)
    try:
        run()
    finally:
        diffroute.remove(pipe)
    w = calibrating.weights()
    if schedule.fit_spans:
        w = schedule.tied(w)
    provenance = dict(schedule.provenance, fitted_from=plan.name, fitted_steps=num_steps)
    fitted = replace(schedule, provenance=provenance, fit=w)
    moved = w[..., 1] != 0.0
    summary = {
        "plan": plan.name,
        "cells_fitted": int(calibrating.reached.sum()),
        "mean_abs_w": float(w[..., 1].abs()[moved].mean()) if bool(moved.any()) else 0.0,
    }
    return fitted, summary
