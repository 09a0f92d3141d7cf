"""Architecture specs: one per transformer class, everything diffroute needs to know about a family (its blocks and
cacheable components, the timestep scale it is called with, the modulated input TeaCache reads, the FFN sites the
MoE upcycles), and the map of one model instance resolved from it. A new family is one spec (and a tiny fixture)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FfnSite:
    """Where a block keeps a dense FFN: its attribute, the norm whose output is LN(h) before the modulation, and
    how the FFN is built (`ff`: a FeedForward; `glumb`: Sana's GLUMBConv; `flux-single`: proj_mlp + proj_out)."""

    ffn: str
    norm: str
    form: str


@dataclass(frozen=True)
class ArchSpec:
    """Everything diffroute knows about a transformer class.

    `block_lists` are attribute names of `nn.ModuleList`s, walked in order (FLUX: double-stream, then single-stream).
    `components` are attribute names inside a block; a block that lacks one (DiT has no `attn2`, the last SD3 block
    no `ff_context`) simply has no such component. `timestep_scale` turns the timestep the model is called with into
    the scheduler's (FLUX is called with t / 1000). `modulated_input(block, args, kwargs)` is block 0's timestep-
    modulated input as TeaCache measures it (None: no TeaCache). `ffn_sites`, per block list, is the image-token FFN
    the MoE upcycles (text-stream FFNs stay dense; empty: no MoE). `call_invariant` names modules of the transformer
    whose input is the same tensor at every step of a call (the text projection: computed once per call).
    """

    block_lists: tuple[str, ...]
    components: tuple[str, ...]
    timestep_scale: float = 1.0
    modulated_input: Callable | None = None
    ffn_sites: dict[str, FfnSite] = field(default_factory=dict)
    call_invariant: tuple[str, ...] = ()


def _bind(block, args, kwargs) -> dict:
    return inspect.signature(type(block).forward).bind(block, *args, **kwargs).arguments


def _ada_single(block, args, kwargs):
    """PixArt and Sana: LayerNorm, then shift/scale from scale_shift_table + the block's timestep embedding."""
    a = _bind(block, args, kwargs)
    h, t = a["hidden_states"], a["timestep"]
    shift, scale = (block.scale_shift_table[None] + t.reshape(h.shape[0], 6, -1))[:, :2].chunk(2, dim=1)
    return block.norm1(h) * (1 + scale) + shift


def _ada_zero_dit(block, args, kwargs):
    a = _bind(block, args, kwargs)
    h = a["hidden_states"]
    return block.norm1(h, a["timestep"], a["class_labels"], hidden_dtype=h.dtype)[0]


def _ada_zero_temb(block, args, kwargs):
    """SD3 and FLUX: AdaLayerNormZero(hidden_states, emb=temb)."""
    a = _bind(block, args, kwargs)
    return block.norm1(a["hidden_states"], emb=a["temb"])[0]


_BLOCKS = ("transformer_blocks",)
# Component names follow what each block's forward actually calls (see diffusers' attention.py and transformer_*.py).
ARCHITECTURES: dict[str, ArchSpec] = {
    "PixArtTransformer2DModel": ArchSpec(
        _BLOCKS,
        ("attn1", "attn2", "ff"),
        1.0,
        _ada_single,
        {"transformer_blocks": FfnSite("ff", "norm2", "ff")},
        ("caption_projection",),
    ),
    "DiTTransformer2DModel": ArchSpec(
        _BLOCKS, ("attn1", "ff"), 1.0, _ada_zero_dit, {"transformer_blocks": FfnSite("ff", "norm3", "ff")}
    ),
    "SD3Transformer2DModel": ArchSpec(
        _BLOCKS,
        ("attn", "attn2", "ff", "ff_context"),
        1.0,
        _ada_zero_temb,
        {"transformer_blocks": FfnSite("ff", "norm2", "ff")},
        ("context_embedder",),
    ),
    "FluxTransformer2DModel": ArchSpec(
        ("transformer_blocks", "single_transformer_blocks"),
        ("attn", "ff", "ff_context", "proj_mlp", "proj_out"),
        1000.0,
        _ada_zero_temb,
        {
            "transformer_blocks": FfnSite("ff", "norm2", "ff"),
            "single_transformer_blocks": FfnSite("proj_mlp", "norm.norm", "flux-single"),
        },
        ("context_embedder",),
    ),
    "SanaTransformer2DModel": ArchSpec(
        _BLOCKS,
        ("attn1", "attn2", "ff"),
        1.0,
        _ada_single,
        {"transformer_blocks": FfnSite("ff", "norm2", "glumb")},
        ("caption_projection",),
    ),
    # Nucleus-Image: single-stream blocks; `img_mlp` is the expert-choice MoE layer (dense in the first blocks).
    "NucleusMoEImageTransformer2DModel": ArchSpec(_BLOCKS, ("attn", "img_mlp")),
}


def spec_of(model_or_class) -> ArchSpec | None:
    """The spec of a transformer (instance, class or class name), looked up along its class hierarchy; None if none."""
    if isinstance(model_or_class, str):
        return ARCHITECTURES.get(model_or_class)
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return next((ARCHITECTURES[c.__name__] for c in cls.__mro__ if c.__name__ in ARCHITECTURES), None)


def register_architecture(model_class: type | str, spec: ArchSpec) -> None:
    """Teach diffroute a new transformer class (or override a shipped map)."""
    name = model_class if isinstance(model_class, str) else model_class.__name__
    ARCHITECTURES[name] = spec


class UnsupportedModelError(TypeError):
    """Raised for a transformer class that has no architecture map."""


@dataclass
class ArchitectureMap:
    """The resolved map of one model instance: blocks, component names and which (block, component) exist."""

    model_class: str
    block_names: list[str]
    components: tuple[str, ...]
    modules: list[list[torch.nn.Module | None]]  # [block][component]; None where the block lacks it
    blocks: list[torch.nn.Module]
    model: torch.nn.Module | None = None
    spec: ArchSpec | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def present(self) -> torch.Tensor:
        """Boolean [blocks x components]: True where the block has that component."""
        return torch.tensor([[m is not None for m in row] for row in self.modules], dtype=torch.bool)


def _spec_for(model: torch.nn.Module) -> tuple[str, ArchSpec]:
    for cls in type(model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return cls.__name__, ARCHITECTURES[cls.__name__]
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedModelError(
        f"diffroute has no architecture map for {type(model).__name__}. Supported: {supported}. "
        "To add one, call diffroute.register_architecture(YourModelClass, "
        "diffroute.ArchSpec(block_lists=('transformer_blocks',), components=('attn1', 'attn2', 'ff')))."
    )


def architecture_map(model: torch.nn.Module) -> ArchitectureMap:
    """Resolve the blocks and components of `model` (a diffusers transformer)."""
    model_class, spec = _spec_for(model)
    block_names, modules, block_modules = [], [], []
    for list_name in spec.block_lists:
        blocks = getattr(model, list_name, None)
        if blocks is None:
            raise UnsupportedModelError(f"{model_class} has no attribute {list_name!r} that its ArchSpec names.")
        for i, block in enumerate(blocks):
            block_names.append(f"{list_name}.{i}")
            block_modules.append(block)
            modules.append([_component(block, name) for name in spec.components])
    if not block_names:
        raise UnsupportedModelError(f"{model_class} has no blocks under {spec.block_lists}.")
    if not any(m is not None for row in modules for m in row):
        raise UnsupportedModelError(
            f"No component of {spec.components} exists in any block of {model_class}: the ArchSpec does not match "
            "this model (diffroute refuses rather than silently caching nothing)."
        )
    return ArchitectureMap(model_class, block_names, spec.components, modules, block_modules, model, spec)


def _component(block: torch.nn.Module, name: str) -> torch.nn.Module | None:
    module = getattr(block, name, None)
    return module if isinstance(module, torch.nn.Module) else None
