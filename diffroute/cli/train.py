"""Train a router for a pipeline: `diffroute train l2c|elastic`, on accelerate (resumable from --out)."""

from __future__ import annotations

import sys

HELP = (
    "train a router (l2c: Learning-to-Cache; elastic: per-sample block skip + MLP width) on the model's trajectories, "
    "or a changed model on its data (moe: expert-choice MoE; dar, dtr: residual-stream routing; plain: baseline; "
    "fera, lora: domain adapters)"
)


def add_arguments(p) -> None:
    from diffroute.cli.common import COUNT, FRACTION, NONNEGATIVE, POSITIVE, float_in

    sub = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    l2c = sub.add_parser("l2c", help="Learning-to-Cache: per-step logits deciding which components may reuse")
    _add_common(l2c)
    l2c.add_argument(
        "--lam", type=NONNEGATIVE, default=1e-3, help="weight of the compute penalty sum(beta) (default 1e-3)"
    )
    l2c.add_argument(
        "--threshold", type=float_in(0, 1, True, True), default=0.1, help="compute where beta > this (default 0.1)"
    )
    l2c.add_argument(
        "--no-alternate",
        dest="alternate",
        action="store_false",
        help="route every step after the first (default: as the paper, even steps compute everything)",
    )
    l2c.add_argument("--iters", type=COUNT, default=400, help="training iterations (default 400)")
    l2c.add_argument("--batch", type=COUNT, default=1, help="recorded batches per iteration (default 1)")
    l2c.add_argument(
        "--lr",
        type=POSITIVE,
        default=0.1,
        help="AdamW learning rate (default 0.1: each iteration trains one step's logits, so a step sees 1/10 of "
        "the updates; the paper's 1e-2 left them near their N(0, 1) start in 300 iterations)",
    )

    elastic = sub.add_parser("elastic", help="Elastic-DiT-style per-sample block skip and MLP-width router")
    _add_common(elastic)
    elastic.add_argument("--iters", type=COUNT, default=1500, help="training iterations (default 1500)")
    elastic.add_argument("--batch", type=COUNT, default=1, help="recorded batches per iteration (default 1)")
    elastic.add_argument("--lr", type=POSITIVE, default=1e-3, help="the router's learning rate (default 1e-3)")
    elastic.add_argument("--finetune", action="store_true", help="fine-tune the transformer too (a model variant)")
    elastic.add_argument("--backbone-lr", type=POSITIVE, default=3e-5, help="the transformer's rate (default 3e-5)")
    elastic.add_argument("--r-clean", type=FRACTION, default=0.9, help="blocks kept at t = 0 (default 0.9)")
    elastic.add_argument("--r-noisy", type=FRACTION, default=0.5, help="blocks kept at the noisiest t (default 0.5)")
    elastic.add_argument("--width-target", type=FRACTION, default=0.75, help="mean MLP width of kept blocks (0.75)")

    from diffroute.cli import train_data

    train_data.add_parsers(sub)


def _add_common(p) -> None:
    from diffroute.cli.common import COUNT, add_model_arguments, add_prompt_arguments

    add_model_arguments(p)
    add_prompt_arguments(p, "training", 64, " (default for emoji: training captions, never held-out)")
    p.add_argument("--prompts-per-batch", type=COUNT, default=16, help="prompts per recorded batch (default 16)")
    p.add_argument("--bf16", action="store_true", help="autocast training to bfloat16")
    p.add_argument("--out", required=True, help="run folder (checkpointed; rerun the same command to resume)")
    p.add_argument("--ship", default=None, metavar="NAME", help="zoo models only: install the result as MODEL:NAME")
    p.add_argument("--replace", action="store_true", help="with --ship: replace a router of that name shipped before")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def run(args) -> dict | None:
    from dataclasses import asdict

    import torch
    from accelerate import Accelerator

    from diffroute.cli.calibrate import calibration_prompts
    from diffroute.cli.common import call_kwargs, check_resume, check_run_dir, load, read_prompts
    from diffroute.training.elastic import ElasticConfig
    from diffroute.training.l2c import L2CConfig
    from diffroute.utils.fingerprint import digest

    if args.method in ("moe", "dar", "dtr", "plain", "fera", "lora"):
        from diffroute.cli import train_data

        return train_data.run(args)
    # every number was checked by its argparse type (common.COUNT, POSITIVE, FRACTION, ...)
    ship = _check_ship(args) if args.ship is not None else None
    from diffroute.zoo.registry import model_family

    default = calibration_prompts(args.model, args.n) if model_family(args.model) == "emoji" else []
    prompts = read_prompts(args, default)[: args.n]
    out = check_run_dir(args.out)
    cfg = _config_of(L2CConfig if args.method == "l2c" else ElasticConfig, args)
    settings = {"method": args.method, "model": args.model, "steps": args.steps, "guidance": args.guidance}
    check_resume(
        out, {**settings, "seed": args.seed, "prompts": digest(prompts), **asdict(cfg)}, f"train {args.method}"
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    train = _train_l2c if args.method == "l2c" else _train_elastic
    summary = train(pipe, prompts, call_kwargs(pipe, args), cfg, out, accelerator)
    summary["out"] = str(out)
    if ship and accelerator.is_main_process:
        from diffroute.zoo.shipped import install_model_variant, install_router

        model = args.model
        if getattr(args, "finetune", False):  # the router needs its fine-tuned backbone: a zoo variant MODEL-NAME
            model = install_model_variant(out / "model", f"{args.model}-{ship}", base=args.model, method="elastic")
        summary["shipped_as"] = install_router(out / "router", model, ship)
    return summary if accelerator.is_main_process else None


def _config_of(config_class, args):
    """The training config from the arguments of the same names (the dataclass fields)."""
    from dataclasses import fields

    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def _train_elastic(pipe, prompts, kwargs, cfg, out, accelerator) -> dict:
    from diffroute.training.elastic import train_elastic

    summary = train_elastic(pipe, prompts, kwargs, cfg, out, accelerator)
    if accelerator.is_main_process:
        print(f"elastic: router in {out / 'router'}", file=sys.stderr)
    return summary


def _train_l2c(pipe, prompts, kwargs, cfg, out, accelerator) -> dict:
    from diffroute.training.l2c import train_l2c

    summary = train_l2c(pipe, prompts, kwargs, cfg, out, accelerator)
    if accelerator.is_main_process:
        print(
            f"l2c: lambda {cfg.lam:g}: computes {summary['computed_fraction']:.1%} of components "
            f"({summary['routed_steps_computed_fraction']:.1%} on routed steps); router in {out / 'router'}",
            file=sys.stderr,
        )
    return summary


def _check_ship(args) -> str:
    """--ship NAME (and, for a fine-tuned Elastic backbone, the zoo variant MODEL-NAME it needs), before any work."""
    from diffroute.cli.common import check_zoo_model
    from diffroute.zoo.shipped import check_ship

    check_zoo_model(args.model, "--ship")
    model = args.model
    if getattr(args, "finetune", False):
        check_ship("router", model, args.ship)  # the name alone: the variant's name is built from it
        model = check_ship("variant", model, f"{args.model}-{args.ship}", args.replace, method=args.method)
    return check_ship("router", model, args.ship, args.replace)
