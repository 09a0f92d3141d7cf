"""`diffroute eval experts`: the decentralized-experts experiment, FLOP-matched.

For each ensemble (a `train experts-router` run) and the dense fine-tune trained with the same images from the same
start, it generates the held-out captions and reports FD vs the real held-out images (emoji-CLIP features, with
bootstrap bands: the bias-corrected 2.5-97.5% spread of FD over resampled image sets, a measure of how much FD
moves with the sample, not a confidence interval for the population FD), CLIP score and transformer FLOPs per
step (FlopCounterMode, both CFG rows; the router included). Selections: top-1 (DDM's default), a random expert per
step, each expert alone, and optionally top-2 and the full ensemble. Pictures: the routing over t (which expert
served the samples at each step), the router's accuracy against t, each partition's clusters. Generated images are
kept beside each model (`eval/`), so a rerun only scores.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffroute.errors import InputError
from diffroute.utils.io import atomic_write_json, read_json


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_inputs(dense: Path, ensembles: list[Path]) -> None:
    """Every input finished, before any work."""
    if not (dense / "model_index.json").is_file():
        raise InputError(f"--dense {dense} is not a model folder: train it with `diffroute train plain --out ...`.")
    for run in ensembles:
        for need in ("model/model_index.json", "summary.json", "router_accuracy.json"):
            if not (run / need).is_file():
                raise InputError(f"{run / need} is missing: train the router with `diffroute train experts-router`.")


def generate_images(pipe, captions, steps, seed, batch, call, routing: list | None = None) -> np.ndarray:
    """uint8 [N, 3, H, W]; caption i gets a generator seeded seed + i (batch-independent). With `routing`, the
    top-1 expert of each sample's conditional row per step is appended ([steps] per sample)."""
    from diffroute.utils.imageio import to_uint8
    from diffroute.utils.seeding import sample_generators

    out = []
    for i in tqdm(range(0, len(captions), batch), desc="generate", file=sys.stderr, leave=False):
        chunk = captions[i : i + batch]
        images = pipe(chunk, generator=sample_generators(seed, range(i, i + len(chunk))), **call).images
        out.append(to_uint8(images))
        if routing is not None:
            experts = torch.tensor(pipe.transformer.last_routing.experts)  # [steps, rows]
            routing.extend(experts[:, -len(chunk) :].T.tolist())  # the conditional rows (the second half)
    return torch.cat(out).numpy()


