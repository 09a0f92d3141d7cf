"""ECAD: search Pareto-optimal compute schedules for a model with NSGA-II (cost vs quality against full compute)."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "search compute schedules with a genetic algorithm (ECAD, NSGA-II)"


def add_arguments(p) -> None:
    from .common import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--prompts-file", help="calibration prompts (default for emoji: training captions, never held-out)")
    p.add_argument("--prompt", action="append", help="a calibration prompt (repeatable)")
    p.add_argument("--n", type=int, default=32, help="calibration prompts (default 32)")
    p.add_argument("--pop", type=int, default=24, help="population size (default 24)")
    p.add_argument("--generations", type=int, default=10, help="generations (default 10)")
    p.add_argument(
        "--quality",
        choices=["fd", "psnr", "clip"],
        default="fd",
        help="quality objective vs full compute: fd (default), psnr, or clip (the model's CLIP score)",
    )
    p.add_argument(
        "--cost",
        choices=["cost", "latency"],
        default="cost",
        help="cost objective: analytic FLOPs (default) or measured transformer latency",
    )
    p.add_argument("--features", default="emoji-clip", help="FD features (default emoji-clip)")
    p.add_argument("--max-cost", type=float, default=None, help="also pick the best schedule within this cost")
    p.add_argument("--out", required=True, help="search folder (checkpointed; rerun to resume)")


def run(args) -> dict | None:
    import torch
    from accelerate import PartialState

    import diffroute
    from diffroute.search.cost import measure_cost
    from diffroute.search.evaluate import ScheduleEvaluator
    from diffroute.search.front import pareto_front, pick, plot_front, save_front
    from diffroute.search.genome import GenomeSpace
    from diffroute.search.nsga import Search, SearchConfig

    from .calibrate import calibration_prompts
    from .common import call_kwargs, load, read_prompts

    if args.pop < 4 or args.generations < 1 or args.n < 2:
        raise ValueError("need --pop >= 4, --generations >= 1 and --n >= 2.")
    default = calibration_prompts(args.model, args.n) if args.model == "emoji" else []
    prompts = read_prompts(args, default)[: args.n]
    out = Path(args.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    arch = diffroute.architecture_map(pipe.transformer)
    kwargs = call_kwargs(pipe, args)
    feature = None
    if args.quality == "fd":
        from diffroute.eval.features import feature_extractor

        feature = feature_extractor(args.features)
    cost = measure_cost(pipe, arch, {k: v for k, v in kwargs.items() if k != "num_inference_steps"})
    scorer = None
    if args.quality == "clip":
        from diffroute.zoo import MODELS

        scorer = MODELS[args.model].clip_scorer if args.model in MODELS else None
        if scorer is None:
            raise ValueError(f"--quality clip needs a model with a CLIP scorer (emoji); {args.model!r} has none.")
    evaluator = ScheduleEvaluator(pipe, prompts, args.seed, kwargs, cost, feature, clip_scorer=scorer)
    space = GenomeSpace(arch, args.steps)
    cfg = SearchConfig(
        pop_size=args.pop, generations=args.generations, seed=args.seed, quality=args.quality, cost=args.cost
    )
    search = Search(space, evaluator, cfg, out, state)
    search.run()
    if not state.is_main_process:
        return None
    records = search.archive()
    front = pareto_front(records, args.quality, args.cost)
    settings = {
        "model": args.model,
        "steps": args.steps,
        "calibration_prompts": len(prompts),
        "pop": args.pop,
        "generations": args.generations,
        "quality_objective": args.quality,
        "cost_objective": args.cost,
        "features": args.features,
    }
    paths = save_front(front, space, out, settings)
    plot_front(
        records,
        front,
        args.quality,
        args.cost,
        out / "front.png",
        f"{args.model}: {len(records)} schedules evaluated, {len(front)} on the front",
    )
    result = {
        "out": str(out),
        "evaluated": len(records),
        "front": [{k: v for k, v in r.items() if k != "genome"} | {"file": str(p)} for r, p in zip(front, paths)],
    }
    if args.max_cost is not None:
        i = pick(front, args.max_cost, args.quality, args.cost)
        result["picked"] = None if i is None else str(paths[i])
    if not args.json:
        for r in result["front"]:
            q = f"FD {r['fd']:.3f}, " if "fd" in r else ""
            print(f"{Path(r['file']).name}: cost {r['cost']:.3f}, {q}PSNR {r['psnr']:.2f} dB")
        if "picked" in result:
            print(f"picked for --max-cost {args.max_cost}: {result['picked']}", file=sys.stderr)
    return result
