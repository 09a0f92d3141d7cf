"""Per-step transformer timing of plans on a bare transformer, side by side: what a denoising step costs when it
computes, when it reuses components and when it reuses whole blocks (benchmarks print these; tests never assert
timings). Plans are interleaved within every repeat, so a drift in machine speed hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffroute.api import apply, remove
from diffroute.metrics.timing import flop_ideal_speedup, spread


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DenoisingLoop:
    """Stands in for a pipeline's scheduler: the executor reads the step from its counter, as in a pipeline (no
    device read of the timestep), so a bare transformer is timed with the step structure pipelines give it."""

    step_index: int | None = None

    def __init__(self, num_steps: int, transformer: torch.nn.Module):
        self.timesteps = list(range(num_steps))
        self.transformer = transformer  # (so that `apply(loop, plan)` finds the transformer and this scheduler)
        self.scheduler = self


@dataclass
class PlanSteps:
    """One plan's timings: seconds per step per repeat, and what the last run computed."""

    step_s: list[list[float]] = field(default_factory=list)  # [repeat][step]
    stats: object | None = None  # CallStats of the last run (None: vanilla)

    @property
    def total_s(self) -> float:
        """Median over repeats of the run's transformer seconds."""
        return statistics.median(sum(r) for r in self.step_s)

    @property
    def spread(self) -> float:
        return spread([sum(r) for r in self.step_s])

    def median_step_s(self, steps: list[int]) -> float | None:
        """Median seconds of the given steps over all repeats (None: no such step)."""
        values = [r[s] for r in self.step_s for s in steps]
        return statistics.median(values) if values else None

    def flop_share(self, cost) -> list[float]:
        """Per step, the FLOPs computed over a full step's (1: everything ran; the rest of the model counts too)."""
        if self.stats is None:
            return [1.0] * len(self.step_s[0])
        shares = self.stats.compute_tensor().double().nan_to_num(0.0)
        runs = self.stats.block_run_tensor()
        return [cost.computed_flops(shares[s : s + 1], runs[s : s + 1]) / cost.step_flops for s in range(len(shares))]

    def steps_where(self, cost, reused: bool) -> list[int]:
        """Steps that computed every component (`reused=False`) or none (`reused=True`: what runs is outside the
        components, and inside the blocks only where they ran)."""
        share = self.flop_share(cost)
        if not reused:
            return [s for s, v in enumerate(share) if abs(v - 1.0) < 1e-9]
        shares = self.stats.compute_tensor().nan_to_num(0.0) if self.stats is not None else None
        return [] if shares is None else [s for s in range(len(share)) if float(shares[s].sum()) == 0.0]


@torch.no_grad()
def time_steps(
    transformer: torch.nn.Module,
    plans: dict[str, object | None],
    call_step: Callable[[int], None],
    num_steps: int,
    repeats: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, PlanSteps]:
    """Run `call_step(i)` for i in range(num_steps) under each plan (None: vanilla, no hooks), timing every step;
    `warmup` untimed runs first. The executor's stats of each plan's last run come back with its times."""
    device = next(transformer.parameters()).device
    loop = DenoisingLoop(num_steps, transformer)
    results = {name: PlanSteps() for name in plans}
    names = list(plans)
    try:
        for r in range(warmup + repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if progress is not None:
                    progress(name)
                plan = plans[name]
                executor = None if plan is None else apply(loop, plan)
                if executor is None:
                    remove(transformer)
                times = []
                for i in range(num_steps):
                    loop.step_index = i
                    _sync(device)
                    t0 = time.perf_counter()
                    call_step(i)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                if executor is not None:
                    executor.end_call()
                if r >= warmup:
                    results[name].step_s.append(times)
                    results[name].stats = None if executor is None else executor.last_stats
    finally:
        remove(transformer)
    return results


@torch.no_grad()
def capture_call(pipe, prompts: list[str], call_kwargs: dict, generator=None) -> tuple[tuple, dict]:
    """The arguments of the first transformer call a two-step pipeline call makes (to replay at any timestep)."""
    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "num_inference_steps"}
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("call", (args, dict(kwargs)))

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts, num_inference_steps=2, output_type="latent", generator=generator, **call_kwargs)
    finally:
        h.remove()
    return captured["call"]


def summarize(results: dict[str, PlanSteps], cost, baseline: str = "vanilla") -> dict[str, dict]:
    """Per plan: median run seconds, speedup over `baseline`, FLOP-ideal speedup, and the cost of its compute and
    all-reuse steps relative to the baseline's median step."""
    base = results[baseline]
    base_step = statistics.median(s for r in base.step_s for s in r)
    rows = {}
    for name, res in results.items():
        reuse, compute = res.steps_where(cost, reused=True), res.steps_where(cost, reused=False)
        reuse_s, compute_s = res.median_step_s(reuse), res.median_step_s(compute)
        ideal = 1.0 if res.stats is None else flop_ideal_speedup(cost, res.stats)
        speedup = base.total_s / res.total_s
        rows[name] = {
            "transformer_s": res.total_s,
            "spread": res.spread,
            "speedup": speedup,
            "flop_ideal_speedup": ideal,
            "of_ideal": speedup / ideal if ideal else None,
            "reuse_steps": len(reuse),
            "reuse_step_vs_full": None if reuse_s is None else reuse_s / base_step,
            "compute_step_vs_full": None if compute_s is None else compute_s / base_step,
            "cache_bound_bytes": None if res.stats is None else res.stats.cache_bound_bytes,
            "computed_fraction": 1.0 if res.stats is None else res.stats.computed_fraction,
        }
    return rows
