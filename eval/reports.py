"""Reports of a comparison: results.json, results.csv, a Markdown table, a speed-quality plot and image grids."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from diffroute.eval.peers import PEER_PREFIXES
from diffroute.utils.imageio import grid, save_png
from diffroute.utils.io import atomic_write_bytes, atomic_write_json

COLUMNS = [
    ("plan", "plan", "{}"),
    ("speedup_transformer", "speedup (transformer)", "{:.2f}x"),
    ("speedup_transformer_quartiles", "its per-repeat quartiles", "[{0[0]:.2f}, {0[1]:.2f}]"),
    ("speedup_end_to_end", "speedup (end-to-end)", "{:.2f}x"),
    ("computed_fraction", "computed (calls)", "{:.1%}"),
    ("computed_flop_share", "computed (FLOPs)", "{:.1%}"),
    ("flop_ideal_speedup", "FLOP-ideal speedup", "{:.2f}x"),
    ("timed_flop_share", "computed (FLOPs, timed prompts)", "{:.1%}"),
    ("fd_vs_full", "FD vs full", "{:.3f}"),
    ("fd_vs_full_ci95", "bootstrap band", "[{0[0]:.3f}, {0[1]:.3f}]"),
    ("fd_vs_real", "FD vs real", "{:.3f}"),
    ("fd_vs_real_ci95", "bootstrap band", "[{0[0]:.3f}, {0[1]:.3f}]"),
    ("kid_vs_full_anchored", "KID vs full − KID(full, full)", "{:.4f}"),
    ("psnr_vs_full_db", "PSNR vs full, pooled (dB)", "{:.2f}"),
    ("psnr_vs_full_ci95", "bootstrap band", "[{0[0]:.2f}, {0[1]:.2f}]"),
    ("psnr_mean_vs_full_db", "PSNR vs full, mean per image ≤60 (dB)", "{:.2f}"),
    ("psnr_mean_vs_full_ci95", "bootstrap band", "[{0[0]:.2f}, {0[1]:.2f}]"),
    ("psnr_mean_diff_db", "per-image PSNR − the paired plan's (dB)", "{:+.2f}"),
    ("psnr_mean_diff_ci95", "paired bootstrap band", "[{0[0]:+.2f}, {0[1]:+.2f}]"),
    ("ssim_vs_full", "SSIM vs full", "{:.4f}"),
    ("clip_score", "CLIP score", "{:.2f}"),
]


def no_negative_zero(text: str) -> str:
    """ "-0.000" -> "0.000" in a formatted cell: a value that rounds to zero has no sign worth showing."""
    return re.sub(r"-(0(?:\.0+)?)(?![\d.])", r"\1", text)


def markdown_table(result: dict) -> str:
    rows = list(result["plans"].values())
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [no_negative_zero(fmt.format(r[k])) if r.get(k) is not None else "n/a" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# How each kind of plan is drawn: the shipped (searched) schedules as a line, every peer setting as a point.
KINDS = {
    "shipped": dict(color="tab:red", marker="o", linestyle="-"),
    "ours": dict(color="tab:blue", marker="s", linestyle="none"),
    "peer": dict(color="tab:gray", marker="^", linestyle="none"),
}


def plan_kind(plan: str) -> str:
    """`peer` (diffusers:/cachedit:), `shipped` (a model's shipped schedule, e.g. emoji:fast) or `ours`."""
    if plan.startswith(PEER_PREFIXES):
        return "peer"
    return "shipped" if ":" in plan else "ours"


def style_label(kind: str) -> str:
    labels = {
        "shipped": "shipped schedules and routers (MODEL:NAME; line: their front)",
        "ours": "diffroute plans",
        "peer": "peer caches",
    }
    return labels[kind]


def dominance(result: dict) -> list[dict]:
    """For every peer setting, the shipped schedules that dominate it beyond noise, in (speedup, FD vs full) and in
    (speedup, mean per-image PSNR vs full) separately and in both at once. Beyond noise: a shipped plan is at least
    as fast if the upper quartile of its per-repeat speedups reaches the peer's median, and better only beyond the
    peer's bootstrap band (FD below its lower edge, PSNR above its upper edge). Rows without quartiles or bands (old
    results) are compared by their point values."""
    rows = list(result["plans"].values())
    shipped = [r for r in rows if plan_kind(r["plan"]) == "shipped"]

    def band(row, key):
        b = row.get(f"{key.removesuffix('_db')}_ci95")
        return b if b is not None else [row[key], row[key]]

    def better(a, b, key, higher):
        if a.get(key) is None or b.get(key) is None:  # no finite PSNR: identical to full
            return a.get(key) is None if higher else False
        lo, hi = band(b, key)
        return a[key] > hi if higher else a[key] < lo

    def as_fast(a, b):
        return a.get("speedup_transformer_q3", a["speedup_transformer"]) >= b["speedup_transformer"]

    out = []
    for peer in rows:
        if plan_kind(peer["plan"]) != "peer":
            continue
        faster = [s for s in shipped if as_fast(s, peer)]
        fd = [s["plan"] for s in faster if better(s, peer, "fd_vs_full", higher=False)]
        ps = [s["plan"] for s in faster if better(s, peer, "psnr_mean_vs_full_db", higher=True)]
        out.append({"peer": peer["plan"], "by_fd": fd, "by_psnr": ps, "by_both": [p for p in fd if p in ps]})
    return out


def dominance_table(result: dict) -> str:
    rows = dominance(result)
    if not rows:
        return ""
    lines = [
        "| peer setting | dominated beyond noise in (speedup, FD vs full) by | in (speedup, mean PSNR vs full) by "
        "| in both by |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['peer']} | "
            + " | ".join(", ".join(r[k]) or "**none**" for k in ("by_fd", "by_psnr", "by_both"))
            + " |"
        )
    n = len(rows)
    counts = {k: sum(bool(r[k]) for r in rows) for k in ("by_fd", "by_psnr", "by_both")}
    lines.append(
        f"\n{counts['by_both']} of {n} peer settings dominated in both ({counts['by_fd']} by FD, "
        f"{counts['by_psnr']} by PSNR)."
    )
    return "\n".join(lines) + "\n"


def panels(result: dict) -> list[tuple[str, str, list[dict]]]:
    """The speed-quality plot's panels: (result key, axis label, rows drawn). The PSNR panel shows what the tables and
    the dominance lead with, the mean per-image PSNR; results written before it existed fall back to the pooled one."""
    from diffroute.metrics.fidelity import PSNR_CAP_DB

    rows = list(result["plans"].values())
    mean = any(r.get("psnr_mean_vs_full_db") is not None for r in rows)
    psnr = "psnr_mean_vs_full_db" if mean else "psnr_vs_full_db"
    metrics = [
        ("fd_vs_full", "FD vs full (lower is better)"),
        (psnr, f"PSNR vs full, {'mean per-image' if mean else 'pooled'}, dB (higher is better)"),
    ]
    out = []
    for key, label in metrics:
        if all(r.get(key) is None for r in rows):  # not measured (e.g. FD of too few images)
            continue
        # full vs itself has no finite pooled PSNR, and sits at the cap of the per-image one: no point to draw (nor
        # a plan whose images equal full's; its panel may then stay empty)
        shown = [r for r in rows if r.get(key) is not None and not (key == psnr and r[key] >= PSNR_CAP_DB)]
        out.append((key, label, shown))
    return out


def front_of(rows: list[dict], key: str, higher: bool) -> list[dict]:
    """The rows no other row beats in both speed and `key` (higher or lower better), from slow to fast: pymoo's
    non-dominated sorting, as `search.front.pareto_front` uses for a search's records (both objectives minimised)."""
    import numpy as np
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = np.array([[-r["speedup_transformer"], -r[key] if higher else r[key]] for r in rows])
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((rows[i] for i in sorted(idx)), key=lambda r: r["speedup_transformer"])  # ties in input order


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(result) or [("", "no quality measure in these results", [])]
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4.2), squeeze=False)
    for ax, (key, label, shown) in zip(axes[0], drawn):
        for kind, style in KINDS.items():
            group = [r for r in shown if plan_kind(r["plan"]) == kind]
            if not group:
                continue
            xs, ys = [r["speedup_transformer"] for r in group], [r[key] for r in group]
            if kind == "shipped":  # every shipped plan a point, the line only through those none of them beats
                front = front_of(group, key, higher=key != "fd_vs_full")
                ax.plot(xs, ys, **(style | {"linestyle": "none"}), label=style_label(kind))
                ax.plot([r["speedup_transformer"] for r in front], [r[key] for r in front], **(style | {"marker": ""}))
            else:
                ax.plot(xs, ys, **style, label=style_label(kind))
            for r, x, y in zip(group, xs, ys):
                ax.annotate(r["plan"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if shown:
            ax.legend(fontsize=8)
        ax.set_xlabel("speedup, transformer wall-clock (x)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.get('model', '?')}: {result.get('n', '?')} samples, {result.get('steps', '?')} steps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_reports(result: dict, out: Path, grid_columns: int = 8) -> None:
    from PIL import Image

    atomic_write_json(out / "results.json", result)
    rows = list(result["plans"].values())
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "results.md", (markdown_table(result) + "\n" + dominance_table(result)).encode())
    plot(result, out / "speed_quality.png")
    pics = []
    for name in result["plans"]:
        folder = out / "images" / name
        files = sorted(folder.glob("*.png"))[:grid_columns]
        pics.append([Image.open(f).convert("RGB") for f in files])
    save_png(grid(pics, labels=list(result["plans"]), scale=3), out / "grid.png")
