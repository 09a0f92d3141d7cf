"""`diffroute eval`: fid, stats, clip, compare and the routing experiments' reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "evaluate: FID/FD, statistics files, CLIP score, and the plan comparison"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    f = _subcommand(sub, "fid", "Fréchet distance between two image folders or .npz statistics files")
    f.add_argument("path_a")
    f.add_argument("path_b")
    _features(f)
    s = _subcommand(sub, "stats", "precompute reference statistics of an image folder")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output .npz")
    _features(s)
    c = _subcommand(sub, "clip", "CLIP score of an image folder against a prompts file (one line per image)")
    c.add_argument("images")
    c.add_argument("--prompts", required=True, help="text file, one prompt per image in sorted file order")
    c.add_argument("--clip", default="emoji-clip", help="emoji-clip (default) or clip:<local dir or hub id>")
    m = _subcommand(sub, "compare", "generate with several plans and compare speed and quality side by side")
    from diffroute.cli.common import COUNT, add_model_arguments

    add_model_arguments(m)
    m.add_argument("--plans", default="full,fora-2,fora-3", help="comma-separated plans (full is always added)")
    m.add_argument(
        "--prompts",
        default="heldout",
        help="'heldout' (held-out captions of the emoji model's image domain; Symbola for a model adapted to it) "
        "or a text file",
    )
    m.add_argument("--n", type=COUNT, default=256, help="samples per plan (default 256)")
    m.add_argument("--batch", type=COUNT, default=16, help="images per pipeline call (default 16)")
    m.add_argument("--repeats", type=COUNT, default=5, help="timed repeats after a warm-up (default 5)")
    m.add_argument(
        "--pairing",
        choices=["repeat", "neighbours"],
        default="repeat",
        help="speedups against full timed in the same repeat (default), or with full also run between every two "
        "plans and each run paired with the full runs just before and after it (about twice the timing time; "
        "for machines whose speed drifts)",
    )
    m.add_argument(
        "--out", required=True, help="output folder (resumable: images made with the same settings are kept)"
    )
    m.add_argument("--overwrite", action="store_true", help="discard images in --out made with other settings")
    m.add_argument("--features", default=None, help="FD features (default: emoji-clip for the emoji model)")
    m.add_argument("--clip", default=None, help="CLIP scorer (default: emoji-clip for the emoji model)")
    m.add_argument("--weights", default=None, help="Inception weights file (with --features inception)")
    m.add_argument(
        "--paired-with",
        metavar="PLAN",
        help="one of --plans: report each plan's per-image PSNR minus this plan's, with a paired bootstrap band",
    )
    rep = _subcommand(sub, "report", "rewrite a comparison's results.md and plot from its results.json (report code)")
    rep.add_argument("folder", help="an `eval compare` output folder (its results.json is read, never rerun)")
    h = _subcommand(sub, "histogram", "per-sample compute of a per-sample router (Elastic): histogram and JSON")
    add_model_arguments(h)
    h.add_argument("--plan", required=True, help="the router plan, e.g. emoji-elastic:elastic")
    h.add_argument("--n", type=COUNT, default=128, help="held-out captions (default 128)")
    h.add_argument("--batch", type=COUNT, default=32, help="images per call (default 32)")
    h.add_argument("--out", required=True, help="output folder (histogram.png, histogram.json)")
    r = _subcommand(sub, "moe", "the MoE experiment: table of the training runs, expert load and dropped tokens")
    r.add_argument("runs", nargs="+", help="`diffroute train moe` run folders, each with its compare/ results")
    r.add_argument("--base", default=None, help="the base model's compare results.json (its `full` row)")
    r.add_argument("--load-runs", default=None, help="comma-separated runs whose load is plotted (default: MoE runs)")
    r.add_argument("--n", type=COUNT, default=32, help="held-out captions for the load plot (default 32)")
    r.add_argument("--out", required=True, help="output folder (table.md/json, load.png/json)")
    x = _subcommand(sub, "experts", "the decentralized-experts experiment: FD vs the FLOP-matched dense model")
    x.add_argument("ensembles", nargs="+", help="`diffroute train experts-router` run folders (one per K)")
    x.add_argument("--dense", required=True, help="the dense fine-tune's model folder (same images, same start)")
    x.add_argument("--n", type=COUNT, default=356, help="held-out captions (default 356: all)")
    x.add_argument("--batch", type=COUNT, default=32, help="images per call (default 32)")
    x.add_argument("--steps", type=COUNT, default=20, help="denoising steps (default 20)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--extra", action="store_true", help="also top-2 and the full ensemble (K times the compute)")
    x.add_argument("--out", required=True, help="output folder (table.md/json, routing.png, clusters, accuracy)")
    from diffroute.cli.eval_inblock import add_parsers

    for q in (f, s, c, m, rep, h, r, x, *add_parsers(sub, _subcommand)):
        q.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _subcommand(sub, name: str, text: str):
    """A subcommand whose one-line summary is also its --help description."""
    return sub.add_parser(name, help=text, description=text)


def _features(p) -> None:
    p.add_argument("--features", default="emoji-clip", help="inception | clip:<local dir or hub id> | emoji-clip")
    p.add_argument("--weights", default=None, help="Inception weights file (else found under TORCH_HOME)")


def _stats(path: str, feature):
    from diffroute.metrics import frechet
    from diffroute.metrics.images import load_folder

    if path.endswith(".npz"):
        return frechet.FeatureStats.load(path)
    return frechet.stats_of_images(load_folder(path), feature)


def _check_path(path: str) -> None:
    """Fail on a missing or empty input before any model is loaded."""
    from diffroute.metrics.images import list_images

    if path.endswith(".npz"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"statistics file {path!r} does not exist.")
    else:
        list_images(path)


def run(args) -> dict:
    from diffroute.cli import eval_inblock as inblock_cli

    commands = {
        "fid": _fid,
        "stats": _stats_cmd,
        "clip": _clip,
        "compare": _compare,
        "report": _report,
        "histogram": _histogram,
        "moe": _moe,
        "experts": _experts,
        "adapt": inblock_cli.adapt,
        "streams": inblock_cli.streams,
    }
    return commands[args.eval_command](args)


def _report(args) -> dict:
    """The tables and plot of a stored comparison, remade by today's report code (e.g. after its rules changed)."""
    from diffroute.eval.reports import dominance, dominance_table, markdown_table, plot
    from diffroute.utils.io import atomic_write_bytes, read_json

    folder = Path(args.folder)
    result = read_json(folder / "results.json", "comparison results")
    plans = result.get("plans") if isinstance(result, dict) else None
    if not isinstance(plans, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("plan"), str) and isinstance(r.get("speedup_transformer"), float)
        for r in plans.values()
    ):
        raise ValueError(
            f"{folder / 'results.json'} holds no `plans` rows with a speedup: is it `eval compare` output?"
        )
    text = markdown_table(result) + "\n" + dominance_table(result)
    atomic_write_bytes(folder / "results.md", text.encode())
    plot(result, folder / "speed_quality.png")
    if not args.json:
        print(text + f"wrote {folder}/results.md, speed_quality.png")
    return {"dominance": dominance(result)}


