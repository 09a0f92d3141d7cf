"""Threshold genomes (issue 25, item 3): ECAD's genome holds a first-block check threshold per step, so that a
searched plan decides per image. A checked schedule survives its file, runs as the `+fbT` plan it names, its cost is
what its images computed, and a search with `--thresholds` ships such plans."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import STEPS, fresh_pipe, prompts, run, run_cli

import diffroute
from diffroute.core.schedule import Schedule, ScheduleMismatchError
from diffroute.policies.checked import CheckedPlan
from diffroute.search.cost import LatencyModel, measure_cost
from diffroute.search.evaluate import ScheduleEvaluator
from diffroute.search.genome import (
    THRESHOLD_BITS,
    THRESHOLD_LEVELS,
    GenomeSpace,
    StructuredMutation,
    _gray_to_index,
    _index_to_gray,
)


def _checked(schedule: Schedule, thresholds, per: str = "prompt") -> Schedule:
    s = schedule
    return Schedule(s.compute, s.model_class, s.components, {}, s.forecast, s.block_reuse, thresholds, per)


@pytest.fixture(scope="module")
def arch():
    return diffroute.architecture_map(fresh_pipe("pixart-alpha").transformer)


def test_neighbouring_threshold_levels_differ_in_one_bit():
    """Gray coding: a single bit flip moves a step's threshold to a neighbouring level, not across the ladder."""
    for i in range(len(THRESHOLD_LEVELS) - 1):
        assert _gray_to_index(_index_to_gray(i)) == i
        assert int((_index_to_gray(i) ^ _index_to_gray(i + 1)).sum()) == 1
    assert 2**THRESHOLD_BITS == len(THRESHOLD_LEVELS) and math.isinf(THRESHOLD_LEVELS[0])


def test_threshold_genes_round_trip_and_block_zero_always_computes(arch):
    space = GenomeSpace(arch, STEPS, whole_blocks=True, thresholds=True)
    assert space.n_var == 2 * space.n_cells + (STEPS - 1) * arch.num_blocks + (STEPS - 1) * THRESHOLD_BITS
    fbcache = Schedule.fora(arch, STEPS, STEPS).with_block_reuse(arch.present())
    levels = [math.inf, 0.1, 0.2, math.inf, 0.5, 0.03]
    back = space.to_schedule(space.from_schedule(_checked(fbcache, levels)))
    assert back.check == tuple(levels)
    assert back.compute[:, 0].all() and not back.block_reuse[:, 0].any()  # the check reads block 0
    assert torch.equal(back.block_reuse[1:, 1:], fbcache.block_reuse[1:, 1:])
    static = space.to_schedule(space.from_schedule(fbcache))  # every step unchecked: the static schedule, block 0
    assert static.check is None and torch.equal(static.block_reuse, fbcache.block_reuse)  # reused like the others
    assert GenomeSpace(arch, STEPS).to_schedule(GenomeSpace(arch, STEPS).from_schedule(fbcache)).check is None
    seeds = [space.to_schedule(x) for x in space.seeds(np.random.default_rng(0), 16)]
    assert seeds[0].check == (math.inf,) + (0.1,) * (STEPS - 1)  # FBCache 0.1 first
    assert any(s.check is None for s in seeds) and all(s.check_per == "prompt" for s in seeds)
    moved = StructuredMutation(space, prob_var=0.0, structured=1.0)._do(
        None, np.zeros((16, space.n_var), dtype=bool), random_state=np.random.default_rng(0)
    )
    finite = [[t for t in space.to_schedule(y).check or () if not math.isinf(t)] for y in moved]
    assert all(len(set(f)) <= 1 for f in finite)  # from all-unchecked: one level over a run of steps
    assert any(len(f) > 1 for f in finite)


def test_checked_schedule_file_round_trip_and_refusals(arch, tmp_path):
    s = _checked(Schedule.fora(arch, STEPS, 3), [math.inf, 0.2, 0.2, 0.1, 0.1, math.inf], per="sample")
    s.save(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["check"] == ["inf", 0.2, 0.2, 0.1, 0.1, "inf"] and d["check_per"] == "sample"  # JSON has no infinity
    loaded = Schedule.load(tmp_path / "c.json")
    assert loaded.check == s.check and loaded.check_per == "sample"
    assert s.resample(11).check_per == "sample" and s.with_block_reuse().check_per == "sample"
    (tmp_path / "p.json").write_text(json.dumps({k: v for k, v in d.items() if k != "check_per"}))
    assert Schedule.load(tmp_path / "p.json").check_per == "prompt"  # by default both CFG rows of an image together
    (tmp_path / "bad.json").write_text(json.dumps(dict(d, check_per="row")))
    with pytest.raises(ScheduleMismatchError, match="'check_per' must be"):
        Schedule.load(tmp_path / "bad.json")
    assert s.resample(11).check == tuple(s.check[i] for i in [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5])  # as its rows
    assert s.with_block_reuse().check == s.check and s.without_check().check is None
    for bad in (["inf"] * 5, [0.1, -1, 0, 0, 0, 0], ["nan", 0, 0, 0, 0, 0], [True, 0, 0, 0, 0, 0], "0.1"):
        (tmp_path / "bad.json").write_text(json.dumps(dict(d, check=bad)))
        with pytest.raises(ScheduleMismatchError, match="'check' must be a list of num_steps=6"):
            Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="schedule_plan"):
        diffroute.SchedulePlan(s)  # would drop the check silently


