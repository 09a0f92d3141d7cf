"""CLIP score, 100 * max(cos(image, caption), 0), as a torchmetrics Metric (sum and count reduce across processes).

Scorers: the embedded emoji-CLIP, or a transformers CLIPModel (torchmetrics' own CLIPScore breaks on transformers 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import Metric


class ClipScore(Metric):
    """Mean CLIP score of (image, caption) pairs."""

    full_state_update = False

    def __init__(self, scorer: Callable[[torch.Tensor, list[str]], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self.scorer = scorer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        scores = self.scorer(images, captions)
        self.score_sum += scores.double().sum().to(self.score_sum.device)
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        return self.score_sum / self.count.clamp(min=1)


def _check(images, captions):
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: they must pair one to one.")


@torch.no_grad()
def emoji_clip_scores(images: torch.Tensor, captions: list[str], model=None, batch: int = 256) -> torch.Tensor:
    """Per-image emoji-CLIP scores for uint8 [N, 3, H, W] images against their captions."""
    from diffroute.metrics.emoji_clip import clip_score, load_emoji_clip
    from diffroute.metrics.text import sentence_embeddings

    _check(images, captions)
    model = model or load_emoji_clip()
    text = sentence_embeddings(list(captions))
    img = torch.cat([model.image_embeds(images[i : i + batch]) for i in range(0, len(images), batch)])
    return clip_score(img, text)


class HFClipScorer:
    """Scores with a transformers CLIPModel from a local folder or hub id."""

    def __init__(self, name: str):
        from transformers import CLIPModel, CLIPTokenizer

        from diffroute.metrics.features import HFClipFeatures

        self.images = HFClipFeatures(name)
        self.model: CLIPModel = self.images.model
        self.tokenizer = CLIPTokenizer.from_pretrained(name)
        self.name = name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        _check(images, captions)
        img = torch.nn.functional.normalize(self.images(images).float(), dim=-1)
        tok = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
        txt = self.model.get_text_features(**tok)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        txt = torch.nn.functional.normalize(txt, dim=-1)
        return 100 * (img * txt).sum(-1).clamp(min=0)


def scorer(spec: str) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """`emoji-clip` or `clip:<local dir or hub id>`."""
    if spec == "emoji-clip":
        return emoji_clip_scores
    if spec.startswith("clip:") and len(spec) > 5:
        return HFClipScorer(spec[5:])
    raise ValueError(f"unknown CLIP model {spec!r}; use emoji-clip or clip:<local dir or hub id>.")