def _heldout(n: int) -> list[str]:
    from diffroute.data.emoji import load as load_data

    data = load_data()
    return [str(c) for c in data["captions"][data["held_out"]]][:n]


def _experts(args) -> dict:
    from diffroute.eval.experts_report import evaluate

    report = evaluate(
        Path(args.dense),
        [Path(e) for e in args.ensembles],
        Path(args.out),
        args.n,
        args.steps,
        args.batch,
        args.seed,
        args.extra,
    )
    print(Path(args.out) / "table.md", file=sys.stderr)
    return report


def _histogram(args) -> dict:
    from diffroute.cli.common import call_kwargs, check_plans, load
    from diffroute.eval.routing_report import elastic_histogram
    from diffroute.zoo.registry import model_family

    if model_family(args.model) != "emoji":
        raise ValueError("eval histogram draws the emoji model's held-out captions: use emoji or a variant of it.")
    check_plans(None, [args.plan], args.steps)
    import diffroute
    from diffroute.routers.elastic import ElasticPlan

    if not isinstance(diffroute.resolve_plan(args.plan), ElasticPlan):
        raise ValueError(
            f"eval histogram draws the per-image compute of a per-sample router; {args.plan!r} is not one (it gives "
            "every image the same compute map). Give an Elastic router, e.g. --model emoji-elastic --plan "
            "emoji-elastic:elastic."
        )
    pipe = load(args)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in call_kwargs(pipe, args).items() if k != "num_inference_steps"}
    result = elastic_histogram(
        pipe, args.plan, _heldout(args.n), Path(args.out), args.seed, args.batch, args.steps, kwargs
    )
    if not args.json:
        s = result["summary"]["computed_share"]
        print(
            f"{args.plan}: computed share per image {s['mean']:.3f} ± {s['std']:.3f} (p10 {s['p10']:.3f}, p90 "
            f"{s['p90']:.3f}); wrote {args.out}/histogram.png"
        )
    return result


def _moe(args) -> dict:
    from diffroute.cli.eval_inblock import check_runs
    from diffroute.eval.routing_report import moe_curve, moe_load_plot, moe_table
    from diffroute.zoo.registry import load_pipeline

    runs = [Path(r) for r in args.runs]
    check_runs(runs, ("summary.json", "compare/results.json", "model/model_index.json"), "moe")
    rows = moe_table(runs, Path(args.base) if args.base else None, Path(args.out))
    load_runs = (
        [Path(r) for r in args.load_runs.split(",")]
        if args.load_runs
        else [r for r in runs if json.loads((r / "summary.json").read_text())["variant"] == "moe"]
    )
    models = {}
    for run in load_runs:
        summary = json.loads((run / "summary.json").read_text())
        pipe = load_pipeline(str(run / "model"))
        pipe.set_progress_bar_config(disable=True)
        models[summary["capacity"]] = pipe
    moe_load_plot(models, _heldout(args.n), Path(args.out))
    curve = moe_curve(runs, Path(args.out))
    if not args.json:
        print((Path(args.out) / "table.md").read_text())
        for name, t in curve["targets"].items():
            print(f"target: {name} at step {t['step']}: {'met' if t['met'] else 'missed'} ({t})")
        print(f"wrote {args.out}/table.md, load.png, curve.png")
    return {"rows": rows, "curve": curve}


