"""`bench scale`'s arithmetic on the published configurations (at reduced depth and resolution, random weights):
its cache formula is the executor's measured cache to the byte, and its FLOP-ideal speedup is what FlopCounterMode
counts over the routed runs."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.cli.bench_scale import CACHE_KIND, ScaleCase, plans
from diffroute.metrics.step_timing import summarize, time_steps
from diffroute.zoo.real_configs import REAL_CONFIGS


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_cache_formula_and_flop_ideal_match_measurement(name, monkeypatch):
    # 16 text tokens, not the real 120-512: the arithmetic holds for any length, and FLUX's 512 cost a minute
    config = dataclasses.replace(REAL_CONFIGS[name], text_tokens=16)
    monkeypatch.setitem(REAL_CONFIGS, name, config)
    blocks = tuple(2 if len(config.depth_keys) == 1 else 1 for _ in config.depth_keys)
    # fp32, not bf16: the counts do not depend on the dtype, and a CPU without native bf16 emulates it (FLUX's case
    # took 336 s in bf16 against 65 s in fp32 on a 2-core AMD EPYC without AVX-512)
    case = ScaleCase(name, "cpu", torch.float32, blocks, steps=6, resolution=4 * config.latent_factor)
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
