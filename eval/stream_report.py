"""The residual-stream experiment's report (DAR, DTR, plain): FD of each run at each evaluated step (table,
learning curves, the issue's targets checked) and DAR's aggregation weights against t as heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffroute.eval.routing_report import evaluated_steps, generate, pyplot, quality_cells, quality_of
from diffroute.utils.io import atomic_write_json


def run_label(summary: dict) -> str:
    """e.g. `DAR retrofit (fine-tune)`, `DTR (scratch)`, `plain (fine-tune)`."""
    name = {"dar": "DAR", "dtr": "DTR", "plain": "plain"}[summary["method"]]
    if summary["method"] == "dar" and summary["init"] == "shipped":
        name += f" {summary['mode']}"
    return f"{name} ({'fine-tune' if summary['init'] == 'shipped' else 'scratch'})"


def stream_rows(runs: list[Path]) -> list[dict]:
    rows = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        for step, path in evaluated_steps(run).items():
            full = json.loads(path.read_text())["plans"]["full"]
            rows.append(
                {
                    "model": run_label(summary),
                    "method": summary["method"],
                    "init": summary["init"],
                    "seed": summary["seed"],
                    "iters": summary["iters"],
                    "step": step,
                    "run": str(run),
                    **quality_of(full),
                }
            )
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets, per seed: DAR from scratch at half the steps vs the plain baseline at all of them; DTR
    vs the baseline at equal steps; the DAR retrofit vs a plain fine-tune of equal steps."""

    def fd(method, init, seed, step):
        key = (method, init, seed, step)
        hits = [r["fd_vs_real"] for r in rows if (r["method"], r["init"], r["seed"], r["step"]) == key]
        return hits[0] if hits else None

    result = {}
    for init in ("scratch", "shipped"):
        for seed in sorted({r["seed"] for r in rows if r["init"] == init}):
            last = max((r["iters"] for r in rows if r["init"] == init and r["seed"] == seed), default=None)
            base = fd("plain", init, seed, last)
            if base is None:
                continue
            for method, step, key in (
                ("dar", last // 2, "dar_half_steps_vs_plain"),
                ("dar", last, "dar_vs_plain"),
                ("dtr", last, "dtr_vs_plain"),
            ):
                mine = fd(method, init, seed, step)
                if mine is not None:
                    result[f"{init} seed {seed}: {key}"] = {"fd": mine, "plain_fd": base, "met": mine <= base}
    return result


def stream_table(runs: list[Path], out: Path) -> dict:
    rows = stream_rows(runs)
    checks = targets(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table.json", {"rows": rows, "targets": checks})
    lines = ["| model | seed | step | FD vs real | bootstrap band | CLIP score |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seed']} | {r['step']} / {r['iters']} | {quality_cells(r)} |" for r in rows]
    lines += ["", "| target | FD | plain FD | met |", "|---|---|---|---|"]
    for k, v in checks.items():
        lines.append(f"| {k} | {v['fd']:.3f} | {v['plain_fd']:.3f} | {'yes' if v['met'] else 'no'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _curves([r for r in rows if r["init"] == "scratch"], out / "curves.png")
    return {"rows": rows, "targets": checks}


def _curves(rows: list[dict], path: Path) -> None:
    """FD against training steps, one line per run (colour: method, line style: seed)."""
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"plain": "#444444", "dar": "#4477aa", "dtr": "#cc6677"}
    for model, method, seed in sorted({(r["model"], r["method"], r["seed"]) for r in rows}):
        pts = sorted((r["step"], r["fd_vs_real"]) for r in rows if (r["model"], r["seed"]) == (model, seed))
        ax.plot(
            *zip(*pts, strict=True),
            marker="o",
            color=colours[method],
            ls="-" if seed == 0 else "--",
            label=f"{model} seed {seed}",
        )
    ax.set_xlabel("training steps")
    ax.set_ylabel("FD vs real (emoji-CLIP)")
    ax.set_title("from scratch: FD on the held-out captions against steps", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dar_weights(pipe, prompts: list[str], out: Path, seed=0, batch=32, steps=20, call_kwargs=None) -> dict:
    """DAR's aggregation weights per point, source and timestep (averaged over samples and tokens), relative to
    uniform (alpha x number of sources: 1 is the plain residual sum's share). Heatmaps, and the sources that get the
    least weight from the points after them (candidates for skipping)."""
    agg = pipe.transformer.dar
    agg.record, agg.weights = True, []
    for _ in generate(pipe, prompts, seed, batch, steps, call_kwargs):
        pass
    agg.record = False
    records, agg.weights = agg.weights, []
    ts = sorted({rec["t"][0] for rec in records}, reverse=True)
    points = sorted({rec["point"] for rec in records})
    rel = {}  # point -> [sources, timesteps]
    for p in points:
        mats = []
        for t in ts:
            alphas = [rec["alpha"] for rec in records if rec["point"] == p and rec["t"][0] == t]
            mats.append(np.mean(alphas, axis=0) * (p + 1))
        rel[p] = np.stack(mats, axis=1)
    # what each source gets from the later points, averaged over them: per timestep, and over t
    by_step = np.stack(
        [np.mean([rel[p][i] for p in points if p >= max(i, 1)], axis=0) for i in range(max(points) + 1)], axis=1
    )  # [timesteps, sources]
    received = {i: float(by_step[:, i].mean()) for i in range(max(points) + 1)}
    names = ["patch embedding"] + [f"block {i}" for i in range(1, max(points) + 1)]
    data = {
        "t": ts,
        "relative_weight": {str(p): rel[p].tolist() for p in points},
        "received": {names[i]: v for i, v in received.items()},
        "received_by_step": by_step.tolist(),
        "lowest": [names[i] for i in sorted(received, key=received.get)[:2]],
        "n": len(prompts),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "alpha.json", data)
    shown = [p for p in points if p > 0]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown), 3.2), squeeze=False)
    vmax = max(float(np.abs(np.log2(rel[p])).max()) for p in shown)
    for ax, p in zip(axes[0], shown, strict=True):
        im = ax.imshow(np.log2(rel[p]), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title("final" if p == max(points) else f"into block {p + 1}", fontsize=8)
        ax.set_yticks(range(p + 1), [names[i] for i in range(p + 1)], fontsize=6)
        ax.set_xticks([0, len(ts) - 1], ["noise", "clean"], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="log2(alpha x sources)", shrink=0.8)
    fig.suptitle("DAR aggregation weights against t (0: the plain residual sum's share)", fontsize=9)
    fig.savefig(out / "alpha.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return data
