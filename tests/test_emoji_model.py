"""The embedded emoji model: data, shipped files, offline deterministic pipeline, and emoji-CLIP."""

import emoji
import numpy as np
import pytest
import torch

from diffroute.data.emoji import DATA_DIR, caption, held_out, load
from diffroute.zoo import emoji as emoji_zoo

WEIGHT_BUDGET_MB = 40


def test_captions_follow_cldr_style():
    d = emoji.EMOJI_DATA
    assert caption("\U0001f600", d) == "grinning face"
    assert caption("\U0001f1ef\U0001f1f5", d) == "flag: japan"
    assert caption("\U0001f469\U0001f3fd\u200d\U0001f4bb", d) == "woman technologist: medium skin tone"
    assert caption("\U0001f44b\U0001f3ff", d) == "waving hand: dark skin tone"


def test_data_set_and_split():
    data = load()
    caps = [str(c) for c in data["captions"]]
    assert len(caps) >= 3000 and len(set(caps)) == len(caps)
    assert data["images"].shape == (len(caps), 32, 32, 3) and data["images"].dtype == np.uint8
    assert np.array_equal(data["held_out"], np.array([held_out(c) for c in caps]))  # fixed by caption hash
    assert 0.07 < data["held_out"].mean() < 0.13
    assert len(data["symbola_images"]) == len(data["symbola_index"]) > 500  # the monochrome second domain
    assert (DATA_DIR / "LICENSE.md").is_file()


def test_shipped_files_present_and_within_budget():
    w = emoji_zoo.WEIGHTS
    for rel in [
        "emoji/model_index.json",
        "emoji/transformer/config.json",
        "emoji/transformer/diffusion_pytorch_model.safetensors",
        "emoji/vae/diffusion_pytorch_model.safetensors",
        "emoji/scheduler/scheduler_config.json",
        "emoji-clip/diffusion_pytorch_model.safetensors",
    ]:
        assert (w / rel).is_file(), rel
    assert not list(w.rglob("*.bin")) and not list(w.rglob("*.pt"))  # safetensors only, never pickle
    total = sum(p.stat().st_size for p in w.rglob("*") if p.is_file())
    assert total < WEIGHT_BUDGET_MB * 2**20


@pytest.fixture(scope="module")
def emoji_pipe():
    pipe = emoji_zoo.load_emoji_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_offline_and_deterministic(emoji_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert emoji_pipe.transformer.dtype == torch.float32  # fp16 on disk, fp32 in memory
    prompts = emoji_zoo.heldout_captions(2)

    def gen():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return emoji_pipe(
            prompts, generator=gens, num_inference_steps=8, output_type="np", **emoji_zoo.CALL_DEFAULTS
        ).images

    a, b = gen(), gen()
    assert np.array_equal(a, b)
    assert a.shape == (2, 32, 32, 3) and a.std() > 0.05


def test_emoji_clip_ranks_own_caption_above_random():
    from diffroute.metrics.clipscore import emoji_clip_scores

    data = load()
    held = np.flatnonzero(data["held_out"])
    caps = [str(c) for c in data["captions"][held]]
    images = torch.from_numpy(data["images"][held]).permute(0, 3, 1, 2)
    own = emoji_clip_scores(images, caps)
    rng = np.random.default_rng(0)
    random_caps = [str(c) for c in data["captions"][rng.choice(len(data["captions"]), len(held))]]
    other = emoji_clip_scores(images, random_caps)
    assert (own > other).float().mean() > 0.85  # measured 0.93-0.94 over 3 random draws (fp32 weights)


def test_plain_call_of_the_embedded_model_without_unactionable_warnings():
    """`load_pipeline("emoji")("grinning face")` works with no extra arguments and prints nothing but the denoising
    progress bar (no text-encoder type notice, no torch_dtype deprecation, no float32 cast, no loading bars)."""
    import subprocess
    import sys

    code = (
        "from diffroute.zoo import load_pipeline\n"
        "image = load_pipeline('emoji')('grinning face').images[0]\n"
        "print(image.size)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(32, 32)"
    for noise in ("Warning", "warning", "Expected types", "torch_dtype", "float32", "Loading", "torchvision"):
        assert noise not in proc.stderr, proc.stderr
