"""Per-image learned gates (LazyDiT mechanism): zero gates are the plain model, decisions are per sample (or per
prompt), a sample's image does not depend on its batch-mates, and gates train, save, load and resume like L2C."""

import json

import numpy as np
import pytest
import torch
from conftest import NAMES, STEPS, fresh_pipe, prompts, run, run_cli

import diffroute
from diffroute.errors import PlanError
from diffroute.routers.gates import GatePlan, GateRouter
from diffroute.training.gates import input_widths


def _gates(pipe, name, std=0.0, per_prompt=False, seed=0):
    """Gates for this pipeline's transformer: zeros, or random weights (deciding something, per sample)."""
    diffroute.remove(pipe)
    arch = diffroute.architecture_map(pipe.transformer)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    run(pipe, name, prompts(name), [0, 1], steps=1)
    handle.remove()
    dims = input_widths(pipe.transformer, arch, captured["call"])
    router = GateRouter.for_model(arch, STEPS, dims, pipe.scheduler, per_prompt=per_prompt)
    if std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * std)
    return router


@pytest.mark.parametrize("name", NAMES)
def test_zero_gates_are_bitwise_vanilla(name):
    pipe = fresh_pipe(name)
    vanilla = run(pipe, name, prompts(name), [0, 1])
    diffroute.apply(pipe, GatePlan(_gates(pipe, name)))
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), vanilla)
    assert pipe.last_stats.plan_info["gated_skipped"] == 0


@pytest.mark.parametrize("name", ["pixart-alpha", "sd3", "sana"])
def test_a_samples_image_does_not_depend_on_its_batch_mates(name):
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, GatePlan(_gates(pipe, name, std=0.05)))
    both = run(pipe, name, prompts(name), [0, 1])
    info = pipe.last_stats.plan_info
    assert 0 < info["gated_skipped"] < info["gated_calls"]  # the gates decided, and not all alike
    alone = run(pipe, name, prompts(name)[:1], [0])
    np.testing.assert_allclose(both[:1], alone, atol=1e-5)


def test_per_prompt_decisions_keep_both_cfg_rows_together():
    """Per prompt, rows i and i + n/2 (diffusers' [unconditional, conditional] batch) share m and so the decision;
    per row their m differ."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    seen = {False: [], True: []}
    for per_prompt in (False, True):
        plan = GatePlan(_gates(pipe, name, std=0.05, per_prompt=per_prompt))
        original = plan.decider

        def spy(arch, steps, original=original, per_prompt=per_prompt):
            decider = original(arch, steps)
            decide = decider.decide

            def recorded(ctx, block, comp):
                m = decider.m.get((block, comp))
                d = decide(ctx, block, comp)
                if m is not None:
                    seen[per_prompt].append((m.clone(), d.clone()))
                return d

            decider.decide = recorded
            return decider

        plan.decider = spy
        diffroute.apply(pipe, plan)
        run(pipe, name, prompts(name), [0, 1])
    assert seen[True] and all(torch.equal(m[:2], m[2:]) and torch.equal(d[:2], d[2:]) for m, d in seen[True])
    assert any(not torch.equal(m[:2], m[2:]) for m, _ in seen[False])  # (saturated m can coincide)


def test_gates_refuse_another_step_count_and_model():
    pipe = fresh_pipe("pixart-alpha")
    plan = GatePlan(_gates(pipe, "pixart-alpha"), name="g")
    diffroute.apply(pipe, plan)
    with pytest.raises(PlanError, match=f"trained for {STEPS} steps"):
        run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1], steps=STEPS + 1)
    other = fresh_pipe("dit")
    with pytest.raises(PlanError, match="were trained for PixArtTransformer2DModel"):
        diffroute.apply(other, plan)


def test_train_gates_cli_learns_to_skip_resumes_and_loads_as_a_plan(tmp_path):
    args = ["train", "gates", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "6", "--rho", "5", "--lr", "0.05", "--out", str(tmp_path / "g"), "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "gates" and 0 < result["gated_flop_share"] < 1
    log = [json.loads(line) for line in (tmp_path / "g" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7))
    weights = (tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr  # done: nothing trains again, the same gates come out
    assert (tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    pipe = diffroute.load_pipeline("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    diffroute.apply(pipe, str(tmp_path / "g" / "router"))
    pipe(["a red apple"], num_inference_steps=4, output_type="np", height=32, width=32)
    info = pipe.last_stats.plan_info
    assert info["gated_skipped"] > 0  # a strong FLOP penalty: the trained gates skip
    assert pipe.last_stats.computed_fraction < 1


def test_a_gate_plans_fingerprint_is_its_weights_not_their_sum():
    """Resumed comparisons reuse images only under the same router: two routers whose weights sum alike (here the
    same weights, swapped between two gates) must not share a fingerprint."""
    pipe = fresh_pipe("pixart-alpha")
    a = _gates(pipe, "pixart-alpha", std=0.05)
    b = _gates(pipe, "pixart-alpha", std=0.05)
    with torch.no_grad():
        b.weight.copy_(a.weight.flip(0))
    assert float(a.weight.sum()) == pytest.approx(float(b.weight.sum()))
    assert GatePlan(a).content() != GatePlan(b).content()
    assert GatePlan(a).content() == GatePlan(_gates(pipe, "pixart-alpha", std=0.05)).content()  # seeded: equal
