"""Fitted reuse (`Schedule.fit`, `diffroute calibrate --method fit`): a reused component or block stands in as
`a * newest + c * previous` of its last two computed outputs (a block: residuals, added to its input), with weights
fitted per (step, cell) on the plan's own trajectory."""

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import CALL_KWARGS, NAMES, STEPS, fresh_pipe, prompts, routed_and_reference, run, run_cli, step_counter

import diffroute
from diffroute.core.arch import architecture_map
from diffroute.core.fitted import combine, extrapolation_terms, weights
from diffroute.core.schedule import Schedule, ScheduleMismatchError
from diffroute.errors import PlanError


def _weights(schedule: Schedule) -> torch.Tensor:
    """Distinct weights per (step, block, cell): a = 1 + w, c = -w with w = 0.1 * step + 0.01 * block + 0.001 * cell."""
    steps, blocks, comps = schedule.compute.shape
    t = torch.arange(steps, dtype=torch.float64)[:, None, None]
    b = torch.arange(blocks, dtype=torch.float64)[None, :, None]
    i = torch.arange(comps + 1, dtype=torch.float64)[None, None, :]
    w = 0.1 * t + 0.01 * b + 0.001 * i
    return torch.stack([1 + w, -w], dim=-1)


def _fitted_value(history: list, a: float, c: float, base=None):
    """The stand-in written out per stream: `base + a * newest`, then `+ c * previous` (newest alone with one
    stored); without a base, `a * newest + c * previous`."""

    def one(x, new, old):
        if new is None:
            return None
        out = (new * a if a != 1.0 or old is not None else new) if x is None else x.add(new, alpha=a)
        return out if old is None or c == 0.0 else out.add_(old, alpha=c)

    newest = history[0]
    older = history[1] if len(history) > 1 else None
    if isinstance(newest, torch.Tensor):
        return one(base, newest, older)
    older = older or (None,) * len(newest)
    return tuple(one(x, n, o) for x, n, o in zip(base or (None,) * len(newest), newest, older))


def _reference_fitted_blocks(pipe, every: int, given: torch.Tensor, computed: int = 0):
    """FORA-`every` at block level with fitted weights (the first `computed` steps computed too), as plain forward
    replacements independent of the executor: computed steps keep each block's last two residuals per branch; other
    steps return input + the fitted value."""
    state, handle = step_counter(pipe)
    kept = {}
    for b, block in enumerate(architecture_map(pipe.transformer).blocks):
        signature, forward = inspect.signature(type(block).forward), block.forward

        def replaced(*args, _b=b, _block=block, _sig=signature, _fwd=forward, **kwargs):
            bound = _sig.bind(_block, *args, **kwargs).arguments
            h, e = bound["hidden_states"], bound.get("encoder_hidden_states")
            history = kept.setdefault((_b, state["branch"]), [])
            if state["step"] % every == 0 or state["step"] < computed:
                out = _fwd(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    res = out - h
                else:
                    res = (None if out[0] is None or e is None or out[0].shape != e.shape else out[0] - e, out[1] - h)
                history.insert(0, res)
                del history[2:]
                return out
            a, c = given[state["step"], _b, -1].tolist()
            return _fitted_value(history, a, c, h if isinstance(history[0], torch.Tensor) else (e, h))

        block.forward = replaced
    return handle


@pytest.mark.parametrize("name", NAMES)
def test_fitted_block_reuse_is_input_plus_weighted_residuals(name):
    """Every family: a block reused whole under fitted weights returns its input plus a * its newest residual + c *
    the one before (at steps with only one stored, a * the newest), bit for bit as a plain forward replacement."""
    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 2).with_block_reuse(arch.present())
    fitted = Schedule(**{**schedule.__dict__, "fit": _weights(schedule)})
    routed, stats, reference = routed_and_reference(
        pipe, name, fitted, lambda p: _reference_fitted_blocks(p, 2, _weights(schedule))
    )
    np.testing.assert_array_equal(routed, reference)
    assert stats.computed_fraction == pytest.approx(0.5)
    diffroute.apply(pipe, schedule)  # the weights matter: plain reuse gives other images
    assert not np.array_equal(run(pipe, name, prompts(name), [0, 1]), routed)


