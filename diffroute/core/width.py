"""Real MLP width slicing: a diffusers `FeedForward` run with only its first k hidden units (Elastic-DiT's widths).

The sliced FFN multiplies `W1[:k]` and `W2[:, :k]` (prefix masks of the hidden units, as Elastic-DiT trains them), so
its FLOPs and time really scale with k, instead of masking a full-width product. Hand-written because no library
slices a diffusers FeedForward at run time; peft and torch's pruning utilities mask or rewrite weights instead.
Supported: `FeedForward` with a GELU (exact or tanh) or plain linear-activation projection, which PixArt-α/Σ, DiT,
SD3 and FLUX's dual-stream blocks use; other FFNs (Sana's GLUMBConv, FLUX's single-stream `proj_mlp`, gated GEGLU /
SwiGLU) are refused with a message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU, LinearActivation
from diffusers.models.attention import FeedForward

from diffroute.errors import PlanError


def hidden_units(ff: torch.nn.Module) -> int:
    """The FFN's hidden width, or PlanError if it cannot be sliced."""
    check_sliceable(ff)
    return ff.net[0].proj.out_features


def check_sliceable(ff: torch.nn.Module) -> None:
    if not isinstance(ff, FeedForward) or not isinstance(ff.net[0], (GELU, LinearActivation)):
        act = type(ff.net[0]).__name__ if isinstance(ff, FeedForward) else None
        raise PlanError(
            f"MLP width slicing needs a diffusers FeedForward with a GELU or linear-activation projection; got "
            f"{type(ff).__name__}" + (f" with {act}" if act else "") + ". Gated and convolutional FFNs are not "
            "supported: leave this component at full width."
        )


def sliced_ffn(ff: FeedForward, hidden_states: torch.Tensor, fraction: float) -> torch.Tensor:
    """`ff(hidden_states)` using the first round(fraction * width) hidden units (at least one)."""
    check_sliceable(ff)
    act, out = ff.net[0], ff.net[2]
    k = max(1, round(fraction * act.proj.out_features))
    w1, b1 = act.proj.weight[:k], None if act.proj.bias is None else act.proj.bias[:k]
    h = F.linear(hidden_states, w1, b1)
    h = F.gelu(h, approximate=act.approximate) if isinstance(act, GELU) else act.activation(h)
    for module in ff.net[1:2]:  # dropout between the two projections (identity in eval)
        h = module(h)
    h = F.linear(h, out.weight[:, :k], out.bias)
    for module in ff.net[3:]:  # a final dropout, when the FFN has one
        h = module(h)
    return h


def sliced_ffn_rows(ff: FeedForward, hidden_states: torch.Tensor, fraction) -> torch.Tensor:
    """`sliced_ffn` with one fraction, or one per sample (a tensor over the batch): samples that share a fraction run
    as one sliced product (one host read to group them)."""
    if not isinstance(fraction, torch.Tensor):
        return sliced_ffn(ff, hidden_states, fraction)
    out = None
    for value in fraction.unique().tolist():
        rows = (fraction == value).nonzero().squeeze(1)
        part = sliced_ffn(ff, hidden_states.index_select(0, rows), value)
        if out is None:
            out = part.new_empty(hidden_states.shape[:-1] + part.shape[-1:])
        out.index_copy_(0, rows, part)
    return out


def masked_ffn(ff: FeedForward, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`ff(hidden_states)` with its hidden units multiplied by `mask` ([samples, width]): the training form of width
    decisions (Elastic-DiT's prefix masks under a straight-through one-hot), differentiable in `mask`."""
    check_sliceable(ff)
    act, out = ff.net[0], ff.net[2]
    h = act(hidden_states)
    h = h * mask.to(h.dtype).reshape(mask.shape[0], *([1] * (h.ndim - 2)), mask.shape[-1])
    for module in ff.net[1:2]:
        h = module(h)
    h = out(h)
    for module in ff.net[3:]:
        h = module(h)
    return h
