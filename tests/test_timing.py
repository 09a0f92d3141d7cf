"""Timing figures a user can trust: spreads, the FLOP-ideal speedup, and warnings when a figure is noise."""

import torch

from diffroute.core.stats import CallStats
from diffroute.metrics.timing import flop_ideal_speedup, spread, timing_warnings
from diffroute.search.cost import CostModel


def _stats(compute_map) -> CallStats:
    fields = {f: None for f in CallStats.__dataclass_fields__}
    fields.update(compute_map=compute_map, computed_fraction=0.5, plan_info={})
    return CallStats(**fields)


def test_flop_ideal_weighs_components_by_their_flops():
    cost = CostModel(component_flops=torch.tensor([[1.0, 3.0]]), other_flops=0.0)
    # two steps; the expensive component is reused at the second: (4 + 4) / (4 + 1) FLOPs
    assert flop_ideal_speedup(cost, _stats([[[1.0, 1.0]], [[1.0, 0.0]]])) == 8 / 5
    cost = CostModel(component_flops=torch.tensor([[1.0, 3.0]]), other_flops=4.0)  # work outside the components
    assert flop_ideal_speedup(cost, _stats([[[1.0, 1.0]], [[1.0, 0.0]]])) == 16 / 13
    assert flop_ideal_speedup(cost, None) is None


def test_warnings_for_busy_timings_and_above_ideal_speedups():
    quiet = {"e2e_spread": spread([1.0, 1.02, 0.99]), "transformer_spread": 0.01}
    assert timing_warnings("fora-3", quiet, 1.9, 2.5) == []
    busy = {"e2e_spread": spread([1.0, 2.0, 1.1]), "transformer_spread": 0.01}
    (note,) = timing_warnings("fora-3", busy, 1.9, 2.5)
    assert "varied by 91%" in note
    (note,) = timing_warnings("fora-3", quiet, 3.2, 2.5)
    assert "above its FLOP-ideal 2.50x" in note


def test_bench_overhead_reports_spread_and_flop_ideal():
    import json
    import subprocess
    import sys

    args = ["bench", "overhead", "--model", "tiny-pixart", "--batch", "1", "--steps", "4", "--repeats", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffroute", *args, "--plans", "full,fora-2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["plans"]
    assert rows["vanilla"]["flop_ideal_speedup"] == 1.0 and rows["full"]["flop_ideal_speedup"] == 1.0
    assert 1.2 < rows["fora-2"]["flop_ideal_speedup"] < 2  # half the steps' blocks, the rest at every step
    assert all(r["end_to_end_spread"] >= 0 for r in rows.values()) and isinstance(result["timing_warnings"], list)
