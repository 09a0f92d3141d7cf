"""One plan over a transformer made of whole transformers (an ensemble of experts): one executor per part.

Each part keeps its own architecture map, feature cache and decider state ("state is per expert"). The parent runs
a part at the steps, and for the samples, it routes to that part; it names both through `run_part`: the step from
the parent's own step tracker, and a branch per set of samples, so that a cached output or a decider's state is
only ever used for the very samples that produced it (a set seen for the first time computes in full). The merged
stats weigh each part's compute map by the samples it served at each step.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from diffroute.core.context import StepTracker, scheduler_step_source
from diffroute.core.executor import Executor
from diffroute.core.stats import CallStats


class PartsExecutor:
    """Executors for `transformer.diffroute_parts()`, driven by the parent's calls (see the module docstring)."""

    def __init__(self, transformer: torch.nn.Module, plan, scheduler=None, num_inference_steps: int | None = None):
        self.transformer = transformer
        self.parts = [
            Executor(p, plan, scheduler=scheduler, num_inference_steps=num_inference_steps)
            for p in transformer.diffroute_parts()
        ]
        self.plan = self.parts[0].plan
        source = scheduler_step_source(scheduler) if scheduler is not None else None
        self.tracker = StepTracker(source, num_inference_steps or self.plan.default_num_steps)
        self._branches: dict[tuple, int] = {}
        self._served: list[dict[int, int]] = []  # per step: part -> rows it ran
        self.last_stats: CallStats | None = None
        self.part_stats: list[CallStats | None] = []

    @property
    def ctx(self):
        return self.tracker.ctx

    @property
    def stats(self):
        """Truthy while a call is open (what `api.last_stats` asks)."""
        return self._served or None

    def attach(self) -> PartsExecutor:
        for p in self.parts:
            p.attach()
        return self

    def detach(self) -> None:
        self.end_call()
        for p in self.parts:
            p.detach()

    def check_call(self, num_steps: int | None) -> None:
        self.parts[0].check_call(num_steps)

    def begin(self, timestep, batch_size: int) -> None:
        """The parent's call starts: track its step (a new pipeline call closes the last one)."""
        ctx, new_call = self.tracker.advance(timestep, batch_size)
        if new_call and self._served:
            self._close()
        while len(self._served) <= ctx.step:
            self._served.append({})

    @contextlib.contextmanager
    def run_part(self, part: int, rows: tuple[int, ...]):
        """Run part `part` for the parent's samples `rows` (indices into the parent's batch) at the current step."""
        ctx = self.tracker.ctx
        branch = self._branches.setdefault((part, rows), len(self._branches))
        self._served[ctx.step][part] = self._served[ctx.step].get(part, 0) + len(rows)
        with self.parts[part].at_step(ctx.step, branch, ctx.num_steps):
            yield

    pipeline_call = Executor.pipeline_call  # (it only brackets the call with end_call, which both define)

    def end_call(self, reset_tracker: bool = True) -> None:
        if self._served:
            self._close()
        if reset_tracker:
            self.tracker.reset()

    def _close(self) -> None:
        for p in self.parts:
            p.end_call()
        self.part_stats = [p.last_stats for p in self.parts]
        self.last_stats = merge_stats(self.part_stats, self._served)
        routing = getattr(self.transformer, "last_routing", None)  # which part served each row at each step
        if self.last_stats is not None and routing is not None:
            self.last_stats.plan_info["experts"] = routing.experts
        self._branches.clear()
        self._served = []


def merge_stats(stats: list[CallStats | None], served: list[dict[int, int]]) -> CallStats | None:
    """One call's stats from its parts': maps weighted by the samples each part served at each step."""
    present = [(i, s) for i, s in enumerate(stats) if s is not None]
    if not present:
        return None
    steps = max(len(s.compute_map) for _, s in present)

    def merged(get):
        out = None
        for step in range(steps):
            weights = {i: served[step].get(i, 0) if step < len(served) else 0 for i, _ in present}
            total = sum(weights.values()) or 1
            acc = None
            for i, s in present:
                m = get(s)
                if m is None or step >= len(m):
                    continue
                cell = torch.nan_to_num(torch.tensor(_floats(m[step])), nan=0.0) * weights[i] / total
                acc = cell if acc is None else acc + cell
            out = [] if out is None else out
            out.append(acc)
        return out

    base = present[0][1]
    absent = torch.tensor(_floats(base.compute_map[0])).isnan()

    def as_cells(tensors):
        return [
            [[None if absent[b, c] else float(t[b, c]) for c in range(t.shape[1])] for b in range(t.shape[0])]
            for t in tensors
        ]

    compute = merged(lambda s: s.compute_map)
    forecast = merged(lambda s: s.forecast_map)
    calls = sum(s.component_calls for _, s in present)
    computed = sum(s.computed_calls for _, s in present)
    part_calls = sum(s.transformer_calls for _, s in present)
    runs = merged(lambda s: None if s.block_run_map is None else [[row] for row in s.block_run_map])
    return replace(
        base,
        computed_fraction=computed / calls if calls else 1.0,
        compute_map=as_cells(compute),
        forecast_map=as_cells(forecast) if forecast and all(f is not None for f in forecast) else None,
        block_run_map=[t[0].tolist() for t in runs] if runs and all(r is not None for r in runs) else None,
        component_calls=calls,
        computed_calls=computed,
        peak_cache_bytes=sum(s.peak_cache_bytes for _, s in present),
        cache_bound_bytes=sum(s.cache_bound_bytes for _, s in present),
        transformer_time_s=sum(s.transformer_time_s for _, s in present),
        transformer_calls=part_calls,
        # the text projection's runs over the parts' calls (each part projects the text for the rows it serves)
        invariant_share=(
            sum(s.invariant_share * s.transformer_calls for _, s in present) / part_calls if part_calls else 1.0
        ),
        completed=all(s.completed for _, s in present),
        plan_info={**base.plan_info, "parts": len(stats), "served": [dict(sorted(d.items())) for d in served]},
    )


def _floats(cells) -> list:
    return [[float("nan") if v is None else v for v in row] for row in cells]
