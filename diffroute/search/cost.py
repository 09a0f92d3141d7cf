"""Analytic compute cost of a schedule: FLOPs of each (block, component) counted once by torch's FlopCounterMode
(shape-based, so analytic), plus what runs every step regardless (embeddings, norms, gates, final layer)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.core.arch import ArchitectureMap
from diffroute.core.schedule import Schedule


@dataclass
class CostModel:
    component_flops: torch.Tensor  # [blocks, components], 0 where absent
    other_flops: float  # per transformer call, outside every block (embeddings, final layer)
    # [blocks]: FLOPs inside each block but outside its components (norms, modulation), which run whenever the
    # block runs and not when it is reused whole. None: counted in other_flops (models measured before this split).
    block_flops: torch.Tensor | None = None
    # per transformer call, the part of other_flops in the call-invariant modules (the text projection), which the
    # executor computes once per call under plans that skip something (`core/invariant.py`)
    invariant_flops: float = 0.0

    def __post_init__(self):
        if self.block_flops is None:
            self.block_flops = torch.zeros(self.component_flops.shape[0], dtype=torch.float64)

    @property
    def step_flops(self) -> float:
        return float(self.component_flops.sum()) + float(self.block_flops.sum()) + self.other_flops

    def computed_flops(
        self, compute: torch.Tensor, block_run: torch.Tensor | None = None, invariant_share: float = 1.0
    ) -> float:
        """FLOPs of a run: `compute` [steps, blocks, components] the share of each cell computed, `block_run`
        [steps, blocks] the share of each block that ran at all (default: all of them, at every step),
        `invariant_share` the share of calls in which the text projection computed (default: every call)."""
        steps = compute.shape[0]
        done = float((compute.double() * self.component_flops.double()).sum())
        runs = torch.ones(steps, self.block_flops.shape[0]) if block_run is None else block_run
        rest = (self.other_flops - self.invariant_flops * (1.0 - invariant_share)) * steps
        return done + float((runs.double() * self.block_flops.double()).sum()) + rest

    def relative_cost(self, schedule: Schedule) -> float:
        """FLOPs of the schedule / FLOPs of computing everything (1.0 = no saving)."""
        # a schedule that skips anything gets the text projection once per call (the executor's `core/invariant.py`)
        skips = not bool(schedule.compute.all())
        invariant_share = 1.0 / schedule.num_steps if skips else 1.0
        computed = self.computed_flops(schedule.compute, ~schedule.block_reuse, invariant_share)
        return computed / (self.step_flops * schedule.num_steps)

    def realised_flops(self, stats) -> float:
        """FLOPs of what a call did (a CallStats: each cell by the share of samples that computed it, each block by
        the share that ran it; the rest of the model at every step)."""
        shares = stats.compute_tensor().double().nan_to_num(0.0)  # [steps, blocks, components]
        invariant = getattr(stats, "invariant_share", None)  # (None: stats from before it was recorded)
        return self.computed_flops(shares, stats.block_run_tensor(), 1.0 if invariant is None else invariant)

    def realised_cost(self, stats) -> float:
        """`realised_flops` / FLOPs of computing everything: a dynamic plan's cost, which no schedule states in
        advance."""
        return self.realised_flops(stats) / (self.step_flops * len(stats.compute_map))

    def to_dict(self) -> dict:
        return {
            "component_flops": self.component_flops.tolist(),
            "other_flops": self.other_flops,
            "block_flops": self.block_flops.tolist(),
            "invariant_flops": self.invariant_flops,
        }


@torch.no_grad()
def measure_cost(pipe, arch: ArchitectureMap, call_kwargs: dict) -> CostModel:
    """Count one transformer forward of a one-prompt, two-step call (`call_kwargs` may hold the caller's own
    num_inference_steps: the count does not depend on it, and this call sets its own)."""
    from diffroute.metrics.step_timing import capture_call

    args, kwargs = capture_call(pipe, ["calibration"], call_kwargs)
    return count_flops(pipe.transformer, arch, args, kwargs)


@torch.no_grad()
def count_flops(transformer, arch: ArchitectureMap, args: tuple, kwargs: dict) -> CostModel:
    """Count one forward of `transformer` with these inputs, per (block, component) and the rest."""
    names = {id(m): (b, c) for b, row in enumerate(arch.modules) for c, m in enumerate(row) if m is not None}
    fqn = {n: names[id(m)] for n, m in transformer.named_modules() if id(m) in names}
    block_ids = {id(m): b for b, m in enumerate(arch.blocks)}
    block_fqn = {n: block_ids[id(m)] for n, m in transformer.named_modules() if id(m) in block_ids}
    invariant = set(arch.spec.call_invariant) if arch.spec is not None else set()
    with FlopCounterMode(display=False) as counter:
        transformer(*args, **kwargs)
    flops = torch.zeros(arch.num_blocks, len(arch.components), dtype=torch.float64)
    blocks = torch.zeros(arch.num_blocks, dtype=torch.float64)  # each block's total, components included
    invariant_flops = 0.0
    for name, ops in counter.get_flop_counts().items():
        name = name.removeprefix("Global.").removeprefix(type(transformer).__name__ + ".")
        if name in invariant:
            invariant_flops += float(sum(ops.values()))
        if name in fqn:
            flops[fqn[name]] = float(sum(ops.values()))
        if name in block_fqn:
            blocks[block_fqn[name]] = float(sum(ops.values()))
    glue = (blocks - flops.sum(dim=1)).clamp(min=0.0)
    other = float(counter.get_total_flops()) - float(flops.sum()) - float(glue.sum())
    return CostModel(flops, max(other, 0.0), glue, invariant_flops)


@dataclass
class LatencyModel:
    """Predicted transformer wall-clock of a schedule on the device it was measured on: each computed cell costs its
    measured component latency, each reused or forecast cell the executor's measured cost of standing in for it, and
    every step the time outside the components (embeddings, norms, gates, final layer, hooks). A fitted schedule's
    stand-ins (`core/fitted.py`: two stored outputs combined with learned weights) cost more than plain reuse's one
    stored output: `fitted_s` and `fitted_block_s` price that, where the table was measured with them."""

    component_s: torch.Tensor  # [blocks, components] seconds per call, 0 where absent
    present: torch.Tensor  # [blocks, components] bool
    step_s: float  # per transformer call, outside the components
    reuse_s: float  # per reused cell
    forecast_s: float  # per forecast cell
    # per (step, block) reused whole, against reusing its components inside it (negative: its norms, modulation
    # and per-component stand-ins no longer run)
    whole_block_s: float = 0.0
    # fitted reuse, over plain: per reused cell, and per block reused whole (over whole_block_s); 0 if not measured
    fitted_s: float = 0.0
    fitted_block_s: float = 0.0

    def seconds(self, schedule: Schedule, fitted: bool | None = None) -> float:
        """Predicted seconds of `schedule`; `fitted`: price its reuses as fitted stand-ins (default: if it carries
        fitted weights; a fitted search prices its candidates so before they are fitted)."""
        fitted = schedule.fit is not None if fitted is None else fitted
        return self._seconds(schedule.compute, schedule.forecast, schedule.block_reuse, fitted)

    def _seconds(self, compute: torch.Tensor, forecast: torch.Tensor, whole: torch.Tensor, fitted=False) -> float:
        """`compute`, `forecast` [steps, blocks, components] and `whole` [steps, blocks]: each cell's share (bool or
        the fraction of samples) computed, forecast, and each block's share reused whole."""
        present = self.present.double()
        c, f = compute.double() * present, forecast.double() * present
        reuse = (1 - c - f) * present
        reuse_s = self.reuse_s + (self.fitted_s if fitted else 0.0)
        whole_s = self.whole_block_s + (self.fitted_block_s if fitted else 0.0)
        return float(
            (c * self.component_s.double()).sum()
            + compute.shape[0] * self.step_s
            + reuse.sum() * reuse_s
            + f.sum() * self.forecast_s
            + whole.double().sum() * whole_s
        )

    def _full(self, num_steps: int) -> float:
        return num_steps * (float(self.component_s[self.present].double().sum()) + self.step_s)

    def relative(self, schedule: Schedule, fitted: bool | None = None) -> float:
        """Predicted time / predicted time of computing everything (`fitted` as in `seconds`)."""
        return self.seconds(schedule, fitted) / self._full(schedule.num_steps)

    def realised(self, stats) -> float:
        """Predicted time of what a call did (a CallStats) / of computing everything: a dynamic plan's latency at
        the shares of samples that computed, forecast and reused each cell (the time of checking, and of running a
        batch split in two, is not modelled)."""
        compute = stats.compute_tensor().nan_to_num(0.0)
        whole = 1 - stats.block_run_tensor()
        return self._seconds(compute, stats.forecast_tensor().nan_to_num(0.0), whole) / self._full(compute.shape[0])

    def to_dict(self) -> dict:
        return {
            "component_s": self.component_s.tolist(),
            "present": self.present.tolist(),
            "step_s": self.step_s,
            "reuse_s": self.reuse_s,
            "forecast_s": self.forecast_s,
            "whole_block_s": self.whole_block_s,
            "fitted_s": self.fitted_s,
            "fitted_block_s": self.fitted_block_s,
        }


