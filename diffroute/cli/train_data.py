"""`diffroute train moe|dar|dtr|plain|fera|lora`: variants of the emoji transformer trained on its data (thin
parsing; the training lives in `diffroute.routers`)."""

from __future__ import annotations

import sys

HELPS = {
    "moe": "upcycle the FFNs into expert-choice MoE and fine-tune (or a dense / pruned baseline)",
    "dar": "DAR: blocks read a timestep-adaptive mixture of all earlier outputs (retrofit fine-tune or from scratch)",
    "dtr": "DTR: timestep-dependent channel windows (from scratch by default)",
    "plain": "the baseline: the same training without any change (fine-tune or from scratch)",
    "fera": "FeRA: LoRA experts routed by the latent's frequency-band energies, adapting to a domain (Symbola)",
    "lora": "the adaptation baseline: one peft LoRA on the same attention projections",
}
ADAPTERS = ("fera", "lora")


def add_parsers(sub) -> None:
    from diffroute.cli.common import COUNT, FRACTION, NONNEGATIVE, POSITIVE, add_model_arguments, float_in, int_in

    for method, text in HELPS.items():
        p = sub.add_parser(method, help=text)
        add_model_arguments(p)
        p.add_argument("--iters", type=COUNT, default=1000, help="training steps (default 1000)")
        p.add_argument("--batch-size", type=COUNT, default=64, help="global batch (default 64)")
        p.add_argument("--lr", type=POSITIVE, default=1e-4, help="peak learning rate (default 1e-4)")
        p.add_argument(
            "--ema-decay", type=float_in(0, 1, high_open=True), default=0.999, help="EMA of the weights (default 0.999)"
        )
        p.add_argument(
            "--train-images", type=int_in(0, 10**9), default=0, help="the first N training images only (0: all)"
        )
        p.add_argument("--fp32", dest="bf16", action="store_false", help="train in float32 (default: bf16 autocast)")
        p.add_argument(
            "--domain",
            choices=("emoji", "symbola"),
            default="symbola" if method in ADAPTERS else "emoji",
            help="training images: emoji (the model's own) or symbola (monochrome glyphs); default emoji, symbola "
            "for fera and lora",
        )
        p.add_argument(
            "--snapshots",
            type=int_in(0, 10**6),
            default=0,
            help="also save the model N times along the way, as OUT/snapshots/step-N (learning curves; default 0)",
        )
        p.add_argument("--out", required=True, help="run folder (checkpointed; rerun the same command to resume)")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        if method == "moe":
            _moe_arguments(p)
        elif method in ADAPTERS:
            rank = 4 if method == "fera" else 12
            note = "per expert" if method == "fera" else "the parameters of 3 FeRA experts of rank 4"
            p.add_argument("--rank", type=int_in(1, 1024), default=rank, help=f"LoRA rank (default {rank}: {note})")
            scale = "1, the paper's" if method == "fera" else "rank / 4, FeRA's alpha / rank"
            p.add_argument("--alpha", type=POSITIVE, default=None, help=f"LoRA alpha (default {scale})")
            if method == "fera":
                p.add_argument("--num-experts", type=int_in(1, 64), default=3, help="LoRA experts (default 3)")
                p.add_argument("--fecl", type=NONNEGATIVE, default=0.1, help="consistency loss weight (default 0.1)")
                p.add_argument(
                    "--balance",
                    type=NONNEGATIVE,
                    default=0.0,
                    help="load-balancing weight on the batch's mean routing weights (not in the paper; default 0)",
                )
        else:
            default = "scratch" if method == "dtr" else "shipped"
            p.add_argument(
                "--init",
                choices=("shipped", "scratch"),
                default=default,
                help=f"start from the shipped weights or from scratch (default {default})",
            )
        if method == "dar":
            p.add_argument(
                "--mode",
                choices=("retrofit", "scratch"),
                default="retrofit",
                help="retrofit: the residual stream at initialisation (default); scratch: plain mixture",
            )
            p.add_argument(
                "--query",
                choices=("static", "static+t", "dynamic"),
                default="static+t",
                help="the aggregation queries (default static+t)",
            )
        if method == "dtr":
            p.add_argument("--beta", type=FRACTION, default=0.8, help="share of channels active (default 0.8)")
            p.add_argument("--alpha", type=POSITIVE, default=4.0, help="window slide exponent (default 4)")