@pytest.mark.parametrize("name", NAMES)
def test_a_run_fitted_with_one_weight_is_one_stand_in_equal_to_its_blocks_chained(name, monkeypatch):
    """Every family: with one weight per run of blocks reused whole (`fit_spans`), a run stands in as its input +
    a * its summed newest residuals + c * the summed previous ones (hidden-states-only families: two adds for the
    run; joint blocks block by block), which is the blocks' own fitted stand-ins with that weight, chained, up to
    rounding; its runs take the summed previous residuals where two are stored (counted)."""
    from diffroute.core.cache import FeatureCache

    pipe = fresh_pipe(name)
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 2).with_block_reuse(arch.present())
    tied = schedule.tied(_weights(schedule))
    assert not torch.equal(tied, _weights(schedule))  # (the runs' later blocks take their first block's weight)
    previous_sums = []
    summed = FeatureCache.summed

    def counting(self, keys, batch=None, slot=0):
        out = summed(self, keys, batch, slot)
        previous_sums.append(slot == 1 and out is not None)
        return out

    monkeypatch.setattr(FeatureCache, "summed", counting)
    one_weight = Schedule(**{**schedule.__dict__, "fit": tied, "fit_spans": True})
    routed, stats, reference = routed_and_reference(
        pipe, name, one_weight, lambda p: _reference_fitted_blocks(p, 2, tied)
    )
    np.testing.assert_allclose(routed, reference, atol=2e-5)
    assert stats.computed_fraction == pytest.approx(0.5)
    one_tensor = name not in ("sd3", "flux")  # (joint blocks return two streams: no single summed residual)
    assert any(previous_sums) == one_tensor  # steps 3 and 5 (two residuals stored): the run as one stand-in
    diffroute.apply(pipe, Schedule(**{**schedule.__dict__, "fit": _weights(schedule)}))  # untied: other images
    assert np.abs(run(pipe, name, prompts(name), [0, 1]) - routed).max() > 1e-3


def test_only_the_residuals_a_fitted_reuse_reads_are_kept(monkeypatch):
    """A fitted block reads the last two residuals computed before it: with steps 0-2 computed and 3-5 reused, the
    residual of step 0 is never read and is not kept (each kept one costs a subtraction and a copy); the images are
    those of keeping everything (the reference forward replacement keeps every residual)."""
    from diffroute.core.cache import FeatureCache
    from diffroute.core.deciders import one_of_last_two

    computed = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)[:, None]
    assert one_of_last_two(computed, ~computed).flatten().tolist() == [0, 0, 1, 1, 0, 1, 0, 0, 0, 0]
    pipe = fresh_pipe()
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 100, warmup=3).with_block_reuse(arch.present())
    weights = _weights(schedule)
    kept, put = [], FeatureCache.put

    def counting(self, key, out, step=0):
        kept.append((key, step))
        return put(self, key, out, step)

    monkeypatch.setattr(FeatureCache, "put", counting)
    routed, _, reference = routed_and_reference(
        pipe,
        "pixart-alpha",
        Schedule(**{**schedule.__dict__, "fit": weights}),
        lambda p: _reference_fitted_blocks(p, 100, weights, computed=3),
    )
    assert sorted({step for key, step in kept if key[-1] == "block"}) == [1, 2]
    assert len([k for k in kept if k[0][-1] == "block"]) == 2 * len(arch.blocks)
    np.testing.assert_array_equal(routed, reference)


def test_fit_spans_round_trips_and_refuses_untied_runs(tmp_path):
    arch = architecture_map(fresh_pipe().transformer)
    schedule = Schedule.fora(arch, 4, 2).with_block_reuse(arch.present())
    fitted = Schedule(**{**schedule.__dict__, "fit": schedule.tied(_weights(schedule)), "fit_spans": True})
    loaded = Schedule.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert loaded.fit_spans and torch.equal(loaded.fit, fitted.fit)
    assert "fit_spans" not in Schedule(**{**fitted.__dict__, "fit_spans": False}).to_dict()
    with pytest.raises(ScheduleMismatchError, match="block 1 at step 1 is in the run .* from block 0"):
        Schedule(**{**fitted.__dict__, "fit": _weights(schedule)})
    fitted.save(tmp_path / "runs.json")
    with pytest.raises(PlanError, match="already stand in as one"):
        diffroute.resolve_plan(str(tmp_path / "runs.json") + "+spans")
    d = fitted.to_dict()
    d["fit_spans"] = "yes"
    with pytest.raises(ScheduleMismatchError, match="'fit_spans' must be true or false"):
        Schedule.from_dict(d)


