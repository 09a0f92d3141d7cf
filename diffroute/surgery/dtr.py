"""Denoising Task Routing (DTR, arXiv 2310.07138): each timestep is a task with its own window of channels.

A fixed mask `m_t` per timestep keeps a contiguous window of `n = int(beta d)` channels starting at
`round((t / (T - 1))^alpha (d - n))`, so low-noise tasks share windows while high-noise ones slide apart. Each block
reads the masked stream and writes its update to all channels: `out = x + block(x * m_t) - x * m_t` (the reference
code's DiT blocks; the same mask in every block). No parameters, so it is a from-scratch training option: switching
it on in a trained model is a large change of function, not a retrofit. Masks are indexed by the scheduler's
timestep (t / 1000 for FLUX's [0, 1] times), per sample.
"""

from __future__ import annotations

import torch

from diffroute.errors import PlanError
from diffroute.surgery.streams import StreamRewrite, install, stream_dim, uninstall

CONFIG_KEY = "diffroute_dtr"


def dtr_masks(t: torch.Tensor, dim: int, beta: float = 0.8, alpha: float = 4.0, T: int = 1000) -> torch.Tensor:
    """[B, dim] masks (1 = active channel) for timesteps t ([B], in [0, T))."""
    n = int(beta * dim)
    start = torch.round((t.float().clamp(0, T - 1) / (T - 1)) ** alpha * (dim - n)).long()
    channels = torch.arange(dim, device=t.device)
    return ((channels >= start[:, None]) & (channels < start[:, None] + n)).float()


class DTR(StreamRewrite):
    """The DTR stream rewrite for one transformer (see the module docstring)."""

    def __init__(self, dim: int, beta: float = 0.8, alpha: float = 4.0):
        if not 0 < beta <= 1 or alpha <= 0:
            raise PlanError(f"DTR needs 0 < beta <= 1 and alpha > 0; got beta={beta}, alpha={alpha}.")
        self.dim, self.beta, self.alpha = dim, beta, alpha
        self._mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}

    def begin_call(self, timestep):
        self._mask = dtr_masks(timestep, self.dim, self.beta, self.alpha)[:, None, :]

    def end_call(self):
        self._mask, self._inputs = None, {}

    def before(self, block, hidden):
        self._inputs[block] = hidden
        return hidden * self._mask.to(hidden.dtype)

    def after(self, block, hidden):
        x = self._inputs.pop(block)
        return x + (hidden - x * self._mask.to(x.dtype))


def apply_dtr(transformer: torch.nn.Module, beta: float = 0.8, alpha: float = 4.0) -> DTR:
    """Attach DTR to `transformer` (recorded in its config, so a model trained with it saves and loads with it)."""
    return install(
        transformer, "DTR", DTR(stream_dim(transformer), beta, alpha), CONFIG_KEY, {"beta": beta, "alpha": alpha}
    )


def remove_dtr(transformer: torch.nn.Module) -> None:
    uninstall(transformer, "DTR", CONFIG_KEY)
