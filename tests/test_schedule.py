"""Schedules: constructors, JSON round-trip, resampling, and refusal of schedules that do not fit."""

import json

import pytest
import torch

import diffroute
from diffroute import Schedule, ScheduleMismatchError


@pytest.fixture(scope="module")
def arch(tiny_pipes):
    return diffroute.architecture_map(tiny_pipes("pixart-alpha").transformer)


def test_fora_and_intervals(arch):
    s = Schedule.fora(arch, 10, 3)
    assert s.compute.shape == (10, arch.num_blocks, 3)
    assert s.compute[[0, 3, 6, 9]].all() and not s.compute[[1, 2, 4, 5, 7, 8]].any()
    assert s.computed_fraction() == pytest.approx(0.4)
    iv = Schedule.intervals(arch, 8, {"attn2": 4, "ff": 2})
    assert iv.compute[:, :, 0].all()  # attn1 not named: always computes
    assert iv.compute[:, :, 1].tolist() == [[i % 4 == 0] * arch.num_blocks for i in range(8)]
    assert iv.compute[:, :, 2].tolist() == [[i % 2 == 0] * arch.num_blocks for i in range(8)]


def test_warm_up_computes_the_first_steps_then_cycles_from_the_last(arch):
    s = Schedule.fora(arch, 8, 3, warmup=2)
    assert [bool(s.compute[i].all()) for i in range(8)] == [i in (0, 1, 4, 7) for i in range(8)]
    assert not s.compute[[2, 3, 5, 6]].any() and s.provenance["warmup"] == 2
    assert torch.equal(Schedule.fora(arch, 8, 3, warmup=1).compute, Schedule.fora(arch, 8, 3).compute)
    plan = diffroute.resolve_plan("fora-3-w2")
    assert plan.name == "fora-3-w2" and torch.equal(plan.schedule(arch, 8).compute, s.compute)
    assert diffroute.resolve_plan("taylor-3-w2").schedule(arch, 8).compute.equal(s.compute)


def test_forecast_cells_round_trip_and_drive_the_decider(arch, tmp_path):
    from diffroute.core.deciders import FORECAST, ScheduleDecider

    s = Schedule.fora(arch, 6, 3)
    forecast = ~s.compute
    forecast[1] = False  # step 1 reuses, steps 2, 4, 5 forecast
    t = Schedule(s.compute, s.model_class, s.components, {"name": "mixed"}, forecast)
    assert t.to_dict()["compute"][2].startswith("fff") and t.to_dict()["compute"][1].startswith("000")
    t.save(tmp_path / "t.json")
    back = Schedule.load(tmp_path / "t.json")
    assert torch.equal(back.forecast, t.forecast) and torch.equal(back.compute, t.compute)
    plan = diffroute.resolve_plan(str(tmp_path / "t.json"))
    assert plan.cache_history == 2  # a forecast needs the last two outputs
    d = ScheduleDecider(t)
    from diffroute.core.context import StepContext as ctx

    assert [d.decide(ctx(step=i), 0, 0) for i in range(6)] == [True, False, FORECAST, True, FORECAST, FORECAST]
    assert d.must_store(ctx(step=0), 0, 0) and d.must_store(ctx(step=3), 0, 0)  # forecasting column: keep all
    with pytest.raises(ScheduleMismatchError, match="cannot both compute and forecast"):
        Schedule(s.compute, s.model_class, s.components, {}, torch.ones_like(s.compute))
    assert diffroute.resolve_plan("taylor-3").schedule(arch, 6).forecast.equal(~s.compute)


def test_ranges(arch):
    s = Schedule.ranges(arch, 10, [{"blocks": (1, 2), "steps": (2, 8), "components": ["ff"], "every": 3}])
    ff = s.compute[:, :, 2]
    assert ff[:, 0].all()  # block 0 untouched
    assert ff[:, 1].tolist() == [True, True, False, True, False, False, True, False, True, True]
    with pytest.raises(ScheduleMismatchError, match="outside the model"):
        Schedule.ranges(arch, 10, [{"blocks": (0, 9)}])


def test_json_round_trip(arch, tmp_path):
    s = Schedule.ranges(arch, 7, [{"blocks": (0, 1), "steps": (1, 5), "components": ["attn1", "ff"], "every": 2}])
    s.provenance["note"] = "test"
    path = tmp_path / "s.json"
    s.save(path)
    back = Schedule.load(path)
    assert torch.equal(back.compute, s.compute)
    assert (back.model_class, back.components, back.provenance) == (s.model_class, s.components, s.provenance)
    assert diffroute.resolve_plan(str(path)).schedule.compute.equal(s.compute)


def test_step_zero_must_compute(arch):
    c = torch.ones(4, arch.num_blocks, 3, dtype=torch.bool)
    c[0, 0, 0] = False
    with pytest.raises(ScheduleMismatchError, match="step 0"):
        Schedule(c, arch.model_class, arch.components)


def test_resample_by_normalised_time(arch):
    s = Schedule.fora(arch, 20, 2)
    r = s.resample(10)
    assert r.num_steps == 10 and r.provenance["resampled_from"] == 20
    src = [round(i * 19 / 9) for i in range(10)]
    assert torch.equal(r.compute, s.compute[src])
    assert s.resample(20) is s


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(model_class="SD3Transformer2DModel"), "made for SD3Transformer2DModel"),
        (lambda d: d.update(num_blocks=3, compute=[r + " 111" for r in d["compute"]]), "has 3 blocks"),
        (lambda d: d.update(components=["attn1", "attn2", "mlp"]), "components"),
    ],
)
def test_schedule_that_does_not_fit_is_refused_before_work(tiny_pipes, arch, tmp_path, change, message):
    pipe = tiny_pipes("pixart-alpha")
    d = Schedule.fora(arch, 5, 2).to_dict()
    change(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ScheduleMismatchError, match=message):
        pipe.enable_cache(str(path))
    assert diffroute.get_executor(pipe) is None  # nothing was attached


def test_broken_json_and_bad_format(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"format": ')
    with pytest.raises(ValueError, match="not valid JSON .*line 1"):
        diffroute.resolve_plan(str(bad))
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ScheduleMismatchError, match="not a diffroute schedule"):
        diffroute.resolve_plan(str(other))
    with pytest.raises(diffroute.PlanError, match="does not exist"):
        diffroute.resolve_plan(str(tmp_path / "missing.json"))
