"""The Pareto front of a search: non-dominated schedules saved as JSON, a plot, and picking one by budget."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from diffroute.io import atomic_write_bytes, atomic_write_json

from .genome import GenomeSpace


def pareto_front(records: list[dict], quality: str) -> list[dict]:
    """Non-dominated records by (cost, FD) or (cost, -PSNR), sorted by cost."""
    F = np.array([[r["cost"], r["fd"] if quality == "fd" else -r["psnr"]] for r in records])
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((records[i] for i in idx), key=lambda r: r["cost"])


def save_front(front: list[dict], space: GenomeSpace, out: Path, settings: dict) -> list[Path]:
    from .nsga import _str_to_bits

    paths = []
    for i, r in enumerate(front):
        prov = {"name": f"ecad-{i:02d}", "rule": "ecad-nsga2", "cost": r["cost"], "psnr_vs_full": r["psnr"], **settings}
        if "fd" in r:
            prov["fd_vs_full"] = r["fd"]
        schedule = space.to_schedule(_str_to_bits(r["genome"]), prov)
        path = out / "front" / f"ecad-{i:02d}.json"
        schedule.save(path)
        paths.append(path)
    summary = [{k: v for k, v in r.items() if k != "genome"} | {"file": str(p)} for r, p in zip(front, paths)]
    atomic_write_json(out / "front.json", summary)
    return paths


def pick(front: list[dict], max_cost: float, quality: str) -> int | None:
    """Index of the best-quality front member within the cost budget."""
    ok = [i for i, r in enumerate(front) if r["cost"] <= max_cost]
    if not ok:
        return None
    return min(ok, key=lambda i: front[i]["fd"] if quality == "fd" else -front[i]["psnr"])


def plot_front(records: list[dict], front: list[dict], quality: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("fd", "FD vs full (lower is better)") if quality == "fd" else ("psnr", "PSNR vs full, dB")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r["cost"] for r in records], [r[key] for r in records], s=10, color="#bbbbbb", label="evaluated")
    ax.plot([r["cost"] for r in front], [r[key] for r in front], "o-", color="tab:blue", label="Pareto front")
    ax.set_xlabel("relative compute (analytic FLOPs, 1 = full)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
