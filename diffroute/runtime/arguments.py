"""Command-line arguments of the run options (--dtype, --attention, --compile, --threads), shared by the CLI and the
app's own `python app.py` entry, with argparse types that refuse bad values at parse time."""

from __future__ import annotations

import argparse


def add_runtime_arguments(p) -> None:
    """--dtype, --attention, --compile, --threads (see diffroute.runtime)."""
    from diffroute.runtime import DTYPES
    from diffroute.runtime.attention import attention_names
    from diffroute.runtime.compiling import COMPILE_MODES

    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the pipeline (default: as it loads)")
    p.add_argument(
        "--attention", type=attention_arg, default="default", help=f"attention back-end: {attention_names()}"
    )
    p.add_argument(
        "--compile", choices=list(COMPILE_MODES), default="none", help="torch.compile the transformer (default none)"
    )
    p.add_argument(
        "--threads",
        type=int_in(1, 4096),
        default=None,
        help="CPU threads per process (default: as launched); images are bitwise reproducible across process "
        "counts only at equal threads per process",
    )


def attention_arg(text: str) -> str:
    """An argparse type: a known attention back-end name, refused at parse time."""
    from diffroute.errors import InputError
    from diffroute.runtime.attention import check_attention_name

    try:
        check_attention_name(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)[0].lower() + str(e)[1:]) from None
    return text


def runtime_of(args):
    from diffroute.runtime import Runtime

    runtime = Runtime(
        device=getattr(args, "device", None),
        dtype=args.dtype,
        attention=args.attention,
        compile=args.compile,
        threads=getattr(args, "threads", None),
    )
    runtime.check()
    return runtime


def int_in(low: int, high: int):
    """An argparse type: an integer from low to high, refused at parse time (before any model loads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {low} to {high}")
        return value

    return parse
