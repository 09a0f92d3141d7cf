"""`diffroute bench reuse`: what a reused denoising step costs against a full one, per model and dtype.

`fora-S` over S steps computes step 0 and reuses every component afterwards (the block still runs its norms,
modulation and gates around the cached outputs); `fora-S+blocks` reuses whole blocks from their residual (nothing of
the block runs); `fora-S+spans` adds the summed residual of all the blocks once (one tensor per step). Fitted
reuse (`core/fitted.py`) is timed on the same schedule with steps 0 and 1 computed (it extrapolates from two stored
residuals) and a weight of 0.5 on every block: per block (two elementwise passes each) and with one weight for the
run of all blocks (`fit_spans`: two passes per step). All are timed step by step on a real pipeline call's inputs,
replayed at S timesteps, beside vanilla diffusers; a reused step's cost is the median of its steps over the median
vanilla step.
"""

from __future__ import annotations

import sys

PROMPTS = ["a red apple", "grinning face", "flag: japan", "a smiling cat"]


def run(args) -> dict:
    from dataclasses import replace

    import torch

    from diffroute.cli.common import call_kwargs, generators, runtime_of
    from diffroute.metrics.step_timing import capture_call
    from diffroute.runtime import load_with

    steps = args.steps or 6
    if steps < 3:
        raise ValueError(f"bench reuse needs --steps 3 or more (fitted reuse computes 2 steps first), got {steps}.")
    repeats = args.repeats or 3
    dtypes = [d.strip() for d in (args.dtypes or "float32,bfloat16").split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = (PROMPTS * ((args.batch + 3) // 4))[: args.batch]
    out = {"device": device, "batch": args.batch, "steps": steps, "repeats": repeats, "rows": []}
    for model in models:
        for dtype in dtypes:
            runtime = replace(runtime_of(args), dtype=dtype, device=device)
            runtime.check()
            pipe = load_with(model, runtime)
            gen = generators(args.seed, len(prompts), pipe.device)
            call_args, kwargs = capture_call(pipe, prompts, call_kwargs(pipe, args), gen)
            out["rows"].append(_time_model(pipe, call_args, kwargs, steps, repeats, model, dtype))
    if not args.json:
        print(f"batch {args.batch} prompts, {steps} steps, median of {repeats} after a warm-up, on {device}")
        print(
            "| model | dtype | rows per call | full / vanilla | all-reuse step / full | block-reuse step / full "
            "| one-residual step / full | fitted block-reuse step / full | fitted one-run step / full |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in out["rows"]:
            print(
                f"| {r['model']} | {r['dtype']} | {r['rows_per_call']} | {r['full_over_vanilla']:.3f} | "
                f"{100 * r['component_reuse_step_vs_full']:.1f}% | {100 * r['block_reuse_step_vs_full']:.1f}% | "
                f"{100 * r['span_reuse_step_vs_full']:.1f}% | {100 * r['fitted_block_reuse_step_vs_full']:.1f}% | "
                f"{100 * r['fitted_span_reuse_step_vs_full']:.1f}% |"
            )
    return out


def _time_model(pipe, call_args: tuple, kwargs: dict, steps: int, repeats: int, model: str, dtype: str) -> dict:
    """Replay the captured call at `steps` timesteps under vanilla, full, fora-S, its +blocks and +spans, and the
    fitted ones."""
    from dataclasses import replace

    import torch

    from diffroute.core.arch import architecture_map
    from diffroute.metrics.step_timing import summarize, time_steps
    from diffroute.search.cost import count_flops

    transformer, t0 = pipe.transformer, kwargs["timestep"]
    # made before the timing: a fresh tensor per call cost ~0.2 ms on the CPU, ~1% of a full step on the emoji model
    timesteps = [torch.full_like(t0, t) for t in torch.linspace(999, 0, steps).tolist()]

    def call_step(i: int) -> None:
        transformer(*call_args, **dict(kwargs, timestep=timesteps[i]))

    arch = architecture_map(transformer)
    cost = count_flops(transformer, arch, call_args, kwargs)
    reuse, blocks, spans = f"fora-{steps}", f"fora-{steps}+blocks", f"fora-{steps}+spans"
    plans = {"vanilla": None, "full": "full", reuse: reuse, blocks: blocks, spans: spans}
    fitted = _fitted(arch, steps)
    plans.update({f"{blocks} fitted": fitted, f"{spans} fitted": replace(fitted, fit_spans=True)})
    print(f"{model} {dtype}: timing {list(plans)} x {repeats} repeats...", file=sys.stderr, flush=True)
    table = summarize(time_steps(transformer, plans, call_step, steps, repeats=repeats), cost)
    return {
        "model": model,
        "dtype": dtype,
        "rows_per_call": int(t0.shape[0]) if t0.ndim else 1,
        "full_over_vanilla": table["full"]["transformer_s"] / table["vanilla"]["transformer_s"],
        "component_reuse_step_vs_full": table[reuse]["reuse_step_vs_full"],
        "block_reuse_step_vs_full": table[blocks]["reuse_step_vs_full"],
        "span_reuse_step_vs_full": table[spans]["reuse_step_vs_full"],
        "fitted_block_reuse_step_vs_full": table[f"{blocks} fitted"]["reuse_step_vs_full"],
        "fitted_span_reuse_step_vs_full": table[f"{spans} fitted"]["reuse_step_vs_full"],
        "plans": table,
    }


def _fitted(arch, steps: int):
    """`fora-S+blocks` with steps 0 and 1 computed and every reuse fitted with w = 0.5 (a = 1.5, c = -0.5)."""
    from dataclasses import replace

    import torch

    from diffroute.core.schedule import Schedule

    schedule = Schedule.fora(arch, steps, steps, warmup=2).with_block_reuse(arch.present())
    fit = torch.zeros(*schedule.compute.shape[:2], schedule.compute.shape[2] + 1, 2, dtype=torch.float64)
    fit[..., 0], fit[..., 1] = 1.5, -0.5
    return replace(schedule, fit=fit)
