"""Reference images of every shipped model under every plan offered for it, to prove that a refactoring changes no
image. Regenerate (only when a change is meant to change images): `python -m tests.shipped_reference`."""

from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).parent / "data" / "shipped_images.npz"
MODELS = ("emoji", "emoji-moe", "emoji-elastic")
PROMPTS = ["grinning face", "flag: japan"]


def render_all() -> dict[str, np.ndarray]:
    """`MODEL|PLAN` -> uint8 images [2, 32, 32, 3], fp32, one thread (bits do not depend on scheduling then)."""
    import diffroute
    from diffroute.zoo.shipped import plans_for

    torch.set_num_threads(1)
    out = {}
    for model in MODELS:
        pipe = diffroute.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        for plan in plans_for(model):
            pipe.enable_cache(plan)
            gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
            images = pipe(PROMPTS, num_inference_steps=20, output_type="np", generator=gens).images
            out[f"{model}|{plan}"] = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
            pipe.disable_cache()
    return out


if __name__ == "__main__":
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(REFERENCE, **render_all())
    print(f"wrote {REFERENCE}")
