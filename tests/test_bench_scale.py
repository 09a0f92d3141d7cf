"""`bench scale`'s arithmetic on the published configurations (at reduced depth and resolution, random weights):
its cache formula is the executor's measured cache to the byte, and its FLOP-ideal speedup is what FlopCounterMode
counts over the routed runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.cli.bench_scale import CACHE_KIND, ScaleCase, plans
from diffroute.metrics.step_timing import summarize, time_steps
from diffroute.zoo.real_configs import REAL_CONFIGS


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_cache_formula_and_flop_ideal_match_measurement(name):
    config = REAL_CONFIGS[name]
    blocks = tuple(2 if len(config.depth_keys) == 1 else 1 for _ in config.depth_keys)
    # bf16: the counts do not depend on the dtype, and the real-width weights (FLUX: 2 GB in fp32) move half as much
    case = ScaleCase(name, "cpu", torch.bfloat16, blocks, steps=6, resolution=4 * config.latent_factor)
    counted, results = {}, {}
    for label, plan in plans().items():
        with FlopCounterMode(display=False) as counter:
            results.update(time_steps(case.model, {label: plan}, case.call_step, case.steps, repeats=1, warmup=0))
        counted[label] = counter.get_total_flops()
    table = summarize(results, case.cost)
    assert counted["full"] == counted["vanilla"] == pytest.approx(case.cost.step_flops * case.steps, rel=1e-12)
    for label, row in table.items():
        assert row["flop_ideal_speedup"] == pytest.approx(counted["vanilla"] / counted[label], rel=1e-9), label
        if label in CACHE_KIND:
            assert row["cache_bound_bytes"] == case.cache_formula(label) > 0, label
    assert counted["fora-3+blocks"] <= counted["fora-3"] < 0.8 * counted["vanilla"]  # work was skipped: not vacuous
