"""Dynamic policies on the one executor: validity, exactness where they must be exact, per-sample decisions."""

import numpy as np
import pytest
import torch
from conftest import NAMES, fresh_pipe, prompts, run

import diffroute
from diffroute.core.arch import ARCHITECTURES

POLICIES = ["fbcache-0.2", "dbcache-F1B1-0.2", "teacache-0.3", "taylor-3"]


def _fit(policy, pipe):
    """Two-block tiny models leave nothing to cache between Fn=1 and Bn=1: use Bn=0 there."""
    if policy.startswith("dbcache") and diffroute.architecture_map(pipe.transformer).num_blocks <= 2:
        return "dbcache-F1B0-0.2"
    return policy


@pytest.fixture(autouse=True)
def _clean(tiny_pipes):
    yield
    for name in NAMES:
        diffroute.remove(tiny_pipes(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_runs_and_stays_close(tiny_pipes, name, policy):
    pipe = tiny_pipes(name)
    policy = _fit(policy, pipe)
    full = run(pipe, name, prompts(name)[:1], [2], steps=9)
    other_seed = run(pipe, name, prompts(name)[:1], [3], steps=9)
    pipe.enable_cache(policy)
    out = run(pipe, name, prompts(name)[:1], [2], steps=9)
    stats = pipe.last_stats
    assert stats.completed and 0 < stats.computed_fraction <= 1
    cmap = stats.compute_tensor()
    assert (cmap[0].nan_to_num(1) == 1).all()  # the first step always computes
    assert np.isfinite(out).all()
    assert np.abs(out - full).mean() < 0.5 * np.abs(other_seed - full).mean()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["fbcache-0", "dbcache-F2B0-0", "teacache-0"])
def test_zero_threshold_computes_everything(tiny_pipes, name, policy):
    pipe = tiny_pipes(name)
    if policy.startswith("dbcache") and diffroute.architecture_map(pipe.transformer).num_blocks <= 2:
        policy = "dbcache-F1B0-0"
    vanilla = run(pipe, name, prompts(name)[:1], [0])
    pipe.enable_cache(policy)
    assert np.array_equal(run(pipe, name, prompts(name)[:1], [0]), vanilla)
    assert pipe.last_stats.computed_fraction == 1.0


def test_fn_and_bn_blocks_always_compute():
    from diffroute.zoo.tiny import tiny_pixart

    pipe = tiny_pixart(num_layers=5)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cache("dbcache-F2B1-10")  # a huge threshold: after step 0, blocks 2 and 3 always reuse
    run(pipe, "pixart-alpha", ["a cat"], [0], steps=8)
    cmap = pipe.last_stats.compute_tensor()
    assert (cmap[:, [0, 1, 4]] == 1).all() and (cmap[1:, 2:4] == 0).all()
    assert pipe.last_stats.computed_fraction == pytest.approx((8 * 3 + 2) / (8 * 5))
    # Fast paths: the always-computing Fn/Bn blocks carry no component hook; only the middle blocks are kept.
    arch = diffroute.architecture_map(pipe.transformer)
    hooked = [
        [hasattr(m, "_diffusers_hook") and "diffroute_component" in m._diffusers_hook.hooks for m in row]
        for row in arch.modules
    ]
    assert not any(any(r) for r in hooked)  # no component hooks: the middle blocks are decided as whole blocks
    reuse = [hasattr(b, "_diffusers_hook") and "diffroute_block_reuse" in b._diffusers_hook.hooks for b in arch.blocks]
    assert reuse == [False, False, True, True, False]
    assert pipe.last_stats.cache_bound_bytes > 0
    pipe.enable_cache("dbcache-F2B1-0")  # threshold 0: nothing can be reused, so nothing is hooked or kept
    run(pipe, "pixart-alpha", ["a cat"], [0], steps=8)
    assert pipe.last_stats.peak_cache_bytes == 0 and pipe.last_stats.computed_fraction == 1.0
    assert not any(
        "diffroute_component" in m._diffusers_hook.hooks
        for row in arch.modules
        for m in row
        if hasattr(m, "_diffusers_hook")
    )


def test_per_sample_decisions_match_single_runs(tiny_pipes):
    """With a threshold where samples disagree, a batch mixes compute and reuse, and every image still equals
    its single-prompt run: decisions are taken per sample (and per CFG row), never per batch."""
    name, pipe = "pixart-alpha", tiny_pipes("pixart-alpha")
    p = ["a red apple", "a smiling cat", "flag: japan", "blue car"]
    for threshold in (0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
        pipe.enable_cache(f"fbcache-{threshold}")
        batch = run(pipe, name, p, [5, 6, 7, 8], steps=10)
        cmap = pipe.last_stats.compute_tensor()
        if ((cmap > 0) & (cmap < 1)).any():
            break
    else:
        pytest.fail("no threshold made the samples of a batch disagree")
    singles = np.concatenate([run(pipe, name, [q], [s], steps=10) for q, s in zip(p, [5, 6, 7, 8])])
    np.testing.assert_allclose(batch, singles, atol=1e-4)


def test_policies_follow_step_count_changes(tiny_pipes):
    pipe = tiny_pipes("sd3")
    for policy in POLICIES:
        pipe.enable_cache(_fit(policy, pipe))
        for steps in (5, 11):
            run(pipe, "sd3", ["a cat"], [0], steps=steps)
            assert pipe.last_stats.num_steps == steps and pipe.last_stats.completed


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + self.mix(x)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Lin()])

    def forward(self, x, timestep=None):
        return self.layers[0](x)


