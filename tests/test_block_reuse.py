"""Whole-block reuse (`+blocks`, schedule cell `r`): a reused block returns its input plus the residual it added at
its last computation, the mechanism FBCache/DBCache use, for every schedule plan."""

import collections
import inspect

import numpy as np
import pytest
import torch
from conftest import NAMES, STEPS, fresh_pipe, prompts, run
from torch.utils._python_dispatch import TorchDispatchMode

import diffroute
from diffroute.core.arch import architecture_map
from diffroute.core.schedule import Schedule, ScheduleMismatchError
from diffroute.errors import PlanError


def _reference_block_reuse(pipe, every: int):
    """FORA-`every` at block level written as plain forward replacements, independent of the executor: at computed
    steps a block runs and keeps output minus input per stream; at other steps it returns input plus that residual.
    A new timestep is a new step; calls at the same timestep (true CFG) are branches with residuals of their own.
    For one pipeline call."""
    state = {"step": -1, "branch": 0, "t": None}

    def count(module, args, kwargs):
        t = float(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0])
        state["branch"] = state["branch"] + 1 if t == state["t"] else 0
        state["step"] += t != state["t"]
        state["t"] = t

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    saved = {}
    for b, block in enumerate(architecture_map(pipe.transformer).blocks):
        signature, forward = inspect.signature(type(block).forward), block.forward

        def replaced(*args, _b=b, _block=block, _sig=signature, _fwd=forward, **kwargs):
            bound = _sig.bind(_block, *args, **kwargs).arguments
            h, e = bound["hidden_states"], bound.get("encoder_hidden_states")
            key = (_b, state["branch"])
            if state["step"] % every == 0:
                out = _fwd(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    saved[key] = out - h
                else:
                    text = None if out[0] is None or e is None or out[0].shape != e.shape else out[0] - e
                    saved[key] = (text, out[1] - h)
                return out
            res = saved[key]
            if isinstance(res, torch.Tensor):
                return h + res
            return (None if res[0] is None else e + res[0], h + res[1])

        block.forward = replaced
    return handle


@pytest.mark.parametrize("name", NAMES)
def test_block_reuse_is_input_plus_stored_residual(name):
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, "fora-3+blocks")
    routed = run(pipe, name, prompts(name), [0, 1])
    stats = pipe.last_stats
    diffroute.remove(pipe)
    handle = _reference_block_reuse(pipe, 3)
    try:
        reference = run(pipe, name, prompts(name), [0, 1])
    finally:
        handle.remove()
    np.testing.assert_array_equal(routed, reference)
    assert stats.computed_fraction == pytest.approx(2 / STEPS)  # steps 0 and 3 of 6 compute


def test_block_reuse_cell_round_trips_and_bad_cells_are_refused(tmp_path):
    arch = architecture_map(fresh_pipe().transformer)
    s = Schedule.fora(arch, 4, 2).with_block_reuse(arch.present())
    assert s.block_reuse[1].all() and not s.block_reuse[0].any() and s.block_pure(arch.present())
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json").to_dict() == s.to_dict()
    assert "rrr" in s.to_dict()["compute"][1]
    d = s.to_dict()
    d["compute"][1] = d["compute"][1].replace("rrr", "r0r", 1)
    with pytest.raises(ScheduleMismatchError, match="mixes r"):
        Schedule.from_dict(d)
    with pytest.raises(ScheduleMismatchError, match="reused as a whole"):
        Schedule(s.compute | True, s.model_class, s.components, {}, None, s.block_reuse)


def test_blocks_suffix_is_refused_where_it_means_nothing():
    with pytest.raises(PlanError, match="does not take"):
        diffroute.resolve_plan("fbcache-0.1+blocks")
    with pytest.raises(PlanError, match="forecasts"):
        diffroute.resolve_plan("taylor-3+blocks")


def test_mixed_schedule_reuses_only_all_reused_blocks_and_counts_every_cell():
    """A schedule where some blocks reuse everything at a step and others only some components: the first are
    reused whole, the second keep their component decisions; stats count the same cells either way."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    s = Schedule.fora(arch, STEPS, 2)
    s.compute[1::2, 0, arch.components.index("attn2")] = True  # block 0 keeps cross-attention on odd steps
    plain = diffroute.resolve_plan(s)
    whole = plain.with_block_reuse()
    assert whole.block_level(arch).tolist() == [False, True]  # only block 1 is ever reused whole
    diffroute.apply(pipe, plain)
    a = run(pipe, name, prompts(name), [0, 1])
    fraction = pipe.last_stats.computed_fraction
    diffroute.apply(pipe, whole)
    b = run(pipe, name, prompts(name), [0, 1])
    assert pipe.last_stats.computed_fraction == pytest.approx(fraction)
    assert np.isfinite(b).all() and not np.array_equal(a, b)  # block 1 now reuses its residual, not its components


def test_blocks_suffix_keeps_a_router_plans_checks():
    plan = diffroute.resolve_plan("emoji:l2c+blocks")
    assert plan.name == "emoji:l2c+blocks" and type(plan).__name__ == "RouterPlan"
    with pytest.raises(PlanError):
        plan.check_call(7)  # trained for 20 steps: still refused at any other count


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan", ["fora-100", "fora-100+blocks"])
def test_reuse_steps_copy_nothing(plan):
    """A reused step hands out the cache's own buffers: no copy of any tensor (copies happen when storing)."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, plan)
    per_call, mode = [], _Ops()

    def start(module, args, kwargs):
        mode.counts.clear()
        mode.__enter__()

    def end(module, args, kwargs, out):
        mode.__exit__(None, None, None)
        per_call.append(dict(mode.counts))

    h1 = pipe.transformer.register_forward_pre_hook(start, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(end, with_kwargs=True)
    try:
        run(pipe, name, prompts(name), [0, 1])
    finally:
        h1.remove()
        h2.remove()
    assert per_call[0].get("aten.copy_", 0) > 0  # the first step stores its outputs (the count can see copies)
    for ops in per_call[1:]:
        assert ops.get("aten.copy_", 0) == 0 and ops.get("aten.clone", 0) == 0
    if plan.endswith("+blocks"):  # a block reused whole runs no norm and no matmul of its own
        assert per_call[1].get("aten.native_layer_norm", 0) == 1  # the output layer's norm only
        assert per_call[1].get("aten.addmm", 0) < per_call[0].get("aten.addmm", 0) / 3
