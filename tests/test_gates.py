"""Per-image learned gates (LazyDiT mechanism): zero gates are the plain model, decisions are per sample (or per
prompt), a sample's image does not depend on its batch-mates, and gates train, save, load and resume like L2C."""

import json

import numpy as np
import pytest
import torch
from conftest import CALL_KWARGS, NAMES, STEPS, fresh_pipe, prompts, run, run_cli

import diffroute
from diffroute.core.schedule import Schedule
from diffroute.errors import PlanError
from diffroute.routers.gates import LEVELS, UNGATED, GatePlan, GateRouter
from diffroute.training.configs import GateConfig
from diffroute.training.gates import GateLoss, input_widths
from diffroute.utils.seeding import sample_generators

# random gate weights that decide per sample, not all alike (a block gate reads a normalised input, pooled: smaller)
DECIDING_STD = {"component": 0.05, "block": 0.5}


def _gates(pipe, name, std=0.0, per_prompt=False, seed=0, ungated=UNGATED, level="component", **kwargs):
    """Gates for this pipeline's transformer (per component, or per block): zeros, or random weights (deciding
    something, per sample)."""
    diffroute.remove(pipe)
    arch = diffroute.architecture_map(pipe.transformer)
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    run(pipe, name, prompts(name), [0, 1], steps=1)
    handle.remove()
    dims = input_widths(pipe.transformer, arch, captured["call"], ungated, level)
    router = GateRouter.for_model(
        arch, STEPS, dims, pipe.scheduler, ungated, per_prompt=per_prompt, level=level, **kwargs
    )
    if std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * std)
    return router


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_gates_are_bitwise_vanilla(name, level):
    pipe = fresh_pipe(name)
    vanilla = run(pipe, name, prompts(name), [0, 1])
    diffroute.apply(pipe, GatePlan(_gates(pipe, name, level=level)))
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), vanilla)
    assert pipe.last_stats.plan_info["gated_skipped"] == 0


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["pixart-alpha", "sd3", "sana"])
def test_a_samples_image_does_not_depend_on_its_batch_mates(name, level):
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, GatePlan(_gates(pipe, name, std=DECIDING_STD[level], level=level)))
    both = run(pipe, name, prompts(name), [0, 1])
    info = pipe.last_stats.plan_info
    assert 0 < info["gated_skipped"] < info["gated_calls"]  # the gates decided, and not all alike
    alone = run(pipe, name, prompts(name)[:1], [0])
    np.testing.assert_allclose(both[:1], alone, atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_per_prompt_decisions_keep_both_cfg_rows_together(level):
    """Per prompt, rows i and i + n/2 (diffusers' [unconditional, conditional] batch) share m and so the decision;
    per row their m differ."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    seen = {False: [], True: []}
    for per_prompt in (False, True):
        plan = GatePlan(_gates(pipe, name, std=DECIDING_STD[level], per_prompt=per_prompt, level=level))
        original = plan.decider

        def spy(arch, steps, original=original, per_prompt=per_prompt):
            decider = original(arch, steps)
            decide, decide_block = decider.decide, decider.decide_block

            def recorded(ctx, block, comp=None):
                m = decider.m.get((block, comp))
                d = decide(ctx, block, comp) if comp is not None else decide_block(ctx, block)
                if m is not None:
                    seen[per_prompt].append((m.clone(), d.clone()))
                return d

            decider.decide, decider.decide_block = recorded, recorded
            return decider

        plan.decider = spy
        diffroute.apply(pipe, plan)
        run(pipe, name, prompts(name), [0, 1])
    assert seen[True] and all(torch.equal(m[:2], m[2:]) and torch.equal(d[:2], d[2:]) for m, d in seen[True])
    assert any(not torch.equal(m[:2], m[2:]) for m, _ in seen[False])  # (saturated m can coincide)


@pytest.mark.parametrize("name", ["pixart-alpha", "dit"])
def test_gates_started_from_a_schedule_run_that_schedule(name):
    """Biases set from a static schedule (every component gated, cross-attention too; mean pooling) decide exactly
    as the schedule does before any training: the images are the schedule's, bit for bit."""
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, "fora-2")
    expected = run(pipe, name, prompts(name), [0, 1])
    router = _gates(pipe, name, ungated=(), pooling="mean")
    assert "attn1" in router.config.gated and ("attn2" in router.config.gated) == (name != "dit")
    router.init_from(Schedule.fora(diffroute.architecture_map(pipe.transformer), STEPS, 2))
    diffroute.apply(pipe, GatePlan(router))
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), expected)
    assert pipe.last_stats.computed_fraction == pytest.approx(0.5)  # fora-2 computes steps 0, 2 and 4 of 6


