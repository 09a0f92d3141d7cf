"""The embedded emoji model: a PixArt-α pipeline trained by this project, and its domain CLIP, loaded offline."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
CALL_DEFAULTS = dict(
    height=32, width=32, guidance_scale=4.5, clean_caption=False, use_resolution_binning=False, max_sequence_length=32
)


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the emoji model ships with diffroute; rebuild it with "
            "`python -m diffroute.data.emoji && python -m diffroute.zoo.train_emoji` (see README)."
        )
    return path


def load_emoji_pipeline():
    """RoutedPixArtAlphaPipeline with the shipped transformer/VAE (fp16 on disk, fp32 in memory), MiniLM and the
    call defaults the model was trained for (32x32, no resolution binning; see weights/emoji/diffroute.json)."""
    from diffroute.metrics.text import load_text_encoder
    from diffroute.pipelines import RoutedPixArtAlphaPipeline
    from diffroute.utils.quiet import quiet_loading

    text_encoder, tokenizer = load_text_encoder()
    with quiet_loading():  # MiniLM instead of T5 is deliberate; diffusers would warn about the type
        pipe = RoutedPixArtAlphaPipeline.from_pretrained(
            _require(WEIGHTS / "emoji"), text_encoder=text_encoder, tokenizer=tokenizer
        )
    return pipe  # fp16 on disk; diffusers loads it as float32 when no dtype is asked for


@lru_cache(maxsize=1)
def heldout_captions(n: int | None = None, spread: bool = False) -> list[str]:
    """Captions of the fixed held-out split (never trained on): all, the first n, or n spread over the list
    (the data set is sorted by code point, so the first ones are all keycaps and symbols)."""
    from diffroute.data.emoji import load

    data = load()
    caps = [str(c) for c in data["captions"][data["held_out"]]]
    if n is None:
        return caps
    return caps[:: max(len(caps) // n, 1)][:n] if spread else caps[:n]
