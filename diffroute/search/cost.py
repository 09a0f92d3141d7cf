"""Analytic compute cost of a schedule: FLOPs of each (block, component) counted once by torch's FlopCounterMode
(shape-based, so analytic), plus what runs every step regardless (embeddings, norms, gates, final layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.arch import ArchitectureMap
from diffroute.schedule import Schedule


@dataclass
class CostModel:
    component_flops: torch.Tensor  # [blocks, components], 0 where absent
    other_flops: float  # per transformer call, not in any component

    @property
    def step_flops(self) -> float:
        return float(self.component_flops.sum()) + self.other_flops

    def relative_cost(self, schedule: Schedule) -> float:
        """FLOPs of the schedule / FLOPs of computing everything (1.0 = no saving)."""
        computed = (schedule.compute.double() * self.component_flops.double()).sum()
        return float((computed + self.other_flops * schedule.num_steps) / (self.step_flops * schedule.num_steps))

    def to_dict(self) -> dict:
        return {"component_flops": self.component_flops.tolist(), "other_flops": self.other_flops}


@torch.no_grad()
def measure_cost(pipe, arch: ArchitectureMap, call_kwargs: dict) -> CostModel:
    """Count one transformer forward of a one-prompt call."""
    names = {id(m): (b, c) for b, row in enumerate(arch.modules) for c, m in enumerate(row) if m is not None}
    fqn = {n: names[id(m)] for n, m in pipe.transformer.named_modules() if id(m) in names}
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(["calibration"], num_inference_steps=2, output_type="latent", **call_kwargs)
    finally:
        h.remove()
    args, kwargs = captured["call"]
    with FlopCounterMode(display=False) as counter:
        pipe.transformer(*args, **kwargs)
    flops = torch.zeros(arch.num_blocks, len(arch.components), dtype=torch.float64)
    for name, ops in counter.get_flop_counts().items():
        name = name.removeprefix("Global.").removeprefix(type(pipe.transformer).__name__ + ".")
        if name in fqn:
            flops[fqn[name]] = float(sum(ops.values()))
    other = float(counter.get_total_flops()) - float(flops.sum())
    return CostModel(flops, max(other, 0.0))
