"""ECAD search: runs on a tiny model, resumes from its checkpoint to the same result, loses nothing when killed."""

import json
import time

import numpy as np
import pytest
import torch
from accelerate import PartialState

import diffroute
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
    assert fora == pytest.approx(1 - share * 4 / 6)  # 4 of 6 steps skip every component


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
