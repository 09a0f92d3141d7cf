"""The adaptation experiment's report (FeRA against peft LoRA on Symbola): table of the runs, a grid of the same
held-out captions and seeds per run beside the real glyphs, and FeRA's routing weights against t."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffroute.eval.routing_report import generate, pyplot, quality_cells, quality_of
from diffroute.utils.imageio import grid, save_png
from diffroute.utils.io import atomic_write_json


def run_label(summary: dict) -> str:
    """`FeRA 3x r4`, `LoRA r12`, with the settings that differ from the method's defaults (alpha, balance, FECL)."""
    fera = summary["method"] == "fera"
    label = f"FeRA {summary['num_experts']}x r{summary['rank']}" if fera else f"LoRA r{summary['rank']}"
    alpha = summary.get("alpha")
    if alpha is not None and alpha != (1.0 if fera else summary["rank"] / 4):
        label += f", alpha {alpha:g}"  # the grid's font has no Greek
    if fera and summary.get("balance"):
        label += f", balance {summary['balance']:g}"
    if fera and summary.get("fecl", 0.1) != 0.1:
        label += f", FECL {summary['fecl']:g}"
    return label


def trained_parameters(model: Path) -> int:
    """What the adaptation trained (LoRA matrices and FeRA's router), counted in the saved model."""
    from diffroute.surgery.fera import adapter_parameters
    from diffroute.zoo.registry import load_transformer

    return sum(p.numel() for p in adapter_parameters(load_transformer(model / "transformer")))


def adapter_table(runs: list[Path], out: Path) -> list[dict]:
    """One row per `diffroute train fera|lora` run: its settings, trained parameters and held-out quality."""
    rows = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        full = json.loads((run / "compare" / "results.json").read_text())["plans"]["full"]
        rows.append(
            {
                "model": run_label(summary),
                "run": str(run),
                "iters": summary["iters"],
                "lr": summary["lr"],
                "trained_parameters": trained_parameters(run / "model"),
                **quality_of(full),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table.json", {"rows": rows})
    lines = [
        "| adapter | trained parameters | steps | FD vs held-out Symbola | bootstrap band | CLIP score |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['trained_parameters']:,} | {r['iters']} | {quality_cells(r)} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return rows


def adapter_grid(runs: list[Path], reference: np.ndarray, out: Path, n: int = 12) -> Path:
    """Rows: the real held-out glyphs, then each run's images of the same captions and seeds (from its compare)."""
    rows = [[Image.fromarray(img) for img in reference[:n]]]
    labels = ["real Symbola"]
    for run in runs:
        folder = run / "compare" / "images" / "full"
        rows.append([Image.open(folder / f"{i:06d}.png").convert("RGB") for i in range(n)])
        labels.append(run_label(json.loads((run / "summary.json").read_text())))
    return save_png(grid(rows, labels, scale=2), out / "grid.png")


def fera_weights_by_t(pipe, prompts: list[str], seed=0, batch=35, steps=20, call_kwargs=None) -> dict:
    """Every sample's routing weights at every step (CFG rows: the conditional half), summarised per timestep:
    mean, 10th and 90th percentile per expert, and the largest swing of an expert's mean weight over t."""
    state = pipe.transformer._diffroute_fera["state"]
    state.record, state.history, state.timesteps = True, [], []
    per_t: dict[float, list[np.ndarray]] = {}
    for n in generate(pipe, prompts, seed, batch, steps, call_kwargs):
        for w, t in zip(state.history, state.timesteps, strict=True):
            per_t.setdefault(float(t[0]), []).append(w[-n:].float().numpy())  # the conditional rows
        state.history, state.timesteps = [], []
    state.record = False
    ts = sorted(per_t, reverse=True)
    ws = [np.concatenate(per_t[t]) for t in ts]  # [samples, experts] per timestep
    data = {
        "t": ts,
        "mean": [w.mean(0).tolist() for w in ws],
        "p10": [np.percentile(w, 10, axis=0).tolist() for w in ws],
        "p90": [np.percentile(w, 90, axis=0).tolist() for w in ws],
        "n": len(prompts),
    }
    mean = np.array(data["mean"])
    data["change_over_t"] = float((mean.max(0) - mean.min(0)).max())
    return data


def _run_panels(by_run: dict, path: Path, height: float, ylabel: str, draw) -> Path:
    """One panel per run, side by side on a shared y axis; `draw(ax, label, item)` fills each. Saved as `path`."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_run), figsize=(5 * len(by_run), height), sharey=True, squeeze=False)
    for ax, (label, item) in zip(axes[0], by_run.items(), strict=True):
        draw(ax, label, item)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights(by_run: dict[str, dict], out: Path) -> Path:
    """`weights.json` ({run label: weights by t}) and `weights.png`, one panel per FeRA run."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "weights.json", by_run)

    def draw(ax, label, data):
        ts, mean = data["t"], np.array(data["mean"])
        lo, hi = np.array(data["p10"]), np.array(data["p90"])
        for e in range(mean.shape[1]):
            ax.plot(ts, mean[:, e], marker=".", label=f"expert {e}")
            ax.fill_between(ts, lo[:, e], hi[:, e], alpha=0.2)
        ax.invert_xaxis()
        ax.set_xlabel("timestep t (noise → clean)")
        ax.set_title(f"{label} ({data['n']} held-out captions)", fontsize=9)

    return _run_panels(by_run, out / "weights.png", 3.4, "routing weight (band: 10th–90th pct.)", draw)


def read_train_log(run: Path) -> list[dict]:
    """A training run's log records (`OUT/train/log.jsonl`); none when it has no log."""
    log = run / "train" / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def plot_training_weights(by_run: dict[str, list[dict]], out: Path) -> Path:
    """`training.png`: each FeRA run's mean routing weight per expert along its training (its log records), where
    a collapse onto one expert shows."""

    def draw(ax, label, records):
        for k in sorted(k for k in records[0] if k.startswith("weight_")):
            ax.plot([r["step"] for r in records], [r[k] for r in records], marker=".", label=k.replace("_", " "))
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=9)

    return _run_panels(by_run, out / "training.png", 3.2, "mean routing weight (batch)", draw)
