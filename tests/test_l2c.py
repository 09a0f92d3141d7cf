"""Learning-to-Cache: the executor's soft (training) decisions, training on every tiny family, save/load, refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import CALL_KWARGS, NAMES, prompts, run, run_cli

import diffroute
from diffroute.errors import PlanError
from diffroute.routers import L2CRouter, RouterPlan, load_router
from diffroute.search.genome import GenomeSpace
from diffroute.training.configs import L2CConfig
from diffroute.training.l2c import L2CLoss, train_l2c
from diffroute.training.trajectories import record_calls

STEPS = 5


def _kwargs(name, n):
    kw = dict(CALL_KWARGS[name], num_inference_steps=STEPS)
    if "negative_prompt" in kw:
        kw["negative_prompt"] = [kw["negative_prompt"]] * n
    return kw


def test_soft_decisions_blend_with_gradients_and_weight_one_is_compute(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    ps = prompts("pixart-alpha")
    recordings = record_calls(pipe, ps, 0, _kwargs("pixart-alpha", len(ps)), batch=len(ps))
    assert len(recordings) == 1 and len(recordings[0]) == STEPS
    router = L2CRouter.for_model(diffroute.architecture_map(pipe.transformer), STEPS, pipe.scheduler)
    pipe.transformer.requires_grad_(False)
    loss = L2CLoss(pipe.transformer, recordings, router, L2CConfig(lam=0.0))
    try:
        with torch.no_grad():
            router.theta.fill_(50.0)  # beta == 1: the blend is the fresh output exactly
        assert float(loss(router, torch.tensor([0]), None).detach()) == 0.0
        with torch.no_grad():
            router.theta.zero_()  # beta == 0.5: half of a stale output
        value = loss(router, torch.tensor([0]), None)
        value.backward()
        k = loss.items[0][1]
        assert float(value.detach()) > 0 and bool((router.theta.grad[k] != 0).any())
        assert bool((router.theta.grad[k + 1] == 0).all())  # an item trains its own step's logits only
    finally:
        loss.close()
        pipe.transformer.requires_grad_(True)  # as the shared fixture built it
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


@pytest.mark.parametrize("name", NAMES)
def test_l2c_trains_saves_loads_and_all_compute_is_vanilla(tiny_pipes, name, tmp_path):
    pipe = tiny_pipes(name)
    ps = prompts(name)
    vanilla = run(pipe, name, ps, [0, 1], steps=STEPS)
    cfg = L2CConfig(lam=1.0, threshold=0.5, iters=6, batch=1, prompts_per_batch=len(ps), lr=1.0)
    torch.manual_seed(cfg.seed)
    arch = diffroute.architecture_map(pipe.transformer)
    before = L2CRouter.for_model(arch, STEPS, pipe.scheduler, threshold=0.5).schedule()
    summary = train_l2c(pipe, ps, _kwargs(name, len(ps)), cfg, tmp_path / "r", Accelerator(cpu=True))
    router = load_router(tmp_path / "r" / "router")
    after = router.schedule()
    present = arch.present()
    # a heavy compute penalty: the routed steps' decisions change, towards reuse
    assert not torch.equal(before.compute, after.compute)
    assert after.computed_fraction(present) < before.computed_fraction(present)
    assert summary["computed_fraction"] == pytest.approx(after.computed_fraction(present))
    assert bool(after.compute[0::2].all())  # alternation: even steps compute everything
    # save -> load -> apply reproduces the trained router's images
    diffroute.apply(pipe, RouterPlan(router, "trained"))
    routed = run(pipe, name, ps, [0, 1], steps=STEPS)
    diffroute.apply(pipe, tmp_path / "r" / "router")
    again = run(pipe, name, ps, [0, 1], steps=STEPS)
    np.testing.assert_array_equal(routed, again)
    assert pipe.last_stats.computed_fraction == pytest.approx(after.computed_fraction(present))
    # every logit above the threshold: the router computes everything, bitwise as vanilla
    with torch.no_grad():
        router.theta.fill_(10.0)
    diffroute.apply(pipe, RouterPlan(router, "all"))
    np.testing.assert_array_equal(run(pipe, name, ps, [0, 1], steps=STEPS), vanilla)
    diffroute.remove(pipe)


def test_router_refuses_other_step_counts_and_schedulers(tiny_pipes, tmp_path):
    pipe = tiny_pipes("pixart-alpha")
    arch = diffroute.architecture_map(pipe.transformer)
    router = L2CRouter.for_model(arch, STEPS, pipe.scheduler)
    router.save_pretrained(tmp_path / "router")
    diffroute.apply(pipe, str(tmp_path / "router"))
    try:
        with pytest.raises(PlanError, match=f"trained for {STEPS} steps, not 3"):
            run(pipe, "pixart-alpha", ["a cat"], [0], steps=3)
        plan = RouterPlan(router, "r")
        with pytest.raises(PlanError, match="trained with DPMSolverMultistepScheduler"):
            plan.check_call(STEPS, torch.nn.Identity())
        # explicitly resampled, its schedule runs at another step count
        diffroute.apply(pipe, router.schedule().resample(3))
        assert run(pipe, "pixart-alpha", ["a cat"], [0], steps=3).shape[0] == 1
    finally:
        diffroute.remove(pipe)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot be loaded"):
        diffroute.resolve_plan(str(tmp_path / "broken"))


def test_train_cli_resumes_and_ships_nothing_without_ship(tmp_path):
    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "2", "--batch", "1", "--out", str(tmp_path / "r"), "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["iters"] == 2 and 0.5 <= result["computed_fraction"] <= 1 and "shipped_as" not in result
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()] == [1, 2]
    weights = (tmp_path / "r" / "router" / "diffusion_pytorch_model.safetensors").read_bytes()
    # rerun: the checkpoint says it is done, so nothing trains again and the same router comes out
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "r" / "log.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "r" / "router" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    bad = run_cli(*args[:-4], "--threshold", "1.5")
    assert bad.returncode == 2 and "argument --threshold: 1.5 is out of range" in bad.stderr


def test_search_is_seeded_with_shipped_routers_of_the_same_step_count(tiny_pipes, tmp_path, monkeypatch):
    import diffroute.zoo.shipped
    from diffroute.zoo.shipped import zoo_seeds

    arch = diffroute.architecture_map(tiny_pipes("pixart-alpha").transformer)
    torch.manual_seed(0)
    router = L2CRouter.for_model(arch, STEPS, threshold=0.5)
    router.save_pretrained(tmp_path / "tiny-pixart" / "routers" / "l2c")
    monkeypatch.setattr(diffroute.zoo.shipped, "WEIGHTS", tmp_path)
    assert diffroute.zoo.shipped.shipped_routers() == {"tiny-pixart:l2c": tmp_path / "tiny-pixart" / "routers" / "l2c"}
    # an earlier search's shipped front members seed it too, at their own step count only
    (tmp_path / "tiny-pixart" / "schedules").mkdir()
    diffroute.Schedule.fora(arch, STEPS, 3).save(tmp_path / "tiny-pixart" / "schedules" / "f3.json")
    diffroute.Schedule.fora(arch, STEPS + 1, 2).save(tmp_path / "tiny-pixart" / "schedules" / "other.json")
    seeds = zoo_seeds("tiny-pixart", arch, STEPS)
    assert len(seeds) == 2 and torch.equal(seeds[0].compute, router.schedule().compute)
    assert torch.equal(seeds[1].compute, diffroute.Schedule.fora(arch, STEPS, 3).compute)
    assert len(zoo_seeds("tiny-pixart", arch, STEPS + 1)) == 1 and zoo_seeds("emoji", arch, STEPS) == []
    space = GenomeSpace(arch, STEPS, whole_blocks=True)
    first = space.seed_schedules(seeds)[:4]  # the zoo's schedules lead, each followed by its whole-block variant
    assert torch.equal(first[2].compute, first[3].compute)
    whole = diffroute.Schedule.fora(arch, STEPS, 3).with_block_reuse(arch.present()).block_reuse
    assert not first[2].has_block_reuse and whole.any() and torch.equal(first[3].block_reuse, whole)


def test_train_l2c_on_two_gloo_processes_matches_one(tmp_path):
    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "4", "--prompts-per-batch", "2"]
    args += ["--iters", "3", "--batch", "2", "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat", "--prompt", "a tree", "--prompt", "a blue car"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffroute"]
    one = subprocess.run([sys.executable, "-m", "diffroute", *args, "--out", str(tmp_path / "one")], **_RUN)
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], **_RUN)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert (json.loads(one.stdout)["processes"], json.loads(two.stdout)["processes"]) == (1, 2)
    # each process trains on its half of the global batch; DDP averages their gradients: the same update
    a, b = load_router(tmp_path / "one" / "router"), load_router(tmp_path / "two" / "router")
    torch.testing.assert_close(a.theta, b.theta, rtol=1e-4, atol=1e-5)


_RUN = dict(capture_output=True, text=True, timeout=600)


def test_shipped_router_resolves_by_name_for_untrusted_clients_but_folders_do_not(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from diffroute.plans import plan_examples

    assert "emoji:l2c" in plan_examples()  # offered by the app's plan picker
    plan = diffroute.resolve_plan("emoji:l2c", allow_files=False)
    assert isinstance(plan, RouterPlan) and plan.router.config.num_steps == 20
    plan.check_call(20, DPMSolverMultistepScheduler())
    with pytest.raises(PlanError, match="trained for 20 steps, not 10"):
        plan.check_call(10, DPMSolverMultistepScheduler())
    router = L2CRouter.for_model(diffroute.architecture_map(_tiny_transformer()), STEPS)
    router.save_pretrained(tmp_path / "router")
    with pytest.raises(PlanError, match="Unknown plan"):
        diffroute.resolve_plan(str(tmp_path / "router"), allow_files=False)  # a client never names a path


def _tiny_transformer():
    from diffroute.zoo.tiny import TINY_PIPELINES

    return TINY_PIPELINES["pixart-alpha"]().transformer
