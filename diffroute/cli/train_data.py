"""`diffroute train moe|dar|dtr|plain|fera|lora`: variants of the emoji transformer trained on its data (thin
parsing; the training lives in `diffroute.routers`)."""

from __future__ import annotations

import sys

ADAPTERS = ("fera", "lora")
EXPERTS = ("expert", "experts-router")


def add_parsers(sub) -> None:
    from diffroute.cli.common import COUNT, FRACTION, NONNEGATIVE, POSITIVE, add_model_arguments, float_in, int_in
    from diffroute.training.methods import METHODS

    for method in (m for m, spec in METHODS.items() if spec.kind == "data"):
        p = sub.add_parser(method, help=METHODS[method].help)
        add_model_arguments(p)
        p.add_argument("--iters", type=COUNT, help="training steps (default %(default)s)")
        p.add_argument("--batch-size", type=COUNT, help="global batch (default %(default)s)")
        p.add_argument("--lr", type=POSITIVE, help="peak learning rate (default %(default)s)")
        p.add_argument(
            "--ema-decay", type=float_in(0, 1, high_open=True), help="EMA of the weights (default %(default)s)"
        )
        p.add_argument("--train-images", type=int_in(0, 10**9), help="the first N training images only (0: all)")
        p.add_argument("--fp32", dest="bf16", action="store_false", help="train in float32 (default: bf16 autocast)")
        p.add_argument(
            "--domain",
            choices=("emoji", "symbola"),
            help="training images: emoji (the model's own) or symbola (monochrome glyphs); default %(default)s",
        )
        p.add_argument(
            "--snapshots",
            type=int_in(0, 10**6),
            help="also save the model N times along the way, as OUT/snapshots/step-N (learning curves; default 0)",
        )
        p.add_argument("--out", required=True, help="run folder (checkpointed; rerun the same command to resume)")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        if method == "moe":
            _moe_arguments(p)
        elif method in EXPERTS:
            _expert_arguments(p, method)
        elif method in ADAPTERS:
            note = "per expert" if method == "fera" else "the parameters of 3 FeRA experts of rank 4"
            p.add_argument("--rank", type=int_in(1, 1024), help=f"LoRA rank (default %(default)s: {note})")
            scale = "1, the paper's" if method == "fera" else "rank / 4, FeRA's alpha / rank"
            p.add_argument("--alpha", type=POSITIVE, help=f"LoRA alpha (default: {scale})")
            if method == "fera":
                p.add_argument("--num-experts", type=int_in(1, 64), help="LoRA experts (default %(default)s)")
                p.add_argument("--fecl", type=NONNEGATIVE, help="consistency loss weight (default %(default)s)")
                p.add_argument(
                    "--balance",
                    type=NONNEGATIVE,
                    help="load-balancing weight on the batch's mean routing weights (not in the paper; default 0)",
                )
        else:
            p.add_argument(
                "--init",
                choices=("shipped", "scratch"),
                help="start from the shipped weights or from scratch (default %(default)s)",
            )
        if method == "dar":
            p.add_argument(
                "--mode",
                choices=("retrofit", "scratch"),
                help="retrofit: the residual stream at initialisation (default); scratch: plain mixture",
            )
            p.add_argument(
                "--query",
                choices=("static", "static+t", "dynamic"),
                help="the aggregation queries (default %(default)s)",
            )
        if method == "dtr":
            p.add_argument("--beta", type=FRACTION, help="share of channels active (default %(default)s)")
            p.add_argument("--alpha", type=POSITIVE, help="window slide exponent (default %(default)s)")
        p.set_defaults(**METHODS[method].defaults())  # the config dataclass holds every default