def test_taylor_forecast_is_exact_for_linear_outputs():
    diffroute.register_architecture(_Toy, diffroute.ArchSpec(("layers",), ("mix",)))
    try:
        toy = _Toy().double()
        x0, d = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
        inputs = [x0 + s * d for s in range(9)]  # the component's output is affine in the step
        ref = [toy(x, timestep=torch.tensor([99.0 - s])) for s, x in enumerate(inputs)]
        diffroute.apply(toy, "taylor-3", num_inference_steps=9)
        got = [toy(x, timestep=torch.tensor([99.0 - s])) for s, x in enumerate(inputs)]
        stats = diffroute.last_stats(toy)
        assert stats.computed_fraction == pytest.approx(3 / 9)
        for s in range(4, 9):  # from step 4 on, two computed outputs (steps 0 and 3) exist
            torch.testing.assert_close(got[s], ref[s], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got[1], ref[1])  # step 1 had one output only: reused, not forecast
        diffroute.apply(toy, "fora-3", num_inference_steps=9)
        fora = [toy(x, timestep=torch.tensor([99.0 - s])) for s, x in enumerate(inputs)]
        assert not torch.allclose(fora[5], ref[5])  # plain reuse is not exact here
    finally:
        diffroute.remove(toy)
        ARCHITECTURES.pop("_Toy", None)


def test_teacache_rescaled_change_is_clamped_at_zero(tiny_pipes):
    """A fitted polynomial that goes negative must not lower the accumulator (it would skip indefinitely)."""
    from diffroute.policies.teacache import TeaCacheDecider

    arch = diffroute.architecture_map(tiny_pipes("pixart-alpha").transformer)
    decider = TeaCacheDecider(arch, 10, 0.5, [-3.0, 0.1], "test")  # -3x + 0.1: negative for any real change
    seen = []

    def watch(module, args, kwargs):
        decider.on_block_start(ctx, 0, module, args, kwargs)
        seen.append(decider._acc[0].clone())

    pipe = tiny_pipes("pixart-alpha")
    h = arch.blocks[0].register_forward_pre_hook(watch, with_kwargs=True)
    from diffroute.core.context import StepContext

    ctx = StepContext(step=0, num_steps=10)
    try:
        for step in range(4):
            ctx.step = step
            run(pipe, "pixart-alpha", ["a cat"], [step], steps=1)
    finally:
        h.remove()
    assert len(seen) == 4 and all((a >= 0).all() for a in seen)
    assert seen[-1].max() == 0  # every clamped change was 0: nothing accumulated


def test_per_prompt_first_block_keeps_both_cfg_rows_of_a_sample_together(tiny_pipes):
    """`-prompt`: both CFG rows of a sample (rows i and i + n/2) decide on their mean change, so they compute or
    reuse together; per row they disagree somewhere at the same threshold."""
    from diffroute.policies.first_block import FirstBlockDecider

    name, pipe = "pixart-alpha", tiny_pipes("pixart-alpha")
    p = ["a red apple", "a smiling cat", "flag: japan", "blue car"]
    seen = {"": [], "-prompt": []}
    original = FirstBlockDecider.on_block_end
    for suffix in seen:

        def spy(self, ctx, block, output, suffix=suffix):
            original(self, ctx, block, output)
            decision = self._compute.get(ctx.branch)
            if block == self.fn - 1 and isinstance(decision, torch.Tensor):
                seen[suffix].append(decision.clone())

        FirstBlockDecider.on_block_end = spy
        try:
            for threshold in (0.02, 0.05, 0.1, 0.2):
                pipe.enable_cache(f"fbcache-{threshold}{suffix}")
                run(pipe, name, p, [5, 6, 7, 8], steps=10)
        finally:
            FirstBlockDecider.on_block_end = original
    assert diffroute.resolve_plan("fbcache-0.1-prompt").per == "prompt"
    assert diffroute.resolve_plan("fbcache-0.1").per == "sample"
    assert any(not torch.equal(d[:4], d[4:]) for d in seen[""])  # per row: the two rows of a sample can differ
    assert seen["-prompt"] and all(torch.equal(d[:4], d[4:]) for d in seen["-prompt"])  # per prompt: never


def test_policy_names():
    assert diffroute.resolve_plan("dbcache-F2B1-0.05").fn == 2
    assert diffroute.resolve_plan("teacache-0.2").threshold == 0.2
    assert diffroute.resolve_plan("taylor-2").name == "taylor-2"
    with pytest.raises(ValueError, match="Fn >= 1"):
        diffroute.resolve_plan("dbcache-F0B0-0.1")


def test_teacache_calibration_has_a_python_entry_point_whose_file_the_policy_reads(tmp_path):
    import diffroute
    from diffroute.policies.calibration import calibrate_teacache

    pipe = fresh_pipe("pixart-alpha")

    def full_run():
        run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=6)

    result = calibrate_teacache(pipe, full_run, tmp_path / "teacache.json", degree=2, prompts=2)
    assert len(result["coefficients"]) == 3 and result["points"] > 0 and result["r2"] <= 1
    plan = diffroute.resolve_plan(f"teacache-0.3@{tmp_path / 'teacache.json'}")
    diffroute.apply(pipe, plan)
    images = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=6)
    assert np.isfinite(images).all() and pipe.last_stats.computed_fraction <= 1
