"""Generate images with a compute plan, side by side with full compute: images, a grid, speed and fidelity."""

from __future__ import annotations

import sys
from pathlib import Path

from diffroute.cli.common import (
    add_model_arguments,
    add_prompt_arguments,
    call_kwargs,
    check_out_dir,
    check_plans,
    generators,
    int_in,
    load,
    read_prompts,
)
from diffroute.utils.io import atomic_write_json

HELP = "generate images with a plan and compare with full compute"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_prompt_arguments(p, "generation", None)
    p.add_argument(
        "--plan",
        action="append",
        help="plan name (full, fora-N, emoji:fastest, ...) or schedule JSON; repeat it to compare several side by "
        "side (default fora-3)",
    )
    p.add_argument("--no-compare", action="store_true", help="do not also run the full-compute plan")
    p.add_argument("--out", default="outputs/generate", help="output folder (default outputs/generate)")
    p.add_argument(
        "--repeats",
        type=int_in(1, 100),
        default=3,
        help="timed runs per plan, interleaved, after the image run (default 3; medians reported)",
    )


def generate(pipe, plan, prompts: list[str], args, steps: int | None = None):
    """Run `plan` on `prompts` (sample i seeded by args.seed + i); returns (images, stats). Timing is `_time`'s."""
    import diffroute

    diffroute.apply(pipe, plan)
    kwargs = call_kwargs(pipe, args)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    gens = generators(args.seed, len(prompts), pipe.device)
    images = pipe(prompts, generator=gens, output_type="np", **kwargs).images
    return images, pipe.last_stats


def _time(pipe, runs: dict, prompts: list[str], args) -> dict:
    """Medians of `args.repeats` interleaved runs of every plan (the image runs were the warm-up), with their spread
    and each plan's FLOP-ideal transformer speedup."""
    import diffroute
    from diffroute.core.arch import architecture_map
    from diffroute.metrics.timing import time_plans
    from diffroute.search.cost import measure_cost

    kwargs = call_kwargs(pipe, args)
    diffroute.remove(pipe)  # FLOPs of the plain model (a plan fixed to --steps would refuse this 2-step call)
    cost = measure_cost(pipe, architecture_map(pipe.transformer), kwargs)
    pipe.set_progress_bar_config(disable=True)

    def call():
        pipe(prompts, generator=generators(args.seed, len(prompts), pipe.device), output_type="np", **kwargs)

    print(f"timing {list(runs)} x {args.repeats} repeats, interleaved...", file=sys.stderr)
    plans = {n: r["plan"] for n, r in runs.items()}
    return time_plans(pipe, plans, call, repeats=args.repeats, warmup=0, cost=cost)


def run(args) -> dict:
    asked = list(dict.fromkeys(args.plan or ["fora-3"]))  # in order, once each
    plans = asked if args.no_compare or "full" in asked else ["full", *asked]
    check_plans(None, plans, args.steps)  # names, files and step counts first: no model loaded for a typo
    from diffroute.zoo import MODELS

    prompts = read_prompts(args, MODELS[args.model].prompts() if args.model in MODELS else [])
    check_out_dir(args.out)
    import torch

    from diffroute.metrics.fidelity import psnr, ssim
    from diffroute.metrics.timing import timing_warnings
    from diffroute.utils.imageio import grid, save_png, to_pil, to_uint8

    pipe = load(args)
    check_plans(pipe, plans, args.steps)
    pipe.set_progress_bar_config(disable=False, file=sys.stderr, leave=False)
    generate(pipe, "full", prompts[:1], args, steps=2)  # warm-up: the first call pays one-off costs
    out = Path(args.out)
    runs = {}
    for plan in plans:
        images, stats = generate(pipe, plan, prompts, args)
        name = Path(plan).stem if plan.endswith(".json") else plan
        runs[name] = {"plan": plan, "images": images, "pil": to_pil(images), "stats": stats}
        for i, img in enumerate(runs[name]["pil"]):
            save_png(img, out / name / f"{i:03d}.png")
        atomic_write_json(out / name / "stats.json", stats.to_dict())
    timing = _time(pipe, runs, prompts, args)

    result = {"model": args.model, "steps": args.steps, "prompts": prompts, "out": str(out), "plans": {}}
    result["runtime"] = {"device": str(pipe.device), "dtype": str(pipe.transformer.dtype).replace("torch.", "")}
    result["runtime"].update(attention=args.attention, compile=args.compile, threads=torch.get_num_threads())
    result["repeats"] = args.repeats
    full = timing.get("full")
    scorer = MODELS[args.model].clip_scorer if args.model in MODELS else None
    warnings = []
    for name, r in runs.items():
        t = timing[name]
        entry = {
            "end_to_end_s": t["e2e_median_s"],
            "transformer_s": t["transformer_median_s"],
            "end_to_end_spread": t["e2e_spread"],
            "transformer_spread": t["transformer_spread"],
            "computed_fraction": r["stats"].computed_fraction,
            "flop_ideal_speedup": t["flop_ideal"],
            "peak_cache_bytes": r["stats"].peak_cache_bytes,
        }
        speedup = None
        if full is not None and name != "full":
            entry["speedup_end_to_end"] = full["e2e_median_s"] / t["e2e_median_s"]
            entry["speedup_transformer"] = speedup = full["transformer_median_s"] / t["transformer_median_s"]
            entry["psnr_vs_full_db"] = psnr(r["images"], runs["full"]["images"])
            entry["ssim_vs_full"] = ssim(r["images"], runs["full"]["images"])
        if scorer is not None:
            entry["clip_score"] = float(scorer(to_uint8(r["images"]), prompts).mean())
        warnings += timing_warnings(name, t, speedup, t["flop_ideal"])
        result["plans"][name] = entry
    result["timing_warnings"] = warnings
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    save_png(grid([r["pil"] for r in runs.values()], labels=list(runs), scale=4), out / "grid.png")
    atomic_write_json(out / "summary.json", result)
    if not args.json:
        _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    print(f"model {result['model']}, {len(result['prompts'])} prompts, {result['steps']} steps -> {result['out']}")
    for name, e in result["plans"].items():
        line = f"  {name:>10}: {e['end_to_end_s']:.3f} s end-to-end (±{50 * e['end_to_end_spread']:.0f}%), "
        line += f"transformer {e['transformer_s']:.3f} s, "
        line += f"computed {100 * e['computed_fraction']:.1f}%"
        if "speedup_end_to_end" in e:
            line += (
                f", speedup {e['speedup_end_to_end']:.2f}x end-to-end / {e['speedup_transformer']:.2f}x transformer"
                f" (FLOP-ideal {e['flop_ideal_speedup']:.2f}x)"
                f", PSNR vs full {e['psnr_vs_full_db']:.2f} dB, SSIM {e['ssim_vs_full']:.3f}"
            )
        if "clip_score" in e:
            line += f", CLIP score {e['clip_score']:.2f}"
        print(line)
    print(f"  (medians of {result['repeats']} interleaved runs per plan after a warm-up; ± half the range)")
