"""Timing figures a user can trust: spreads, the FLOP-ideal speedup, and warnings when a figure is noise."""

import pytest
import torch

from diffroute.core.stats import CallStats
from diffroute.metrics.timing import flop_ideal_speedup, paired_speedup_quartiles, speedups, spread, timing_warnings
from diffroute.search.cost import CostModel


def _stats(compute_map) -> CallStats:
    fields = {f: None for f in CallStats.__dataclass_fields__}
    fields.update(compute_map=compute_map, computed_fraction=0.5, plan_info={})
    return CallStats(**fields)


def test_flop_ideal_weighs_components_by_their_flops():
    cost = CostModel(component_flops=torch.tensor([[1.0, 3.0]]), other_flops=0.0)
    # two steps; the expensive component is reused at the second: (4 + 4) / (4 + 1) FLOPs
    assert flop_ideal_speedup(cost, _stats([[[1.0, 1.0]], [[1.0, 0.0]]])) == 8 / 5
    cost = CostModel(component_flops=torch.tensor([[1.0, 3.0]]), other_flops=4.0)  # work outside the components
    assert flop_ideal_speedup(cost, _stats([[[1.0, 1.0]], [[1.0, 0.0]]])) == 16 / 13
    assert flop_ideal_speedup(cost, None) is None


def test_warnings_for_busy_timings_and_above_ideal_speedups():
    quiet = {"e2e_spread": spread([1.0, 1.02, 0.99]), "transformer_spread": 0.01}
    assert timing_warnings("fora-3", quiet, 1.9, 2.5) == []
    busy = {"e2e_spread": spread([1.0, 2.0, 1.1]), "transformer_spread": 0.01}
    (note,) = timing_warnings("fora-3", busy, 1.9, 2.5)
    assert "varied by 91%" in note
    (note,) = timing_warnings("fora-3", quiet, 3.2, 2.5)
    assert "above its FLOP-ideal 2.50x" in note


