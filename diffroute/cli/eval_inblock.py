"""`diffroute eval adapt` and `diffroute eval streams`: the reports of the in-block routing experiments (FeRA
against LoRA on Symbola; DAR, DTR and plain training), from finished training runs and their compare results."""

from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub, subcommand) -> list:
    a = subcommand(sub, "adapt", "the adaptation experiment: table of FeRA/LoRA runs, grid, FeRA weights against t")
    a.add_argument("runs", nargs="+", help="`diffroute train fera|lora` run folders, each with its compare/ results")
    a.add_argument("--n", type=int, default=105, help="held-out Symbola captions for the weights plot (default 105)")
    a.add_argument("--out", required=True, help="output folder (table.md/json, grid.png, weights.png/json)")
    s = subcommand(sub, "streams", "the DAR/DTR experiment: FD per run and step, curves, targets, DAR weights vs t")
    s.add_argument("runs", nargs="+", help="`diffroute train dar|dtr|plain` run folders with compare*/ results")
    s.add_argument("--dar", default=None, help="a DAR run whose aggregation weights are plotted against t")
    s.add_argument("--n", type=int, default=64, help="held-out captions for the weights plot (default 64)")
    s.add_argument(
        "--skip-schedules",
        type=int,
        default=0,
        metavar="K",
        help="with --dar: also write schedules that reuse, every other step after a 2-step warm-up, the K blocks "
        "DAR weights least (dar-lowest-K.json) and, as the equal-compute control, most (dar-highest-K.json)",
    )
    s.add_argument("--out", required=True, help="output folder (table.md/json, curves.png, alpha.png/json)")
    return [a, s]


def check_runs(runs: list[Path], needs: tuple[str, ...], train: str) -> None:
    """Every run of a report (these and `eval moe`) must be finished and evaluated before any work starts."""
    for run in runs:
        for need in needs:
            if not list(run.glob(need)):
                raise FileNotFoundError(
                    f"{run / need} is missing: train with `diffroute train {train} --out {run}` and evaluate with "
                    f"`diffroute eval compare --model {run}/model --prompts heldout --plans full --out {run}/compare`."
                )


def adapt(args) -> dict:
    from diffroute.data.emoji import domain
    from diffroute.data.emoji import load as load_data
    from diffroute.eval.adapter_report import (
        adapter_grid,
        adapter_table,
        fera_weights_by_t,
        plot_training_weights,
        plot_weights,
        read_train_log,
        run_label,
    )
    from diffroute.zoo.registry import load_pipeline

    runs = [Path(r) for r in args.runs]
    check_runs(runs, ("summary.json", "compare/results.json", "model/model_index.json"), "fera|lora")
    out = Path(args.out)
    rows = adapter_table(runs, out)
    data = domain(load_data(), "symbola")
    held = data["held_out"]
    adapter_grid(runs, data["images"][held], out)
    result = {"rows": rows}
    summaries = {r: json.loads((r / "summary.json").read_text()) for r in runs}
    labels = {r: run_label(summary) for r, summary in summaries.items()}
    fera = [r for r in runs if summaries[r]["method"] == "fera"]
    if fera:
        prompts = [str(c) for c in data["captions"][held]][: args.n]
        weights = {}
        for run in fera:
            pipe = load_pipeline(str(run / "model"))
            pipe.set_progress_bar_config(disable=True)
            weights[labels[run]] = fera_weights_by_t(pipe, prompts)
        plot_weights(weights, out)
        logs = {labels[r]: read_train_log(r) for r in fera}
        if all(records and "weight_0" in records[0] for records in logs.values()):  # older runs logged none
            plot_training_weights(logs, out)
        result["weights_change_over_t"] = {label: w["change_over_t"] for label, w in weights.items()}
    if not args.json:
        print(
            (out / "table.md").read_text()
            + f"wrote {out}/table.md, grid.png"
            + (", weights.png, training.png" if fera else "")
        )
    return result


def streams(args) -> dict:
    from diffroute.core.arch import architecture_map
    from diffroute.eval.stream_report import dar_weights, stream_table
    from diffroute.zoo.emoji import heldout_captions
    from diffroute.zoo.registry import load_pipeline

    runs = [Path(r) for r in args.runs]
    check_runs(runs, ("summary.json", "compare*/results.json"), "dar|dtr|plain")
    if args.skip_schedules < 0 or (args.skip_schedules and not args.dar):
        raise ValueError("--skip-schedules K (K >= 1 blocks) reads DAR's weights: give --dar a `train dar` run.")
    pipe = None
    if args.dar:  # checked before any work
        model = Path(args.dar) / "model"
        if not (model / "model_index.json").is_file():
            raise FileNotFoundError(f"{model} is missing: give --dar a finished `diffroute train dar` run folder.")
        pipe = load_pipeline(str(model))
        if getattr(pipe.transformer, "dar", None) is None:
            raise ValueError(f"{model} has no DAR aggregator: --dar takes a `diffroute train dar` run.")
        blocks = architecture_map(pipe.transformer).num_blocks
        if args.skip_schedules >= blocks:
            raise ValueError(f"--skip-schedules must be below the model's {blocks} blocks, got {args.skip_schedules}.")
        pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    result = stream_table(runs, out)
    if pipe is not None:
        result["dar"] = dar_weights(pipe, heldout_captions(args.n, spread=True), out)
        if args.skip_schedules:
            result["schedules"] = write_skip_schedules(pipe, result["dar"], args.skip_schedules, out)
    if not args.json:
        wrote = ["table.md", "curves.png"] + (["alpha.png"] if pipe is not None else [])
        wrote += [Path(p).name for p in result.get("schedules", [])]
        print((out / "table.md").read_text() + f"wrote {out}/" + ", ".join(wrote))
    return result


def write_skip_schedules(pipe, weights: dict, skip: int, out: Path) -> list[str]:
    """DAR-guided skip schedules and their equal-compute control (see routing.dar_schedule), beside alpha.json."""
    from diffroute.core.arch import architecture_map
    from diffroute.surgery.dar_schedule import PICKS, dar_skip_schedule

    arch = architecture_map(pipe.transformer)
    paths = []
    for pick in PICKS:
        path = out / f"dar-{pick}-{skip}.json"
        dar_skip_schedule(arch, weights["received_by_step"], skip, pick=pick).save(path)
        paths.append(str(path))
    return paths
