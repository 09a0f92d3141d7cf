"""Benchmarks (not tests), side by side in one run: `bench overhead` times vanilla diffusers against plans;
`bench compile` times eager against torch.compile for vanilla and plans, per dtype, with dynamo's graph counts;
`bench reuse` what a reused step costs; `bench scale` plans on the published configurations of the real models."""

from __future__ import annotations

import sys

from diffroute.cli.common import add_model_arguments, call_kwargs, check_plans, generators, int_in, load

HELP = (
    "benchmarks: hook overhead and plan speedups (overhead); torch.compile and dtypes (compile); one block's FFN "
    "dense against its expert-choice MoE per capacity (moe); the cost of a reused step (reuse); plans on "
    "random-weight transformers of the real models' configurations (scale)"
)


def add_arguments(p) -> None:
    p.add_argument(
        "which",
        choices=["overhead", "compile", "moe", "reuse", "scale"],
        help="overhead: vanilla vs full vs --plans; compile: eager vs compiled, vanilla and --plans, per --dtypes; "
        "moe: FFN FLOPs and wall-clock, dense vs MoE at --ks; reuse: an all-reuse, an all-block-reuse and a "
        "one-residual step against a full step, per --dtypes and --models; scale: --families at their published "
        "configurations",
    )
    add_model_arguments(p)
    p.set_defaults(steps=None)  # (each benchmark has its own default: 20, or 6 for reuse and scale)
    p.add_argument("--plans", default="full,fora-2,fora-3", help="comma-separated plans (default full,fora-2,fora-3)")
    p.add_argument("--batch", type=int_in(1, 1024), default=8, help="images per call (default 8)")
    p.add_argument(
        "--repeats",
        type=int_in(1, 1000),
        default=None,
        help="timed repeats per plan after a warm-up (default 7; reuse 3, scale 2)",
    )
    p.add_argument(
        "--pairing",
        choices=("repeat", "neighbours"),
        default="repeat",
        help="overhead, compile: each row's speedup against (eager) vanilla timed once per repeat (default; ratio of "
        "medians), or against vanilla timed just before and after each run (median of those ratios; steadier on a "
        "machine whose speed drifts, for about one more vanilla run per row)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="compile, reuse, scale: dtypes to time, in turn (default float32,bfloat16; scale: bfloat16)",
    )
    p.add_argument("--families", default=None, help="scale: comma-separated families (default all; see --help)")
    p.add_argument(
        "--depth",
        choices=["reduced", "full"],
        default=None,
        help="scale: blocks built (default full on CUDA, reduced on a CPU: per-block figures extrapolate)",
    )
    p.add_argument("--models", default="tiny-pixart,emoji", help="reuse: zoo models (default tiny-pixart,emoji)")
    p.add_argument("--compile-mode", choices=["whole", "regional"], default="whole", help="compile: what to compile")
    p.add_argument("--backend", default="inductor", help="compile: torch.compile back-end (default inductor)")
    p.add_argument("--ks", default="1,2,3,4,6", help="moe: routed experts per token to time (default 1,2,3,4,6)")
    p.add_argument("--tokens", type=int_in(1, 65536), default=64, help="moe: tokens per sample (default 64)")
    p.add_argument("--block", type=int, default=1, help="moe: the block whose FFN is timed (default 1)")
    p.add_argument(
        "--family",
        default=None,
        help="moe: time a random-weight block of a published configuration instead of --model (e.g. "
        "pixart-alpha-xl: d = 1152, PixArt-XL's FFN; see bench scale's families)",
    )


