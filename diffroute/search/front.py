"""The Pareto front of a search: non-dominated schedules saved as JSON, a plot, and picking one by budget."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from diffroute.search.genome import GenomeSpace
from diffroute.utils.io import atomic_write_bytes, atomic_write_json


def pareto_front(records: list[dict], quality: str, cost: str = "cost") -> list[dict]:
    """Non-dominated records by (cost, quality objective), sorted by cost."""
    from diffroute.search.nsga import quality_value

    F = np.array([[r[cost], quality_value(r, quality)] for r in records])
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((records[i] for i in idx), key=lambda r: r[cost])


def save_front(front: list[dict], space: GenomeSpace, out: Path, settings: dict) -> list[Path]:
    from diffroute.search.nsga import _str_to_bits

    paths = []
    for i, r in enumerate(front):
        prov = {
            "name": f"ecad-{i:02d}",
            "rule": "ecad-nsga2",
            **settings,
            "cost": r["cost"],
            "latency": r["latency"],
            "psnr_vs_full": r["psnr"],
        }
        if "fd" in r:
            prov["fd_vs_full"] = r["fd"]
        for key, name in (("psnr_mean", "psnr_mean_vs_full"), ("latency_model", "latency_model")):
            if key in r:
                prov[name] = r[key]
        schedule = space.to_schedule(_str_to_bits(r["genome"]), prov)
        path = out / "front" / f"ecad-{i:02d}.json"
        schedule.save(path)
        paths.append(path)
    summary = [{k: v for k, v in r.items() if k != "genome"} | {"file": str(p)} for r, p in zip(front, paths)]
    atomic_write_json(out / "front.json", summary)
    return paths


def pick(front: list[dict], max_cost: float, quality: str, cost: str = "cost") -> int | None:
    """Index of the best-quality front member within the cost budget."""
    from diffroute.search.nsga import quality_value

    ok = [i for i, r in enumerate(front) if r[cost] <= max_cost]
    return min(ok, key=lambda i: quality_value(front[i], quality)) if ok else None


def plot_front(records: list[dict], front: list[dict], quality: str, cost: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "fd": "FD vs full (lower is better)",
        "psnr": "PSNR vs full, pooled, dB",
        "psnr_mean": "PSNR vs full, mean per image (capped 60), dB",
        "clip": "CLIP score",
        "user": "user objective",
    }
    key, label = quality, labels[quality]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r[cost] for r in records], [r[key] for r in records], s=10, color="#bbbbbb", label="evaluated")
    ax.plot([r[cost] for r in front], [r[key] for r in front], "o-", color="tab:blue", label="Pareto front")
    xlabels = {
        "cost": "relative compute (analytic FLOPs, 1 = full)",
        "latency_model": "relative transformer time, predicted by the latency table",
        "latency": "relative transformer time, measured",
    }
    ax.set_xlabel(xlabels[cost])
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
