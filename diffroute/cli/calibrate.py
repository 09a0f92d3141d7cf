"""Calibrate caches for a model on a few prompts: TeaCache's rescaling polynomial (relative change of block 0's
modulated input -> relative change of the transformer output), MagCache's per-step magnitude ratios (diffusers' own
calibration mode, for the `diffusers:mag-T` peer), both from full-compute runs, or a schedule's fitted reuse weights
(`--method fit --plan PLAN`: a schedule file whose reuses extrapolate from their last two outputs)."""

from __future__ import annotations

import sys
from pathlib import Path

from diffroute.cli.common import (
    add_model_arguments,
    add_prompt_arguments,
    call_kwargs,
    check_out_file,
    generators,
    load,
    read_prompts,
)

HELP = "calibrate caches for a model (TeaCache's polynomial, MagCache's ratios, a schedule's fitted reuse weights)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_prompt_arguments(p, "calibration", 16, " (default for emoji: training captions, never held-out)")
    p.add_argument(
        "--method",
        choices=("teacache", "magcache", "fit"),
        default="teacache",
        help="teacache (our teacache-T policy's polynomial, default), magcache (the diffusers:mag-T peer's ratios) or "
        "fit (--plan's reuses fitted as extrapolations from their last two outputs; writes a schedule file)",
    )
    p.add_argument("--plan", default=None, help="with --method fit: the schedule plan to fit (e.g. emoji:blocks-brisk)")
    p.add_argument(
        "--ship",
        default=None,
        metavar="NAME",
        help="with --method fit, zoo models only: also install the fitted schedule as the shipped plan MODEL:NAME",
    )
    p.add_argument("--replace", action="store_true", help="with --ship: replace a shipped schedule of that name")
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="with --method fit: then train the fitted weights on the final image for this many passes over the "
        "prompts (gradients through the whole sampling loop; keeps the best epoch's weights, the greedy fit included)",
    )
    p.add_argument("--refine-lr", type=float, default=0.02, help="with --refine: Adam's rate (default 0.02)")
    p.add_argument("--refine-batch", type=int, default=8, help="with --refine: prompts per Adam step (default 8)")
    p.add_argument(
        "--refine-loss",
        choices=("per-image", "per-image+pooled"),
        default="per-image+pooled",
        help="with --refine: the mean of each image's log10 latent MSE plus log10 of the batch's pooled MSE "
        "(default; keeps the few largest errors, which FD and the pooled PSNR see, from growing), or the per-image "
        "term alone",
    )
    p.add_argument("--degree", type=int, default=4, help="TeaCache polynomial degree (default 4)")
    p.add_argument(
        "--out",
        default=None,
        help="output JSON (default: teacache.json or magcache.json in the model's folder; required for models shipped "
        "inside the diffroute package, which is never written to unless named here)",
    )


def calibration_prompts(model: str, n: int) -> list[str]:
    """The emoji model's calibration captions (training captions only: see `data.emoji.calibration_captions`)."""
    from diffroute.data.emoji import calibration_captions

    return calibration_captions(n)


def run(args) -> dict:
    import diffroute
    from diffroute.policies.calibration import calibrate_teacache
    from diffroute.zoo.registry import model_family

    default = calibration_prompts(args.model, args.n) if model_family(args.model) == "emoji" else []
    prompts = read_prompts(args, default)[: args.n]
    plan = _fit_arguments(args) if args.method == "fit" else None
    if args.out:
        check_out_file(args.out)
    pipe = load(args)
    diffroute.remove(pipe)
    out = Path(args.out) if args.method == "fit" else _output_path(args, pipe)
    arch = diffroute.architecture_map(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)

    def full_run():
        pipe(
            prompts,
            generator=generators(args.seed, len(prompts), pipe.device),
            output_type="np",
            **call_kwargs(pipe, args),
        )

    if args.method == "fit":
        return _fit(args, pipe, plan, prompts, out, full_run)
    if args.method == "magcache":
        return _magcache(args, pipe, arch, prompts, out, full_run)
    result = calibrate_teacache(pipe, full_run, out, args.degree, prompts=len(prompts), steps=args.steps)
    if not args.json:
        print(
            f"wrote {out}: degree-{args.degree} fit on {result['points']} points, R^2 {result['r2']:.3f}",
            file=sys.stderr,
        )
    return result


