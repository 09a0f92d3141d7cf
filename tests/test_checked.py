"""Checked schedules (`<schedule plan>+fbT`): a threshold of 0 is the plain model, infinity is the schedule with
block 0 computed at every step, the check splits batches per sample without making a sample's image depend on its
batch-mates (with reuses, forecasts and whole-block reuses), per prompt keeps both CFG rows together, and plans that
are no schedule are refused."""

import numpy as np
import pytest
import torch
from conftest import NAMES, STEPS, fresh_pipe, prompts, run

import diffroute
from diffroute.core.schedule import Schedule
from diffroute.errors import PlanError
from diffroute.plans import SchedulePlan, resolve_plan


@pytest.mark.parametrize("name", NAMES)
def test_threshold_zero_is_bitwise_vanilla(name):
    pipe = fresh_pipe(name)
    vanilla = run(pipe, name, prompts(name), [0, 1])
    diffroute.apply(pipe, "fora-3+blocks+fb0")
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), vanilla)
    info = pipe.last_stats.plan_info
    assert info["rows_followed"] == 0 < info["rows_checked"]


@pytest.mark.parametrize("name", ["pixart-alpha", "flux"])
def test_threshold_infinity_is_the_schedule_with_block_zero_computed(name):
    """fora-3+fbinf follows the schedule everywhere; only block 0, which the check reads, computes at every step."""
    pipe = fresh_pipe(name)
    arch = diffroute.architecture_map(pipe.transformer)
    fora = Schedule.fora(arch, STEPS, 3)
    compute = fora.compute.clone()
    compute[:, 0] = True
    expected_plan = SchedulePlan(Schedule(compute, fora.model_class, fora.components, {"rule": "fora-3, block 0"}))
    diffroute.apply(pipe, expected_plan)
    expected = run(pipe, name, prompts(name), [0, 1])
    diffroute.apply(pipe, "fora-3+fbinf")
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), expected)
    info = pipe.last_stats.plan_info
    assert info["rows_followed"] == info["rows_checked"] > 0


def _splitting(pipe, name, base: str) -> str:
    """A checked plan on `base` whose threshold splits this batch at some step (random weights: found by trying)."""
    for t in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
        diffroute.apply(pipe, f"{base}+fb{t}")
        run(pipe, name, prompts(name), [0, 1])
        if pipe.last_stats.plan_info["mixed_steps"]:
            return f"{base}+fb{t}"
    pytest.fail(f"no threshold split the batch of {name} under {base}")


@pytest.mark.parametrize(
    "name,base", [("pixart-alpha", "fora-3"), ("pixart-alpha", "taylor-2"), ("sd3", "fora-3+blocks"), ("dit", "fora-2")]
)
def test_a_samples_image_does_not_depend_on_its_batch_mates(name, base):
    pipe = fresh_pipe(name)
    plan = _splitting(pipe, name, base)
    diffroute.apply(pipe, plan)
    both = run(pipe, name, prompts(name), [0, 1])
    assert pipe.last_stats.plan_info["mixed_steps"] > 0  # the batch really split
    alone = [run(pipe, name, prompts(name)[i : i + 1], [i]) for i in (0, 1)]
    np.testing.assert_allclose(both, np.concatenate(alone), atol=1e-5)


def test_per_prompt_keeps_both_cfg_rows_together():
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    plan = resolve_plan(_splitting(pipe, name, "fora-2") + "-prompt")
    seen = []
    make = plan.decider

    def spy(arch, steps):
        decider = make(arch, steps)
        end = decider.on_block_end

        def recorded(ctx, block, output):
            end(ctx, block, output)
            seen.append(decider._follow.get(ctx.branch))

        decider.on_block_end = recorded
        return decider

    plan.decider = spy
    diffroute.apply(pipe, plan)
    run(pipe, name, prompts(name), [0, 1])
    masks = [f for f in seen if isinstance(f, torch.Tensor)]
    for f in masks:  # [unconditional rows, conditional rows]: row i and row i + n/2 are one prompt
        assert torch.equal(f[: len(f) // 2], f[len(f) // 2 :])
    assert pipe.last_stats.plan_info["rows_checked"] > 0


def test_checked_plans_are_refused_where_they_do_not_apply():
    with pytest.raises(PlanError, match="not a schedule"):
        resolve_plan("fbcache-0.1+fb0.1")
    with pytest.raises(PlanError, match="does not take \\+blocks"):
        resolve_plan("fora-3+fb0.1+blocks")
    with pytest.raises(PlanError, match="Unknown plan"):
        resolve_plan("fora-3+fb-1")
    plan = resolve_plan("emoji:fast+blocks+fb0.1-prompt")
    assert plan.per == "prompt" and plan.thresholds == [0.1] and plan.name == "emoji:fast+blocks+fb0.1-prompt"
    assert plan.content()["thresholds"] == [0.1]  # fingerprints of results tell thresholds apart
    assert plan.step_thresholds(4) == [0.1] * 4


@pytest.mark.parametrize("plan", ["fora-3+spans+fbinf", "fora-3+fbinf+spans"])
def test_spans_survive_the_check(plan):
    """A checked schedule with `+spans` (inside or outside the check) reuses its runs of whole blocks as one residual
    after block 0, which the check computes: at threshold inf, the schedule with block 0 computed, `+spans`."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    torch.manual_seed(0)  # three blocks: a run after block 0 needs two
    config = {**pipe.transformer.config, "num_layers": 3}
    pipe.register_modules(transformer=type(pipe.transformer).from_config(config).eval())
    arch = diffroute.architecture_map(pipe.transformer)
    fora = Schedule.fora(arch, STEPS, 3).with_block_reuse(arch.present())
    compute, whole = fora.compute.clone(), fora.block_reuse.clone()
    compute[:, 0], whole[:, 0] = True, False
    reference = SchedulePlan(Schedule(compute, fora.model_class, fora.components, {}, None, whole)).with_spans()
    diffroute.apply(pipe, reference)
    expected = run(pipe, name, prompts(name), [0, 1])
    diffroute.apply(pipe, plan)
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), expected)
    diffroute.apply(pipe, "fora-3+blocks+fbinf")
    assert not np.array_equal(run(pipe, name, prompts(name), [0, 1]), expected)  # the one add rounds differently
