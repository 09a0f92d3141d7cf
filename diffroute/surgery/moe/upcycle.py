"""Slice upcycling: swap a transformer's dense FFNs for expert-choice MoE FFNs cut from their own hidden units.

An FFN is a sum over its hidden units, so partitioning the units into a shared expert and E routed experts keeps the
function: at full capacity (every expert takes every token) with gate 1 the MoE layer *is* the dense FFN, up to the
order of the floating-point sums (ROUTING.md §1a, "slice upcycling"). Units are cut in their stored order: the
shared expert takes the first `shared * expert_hidden`, expert e the next slices.

`upcycle_moe` is reversible in place: `remove_moe` folds the (possibly trained) expert weights back into the dense
modules it swapped out, so upcycle -> remove gives back the original weights bitwise. The upcycled transformer saves
with its own `save_pretrained` (the MoE settings go into its config under `diffroute_moe`) and loads back with
`moe.from_pretrained`, which rebuilds the swap before reading the weights.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU, LinearActivation
from diffusers.models.attention import FeedForward

from diffroute.core.arch import ARCHITECTURES, ArchitectureMap, FfnSite, architecture_map
from diffroute.errors import PlanError
from diffroute.surgery.config import drop_config_key
from diffroute.surgery.moe.hooks import install_moe_hooks, remove_moe_hooks
from diffroute.surgery.moe.layer import ExpertChoiceFFN


class SplitProjection(torch.nn.Module):
    """FLUX single-stream `proj_out` once its MLP half moved into the MoE: `W_attn a + b + m`, where the block
    concatenates [attention output a, MoE output m] (so the MLP's down-projection follows capacity too)."""

    def __init__(self, proj_out: torch.nn.Linear, attn_dim: int):
        super().__init__()
        self.attn_dim = attn_dim
        self.weight = torch.nn.Parameter(proj_out.weight.detach()[:, :attn_dim].clone())
        self.bias = None if proj_out.bias is None else torch.nn.Parameter(proj_out.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, m = x[..., : self.attn_dim], x[..., self.attn_dim :]
        return torch.nn.functional.linear(a, self.weight, self.bias) + m


def _dense_parts(block, site: FfnSite):
    """(up weight [P, H, d], up bias [P, H] | None, depth weight [P, H, 3, 3] | None, depth bias, down [d, H],
    down bias [d] | None, activation) of a block's dense FFN."""
    module = _get(block, site.ffn)
    if site.form == "ff":
        if not isinstance(module, FeedForward) or not isinstance(module.net[0], GELU | LinearActivation):
            raise PlanError(f"{type(block).__name__}.{site.ffn} is not a GELU/linear FeedForward; cannot upcycle it")
        act = module.net[0]
        if isinstance(act, GELU):
            activation = "gelu-tanh" if act.approximate == "tanh" else "gelu"
        else:
            activation = {"SiLU": "silu", "Identity": "identity"}.get(type(act.activation).__name__)
            if activation is None:
                raise PlanError(f"unsupported FFN activation {type(act.activation).__name__}")
        up, out = act.proj, module.net[2]
        return up.weight[None], _opt(up.bias), None, None, out.weight, out.bias, activation
    if site.form == "flux-single":
        d = block.proj_out.in_features - module.out_features
        w = block.proj_out.weight[:, d:]
        return module.weight[None], _opt(module.bias), None, None, w, None, "gelu-tanh"
    if site.form == "glumb":
        if module.norm_type is not None or module.residual_connection:
            raise PlanError("only Sana's GLUMBConv without norm and residual (its transformer's setting) is supported")
        inv, depth = module.conv_inverted, module.conv_depth
        P, H = 2, inv.out_channels // 2
        up_w = inv.weight.reshape(P, H, -1)
        up_b = None if inv.bias is None else inv.bias.reshape(P, H)
        return (
            up_w,
            up_b,
            depth.weight.reshape(P, H, 3, 3),
            depth.bias.reshape(P, H),
            module.conv_point.weight.flatten(1),
            None,
            "silu",
        )
    raise PlanError(f"unknown FFN form {site.form!r}")


def _opt(bias):
    return None if bias is None else bias[None]


def _get(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def upcycle_moe(
    transformer: torch.nn.Module,
    num_experts: int = 6,
    shared: int = 2,
    blocks: list[int] | None = None,
    capacity: str = "static:2",
    router_init_std: float = 0.0,
    time_dim: int = 64,
    prune: int = 0,
) -> list[ExpertChoiceFFN]:
    """Swap the image-token FFNs of `blocks` (default: all but the first, which stays dense) for expert-choice MoE
    layers: the hidden units split into `num_experts + shared + prune` equal slices, `shared` of them one shared
    expert. With `prune`, units are first sorted by magnitude (|up row| * |down column|) and the weakest `prune`
    slices dropped: `num_experts=0, shared=4, prune=4` is the magnitude-pruned half-width FFN baseline.
    Returns the new layers, in block order."""
    if getattr(transformer, "_diffroute_moe", None):
        raise PlanError("this transformer is upcycled already; call remove_moe(transformer) first.")
    arch = architecture_map(transformer)
    sites = arch.spec.ffn_sites if arch.spec is not None else {}
    if not sites:
        supported = ", ".join(k for k, v in ARCHITECTURES.items() if v.ffn_sites)
        raise PlanError(f"no MoE sites are known for {arch.model_class}; supported: {supported}")
    blocks = list(range(1, arch.num_blocks)) if blocks is None else list(blocks)
    bad = [b for b in blocks if not 0 <= b < arch.num_blocks]
    if bad:
        raise PlanError(f"block {bad[0]} does not exist: the model has blocks 0..{arch.num_blocks - 1}")
    settings = dict(
        num_experts=num_experts,
        shared=shared,
        blocks=blocks,
        capacity=str(capacity),
        router_init_std=router_init_std,
        time_dim=time_dim,
        prune=prune,
    )
    layers, swapped = [], []
    for b in blocks:
        block, site = arch.blocks[b], sites[_list_of(arch, b)]
        up, up_b, depth, depth_b, down, down_b, activation = _dense_parts(block, site)
        P, H, d = up.shape
        slices = num_experts + shared + prune
        if H % slices:
            raise PlanError(
                f"block {b}'s FFN has {H} hidden units, not divisible into {num_experts} experts + {shared} shared "
                f"(+ {prune} pruned) slices; pick counts whose sum divides {H}."
            )
        he = H // slices
        hs = shared * he
        order = torch.arange(H, device=up.device)
        if prune:
            strength = up.detach().float().norm(dim=(0, 2)) * down.detach().float().norm(dim=0)
            order = torch.argsort(strength, descending=True)
        order = order[: hs + num_experts * he]
        up, down = up[:, order], down[:, order]
        up_b = None if up_b is None else up_b[:, order]
        if depth is not None:
            depth, depth_b = depth[:, order], depth_b[:, order]
        layer = ExpertChoiceFFN(
            dim=d,
            num_experts=num_experts,
            expert_hidden=he,
            shared_hidden=hs,
            kind="glumb" if site.form == "glumb" else "mlp",
            activation=activation,
            with_up_bias=up_b is not None,
            with_down_bias=down_b is not None,
            capacity=str(capacity),
            time_dim=time_dim,
            router_init_std=router_init_std,
            timestep_scale=arch.spec.timestep_scale,
            dense_hidden=H,
        )
        torch.nn.Module.to(layer, device=up.device, dtype=up.dtype)  # ModelMixin.to warns about fp32 modules it has not
        with torch.no_grad():
            layer.shared_up.copy_(up[:, :hs])
            layer.experts_up.copy_(up[:, hs:].reshape(P, num_experts, he, d).transpose(0, 1))
            if up_b is not None:
                layer.shared_up_bias.copy_(up_b[:, :hs])
                layer.experts_up_bias.copy_(up_b[:, hs:].reshape(P, num_experts, he).transpose(0, 1))
            if depth is not None:
                layer.shared_depth.copy_(depth[:, :hs])
                layer.experts_depth.copy_(depth[:, hs:].reshape(P, num_experts, he, 3, 3).transpose(0, 1))
                layer.shared_depth_bias.copy_(depth_b[:, :hs])
                layer.experts_depth_bias.copy_(depth_b[:, hs:].reshape(P, num_experts, he).transpose(0, 1))
            layer.shared_down.copy_(down[:, :hs])
            layer.experts_down.copy_(down[:, hs:].reshape(d, num_experts, he).permute(1, 0, 2))
            if down_b is not None:
                layer.down_bias.copy_(down_b)
            layer.unit_order.copy_(order)
        swapped.append(_swap_in(block, site, layer))
        layers.append(layer)
    transformer._diffroute_moe = {
        "layers": layers,
        "swapped": swapped,
        "blocks": blocks,
        "sites": [sites[_list_of(arch, b)] for b in blocks],
    }
    transformer.register_to_config(diffroute_moe=settings)
    install_moe_hooks(transformer, arch, blocks, [sites[_list_of(arch, b)].norm for b in blocks], layers)
    return layers


def _list_of(arch: ArchitectureMap, b: int) -> str:
    return arch.block_names[b].split(".")[0]


def _swap_in(block, site: FfnSite, layer: ExpertChoiceFFN) -> dict:
    """Put the MoE layer where the dense FFN was; returns what it replaced (for remove_moe)."""
    if site.form == "flux-single":
        old = {"proj_mlp": block.proj_mlp, "act_mlp": block.act_mlp, "proj_out": block.proj_out}
        block.proj_out = SplitProjection(block.proj_out, block.proj_out.in_features - block.proj_mlp.out_features)
        block.proj_mlp, block.act_mlp = layer, torch.nn.Identity()
        return old
    old = {site.ffn: getattr(block, site.ffn)}
    setattr(block, site.ffn, layer)
    return old


def remove_moe(transformer: torch.nn.Module) -> None:
    """Undo upcycle_moe: fold each MoE layer's shared and routed weights back into the dense FFN it replaced (the
    dense equivalent at full capacity and gate 1) and put that FFN back."""
    state = getattr(transformer, "_diffroute_moe", None)
    if not state:
        raise PlanError("this transformer has no MoE layers to remove.")
    remove_moe_hooks(transformer)
    arch = architecture_map(transformer)
    for b, site, layer, old in zip(state["blocks"], state["sites"], state["layers"], state["swapped"], strict=True):
        block = arch.blocks[b]
        _fold(layer, site, old, block)
        for name, module in old.items():
            setattr(block, name, module)
    del transformer._diffroute_moe
    drop_config_key(transformer, "diffroute_moe")


@torch.no_grad()
def _fold(layer: ExpertChoiceFFN, site: FfnSite, old: dict, block) -> None:
    """Write the layer's units back to their dense positions (`unit_order`); pruned units become zero."""
    E, P, he, d = layer.experts_up.shape
    order = layer.unit_order
    dense = old.get(site.ffn) if site.form != "flux-single" else old["proj_mlp"]
    H = {
        "ff": lambda: dense.net[0].proj.out_features,
        "flux-single": lambda: dense.out_features,
        "glumb": lambda: dense.conv_inverted.out_channels // 2,
    }[site.form]()

    def placed(kept: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(kept.shape)
        shape[dim] = H
        return kept.new_zeros(shape).index_copy(dim, order, kept)

    up = placed(torch.cat([layer.shared_up, layer.experts_up.transpose(0, 1).reshape(P, E * he, d)], 1), 1)
    down = placed(torch.cat([layer.shared_down, layer.experts_down.permute(1, 0, 2).reshape(d, E * he)], 1), 1)
    up_b = None
    if layer.shared_up_bias is not None:
        up_b = placed(torch.cat([layer.shared_up_bias, layer.experts_up_bias.transpose(0, 1).reshape(P, -1)], 1), 1)
    if site.form == "ff":
        dense.net[0].proj.weight.copy_(up[0])
        if up_b is not None:
            dense.net[0].proj.bias.copy_(up_b[0])
        dense.net[2].weight.copy_(down)
        if layer.down_bias is not None:
            dense.net[2].bias.copy_(layer.down_bias)
    elif site.form == "flux-single":
        dense.weight.copy_(up[0])
        if up_b is not None:
            dense.bias.copy_(up_b[0])
        split = block.proj_out
        old["proj_out"].weight[:, : split.attn_dim].copy_(split.weight)
        old["proj_out"].weight[:, split.attn_dim :].copy_(down)
        if split.bias is not None:
            old["proj_out"].bias.copy_(split.bias)
    else:
        depth = torch.cat([layer.shared_depth, layer.experts_depth.transpose(0, 1).reshape(P, E * he, 3, 3)], 1)
        depth_b = torch.cat([layer.shared_depth_bias, layer.experts_depth_bias.transpose(0, 1).reshape(P, -1)], 1)
        dense.conv_inverted.weight.copy_(up.reshape(dense.conv_inverted.weight.shape))
        dense.conv_inverted.bias.copy_(up_b.reshape(-1))
        dense.conv_depth.weight.copy_(placed(depth, 1).reshape(dense.conv_depth.weight.shape))
        dense.conv_depth.bias.copy_(placed(depth_b, 1).reshape(-1))
        dense.conv_point.weight.copy_(down.reshape(dense.conv_point.weight.shape))


def moe_layers(transformer: torch.nn.Module) -> list[ExpertChoiceFFN]:
    """The MoE layers of an upcycled transformer (empty list if it is dense)."""
    state = getattr(transformer, "_diffroute_moe", None)
    return list(state["layers"]) if state else []
