"""The compute map as a picture: steps across, blocks x components down; computed in blue, forecast in orange,
reused in grey (a cell where only some samples computed mixes the colours by their shares)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffroute.core.stats import CallStats

COLOURS = {"computed": (0.18, 0.43, 0.71), "forecast": (0.95, 0.55, 0.15), "reused": (0.85, 0.85, 0.85)}


def compute_map_image(stats: CallStats) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    computed = stats.compute_tensor().numpy()  # [steps, blocks, comps], NaN where absent
    forecast = np.nan_to_num(stats.forecast_tensor().numpy())
    steps, blocks, comps = computed.shape
    shares = {"computed": np.nan_to_num(computed), "forecast": forecast}
    shares["reused"] = np.clip(1.0 - shares["computed"] - forecast, 0.0, 1.0)
    rgb = sum(shares[k][..., None] * np.array(COLOURS[k]) for k in COLOURS)  # [steps, blocks, comps, 3]
    rgb[np.isnan(computed)] = 1.0  # absent components: white
    grid = rgb.transpose(1, 2, 0, 3).reshape(blocks * comps, steps, 3)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * steps + 2.2), max(2.5, 0.16 * blocks * comps + 1.2)))
    ax.imshow(np.clip(grid, 0, 1), aspect="auto", interpolation="nearest")
    shown = [k for k in COLOURS if k != "forecast" or forecast.any()]
    ax.legend(
        handles=[Patch(color=COLOURS[k], label=k) for k in shown],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        frameon=False,
    )
    ax.set_yticks(range(blocks * comps))
    ax.set_yticklabels([f"{b.split('.')[-1]}:{c}" for b in stats.block_names for c in stats.components], fontsize=6)
    ax.set_xticks(range(steps))
    ax.set_xticklabels(range(steps), fontsize=6)
    ax.set_xlabel("denoising step")
    ax.set_title(f"{stats.plan}: computed {stats.computed_fraction:.0%}", fontsize=9)
    for y in range(comps, blocks * comps, comps):
        ax.axhline(y - 0.5, color="white", linewidth=1.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