def _expert_arguments(p, method: str) -> None:
    from diffroute.cli.common import float_in, int_in

    p.add_argument("--partition", required=True, help="partition.json (or its folder) from `diffroute train partition`")
    if method == "expert":
        p.add_argument("--cluster", type=int_in(0, 63), required=True, help="the cluster this expert trains on")
        return
    p.add_argument(
        "--experts",
        required=True,
        help="the experts' model folders (OUT/model of `train expert`), comma-separated, in cluster order",
    )
    p.add_argument("--width", type=int_in(8, 4096), help="router width (default %(default)s)")
    p.add_argument("--layers", type=int_in(1, 64), help="router transformer blocks (default %(default)s)")
    p.add_argument("--heads", type=int_in(1, 64), help="router attention heads (default %(default)s)")
    p.add_argument("--patch", type=int_in(1, 64), help="router patch size on the latent (default %(default)s)")
    p.add_argument(
        "--caption-dropout",
        type=float_in(0, 1),
        help="share of captions replaced by the empty one in router training (default %(default)s)",
    )


def add_partition_parser(sub) -> None:
    from diffroute.cli.common import int_in

    p = sub.add_parser("partition", help="cluster the emoji training images for decentralized experts (DDM)")
    p.add_argument("--k", type=int_in(2, 64), required=True, help="clusters (experts)")
    p.add_argument("--split", choices=("kmeans", "random"), default="kmeans", help="kmeans (default) or random shards")
    p.add_argument("--fine", type=int_in(2, 4096), default=64, help="fine k-means centroids merged into K (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for partition.json and clusters.png")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def run_partition(args) -> dict:
    from diffroute.cli.common import check_run_dir
    from diffroute.data import emoji as emoji_data
    from diffroute.experts.partition import Partition, cluster_grid, make_partition
    from diffroute.utils.imageio import save_png
    from diffroute.utils.io import atomic_write_json, read_json

    out = check_run_dir(args.out)
    data = emoji_data.load()
    settings = {"k": args.k, "split": args.split, "fine": args.fine, "seed": args.seed}
    if (out / "partition.json").is_file():  # experts trained on it name it by fingerprint: never recompute it
        if read_json(out / "settings.json", "partition settings") != settings:
            raise ValueError(f"{out} holds a partition made with other settings; give a new --out.")
        partition = Partition.load(out, len(data["images"]))
        print(f"partition: kept the one in {out}", file=sys.stderr)
    else:
        partition = make_partition(args.k, args.split, args.fine, args.seed, data)
        atomic_write_json(out / "settings.json", settings)
        partition.save(out / "partition.json")
    save_png(cluster_grid(partition, data["images"]), out / "clusters.png")
    print(f"partition: {args.k} clusters of {partition.sizes()} images in {out / 'partition.json'}", file=sys.stderr)
    return {"k": args.k, "sizes": partition.sizes(), "fingerprint": partition.fingerprint(), "out": str(out)}


def _moe_arguments(p) -> None:
    from diffroute.cli.common import NONNEGATIVE, float_in, int_in

    p.add_argument(
        "--variant",
        choices=("moe", "dense", "pruned"),
        help="moe (default); dense: the dense model fine-tuned the same; pruned: magnitude-pruned FFNs",
    )
    p.add_argument("--num-experts", type=int_in(1, 64), help="routed experts (default %(default)s)")
    p.add_argument("--shared", type=int_in(0, 64), help="hidden-unit slices of the shared expert (default %(default)s)")
    p.add_argument(
        "--capacity",
        help="k(t), routed experts per token: static:K, clean:KMIN-KMAX, noise:KMIN-KMAX, table:K0,K1..",
    )
    p.add_argument("--dense-until", type=float_in(0, 1), help="share of steps trained dense (default %(default)s)")
    p.add_argument("--sparse-from", type=float_in(0, 1), help="share of steps by which k reaches the target")
    p.add_argument(
        "--router-loss",
        type=NONNEGATIVE,
        help="weight of the routers' logit penalty mean(z^2), holding the sigmoid gates near 1 (default %(default)s)",
    )
    p.add_argument("--pruned-slices", type=int_in(0, 64), help="pruned variant: slices dropped (default %(default)s)")
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
    from diffroute.training.methods import METHODS

    method = METHODS[args.method]
    return method.make_config(args), method.train