@pytest.mark.parametrize("name", ["pixart-alpha", "sd3"])
def test_block_gates_started_from_a_schedule_run_it_with_whole_blocks_reused(name):
    """Block-level gates started from fora-2 reuse every block whole at the odd steps: the images are `fora-2+blocks`'
    bit for bit, and nothing of a skipped block runs (its components are never called)."""
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, "fora-2+blocks")
    expected = run(pipe, name, prompts(name), [0, 1])
    router = _gates(pipe, name, level="block", pooling="mean")
    arch = diffroute.architecture_map(pipe.transformer)
    router.init_from(Schedule.fora(arch, STEPS, 2), present=arch.present())
    assert router.config.gated == ("block",) and router.bias.shape == (STEPS, arch.num_blocks, 1)
    diffroute.apply(pipe, GatePlan(router))
    calls = []
    handle = arch.modules[0][0].register_forward_pre_hook(lambda *a: calls.append(1))
    got = run(pipe, name, prompts(name), [0, 1])
    handle.remove()
    np.testing.assert_array_equal(got, expected)
    assert len(calls) == STEPS // 2  # block 0's first component ran at the computed steps only
    assert pipe.last_stats.computed_fraction == pytest.approx(0.5)


def _student_loss(pipe, name, router, cfg):
    """The training loss for student rollouts on this test's prompts (one batch), its weights set; and the call's
    kwargs."""
    arch = diffroute.architecture_map(pipe.transformer)
    kwargs = dict(CALL_KWARGS[name], num_inference_steps=STEPS)
    share = torch.full((arch.num_blocks, len(arch.components)), 0.01)
    loss = GateLoss(pipe, [prompts(name)], [], router, share, cfg, kwargs)
    loss.plan.params = router()
    return loss, kwargs


