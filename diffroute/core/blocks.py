"""A transformer block's streams, so that a block can stand in for itself with its input plus a cached residual.

A block maps its image-token `hidden_states` (and, in joint-attention blocks, its text `encoder_hidden_states`) to new
ones: PixArt, DiT and Sana blocks return a tensor, SD3 and FLUX blocks the pair `(encoder_hidden_states,
hidden_states)` (the text entry is None in SD3's last block). The residual is output minus input per stream; a block
reused as a whole returns input plus residual, as FBCache/DBCache reuse the residual of the blocks they skip.
"""

from __future__ import annotations

import inspect

import torch

# Block arguments with one row per sample (sliced when only some samples compute the block).
BATCHED_BLOCK_ARGS = (
    "hidden_states",
    "encoder_hidden_states",
    "attention_mask",
    "encoder_attention_mask",
    "timestep",
    "temb",
    "class_labels",
)


_SIGNATURES: dict[type, inspect.Signature] = {}


def bind(block: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The block's forward arguments by name (positional ones too: Sana's blocks are called positionally)."""
    kind = type(block)
    sig = _SIGNATURES.get(kind)
    if sig is None:  # (reading a signature costs more than a reused block's whole work on a GPU: once per class)
        sig = _SIGNATURES[kind] = inspect.signature(kind.forward)
    return sig.bind(block, *args, **kwargs)


def call(forward, bound: inspect.BoundArguments):
    """Call the block's (bound-method) forward with `bound`'s arguments, less `self`."""
    return forward(*bound.args[1:], **bound.kwargs)


def residual(inputs, out):
    """What the block added to each stream: a tensor, or an (encoder, hidden) pair with None where absent."""
    if isinstance(out, torch.Tensor):
        return out - inputs["hidden_states"]
    enc_out, hid_out = out
    enc_in = inputs.get("encoder_hidden_states")
    # (a text input broadcast over the batch, e.g. FLUX's one negative prompt for several: the residual is per row)
    text = None if enc_out is None or enc_in is None or not _broadcasts(enc_in, enc_out) else enc_out - enc_in
    return (text, hid_out - inputs["hidden_states"])


def _broadcasts(x: torch.Tensor, to: torch.Tensor) -> bool:
    try:
        return torch.broadcast_shapes(x.shape, to.shape) == to.shape
    except RuntimeError:
        return False


def plus(x: torch.Tensor, res: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """`x + alpha * res`, laid out in memory as `res` (the layout of the block's own output) rather than as `x`. An
    elementwise result keeps its first operand's layout, and ops over mixed layouts take a strided path on a CPU
    (~5x slower than matching ones for bf16 at the emoji model's sizes): PixArt's first block gets its input
    transposed from the patch embedding, and a reused first block laid out as that input made every later block's
    add mixed too. Writing into a tensor laid out as `res` costs no copy (`torch.add(out=)`), and gives the same
    values. Tensors that need gradients take the plain op (`out=` has no autograd)."""
    if x.stride() == res.stride() or (torch.is_grad_enabled() and (x.requires_grad or res.requires_grad)):
        return x.add(res, alpha=alpha)
    return torch.add(x, res, alpha=alpha, out=torch.empty_like(res, dtype=torch.result_type(x, res)))


def add_residual(inputs, res):
    """Input plus residual, in the form of the block's output."""
    if isinstance(res, torch.Tensor):
        return plus(inputs["hidden_states"], res)
    enc_in = inputs.get("encoder_hidden_states")
    return (None if res[0] is None else plus(enc_in, res[0]), plus(inputs["hidden_states"], res[1]))


def rows_of(bound: inspect.BoundArguments, rows: torch.Tensor, n: int) -> inspect.BoundArguments:
    """The block's arguments for the given samples only."""

    def take(x):
        return x.index_select(0, rows) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x

    sliced = inspect.BoundArguments(bound.signature, bound.arguments.copy())
    for k in BATCHED_BLOCK_ARGS:
        if k in sliced.arguments:
            sliced.arguments[k] = take(sliced.arguments[k])
    return sliced


def form_of(out) -> tuple[bool, bool]:
    """(returns a pair, the pair's text entry is present): what `identity` needs to answer in the block's form."""
    if isinstance(out, torch.Tensor):
        return (False, False)
    return (True, out[0] is not None)


def identity(inputs, form: tuple[bool, bool]):
    """The block skipped: its input, in the form of its output."""
    pair, text = form
    if not pair:
        return inputs["hidden_states"]
    return (inputs.get("encoder_hidden_states") if text else None, inputs["hidden_states"])


def gate(inputs, out, weight: torch.Tensor):
    """`w * out + (1 - w) * input` per stream (Elastic-DiT's training gate `x + g (block(x) - x)`, written so that
    w = 1 is the block's output exactly); `weight` is a scalar or one weight per sample."""

    def stream(o, x):
        return o if o is None or x is None or o.shape != x.shape else mix(weight, o, x)

    if isinstance(out, torch.Tensor):
        return stream(out, inputs["hidden_states"])
    return (stream(out[0], inputs.get("encoder_hidden_states")), stream(out[1], inputs["hidden_states"]))


def mix(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`w * a + (1 - w) * b` with `w` a scalar or one weight per sample (row), in `a`'s dtype."""
    w = weight.to(a.dtype)
    w = w.reshape(-1, *([1] * (a.ndim - 1))) if w.ndim else w
    return w * a + (1 - w) * b
