"""Elastic-DiT-style router: identity at initialisation, per-sample decisions, gradients in training mode."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run

import diffroute
from diffroute.errors import PlanError
from diffroute.routing.elastic import ElasticPlan, ElasticRouter

STEPS = 4


def _router(pipe, seed=0):
    torch.manual_seed(seed)
    return ElasticRouter.for_model(pipe.transformer, STEPS, pipe.scheduler)


@pytest.mark.parametrize("name", NAMES)
def test_router_at_initialisation_keeps_every_block_at_full_width_bitwise(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    vanilla = run(pipe, name, ps, [0, 1], steps=STEPS)
    diffroute.apply(pipe, ElasticPlan(_router(pipe)))
    try:
        routed = run(pipe, name, ps, [0, 1], steps=STEPS)
    finally:
        diffroute.remove(pipe)
    np.testing.assert_array_equal(routed, vanilla)


@pytest.mark.parametrize("name", ["pixart-alpha", "sd3", "flux"])
def test_decisions_are_per_sample_and_a_sample_does_not_depend_on_its_batch(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    router = _router(pipe)
    with torch.no_grad():  # strong, input-dependent gates: samples get different decisions
        for gate in router.gates:
            gate.skip.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
            gate.skip.bias.zero_()
            gate.width.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(2))
    diffroute.apply(pipe, ElasticPlan(router))
    try:
        both = run(pipe, name, ps, [0, 1], steps=STEPS)
        fractions = np.array(pipe.last_stats.compute_map, dtype=float)
        alone = run(pipe, name, ps[1:], [1], steps=STEPS)
    finally:
        diffroute.remove(pipe)
    mixed = (fractions > 0) & (fractions < 1)
    assert mixed.any(), "no block was computed for some samples and skipped for others"
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)


def test_training_mode_sends_gradients_to_the_gates_and_collects_the_budget_terms(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    router = _router(pipe)
    plan = ElasticPlan(router, training=True)
    recorded = {}

    def grab(module, args, kwargs):
        recorded.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=1)
    handle.remove()
    args, kwargs = recorded["call"]
    executor = diffroute.apply(pipe.transformer, plan, num_inference_steps=STEPS)
    try:
        with executor.at_step(2):
            out = pipe.transformer(*args, **kwargs)
        keep = torch.stack([a["keep"] for a in plan.aux]).mean()
        width = torch.stack([a["width"] for a in plan.aux]).mean()
        loss = out[0].float().square().mean() + (keep - 0.6) ** 2 + (width - 0.75) ** 2
        loss.backward()
    finally:
        diffroute.remove(pipe.transformer)
    assert len(plan.aux) == diffroute.architecture_map(pipe.transformer).num_blocks
    assert all(a["step"] == 2 for a in plan.aux)
    for gate in router.gates:
        assert gate.skip.weight.grad is not None and bool(gate.skip.weight.grad.abs().sum() > 0)
        assert gate.width.weight.grad is not None and bool(gate.width.weight.grad.abs().sum() > 0)


def test_router_refuses_another_model_or_step_count(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    plan = ElasticPlan(_router(pipe))
    with pytest.raises(PlanError, match=f"trained for {STEPS} steps, not 7"):
        plan.check_call(7)
    with pytest.raises(PlanError, match="was made for PixArtTransformer2DModel"):
        diffroute.apply(tiny_pipes("dit"), plan)
