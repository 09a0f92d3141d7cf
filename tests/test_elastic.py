"""Elastic-DiT-style router: identity at initialisation, per-sample decisions, gradients in training mode."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run, run_cli

import diffroute
from diffroute.errors import PlanError
from diffroute.routers.elastic import ElasticPlan, ElasticRouter

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


@pytest.mark.parametrize("name", ["pixart-alpha", "flux", "dit"])
def test_decisions_are_per_sample_and_a_sample_does_not_depend_on_its_batch(tiny_pipes, name):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    router = _router(pipe)
    with torch.no_grad():  # strong, input-dependent gates
        for gate in router.gates:
            gate.skip.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(1))
            gate.width.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(2))
    logits = {b: [] for b in range(len(router.gates))}
    hooks = [g.register_forward_hook(lambda m, a, o, b=b: logits[b].append(o[0])) for b, g in enumerate(router.gates)]
    diffroute.apply(pipe, ElasticPlan(router))
    try:
        run(pipe, name, ps, [0, 1], steps=STEPS)
        for h in hooks:
            h.remove()
        with torch.no_grad():  # centre each skip logit on its median: about half the samples keep each block
            for b, gate in enumerate(router.gates):
                gate.skip.bias -= torch.cat(logits[b]).median()
        both = run(pipe, name, ps, [0, 1], steps=STEPS)
        fractions = np.array(pipe.last_stats.compute_map, dtype=float)
        per_sample = pipe.last_stats.plan_info["per_sample_block_fraction"]
        alone = run(pipe, name, ps[1:], [1], steps=STEPS)
    finally:
        diffroute.remove(pipe)
    mixed = (fractions > 0) & (fractions < 1)
    assert mixed.any(), "no block was computed for some samples and skipped for others"
    assert len(per_sample) >= len(ps) and len(set(per_sample)) > 1  # samples really differ in compute
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


def test_width_budget_averages_soft_widths_over_the_blocks_the_hard_mask_opens():
    """Elastic-DiT's width term: a closed block's width (keep probability 0.3, hard 0) takes no part; the widths are
    the soft expectations, so the width logits get a gradient through every open block."""
    from diffroute.routers.elastic import straight_through
    from diffroute.training.elastic import budget_loss

    prob = torch.tensor([[0.3], [0.9]], requires_grad=True)  # one sample, two blocks: [block][sample]
    logits = torch.tensor([[[0.0, 0.0, 0.0, 2.0]], [[0.0, 0.0, 2.0, 0.0]]], requires_grad=True)
    widths = torch.tensor([0.25, 0.5, 0.75, 1.0])
    aux = [
        {"keep": prob[b], "open": straight_through(prob[b]), "width": (logits[b].softmax(-1) * widths).sum(-1)}
        for b in range(2)
    ]
    loss = budget_loss(aux, torch.tensor([0.6]), 0.75)
    soft1 = float((logits[1].detach().softmax(-1) * widths).sum())
    assert float(loss) == pytest.approx((0.6 - 0.6) ** 2 + (soft1 - 0.75) ** 2)  # block 0 is closed: left out
    loss.backward()
    assert logits.grad[1].abs().sum() > 0 and logits.grad[0].abs().sum() == 0


def test_router_refuses_another_model_or_step_count(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    plan = ElasticPlan(_router(pipe))
    with pytest.raises(PlanError, match=f"trained for {STEPS} steps, not 7"):
        plan.check_call(7)
    with pytest.raises(PlanError, match="was made for PixArtTransformer2DModel"):
        diffroute.apply(tiny_pipes("dit"), plan)


def _kwargs(name, n):
    from conftest import CALL_KWARGS

    kw = dict(CALL_KWARGS[name], num_inference_steps=STEPS)
    if "negative_prompt" in kw:
        kw["negative_prompt"] = [kw["negative_prompt"]] * n
    return kw


@pytest.mark.parametrize("name", NAMES)
def test_elastic_trains_on_every_family_and_loads_by_folder(tiny_pipes, name, tmp_path):
    from accelerate import Accelerator

    from diffroute.routers import load_router
    from diffroute.training.configs import ElasticConfig
    from diffroute.training.elastic import train_elastic

    pipe = tiny_pipes(name)
    ps = prompts(name)
    fresh = _router(pipe)
    cfg = ElasticConfig(iters=3, lr=0.05, prompts_per_batch=len(ps))
    summary = train_elastic(pipe, ps, _kwargs(name, len(ps)), cfg, tmp_path / "e", Accelerator(cpu=True))
    assert summary["iters"] == 3 and (tmp_path / "e" / "summary.json").is_file()
    trained = load_router(tmp_path / "e" / "router")
    changed = [not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values())]
    assert any(changed)  # the gates learned something
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # the frozen backbone's flags restored
    diffroute.apply(pipe, str(tmp_path / "e" / "router"))
    try:
        first = run(pipe, name, ps, [0, 1], steps=STEPS)
        np.testing.assert_array_equal(run(pipe, name, ps, [0, 1], steps=STEPS), first)
    finally:
        diffroute.remove(pipe)


def test_elastic_finetune_saves_a_loadable_model_variant(tmp_path):
    from accelerate import Accelerator

    from diffroute.training.configs import ElasticConfig
    from diffroute.training.elastic import train_elastic
    from diffroute.zoo.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["pixart-alpha"]()  # its own copy: fine-tuning changes the weights
    pipe.set_progress_bar_config(disable=True)
    ps = prompts("pixart-alpha")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = ElasticConfig(iters=2, finetune=True, backbone_lr=1e-3, prompts_per_batch=len(ps))
    train_elastic(pipe, ps, _kwargs("pixart-alpha", len(ps)), cfg, tmp_path / "e", Accelerator(cpu=True))
    after = pipe.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from diffroute.zoo import load_pipeline

    variant = load_pipeline(str(tmp_path / "e" / "model"))
    for k, v in variant.transformer.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_train_elastic_cli_runs_and_refuses_bad_budgets(tmp_path):
    import json

    args = ["train", "elastic", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "2", "--out", str(tmp_path / "e"), "--json", "--prompt", "a red apple", "--prompt", "a cat"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "elastic" and (tmp_path / "e" / "router" / "config.json").is_file()
    assert [json.loads(line)["step"] for line in (tmp_path / "e" / "log.jsonl").read_text().splitlines()] == [1, 2]
    bad = run_cli(*args, "--r-clean", "1.5")
    assert bad.returncode == 2 and "argument --r-clean: 1.5 is out of range: give a number in (0, 1]" in bad.stderr


def test_plan_content_follows_the_router_weights(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    a, b = ElasticPlan(_router(pipe, seed=0)), ElasticPlan(_router(pipe, seed=1))
    assert a.content() != b.content() and a.content() == ElasticPlan(_router(pipe, seed=0)).content()