def test_fitting_a_spans_plan_gives_one_weight_per_run_and_refines_the_runs_only():
    """`fit_schedule` on `fora-2+spans`: the schedule carries `fit_spans`, each run's blocks one weight (pooled from
    all of them: not a weight any single block's fit gives), and the refinement trains one weight per run."""
    from diffroute.plans import resolve_plan
    from diffroute.policies.fitting import fit_schedule
    from diffroute.policies.refining import fitted_cells

    pipe = fresh_pipe()
    call = lambda: run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])  # noqa: E731
    spans, _ = fit_schedule(pipe, resolve_plan("fora-2+spans"), call, STEPS)
    blocks, _ = fit_schedule(pipe, resolve_plan("fora-2+blocks"), call, STEPS)
    assert spans.fit_spans and not blocks.fit_spans
    w, reused = spans.fit[..., -1, 1], spans.block_reuse
    assert bool(reused[3].all()) and len(set(w[3].tolist())) == 1 and float(w[3, 0]) != 0.0
    assert float(w[3, 0]) not in blocks.fit[3, :, -1, 1].tolist()
    cells = fitted_cells(spans)
    assert {(t, b) for t, b, i in cells if i == spans.fit.shape[2] - 1} == {(3, 0), (5, 0)}
    assert len(fitted_cells(blocks)) == 2 * reused.shape[1]


def test_fitted_component_reuse_is_the_weighted_last_two_outputs():
    """Component level (PixArt, FORA-2 per component): each reused component returns a * its newest output + c * the
    one before, as forward hooks that replace the components' outputs give it."""
    pipe = fresh_pipe("pixart-alpha")
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 2)
    given = _weights(schedule)
    diffroute.apply(pipe, Schedule(**{**schedule.__dict__, "fit": given}))
    routed = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    diffroute.remove(pipe)
    state, step_handle = step_counter(pipe)
    kept, handles = {}, [step_handle]
    for b, row in enumerate(arch.modules):
        for i, module in enumerate(row):

            def replace_output(module, args, out, _b=b, _i=i):
                history = kept.setdefault((_b, _i), [])
                if state["step"] % 2 == 0:
                    history.insert(0, out)
                    del history[2:]
                    return out
                a, c = given[state["step"], _b, _i].tolist()
                return _fitted_value(history, a, c)

            handles.append(module.register_forward_hook(replace_output))
    try:
        reference = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_array_equal(routed, reference)


def test_unit_weights_are_plain_reuse_bit_for_bit():
    """(a, c) = (1, 0) everywhere is the schedule itself (keeping two outputs per cell changes nothing)."""
    pipe = fresh_pipe("pixart-alpha")
    arch = architecture_map(pipe.transformer)
    schedule = Schedule.fora(arch, STEPS, 3)
    unit = torch.zeros(*schedule.compute.shape[:2], schedule.compute.shape[2] + 1, 2, dtype=torch.float64)
    unit[..., 0] = 1.0
    diffroute.apply(pipe, schedule)
    plain = run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    diffroute.apply(pipe, Schedule(**{**schedule.__dict__, "fit": unit}))
    np.testing.assert_array_equal(run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1]), plain)