@torch.no_grad()
def step_flops(transformer, dtype) -> float:
    """FLOPs of one denoising step (both CFG rows of one sample, the router included), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffroute.core.call_context import guidance_pairs

    cfg = transformer.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype)
    experts = getattr(transformer, "experts", None)
    caption = (experts[0] if experts is not None else transformer).config.caption_channels
    text = torch.randn(2, 32, caption, dtype=dtype)
    router = getattr(transformer, "router", None)
    if router is not None:  # torch's fused encoder path (eval mode) is invisible to FlopCounterMode: count the
        router.train()  # unfused one (same arithmetic; no dropout in the router)
    try:
        with FlopCounterMode(display=False) as counter, guidance_pairs(True):
            transformer(
                x,
                encoder_hidden_states=text,
                timestep=torch.tensor([500, 500]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=torch.ones(2, 32),
            )
    finally:
        if router is not None:
            router.eval()
    return float(counter.get_total_flops())


def evaluate(dense: Path, ensembles: list[Path], out: Path, n: int, steps: int, batch: int, seed: int, extra: bool):
    from diffroute.data.emoji import load as load_data
    from diffroute.metrics.clipscore import emoji_clip_scores
    from diffroute.metrics.features import EmojiClipFeatures
    from diffroute.metrics.frechet import _fd_of, fd_interval
    from diffroute.zoo import load_pipeline
    from diffroute.zoo.emoji import CALL_DEFAULTS

    check_inputs(dense, ensembles)
    data = load_data()
    held = np.flatnonzero(data["held_out"])[:n]
    captions = [str(c) for c in data["captions"][held]]
    real = torch.from_numpy(data["images"][held]).permute(0, 3, 1, 2).contiguous()
    feats = EmojiClipFeatures()
    with torch.no_grad():
        real_f = feats(real).double()
    call = {**CALL_DEFAULTS, "num_inference_steps": steps, "output_type": "np"}
    dtype = torch.bfloat16
    key = f"n{n}-s{steps}-seed{seed}-bf16"

    def score(name, images, flops, **more):
        images = torch.from_numpy(images)
        with torch.no_grad():
            fake_f = feats(images).double()
        fd = _fd_of(real_f, fake_f)
        return {
            "name": name,
            "fd_vs_real": fd,
            "fd_ci95": fd_interval(real_f, fake_f, paired=False),
            "clip_score": float(emoji_clip_scores(images, captions).mean()),
            "gflops_per_step": flops / 1e9,
            **more,
        }

    def cached(folder: Path, mode: str, make):
        path = folder / "eval" / f"{mode.replace(':', '-')}-{key}.npy"
        if path.is_file():
            return np.load(path)
        images = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), images)
        path.with_suffix(".tmp.npy").rename(path)
        return images

    rows = []
    pipe = load_pipeline(str(dense), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    dense_flops = step_flops(pipe.transformer, dtype)
    images = cached(dense.parent, "dense", lambda: generate_images(pipe, captions, steps, seed, batch, call))
    rows.append(score("dense fine-tune (same images, same start)", images, dense_flops, k=1, selection="dense"))
    pictures = {}
    for run in ensembles:
        summary = read_json(run / "summary.json", "router summary")
        pipe = load_pipeline(str(run / "model"), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        ensemble = pipe.transformer
        k = len(ensemble.experts)
        modes = ["top1", "random", *[f"expert:{i}" for i in range(k)], *(["topk", "full"] if extra else [])]
        routing_file = run / "eval" / f"routing-{key}.json"
        routing = read_json(routing_file, "routing") if routing_file.is_file() else []
        for mode in modes:
            ensemble.set_selection(mode, top_k=2)
            log = [] if mode == "top1" and not routing else None

            def make(pipe=pipe, log=log):
                return generate_images(pipe, captions, steps, seed, batch, call, log)

            images = cached(run, mode, make)
            if log:
                routing = log
                atomic_write_json(routing_file, routing)
            label = {"top1": "top-1", "random": "random expert per step", "topk": "top-2", "full": "full ensemble"}
            rows.append(
                score(
                    f"K={k} {label.get(mode, mode.replace(':', ' ') + ' alone')}",
                    images,
                    step_flops(ensemble, dtype),
                    k=k,
                    selection=mode,
                )
            )
        ensemble.set_selection("top1")
        pictures[k] = {"routing": routing, "accuracy": read_json(run / "router_accuracy.json", "accuracy")}
        out.mkdir(parents=True, exist_ok=True)
        partition = Path(summary["partition"])
        grid = (partition if partition.is_dir() else partition.parent) / "clusters.png"
        if grid.is_file():
            shutil.copyfile(grid, out / f"clusters-k{k}.png")
        shutil.copyfile(run / "router_accuracy.png", out / f"router-accuracy-k{k}.png")
    for row in rows:
        row["flops_vs_dense"] = row["gflops_per_step"] * 1e9 / dense_flops
    report = {"n": n, "steps": steps, "dtype": "bfloat16", "seed": seed, "rows": rows, "targets": targets(rows)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table.json", report)
    (out / "table.md").write_text(table_md(report))
    plot_routing(pictures, steps, out / "routing.png")
    return report


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, per K: top-1 below dense with intervals apart at <= 1.05x its FLOPs; top-1 below a
    random expert per step and below the best single expert."""
    dense = next(r for r in rows if r["selection"] == "dense")
    found = []
    for k in sorted({r["k"] for r in rows if r["k"] > 1}):
        mine = [r for r in rows if r["k"] == k]
        top1 = next(r for r in mine if r["selection"] == "top1")
        rand = next(r for r in mine if r["selection"] == "random")
        best = min((r for r in mine if r["selection"].startswith("expert:")), key=lambda r: r["fd_vs_real"])
        found += [
            {
                "target": f"K={k}: top-1 FD below dense, bootstrap bands apart, FLOPs <= 1.05x",
                "measured": f"{top1['fd_vs_real']:.3f} {fmt_ci(top1)} vs {dense['fd_vs_real']:.3f} {fmt_ci(dense)}; "
                f"{top1['flops_vs_dense']:.4f}x FLOPs",
                "met": top1["fd_ci95"][1] < dense["fd_ci95"][0] and top1["flops_vs_dense"] <= 1.05,
            },
            {
                "target": f"K={k}: top-1 below a random expert per step",
                "measured": f"{top1['fd_vs_real']:.3f} vs {rand['fd_vs_real']:.3f}",
                "met": top1["fd_vs_real"] < rand["fd_vs_real"],
            },
            {
                "target": f"K={k}: top-1 below the best single expert ({best['selection']})",
                "measured": f"{top1['fd_vs_real']:.3f} vs {best['fd_vs_real']:.3f}",
                "met": top1["fd_vs_real"] < best["fd_vs_real"],
            },
        ]
    return found


def fmt_ci(row) -> str:
    lo, hi = row["fd_ci95"]
    return f"[{lo:.3f}, {hi:.3f}]"


def table_md(report: dict) -> str:
    header = "| model | FD vs real | bootstrap band | CLIP score | GFLOPs / step | vs dense |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['fd_vs_real']:.3f} | {fmt_ci(r)} | {r['clip_score']:.2f} | "
            f"{r['gflops_per_step']:.4f} | {r['flops_vs_dense']:.4f}× |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot_routing(pictures: dict, steps: int, path: Path) -> None:
    """Per K: the share of samples each expert served at each step (top-1), and the router's accuracy against t."""
    plt = pyplot()
    fig, axes = plt.subplots(
        2, max(len(pictures), 1), figsize=(4.2 * max(len(pictures), 1), 5.6), dpi=120, squeeze=False
    )
    for col, (k, pic) in enumerate(sorted(pictures.items())):
        served = torch.tensor(pic["routing"])  # [samples, steps]
        ax = axes[0][col]
        bottom = np.zeros(served.shape[1])
        for e in range(k):
            share = (served == e).float().mean(0).numpy()
            ax.bar(range(served.shape[1]), share, bottom=bottom, label=f"expert {e}")
            bottom += share
        switches = (served[:, 1:] != served[:, :-1]).sum(1).float().mean()
        ax.set_title(f"K = {k}: expert per step (top-1), {switches:.2f} switches / sample", fontsize=8)
        ax.set_xlabel("denoising step (0 = pure noise)")
        ax.set_ylabel("share of samples")
        ax.legend(fontsize=6)
        acc = pic["accuracy"]
        ax = axes[1][col]
        ax.plot(acc["timesteps"], acc["accuracy"], marker="o", ms=3, label="router, held-out")
        if "accuracy_empty_caption" in acc:
            ax.plot(acc["timesteps"], acc["accuracy_empty_caption"], marker="o", ms=3, label="empty caption")
        ax.axhline(acc["prior"], color="gray", ls="--", lw=1, label="largest cluster's share")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(0, 1.02)
        ax.invert_xaxis()
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
