"""Small helpers shared by the dynamic policies."""

from __future__ import annotations

import torch


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