def transformer_times(pipe, plans: dict, call, after=None) -> dict[str, float]:
    """Median transformer seconds of `call()` under each plan (interleaved, 3 repeats after a warm-up)."""
    from diffroute.metrics.timing import time_plans

    res = time_plans(pipe, plans, call, repeats=3, after=after)
    return {name: r["transformer_median_s"] for name, r in res.items()}


@torch.no_grad()
def measure_latency(pipe, arch: ArchitectureMap, call, num_steps: int, fitted: bool = False) -> LatencyModel:
    """Fit the latency table on the device: per-component times from forward timers during `full`, then the cost of
    a reused and of a forecast cell from runs that compute step 0 only (reuse) or steps 0-1 only (forecast), and of
    a block reused whole from the same reuse run with every later block reused whole. With `fitted`, the same two
    reuse runs again with fitted weights everywhere price fitted stand-ins (a fitted search's candidates)."""
    from diffroute.metrics.timing import ForwardTimer

    timers = [[None if m is None else ForwardTimer(m) for m in row] for row in arch.modules]
    flat = [t for row in timers for t in row if t is not None]

    def restart(name, timed):  # the component timers sum the timed repeats only
        if not timed:
            for t in flat:
                t.total = 0.0

    try:
        full_s = transformer_times(pipe, {"full": "full"}, call, after=restart)["full"]
        per_call = torch.tensor(
            [[0.0 if t is None else t.total / (3 * num_steps) for t in row] for row in timers], dtype=torch.float64
        )
    finally:
        for t in flat:
            t.remove()
    step_s = max(full_s / num_steps - float(per_call.sum()), 0.0)
    present = arch.present()
    cells, component_s = int(present.sum()), float(per_call.sum())
    only0 = Schedule.fora(arch, num_steps, num_steps)  # step 0 computes, every later cell reuses
    only01 = Schedule.fora(arch, num_steps, num_steps, warmup=min(2, num_steps)).with_forecasts()
    whole0 = only0.with_block_reuse(present)  # step 0 computes, every later block is reused whole
    plans = {"reuse": only0, "forecast": only01, "whole": whole0}
    if fitted:  # weights of a linear extrapolation: both stored outputs are read (no plain-reuse shortcut)
        shape = (num_steps, arch.num_blocks, present.shape[1] + 1, 2)
        weights = torch.tensor([1.5, -0.5], dtype=torch.float64).expand(shape).contiguous()
        plans |= {"reuse fitted": replace(only0, fit=weights), "whole fitted": replace(whole0, fit=weights)}
    times = transformer_times(pipe, plans, call)
    reused, blocks = (num_steps - 1) * cells, max(int(whole0.block_reuse.sum()), 1)
    reuse_s = (times["reuse"] - component_s - num_steps * step_s) / reused
    forecast_s = (times["forecast"] - 2 * component_s - num_steps * step_s) / (max(num_steps - 2, 1) * cells)
    whole_block_s = min((times["whole"] - times["reuse"]) / blocks, 0.0)
    fitted_s = fitted_block_s = 0.0
    if fitted:
        fitted_s = max((times["reuse fitted"] - times["reuse"]) / reused, 0.0)
        fitted_block_s = (times["whole fitted"] - times["reuse fitted"]) / blocks - whole_block_s
    reuse_s, forecast_s = max(reuse_s, 0.0), max(forecast_s, 0.0)
    return LatencyModel(per_call.float(), present, step_s, reuse_s, forecast_s, whole_block_s, fitted_s, fitted_block_s)