def _moe_arguments(p) -> None:
    from diffroute.cli.common import NONNEGATIVE, float_in, int_in

    p.add_argument(
        "--variant",
        choices=("moe", "dense", "pruned"),
        default="moe",
        help="moe (default); dense: the dense model fine-tuned the same; pruned: magnitude-pruned FFNs",
    )
    p.add_argument("--num-experts", type=int_in(1, 64), default=6, help="routed experts (default 6)")
    p.add_argument(
        "--shared", type=int_in(0, 64), default=2, help="hidden-unit slices of the shared expert (default 2)"
    )
    p.add_argument(
        "--capacity",
        default="static:2",
        help="k(t), routed experts per token: static:K, clean:KMIN-KMAX, noise:KMIN-KMAX, table:K0,K1..",
    )
    p.add_argument("--dense-until", type=float_in(0, 1), default=0.2, help="share of steps trained dense (default 0.2)")
    p.add_argument(
        "--sparse-from", type=float_in(0, 1), default=0.6, help="share of steps by which k reaches the target"
    )
    p.add_argument("--z-loss", type=NONNEGATIVE, default=1e-3, help="router z-loss weight (default 1e-3)")
    p.add_argument(
        "--pruned-slices", type=int_in(0, 64), default=4, help="pruned variant: slices dropped (default 4 of 8)"
    )
    p.add_argument("--ship", default=None, metavar="NAME", help="the MoE only: install the model as zoo variant NAME")
    p.add_argument("--replace", action="store_true", help="with --ship: replace a MoE variant shipped before")


def run(args) -> dict | None:
    from dataclasses import asdict

    import torch
    from accelerate import Accelerator

    from diffroute.cli.common import check_resume, check_run_dir, check_zoo_model, load

    if not 0 <= args.snapshots <= args.iters:
        raise ValueError(f"--snapshots must be between 0 and --iters ({args.iters}); got {args.snapshots}.")
    if args.model != "emoji":
        raise ValueError(f"diffroute train {args.method} trains on the emoji data set: use --model emoji.")
    cfg, train = _config_and_trainer(args)
    ship = getattr(args, "ship", None)
    if ship is not None:
        from diffroute.zoo.shipped import check_ship

        check_zoo_model(args.model, "--ship")
        if args.variant != "moe" or not ship.startswith(f"{args.model}-"):
            raise ValueError(
                f"--ship takes the MoE variant only, as a zoo name starting with '{args.model}-' (emoji-moe)."
            )
        check_ship("variant", args.model, ship, args.replace, method="moe")
    out = check_run_dir(args.out)
    settings = {"method": args.method, "model": args.model, "steps": args.steps, "guidance": args.guidance}
    check_resume(out, {**settings, **asdict(cfg)}, f"train {args.method}")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    summary = train(pipe, cfg, out, accelerator)
    summary["out"] = str(out)
    if accelerator.is_main_process:
        print(f"{args.method}: model in {out / 'model'}", file=sys.stderr)
        if ship:
            from diffroute.zoo.shipped import install_model_variant

            summary["shipped_as"] = install_model_variant(out / "model", ship, method="moe")
    return summary if accelerator.is_main_process else None


def _config_and_trainer(args):
    """The method's config (from the arguments of the same names), checked before any work, and its trainer."""
    from dataclasses import fields

    def config_of(cls, **extra):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in extra}, **extra)

    if args.method == "moe":
        from diffroute.surgery.moe import parse_capacity
        from diffroute.training.moe import MoEConfig, train_moe

        if not 0 <= args.dense_until <= args.sparse_from <= 1:
            raise ValueError("need 0 <= --dense-until <= --sparse-from <= 1.")
        parse_capacity(args.capacity).check(args.num_experts)
        return config_of(MoEConfig), train_moe
    if args.method in ADAPTERS:
        from diffroute.training.adapters import AdapterConfig, train_adapter

        extra = {"num_experts": 1, "fecl": 0.0, "balance": 0.0} if args.method == "lora" else {}
        return config_of(AdapterConfig, method=args.method, **extra), train_adapter
    from diffroute.training.streams import StreamConfig, check, train_streams

    defaults = {"mode": "retrofit", "query": "static+t", "beta": 0.8, "alpha": 4.0}
    extra = {k: v for k, v in defaults.items() if not hasattr(args, k)}
    cfg = config_of(StreamConfig, method=args.method, **extra)
    check(cfg)
    return cfg, train_streams
