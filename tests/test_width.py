"""Real MLP width slicing: full width is the FFN bitwise, half width is a pruned FFN at half the FLOPs, refusals."""

import copy

import numpy as np
import pytest
import torch
from conftest import prompts, run
from diffusers.models.attention import FeedForward
from torch.utils.flop_counter import FlopCounterMode

import diffroute
from diffroute.core.deciders import Decider, Width
from diffroute.core.width import hidden_units, sliced_ffn, sliced_ffn_rows
from diffroute.errors import PlanError
from diffroute.plans import Plan

FEEDFORWARD_FAMILIES = ["pixart-alpha", "pixart-sigma", "dit", "sd3", "flux"]


def _ffns(arch):
    return [(b, c, m) for b, row in enumerate(arch.modules) for c, m in enumerate(row) if isinstance(m, FeedForward)]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", FEEDFORWARD_FAMILIES)
def test_full_width_is_the_ffn_and_half_width_is_a_pruned_ffn_at_half_the_flops(tiny_pipes, name):
    arch = diffroute.architecture_map(tiny_pipes(name).transformer)
    _, _, ff = _ffns(arch)[0]
    width = hidden_units(ff)
    x = torch.randn(2, 5, ff.net[0].proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sliced_ffn(ff, x, 1.0), ff(x))
        k = width // 2
        pruned = copy.deepcopy(ff)
        pruned.net[0].proj = torch.nn.Linear(x.shape[-1], k, bias=ff.net[0].proj.bias is not None)
        pruned.net[0].proj.load_state_dict({n: p[:k] for n, p in ff.net[0].proj.state_dict().items()})
        pruned.net[2] = torch.nn.Linear(k, ff.net[2].out_features, bias=ff.net[2].bias is not None)
        pruned.net[2].weight.copy_(ff.net[2].weight[:, :k])
        if ff.net[2].bias is not None:
            pruned.net[2].bias.copy_(ff.net[2].bias)
        torch.testing.assert_close(sliced_ffn(ff, x, k / width), pruned(x), rtol=0, atol=1e-6)
        full, half = _flops(lambda: ff(x)), _flops(lambda: sliced_ffn(ff, x, k / width))
    assert half == pytest.approx(full * k / width, rel=1e-9)


def test_ffns_that_cannot_be_sliced_are_refused(tiny_pipes):
    sana = tiny_pipes("sana").transformer
    with pytest.raises(PlanError, match="got GLUMBConv"):
        hidden_units(sana.transformer_blocks[0].ff)
    gated = FeedForward(8, activation_fn="geglu")
    with pytest.raises(PlanError, match="with GEGLU"):
        sliced_ffn(gated, torch.zeros(1, 8), 0.5)


class _WidthPlan(Plan):
    name = "width-test"

    def __init__(self, fraction):
        self.fraction = fraction

    def decider(self, arch, num_steps):
        ffns = {(b, c) for b, c, _ in _ffns(arch)}
        fraction = self.fraction

        class _D(Decider):
            def decide(self, ctx, block, comp):
                return Width(fraction) if (block, comp) in ffns and ctx.step >= 1 else True

        return _D()


@pytest.mark.parametrize("name", ["pixart-alpha", "flux"])
def test_executor_runs_width_decisions(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    vanilla = run(pipe, name, ps, [0, 1], steps=4)
    try:
        diffroute.apply(pipe, _WidthPlan(1.0))
        np.testing.assert_array_equal(run(pipe, name, ps, [0, 1], steps=4), vanilla)
        diffroute.apply(pipe, _WidthPlan(0.25))
        assert not np.array_equal(run(pipe, name, ps, [0, 1], steps=4), vanilla)
    finally:
        diffroute.remove(pipe)


def test_per_sample_widths_group_rows_by_fraction(tiny_pipes):
    arch = diffroute.architecture_map(tiny_pipes("pixart-alpha").transformer)
    _, _, ff = _ffns(arch)[0]
    x = torch.randn(4, 5, ff.net[0].proj.in_features, generator=torch.Generator().manual_seed(1))
    fractions = torch.tensor([1.0, 0.25, 0.5, 0.25])
    with torch.no_grad():
        out = sliced_ffn_rows(ff, x, fractions)
        for i, f in enumerate(fractions.tolist()):
            torch.testing.assert_close(out[i], sliced_ffn(ff, x[i : i + 1], f)[0], rtol=0, atol=1e-6)
