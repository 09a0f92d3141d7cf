"""The shared call-context hook: every listener sees each call's latent and per-sample timestep in the scheduler's
units on all six families, the hook leaves outputs bitwise alone and goes with its last listener, and the routing
modules (FeRA, DAR, MoE) share one hook."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run
from diffusers.hooks import HookRegistry

from diffroute.core.call_context import HOOK, add_call_listener, has_call_listener, remove_call_listener
from diffroute.surgery.dar import apply_dar, remove_dar
from diffroute.surgery.fera import apply_fera, disable_fera
from diffroute.surgery.moe import remove_moe, upcycle_moe
from diffroute.zoo.tiny import TINY_PIPELINES


class _Recorder:
    def __init__(self, log):
        self.log = log

    def begin(self, info):
        self.log.append(("begin", info.hidden_states.shape[0], info.timestep.clone()))

    def end(self):
        self.log.append(("end",))


def _hook(transformer):
    return HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK)


@pytest.mark.parametrize("name", NAMES)
def test_listeners_see_each_calls_timesteps_and_outputs_stay_bitwise(name):
    pipe = TINY_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    ref = run(pipe, name, prompts(name), [0, 1], steps=3)
    log = []
    add_call_listener(pipe.transformer, "rec", _Recorder(log))
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1], steps=3), ref)
    begins = [e for e in log if e[0] == "begin"]
    assert [e[0] for e in log] == ["begin", "end"] * len(begins)  # each call opened and closed, in order
    assert len(begins) == 3 * (2 if name == "flux" else 1)  # FLUX's true CFG calls twice per step
    for _, batch, t in begins:
        assert t.shape == (batch,) and (t == t[0]).all()
    ts = [float(t[0]) for _, _, t in begins]
    assert ts == sorted(ts, reverse=True) and 1.0 < ts[0] <= 1000.0  # scheduler units, FLUX's t/1000 scaled back
    with pytest.raises(ValueError, match="already"):
        add_call_listener(pipe.transformer, "rec", _Recorder([]))
    remove_call_listener(pipe.transformer, "rec")
    assert _hook(pipe.transformer) is None and not has_call_listener(pipe.transformer, "rec")


def test_routing_modules_share_one_hook_and_leave_with_their_listener():
    pipe = TINY_PIPELINES["pixart-alpha"]()
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    upcycle_moe(t, 6, 2, capacity="static:2")
    apply_dar(t)
    apply_fera(t)
    assert set(_hook(t).listeners) == {"diffroute_moe_timestep", "diffroute_stream", "diffroute_fera"}
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=2)
    disable_fera(t)
    remove_dar(t)
    assert set(_hook(t).listeners) == {"diffroute_moe_timestep"}
    remove_moe(t)
    assert _hook(t) is None
    with torch.no_grad():
        run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=2)  # still runs with no hook left


def test_the_step_context_and_the_call_context_speak_the_schedulers_timestep_units():
    """FLUX is called with t / 1000: its ArchSpec's timestep_scale brings both contexts to the scheduler's units, so
    a router embeds the same timestep an MoE capacity reads."""
    from conftest import fresh_pipe

    import diffroute
    from diffroute.core.arch import spec_of

    pipe = fresh_pipe("flux")
    assert spec_of(pipe.transformer).timestep_scale == 1000.0
    diffroute.apply(pipe, "full")
    seen = []
    executor = diffroute.get_executor(pipe)
    start = executor.on_transformer_start

    def spy(timestep, hidden, name=None):
        start(timestep, hidden, name)
        seen.append(float(torch.as_tensor(executor.ctx.timestep).reshape(-1)[0]))

    executor.on_transformer_start = spy
    run(pipe, "flux", prompts("flux"), [0, 1], steps=3)
    expected = [float(t) for t in pipe.scheduler.timesteps]
    assert seen[::2] == pytest.approx(expected, rel=1e-5)  # two calls per step (true CFG)


def test_the_branch_is_the_name_the_pipeline_gives_the_call():
    """FLUX's pipeline names its true-CFG calls with diffusers' `cache_context` ("cond", "uncond"): the executor's
    step context takes the branch from that name, not from counting calls, so a step with the unconditional call
    alone (a guidance interval, say) is still branch 1."""
    from conftest import fresh_pipe

    import diffroute
    from diffroute.core.context import StepTracker

    pipe = fresh_pipe("flux")
    diffroute.apply(pipe, "full")
    executor = diffroute.get_executor(pipe)
    start, seen = executor.on_transformer_start, []

    def spy(timestep, hidden, name=None):
        start(timestep, hidden, name)
        seen.append((name, executor.ctx.step, executor.ctx.branch))

    executor.on_transformer_start = spy
    run(pipe, "flux", prompts("flux")[:1], [0], steps=3)
    assert seen == [(n, s, b) for s in range(3) for n, b in (("cond", 0), ("uncond", 1))]

    tracker = StepTracker()  # no scheduler counter: steps from the timestep's value
    calls = [(900.0, "cond"), (900.0, "uncond"), (600.0, "uncond"), (300.0, "cond"), (300.0, None)]
    got = [tracker.advance(torch.tensor([t]), 2, name)[0] for t, name in calls]
    assert [(c.step, c.branch) for c in got] == [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
