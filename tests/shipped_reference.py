"""Reference images of every shipped model under every plan offered for it, to prove that a refactoring changes no
image. Regenerate (only when a change is meant to change images): `python -m tests.shipped_reference`; only the
keys holding a text, the others kept as stored (e.g. after re-fitting: `python -m tests.shipped_reference
--only=-fit`)."""

from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).parent / "data" / "shipped_images.npz"
MODELS = ("emoji", "emoji-moe", "emoji-elastic")
PROMPTS = ["grinning face", "flag: japan"]


def render_all(only: str | None = None) -> dict[str, np.ndarray]:
    """`MODEL|PLAN` -> uint8 images [2, 32, 32, 3], fp32, one thread (bits do not depend on scheduling then); with
    `only`, just the keys that contain it."""
    import diffroute
    from diffroute.zoo.shipped import plans_for

    torch.set_num_threads(1)
    out = {}
    for model in MODELS:
        pipe = diffroute.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        for plan in plans_for(model):
            if only is not None and only not in f"{model}|{plan}":
                continue
            pipe.enable_cache(plan)
            gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
            images = pipe(PROMPTS, num_inference_steps=20, output_type="np", generator=gens).images
            out[f"{model}|{plan}"] = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
            pipe.disable_cache()
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="regenerate only the MODEL|PLAN keys containing this text")
    args = parser.parse_args()
    kept = {}
    if args.only is not None:
        with np.load(REFERENCE) as stored:
            kept = {k: stored[k] for k in stored.files}
    new = render_all(args.only)
    if args.only is not None and not new:
        raise SystemExit(f"no shipped MODEL|PLAN contains {args.only!r}; nothing written")
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    partial = REFERENCE.with_name(REFERENCE.stem + ".partial.npz")  # written whole, then renamed: never half a file
    np.savez_compressed(partial, **{**kept, **new})
    partial.replace(REFERENCE)
    print(f"wrote {REFERENCE}: {len(new)} keys rendered, {len(set(kept) - set(new))} kept as stored")
