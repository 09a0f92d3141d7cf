"""diffusers hooks that feed MoE layers what their block does not pass them: the call's timestep and LN(h).

- on the transformer (a listener on the shared call-context hook): each forward records its timestep per sample, in
  the scheduler's units as the call context gives it (FLUX's t / 1000 scaled back there), in every MoE layer, so
  capacity k(t) and the router's timestep embedding follow the step in any pipeline, routed or vanilla. One host
  read of the timestep per transformer call (capacity is a Python int, so the expert dispatch itself never syncs);
- on each upcycled block's pre-FFN norm: its output, LN(h) before the adaLN modulation, becomes the router input
  (Nucleus-Image's decoupled routing);
- `drive_nucleus_capacity`: a listener of the same kind sets the capacity factor of diffusers' own
  `NucleusMoEImageTransformer2DModel` layers from a k(t) schedule.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook

from diffroute.core.call_context import CallInfo, add_call_listener, remove_call_listener
from diffroute.surgery.moe.capacity import parse_capacity
from diffroute.utils.unhook import remove_hook

TIMESTEP_LISTENER = "diffroute_moe_timestep"
NORM_HOOK = "diffroute_moe_norm"


class _TimestepListener:
    """Calls `on_timestep` with each call's timestep: per sample in the scheduler's units, or as the call passes it
    (`raw`, for diffusers' Nucleus layers, whose pipeline passes t / num_train_timesteps). Calls without one: none."""

    def __init__(self, on_timestep, raw: bool = False):
        self.on_timestep, self.raw = on_timestep, raw

    def begin(self, info: CallInfo) -> None:
        if info.raw_timestep is not None:
            self.on_timestep(info.raw_timestep if self.raw else info.timestep)

    def end(self) -> None:
        pass


class _NormHook(ModelHook):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def post_forward(self, module, output):
        self.layer._route_input = output[0] if isinstance(output, tuple) else output
        return output


def _get(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def install_moe_hooks(transformer, arch, blocks, norms, layers) -> None:
    def on_timestep(timestep):
        for i, layer in enumerate(layers):  # scaled to the scheduler's units by the call context
            layer.set_timestep(timestep, timestep_scale=1.0, like=layers[0] if i else None)

    add_call_listener(transformer, TIMESTEP_LISTENER, _TimestepListener(on_timestep))
    for b, norm, layer in zip(blocks, norms, layers, strict=True):
        HookRegistry.check_if_exists_or_initialize(_get(arch.blocks[b], norm)).register_hook(
            _NormHook(layer), NORM_HOOK
        )
    transformer._diffroute_moe_norms = [_get(arch.blocks[b], n) for b, n in zip(blocks, norms, strict=True)]


def remove_moe_hooks(transformer) -> None:
    remove_call_listener(transformer, TIMESTEP_LISTENER)
    for norm in getattr(transformer, "_diffroute_moe_norms", []):
        remove_hook(norm, NORM_HOOK)
    transformer._diffroute_moe_norms = []


def drive_nucleus_capacity(transformer, capacity: str) -> None:
    """Set every MoE layer's capacity factor of a `NucleusMoEImageTransformer2DModel` from `capacity` (k(t), routed
    experts per token, the model's `capacity_factor` units) at each call. The batch shares its timestep at inference;
    the first sample's is read. `undrive_nucleus_capacity` restores the configured factors."""
    schedule = parse_capacity(capacity)
    layers = [b.img_mlp for b in transformer.transformer_blocks if getattr(b, "moe_enabled", False)]
    if not layers:
        raise ValueError("this transformer has no MoE layers (is it a NucleusMoEImageTransformer2DModel?)")
    for layer in layers:
        schedule.check(layer.num_experts)
    if getattr(transformer, "_diffroute_nucleus_factors", None) is None:  # the configured ones, once
        transformer._diffroute_nucleus_factors = [layer.capacity_factor for layer in layers]

    def on_timestep(timestep):
        t = float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)
        for layer in layers:  # Nucleus's pipeline passes t / num_train_timesteps, in [0, 1]
            layer.capacity_factor = schedule.k(t)

    undrive_nucleus_capacity(transformer, restore=False)
    add_call_listener(transformer, TIMESTEP_LISTENER, _TimestepListener(on_timestep, raw=True))


def undrive_nucleus_capacity(transformer, restore: bool = True) -> None:
    remove_call_listener(transformer, TIMESTEP_LISTENER)  # absent: nothing to do
    factors = getattr(transformer, "_diffroute_nucleus_factors", None)
    if restore and factors is not None:
        layers = [b.img_mlp for b in transformer.transformer_blocks if getattr(b, "moe_enabled", False)]
        for layer, f in zip(layers, factors, strict=True):
            layer.capacity_factor = f
        transformer._diffroute_nucleus_factors = None