@pytest.mark.parametrize("pairing", ["repeat", "neighbours"])
def test_bench_overhead_reports_spread_and_flop_ideal(pairing):
    import json
    import subprocess
    import sys

    args = ["bench", "overhead", "--model", "tiny-pixart", "--batch", "1", "--steps", "4", "--repeats", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffroute", *args, "--plans", "full,fora-2", "--pairing", pairing, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["plans"]
    assert result["pairing"] == pairing and rows["vanilla"]["speedup_transformer"] == 1.0
    assert rows["vanilla"]["flop_ideal_speedup"] == 1.0 and rows["full"]["flop_ideal_speedup"] == 1.0
    assert 1.2 < rows["fora-2"]["flop_ideal_speedup"] < 2  # half the steps' blocks, the rest at every step
    assert all(r["end_to_end_spread"] >= 0 for r in rows.values()) and isinstance(result["timing_warnings"], list)
    for name in ("full", "fora-2"):
        q1, q3 = rows[name]["speedup_transformer_quartiles"]
        if pairing == "neighbours":  # the median of the paired ratios lies within their quartiles
            assert q1 <= rows[name]["speedup_transformer"] <= q3
        assert rows[name]["time_ratio_to_vanilla"] == pytest.approx(1 / rows[name]["speedup_end_to_end"])


def test_bench_compile_pairs_with_eager_vanilla_and_counts_graphs():
    """`bench compile --pairing neighbours` on dynamo's `eager` back-end (graphs are captured, nothing is built, so
    no C compiler is needed)."""
    import json
    import subprocess
    import sys

    args = ["bench", "compile", "--model", "tiny-pixart", "--batch", "1", "--steps", "3", "--repeats", "3"]
    args += ["--backend", "eager", "--dtypes", "float32", "--plans", "fora-2", "--pairing", "neighbours", "--json"]
    proc = subprocess.run([sys.executable, "-m", "diffroute", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = result["tables"]["float32"]
    assert result["pairing"] == "neighbours"
    assert set(rows) == {"eager vanilla", "eager fora-2", "compiled vanilla", "compiled fora-2"}
    assert rows["eager vanilla"]["speedup_transformer_vs_eager_vanilla"] == 1.0
    for name in ("eager fora-2", "compiled vanilla", "compiled fora-2"):
        q1, q3 = rows[name]["speedup_transformer_quartiles"]
        assert q1 <= rows[name]["speedup_transformer_vs_eager_vanilla"] <= q3  # a median of paired ratios
    # dynamo captured graphs at the compiled rows' first calls and none for the eager rows
    assert rows["compiled vanilla"]["first_call_graphs"] > 0 and rows["eager fora-2"]["first_call_graphs"] == 0


def test_neighbour_pairing_cancels_a_drifting_machine(monkeypatch):
    """On a machine that slows down steadily (a shared VM), a ratio against `full` timed once per repeat is biased by
    where each plan sits in the repeat; paired with the `full` runs just before and after, it is exact."""
    import types

    from diffroute.metrics import timing

    work = {"full": 1.0, "half": 0.5, "third": 1 / 3, "quarter": 0.25}  # a plan's time on a steady machine
    clock, runs, current = [0.0], [], [None]
    timer = types.SimpleNamespace(total=0.0)

    def call():  # each run is 10% slower than the one before it
        took = work[current[0]] * (1 + 0.1 * len(runs))
        runs.append(current[0])
        clock[0] += took
        timer.total += took

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    transformer = torch.nn.Linear(1, 1)
    transformer.device = torch.device("cpu")  # what a diffusers ModelMixin has
    pipe = types.SimpleNamespace(transformer=transformer)
    kwargs = dict(
        timer=timer,
        activate=lambda p, plan: current.__setitem__(0, plan),
        deactivate=lambda p: None,
        fraction=lambda p: 1.0,
        repeats=3,
    )
    plans = {name: name for name in work}
    got = timing.time_plans(pipe, plans, call, neighbours="full", **kwargs)
    per_repeat = 2 * (len(work) - 1) + 1
    assert len(runs) == 4 * per_repeat  # warm-up and 3 repeats, full between every two plans
    repeats = [runs[k : k + per_repeat] for k in range(0, len(runs), per_repeat)]
    assert all(set(r[::2]) == {"full"} for r in repeats)  # full on either side of every plan
    assert repeats[1][1::2] != repeats[2][1::2]  # the others rotate
    for name in ("half", "third", "quarter"):
        speed = speedups(got["full"], got[name])
        assert speed["speedup_transformer"] == pytest.approx(1 / work[name], rel=1e-12)
        assert speed["speedup_transformer_quartiles"] == pytest.approx([1 / work[name]] * 2, rel=1e-12)
        assert speed["speedup_end_to_end"] == pytest.approx(1 / work[name], rel=1e-12)
    runs.clear()
    once = timing.time_plans(pipe, plans, call, **kwargs)  # full once per repeat: the drift leaks in
    assert "neighbour_transformer_s" not in once["half"]
    assert abs(speedups(once["full"], once["half"])["speedup_transformer"] - 2) > 0.05  # 1.90 here
    with pytest.raises(ValueError, match="not one of the plans"):
        timing.time_plans(pipe, plans, call, neighbours="vanilla", **kwargs)


def test_paired_speedup_quartiles():
    """Each repeat's ratio pairs a plan with `full` timed in the same round: a slow round slows both, and the
    quartiles are of the ratios, not of separately taken medians."""
    full = [1.0, 2.0, 1.0, 2.0, 1.0]  # the machine halves its speed every other round
    plan = [0.5, 1.0, 0.5, 1.0, 0.4]
    got = paired_speedup_quartiles(full, plan)
    assert got["speedup_transformer_q1"] == got["speedup_transformer_q3"] == 2.0
    assert got["speedup_transformer_quartiles"] == [2.0, 2.0]
    assert paired_speedup_quartiles([1.0], [0.5]) == {}  # one repeat: no spread to show
