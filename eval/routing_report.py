"""Reports on trained routing: the per-sample compute histogram of a per-sample router (Elastic) and the MoE
experiment's table, expert load and dropped-token plots. Pictures for the README, JSON beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffroute.utils.io import atomic_write_json


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def generate(pipe, prompts, seed, batch, steps, call_kwargs=None):
    """Yield after each batch of `prompts` generated with per-sample seeds (seed + global index)."""
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        kwargs = {"num_inference_steps": steps, **(call_kwargs or {})}
        pipe(chunk, generator=gens, output_type="latent", **kwargs)
        yield len(chunk)


def elastic_histogram(pipe, plan, prompts: list[str], out: Path, seed=0, batch=32, steps=20, call_kwargs=None) -> dict:
    """Per image (its CFG rows averaged): the fraction of blocks it ran, their mean MLP width and its computed share
    of component calls (a skipped block computes none; a kept block's FFN counts as its width). Histogram plot."""
    pipe.enable_cache(plan)
    blocks, widths = [], []
    for n in generate(pipe, prompts, seed, batch, steps, call_kwargs):
        info = pipe.last_stats.plan_info
        b = np.array(info["per_sample_block_fraction"]).reshape(-1, n)  # CFG rows: [uncond..., cond...]
        w = np.array(info["per_sample_mean_width"]).reshape(-1, n)
        blocks.append(b.mean(0))
        widths.append((w * b).sum(0) / np.maximum(b.sum(0), 1e-9))
    pipe.disable_cache()
    blocks, widths = np.concatenate(blocks), np.concatenate(widths)
    comps = len(_components(pipe))
    share = blocks * ((comps - 1) + widths) / comps
    result = {
        "plan": str(plan),
        "n": len(prompts),
        "block_fraction": blocks.tolist(),
        "mean_width": widths.tolist(),
        "computed_share": share.tolist(),
        "summary": {
            k: _spread(v) for k, v in (("block_fraction", blocks), ("mean_width", widths), ("computed_share", share))
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "histogram.json", result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (title, v) in zip(
        axes,
        (
            ("blocks run", blocks),
            ("mean MLP width of run blocks", widths),
            ("computed share of component calls", share),
        ),
        strict=True,
    ):
        ax.hist(v, bins=20, color="#4477aa")
        ax.set_title(title)
        ax.set_xlabel("per image")
    axes[0].set_ylabel(f"images (of {len(prompts)})")
    fig.suptitle(f"{result['plan']}: per-sample compute, {len(prompts)} held-out captions, {steps} steps")
    fig.tight_layout()
    fig.savefig(out / "histogram.png", dpi=110)
    plt.close(fig)
    return result


def _components(pipe) -> list:
    from diffroute.core.arch import architecture_map

    return architecture_map(pipe.transformer).components


def _spread(v: np.ndarray) -> dict:
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
    }


def moe_flop_share(pipe, steps: int = 20, call_kwargs=None) -> float:
    """The FFN FLOP share of the dense model over one generation, measured: every FFN's hidden units run per token
    (shared + taken routed slots), averaged over steps and the model's FFNs (dense ones count 1)."""
    from diffroute.core.arch import architecture_map
    from diffroute.surgery.moe import moe_layers

    layers = moe_layers(pipe.transformer)
    for layer in layers:
        layer.record, layer.stats = True, []
    for _ in generate(pipe, ["a red apple"], 0, 1, steps, call_kwargs):
        pass
    shares = []
    for layer in layers:
        cfg = layer.config
        dense = cfg.dense_hidden or cfg.shared_hidden + cfg.num_experts * cfg.expert_hidden
        per_call = (
            [cfg.shared_hidden + cfg.num_experts * cfg.expert_hidden * float(np.mean(s["load"])) for s in layer.stats]
            if cfg.num_experts
            else [cfg.shared_hidden]
        )
        shares.append(float(np.mean(per_call)) / dense)
        layer.record, layer.stats = False, []
    n_ffn = architecture_map(pipe.transformer).num_blocks
    return (sum(shares) + (n_ffn - len(layers))) / n_ffn


def moe_table(runs: list[Path], base_results: Path | None, out: Path) -> list[dict]:
    """One row per training run (its summary.json and its `compare/results.json`), plus the base model's `full`."""
    from diffroute.zoo.registry import load_pipeline

    rows = []
    if base_results is not None and base_results.is_file():
        full = json.loads(base_results.read_text())["plans"]["full"]
        rows.append({"model": "emoji (shipped, not fine-tuned)", "flop_share": 1.0, **quality_of(full)})
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        full = json.loads((run / "compare" / "results.json").read_text())["plans"]["full"]
        pipe = load_pipeline(str(run / "model"))
        label = summary["variant"] + (f" {summary['capacity']}" if summary["variant"] == "moe" else "")
        rows.append(
            {
                "model": label,
                "run": str(run),
                "iters": summary["iters"],
                "flop_share": moe_flop_share(pipe),
                **quality_of(full),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table.json", {"rows": rows})
    lines = ["| model | FFN FLOPs vs dense | FD vs real | bootstrap band | CLIP score |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['flop_share']:.0%} | {quality_cells(r)} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return rows


def evaluated_steps(run: Path) -> dict[int, Path]:
    """The run's evaluations by training step: `compare` (the final model) and `compare-NNNNNN` (its snapshots)."""
    iters = json.loads((run / "summary.json").read_text())["iters"]
    found = {}
    for folder in sorted(run.glob("compare*")):
        if (folder / "results.json").is_file():
            suffix = folder.name.removeprefix("compare").lstrip("-")
            found[int(suffix) if suffix else iters] = folder / "results.json"
    return dict(sorted(found.items()))


def moe_curve(runs: list[Path], out: Path) -> dict:
    """FD vs real against training steps, one line per run (its snapshots' and final model's evaluations), and the
    issue's targets at the last common step: static MoE within 0.03 of the dense fine-tune; clean-heavy better than
    static beyond both bootstrap bands."""
    curves = {}
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        label = summary["variant"] + (f" {summary['capacity']}" if summary["variant"] == "moe" else "")
        points = []
        for step, path in evaluated_steps(run).items():
            full = json.loads(path.read_text())["plans"]["full"]
            points.append({"step": step, **quality_of(full)})
        curves[label] = points
    common = set.intersection(*({p["step"] for p in pts} for pts in curves.values())) if curves else set()
    last = max(common) if common else None

    def at(label):
        return next((p for p in curves.get(label, []) if p["step"] == last), None)

    targets = {}
    dense, static, clean = at("dense"), at("moe static:2"), at("moe clean:1-3")
    if dense and static:
        gap = static["fd_vs_real"] - dense["fd_vs_real"]
        targets["static k=2 within 0.03 FD of dense"] = {"step": last, "gap": gap, "met": gap <= 0.03}
    if static and clean:
        beyond = clean["fd_vs_real_ci95"][1] < static["fd_vs_real_ci95"][0]
        targets["clean-heavy better than static beyond the bands"] = {
            "step": last,
            "clean": clean["fd_vs_real"],
            "static": static["fd_vs_real"],
            "met": beyond,
        }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "curve.json", {"curves": curves, "targets": targets})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        steps = [p["step"] for p in pts]
        ax.plot(steps, [p["fd_vs_real"] for p in pts], marker="o", label=label)
        lo, hi = zip(*(p["fd_vs_real_ci95"] for p in pts)) if pts else ((), ())
        ax.fill_between(steps, lo, hi, alpha=0.12)
    ax.set_xlabel("training steps")
    ax.set_ylabel("FD vs real (held-out, bootstrap band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)
    return {"curves": curves, "targets": targets}


def quality_of(full: dict) -> dict:
    return {k: full[k] for k in ("fd_vs_real", "fd_vs_real_ci95", "clip_score")}


def quality_cells(row: dict) -> str:
    """A report table's quality columns for one row (`quality_of` keys): FD, its bootstrap band, CLIP score."""
    lo, hi = row["fd_vs_real_ci95"]
    return f"{row['fd_vs_real']:.3f} | [{lo:.3f}, {hi:.3f}] | {row['clip_score']:.2f}"


def _by_timestep(stats: list[dict]) -> dict:
    """One point per timestep (the calls of every batch at that t averaged), from the noisy end to the clean one."""
    ts = sorted({round(s["t_frac"][0], 6) for s in stats}, reverse=True)

    def mean_at(t, key):
        return float(np.mean([np.mean(s[key]) for s in stats if round(s["t_frac"][0], 6) == t]))

    return {"t_frac": ts, "load": [mean_at(t, "load") for t in ts], "dropped": [mean_at(t, "dropped") for t in ts]}


def moe_load_plot(
    models: dict[str, object], prompts: list[str], out: Path, seed=0, batch=16, steps=20, call_kwargs=None
) -> dict:
    """Per MoE layer: tokens per routed expert (C / S) and the share of tokens no routed expert picked, against t,
    one line per model (e.g. the three capacity schedules)."""
    from diffroute.surgery.moe import moe_layers

    data = {}
    for name, pipe in models.items():
        layers = moe_layers(pipe.transformer)
        for layer in layers:
            layer.record, layer.stats = True, []
        for _ in generate(pipe, prompts, seed, batch, steps, call_kwargs):
            pass
        data[name] = [_by_timestep(layer.stats) for layer in layers]
        for layer in layers:
            layer.record, layer.stats = False, []
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "load.json", data)
    n_layers = max(len(v) for v in data.values())
    plt = pyplot()
    fig, axes = plt.subplots(2, n_layers, figsize=(2.6 * n_layers, 5.2), sharex=True, sharey="row", squeeze=False)
    for name, layers in data.items():
        for i, rec in enumerate(layers):
            for row, key in enumerate(("load", "dropped")):
                axes[row, i].plot(rec["t_frac"], rec[key], marker=".", label=name)
    for i in range(n_layers):
        axes[0, i].set_title(f"MoE layer {i + 1}")
        axes[1, i].set_xlabel("t / T (1 = noise)")
    axes[0, 0].set_ylabel("tokens per expert (C / S)")
    axes[1, 0].set_ylabel("tokens no routed expert took")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)
    return data