def _fid(args) -> dict:
    from diffroute.metrics import frechet
    from diffroute.metrics.features import feature_extractor

    _check_path(args.path_a)
    _check_path(args.path_b)
    feature = feature_extractor(args.features, args.weights)
    result = frechet.fd_from_stats(_stats(args.path_a, feature), _stats(args.path_b, feature))
    if not args.json:
        print(f"FD {result['value']:.4f} ({result['feature']}, {result['n_a']} vs {result['n_b']} images)")
    return result


def _stats_cmd(args) -> dict:
    from diffroute.cli.common import check_out_file
    from diffroute.metrics.features import feature_extractor

    _check_path(args.path)
    check_out_file(args.out)
    stats = _stats(args.path, feature_extractor(args.features, args.weights))
    stats.save(args.out)
    result = {"out": args.out, "n": stats.n, "feature": stats.extractor, "resize": stats.resize, "dim": len(stats.mu)}
    if not args.json:
        print(f"wrote {args.out}: {stats.n} images, {stats.extractor}")
    return result


def _clip(args) -> dict:
    from diffroute.metrics.clipscore import ClipScore, scorer
    from diffroute.metrics.images import check_images, list_images, load_uint8
    from diffroute.utils.io import read_prompt_lines

    paths = list_images(args.images)
    check_images(paths)
    prompts = read_prompt_lines(args.prompts)
    if len(prompts) != len(paths):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts in {args.prompts!r}: give one per image.")
    metric = ClipScore(scorer(args.clip))
    metric.update(load_uint8(paths), prompts)
    result = {"clip_score": float(metric.compute()), "n": len(paths), "clip": args.clip}
    if not args.json:
        print(f"CLIP score {result['clip_score']:.3f} ({args.clip}, {len(paths)} images)")
    return result


def _compare(args) -> dict:
    from diffroute.cli.common import call_kwargs, check_plans, check_run_dir, load
    from diffroute.eval.compare import CompareConfig, run_compare, stack_reference, validate
    from diffroute.eval.peers import check_spec, is_peer
    from diffroute.utils.io import read_prompt_lines
    from diffroute.zoo.registry import model_family

    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    for p in filter(is_peer, plans):  # names and step counts before the data or the model load
        check_spec(p)
    check_plans(None, [p for p in plans if not is_peer(p)], args.steps)  # ours: resolved once, steps checked
    reference = None
    emoji = model_family(args.model) == "emoji"  # emoji and its variants share its data and metrics
    if args.prompts == "heldout":
        if not emoji:
            raise ValueError("--prompts heldout needs --model emoji; give a prompts file for other models.")
        from diffroute.data.emoji import domain
        from diffroute.data.emoji import load as load_data
        from diffroute.zoo.registry import model_domain

        # the held-out captions of the model's image domain, against that domain's held-out images
        data = domain(load_data(), model_domain(args.model))
        prompts = [str(c) for c in data["captions"][data["held_out"]]]
        reference = stack_reference(data["images"][data["held_out"]])
    else:
        prompts = read_prompt_lines(args.prompts)
    cfg = CompareConfig(
        model=args.model,
        plans=plans,
        prompts=prompts,
        out=Path(args.out),
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        batch=args.batch,
        repeats=args.repeats,
        features=args.features or ("emoji-clip" if emoji else None),
        clip=args.clip or ("emoji-clip" if emoji else None),
        reference=reference[: args.n] if reference is not None else None,
        paired_with=args.paired_with,
        pairing=args.pairing,
    )
    validate(cfg)
    check_run_dir(cfg.out)
    if args.overwrite:
        import shutil

        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # the same state run_compare uses
        if state.is_main_process:
            shutil.rmtree(cfg.out / "images", ignore_errors=True)
        state.wait_for_everyone()
    pipe = load(args)
    check_plans(pipe, [p for p in cfg.plans if not is_peer(p)], args.steps)
    cfg.call_kwargs = call_kwargs(pipe, args)
    result = run_compare(pipe, cfg)
    if result is not None and not args.json:
        from diffroute.eval.reports import markdown_table

        print(markdown_table(result))
        print(f"wrote {cfg.out}/results.json, results.csv, results.md, speed_quality.png, grid.png", file=sys.stderr)
    return result