def _fit_arguments(args):
    """--method fit's own arguments, checked before the model loads: the plan, the output file, the zoo name."""
    from diffroute.plans import resolve_plan

    if args.plan is None or args.out is None:
        raise ValueError("--method fit needs --plan PLAN (a schedule plan) and --out FILE (the fitted schedule JSON).")
    if args.refine < 0 or args.refine_batch < 1 or not args.refine_lr > 0:
        raise ValueError("--refine EPOCHS (0 or more), --refine-batch (1 or more) and --refine-lr (above 0), please.")
    if args.ship is not None:
        from diffroute.cli.common import check_zoo_model
        from diffroute.zoo.shipped import check_ship

        check_zoo_model(args.model, "--ship")
        check_ship("schedule", args.model, args.ship, args.replace)
    return resolve_plan(args.plan)


def _fit(args, pipe, plan, prompts, out: Path, run) -> dict:
    """Fit `plan`'s reuse weights with one calibration call (the call runs the plan, its reuses also computed)."""
    from diffroute.policies.fitting import fit_schedule

    schedule, summary = fit_schedule(pipe, plan, run, args.steps)
    if args.refine:
        from diffroute.policies.refining import refine_schedule

        schedule, refined = refine_schedule(
            pipe,
            schedule,
            prompts,
            args.seed,
            call_kwargs(pipe, args),
            args.refine,
            args.refine_batch,
            args.refine_lr,
            loss=args.refine_loss,
        )
        summary.update(refined)
    schedule.provenance.update(prompts=len(prompts), dtype=str(pipe.transformer.dtype).removeprefix("torch."))
    schedule.save(out)
    result = {"out": str(out), **summary, "prompts": len(prompts), "steps": args.steps}
    if args.ship is not None:
        from diffroute.zoo.shipped import install_schedule

        result["shipped"] = f"{args.model}:{args.ship}"
        install_schedule(out, args.model, args.ship)
    if not args.json:
        refined = (
            f", refined on the final image ({summary['loss']} loss {summary['loss_greedy']:.3f} -> "
            f"{summary['loss_refined']:.3f}; plain reuse {summary['loss_plain_reuse']:.3f})"
            if "loss_refined" in summary
            else ""
        )
        print(f"wrote {out}: {summary['cells_fitted']} reuses of {plan.name} fitted{refined}", file=sys.stderr)
    return result


def _magcache(args, pipe, arch, prompts, out, full_run) -> dict:
    from diffroute.eval.magcache import calibrate, save_ratios

    ratios = calibrate(pipe, args.steps, full_run)
    extra = {"prompts": len(prompts), "steps": args.steps}
    save_ratios(out, arch.model_class, ratios, extra)
    if not args.json:
        print(f"wrote {out}: {len(ratios)} MagCache ratios", file=sys.stderr)
    return {"out": str(out), "mag_ratios": ratios, **extra}


def _output_path(args, pipe) -> Path:
    """--out, or teacache.json beside the model's folders; never inside the installed diffroute package unless --out
    names it (a silent write there would change `teacache-T` for every later run)."""
    import diffroute
    from diffroute.eval.magcache import CALIBRATION_FILE as MAGCACHE_FILE
    from diffroute.policies.teacache import CALIBRATION_FILE

    if args.out:
        return Path(args.out)
    origin = getattr(pipe.transformer.config, "_name_or_path", None)
    if not origin or not Path(origin).is_dir():
        raise ValueError("this model was not loaded from a folder: give --out FILE for the calibration.")
    out = Path(origin).parent / (MAGCACHE_FILE if args.method == "magcache" else CALIBRATION_FILE)
    if Path(diffroute.__file__).resolve().parent in out.resolve().parents:
        raise ValueError(
            f"{args.model!r} is shipped inside the diffroute package; its calibration {out} is not overwritten. "
            "Give --out FILE (for TeaCache, then use the plan teacache-T@FILE)."
        )
    return check_out_file(out)
