"""ECAD search: runs on a tiny model, resumes from its checkpoint to the same result, loses nothing when killed."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from conftest import run_cli

import diffroute
from diffroute.metrics.fidelity import per_image_psnr
from diffroute.search.cost import measure_cost
from diffroute.search.evaluate import ScheduleEvaluator
from diffroute.search.front import pareto_front, pick
from diffroute.search.genome import GenomeSpace
from diffroute.search.nsga import Search, SearchConfig

STEPS = 6
KW = dict(
    height=16,
    width=16,
    clean_caption=False,
    use_resolution_binning=False,
    max_sequence_length=16,
    num_inference_steps=STEPS,
)


@pytest.fixture(scope="module")
def setup(tiny_pipes):
    pipe = tiny_pipes("pixart-alpha")
    arch = diffroute.architecture_map(pipe.transformer)
    cost = measure_cost(pipe, arch, {k: v for k, v in KW.items() if k != "num_inference_steps"})
    evaluator = ScheduleEvaluator(pipe, ["red apple", "cat"], 0, KW, cost)
    return arch, cost, evaluator


def _search(setup, out, generations, evaluate=None):
    arch, _, evaluator = setup
    cfg = SearchConfig(pop_size=4, generations=generations, seed=0, quality="psnr")
    return Search(GenomeSpace(arch, STEPS), evaluate or evaluator, cfg, out, PartialState(cpu=True))


def test_cost_model_is_analytic(setup):
    arch, cost, _ = setup
    assert cost.relative_cost(diffroute.Schedule.full(arch, STEPS)) == pytest.approx(1.0)
    fora = cost.relative_cost(diffroute.Schedule.fora(arch, STEPS, 3))
    share = float(cost.component_flops.sum()) / cost.step_flops
    # 4 of 6 steps skip every component, and the text projection runs at the first step only (`core/invariant.py`)
    once = cost.invariant_flops * (STEPS - 1) / (cost.step_flops * STEPS)
    assert STEPS == 6 and cost.invariant_flops > 0
    assert fora == pytest.approx(1 - share * 4 / 6 - once)


def test_genome_round_trip(setup):
    arch = setup[0]
    space = GenomeSpace(arch, STEPS)
    s = diffroute.Schedule.fora(arch, STEPS, 2)
    assert torch.equal(space.to_schedule(space.from_schedule(s)).compute, s.compute)
    seeds = space.seeds(np.random.default_rng(0), 12)
    assert len({GenomeSpace.key(x) for x in seeds}) == 12


def test_search_runs_and_resumes_to_the_same_result(setup, tmp_path):
    t0 = time.time()
    full = _search(setup, tmp_path / "a", 2).run()
    assert time.time() - t0 < 60
    part = _search(setup, tmp_path / "b", 1)
    part.run()
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["generation"] == 1
    resumed = _search(setup, tmp_path / "b", 2).run()
    assert np.array_equal(full["population"], resumed["population"])
    front = pareto_front(_search(setup, tmp_path / "a", 2).archive(), "psnr")
    costs = [r["cost"] for r in front]
    assert costs == sorted(costs) and all(0 < c <= 1 for c in costs)
    assert pick(front, 1.0, "psnr") is not None and pick(front, 0.0, "psnr") is None


def test_interrupted_generation_loses_nothing_finished(setup, tmp_path):
    reference = _search(setup, tmp_path / "ref", 2).run()
    calls = {"n": 0}

    def dying(schedule):
        calls["n"] += 1
        if calls["n"] == 6:  # generation 1 had 4 seeds + up to 4 offspring: die inside generation 2's work
            raise KeyboardInterrupt
        return setup[2](schedule)

    with pytest.raises(KeyboardInterrupt):
        _search(setup, tmp_path / "k", 2, evaluate=dying).run()
    done = len(list((tmp_path / "k" / "evals").glob("*.json")))
    assert done == 5  # every evaluation that finished before the kill is on disk
    resumed = _search(setup, tmp_path / "k", 2).run()
    assert np.array_equal(resumed["population"], reference["population"])


def test_three_valued_genome_round_trip_and_seeds(setup):
    arch = setup[0]
    space = GenomeSpace(arch, STEPS)
    assert space.n_var == 2 * space.n_cells
    taylor = diffroute.Schedule.fora(arch, STEPS, 3, warmup=2).with_forecasts()
    back = space.to_schedule(space.from_schedule(taylor))
    assert torch.equal(back.compute, taylor.compute) and torch.equal(back.forecast, taylor.forecast)
    seeds = [space.to_schedule(x) for x in space.seeds(np.random.default_rng(0), 16)]
    assert any(s.has_forecasts for s in seeds) and any(not s.has_forecasts for s in seeds)
    two = GenomeSpace(arch, STEPS, forecast=False)
    assert two.n_var == space.n_cells and not two.to_schedule(two.from_schedule(taylor)).has_forecasts


def test_whole_block_genes_round_trip_and_apply_only_where_a_block_reuses_everything(setup):
    from diffroute.search.genome import StructuredMutation

    arch, cost, _ = setup
    space = GenomeSpace(arch, STEPS, whole_blocks=True)
    assert space.n_var == 2 * space.n_cells + (STEPS - 1) * arch.num_blocks
    whole = diffroute.Schedule.fora(arch, STEPS, 3).with_block_reuse(arch.present())
    back = space.to_schedule(space.from_schedule(whole))
    assert torch.equal(back.block_reuse, whole.block_reuse) and back.block_reuse.sum() == 4 * arch.num_blocks
    bits = space.from_schedule(diffroute.Schedule.fora(arch, STEPS, 2))
    bits[space.n_var - space.n_whole :] = True  # every whole gene on: only the all-reuse (step, block)s take it
    s = space.to_schedule(bits)
    assert s.block_reuse[1::2].all() and not s.block_reuse[0::2].any()
    assert cost.relative_cost(s) <= cost.relative_cost(diffroute.Schedule.fora(arch, STEPS, 2))  # glue saved too
    seeds = [space.to_schedule(x) for x in space.seeds(np.random.default_rng(0), 24)]
    assert any(x.has_block_reuse for x in seeds)
    moved = StructuredMutation(space, prob_var=0.0, structured=1.0)._do(
        None, np.ones((32, space.n_var), dtype=bool), random_state=np.random.default_rng(1)
    )
    assert any(space.to_schedule(y).has_block_reuse for y in moved)  # moves that skip a group may reuse it whole


def test_whole_always_reuses_every_fully_reused_block_whole_without_genes(setup):
    arch = setup[0]
    space = GenomeSpace(arch, STEPS, forecast=False, whole_blocks=True, whole_always=True)
    assert space.n_var == space.n_cells  # no whole-block genes: the rule decides
    fora = diffroute.Schedule.fora(arch, STEPS, 2)
    s = space.to_schedule(space.from_schedule(fora))
    expect = fora.with_block_reuse(arch.present())
    assert torch.equal(s.block_reuse, expect.block_reuse) and torch.equal(s.compute, expect.compute)
    assert s.block_reuse[1::2].all() and not s.block_reuse[0::2].any()
    partial = fora.compute.clone()
    partial[1, 0, 0] = True  # block 0 computes a component at step 1: it is not reused whole there
    s = space.to_schedule(space.from_schedule(replace(fora, compute=partial)))
    assert not s.block_reuse[1, 0] and s.block_reuse[1, 1:].all()


def test_structured_mutation_moves_whole_groups(setup):
    from diffroute.search.genome import StructuredMutation

    arch = setup[0]
    space = GenomeSpace(arch, STEPS, forecast=False)
    mutation = StructuredMutation(space, prob_var=0.0, structured=1.0)
    X = np.ones((64, space.n_var), dtype=bool)
    Y = mutation._do(None, X, random_state=np.random.default_rng(0))
    present = arch.present()
    for y in Y:
        changed = ~space.to_schedule(y).compute  # [steps, blocks, comps]: cells that now skip
        if not changed.any():
            continue  # the move set its group to "compute": nothing changed
        steps = changed.any(dim=(1, 2)).nonzero().flatten().tolist()
        assert len(steps) == 1  # one step only
        cells = changed[steps[0]]
        whole_step = torch.equal(cells, present)
        one_block = cells.any(dim=1).sum() == 1 and torch.equal(cells[cells.any(dim=1)], present[cells.any(dim=1)])
        one_comp = cells.any(dim=0).sum() == 1 and torch.equal(cells[:, cells.any(dim=0)], present[:, cells.any(dim=0)])
        assert whole_step or one_block or one_comp


def test_bac_dynamic_programme_is_optimal():
    import itertools

    from diffroute.search.bac import best_updates

    def value(sim, updates):
        return sum(float(sim[max(u for u in updates if u <= j), j]) for j in range(sim.shape[0]))

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        sim = torch.rand(7, 7, generator=g).triu()
        for k in (1, 2, 3, 5):
            best = max(value(sim, (0, *rest)) for rest in itertools.combinations(range(1, 7), k - 1))
            got = best_updates(sim, k)
            assert got[0] == 0 and len(got) == k and value(sim, got) == pytest.approx(best)


def test_bac_schedules_from_a_calibration_run(tiny_pipes):
    from diffroute.search.bac import bac_schedules, similarity_tables

    pipe = tiny_pipes("pixart-alpha")
    diffroute.remove(pipe)
    arch = diffroute.architecture_map(pipe.transformer)
    table = similarity_tables(pipe, arch, lambda: pipe(["a cat"], **KW), STEPS)
    assert table.shape == (arch.num_blocks, 3, STEPS, STEPS)
    assert torch.allclose(table[0, 0].diagonal(), torch.ones(STEPS), atol=1e-5)  # a step is itself
    schedules = bac_schedules(arch, table, fractions=(0.5,))
    assert schedules[0].compute[0].all() and schedules[0].compute.sum(0).eq(3).all()  # 3 of 6 steps each


def test_latency_model_arithmetic(setup):
    from diffroute.search.cost import LatencyModel

    arch = setup[0]
    present = arch.present()
    comp = present.float() * 0.01
    model = LatencyModel(comp, present, step_s=0.005, reuse_s=0.0001, forecast_s=0.0002)
    full = diffroute.Schedule.full(arch, STEPS)
    assert model.relative(full) == pytest.approx(1.0)
    fora = diffroute.Schedule.fora(arch, STEPS, 3)  # steps 0 and 3 compute
    cells = int(present.sum())
    expect = 2 * cells * 0.01 + STEPS * 0.005 + 4 * cells * 0.0001
    assert model.seconds(fora) == pytest.approx(expect)
    assert model.seconds(fora.with_forecasts()) == pytest.approx(expect + 4 * cells * 0.0001)
    model.whole_block_s = -0.002  # each block reused whole saves its norms and stand-ins
    blocks = fora.with_block_reuse(present)
    assert model.seconds(blocks) == pytest.approx(expect - 4 * arch.num_blocks * 0.002)
    model.fitted_s, model.fitted_block_s = 0.0003, 0.001  # fitted stand-ins read two stored outputs
    assert model.seconds(fora, fitted=True) == pytest.approx(expect + 4 * cells * 0.0003)
    assert model.seconds(blocks, fitted=True) == pytest.approx(
        expect + 4 * cells * 0.0003 - 4 * arch.num_blocks * (0.002 - 0.001)
    )
    weights = torch.zeros(STEPS, arch.num_blocks, present.shape[1] + 1, 2)
    assert model.seconds(replace(fora, fit=weights)) == model.seconds(fora, fitted=True)  # priced as it carries


def test_latency_table_reproduces_the_runs_it_was_measured_from(setup, monkeypatch):
    """The table's reuse, whole-block and (with `fitted`) fitted costs are solved from timed runs: predicting those
    runs gives their times back; the fitted runs carry weights that read both stored outputs."""
    from diffroute.search import cost as cost_module

    arch = setup[0]
    timed = {}

    def fake_times(pipe, plans, call, after=None):  # (no run: the component timers read 0, all time is per step)
        timed.update(plans)
        if "full" in plans:
            return {"full": 0.6}
        out = {"reuse": 0.9, "forecast": 1.0, "whole": 0.8}
        return out | ({"reuse fitted": 1.1, "whole fitted": 0.95} if "reuse fitted" in plans else {})

    monkeypatch.setattr(cost_module, "transformer_times", fake_times)
    model = cost_module.measure_latency(None, arch, None, STEPS, fitted=True)
    reuse, whole = timed["reuse"], timed["whole"]
    assert model.relative(reuse) == pytest.approx(0.9 / 0.6) and model.relative(whole) == pytest.approx(0.8 / 0.6)
    assert model.relative(reuse, fitted=True) == pytest.approx(1.1 / 0.6)
    assert model.relative(whole, fitted=True) == pytest.approx(0.95 / 0.6)
    fit = timed["whole fitted"].fit
    assert torch.equal(timed["whole fitted"].block_reuse, whole.block_reuse) and bool((fit[..., 1] != 0).all())
    plain = cost_module.measure_latency(None, arch, None, STEPS)
    assert (plain.fitted_s, plain.fitted_block_s) == (0.0, 0.0)
    assert plain.relative(reuse, fitted=True) == pytest.approx(0.9 / 0.6)  # not measured: priced as plain reuse


def test_time_budget_stops_at_a_generation_boundary_and_counts_across_resumes(setup, tmp_path):
    arch, _, evaluator = setup

    def search(budget):
        cfg = SearchConfig(pop_size=4, generations=3, seed=0, quality="psnr", budget_minutes=budget)
        return Search(GenomeSpace(arch, STEPS), evaluator, cfg, tmp_path / "t", PartialState(cpu=True))

    first = search(1e-6).run()
    assert (first["generation"], first["stopped_by"]) == (1, "budget") and first["seconds"] > 0
    again = search(1e-6).run()  # the time spent is kept in the checkpoint: a resume does not restart the clock
    assert again["generation"] == 1 and again["seconds"] == first["seconds"]
    more = search(0).run()  # no budget: on to --generations
    assert (more["generation"], more["stopped_by"]) == (3, "generations") and more["seconds"] > first["seconds"]


def test_hypervolume_grows_with_a_dominating_point_and_plateaus(setup, tmp_path):
    from diffroute.search.nsga import hypervolume

    F = np.array([[0.5, -20.0], [0.8, -30.0]])
    base = hypervolume(F, "psnr", -10.0)
    assert 0 < base < hypervolume(np.vstack([F, [[0.4, -25.0]]]), "psnr", -10.0)
    search = _search(setup, tmp_path / "p", 10)
    assert not search.plateaued([0.1, 0.2, 0.3]) and search.plateaued([0.1, 0.3, 0.3, 0.3, 0.3])


def test_search_cli_with_forecasts_latency_model_and_per_image_quality(tmp_path):

    args = ["search", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--pop", "6", "--generations", "2"]
    args += ["--quality", "psnr_mean", "--cost", "latency_model", "--out", str(tmp_path / "s"), "--json"]
    args += ["--prompt", "a red apple", "--prompt", "a cat"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    check = result["latency_model_check"]
    assert set(check) == {"fora-2", "fora-3", "taylor-3"}
    # Timings of a tiny model are noise-dominated, so only the report's consistency is asserted, never a speedup.
    for c in check.values():
        assert c["predicted_speedup"] > 0 and c["measured_speedup"] > 0
        assert c["error"] == pytest.approx(c["predicted_speedup"] / c["measured_speedup"] - 1)
    assert "latency model: fora-3 predicted" in proc.stderr
    assert len(result["hypervolume"]) == result["generations_run"] == 2
    for member in result["front"]:
        s = diffroute.Schedule.load(member["file"])
        assert 0 < member["latency_model"] <= 1.0 + 1e-9 and 0 < member["psnr_mean"] <= 60
        assert s.provenance["psnr_mean_vs_full"] == member["psnr_mean"]


def test_python_entry_point_searches_picks_and_ships(tiny_pipes, tmp_path, monkeypatch):
    """`diffroute.search.run` is the search without the CLI: run, pick within a budget, install into the zoo."""
    from conftest import CALL_KWARGS

    import diffroute.zoo.shipped
    from diffroute.errors import InputError
    from diffroute.search.run import SearchSettings, pick_from, run_search
    from diffroute.zoo.shipped import ship_front

    pipe = tiny_pipes("pixart-alpha")
    kwargs = dict(CALL_KWARGS["pixart-alpha"])
    settings = SearchSettings("tiny-pixart", steps=4, pop=4, generations=1, quality="psnr", bac=False)
    settings.call_kwargs = kwargs
    with pytest.raises(InputError, match="2 prompts"):
        run_search(pipe, ["one"], settings, tmp_path / "s")
    result = run_search(pipe, ["a red apple", "a cat"], settings, tmp_path / "s")
    costs = [m["cost"] for m in result["front"]]
    cheapest = min(costs)
    picked = pick_from(result, cheapest, settings)
    assert picked in {m["file"] for m in result["front"] if m["cost"] == cheapest}
    assert pick_from(result, cheapest / 2, settings) is None
    monkeypatch.setattr(diffroute.zoo.shipped, "WEIGHTS", tmp_path / "zoo")
    shipped = ship_front(result, {"cheap": cheapest}, settings)
    installed = diffroute.Schedule.load(shipped["tiny-pixart:cheap"])
    assert installed.provenance["shipped_as"] == "tiny-pixart:cheap"
    with pytest.raises(InputError, match="raise the budget"):
        ship_front(result, {"cheaper": cheapest / 2}, settings)


def test_fitted_search_scores_each_schedule_as_its_fit_on_other_prompts(tiny_pipes):
    """With fit prompts, a candidate is scored as `fit_schedule` fits it on those prompts (seeds after the scored
    ones'): the same images as that fitted schedule, other than plain reuse's; its cost stays its cells'."""
    from diffroute.plans.base import SchedulePlan
    from diffroute.policies.fitting import fit_schedule
    from diffroute.search.cost import LatencyModel
    from diffroute.utils.seeding import sample_generators

    pipe = tiny_pipes("pixart-alpha")
    arch = diffroute.architecture_map(pipe.transformer)
    cost = measure_cost(pipe, arch, {k: v for k, v in KW.items() if k != "num_inference_steps"})
    scored, fit_on = ["red apple", "cat"], ["a dog", "a tree", "a boat"]
    plain = ScheduleEvaluator(pipe, scored, 0, KW, cost)
    fitting = ScheduleEvaluator(pipe, scored, 0, KW, cost, fit_prompts=fit_on)
    schedule = diffroute.Schedule.fora(arch, STEPS, 2).with_block_reuse()

    def run():
        gens = sample_generators(0, range(2, 5))
        pipe(fit_on, generator=gens, output_type="latent", **KW)

    fitted = fit_schedule(pipe, SchedulePlan(schedule), run, STEPS)[0]
    assert torch.equal(fitting.fitted(schedule).fit, fitted.fit) and bool(fitted.fit[..., 1].any())
    expected, _, _ = fitting.generate(fitted)
    assert not np.array_equal(expected, fitting.generate(schedule)[0])  # (on this tiny model: by ~1e-6)
    present = arch.present()
    fitting.latency_model = LatencyModel(present.float() * 0.01, present, 0.005, 1e-4, 2e-4, fitted_s=3e-4)
    got = fitting(schedule)
    assert got["latency_model"] == fitting.latency_model.relative(schedule, fitted=True)  # priced as fitted
    assert got["latency_model"] > fitting.latency_model.relative(schedule)
    assert got["psnr_mean"] == float(per_image_psnr(expected, fitting.full).mean())
    assert got["cost"] == plain(schedule)["cost"] == cost.relative_cost(schedule)
    full = diffroute.Schedule.full(arch, STEPS)  # nothing reused: nothing to fit, scored as it is
    assert fitting.fitted(full) is full and fitting(full)["psnr_mean"] == 60.0


def test_fitted_search_refuses_forecast_genes_and_checks(tmp_path):
    from diffroute.errors import InputError
    from diffroute.search.run import SearchSettings

    for extra in (dict(forecast=True), dict(forecast=False, thresholds=True)):
        with pytest.raises(InputError, match="--no-forecast"):
            SearchSettings("emoji", fit_prompts=["a cat"], **extra).check(2)
    SearchSettings("emoji", fit_prompts=["a cat"], forecast=False).check(2)
    proc = run_cli(
        "search", "--model", "tiny-pixart", "--n", "2", "--fitted", "2", "--prompt", "a", "--prompt", "b",
        "--prompt", "c", "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert proc.returncode != 0 and "give 4 prompts (got 3)" in proc.stderr
    assert not (tmp_path / "s").exists()  # refused before any work


def test_whole_blocks_flag_takes_genes_or_the_rule():
    import argparse

    from diffroute.cli.search import add_arguments
    from diffroute.search.run import SearchSettings, _whole_blocks_setting

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--model", "tiny-pixart", "--out", "s"]
    assert p.parse_args(base).whole_blocks is None
    assert p.parse_args([*base, "--whole-blocks"]).whole_blocks == "gene"
    assert p.parse_args([*base, "--whole-blocks", "always"]).whole_blocks == "always"
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--whole-blocks", "sometimes"])
    # the resume fingerprint tells the three apart (and keeps earlier runs' entries)
    entries = [_whole_blocks_setting(SearchSettings("emoji", whole_blocks=w, whole_always=a)) for w, a in
               [(False, False), (True, False), (True, True)]]  # fmt: skip
    assert entries == [{}, {"whole_blocks": True}, {"whole_blocks": "always"}]
