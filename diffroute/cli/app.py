"""Serve the Gradio demo: full compute beside a plan, timings, PSNR and the compute map."""

from __future__ import annotations

from pathlib import Path

HELP = "serve the Gradio demo page"


def add_arguments(p) -> None:
    from diffroute.zoo import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or pipeline folder (default emoji)")
    p.add_argument("--results", type=Path, default=None, help="an `eval compare` folder for the results tab")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: only this machine)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    from diffroute.cli.common import add_runtime_arguments, device_arg

    p.add_argument("--device", type=device_arg, default=None, help="torch device (default: cuda if available)")
    add_runtime_arguments(p)


def run(args) -> None:
    from diffroute.app.app import launch
    from diffroute.cli.common import runtime_of

    launch(args.model, args.results, args.host, args.port, runtime_of(args))
