"""Train a router for a pipeline: `diffroute train l2c|elastic`, on accelerate (resumable from --out)."""

from __future__ import annotations

import sys

HELP = (
    "train a router (l2c: Learning-to-Cache; gates: per-image LazyDiT gates; elastic: per-sample block skip + MLP "
    "width) on the model's trajectories, "
    "or a changed model on its data (moe: expert-choice MoE; dar, dtr: residual-stream routing; plain: baseline; "
    "fera, lora: domain adapters)"
)


def add_arguments(p) -> None:
    from diffroute.cli.common import COUNT, FRACTION, NONNEGATIVE, POSITIVE, float_in, int_in

    sub = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    from diffroute.training.methods import METHODS

    l2c = sub.add_parser("l2c", help=METHODS["l2c"].help)
    _add_common(l2c)
    l2c.add_argument("--lam", type=NONNEGATIVE, help="weight of the compute penalty sum(beta) (default %(default)s)")
    l2c.add_argument(
        "--threshold", type=float_in(0, 1, True, True), help="compute where beta > this (default %(default)s)"
    )
    l2c.add_argument(
        "--no-alternate",
        dest="alternate",
        action="store_false",
        help="route every step after the first (default: as the paper, even steps compute everything)",
    )
    l2c.add_argument("--iters", type=COUNT, help="training iterations (default %(default)s)")
    l2c.add_argument("--batch", type=COUNT, help="recorded batches per iteration (default %(default)s)")
    l2c.add_argument(
        "--lr",
        type=POSITIVE,
        help="AdamW learning rate (default %(default)s) start in 300 iterations)",
    )

    gates = sub.add_parser("gates", help=METHODS["gates"].help)
    _add_common(gates)
    gates.add_argument(
        "--rho", type=NONNEGATIVE, help="weight of the FLOP share the gated components compute (default %(default)s)"
    )
    gates.add_argument(
        "--threshold", type=float_in(0, 1, True, True), help="compute where m >= this (default %(default)s)"
    )
    gates.add_argument(
        "--per-prompt", action="store_true", help="decide both CFG rows of a sample together (default: per row)"
    )
    gates.add_argument("--iters", type=COUNT, help="trajectories rolled out in training (default %(default)s)")
    gates.add_argument("--batch", type=COUNT, help="recorded batches per iteration (default %(default)s)")
    gates.add_argument("--lr", type=POSITIVE, help="AdamW learning rate (default %(default)s)")
    gates.add_argument("--pooling", choices=("sum", "mean"), help="over tokens: sum is LazyDiT's (default %(default)s)")
    gates.add_argument("--init", metavar="PLAN", help="start from this static plan's schedule (e.g. emoji:l2c)")
    gates.add_argument(
        "--cross-attention", action="store_true", help="gate cross-attention too (LazyDiT gates attention and MLP)"
    )
    gates.add_argument(
        "--level",
        choices=("component", "block"),
        help="a gate per component (LazyDiT) or per block, a skipped block reusing its residual (default %(default)s)",
    )
    gates.add_argument(
        "--rollout",
        choices=("student", "recorded", "image"),
        help="student: the student's own latents, target the full model on them (HarmoniCa); recorded: the full "
        "trajectory's (teacher forcing); image: the final latents' error vs the full model's from the same noise, "
        "backpropagated through every step (default %(default)s)",
    )
    gates.add_argument(
        "--weight-lr-scale",
        type=NONNEGATIVE,
        metavar="S",
        help="the gate weights' learning rate as a multiple of --lr (0: only the biases train, a learned static "
        "plan; default %(default)s)",
    )
    gates.add_argument(
        "--iepo-every",
        type=int_in(0, 10**6),
        metavar="N",
        help="weight each step's loss by HarmoniCa's image-error proxy, refreshed every N iterations (T generations "
        "each; default %(default)s: equal weights)",
    )

    elastic = sub.add_parser("elastic", help=METHODS["elastic"].help)
    _add_common(elastic)
    elastic.add_argument("--iters", type=COUNT, help="training iterations (default %(default)s)")
    elastic.add_argument("--batch", type=COUNT, help="recorded batches per iteration (default %(default)s)")
    elastic.add_argument("--lr", type=POSITIVE, help="the router's learning rate (default %(default)s)")
    elastic.add_argument("--finetune", action="store_true", help="fine-tune the transformer too (a model variant)")
    elastic.add_argument("--backbone-lr", type=POSITIVE, help="the transformer's rate (default %(default)s)")
    elastic.add_argument("--r-clean", type=FRACTION, help="blocks kept at t = 0 (default %(default)s)")
    elastic.add_argument("--r-noisy", type=FRACTION, help="blocks kept at the noisiest t (default %(default)s)")
    elastic.add_argument("--width-target", type=FRACTION, help="mean MLP width of kept blocks (0.75)")

    for name, parser in (("l2c", l2c), ("gates", gates), ("elastic", elastic)):
        parser.set_defaults(**METHODS[name].defaults())  # the config dataclass holds every default
    from diffroute.cli import train_data

    train_data.add_parsers(sub)
    train_data.add_partition_parser(sub)


