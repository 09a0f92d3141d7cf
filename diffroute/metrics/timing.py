"""Side-by-side wall-clock timing of plans on one pipeline: warm-up, then interleaved repeats, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from diffroute.api import apply, last_stats, remove


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTimer:
    """Sums a module's forward time with plain torch hooks, the same way for vanilla and routed runs."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.total, self._t0 = module, 0.0, None
        self._handles = [
            module.register_forward_pre_hook(self._pre, prepend=True),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _pre(self, module, args):
        _sync(self._device())
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        _sync(self._device())
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class CallTimer:
    """Sums a module's call time from *outside* torch.compile: wraps the module's call (compiled or not) instead of
    adding forward hooks, which a compiled module would trace (a timer inside the graph breaks it, and breaks
    vanilla's graph too). Uses `Module._compiled_call_impl`, the slot `Module.compile()` fills, since torch has no
    public hook that runs around a compiled call. `inner` is the compiled call in use (None: eager)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.total = module, 0.0
        self.inner = self._saved = module._compiled_call_impl

        def timed(*args, **kwargs):
            _sync(self._device())
            t0 = time.perf_counter()
            try:
                return (self.inner or module._call_impl)(*args, **kwargs)
            finally:
                _sync(self._device())
                self.total += time.perf_counter() - t0

        module._compiled_call_impl = timed

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

    def remove(self) -> None:
        self.module._compiled_call_impl = self._saved


def time_plans(
    pipe,
    plans: dict[str, object | None],
    call: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    before: Callable[[str], None] | None = None,
    after: Callable[[str, bool], None] | None = None,
    timer=None,
    activate: Callable | None = None,
    deactivate: Callable | None = None,
    fraction: Callable | None = None,
    cost=None,
    flops: Callable | None = None,
    neighbours: str | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Time `call()` under each plan (None = vanilla, no hooks at all), interleaving plans within every repeat so
    that drifts in machine speed hit all plans alike. Returns per plan: the end-to-end and transformer times of each
    repeat, their medians, and the computed fraction of the last routed call. `before(name)` runs before each call
    (e.g. to switch compilation), `after(name, timed)` after it; `timer` sums transformer time (default
    ForwardTimer). `activate(pipe, plan)`, `deactivate(pipe)` and `fraction(pipe)` (the computed fraction of the
    last call) default to diffroute's own plans; the eval suite passes versions that also run peers' caches. With
    `cost` (a search.cost.CostModel), each plan also gets `flop_ideal`: 1 for vanilla, None for peers' caches.
    `flops(pipe)`: (computed, all) FLOPs of the last call, recorded per plan as `flops` (of the timed calls, so that
    a speedup and its FLOP-ideal come from the same prompts).

    `neighbours` (one of `plans`, e.g. the baseline): that plan also runs between every two others in each repeat
    (b, p1, b, p2, ..., pk, b), and every other plan gets `neighbour_e2e_s` / `neighbour_transformer_s`: per repeat,
    the mean time of the two runs of it just before and just after. A ratio against those pairs runs seconds apart
    instead of a whole repeat apart, so a machine whose speed drifts (a shared VM) biases it far less; a drift that
    is linear over the three runs cancels exactly. It costs about one more baseline run per plan. `progress`: a bar
    over the runs on stderr."""
    from tqdm.auto import tqdm

    activate = activate or apply
    deactivate = deactivate or remove
    fraction = fraction or (lambda p: last_stats(p).computed_fraction)
    device = pipe.transformer.device
    results = {name: {"e2e_s": [], "transformer_s": [], "computed_fraction": 1.0} for name in plans}
    own_timer = timer is None  # a timer passed in belongs to the caller, who removes it
    timer = ForwardTimer(pipe.transformer) if own_timer else timer
    if neighbours is not None and neighbours not in plans:
        raise ValueError(f"neighbours={neighbours!r} is not one of the plans timed: {list(plans)}")
    names = [n for n in plans if n != neighbours]
    per_repeat = 2 * len(names) + 1 if neighbours is not None else len(names)
    bar = tqdm(total=(warmup + repeats) * per_repeat, desc="timing", disable=not progress, leave=False)
    try:
        for r in range(warmup + repeats):
            order = names[r % len(names) :] + names[: r % len(names)] if names else []  # rotate: none always first
            if neighbours is not None:
                order = [neighbours] + [n for name in order for n in (name, neighbours)]
            runs = []  # (name, e2e, transformer) of this repeat, in order
            for name in order:
                plan = plans[name]
                if plan is None:
                    deactivate(pipe)
                else:
                    activate(pipe, plan)
                if before is not None:
                    before(name)
                timer.total = 0.0
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                e2e = time.perf_counter() - t0
                if after is not None:
                    after(name, r >= warmup)
                runs.append((name, e2e, timer.total))
                bar.update(1)
                if r >= warmup:
                    results[name]["e2e_s"].append(e2e)
                    results[name]["transformer_s"].append(timer.total)
                    if plan is not None:
                        results[name]["computed_fraction"] = fraction(pipe)
                        results[name]["stats"] = last_stats(pipe)  # None for peers' caches
                        if flops is not None:
                            results[name]["flops"] = flops(pipe)
            if neighbours is not None and r >= warmup:
                for i in range(1, len(runs), 2):  # a plan at every odd position, the baseline on either side
                    res = results[runs[i][0]]
                    res.setdefault("neighbour_e2e_s", []).append((runs[i - 1][1] + runs[i + 1][1]) / 2)
                    res.setdefault("neighbour_transformer_s", []).append((runs[i - 1][2] + runs[i + 1][2]) / 2)
    finally:
        bar.close()
        if own_timer:
            timer.remove()
        deactivate(pipe)
    for res in results.values():
        res["e2e_median_s"] = statistics.median(res["e2e_s"])
        res["transformer_median_s"] = statistics.median(res["transformer_s"])
        res["e2e_spread"] = spread(res["e2e_s"])
        res["transformer_spread"] = spread(res["transformer_s"])
    if cost is not None:
        for name, res in results.items():
            res["flop_ideal"] = 1.0 if plans[name] is None else flop_ideal_speedup(cost, res.get("stats"))
    return results


def spread(values: list[float]) -> float:
    """(max - min) / median of repeated timings: 0 on a quiet machine, large on a busy one."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid > 0 else 0.0


def _ratios(base: list[float], plan: list[float]) -> list[float]:
    return [b / t for b, t in zip(base, plan) if t > 0]


def paired_speedup_quartiles(base: list[float], plan: list[float]) -> dict:
    """Quartiles of the per-repeat transformer speedup: plans are interleaved within each repeat, so a repeat's
    ratio is paired (a slow spell of the machine hits both), and the quartiles show the timing noise."""
    ratios = _ratios(base, plan)
    if len(ratios) < 2:
        return {}
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"speedup_transformer_q1": q1, "speedup_transformer_q3": q3, "speedup_transformer_quartiles": [q1, q3]}


def speedups(base: dict, t: dict) -> dict:
    """A plan's speedups over the baseline (`time_plans`' results for both) and their quartiles. Paired by
    neighbours (the baseline timed just before and after each run): the median of the per-repeat ratios. Paired by
    repeat (the baseline once per repeat): the ratio of the medians."""
    if "neighbour_transformer_s" in t:
        return {
            "speedup_end_to_end": statistics.median(_ratios(t["neighbour_e2e_s"], t["e2e_s"])),
            "speedup_transformer": statistics.median(_ratios(t["neighbour_transformer_s"], t["transformer_s"])),
            **paired_speedup_quartiles(t["neighbour_transformer_s"], t["transformer_s"]),
        }
    return {
        "speedup_end_to_end": base["e2e_median_s"] / t["e2e_median_s"],
        "speedup_transformer": base["transformer_median_s"] / t["transformer_median_s"],
        **paired_speedup_quartiles(base["transformer_s"], t["transformer_s"]),
    }


def flop_ideal_speedup(cost, stats) -> float | None:
    """Transformer speedup a plan would reach if time followed FLOPs: all FLOPs of full compute over the FLOPs of
    what `stats` (a CallStats) says was computed (components by their measured share, the rest at every step).
    `cost`: a search.cost.CostModel of the same model and call size. None without stats."""
    if stats is None:
        return None
    computed = cost.realised_flops(stats)
    return cost.step_flops * len(stats.compute_map) / computed if computed > 0 else None


SPREAD_LIMIT = 0.15  # timings varying more than this between repeats make a ratio noise


def timing_warnings(name: str, res: dict, speedup: float | None, ideal: float | None) -> list[str]:
    """Why a measured speedup should not be trusted: timings that vary between repeats, or a speedup above what
    the plan's FLOPs allow (no cache beats the FLOP-ideal; only a busy machine makes it look so)."""
    notes = []
    worst = max(res["e2e_spread"], res["transformer_spread"])
    if worst > SPREAD_LIMIT:
        notes.append(
            f"{name}: timings varied by {100 * worst:.0f}% between repeats (the machine is busy?): its speedup is "
            "noise at this level; rerun with more --repeats on a quiet machine"
        )
    if speedup is not None and ideal is not None and speedup > 1.05 * ideal:
        notes.append(
            f"{name}: measured transformer speedup {speedup:.2f}x is above its FLOP-ideal {ideal:.2f}x, which no "
            "cache can reach: the figure is noise (busy machine or too few repeats)"
        )
    return notes
