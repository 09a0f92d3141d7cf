"""Arguments and helpers shared by subcommands: model loading, plan lists, prompts, per-sample generators."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def add_model_arguments(p) -> None:
    from diffroute.zoo import DEFAULT_MODEL, MODELS

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name ({', '.join(MODELS)}), pipeline folder or hub id")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")


def load(args):
    """Load the pipeline named by --model, saying on stderr when its weights are random."""
    from diffroute.zoo import MODELS, load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    entry = MODELS.get(args.model)
    if entry is not None and entry.random_weights:
        print(f"note: model {args.model!r} has RANDOM weights: {entry.description}", file=sys.stderr)
    pipe = load_pipeline(args.model, device=device)
    return pipe


def read_prompts(args, default: list[str]) -> list[str]:
    prompts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = prompts or list(default)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def generators(seed: int, n: int, device) -> list[torch.Generator]:
    """One generator per sample, seeded by its global index: a sample's image does not depend on its batch."""
    from diffroute.seeding import sample_generators

    return sample_generators(seed, range(n), device)


def call_kwargs(pipe, args) -> dict:
    from diffroute.zoo import call_defaults

    kwargs = call_defaults(pipe)
    kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    return kwargs


def check_plans(pipe, names: list[str]) -> None:
    """Resolve every plan (and check it fits the model, once one is loaded) before any work starts."""
    import diffroute

    arch = diffroute.architecture_map(pipe.transformer) if pipe is not None else None
    for name in names:
        plan = diffroute.resolve_plan(name)
        if arch is not None:
            plan.check(arch)