@pytest.mark.parametrize("level", LEVELS)
def test_a_student_rollout_follows_the_trajectory_inference_takes(level):
    """Training's student rollout (HarmoniCa's step-wise training) advances the student's own latents: its final
    latents are the ones the trained gates give at inference (not the full model's), every call's target is the
    full model on the student's input, and the loss reaches the gates. Block gates train under `SoftReuse` (every
    block runs, a hard weight blends it with its reuse) and must still land on inference's latents and cache."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    router = _gates(pipe, name, std=DECIDING_STD[level], level=level)
    loss, kwargs = _student_loss(pipe, name, router, GateConfig(rho=0.1))
    try:
        value = loss.student_rollout(0, seed=7)
        student = loss.last_latents
        assert len(loss.terms) == STEPS and all(t.requires_grad for t in loss.terms[1:])  # step 0 computes all
        value.backward()
    finally:
        loss.close()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    gens = lambda: sample_generators(7, range(len(prompts(name))))  # noqa: E731
    full = pipe(prompts(name), generator=gens(), output_type="latent", **kwargs).images
    diffroute.apply(pipe, GatePlan(router))
    inferred = pipe(prompts(name), generator=gens(), output_type="latent", **kwargs).images
    assert pipe.last_stats.plan_info["gated_skipped"] > 0
    torch.testing.assert_close(student, inferred, atol=1e-4, rtol=1e-5)  # mixed rows run as a sub-batch there
    assert (student - full).abs().max() > 0.1  # the skips moved the student's trajectory off the full one


@pytest.mark.parametrize("level", LEVELS)
def test_an_image_rollout_backpropagates_the_final_images_error_through_every_step(level):
    """`--rollout image`: the loss is the final latents' MSE against the full model's from the same noise, and a
    decision at step 1 gets a gradient, which can only come back through every scheduler step after it."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    router = _gates(pipe, name, std=DECIDING_STD[level], level=level)
    loss, kwargs = _student_loss(pipe, name, router, GateConfig(rho=0.0, rollout="image"))
    try:
        value = loss.image_rollout(0, seed=7)
        student = loss.last_latents.detach()
        assert loss.calls == STEPS  # one transformer call per step (CFG batched)
        value.backward()
    finally:
        loss.close()
    assert router.bias.grad[1].abs().sum() > 0 and router.bias.grad[0].abs().sum() == 0  # step 0 is never gated
    gens = lambda: sample_generators(7, range(len(prompts(name))))  # noqa: E731
    full = pipe(prompts(name), generator=gens(), output_type="latent", **kwargs).images
    diffroute.apply(pipe, GatePlan(router))
    inferred = pipe(prompts(name), generator=gens(), output_type="latent", **kwargs).images
    torch.testing.assert_close(student, inferred, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(value.detach(), torch.nn.functional.mse_loss(inferred, full), rtol=1e-3, atol=1e-7)
    assert value > 0


def test_training_leaves_the_rest_of_the_pipeline_without_gradients(tmp_path):
    """An image rollout runs the text encoder under autograd too: training freezes every other component while it
    runs (no gradient is computed or kept for them) and gives each parameter its own flag back after."""
    from accelerate import Accelerator

    from diffroute.training.gates import train_gates

    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    pipe.text_encoder.requires_grad_(True)
    pipe.text_encoder.shared.weight.requires_grad_(False)  # a mixed set of flags, to come back as it was
    flags = {n: p.requires_grad for n, p in pipe.text_encoder.named_parameters()}
    kwargs = dict(CALL_KWARGS[name], num_inference_steps=STEPS)
    cfg = GateConfig(rho=0.0, rollout="image", iters=2, prompts_per_batch=2, lr=0.01)
    summary = train_gates(pipe, prompts(name)[:2], kwargs, cfg, tmp_path / "g", Accelerator(cpu=True))
    assert summary["iters"] == 2 and (tmp_path / "g" / "router").is_dir()
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in pipe.transformer.parameters())
    assert {n: p.requires_grad for n, p in pipe.text_encoder.named_parameters()} == flags


