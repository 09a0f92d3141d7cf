"""Measure the shipped emoji model on held-out captions: emoji-CLIP score, FD, nearest neighbours, and a grid.

python -m diffroute.zoo.evaluate_emoji --out docs     # writes docs/emoji_quality.json and docs/emoji_heldout_grid.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffroute.imageio import grid, save_png, to_pil, to_uint8
from diffroute.io import atomic_write_json
from diffroute.seeding import sample_generators


def generate(pipe, captions: list[str], steps: int = 20, seed: int = 0, batch: int = 64, **kwargs) -> np.ndarray:
    """Float images [N, 32, 32, 3]; caption i uses a generator seeded with seed + i (batch-independent)."""
    from .emoji import CALL_DEFAULTS

    call = {**CALL_DEFAULTS, **kwargs, "num_inference_steps": steps, "output_type": "np"}
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(captions), batch), desc="generate", file=sys.stderr, leave=False):
        chunk = captions[i : i + batch]
        gens = sample_generators(seed, range(i, i + len(chunk)))
        out.append(pipe(chunk, generator=gens, **call).images)
    return np.concatenate(out)


def nearest_train(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """RMS pixel distance (0-1 scale) from each query image to its nearest training image."""
    q = queries.flatten(1).float() / 255.0
    t = train.flatten(1).float() / 255.0
    return torch.cdist(q, t).min(dim=1).values / q.shape[1] ** 0.5


def evaluate(out: Path, steps: int = 20, guidance: float | None = None, n_grid: int = 12) -> dict:
    from diffroute.eval.clipscore import emoji_clip_scores
    from diffroute.eval.features import EmojiClipFeatures
    from diffroute.eval.frechet import frechet_distance

    from .emoji import CALL_DEFAULTS, load_emoji_clip, load_emoji_pipeline
    from .emoji_data import load

    data = load()
    held = np.flatnonzero(data["held_out"])
    train = np.flatnonzero(~data["held_out"])
    captions = [str(c) for c in data["captions"][held]]
    real = torch.from_numpy(data["images"][held]).permute(0, 3, 1, 2).contiguous()
    train_imgs = torch.from_numpy(data["images"][train]).permute(0, 3, 1, 2).contiguous()
    guidance = guidance if guidance is not None else CALL_DEFAULTS["guidance_scale"]
    pipe = load_emoji_pipeline()
    fake = to_uint8(generate(pipe, captions, steps=steps, guidance_scale=guidance))
    clip = load_emoji_clip()
    feats = EmojiClipFeatures(clip)
    shuffled = captions[1:] + captions[:1]  # each image against another image's caption
    rng = np.random.default_rng(0)
    train_sample = train_imgs[rng.choice(len(train_imgs), len(real), replace=False)]
    nn_fake, nn_real = nearest_train(fake, train_imgs), nearest_train(real, train_imgs)
    copy_threshold = float(torch.quantile(nn_real, 0.05))
    report = {
        "model": "emoji",
        "steps": steps,
        "guidance_scale": guidance,
        "n_heldout": len(held),
        "clip_score": {
            "generated_vs_own_caption": float(emoji_clip_scores(fake, captions, clip).mean()),
            "real_vs_own_caption": float(emoji_clip_scores(real, captions, clip).mean()),
            "real_vs_other_caption": float(emoji_clip_scores(real, shuffled, clip).mean()),
        },
        "fd_emoji_clip": {
            "generated_vs_real_heldout": frechet_distance(real, fake, feats),
            "real_train_sample_vs_real_heldout": frechet_distance(real, train_sample, feats),
        },
        "nearest_train_rms": {
            "generated_median": float(nn_fake.median()),
            "real_heldout_median": float(nn_real.median()),
            "copy_threshold_(5th_pct_of_real)": copy_threshold,
            "generated_below_threshold_fraction": float((nn_fake < copy_threshold).float().mean()),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "emoji_quality.json", report)
    pick = list(range(n_grid))
    rows = [
        to_pil(real[pick].permute(0, 2, 3, 1).numpy() / 255.0),
        to_pil(fake[pick].permute(0, 2, 3, 1).numpy() / 255.0),
    ]
    save_png(grid(rows, labels=["real", "generated"], scale=3), out / "emoji_heldout_grid.png")
    (out / "emoji_heldout_grid.txt").write_text("\n".join(captions[:n_grid]) + "\n")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    args = p.parse_args()
    print(json.dumps(evaluate(args.out, args.steps, args.guidance), indent=2))


if __name__ == "__main__":
    main()