def _add_common(p) -> None:
    from diffroute.cli.common import COUNT, add_model_arguments, add_prompt_arguments

    add_model_arguments(p)
    add_prompt_arguments(p, "training", 64, " (default for emoji: training captions, never held-out)")
    p.add_argument("--prompts-per-batch", type=COUNT, help="prompts per recorded batch (default %(default)s)")
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
    from diffroute.training.methods import METHODS
    from diffroute.utils.fingerprint import digest

    if args.method == "partition":
        from diffroute.cli import train_data

        return train_data.run_partition(args)
    method = METHODS[args.method]
    if method.kind == "data":
        from diffroute.cli import train_data

        return train_data.run(args)
    # every number was checked by its argparse type (common.COUNT, POSITIVE, FRACTION, ...)
    ship = _check_ship(args) if args.ship is not None else None
    from diffroute.zoo.registry import model_family

    default = calibration_prompts(args.model, args.n) if model_family(args.model) == "emoji" else []
    prompts = read_prompts(args, default)[: args.n]
    cfg = method.make_config(args)  # (its checks refuse bad settings before the run folder is made)
    out = check_run_dir(args.out)
    settings = {"method": args.method, "model": args.model, "steps": args.steps, "guidance": args.guidance}
    check_resume(
        out, {**settings, "seed": args.seed, "prompts": digest(prompts), **asdict(cfg)}, f"train {args.method}"
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    summary = method.train(pipe, prompts, call_kwargs(pipe, args), cfg, out, accelerator)
    _report(args.method, summary, out, accelerator)
    summary["out"] = str(out)
    if ship and accelerator.is_main_process:
        from diffroute.zoo.shipped import install_model_variant, install_router

        model = args.model
        if getattr(args, "finetune", False):  # the router needs its fine-tuned backbone: a zoo variant MODEL-NAME
            model = install_model_variant(out / "model", f"{args.model}-{ship}", base=args.model, method="elastic")
        summary["shipped_as"] = install_router(out / "router", model, ship)
    return summary if accelerator.is_main_process else None


def _report(method: str, summary: dict, out, accelerator) -> None:
    """One line on stderr about the trained router (main process)."""
    if not accelerator.is_main_process:
        return
    line = f"{method}: router in {out / 'router'}"
    if "computed_fraction" in summary and "routed_steps_computed_fraction" in summary:
        line = (
            f"{method}: lambda {summary['lambda']:g}: computes {summary['computed_fraction']:.1%} of components "
            f"({summary['routed_steps_computed_fraction']:.1%} on routed steps); router in {out / 'router'}"
        )
    print(line, file=sys.stderr)


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
