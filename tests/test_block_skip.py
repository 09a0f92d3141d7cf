"""Block-level SKIP decisions (the block returns its input) and soft block gates with gradients, on all six families."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run

import diffroute
from diffroute.core.deciders import SKIP, Decider
from diffroute.plans import Plan

STEPS = 4


class _BlockPlan(Plan):
    """Decides block `block` as a whole with `decision(step)`; every other block computes."""

    name = "block-test"

    def __init__(self, block, decision):
        self.block, self.decision = block, decision

    def block_level(self, arch):
        mask = torch.zeros(arch.num_blocks, dtype=torch.bool)
        mask[self.block] = True
        return mask

    def always_computed(self, arch):
        mask = arch.present()
        mask[self.block] = False
        return mask

    def decider(self, arch, num_steps):
        plan = self

        class _D(Decider):
            def decide(self, ctx, block, comp):
                return True

            def decide_block(self, ctx, block):
                return plan.decision(ctx.step)

            def must_store_block(self, ctx, block):
                return False

        return _D()


def _skip_hook(pipe, block):
    """The reference: plain forward hooks returning the block's input from step 1 on (a step: a new timestep)."""
    state = {"t": None, "step": -1}

    def count(module, args, kwargs):
        t = float(torch.as_tensor(kwargs["timestep"]).flatten()[0])
        if t != state["t"]:
            state["t"], state["step"] = t, state["step"] + 1

    def hook(module, args, kwargs, out):
        if state["step"] < 1:
            return out
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(out, torch.Tensor):
            return hidden
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return (None if out[0] is None else text, hidden)

    return [
        pipe.transformer.register_forward_pre_hook(count, with_kwargs=True),
        block.register_forward_hook(hook, with_kwargs=True),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_skip_returns_the_blocks_input_and_counts_nothing_computed(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    arch = diffroute.architecture_map(pipe.transformer)
    b = arch.num_blocks - 1  # the last block: for SD3 the one without a text output
    handles = _skip_hook(pipe, arch.blocks[b])
    try:
        reference = run(pipe, name, ps, [0, 1], steps=STEPS)
    finally:
        for h in handles:
            h.remove()
    diffroute.apply(pipe, _BlockPlan(b, lambda step: True if step < 1 else SKIP))
    try:
        skipped = run(pipe, name, ps, [0, 1], steps=STEPS)
        stats = pipe.last_stats
    finally:
        diffroute.remove(pipe)
    np.testing.assert_array_equal(skipped, reference)
    assert not np.array_equal(skipped, run(pipe, name, ps, [0, 1], steps=STEPS))  # skipping changed the images
    present = arch.present()[b]
    assert stats.compute_map[1][b][int(present.nonzero()[0])] == 0.0


@pytest.mark.parametrize("name", ["pixart-alpha", "flux"])
def test_soft_block_gate_weight_one_is_the_block_and_gradients_reach_the_gate(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    vanilla = run(pipe, name, ps, [0, 1], steps=STEPS)
    one = torch.tensor(1.0)
    diffroute.apply(pipe, _BlockPlan(0, lambda step: one))
    try:
        np.testing.assert_array_equal(run(pipe, name, ps, [0, 1], steps=STEPS), vanilla)
    finally:
        diffroute.remove(pipe)
    # a gate with gradients: one transformer call with grad enabled
    g = torch.tensor(0.5, requires_grad=True)
    executor = diffroute.apply(pipe.transformer, _BlockPlan(0, lambda step: g), num_inference_steps=STEPS)
    try:
        recorded = {}

        def grab(module, args, kwargs):
            recorded.setdefault("call", (args, kwargs))

        handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
        run(pipe, name, ps, [0, 1], steps=1)
        handle.remove()
        args, kwargs = recorded["call"]
        executor.end_call()
        with executor.at_step(0):
            out = pipe.transformer(*args, **kwargs)
        (out[0] if isinstance(out, tuple) else out.sample).float().square().mean().backward()
        assert g.grad is not None and float(g.grad) != 0.0
    finally:
        diffroute.remove(pipe.transformer)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_skip_computes_some_samples_and_skips_the_others(tiny_pipes, name):
    from diffroute.core.deciders import SkipRows

    pipe = tiny_pipes(name)
    ps = prompts(name)
    arch = diffroute.architecture_map(pipe.transformer)
    b = arch.num_blocks - 1
    n = len(ps)

    def first_sample_computes(step):
        if step < 1:
            return True
        rows = pipe.transformer._diffroute_rows  # rows of this call: each sample's CFG rows are r % n
        return SkipRows(torch.arange(rows) % n == 0)

    def count_rows(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        module._diffroute_rows = hidden.shape[0]

    handle = pipe.transformer.register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        vanilla = run(pipe, name, ps, [0, 1], steps=STEPS)
        diffroute.apply(pipe, _BlockPlan(b, lambda step: True if step < 1 else SKIP))
        skipped = run(pipe, name, ps, [0, 1], steps=STEPS)
        diffroute.apply(pipe, _BlockPlan(b, first_sample_computes))
        mixed = run(pipe, name, ps, [0, 1], steps=STEPS)
    finally:
        handle.remove()
        diffroute.remove(pipe)
    # samples are independent: sample 0 is the vanilla image, sample 1 the skipped one (rows run as a sub-batch, so
    # equal to rounding)
    np.testing.assert_allclose(mixed[0], vanilla[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], skipped[1], atol=1e-5)
    assert not np.allclose(vanilla[1], skipped[1], atol=1e-3)
