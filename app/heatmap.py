"""The compute map as a picture: steps across, blocks x components down; computed in colour, reused in grey."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffroute.stats import CallStats


def compute_map_image(stats: CallStats) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap_t = stats.compute_tensor().numpy()  # [steps, blocks, comps], NaN where absent
    steps, blocks, comps = cmap_t.shape
    grid = cmap_t.transpose(1, 2, 0).reshape(blocks * comps, steps)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * steps + 2.2), max(2.5, 0.16 * blocks * comps + 1.2)))
    cm = ListedColormap(["#d9d9d9", "#2f6db5"]).with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cm, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(blocks * comps))
    ax.set_yticklabels([f"{b.split('.')[-1]}:{c}" for b in stats.block_names for c in stats.components], fontsize=6)
    ax.set_xticks(range(steps))
    ax.set_xticklabels(range(steps), fontsize=6)
    ax.set_xlabel("denoising step")
    ax.set_title(f"{stats.plan}: computed {stats.computed_fraction:.0%} (blue = computed, grey = reused)", fontsize=9)
    for y in range(comps, blocks * comps, comps):
        ax.axhline(y - 0.5, color="white", linewidth=1.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