def test_least_squares_finds_the_extrapolation_weight_and_pools_over_batches():
    g = torch.Generator().manual_seed(0)
    r0, r1 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    target = r1 + 0.37 * (r1 - r0)
    a, c = weights(*extrapolation_terms([r1, r0], target))
    assert (a, c) == pytest.approx((1.37, -0.37))
    torch.testing.assert_close(combine([r1, r0], a, c), target)
    # a pair output (joint attention): one weight over both streams, None where a stream is absent
    assert weights(*extrapolation_terms([(None, r1), (None, r0)], (None, r1 - 0.5 * (r1 - r0)))) == pytest.approx(
        (0.5, 0.5)
    )
    # summed terms of two halves (two calls, or two CFG branches) are the fit over the whole batch
    noisy = target + 0.3 * torch.randn(4, 8, generator=g)
    halves = [extrapolation_terms([r1[k], r0[k]], noisy[k]) for k in (slice(0, 2), slice(2, 4))]
    pooled = weights(sum(h[0] for h in halves), sum(h[1] for h in halves))
    assert pooled == pytest.approx(weights(*extrapolation_terms([r1, r0], noisy)))
    assert weights(*extrapolation_terms([r1], target)) == (1.0, 0.0)  # one stored output: plain reuse
    assert weights(*extrapolation_terms([r1, r1], target)) == (1.0, 0.0)  # two equal ones: no direction
    assert weights(*extrapolation_terms([r1, r1 + 1e-6], target)) == (1.0, 0.0)  # nearly equal: w far out of range


