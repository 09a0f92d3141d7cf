"""Whole-block reuse (`+blocks`, schedule cell `r`): a reused block returns its input plus the residual it added at
its last computation, the mechanism FBCache/DBCache use, for every schedule plan."""

import collections
import inspect
import json

import numpy as np
import pytest
import torch
from conftest import NAMES, STEPS, fresh_pipe, prompts, routed_and_reference, run, run_cli, step_counter
from torch.utils._python_dispatch import TorchDispatchMode

import diffroute
from diffroute.core.arch import architecture_map
from diffroute.core.schedule import Schedule, ScheduleMismatchError
from diffroute.errors import PlanError


def _reference_block_reuse(pipe, every: int, spans: bool = False):
    """FORA-`every` at block level written as plain forward replacements, independent of the executor: at computed
    steps a block runs and keeps output minus input per stream; at other steps it returns input plus that residual.
    With `spans`, where every block's residual is one tensor, the first block returns its input plus the sum of all
    of them (added in block order) and the others their input. A new timestep is a new step; calls at the same
    timestep (true CFG) are branches with residuals of their own. For one pipeline call."""
    state, handle = step_counter(pipe)
    saved = {}
    num_blocks = len(architecture_map(pipe.transformer).blocks)
    for b, block in enumerate(architecture_map(pipe.transformer).blocks):
        signature, forward = inspect.signature(type(block).forward), block.forward

        def replaced(*args, _b=b, _block=block, _sig=signature, _fwd=forward, **kwargs):
            bound = _sig.bind(_block, *args, **kwargs).arguments
            h, e = bound["hidden_states"], bound.get("encoder_hidden_states")
            key = (_b, state["branch"])
            if state["step"] % every == 0:
                out = _fwd(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    saved[key] = out - h
                else:
                    text = None if out[0] is None or e is None or out[0].shape != e.shape else out[0] - e
                    saved[key] = (text, out[1] - h)
                return out
            res = saved[key]
            run = [saved[(j, state["branch"])] for j in range(num_blocks)]
            if spans and all(isinstance(r, torch.Tensor) for r in run):
                if _b > 0:
                    return h
                total = run[0]
                for r in run[1:]:
                    total = total + r
                return h + total
            if isinstance(res, torch.Tensor):
                return h + res
            return (None if res[0] is None else e + res[0], h + res[1])

        block.forward = replaced
    return handle


@pytest.mark.parametrize("spans", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_block_reuse_is_input_plus_stored_residual(name, spans):
    """`+blocks`: each block reused whole adds its own residual; `+spans`: a run of them adds their sum once (the
    three families whose blocks return one tensor; SD3's and FLUX's pairs fall back to block by block)."""
    pipe = fresh_pipe(name)
    plan = "fora-3+spans" if spans else "fora-3+blocks"
    routed, stats, reference = routed_and_reference(pipe, name, plan, lambda p: _reference_block_reuse(p, 3, spans))
    np.testing.assert_array_equal(routed, reference)
    assert stats.computed_fraction == pytest.approx(2 / STEPS)  # steps 0 and 3 of 6 compute


def test_block_reuse_cell_round_trips_and_bad_cells_are_refused(tmp_path):
    arch = architecture_map(fresh_pipe().transformer)
    s = Schedule.fora(arch, 4, 2).with_block_reuse(arch.present())
    assert s.block_reuse[1].all() and not s.block_reuse[0].any() and s.block_pure(arch.present())
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json").to_dict() == s.to_dict()
    assert "rrr" in s.to_dict()["compute"][1]
    d = s.to_dict()
    d["compute"][1] = d["compute"][1].replace("rrr", "r0r", 1)
    with pytest.raises(ScheduleMismatchError, match="mixes r"):
        Schedule.from_dict(d)
    with pytest.raises(ScheduleMismatchError, match="reused as a whole"):
        Schedule(s.compute | True, s.model_class, s.components, {}, None, s.block_reuse)


def test_blocks_suffix_is_refused_where_it_means_nothing():
    with pytest.raises(PlanError, match="does not take"):
        diffroute.resolve_plan("fbcache-0.1+blocks")
    with pytest.raises(PlanError, match="forecasts"):
        diffroute.resolve_plan("taylor-3+blocks")


def test_mixed_schedule_reuses_only_all_reused_blocks_and_counts_every_cell():
    """A schedule where some blocks reuse everything at a step and others only some components: the first are
    reused whole, the second keep their component decisions; stats count the same cells either way."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    s = Schedule.fora(arch, STEPS, 2)
    s.compute[1::2, 0, arch.components.index("attn2")] = True  # block 0 keeps cross-attention on odd steps
    plain = diffroute.resolve_plan(s)
    whole = plain.with_block_reuse()
    assert whole.block_level(arch).tolist() == [False, True]  # only block 1 is ever reused whole
    diffroute.apply(pipe, plain)
    a = run(pipe, name, prompts(name), [0, 1])
    fraction = pipe.last_stats.computed_fraction
    diffroute.apply(pipe, whole)
    b = run(pipe, name, prompts(name), [0, 1])
    assert pipe.last_stats.computed_fraction == pytest.approx(fraction)
    assert np.isfinite(b).all() and not np.array_equal(a, b)  # block 1 now reuses its residual, not its components


def test_blocks_suffix_keeps_a_router_plans_checks():
    plan = diffroute.resolve_plan("emoji:l2c+blocks")
    assert plan.name == "emoji:l2c+blocks" and type(plan).__name__ == "RouterPlan"
    with pytest.raises(PlanError):
        plan.check_call(7)  # trained for 20 steps: still refused at any other count


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_call(pipe, name):
    """Run the pipeline counting the aten ops of each transformer call; returns (one Counter dict per call, images)."""
    per_call, mode = [], _Ops()

    def start(module, args, kwargs):
        mode.counts.clear()
        mode.__enter__()

    def end(module, args, kwargs, out):
        mode.__exit__(None, None, None)
        per_call.append(dict(mode.counts))

    h1 = pipe.transformer.register_forward_pre_hook(start, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(end, with_kwargs=True)
    try:
        images = run(pipe, name, prompts(name), [0, 1])
    finally:
        h1.remove()
        h2.remove()
    return per_call, images


@pytest.mark.parametrize("plan", ["fora-100", "fora-100+blocks", "fora-100+spans"])
def test_reuse_steps_copy_nothing(plan):
    """A reused step hands out the cache's own buffers: no copy of any tensor (copies happen when storing)."""
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    diffroute.apply(pipe, plan)
    per_call, _ = _ops_per_call(pipe, name)
    assert per_call[0].get("aten.copy_", 0) > 0  # the first step stores its outputs (the count can see copies)
    for ops in per_call[1:]:
        assert ops.get("aten.copy_", 0) == 0 and ops.get("aten.clone", 0) == 0
    if plan.endswith(("+blocks", "+spans")):  # a block reused whole runs no norm and no matmul of its own
        assert per_call[1].get("aten.native_layer_norm", 0) == 1  # the output layer's norm only
        assert per_call[1].get("aten.addmm", 0) < per_call[0].get("aten.addmm", 0) / 3


@pytest.mark.parametrize("name", ["pixart-alpha", "dit", "sana"])
def test_a_run_of_blocks_reused_whole_adds_one_residual(name):
    """Under `+spans` the first reused step sums the run's residuals once; later reused steps add one tensor where
    `+blocks` adds one per block. The images differ from `+blocks` only by rounding."""
    pipe = fresh_pipe(name)
    blocks = len(architecture_map(pipe.transformer).blocks)
    counts = {}
    for plan in ("fora-100+blocks", "fora-100+spans"):
        diffroute.apply(pipe, plan)
        per_call, images = _ops_per_call(pipe, name)
        counts[plan] = [ops.get("aten.add", 0) for ops in per_call], images
        diffroute.remove(pipe)
    (per_block, images), (spans, summed) = counts["fora-100+blocks"], counts["fora-100+spans"]
    assert spans[1] == per_block[1]  # the sum takes blocks - 1 adds, its use one
    assert all(s == p - (blocks - 1) for s, p in zip(spans[2:], per_block[2:]))
    np.testing.assert_allclose(summed, images, atol=1e-5)


def _extrapolating_fit(schedule: Schedule) -> torch.Tensor:
    """Fitted weights (1.5, -0.5) for every cell and block of `schedule`: each stand-in reads both stored outputs."""
    fit = torch.zeros(*schedule.compute.shape[:2], schedule.compute.shape[2] + 1, 2, dtype=torch.float64)
    fit[..., 0], fit[..., 1] = 1.5, -0.5
    return fit


@pytest.mark.parametrize("name", ["pixart-alpha", "dit", "sana"])
def test_a_run_fitted_with_one_weight_costs_two_adds(name):
    """Fitted reuse (two residuals stored: steps 0 and 1 compute) costs two adds per block reused whole; with one
    weight per run (`fit_spans`) two for the whole run, once its two sums are made (the first reused step); neither
    copies anything plain reuse does not (DiT clones one tensor of its own per call)."""
    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    blocks = len(arch.blocks)
    schedule = Schedule.fora(arch, STEPS, 100, warmup=2).with_block_reuse(arch.present())
    fit = _extrapolating_fit(schedule)
    adds, copies = {}, {}
    for key, given in (("plain", {}), ("per block", {"fit": fit}), ("one run", {"fit": fit, "fit_spans": True})):
        diffroute.apply(pipe, Schedule(**{**schedule.__dict__, **given}))
        per_call, _ = _ops_per_call(pipe, name)
        diffroute.remove(pipe)
        adds[key] = [ops.get("aten.add", 0) + ops.get("aten.add_", 0) for ops in per_call]
        copies[key] = [ops.get("aten.copy_", 0) + ops.get("aten.clone", 0) for ops in per_call[2:]]
    assert copies["per block"] == copies["one run"] == copies["plain"]
    per_block, one_run, reused = adds["per block"], adds["one run"], range(2, STEPS)
    assert per_block[:2] == one_run[:2]
    assert one_run[2] == per_block[2] - 2 * blocks + 2 * (blocks - 1) + 2  # the two sums made, then two adds
    assert all(one_run[t] == per_block[t] - 2 * (blocks - 1) for t in reused[1:])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fitted", [False, True])
def test_a_reused_block_is_laid_out_as_its_own_output(name, fitted):
    """A block reused whole returns tensors whose dimensions lie in memory in the order of the block's own output,
    whatever its input's layout: PixArt's first block gets a transposed input from the patch embedding, and a
    stand-in laid out as that input would put every later block's adds on the CPU's slow mixed-layout path. (The
    order, not the strides: FLUX's blocks return slices of a longer sequence, their stand-ins dense tensors.)"""
    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 100, warmup=2).with_block_reuse(arch.present())
    if fitted:
        schedule = Schedule(**{**schedule.__dict__, "fit": _extrapolating_fit(schedule)})
    orders = collections.defaultdict(list)  # block -> the dimension order of its output's streams, call by call

    def order(t):  # dimensions from outermost to innermost in memory (size-1 ones have no place)
        return tuple(sorted((d for d in range(t.ndim) if t.shape[d] > 1), key=lambda d: -t.stride(d)))

    def keep(b):
        def hook(module, args, out):
            outs = [o for o in ((out,) if isinstance(out, torch.Tensor) else out) if o is not None]
            orders[b].append(tuple(order(o) for o in outs))

        return hook

    handles = [block.register_forward_hook(keep(b)) for b, block in enumerate(arch.blocks)]
    diffroute.apply(pipe, schedule)
    try:
        run(pipe, name, prompts(name), [0, 1])
    finally:
        diffroute.remove(pipe)
        for h in handles:
            h.remove()
    for b in range(len(arch.blocks)):
        assert len(orders[b]) > 2 and all(o == orders[b][0] for o in orders[b]), (b, orders[b])


def test_bench_reuse_reports_each_reuse_form_on_its_own_schedule():
    """`diffroute bench reuse` (a benchmark: its timings are not asserted) times component, whole-block and
    one-residual reuse steps of the same schedule, each step after step 0 reused."""
    proc_args = ("--steps", "3", "--repeats", "1", "--json")
    proc = run_cli("bench", "reuse", "--models", "tiny-pixart", "--dtypes", "float32", "--batch", "2", *proc_args)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["rows"][0]
    for plan in ("fora-3", "fora-3+blocks", "fora-3+spans"):
        assert (
            row["plans"][plan]["computed_fraction"] == pytest.approx(1 / 3) and row["plans"][plan]["reuse_steps"] == 2
        )
    for plan in ("fora-3+blocks fitted", "fora-3+spans fitted"):  # (steps 0 and 1 computed: two residuals)
        assert (
            row["plans"][plan]["computed_fraction"] == pytest.approx(2 / 3) and row["plans"][plan]["reuse_steps"] == 1
        )
    for key in ("component", "block", "span", "fitted_block", "fitted_span"):
        assert row[f"{key}_reuse_step_vs_full"] > 0
    proc = run_cli("bench", "reuse", "--models", "tiny-pixart", "--steps", "2")
    assert proc.returncode != 0 and "--steps 3 or more" in proc.stderr


def test_spans_keep_a_schedules_own_whole_blocks_and_add_them_elsewhere():
    """A whole-block search's schedule keeps its own choice of blocks reused whole under `+spans`; a schedule with
    none takes every all-reused block as `+blocks` does."""
    from diffroute.plans.base import SchedulePlan

    arch = architecture_map(fresh_pipe().transformer)
    present = arch.present()
    fora = Schedule.fora(arch, STEPS, 3)
    every = fora.with_block_reuse(present).block_reuse
    own = every.clone()
    own[:, 0] = False  # block 0 reuses its components, not the block
    searched = Schedule(fora.compute, fora.model_class, fora.components, {}, fora.forecast, own)
    assert torch.equal(SchedulePlan(searched).with_spans().schedule_at(arch, STEPS).block_reuse, own)
    assert torch.equal(SchedulePlan(fora).with_spans().schedule_at(arch, STEPS).block_reuse, every)
    assert diffroute.resolve_plan("fora-3+spans").collapse_spans and not diffroute.resolve_plan("fora-3").collapse_spans