def test_weight_lr_scale_0_trains_the_biases_alone(tmp_path):
    """--weight-lr-scale 0: the gates' weights stay at zero (every sample decides alike: a learned static plan)."""
    from safetensors.torch import load_file

    args = ["train", "gates", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "3", "--rho", "5", "--lr", "0.05", "--weight-lr-scale", "0", "--json"]
    args += ["--rollout", "image", "--prompt", "a red apple", "--prompt", "a cat", "--out", str(tmp_path / "g")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["weight_lr_scale"] == 0
    weights = load_file(tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors")
    assert torch.count_nonzero(weights["weight"]) == 0 and torch.count_nonzero(weights["bias"]) > 0


def test_iepo_weights_the_steps_whose_gates_move_the_final_image():
    """HarmoniCa's image-error proxy: gates started from fora-2 reuse at odd steps only, so gating an even step
    leaves the final latents bit for bit as they were (lambda 0, its weight floored at a tenth of the mean) while
    every odd step moves them."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    router = _gates(pipe, name, ungated=(), pooling="mean")
    router.init_from(Schedule.fora(diffroute.architecture_map(pipe.transformer), STEPS, 2))
    loss, _ = _student_loss(pipe, name, router, GateConfig(iepo_every=1))
    try:
        weights = loss.refresh_step_weights()
        assert len(loss.terms) == 0  # the generations trained nothing
    finally:
        loss.close()
    lam = loss.raw_lambda
    assert torch.equal(lam[2::2], torch.zeros(2)) and (lam[1::2] > 0).all()
    assert weights[0] == 1 and torch.equal(weights[2::2], torch.full((2,), 0.1))
    torch.testing.assert_close(weights[1:], (lam[1:] / lam[1:].mean()).clamp(min=0.1))


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
    assert json.loads(again.stdout)["seconds"] == result["seconds"]  # the training's own time, kept
    assert (tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    pipe = diffroute.load_pipeline("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    diffroute.apply(pipe, str(tmp_path / "g" / "router"))
    pipe(["a red apple"], num_inference_steps=4, output_type="np", height=32, width=32)
    info = pipe.last_stats.plan_info
    assert info["gated_skipped"] > 0  # a strong FLOP penalty: the trained gates skip
    assert pipe.last_stats.computed_fraction < 1


def test_train_gates_cli_at_block_level_learns_to_skip_whole_blocks_and_resumes(tmp_path):
    """`--level block`: one gate per (step, block), priced at the block's FLOPs; a strong penalty teaches it to
    reuse whole blocks (their components then never run), a rerun trains nothing, and a component-only flag is
    refused before any work."""
    args = ["train", "gates", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "4", "--rho", "5", "--lr", "0.2", "--level", "block", "--rollout", "image", "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat"]
    refused = run_cli(*args, "--cross-attention", "--out", str(tmp_path / "bad"))
    assert refused.returncode != 0 and "--level block gates whole blocks" in refused.stderr
    assert not (tmp_path / "bad" / "log.jsonl").exists()
    proc = run_cli(*args, "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["level"] == "block" and result["gated"] == ["block"]
    assert result["gated_flop_share"] == pytest.approx(1.0, abs=0.05)  # every block's FLOPs (bar the embedders)
    weights = (tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run_cli(*args, "--out", str(tmp_path / "g"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "g" / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    pipe = diffroute.load_pipeline("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    diffroute.apply(pipe, str(tmp_path / "g" / "router"))
    pipe(["a red apple"], num_inference_steps=4, output_type="np", height=32, width=32)
    assert pipe.last_stats.plan_info["gated_skipped"] > 0 and pipe.last_stats.computed_fraction < 1


def test_train_gates_cli_starts_from_a_schedule_plan_and_refuses_a_policy(tmp_path):
    args = ["train", "gates", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "1", "--json", "--prompt", "a red apple", "--prompt", "a cat"]
    refused = run_cli(*args, "--init", "fbcache-0.1", "--out", str(tmp_path / "bad"))
    assert refused.returncode != 0 and "gates start from a schedule plan" in refused.stderr
    assert not (tmp_path / "bad" / "log.jsonl").exists()
    teacher_forced = run_cli(*args, "--rollout", "recorded", "--iepo-every", "5", "--out", str(tmp_path / "iepo"))
    assert teacher_forced.returncode == 2 and "--iepo-every needs student rollouts" in teacher_forced.stderr
    assert not (tmp_path / "iepo").exists()  # refused before the run folder is made
    proc = run_cli(*args, "--init", "fora-2", "--cross-attention", "--lr", "1e-9", "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["init"] == "fora-2" and "attn2" in result["gated"] and result["pooling"] == "mean"
    router = GateRouter.from_pretrained(tmp_path / "g" / "router")
    # after one tiny step the biases still say fora-2: steps 1 and 3 reuse (+2), steps 0 and 2 compute (-2)
    assert torch.allclose(router.bias[1], torch.full_like(router.bias[1], 2.0), atol=1e-3)
    assert torch.allclose(router.bias[2], torch.full_like(router.bias[2], -2.0), atol=1e-3)


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
