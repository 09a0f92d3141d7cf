"""The expert-choice MoE FFN: a shared expert on every token plus E routed experts that each take their top-C tokens.

Mechanism (ROUTING.md §1; Nucleus-Image's decoupled routing, EC-DLM's timestep capacity):
- router logits `z = W_r [emb(t), LN(h)]` per token, from the router's own timestep embedding and the block's
  *unmodulated* normalised hidden state (the experts read the modulated one, as the block passes it);
- each routed expert takes the top-C tokens of its column **per sample** (a sample's output never depends on its
  batch-mates), `C = ceil(k(t) S / E)` from the capacity schedule;
- gates `g = 2 sigmoid(z)`, not renormalised per token (renormalising gives a token picked by one expert a weight of
  exactly 1 and kills its router gradient; see the pitfalls), so a zero router gives g = 1: the router starts at zero,
  and the upcycled FFN at full capacity is the dense FFN exactly when training starts;
- the router's auxiliary loss is a logit penalty `mean(z^2)`, minimal at z = 0, i.e. at the dense gates g = 1. (A
  softmax router's z-loss `mean(logsumexp(z)^2)` is minimal at logsumexp(z) = 0, which for sigmoid gates pulls every
  logit to -log E and every gate to 2 sigmoid(-log E), 0.29 for E = 6: a pull away from the dense model.)
- the tokens of every expert are gathered into one batched matmul and scatter-added back: FLOPs follow C, and the
  shapes are known ahead (no host sync in the dispatch).

Kinds of FFN, all cut from a dense one by slicing its hidden units (`upcycle.py`):
- `mlp`: `down(act(up(x)))` (diffusers `FeedForward` with GELU / tanh-GELU / linear activation; FLUX's single-stream
  `proj_mlp` + `act_mlp` + the MLP half of `proj_out`);
- `glumb`: Sana's GLUMBConv (1x1 conv, SiLU, 3x3 depthwise conv, GLU, 1x1 conv). A routed expert computes its
  pointwise convolutions on its C tokens only; the cheap depthwise 3x3 runs on a map that is zero at the tokens the
  expert did not take. At full capacity that is the dense layer exactly; below it, an expert's taken tokens no
  longer see their untaken neighbours' hidden activations (a deviation no paper covers: Nucleus has no conv FFN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import Timesteps

from diffroute.core.call_context import rows_of
from diffroute.errors import PlanError
from diffroute.surgery.moe.capacity import parse_capacity, tokens_per_expert

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu-tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "identity": lambda x: x,
}


class ExpertChoiceFFN(ModelMixin, ConfigMixin):
    """A shared expert of `shared_hidden` units and `num_experts` routed experts of `expert_hidden` units each."""

    @register_to_config
    def __init__(
        self,
        dim: int,
        num_experts: int,
        expert_hidden: int,
        shared_hidden: int,
        kind: str = "mlp",
        activation: str = "gelu-tanh",
        with_up_bias: bool = True,
        with_down_bias: bool = True,
        capacity: str = "static:2",
        time_dim: int = 64,
        router_init_std: float = 0.0,
        timestep_scale: float = 1.0,
        dense_hidden: int = 0,  # the dense FFN's hidden units before any pruning (0: shared + routed ones)
    ):
        super().__init__()
        if kind not in ("mlp", "glumb") or activation not in ACTIVATIONS:
            raise PlanError(f"unknown FFN kind {kind!r} or activation {activation!r}")
        self.capacity = parse_capacity(capacity)
        if num_experts:
            self.capacity.check(num_experts)
        parts = 2 if kind == "glumb" else 1  # GLUMBConv's up-projection has a value half and a gate half
        E, he, hs = num_experts, expert_hidden, shared_hidden

        def param(*shape):
            return torch.nn.Parameter(torch.zeros(*shape))

        self.shared_up, self.experts_up = param(parts, hs, dim), param(E, parts, he, dim)
        self.shared_up_bias = param(parts, hs) if with_up_bias else None
        self.experts_up_bias = param(E, parts, he) if with_up_bias else None
        self.shared_down, self.experts_down = param(dim, hs), param(E, dim, he)
        self.down_bias = param(dim) if with_down_bias else None
        if kind == "glumb":
            self.shared_depth, self.experts_depth = param(parts, hs, 3, 3), param(E, parts, he, 3, 3)
            self.shared_depth_bias, self.experts_depth_bias = param(parts, hs), param(E, parts, he)
        # Which dense hidden unit each kept unit was (shared first, then expert by expert): upcycling may sort
        # units by magnitude and drop the weakest (the pruned baseline); remove_moe puts them back in place.
        self.register_buffer("unit_order", torch.arange(hs + E * he))
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = torch.nn.Linear(time_dim, time_dim)
        self.router = torch.nn.Linear(time_dim + dim, E, bias=False)
        torch.nn.init.normal_(self.router.weight, std=router_init_std)  # (std 0: zeros, gates 1, the dense FFN)
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # Set per call by the transformer's capacity hook (hooks.py) and the block's norm hook.
        self._timestep: torch.Tensor | None = None  # [B], the model's units (0..1000)
        self._t_proj: torch.Tensor | None = None  # [B, time_dim], its sinusoidal projection
        self._t_frac: list[float] | None = None  # [B] on the host, t / T
        self._route_input: torch.Tensor | None = None  # LN(h) before the modulation, [B, S, d]
        self.dense_mix = 0.0  # progressive sparsification: k -> k + dense_mix * (E - k)
        self.last_router_loss: torch.Tensor | None = None  # mean(z^2) of the last training forward
        self.record = False  # keep per-call routing statistics in `stats`
        self.stats: list[dict] = []

    # ----- capacity -------------------------------------------------------------------------------------------
    def set_timestep(self, timestep: torch.Tensor, timestep_scale: float | None = None, like=None) -> None:
        """Record this call's timestep ([B] or scalar) in the model's units, times `timestep_scale` (default: the
        config's, FLUX 1000) to the scheduler's; the capacity hook does it per call, already scaled. `like`: a layer
        set for this call already, whose reading is shared (one host read and one sinusoid per call, not per layer)."""
        if like is not None and like.config.time_dim == self.config.time_dim:
            self._timestep, self._t_frac, self._t_proj = like._timestep, like._t_frac, like._t_proj
            return
        scale = self.config.timestep_scale if timestep_scale is None else timestep_scale
        t = torch.as_tensor(timestep).reshape(-1).float() * scale
        self._timestep = t
        self._t_frac = [min(max(v / 1000.0, 0.0), 1.0) for v in t.detach().cpu().tolist()]
        self._t_proj = self.time_proj(t)  # [B or 1, time_dim]: the sinusoid has no parameters, so layers share it

    def tokens_per_expert(self, seq_len: int, batch: int) -> list[int]:
        if self._t_frac is None:
            raise PlanError(
                "an expert-choice FFN needs the timestep: run it inside its transformer (upcycle_moe installs the "
                "hook that records it) or call set_timestep(t) first."
            )
        t_frac = rows_of(self._t_frac)  # a per-sample plan may run the block for some samples only
        t_frac = t_frac if len(t_frac) == batch else t_frac[:1] * batch
        E = self.config.num_experts
        return [tokens_per_expert(self.k(s), seq_len, E) for s in t_frac]

    def k(self, t_frac: float) -> float:
        """Routed experts per token at t, with the progressive-sparsification mix towards dense."""
        k = self.capacity.k(t_frac)
        return k + self.dense_mix * (self.config.num_experts - k)

    # ----- forward ---------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        image = hidden_states.ndim == 4  # Sana passes [B, d, H, W]
        if image:
            B, d, H, W = hidden_states.shape
            x = hidden_states.flatten(2).transpose(1, 2)
        else:
            x = hidden_states
        if self.config.kind == "mlp":
            out = self._mlp_forward(x)
        else:
            out = self._expert(x, *self._shared_weights(), grid=(H, W) if image else None) + self._routed(
                x, grid=(H, W) if image else None
            )
            if self.down_bias is not None:
                out = out + self.down_bias.to(out.dtype)
        return out.transpose(1, 2).reshape(B, d, H, W) if image else out

    def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The `mlp` kind's fast path: the shared expert's down-projection carries the FFN's bias, and the routed
        experts' gated outputs are index-added into it in place (no zero buffer, no extra sum over [B, S, d])."""
        dt = x.dtype
        act = ACTIVATIONS[self.config.activation]
        up_bias = None if self.shared_up_bias is None else self.shared_up_bias[0].to(dt)
        h = act(F.linear(x, self.shared_up[0].to(dt), up_bias))
        out = F.linear(h, self.shared_down.to(dt), None if self.down_bias is None else self.down_bias.to(dt))
        if self.config.num_experts == 0:
            return out
        rows, y = self._routed_rows(x)
        B, S, d = out.shape
        return out.reshape(B * S, d).index_add_(0, rows, y.to(out.dtype)).view(B, S, d)

    def _shared_weights(self):
        depth = (self.shared_depth, self.shared_depth_bias) if self.config.kind == "glumb" else (None, None)
        return self.shared_up, self.shared_up_bias, *depth, self.shared_down

    def _expert(self, x, up, up_bias, depth, depth_bias, down, grid=None, taken=None):
        """One `glumb` expert on tokens x [..., n, d]: up [2, h, d] -> SiLU -> depthwise conv -> GLU -> down [d, h]."""
        dt = x.dtype
        h = torch.einsum("...nd,phd->...pnh", x, up.to(dt))
        if up_bias is not None:
            h = h + up_bias.to(dt)[..., None, :]
        h = F.silu(h)
        h = self._depthwise(h, depth, depth_bias, grid, taken)
        return (h[..., 0, :, :] * F.silu(h[..., 1, :, :])) @ down.to(dt).T

    def _depthwise(self, h, weight, bias, grid, taken):
        """3x3 depthwise conv of h [B, P, n, h] on the (H, W) grid; with `taken` ([B, n] token indices of the S
        grid positions) the hidden map is zero elsewhere and the result is read back at the taken positions."""
        B, P, n, hid = h.shape
        H, W = grid
        if taken is None:
            m = h.permute(0, 1, 3, 2).reshape(B, P * hid, H, W)
        else:
            m = h.new_zeros(B, P * hid, H * W)
            src = h.permute(0, 1, 3, 2).reshape(B, P * hid, n)
            m = m.scatter(2, taken[:, None, :].expand(-1, P * hid, -1), src).reshape(B, P * hid, H, W)
        w = weight.to(h.dtype).reshape(P * hid, 1, 3, 3)
        m = F.conv2d(m, w, bias.to(h.dtype).reshape(-1), padding=1, groups=P * hid).flatten(2)
        if taken is not None:
            m = m.gather(2, taken[:, None, :].expand(-1, P * hid, -1))
        return m.reshape(B, P, hid, n).permute(0, 1, 3, 2)

    def _route(self, x: torch.Tensor):
        """Each routed expert's C best tokens per sample: indices [B, E, C] and gates [B, E, C] (slots beyond a
        sample's own C, when the batch mixes timesteps, get gate 0)."""
        B, S, _ = x.shape
        z = self.router_logits(x)  # [B, S, E], float32
        taken = self.tokens_per_expert(S, B)
        C = max(taken)
        top = torch.topk(z.transpose(1, 2), C, dim=-1)  # per sample, per expert: its C best tokens
        gates = 2 * torch.sigmoid(top.values)
        if min(taken) < C:  # samples at different timesteps (training): mask the slots beyond each one's C
            limit = torch.tensor(taken, device=x.device)[:, None, None]
            gates = gates * (torch.arange(C, device=x.device) < limit)
        if self.training and torch.is_grad_enabled():
            self.last_router_loss = z.square().mean()
        if self.record:
            self._record(top.indices, taken, S)
        return top.indices, gates

    def _routed_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `mlp` kind's routed experts: flat token rows [E * B * C] (expert-major) and their gated outputs
        [E * B * C, d]; one index_select in, two batched matmuls, no transposed copies."""
        B, S, d = x.shape
        E = self.config.num_experts
        idx, gates = self._route(x)
        C = idx.shape[-1]
        rows = (idx + torch.arange(B, device=x.device)[:, None, None] * S).transpose(0, 1).reshape(-1)
        g = gates.transpose(0, 1).reshape(E, B * C, 1)
        y = self._batched_mlp(x.reshape(B * S, d).index_select(0, rows).view(E, B * C, d), g)
        return rows, y.reshape(E * B * C, d)

    def _routed(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        """The routed experts' summed output [B, S, d] (the `glumb` kind; `mlp` adds its rows in place)."""
        B, S, d = x.shape
        E = self.config.num_experts
        if E == 0:
            return torch.zeros_like(x)
        idx, gates = self._route(x)
        C = idx.shape[-1]
        xe = x.gather(1, idx.reshape(B, E * C, 1).expand(-1, -1, d)).reshape(B, E, C, d).transpose(0, 1)
        y = torch.stack(
            [
                self._expert(
                    xe[e],
                    self.experts_up[e],
                    None if self.experts_up_bias is None else self.experts_up_bias[e],
                    self.experts_depth[e],
                    self.experts_depth_bias[e],
                    self.experts_down[e],
                    grid=grid,
                    taken=idx[:, e],
                )
                for e in range(E)
            ]
        )
        y = y * gates.transpose(0, 1)[..., None].to(y.dtype)
        y = y.transpose(0, 1).reshape(B, E * C, d)
        y = y.to(x.dtype)  # autocast may have run the experts in bf16
        return torch.zeros_like(x).scatter_add(1, idx.reshape(B, E * C, 1).expand(-1, -1, d), y)

    def _batched_mlp(self, xe: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """All routed experts of an `mlp` FFN in two batched matmuls: xe [E, N, d] -> [E, N, d], each row scaled by
        its gate [E, N, 1]. The gate scales the hidden units (the experts' down-projection has no bias, so that is
        the same product on half as many numbers as the output)."""
        dt = xe.dtype
        up = self.experts_up[:, 0].to(dt).transpose(1, 2)  # [E, d, h]
        if self.experts_up_bias is not None:
            h = torch.baddbmm(self.experts_up_bias[:, 0, None, :].to(dt), xe, up)
        else:
            h = torch.bmm(xe, up)
        h = ACTIVATIONS[self.config.activation](h) * gates.to(dt)
        return torch.bmm(h, self.experts_down.to(dt).transpose(1, 2))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """z = W_r [emb(t), LN(h)] per token, in float32 (the hidden state before the block's modulation when the
        norm hook recorded it, else LN of the FFN's own input)."""
        B, S, _ = x.shape
        h = self._route_input if self._route_input is not None and self._route_input.shape[:2] == (B, S) else x
        self._route_input = None
        proj = rows_of(self._t_proj) if self._t_proj is not None else self.time_proj(torch.zeros(1))
        proj = proj.to(x.device).expand(B, -1) if len(proj) == 1 else proj.to(x.device)
        temb = F.silu(self.time_mlp(proj.to(self.time_mlp.weight.dtype)))
        # W_r [emb(t), LN(h)] = W_t emb(t) + W_h LN(h): the timestep part once per sample, no [B, S, t + d] concat
        w = self.router.weight
        td = self.config.time_dim
        per_sample = F.linear(temb.to(w.dtype), w[:, :td])  # [B, E]
        per_token = F.linear(self.norm(h.to(temb.dtype)).to(w.dtype), w[:, td:])  # [B, S, E]
        return (per_token + per_sample[:, None, :]).float()

    def _record(self, idx: torch.Tensor, taken: list[int], S: int) -> None:
        """Per call: t, tokens per expert (C/S) and the share of tokens no routed expert picked (the drop ratio)."""
        B, E, C = idx.shape
        limit = torch.tensor(taken, device=idx.device)[:, None, None]
        valid = (torch.arange(C, device=idx.device) < limit).float().expand(B, E, C)
        counts = torch.zeros(B, S, device=idx.device).scatter_add(1, idx.reshape(B, -1), valid.reshape(B, -1))
        self.stats.append(
            {
                "t_frac": list(self._t_frac or []),
                "load": [c / S for c in taken],
                "dropped": (counts == 0).float().mean(dim=1).tolist(),
            }
        )

    def flop_share(self, seq_len: int, t_frac: float) -> float:
        """Hidden units a token runs through on average at t, as a fraction of the dense FFN's (its FLOP share)."""
        cfg = self.config
        C = tokens_per_expert(self.k(t_frac), seq_len, cfg.num_experts)
        routed = cfg.num_experts * C * cfg.expert_hidden / seq_len if cfg.num_experts else 0.0
        dense = cfg.dense_hidden or cfg.shared_hidden + cfg.num_experts * cfg.expert_hidden
        return (cfg.shared_hidden + routed) / dense
