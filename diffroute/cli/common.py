"""Arguments and helpers shared by subcommands: model loading, plan lists, prompts, per-sample generators."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffroute.runtime.arguments import add_runtime_arguments, attention_arg, int_in, runtime_of  # noqa: F401
from diffroute.utils.limits import MAX_SEED, MAX_STEPS, is_guidance


def add_model_arguments(p) -> None:
    from diffroute.zoo import DEFAULT_MODEL, MODELS

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name ({', '.join(MODELS)}), pipeline folder or hub id")
    p.add_argument(
        "--device", type=device_arg, default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=guidance_value, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument(
        "--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the first sample; sample i uses seed + i"
    )
    add_runtime_arguments(p)


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in [low, high] (a bound open where asked), refused at parse time."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number in {left}{low:g}, {high:g}{right}")
        return value

    return parse


POSITIVE = float_in(0.0, float("inf"), low_open=True, high_open=True)  # learning rates, scales
NONNEGATIVE = float_in(0.0, float("inf"), high_open=True)  # loss weights
FRACTION = float_in(0.0, 1.0, low_open=True)  # shares in (0, 1]
COUNT = int_in(1, 10**9)  # iterations, batch sizes, samples


def guidance_value(text: str) -> float:
    """An argparse type: a guidance scale (`limits.is_guidance`, the rule the app applies too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not is_guidance(value):
        raise argparse.ArgumentTypeError(f"{text} is not a guidance scale: give a finite number >= 0")
    return value


def load(args):
    """Load the pipeline named by --model, saying on stderr when its weights are random."""
    from dataclasses import replace

    import torch

    from diffroute.runtime import load_with
    from diffroute.zoo import MODELS

    runtime = runtime_of(args)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entry = MODELS.get(args.model)
    if entry is not None and entry.random_weights:
        print(f"note: model {args.model!r} has RANDOM weights: {entry.description}", file=sys.stderr)
    return load_with(args.model, replace(runtime, device=device))


def check_device(device: str) -> str:
    """Refuse a device this torch build cannot use, before any model loads."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this torch build ({torch.__version__}) sees no CUDA GPU; use --device cpu."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")
    return device


def device_arg(text: str) -> str:
    """An argparse type: a device this torch build can use, refused at parse time."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def read_prompts(args, default: list[str]) -> list[str]:
    """--prompt values and --prompts-file lines; `default` only when neither is given (an empty file is refused)."""
    prompts = list(args.prompt or [])
    if any(not p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty.")
    if getattr(args, "prompts_file", None):
        from diffroute.utils.io import read_prompt_lines

        prompts += read_prompt_lines(args.prompts_file)
    prompts = prompts or list(default)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def generators(seed: int, n: int, device) -> list:
    """One generator per sample, seeded by its global index: a sample's image does not depend on its batch."""
    from diffroute.utils.seeding import sample_generators

    return sample_generators(seed, range(n), device)


def call_kwargs(pipe, args) -> dict:
    from diffroute.zoo import call_defaults

    kwargs = call_defaults(pipe)
    kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    return kwargs


def check_plans(pipe, names: list[str], steps: int | None = None) -> None:
    """Resolve every plan, check it can run `steps` steps (trained routers), and, once a model is loaded, that it
    fits the model and its scheduler: all before any work starts (with pipe None: before the weights load)."""
    import diffroute

    arch = diffroute.architecture_map(pipe.transformer) if pipe is not None else None
    for name in names:
        plan = diffroute.resolve_plan(name)
        if steps is not None:
            plan.check_call(steps, getattr(pipe, "scheduler", None))
        if arch is not None:
            plan.check(arch)


def check_out_dir(path) -> Path:
    """Refuse an --out folder that is a file or cannot be written, before any work (it is created if missing)."""
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file, not a folder: give a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {str(path)!r} cannot be created ({e.strerror}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(path)!r} is not writable.")
    from diffroute.utils.io import hold_folder

    hold_folder(path)  # one command at a time writes a folder: a second one is refused, not interleaved
    return path


def check_run_dir(path, flag: str = "--out") -> Path:
    """The folder of a training run or search (resumable): refused when empty, inside the installed diffroute package,
    or holding a model or router that no diffroute run made (it would be replaced); created, writable, and held by
    this run alone (a second run into it at the same time is refused)."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: give a folder for the run (e.g. runs/NAME).")
    path = Path(path)
    package = Path(__import__("diffroute").__file__).resolve().parent
    if path.resolve().is_relative_to(package):
        raise ValueError(
            f"{flag} {str(path)!r} is inside the installed diffroute package ({package}), which runs never write "
            "into: give a folder outside it (use --ship to install a result into the zoo)."
        )
    ours = any((path / f).is_file() for f in ("checkpoint.json", "train/checkpoint.json", "summary.json"))
    for product in ("model", "router"):
        if (path / product).exists() and not ours:
            raise ValueError(
                f"{flag} {str(path)!r} already holds a {product}/ that no diffroute run there made; it would be "
                "replaced. Give a new folder."
            )
    return check_out_dir(path)  # created, writable and held by this run


def check_resume(out: Path, settings: dict, what: str) -> None:
    """A run folder remembers the settings it was started with (`settings.json`); rerunning into it with other
    settings is refused, naming each difference, before any work (a resumed run must not mix them)."""
    import json
    import os

    from diffroute.utils.fingerprint import check_or_record

    normal = json.loads(json.dumps(settings, default=str))  # tuples as lists, as they read back
    fix = "Rerun with the settings it was started with, or give a new --out."
    check_or_record(out / "settings.json", normal, what, fix, write=os.environ.get("RANK", "0") == "0")


def check_out_file(path) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written, before any work."""
    import os

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder: give a file path.")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {str(path)!r}: {str(folder)!r} is a file, not a folder.")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(path)!r} cannot be written (no permission in {str(probe)!r}).")
    if probe == folder:  # permissions do not tell everything (root in /proc, a read-only mount): try a file
        import tempfile

        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ValueError(f"output {str(path)!r} cannot be written in {str(folder)!r} ({e.strerror}).") from None
    return path


def check_zoo_model(model: str, flag: str) -> None:
    """Refuse `flag` (which installs into the zoo) for a model that has no folder in the package's zoo."""
    from diffroute.zoo.shipped import WEIGHTS

    if not (WEIGHTS / model).is_dir():
        raise ValueError(f"{flag} installs into a zoo model's folder; {model!r} has none (zoo: {WEIGHTS}).")


def add_prompt_arguments(p, role: str, n: int | None, default_note: str = "") -> None:
    """--prompt (repeatable), --prompts-file and (with `n`) --n, for commands that read `role` prompts."""
    p.add_argument("--prompt", action="append", help=f"a {role} prompt (repeatable)")
    p.add_argument("--prompts-file", help=f"a text file with one {role} prompt per line{default_note}")
    if n is not None:
        p.add_argument("--n", type=COUNT, default=n, help=f"{role} prompts to use (default {n})")
