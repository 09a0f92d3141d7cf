"""Per-call statistics: what was computed where, cache memory and transformer time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class CallStats:
    """What one pipeline call did. `compute_map[step][block][component]` is the fraction of the calls' samples that
    computed (1 computed, 0 reused), or None where the block has no such component."""

    plan: str
    num_steps: int
    block_names: list[str]
    components: list[str]
    computed_fraction: float
    compute_map: list[list[list[float | None]]]
    component_calls: int
    computed_calls: float  # fractions where FFNs ran at part of their width
    peak_cache_bytes: int
    # The analytic bound on the cache: one output per cached component per CFG branch (times the plan's history,
    # 2 for Taylor forecasts), from the sizes of the outputs this call stored (FeatureCache.bound_bytes).
    cache_bound_bytes: int
    transformer_time_s: float
    transformer_calls: int
    completed: bool
    plan_info: dict = field(default_factory=dict)
    # The share of each cell's samples whose output was forecast (Taylor) rather than reused as cached; same layout
    # as compute_map (a forecast cell is not computed: it counts as 0 there).
    forecast_map: list[list[list[float | None]]] | None = None
    # CUDA only (None elsewhere): torch.cuda.max_memory_allocated over the call (the peak is reset at its start).
    max_memory_allocated_bytes: int | None = None
    # [step][block]: the share of samples for which the block ran at all (0 where it was reused or skipped whole,
    # so that its norms and modulation did not run either); 1 for blocks never decided as a whole.
    block_run_map: list[list[float]] | None = None
    # The share of transformer calls in which the call-invariant modules (the text projection, `core/invariant.py`)
    # computed: 1.0 where they run at every call, 1 / steps where the executor computed them once.
    invariant_share: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def compute_tensor(self) -> torch.Tensor:
        """The compute map as a float tensor [steps, blocks, components], NaN where absent."""
        return _tensor(self.compute_map)

    def forecast_tensor(self) -> torch.Tensor:
        """The forecast map as a float tensor [steps, blocks, components] (zeros if not recorded), NaN where absent."""
        if self.forecast_map is None:
            return self.compute_tensor() * 0
        return _tensor(self.forecast_map)

    def block_run_tensor(self) -> torch.Tensor:
        """The block-run map as a float tensor [steps, blocks] (ones if not recorded)."""
        if self.block_run_map is None:
            return torch.ones(len(self.compute_map), len(self.compute_map[0]))
        return torch.tensor(self.block_run_map, dtype=torch.float32)


def _tensor(cells) -> torch.Tensor:
    return torch.tensor(
        [[[float("nan") if v is None else v for v in b] for b in s] for s in cells], dtype=torch.float32
    )


class StatsRecorder:
    """Counts computed and total samples per (step, block, component) in flat Python lists (cheap per hook call)."""

    def __init__(self, num_steps: int, present: torch.Tensor, always=None, device=None):
        self.num_steps = num_steps
        self.present = present.tolist()
        self.nb, self.nc = present.shape
        size = num_steps * self.nb * self.nc
        self.computed = [0] * size
        self.total = [0] * size
        self.forecast = [0] * size
        self.block_ran = [0] * (num_steps * self.nb)  # per (step, block) decided as a whole: rows that ran it
        self.block_total = [0] * (num_steps * self.nb)
        # Unhooked components (computed at every step): counted once per transformer call by `record_always`.
        self._always = [] if always is None else [b * self.nc + c for b, c in always.nonzero().tolist()]
        self.transformer_calls = 0
        self.steps_seen = 0
        self._timer = _Timer()
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self, step: int, block: int, comp: int, n_computed: int, n_total: int, n_forecast: int = 0) -> None:
        i = (step * self.nb + block) * self.nc + comp
        self.computed[i] += n_computed
        self.total[i] += n_total
        self.forecast[i] += n_forecast

    def record_block_run(self, step: int, block: int, n_ran: int, n_total: int) -> None:
        """A block decided as a whole ran for `n_ran` of `n_total` rows (the others reused or skipped it)."""
        i = step * self.nb + block
        self.block_ran[i] += n_ran
        self.block_total[i] += n_total

    def discount(self, step: int, block: int, comp: int, amount: float) -> None:
        """Part of a computed component's work was not done: an FFN run at a fraction of its hidden units counts as
        that fraction of a computed call (`amount` = rows x (1 - fraction), summed over the rows)."""
        self.computed[(step * self.nb + block) * self.nc + comp] -= amount

    def record_always(self, step: int, n: int) -> None:
        base = step * self.nb * self.nc
        for i in self._always:
            self.computed[base + i] += n
            self.total[base + i] += n

    def transformer_start(self, step: int, device: torch.device) -> None:
        self.transformer_calls += 1
        self.steps_seen = max(self.steps_seen, step + 1)
        self._timer.start(device)

    def transformer_stop(self) -> None:
        self._timer.stop()

    def finish(
        self,
        plan: str,
        block_names,
        components,
        peak_bytes: int,
        plan_info: dict,
        cache_bound_bytes: int = 0,
        invariant_runs: int | None = None,
    ) -> CallStats:
        """`invariant_runs`: how often the call-invariant modules computed (None: at every transformer call)."""

        def shares(counts):
            return [
                [
                    [
                        counts[i] / self.total[i] if self.present[b][c] and self.total[i] else None
                        for c, i in enumerate(range((s * self.nb + b) * self.nc, (s * self.nb + b + 1) * self.nc))
                    ]
                    for b in range(self.nb)
                ]
                for s in range(self.num_steps)
            ]

        cmap = shares(self.computed)
        total, computed = sum(self.total), sum(self.computed)
        return CallStats(
            plan=plan,
            num_steps=self.num_steps,
            block_names=list(block_names),
            components=list(components),
            computed_fraction=computed / total if total else 1.0,
            compute_map=cmap,
            component_calls=total,
            computed_calls=computed,
            peak_cache_bytes=peak_bytes,
            cache_bound_bytes=cache_bound_bytes,
            transformer_time_s=self._timer.total(),
            transformer_calls=self.transformer_calls,
            completed=self.steps_seen >= self.num_steps,
            plan_info=plan_info,
            forecast_map=shares(self.forecast),
            block_run_map=[
                [
                    self.block_ran[s * self.nb + b] / t if (t := self.block_total[s * self.nb + b]) else 1.0
                    for b in range(self.nb)
                ]
                for s in range(self.num_steps)
            ],
            invariant_share=(
                1.0 if invariant_runs is None or not self.transformer_calls else invariant_runs / self.transformer_calls
            ),
            max_memory_allocated_bytes=(
                torch.cuda.max_memory_allocated(self.device)
                if self.device is not None and self.device.type == "cuda"
                else None
            ),
        )


class _Timer:
    """Sums forward times: perf_counter on CPU, CUDA events on GPU (read once, at the end of the call)."""

    def __init__(self):
        self.cpu_s = 0.0
        self.events: list = []
        self._t0 = None

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._t0 = ev
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            return
        if isinstance(self._t0, float):
            self.cpu_s += time.perf_counter() - self._t0
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._t0, end))
        self._t0 = None

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
        return self.cpu_s + sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
