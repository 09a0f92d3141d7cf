"""Small helpers shared by the dynamic policies."""

from __future__ import annotations

import torch

from diffroute.core.deciders import per_prompt
from diffroute.core.schedule import CHECK_PER


def main_tensor(x) -> torch.Tensor:
    """The image-token hidden states of a block's output or input: the tensor itself, or the last tensor of a tuple
    (SD3 and FLUX blocks return (encoder_hidden_states, hidden_states))."""
    if isinstance(x, torch.Tensor):
        return x
    return [t for t in x if isinstance(t, torch.Tensor)][-1]


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L1 distance mean|a - b| / mean|b| (one value per row)."""
    dims = tuple(range(1, a.ndim))
    return (a - b).abs().mean(dims) / b.abs().mean(dims).clamp(min=1e-12)


def relative_change(a: torch.Tensor, b: torch.Tensor, per: str) -> torch.Tensor:
    """One relative L1 change per row, shared as `per` says: "sample" (each row its own), "prompt" (rows i and
    i + n/2, an image's CFG pair, take their mean) or "batch" (mean|a - b| / mean|b| over the whole batch, as
    diffusers' FirstBlockCache and cache-dit's DBCache measure: every row then decides alike, so the batch never
    splits, but an image's decisions depend on its batch-mates)."""
    if per == "batch":
        return ((a - b).abs().mean() / b.abs().mean().clamp(min=1e-12)).expand(a.shape[0])
    change = rel_l1(a, b)
    return per_prompt(change) if per == "prompt" else change


# A plan name's optional suffix saying what one check decides (no suffix: each sample alone).
PER_SUFFIX = r"(-prompt|-batch)?"


def per_of_suffix(suffix: str | None) -> str:
    """What PER_SUFFIX matched, as a CHECK_PER value: `-prompt` / `-batch` / nothing (per sample)."""
    return suffix[1:] if suffix else "sample"


def check_per(name: str, per: str) -> str:
    """`per` if it is one of CHECK_PER, else a clear error naming the plan."""
    if per not in CHECK_PER:
        raise ValueError(f"{name}: a check decides per one of {', '.join(CHECK_PER)}; got {per!r}.")
    return per
