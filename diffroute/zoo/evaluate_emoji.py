"""Measure the shipped emoji model: held-out emoji-CLIP score, FD, near-copies; does it draw training captions; grids.

python -m diffroute.zoo.evaluate_emoji --out docs     # writes docs/emoji_quality.json and docs/emoji_*_grid.png
python -m diffroute.zoo.evaluate_emoji --out runs/eval --checkpoint runs/emoji-v3/transformer-ft   # a training run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffroute.utils.imageio import grid, save_png, to_pil, to_uint8
from diffroute.utils.io import atomic_write_json
from diffroute.utils.seeding import sample_generators


def generate(pipe, captions: list[str], steps: int = 20, seed: int = 0, batch: int = 64, **kwargs) -> np.ndarray:
    """Float images [N, 32, 32, 3]; caption i uses a generator seeded with seed + i (batch-independent)."""
    from diffroute.zoo.emoji import CALL_DEFAULTS

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


@torch.no_grad()
def own_nearest_fraction(fake: torch.Tensor, rows: np.ndarray, all_real: torch.Tensor, clip) -> dict:
    """For images generated from the captions of data rows `rows`: how often is the nearest real image (among all
    emoji) the caption's own one, in emoji-CLIP image features (cosine) and in pixel space (RMS)?"""

    def embed(x):
        return torch.cat([clip.image_embeds(x[i : i + 512]) for i in range(0, len(x), 512)])

    own = torch.from_numpy(rows)
    by_clip = (embed(fake) @ embed(all_real).T).argmax(dim=1)
    by_pixel = torch.cdist(fake.flatten(1).float(), all_real.flatten(1).float()).argmin(dim=1)
    return {
        "n_captions": len(rows),
        "candidates": len(all_real),
        "emoji_clip_features": float((by_clip == own).float().mean()),
        "pixels": float((by_pixel == own).float().mean()),
    }


def load_checkpoint_transformer(pipe, checkpoint_dir: Path) -> None:
    """Put a training run's EMA weights (trainer checkpoint folder) into the pipeline's transformer."""
    from diffroute.training.checkpoint import load_ema

    pipe.transformer.load_state_dict(load_ema(checkpoint_dir))


def evaluate(
    out: Path,
    steps: int = 20,
    guidance: float | None = None,
    n_grid: int = 12,
    n_train: int = 256,
    checkpoint: Path | None = None,
    n_heldout: int | None = None,
) -> dict:
    from diffroute.data.emoji import load
    from diffroute.metrics.clipscore import emoji_clip_scores
    from diffroute.metrics.emoji_clip import load_emoji_clip
    from diffroute.metrics.features import EmojiClipFeatures
    from diffroute.metrics.frechet import frechet_distance
    from diffroute.zoo.emoji import CALL_DEFAULTS, load_emoji_pipeline

    data = load()
    held = np.flatnonzero(data["held_out"])
    if n_heldout is not None:  # a quick look: an evenly spread subset
        held = held[:: max(len(held) // n_heldout, 1)][:n_heldout]
    train = np.flatnonzero(~data["held_out"])
    captions = [str(c) for c in data["captions"][held]]
    real = torch.from_numpy(data["images"][held]).permute(0, 3, 1, 2).contiguous()
    train_imgs = torch.from_numpy(data["images"][train]).permute(0, 3, 1, 2).contiguous()
    guidance = guidance if guidance is not None else CALL_DEFAULTS["guidance_scale"]
    pipe = load_emoji_pipeline()
    if checkpoint is not None:
        load_checkpoint_transformer(pipe, checkpoint)
    fake = to_uint8(generate(pipe, captions, steps=steps, guidance_scale=guidance))
    # Training captions: a fixed, evenly spread sample (the data set is sorted by code point).
    train_rows = train[:: max(len(train) // n_train, 1)][:n_train]
    train_caps = [str(c) for c in data["captions"][train_rows]]
    fake_train = to_uint8(generate(pipe, train_caps, steps=steps, guidance_scale=guidance, seed=10_000))
    all_real = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
    clip = load_emoji_clip()
    feats = EmojiClipFeatures(clip)
    shuffled = captions[1:] + captions[:1]  # each image against another image's caption
    rng = np.random.default_rng(0)
    train_sample = train_imgs[rng.choice(len(train_imgs), len(real), replace=False)]
    nn_fake, nn_real = nearest_train(fake, train_imgs), nearest_train(real, train_imgs)
    copy_threshold = float(torch.quantile(nn_real, 0.05))
    report = {
        "model": "emoji",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "steps": steps,
        "guidance_scale": guidance,
        "n_heldout": len(held),
        "n_heldout_of": int(data["held_out"].sum()),
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
        "train_captions_nearest_is_own": own_nearest_fraction(fake_train, train_rows, all_real, clip),
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
    pick = np.linspace(0, len(train_rows) - 1, n_grid).astype(int)
    rows = [
        to_pil(all_real[train_rows[pick]].permute(0, 2, 3, 1).numpy() / 255.0),
        to_pil(fake_train[pick].permute(0, 2, 3, 1).numpy() / 255.0),
    ]
    save_png(grid(rows, labels=["real", "generated"], scale=3), out / "emoji_train_grid.png")
    (out / "emoji_train_grid.txt").write_text("\n".join(train_caps[i] for i in pick) + "\n")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--n-train", type=int, default=256, help="training captions for the 'draws what it learned' check")
    p.add_argument("--checkpoint", type=Path, default=None, help="a trainer checkpoint folder: evaluate its EMA")
    p.add_argument("--n-heldout", type=int, default=None, help="a spread subset of held-out captions (quick look)")
    args = p.parse_args()
    report = evaluate(
        args.out, args.steps, args.guidance, n_train=args.n_train, checkpoint=args.checkpoint, n_heldout=args.n_heldout
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
