"""DAR (Diffusion-Adaptive Routing, arXiv 2605.20708): each block reads a timestep-dependent softmax mixture of the
patch embedding and all earlier blocks' outputs instead of the plain residual sum.

Sources `v_0` (the patch embedding, the first block's input) and `v_l = block_l(h_l) - h_l` (what block l wrote).
Block l reads `h_l = s_l * sum_i alpha_i v_i` with `alpha = softmax_i(q_l . RMSNorm(v_i) / sqrt(d))` per token, raw
values, and a final aggregator after the last block. Queries: `static` (`w_l`), `static+t` (`w_l + e(t)`, e a
zero-initialised projection of the timestep embedding) or `dynamic` (`W_l v_{l-1}` per token, zero-initialised), all
zero at the start so the weights start uniform. Modes: `scratch` (s_l = 1, the paper's plain mixture) and
`retrofit` (s_l = number of sources: with zero queries `s_l * mean(v_i) = sum(v_i)`, exactly the residual stream, so
a trained model is unchanged at initialisation and can be fine-tuned).

Deviations: there is no public reference code (formulas from the abstract and summaries, ROUTING.md §3); sources are
whole blocks, not the attention/FFN sublayers inside them (their residual adds live in diffusers' block code), so
PixArt's 6 blocks give 7 sources; no chunking (needed only at depth 50+).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import Timesteps

from diffroute.errors import PlanError
from diffroute.surgery.streams import StreamRewrite, install, refuse_twice, stream_dim, uninstall

CONFIG_KEY = "diffroute_dar"
QUERIES = ("static", "static+t", "dynamic")
MODES = ("retrofit", "scratch")


class DARAggregator(ModelMixin, ConfigMixin):
    """The queries of every aggregation point (before each block and after the last)."""

    @register_to_config
    def __init__(self, dim: int, num_blocks: int, mode: str = "retrofit", query: str = "static+t", time_dim: int = 64):
        super().__init__()
        if mode not in MODES or query not in QUERIES:
            raise PlanError(f"DAR mode must be one of {MODES} and query one of {QUERIES}; got {mode!r}, {query!r}.")
        points = num_blocks + 1
        self.queries = torch.nn.Parameter(torch.zeros(points, dim))
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_in = torch.nn.Linear(time_dim, points * dim)
        torch.nn.init.zeros_(self.time_in.weight)
        torch.nn.init.zeros_(self.time_in.bias)
        if query == "dynamic":
            self.dynamic = torch.nn.Parameter(torch.zeros(points, dim, dim))
        self.record = False  # keep the mean weights per call in `weights` (alpha against t)
        self.weights: list[dict] = []

    def query(self, point: int, t: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """q for one aggregation point: [B, 1, d] (static, static+t) or [B, S, d] (dynamic)."""
        q = self.queries[point].expand(t.shape[0], -1)
        if self.config.query == "static+t":
            emb = self.time_proj(t).to(self.time_in.weight.dtype)
            q = q + self.time_in(emb).view(t.shape[0], -1, q.shape[-1])[:, point]
        q = q[:, None, :]
        if self.config.query == "dynamic" and previous is not None:
            q = q + previous @ self.dynamic[point].to(previous.dtype).T
        return q

    def forward(self, point: int, sources: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """h = s * sum_i alpha_i v_i over `sources` ([B, S, d] each), alpha per token."""
        v = torch.stack(sources, dim=2)  # [B, S, n, d]
        keys = F.rms_norm(v.float(), (v.shape[-1],))
        q = self.query(point, t, sources[-1] if point else None).float()
        logits = (keys * q[:, :, None, :]).sum(-1) / math.sqrt(v.shape[-1])  # [B, S, n]
        alpha = torch.softmax(logits, dim=-1)
        if self.record:
            self.weights.append({"point": point, "t": t.tolist(), "alpha": alpha.mean(dim=(0, 1)).tolist()})
        scale = len(sources) if self.config.mode == "retrofit" else 1.0
        return (alpha.to(v.dtype)[..., None] * v).sum(dim=2) * scale


class DAR(StreamRewrite):
    """The DAR stream rewrite: collects sources during a call and replaces each block's input (and the output of
    the last block) by its aggregation."""

    def __init__(self, aggregator: DARAggregator):
        self.aggregator = aggregator
        self._t, self._sources, self._inputs = None, [], {}

    def begin_call(self, timestep):
        self._t, self._sources, self._inputs = timestep, [], {}

    def end_call(self):
        self._t, self._sources, self._inputs = None, [], {}

    def before(self, block, hidden):
        if block == 0:
            self._sources.append(hidden)  # v_0: the patch embedding
        h = self.aggregator(block, self._sources, self._t)
        self._inputs[block] = h
        return h

    def after(self, block, hidden):
        self._sources.append(hidden - self._inputs.pop(block))
        if block == self.num_blocks - 1:  # the final aggregator
            return self.aggregator(block + 1, self._sources, self._t)
        return hidden


def apply_dar(
    transformer: torch.nn.Module,
    mode: str = "retrofit",
    query: str = "static+t",
    aggregator: DARAggregator | None = None,
) -> DARAggregator:
    """Attach DAR to `transformer`; its aggregator becomes the submodule `dar` (saved with the transformer's
    weights, its settings in the config), so `routing.surgery.from_pretrained` restores it."""
    refuse_twice(transformer, "DAR")
    from diffroute.core.arch import architecture_map

    arch = architecture_map(transformer)
    if aggregator is None:
        aggregator = DARAggregator(stream_dim(transformer), arch.num_blocks, mode, query)
        param = next(transformer.parameters())
        torch.nn.Module.to(aggregator, device=param.device, dtype=param.dtype)
    settings = {"mode": aggregator.config.mode, "query": aggregator.config.query}
    install(transformer, "DAR", DAR(aggregator), CONFIG_KEY, settings)  # refused, nothing changed, if DTR is on
    transformer.dar = aggregator
    return aggregator


def remove_dar(transformer: torch.nn.Module) -> None:
    uninstall(transformer, "DAR", CONFIG_KEY)
    del transformer.dar
