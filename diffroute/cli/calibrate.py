"""Calibrate dynamic caches for a model from full-compute runs on a few prompts: TeaCache's rescaling polynomial
(relative change of block 0's modulated input -> relative change of the transformer output) or MagCache's per-step
magnitude ratios (diffusers' own calibration mode, for the `diffusers:mag-T` peer)."""

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

HELP = "calibrate dynamic policies (TeaCache's rescaling polynomial, MagCache's ratios) for a model"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_prompt_arguments(p, "calibration", 16, " (default for emoji: training captions, never held-out)")
    p.add_argument(
        "--method",
        choices=("teacache", "magcache"),
        default="teacache",
        help="teacache (our teacache-T policy's polynomial, default) or magcache (the diffusers:mag-T peer's ratios)",
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
    if args.out:
        check_out_file(args.out)
    pipe = load(args)
    diffroute.remove(pipe)
    out = _output_path(args, pipe)
    arch = diffroute.architecture_map(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)

    def full_run():
        pipe(
            prompts,
            generator=generators(args.seed, len(prompts), pipe.device),
            output_type="np",
            **call_kwargs(pipe, args),
        )

    if args.method == "magcache":
        return _magcache(args, pipe, arch, prompts, out, full_run)
    result = calibrate_teacache(pipe, full_run, out, args.degree, prompts=len(prompts), steps=args.steps)
    if not args.json:
        print(
            f"wrote {out}: degree-{args.degree} fit on {result['points']} points, R^2 {result['r2']:.3f}",
            file=sys.stderr,
        )
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