def run(args) -> dict:
    if args.pairing != "repeat" and args.which not in ("overhead", "compile"):
        raise ValueError(
            f"--pairing is for bench overhead and bench compile; bench {args.which} times its rows once per repeat."
        )
    if args.which == "scale":
        from diffroute.cli import bench_scale

        return bench_scale.run(args)
    if args.which == "reuse":
        from diffroute.cli import bench_reuse

        return bench_reuse.run(args)
    args.steps = args.steps or 20
    args.repeats = args.repeats or 7
    args.dtypes = args.dtypes or "float32,bfloat16"
    if args.which == "moe":
        return _moe(args)
    import torch

    from diffroute.core.arch import architecture_map
    from diffroute.metrics.timing import speedups, time_plans, timing_warnings
    from diffroute.search.cost import measure_cost

    names = [p.strip() for p in args.plans.split(",") if p.strip()]
    check_plans(None, names, args.steps)
    if args.which == "compile":
        from diffroute.runtime import Runtime

        for d in args.dtypes.split(","):
            Runtime(dtype=d.strip()).check()
        if args.compile != "none":
            raise ValueError("bench compile compiles by itself: leave out --compile (use --compile-mode).")
    pipe = load(args)
    check_plans(pipe, names, args.steps)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red apple", "grinning face", "flag: japan", "a smiling cat"] * ((args.batch + 3) // 4)
    prompts = prompts[: args.batch]
    kwargs = call_kwargs(pipe, args)

    def call():
        pipe(prompts, generator=generators(args.seed, len(prompts), pipe.device), output_type="np", **kwargs)

    if args.which == "compile":
        from diffroute.cli import bench_compile

        return bench_compile.run(args, pipe, names, call)

    plans = {"vanilla": None, **{n: n for n in names}}
    cost = measure_cost(pipe, architecture_map(pipe.transformer), kwargs)
    print(f"timing {list(plans)} x {args.repeats} repeats (+1 warm-up), interleaved...", file=sys.stderr)
    neighbours = "vanilla" if args.pairing == "neighbours" else None
    res = time_plans(pipe, plans, call, repeats=args.repeats, cost=cost, neighbours=neighbours, progress=True)
    base = res["vanilla"]
    rows, warnings = {}, []
    for name, r in res.items():
        ideal = r["flop_ideal"]
        speed = speedups(base, r)  # vanilla against itself: exactly 1, as `full` in eval compare
        rows[name] = {
            "end_to_end_median_s": r["e2e_median_s"],
            "transformer_median_s": r["transformer_median_s"],
            "end_to_end_spread": r["e2e_spread"],
            "transformer_spread": r["transformer_spread"],
            "time_ratio_to_vanilla": 1 / speed["speedup_end_to_end"],
            **speed,
            "flop_ideal_speedup": ideal,
            "computed_fraction": r["computed_fraction"],
        }
        warnings += timing_warnings(name, r, rows[name]["speedup_transformer"], ideal)
    result = {
        "model": args.model,
        "device": str(pipe.device),
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "pairing": args.pairing,
        "threads": torch.get_num_threads(),
        "plans": rows,
        "timing_warnings": warnings,
    }
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    if not args.json:
        paired = "paired with vanilla either side" if neighbours else "vanilla once per repeat"
        print(
            f"{args.model} on {pipe.device}: batch {args.batch}, {args.steps} steps, median of {args.repeats} "
            f"({paired})"
        )
        print(
            f"{'plan':>10} {'e2e s':>8} {'spread':>7} {'xformer s':>10} {'t/vanilla':>10} {'speedup e2e':>12} "
            f"{'speedup xf':>11} {'FLOP-ideal':>11}"
        )
        for name, r in rows.items():
            print(
                f"{name:>10} {r['end_to_end_median_s']:8.3f} {100 * r['end_to_end_spread']:6.0f}% "
                f"{r['transformer_median_s']:10.3f} {r['time_ratio_to_vanilla']:10.3f} "
                f"{r['speedup_end_to_end']:11.2f}x {r['speedup_transformer']:10.2f}x {r['flop_ideal_speedup']:10.2f}x"
            )
    return result


def _moe(args) -> dict:
    import torch

    from diffroute.surgery.moe.bench import bench_ffn

    try:
        ks = tuple(float(k) for k in args.ks.split(","))
    except ValueError as e:
        raise ValueError(f"--ks {args.ks!r}: give comma-separated numbers of experts per token, e.g. 1,2,4") from e
    if args.family is not None:
        from diffroute.zoo.real_configs import REAL_CONFIGS

        if args.family not in REAL_CONFIGS:
            raise ValueError(f"--family {args.family!r}: pick one of {', '.join(REAL_CONFIGS)}")
        real = REAL_CONFIGS[args.family]
        transformer = real.build(
            blocks=tuple(2 for _ in real.depth_keys), dtype=getattr(torch, args.dtype or "float32")
        )
        source = f"{args.family} (random weights, d = {transformer.config.get('cross_attention_dim', '?')})"
    else:
        from argparse import Namespace

        # (--compile applies to the timed FFNs only, not to the transformer they are cut from)
        transformer, source = load(Namespace(**{**vars(args), "compile": "none"})).transformer, args.model
    rows = bench_ffn(
        transformer,
        block=args.block,
        ks=ks,
        batch=args.batch,
        tokens=args.tokens,
        repeats=args.repeats,
        seed=args.seed,
        compile=args.compile != "none",
    )
    dtype = str(next(transformer.parameters()).dtype).removeprefix("torch.")
    if not args.json:
        print(
            f"FFN of block {args.block} of {source}, {dtype}, batch {args.batch} x {args.tokens} tokens, "
            f"{torch.get_num_threads()} threads{', torch.compile' if args.compile != 'none' else ''}; "
            f"{args.repeats} interleaved rounds after a warm-up: median wall-clock, and the per-round ratio to dense "
            "(median [quartiles])"
        )
        print("| FFN | FLOPs | FLOPs vs dense | wall-clock (ms) | time vs dense |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['ffn']} | {r['flops'] / 1e6:.1f}M | {r['flops_ratio']:.2f} | {r['seconds'] * 1e3:.2f} | "
                f"{r['time_ratio']:.2f} [{r['time_ratio_q1']:.2f}, {r['time_ratio_q3']:.2f}] |"
            )
    return {
        "rows": rows,
        "batch": args.batch,
        "tokens": args.tokens,
        "block": args.block,
        "source": source,
        "dtype": dtype,
        "compile": args.compile != "none",
    }
