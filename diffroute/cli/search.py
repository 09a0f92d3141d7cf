"""ECAD: search Pareto-optimal compute schedules for a model with NSGA-II (cost vs quality against full compute)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HELP = "search compute schedules with a genetic algorithm (ECAD, NSGA-II)"


def add_arguments(p) -> None:
    from diffroute.cli.common import COUNT, FRACTION, add_model_arguments, add_prompt_arguments, int_in

    add_model_arguments(p)
    add_prompt_arguments(p, "calibration", 32, " (default for emoji: training captions, never held-out)")
    p.add_argument("--pop", type=int_in(2, 100_000), default=24, help="population size (default 24)")
    p.add_argument("--generations", type=COUNT, default=10, help="generations (default 10)")
    p.add_argument(
        "--quality",
        choices=["fd", "psnr", "psnr_mean", "clip"],
        default="fd",
        help="quality objective vs full compute: fd (default), psnr (pooled), psnr_mean (mean per-image PSNR, "
        "capped at 60 dB), or clip (the model's CLIP score)",
    )
    p.add_argument(
        "--cost",
        choices=["cost", "latency_model", "latency"],
        default="cost",
        help="cost objective: analytic FLOPs (default), latency_model (a latency table measured on this device "
        "predicts wall-clock; prints predicted vs measured speedups), or latency (measured per candidate, noisy)",
    )
    p.add_argument("--no-forecast", action="store_true", help="two-valued genome: compute or reuse, no forecasts")
    p.add_argument(
        "--whole-blocks",
        action="store_true",
        help="one more gene per (step, block): a block whose cells all reuse is reused whole from its residual",
    )
    p.add_argument("--no-bac", action="store_true", help="do not seed the population with BAC schedules")
    p.add_argument(
        "--patience",
        type=int_in(0, 10**6),
        default=3,
        help="stop after this many generations without hypervolume growth (0: never)",
    )
    p.add_argument(
        "--budget-minutes",
        type=_minutes,
        default=0.0,
        help="stop at the first generation boundary after this many minutes of search, counted across resumes "
        "(default 0: no budget)",
    )
    p.add_argument("--features", default="emoji-clip", help="FD features (default emoji-clip)")
    p.add_argument("--max-cost", type=FRACTION, default=None, help="also pick the best schedule within this cost")
    p.add_argument("--out", required=True, help="search folder (checkpointed; rerun with the same settings to resume)")
    p.add_argument("--overwrite", action="store_true", help="discard a search in --out made with other settings")
    p.add_argument(
        "--ship",
        default=None,
        metavar="NAME=MAXCOST,...",
        help="zoo models only: install the best front member within each cost budget as the shipped schedule "
        "MODEL:NAME (e.g. fast=0.7,faster=0.5,fastest=0.36)",
    )
    p.add_argument("--replace", action="store_true", help="with --ship: replace shipped schedules of those names")


def run(args) -> dict | None:
    import torch
    from accelerate import PartialState

    import diffroute
    from diffroute.cli.calibrate import calibration_prompts
    from diffroute.cli.common import call_kwargs, check_run_dir, load, read_prompts
    from diffroute.search.cost import measure_cost
    from diffroute.search.evaluate import ScheduleEvaluator
    from diffroute.search.front import pareto_front, pick, plot_front, save_front
    from diffroute.search.genome import GenomeSpace
    from diffroute.search.nsga import Search, SearchConfig

    if args.pop < 4 or args.generations < 1 or args.n < 2:
        raise ValueError("need --pop >= 4, --generations >= 1 and --n >= 2.")
    if args.steps < 2:
        raise ValueError("--steps must be at least 2: at one step everything computes, there is nothing to search.")
    ship = _parse_ship(args.ship, args.model, args.replace) if args.ship is not None else {}
    from diffroute.zoo.registry import model_family

    default = calibration_prompts(args.model, args.n) if model_family(args.model) == "emoji" else []
    prompts = read_prompts(args, default)[: args.n]
    out = check_run_dir(args.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    arch = diffroute.architecture_map(pipe.transformer)
    kwargs = call_kwargs(pipe, args)
    feature = None
    if args.quality == "fd":
        from diffroute.metrics.features import feature_extractor

        feature = feature_extractor(args.features)
    _check_resume(args, pipe, prompts, kwargs, out, state)
    cost = measure_cost(pipe, arch, kwargs)
    scorer = None
    if args.quality == "clip":
        from diffroute.zoo import MODELS

        scorer = MODELS[args.model].clip_scorer if args.model in MODELS else None
        if scorer is None:
            raise ValueError(f"--quality clip needs a model with a CLIP scorer (emoji); {args.model!r} has none.")
    latency_model, check = None, None
    if args.cost == "latency_model":
        latency_model, check = _latency_model(pipe, arch, prompts, kwargs, args, state)
    evaluator = ScheduleEvaluator(
        pipe, prompts, args.seed, kwargs, cost, feature, clip_scorer=scorer, latency_model=latency_model
    )
    space = GenomeSpace(arch, args.steps, forecast=not args.no_forecast, whole_blocks=args.whole_blocks)
    cfg = SearchConfig(
        pop_size=args.pop,
        generations=args.generations,
        seed=args.seed,
        quality=args.quality,
        cost=args.cost,
        patience=args.patience,
        budget_minutes=args.budget_minutes,
    )
    seeds = _router_seeds(args.model, arch, args.steps) + (
        [] if args.no_bac else _bac_seeds(pipe, arch, prompts, kwargs, args)
    )
    search = Search(space, evaluator, cfg, out, state, seeds=seeds)
    run = search.run()
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
        "generations_run": run["generation"],
        "hypervolume": run["hypervolume"],
        "search_seconds": round(run["seconds"], 1),
        "stopped_by": run["stopped_by"],
        "latency_model_check": check,
        "front": [{k: v for k, v in r.items() if k != "genome"} | {"file": str(p)} for r, p in zip(front, paths)],
    }
    if args.max_cost is not None:
        i = pick(front, args.max_cost, args.quality, args.cost)
        result["picked"] = None if i is None else str(paths[i])
    if ship:
        from diffroute.zoo.shipped import install_schedule

        result["shipped"] = {}
        for name, max_cost in ship.items():
            i = pick(front, max_cost, args.quality, args.cost)
            if i is None:
                raise ValueError(f"--ship {name}={max_cost}: no front member costs <= {max_cost}; raise the budget.")
            result["shipped"][f"{args.model}:{name}"] = str(install_schedule(paths[i], args.model, name))
    if not args.json:
        for r in result["front"]:
            q = f"FD {r['fd']:.3f}, " if "fd" in r else ""
            print(f"{Path(r['file']).name}: cost {r['cost']:.3f}, {q}PSNR {r['psnr']:.2f} dB")
        if "picked" in result:
            print(f"picked for --max-cost {args.max_cost}: {result['picked']}", file=sys.stderr)
    return result


def _calls(pipe, prompts, kwargs, seed):
    from diffroute.utils.seeding import sample_generators

    def call():
        gens = sample_generators(seed, range(len(prompts)), pipe.device)
        pipe(prompts, generator=gens, output_type="latent", **kwargs)

    return call


def _latency_model(pipe, arch, prompts, kwargs, args, state):
    """Measure the latency table on this device and check it: predicted vs measured transformer speedups of FORA-2,
    FORA-3 and TaylorSeer-3 (printed; the issue's bar is agreement within 10%)."""
    from diffroute.core.schedule import Schedule
    from diffroute.search.cost import measure_latency, transformer_times

    call = _calls(pipe, prompts, kwargs, args.seed)
    model = measure_latency(pipe, arch, call, args.steps)
    checked = {
        "fora-2": Schedule.fora(arch, args.steps, 2),
        "fora-3": Schedule.fora(arch, args.steps, 3),
        "taylor-3": Schedule.fora(arch, args.steps, 3).with_forecasts(),
    }
    times = transformer_times(pipe, {"full": "full", **checked}, call)
    check = {}
    for name, sched in checked.items():
        predicted, measured = 1 / model.relative(sched), times["full"] / times[name]
        check[name] = {"predicted_speedup": predicted, "measured_speedup": measured, "error": predicted / measured - 1}
        if state.is_main_process:
            print(
                f"latency model: {name} predicted {predicted:.2f}x, measured {measured:.2f}x "
                f"({check[name]['error']:+.1%})",
                file=sys.stderr,
            )
    return model, check


def _bac_seeds(pipe, arch, prompts, kwargs, args):
    """BAC schedules from one `full` call on the first 8 calibration prompts (memory: every component output of every
    step is kept for the similarity tables)."""
    import diffroute
    from diffroute.search.bac import bac_schedules, similarity_tables

    diffroute.remove(pipe)
    table = similarity_tables(pipe, arch, _calls(pipe, prompts[:8], kwargs, args.seed), args.steps)
    return bac_schedules(arch, table)


def _router_seeds(model: str, arch, steps: int) -> list:
    """The schedules of the model's shipped L2C routers trained for this step count (a router is a static schedule;
    one trained for another step count or another model is left out)."""
    from diffroute.routers import load_router
    from diffroute.zoo.shipped import shipped_routers

    seeds = []
    for name, folder in shipped_routers().items():
        if name.split(":")[0] != model:
            continue
        router = load_router(folder)
        if not hasattr(router, "schedule"):  # a per-sample router (Elastic) is no static schedule
            continue
        if router.config.num_steps == steps and router.config.model_class == arch.model_class:
            seeds.append(router.schedule())
    return seeds


def _minutes(text: str) -> float:
    """An argparse type: a finite number of minutes >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a time budget: give a finite number of minutes >= 0")
    return value


def _parse_ship(spec: str, model: str, replace: bool = False) -> dict[str, float]:
    """'fast=0.7,faster=0.5' -> {'fast': 0.7, 'faster': 0.5}, checked before the search starts."""
    from diffroute.cli.common import check_zoo_model
    from diffroute.zoo.shipped import check_ship

    check_zoo_model(model, "--ship")
    out = {}
    for item in spec.split(","):
        name, _, cost = (part.strip() for part in item.partition("="))
        try:
            out[name] = float(cost)
        except ValueError:
            out[name] = None
        if out[name] is None or not 0 < out[name] <= 1:
            raise ValueError(f"--ship: {item!r} is not NAME=MAXCOST with a relative cost in (0, 1] (e.g. fast=0.7).")
        check_ship("schedule", model, name, replace)
    return out


def _check_resume(args, pipe, prompts, kwargs, out: Path, state) -> None:
    """Evaluations in --out are reused only if made with the same model, prompts, seeds, steps and objectives (more
    --generations may be asked for: that extends the search)."""
    import shutil

    import diffroute
    from diffroute.utils.fingerprint import check_or_record_all, digest, weights_digest

    if args.overwrite and state.is_main_process:
        for child in out.iterdir():  # everything but the lock this run holds on the folder
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    state.wait_for_everyone()
    fingerprint = {
        "diffroute": diffroute.__version__,
        "model": args.model,
        "weights": weights_digest(pipe),
        "steps": args.steps,
        "seed": args.seed,
        "prompts": digest(prompts),
        "call_kwargs": digest(kwargs),
        "quality": args.quality,
        "cost": args.cost,
        "forecast": not args.no_forecast,
        **({"whole_blocks": True} if args.whole_blocks else {}),  # (settings of earlier runs unchanged)
        "bac": not args.no_bac,
        "features": args.features if args.quality == "fd" else None,
        "pop": args.pop,
    }
    fix = "Use a new --out, or pass --overwrite to discard that search."
    check_or_record_all([(out / "settings.json", fingerprint, "search")], fix, state)
