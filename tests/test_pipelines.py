"""Equivalence and behaviour of the six routed pipelines on tiny random-weight diffusers models."""

import numpy as np
import pytest
import torch
from conftest import NAMES, STEPS, prompts, run
from diffusers.hooks import HookRegistry, ModelHook

import diffroute


@pytest.fixture(autouse=True)
def _clean(tiny_pipes):
    yield
    for name in NAMES:  # never leak a plan from one test into the next
        diffroute.remove(tiny_pipes(name))


@pytest.mark.parametrize("name", NAMES)
def test_full_plan_is_bitwise_vanilla(tiny_pipes, name):
    pipe = tiny_pipes(name)
    vanilla = run(pipe, name, prompts(name)[:1], [0])
    pipe.enable_cache("full")
    routed = run(pipe, name, prompts(name)[:1], [0])
    assert np.array_equal(vanilla, routed)
    assert pipe.last_stats.computed_fraction == 1.0 and pipe.last_stats.completed
    assert pipe.last_stats.peak_cache_bytes == 0  # nothing is ever reused, so nothing is kept


@pytest.mark.parametrize("name", NAMES)
def test_disable_restores_vanilla(tiny_pipes, name):
    pipe = tiny_pipes(name)
    vanilla = run(pipe, name, prompts(name)[:1], [1])
    pipe.enable_cache("fora-3")
    cached = run(pipe, name, prompts(name)[:1], [1])
    pipe.disable_cache()
    assert not np.array_equal(vanilla, cached)  # the plan really changed something
    assert np.array_equal(vanilla, run(pipe, name, prompts(name)[:1], [1]))
    assert pipe.last_stats is None


class _Count(ModelHook):
    def __init__(self):
        super().__init__()
        self.n = 0

    def pre_forward(self, module, *args, **kwargs):
        self.n += 1
        return args, kwargs


@pytest.mark.parametrize("name", NAMES)
def test_fora3_computes_a_third(tiny_pipes, name):
    pipe = tiny_pipes(name)
    full = run(pipe, name, prompts(name)[:1], [2], steps=9)
    other_seed = run(pipe, name, prompts(name)[:1], [3], steps=9)
    arch = diffroute.architecture_map(pipe.transformer)
    counters = []
    for row in arch.modules:  # inner hooks: they see only the calls that really execute
        for module in row:
            if module is not None:
                counters.append(_Count())
                HookRegistry.check_if_exists_or_initialize(module).register_hook(counters[-1], "count")
    try:
        pipe.enable_cache("fora-3")
        cached = run(pipe, name, prompts(name)[:1], [2], steps=9)
    finally:
        pipe.disable_cache()
        for row in arch.modules:
            for module in row:
                if module is not None:
                    module._diffusers_hook.remove_hook("count", recurse=False)
    executed = sum(c.n for c in counters)
    calls_per_step = 2 if name == "flux" else 1  # FLUX's true CFG: two transformer calls per step
    assert executed == 3 * len(counters) * calls_per_step  # steps 0, 3, 6 of 9
    assert np.isfinite(cached).all()
    # close: far nearer to the full-compute image than another seed's image is
    assert np.abs(cached - full).mean() < 0.5 * np.abs(other_seed - full).mean()


@pytest.mark.parametrize("name", NAMES)
def test_stats_count_what_ran(tiny_pipes, name):
    pipe = tiny_pipes(name)
    pipe.enable_cache("fora-3")
    run(pipe, name, prompts(name)[:1], [0], steps=9)
    stats = pipe.last_stats
    assert stats.computed_fraction == pytest.approx(1 / 3)
    cmap = stats.compute_tensor()
    present = diffroute.architecture_map(pipe.transformer).present()
    assert cmap.shape == (9, *present.shape)
    assert torch.isnan(cmap[:, ~present]).all() and not torch.isnan(cmap[:, present]).any()
    assert (cmap[[0, 3, 6]][:, present] == 1).all() and (cmap[[1, 2, 4, 5, 7, 8]][:, present] == 0).all()
    assert stats.peak_cache_bytes > 0 and stats.transformer_time_s > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("plan", ["full", "fora-3"])
def test_batch_matches_single_prompt_runs(tiny_pipes, name, plan):
    pipe = tiny_pipes(name)
    pipe.enable_cache(plan)
    p = prompts(name)
    batch = run(pipe, name, p, [5, 6])
    singles = np.concatenate([run(pipe, name, [p[0]], [5]), run(pipe, name, [p[1]], [6])])
    np.testing.assert_allclose(batch, singles, atol=1e-4)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", NAMES)
def test_error_mid_loop_leaves_next_call_clean(tiny_pipes, name):
    pipe = tiny_pipes(name)
    pipe.enable_cache("fora-3")
    expected = run(pipe, name, prompts(name)[:1], [7])
    calls = {"n": 0}

    def boom(module, args):  # raise inside the 4th transformer forward, after some blocks ran
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Boom()

    block = diffroute.architecture_map(pipe.transformer).modules[-1]
    handle = next(m for m in block if m is not None).register_forward_pre_hook(boom)
    with pytest.raises(_Boom):
        run(pipe, name, prompts(name)[:1], [8])
    handle.remove()
    executor = diffroute.get_executor(pipe)
    assert executor.stats is None and executor.cache.bytes == 0
    assert pipe.last_stats.completed is False
    assert np.array_equal(run(pipe, name, prompts(name)[:1], [7]), expected)
    assert pipe.last_stats.completed


@pytest.mark.parametrize("name", NAMES)
def test_functional_form_on_vanilla_pipeline(tiny_pipes, name):
    """diffroute.apply on a pipeline we do not subclass recovers the step context from the transformer calls."""
    routed = tiny_pipes(name)
    vanilla_cls = next(c for c in type(routed).__mro__ if c.__module__.startswith("diffusers.pipelines"))
    pipe = vanilla_cls(**routed.components)
    pipe.set_progress_bar_config(disable=True)
    routed.enable_cache("fora-3")
    expected = run(routed, name, prompts(name)[:1], [4])
    routed.disable_cache()
    diffroute.apply(pipe, "fora-3")
    try:
        for _ in range(2):  # twice: the second call must start clean, without any bracket around it
            assert np.array_equal(run(pipe, name, prompts(name)[:1], [4]), expected)
            assert diffroute.last_stats(pipe).computed_fraction == pytest.approx(1 / 3)
    finally:
        diffroute.remove(pipe)


@pytest.mark.parametrize("name", ["pixart-alpha", "sd3"])
def test_other_step_count_resamples(tiny_pipes, name):
    pipe = tiny_pipes(name)
    arch = diffroute.architecture_map(pipe.transformer)
    schedule = diffroute.Schedule.fora(arch, 12, 3)
    pipe.enable_cache(schedule)
    run(pipe, name, prompts(name)[:1], [0], steps=STEPS)
    stats = pipe.last_stats
    assert stats.num_steps == STEPS and stats.plan_info["schedule_provenance"]["resampled_from"] == 12
    expected = schedule.resample(STEPS).computed_fraction(arch.present())
    assert stats.computed_fraction == pytest.approx(expected)
