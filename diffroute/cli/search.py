"""ECAD: search Pareto-optimal compute schedules for a model with NSGA-II (cost vs quality against full compute)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HELP = "search compute schedules with a genetic algorithm (ECAD, NSGA-II)"
CHECK_PER = ("sample", "prompt", "batch")


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
        nargs="?",
        const="gene",
        choices=["gene", "always"],
        default=None,
        help="one more gene per (step, block): a block whose cells all reuse is reused whole from its residual; "
        "`--whole-blocks always`: every such block is (no gene, as PLAN+blocks runs it; for --fitted: fitted whole, "
        "such a block fits as well and runs no norms or modulation)",
    )
    p.add_argument(
        "--thresholds",
        action="store_true",
        help="three more genes per step: a first-block check threshold (or none) under which each image takes the "
        "step's reuses, above which it computes the step: searched plans that decide per image (block 0 then "
        "computes at every step; a candidate's cost is what its images computed)",
    )
    p.add_argument(
        "--check-per",
        choices=CHECK_PER,  # (core.schedule's, spelled here: --help loads no torch)
        default="prompt",
        help="with --thresholds, what one check decides: each CFG row, an image's two CFG rows together (default), or "
        "the whole batch at once as diffusers' FirstBlockCache does (never splits a batch; an image's decisions then "
        "depend on its batch-mates)",
    )
    p.add_argument(
        "--fitted",
        type=int_in(0, 10**6),
        default=0,
        metavar="K",
        help="fit each candidate's reuses (calibrate --method fit's closed form) on K more prompts, after the --n "
        "scored ones, before scoring it: a front of schedules as they are once fitted (implies --no-forecast; "
        "each candidate costs one more call on K prompts; default 0: scored as plain reuse)",
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
    """Parse, load, call `diffroute.search.run.run_search`, pick and ship: the search itself lives in the library."""
    import diffroute
    from diffroute.cli.calibrate import calibration_prompts
    from diffroute.cli.common import call_kwargs, check_run_dir, load, read_prompts
    from diffroute.search.run import SearchSettings, pick_from, run_search
    from diffroute.zoo import MODELS
    from diffroute.zoo.registry import model_family
    from diffroute.zoo.shipped import ship_front, zoo_seeds

    ship = _parse_ship(args.ship, args.model, args.replace) if args.ship is not None else {}
    default = calibration_prompts(args.model, args.n) if model_family(args.model) == "emoji" else []
    given = read_prompts(args, default)
    prompts = given[: args.n]
    fit_prompts = _fit_prompts(args, given, prompts) if args.fitted else []
    settings = SearchSettings(
        model=args.model,
        steps=args.steps,
        seed=args.seed,
        pop=args.pop,
        generations=args.generations,
        quality=args.quality,
        cost=args.cost,
        forecast=not (args.no_forecast or args.fitted),
        whole_blocks=args.whole_blocks is not None,
        whole_always=args.whole_blocks == "always",
        thresholds=args.thresholds,
        check_per=args.check_per,
        bac=not args.no_bac,
        patience=args.patience,
        budget_minutes=args.budget_minutes,
        features=args.features,
        overwrite=args.overwrite,
        clip_scorer=MODELS[args.model].clip_scorer if args.quality == "clip" and args.model in MODELS else None,
        fit_prompts=fit_prompts,
    )
    settings.check(len(prompts))  # before the model loads or the run folder is made
    out = check_run_dir(args.out)
    pipe = load(args)
    settings.call_kwargs = call_kwargs(pipe, args)
    seeds = zoo_seeds(args.model, diffroute.architecture_map(pipe.transformer), args.steps)
    result = run_search(pipe, prompts, settings, out, seeds=seeds)
    if result is None:  # not rank 0
        return None
    if args.max_cost is not None:
        result["picked"] = pick_from(result, args.max_cost, settings)
    if ship:
        result["shipped"] = ship_front(result, ship, settings)
    if not args.json:
        for r in result["front"]:
            q = f"FD {r['fd']:.3f}, " if "fd" in r else ""
            print(f"{Path(r['file']).name}: cost {r['cost']:.3f}, {q}PSNR {r['psnr']:.2f} dB")
        if "picked" in result:
            print(f"picked for --max-cost {args.max_cost}: {result['picked']}", file=sys.stderr)
    return result


def _fit_prompts(args, given: list[str], scored: list[str]) -> list[str]:
    """The --fitted prompts: the ones given after the --n scored ones (too few is refused), or, with the default
    prompts, more training captions, none of them scored."""
    from diffroute.cli.calibrate import calibration_prompts
    from diffroute.errors import InputError

    if args.prompt or getattr(args, "prompts_file", None):
        if len(given) < args.n + args.fitted:
            raise InputError(
                f"--fitted {args.fitted} fits on the {args.fitted} prompts after the --n {args.n} scored ones: give "
                f"{args.n + args.fitted} prompts (got {len(given)}), or lower --n or --fitted."
            )
        return given[args.n : args.n + args.fitted]
    more = calibration_prompts(args.model, 2 * args.n + args.fitted)  # (a draw of another size: not a prefix)
    return [c for c in more if c not in scored][: args.fitted]


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