def test_calibration_fits_every_reuse_on_its_own_trajectory_and_improves_on_plain_reuse():
    """The embedded model, FORA-3 with blocks reused whole, fitted on 8 training captions: each reused (step, block)
    is fitted once (those with one residual stored as plain reuse), and on 8 held-out captions the fitted schedule
    is closer to full compute than plain reuse."""
    from diffroute.data.emoji import calibration_captions
    from diffroute.plans import resolve_plan
    from diffroute.policies.fitting import fit_schedule
    from diffroute.zoo.emoji import heldout_captions

    pipe = diffroute.load_pipeline("emoji")
    pipe.set_progress_bar_config(disable=True)

    def call(captions, seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
        return pipe(captions, num_inference_steps=20, generator=gens, output_type="pt").images

    fitted, summary = fit_schedule(pipe, resolve_plan("fora-3+blocks"), lambda: call(calibration_captions(8), 0), 20)
    w = fitted.fit[..., -1, :]  # the blocks' weights
    reused = fitted.block_reuse
    assert summary["cells_fitted"] == int(reused.sum()) == 13 * 6
    assert bool((w[1:3] == torch.tensor([1.0, 0.0], dtype=torch.float64)).all())  # steps 1, 2: one residual so far
    torch.testing.assert_close(w[reused].sum(1), torch.ones(len(w[reused]), dtype=torch.float64))  # a + c = 1
    assert bool((w[4:][reused[4:]][:, 1] != 0).all())

    held_out = heldout_captions(8)
    diffroute.remove(pipe)
    full = call(held_out, 100)

    def psnr(images):
        mse = ((images - full) ** 2).flatten(1).mean(1)
        return float((10 * torch.log10(1 / mse)).mean())

    pipe.enable_cache("fora-3+blocks")
    plain = psnr(call(held_out, 100))
    pipe.enable_cache(fitted)
    assert psnr(call(held_out, 100)) > plain + 0.2


def test_fitted_schedule_round_trips_and_is_refused_where_it_does_not_apply(tmp_path):
    arch = architecture_map(fresh_pipe().transformer)
    schedule = Schedule.fora(arch, 4, 2)
    fitted = Schedule(**{**schedule.__dict__, "fit": _weights(schedule)})
    fitted.save(tmp_path / "f.json")
    assert torch.equal(Schedule.load(tmp_path / "f.json").fit, fitted.fit)
    d = fitted.to_dict()
    d["fit"][1][0][0] = [1.0]
    with pytest.raises(ScheduleMismatchError, match="'fit' must be a 4x2x4x2 nested list"):
        Schedule.from_dict(d)
    for bad in ([1.0, True], [1.0, 1e300], [float("nan"), 0.0]):
        d["fit"][1][0][0] = bad
        with pytest.raises(ScheduleMismatchError, match=r"'fit' must be .* numbers in \[-100, 100\]"):
            Schedule.from_dict(d)
    with pytest.raises(ScheduleMismatchError, match="each a number in"):
        Schedule(**{**fitted.__dict__, "fit": fitted.fit * 1e3})
    with pytest.raises(ScheduleMismatchError, match="not both"):
        Schedule(**{**fitted.__dict__, "check": (float("inf"),) * 4})
    with pytest.raises(ScheduleMismatchError, match="fitted at 4 steps, not 6"):
        fitted.resample(6)
    pipe = fresh_pipe()
    diffroute.apply(pipe, str(tmp_path / "f.json"))
    with pytest.raises(ScheduleMismatchError, match="--method fit --steps 6"):  # before any step runs
        pipe("a red apple", num_inference_steps=6, height=16, width=16, output_type="np")
    for suffix in ("+blocks", "+spans"):
        with pytest.raises(PlanError, match="fitted reuse weights"):
            diffroute.resolve_plan(str(tmp_path / "f.json") + suffix)


def test_calibrate_cli_writes_a_fitted_schedule_and_refuses_what_it_cannot_fit(tmp_path):
    out = tmp_path / "fitted.json"
    tiny = ["--model", "tiny-pixart", "--steps", "6", "--prompt", "a red apple", "--prompt", "a smiling cat"]
    r = run_cli("calibrate", "--method", "fit", *tiny, "--plan", "fora-2+blocks", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    schedule = Schedule.load(out)
    assert result["cells_fitted"] == int(schedule.block_reuse.sum()) > 0
    assert schedule.provenance["fitted_from"] == "fora-2+blocks" and schedule.num_steps == 6
    r = run_cli("generate", "--model", "tiny-pixart", "--plan", out, "--steps", "6", "--prompt", "a red apple",
                "--out", tmp_path / "gen", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    for args, message in [
        (["--plan", "fora-2"], "needs --plan PLAN"),  # no --out
        (["--out", tmp_path / "x.json"], "needs --plan PLAN"),
        (["--plan", "fbcache-0.1", "--out", tmp_path / "x.json"], "not a static schedule"),
        (["--plan", "full", "--out", tmp_path / "x.json"], "no reuse to fit"),
        (["--plan", "fora-2", "--out", tmp_path / "x.json", "--ship", "Bad Name"], "--ship"),
        (["--plan", "fora-2", "--out", tmp_path / "x.json", "--refine", "-1"], "--refine EPOCHS"),
        (["--plan", "fora-2", "--out", tmp_path / "x.json", "--refine", "2", "--refine-lr", "0"], "--refine-lr"),
    ]:
        r = run_cli("calibrate", "--method", "fit", *tiny, *args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.json").exists()


def test_cache_keeping_the_graph_holds_the_outputs_themselves_newest_first():
    from diffroute.core.cache import FeatureCache

    cache = FeatureCache(history=2, keep_graph=True)
    x = torch.ones(2, 3, requires_grad=True)
    outs = [x * k for k in (1.0, 2.0, 3.0)]
    for step, out in enumerate(outs):
        cache.put("k", out, step)
    newest, previous = cache.outputs("k", 2)
    assert newest is outs[2] and previous is outs[1]  # no copies: autograd reaches x through both
    (newest + previous).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 5.0))


def test_refinement_gradient_is_the_final_images_derivative_in_each_weight():
    """The gradient a refinement step takes, through the whole sampling loop and the cached outputs, against central
    finite differences of the final latents (tiny PixArt in float64; the scheduler steps in float32, so the
    differences use a wide step and a loose tolerance)."""
    from diffroute.plans import resolve_plan
    from diffroute.policies.fitting import fit_schedule
    from diffroute.policies.refining import _Refining, fitted_cells

    pipe = fresh_pipe("pixart-alpha").to(torch.float64)
    pipe.transformer.requires_grad_(False)
    kwargs = dict(CALL_KWARGS["pixart-alpha"], num_inference_steps=8)

    def call(grad=False):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        run = pipe.call_with_grad if grad else pipe
        return run(prompts("pixart-alpha"), generator=gens, output_type="latent", **kwargs).images

    fitted, _ = fit_schedule(pipe, resolve_plan("fora-2"), call, 8)
    cells = fitted_cells(fitted)
    w = torch.tensor([-fitted.fit[t, b, i, 1].item() for t, b, i in cells], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(call().shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    diffroute.apply(pipe, _Refining(fitted, cells, w))
    (call(grad=True) * probe).sum().backward()
    largest = w.grad.abs().argsort(descending=True)[:4].tolist()
    assert {cells[k][0] for k in largest} != {max(t for t, _, _ in cells)}  # not only the last step's weights
    for k in largest:
        diffs = []
        for e in (2e-2, -2e-2):
            with torch.no_grad():
                w[k] += e
                diffs.append(float((call() * probe).sum()))
                w[k] -= e
        assert (diffs[0] - diffs[1]) / 4e-2 == pytest.approx(float(w.grad[k]), rel=0.1, abs=2e-3), cells[k]


def test_calibrate_cli_refines_the_fitted_weights_on_the_final_image(tmp_path):
    """`--refine EPOCHS`: the greedy weights trained on the final image; the kept ones lower the loss on the
    calibration prompts below the greedy fit's, and the file holds them as extrapolations (a + c = 1)."""
    out = tmp_path / "refined.json"
    tiny = ["--model", "tiny-pixart", "--steps", "6", "--prompt", "a red apple", "--prompt", "a smiling cat"]
    args = ["--plan", "fora-2", "--refine", "3", "--refine-batch", "1", "--refine-lr", "0.05", "--out", out, "--json"]
    r = run_cli("calibrate", "--method", "fit", *tiny, *args, "--refine-loss", "per-image")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    history = result["loss_per_epoch"]
    assert len(history) == 4 and result["loss_greedy"] == history[0] and result["loss"] == "per-image"
    assert result["kept_epoch"] > 0 and result["loss_refined"] == min(history) < history[0]
    schedule = Schedule.load(out)
    assert schedule.provenance["refined_epochs"] == 3 and schedule.provenance["refined_loss"] == "per-image"
    fitted = (schedule.fit[..., 0] != 1.0) | (schedule.fit[..., 1] != 0.0)
    assert int(fitted.sum()) == result["cells_refined"] > 0
    torch.testing.assert_close(schedule.fit[fitted].sum(-1), torch.ones(int(fitted.sum()), dtype=torch.float64))
    # the default loss also watches the pooled error: both prompts in one batch, so the pooled term sees them together
    args[args.index("--refine-batch") + 1] = "2"
    args[args.index("--out") + 1] = tmp_path / "pooled.json"
    r = run_cli("calibrate", "--method", "fit", *tiny, *args)
    assert r.returncode == 0, r.stderr
    pooled = json.loads(r.stdout)
    assert pooled["loss"] == "per-image+pooled" and pooled["loss_refined"] == min(pooled["loss_per_epoch"])
    assert pooled["loss_greedy"] != result["loss_greedy"]  # another objective, the same greedy weights
    assert Schedule.load(tmp_path / "pooled.json").provenance["refined_loss"] == "per-image+pooled"


def test_the_pooled_refinement_loss_weighs_the_largest_errors():
    """Two images, one far worse than the other: halving the bad image's error lowers `per_image_and_pooled` more
    than halving the good one's, while `per_image` cannot tell the two apart (each halving is -log10 2 / 2)."""
    from diffroute.policies.refining import LOSSES, log_error

    target = torch.zeros(2, 4)
    errors = torch.tensor([[1.0], [0.01]]).expand(2, 4)  # per-image MSEs 1 and 1e-4

    def after(scale):  # latents whose per-image MSEs are multiplied by `scale`
        return errors * scale.sqrt().unsqueeze(1)

    bad_halved, good_halved = after(torch.tensor([0.5, 1.0])), after(torch.tensor([1.0, 0.5]))
    per_image, pooled = LOSSES["per-image"], LOSSES["per-image+pooled"]
    assert per_image(bad_halved, target) == pytest.approx(float(per_image(good_halved, target)), abs=1e-6)
    assert pooled(bad_halved, target) < pooled(good_halved, target) - 0.2
    mse = torch.tensor([1.0, 1e-4]) + 1e-12
    assert pooled(errors, target) == pytest.approx(float(torch.log10(mse).mean() + torch.log10(mse.mean())))
    assert per_image(errors, target) == pytest.approx(float(log_error(errors, target).mean()))
