"""Entry point of the `diffroute` command: builds the subcommand parsers and dispatches."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from diffroute.cli import app, bench, calibrate, generate, search, train
from diffroute.cli import eval as eval_cli
from diffroute.errors import NonFiniteImagesError

# Subcommand name -> module with add_arguments(parser) and run(args) -> dict (None: nothing to print on this
# process); later issues add search and app.
COMMANDS = {
    "generate": generate,
    "eval": eval_cli,
    "bench": bench,
    "search": search,
    "calibrate": calibrate,
    "train": train,
    "app": app,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffroute", description="Timestep-aware routing for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        if name not in ("eval", "train"):  # their own subcommands take --json
            p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub unless the user asks
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision-missing notices on CPU machines
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command].run(args)
    except (ValueError, FileNotFoundError, TypeError, NonFiniteImagesError) as e:
        print(f"diffroute {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            f"diffroute {args.command}: interrupted. Runs with --out keep their checkpoints and finished images: "
            "rerun the same command to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    except OSError as e:  # the disk is full or read-only, a permission, a file vanished: the machine, not the input
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(
            f"diffroute {args.command}: error: {e.strerror or e}{where}; nothing half-written is kept.", file=sys.stderr
        )
        sys.exit(1)
    finally:
        _close_process_group()
    if args.json and result is not None:
        print(json.dumps(result, indent=2))


def _close_process_group() -> None:
    """Tear down torch.distributed (gloo/nccl) before the interpreter exits: a process group left to die at
    interpreter teardown can abort in its worker threads' destructors ("terminate called without an active
    exception") after all the work succeeded."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warning: <message>` without the library's file and source line, which a user cannot act on."""
    return f"warning: {message}\n"