def test_a_checked_schedule_file_runs_as_the_checked_plan_it_names(tmp_path):
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    arch = diffroute.architecture_map(pipe.transformer)
    base = Schedule.fora(arch, STEPS, 3).with_block_reuse(arch.present())
    base.save(tmp_path / "base.json")
    _checked(base, [0.05] * STEPS).save(tmp_path / "checked.json")
    plan = diffroute.resolve_plan(str(tmp_path / "checked.json"))
    assert isinstance(plan, CheckedPlan) and plan.name == "checked" and plan.thresholds == [0.05] * STEPS
    assert plan.per == "prompt"
    diffroute.apply(pipe, f"{tmp_path / 'base.json'}+fb0.05-prompt")
    expected = run(pipe, name, prompts(name), [0, 1])
    followed = pipe.last_stats.plan_info["rows_followed"]
    diffroute.apply(pipe, str(tmp_path / "checked.json"))
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), expected)
    assert pipe.last_stats.plan_info["rows_followed"] == followed


def test_cost_of_a_call_is_what_its_images_computed(tiny_pipes):
    """Static schedule: the realised cost and latency equal the analytic ones (the accounting is exact); checked
    at 0 everything computes (cost 1); checked at inf it is the schedule with block 0 computed."""
    from conftest import CALL_KWARGS

    pipe = tiny_pipes("pixart-alpha")
    arch = diffroute.architecture_map(pipe.transformer)
    kwargs = dict(CALL_KWARGS["pixart-alpha"], num_inference_steps=STEPS)
    cost = measure_cost(pipe, arch, kwargs)
    present = arch.present()
    latency = LatencyModel(present.float() * 0.01, present, 0.005, 0.001, 0.002, -0.003)
    evaluator = ScheduleEvaluator(pipe, ["red apple", "cat"], 0, kwargs, cost, latency_model=latency)
    fora = Schedule.fora(arch, STEPS, 3).with_block_reuse(present)
    _, _, stats = evaluator.generate(fora)
    assert cost.realised_cost(stats) == pytest.approx(cost.relative_cost(fora), rel=1e-9)
    assert latency.realised(stats) == pytest.approx(latency.relative(fora), rel=1e-9)
    # checked at 0 every block computes; only the text projection runs once per call (`core/invariant.py`)
    once = 1.0 - cost.invariant_flops * (STEPS - 1) / (cost.step_flops * STEPS)
    assert cost.invariant_flops > 0 and evaluator(_checked(fora, [0.0] * STEPS))["cost"] == pytest.approx(once)
    compute = fora.compute.clone()
    compute[:, 0] = True
    block_zero = Schedule(compute, fora.model_class, fora.components, {}, None, fora.block_reuse & ~compute.any(2))
    unchecked = evaluator(_checked(fora, [math.inf] * STEPS))
    assert unchecked["cost"] == pytest.approx(cost.relative_cost(block_zero), rel=1e-9)
    assert cost.relative_cost(fora) < unchecked["cost"] < 1
    assert unchecked["latency_model"] == pytest.approx(latency.relative(block_zero), rel=1e-9)


def test_search_with_thresholds_ships_plans_that_decide_per_image(tmp_path):
    out = tmp_path / "s"
    args = ["search", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--pop", "6", "--generations", "1"]
    args += ["--quality", "psnr_mean", "--thresholds", "--whole-blocks", "--no-bac", "--out", str(out), "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((out / "settings.json").read_text())["thresholds"] is True
    for member in result["front"]:
        s = Schedule.load(member["file"])
        plan = diffroute.resolve_plan(member["file"])
        assert isinstance(plan, CheckedPlan) == (s.check is not None)
        if s.check is not None:
            assert s.compute[:, 0].all() and s.check_per == "prompt" and plan.per == "prompt"
        assert 0 < member["cost"] <= 1 + 1e-9
    assert len(result["front"]) > 0
    again = run_cli(*[a for a in args if a != "--thresholds"])  # another genome: refused, naming the setting
    assert again.returncode != 0 and "thresholds" in again.stderr


def test_a_genome_decided_per_batch_decodes_to_schedules_checked_per_batch():
    """`search --check-per batch`: every checked seed and decoded genome decides for the whole batch, and runs so."""
    arch = diffroute.architecture_map(fresh_pipe("pixart-alpha").transformer)
    space = GenomeSpace(arch, STEPS, whole_blocks=True, thresholds=True, check_per="batch")
    seeds = space.seed_schedules()
    checked = [s for s in seeds if s.check is not None]
    assert checked and all(s.check_per == "batch" for s in checked)
    decoded = [space.to_schedule(space.from_schedule(s)) for s in checked]
    # (step 0 computes in full: its threshold is not a gene)
    assert all(d.check_per == "batch" and d.check[1:] == s.check[1:] for d, s in zip(decoded, checked, strict=True))
    assert diffroute.schedule_plan(decoded[0]).per == "batch"
