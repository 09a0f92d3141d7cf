"""Architecture map: the ordered blocks of a diffusers transformer and each block's cacheable components."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchSpec:
    """Where a transformer class keeps its blocks and which submodules of a block are components.

    `block_lists` are attribute names of `nn.ModuleList`s, walked in order (FLUX: double-stream, then single-stream).
    `components` are attribute names inside a block; a block that lacks one (DiT has no `attn2`, the last SD3 block
    no `ff_context`) simply has no such component.
    """

    block_lists: tuple[str, ...]
    components: tuple[str, ...]


# Component names follow what each block's forward actually calls (see diffusers' attention.py and transformer_*.py).
ARCHITECTURES: dict[str, ArchSpec] = {
    "PixArtTransformer2DModel": ArchSpec(("transformer_blocks",), ("attn1", "attn2", "ff")),
    "DiTTransformer2DModel": ArchSpec(("transformer_blocks",), ("attn1", "ff")),
    "SD3Transformer2DModel": ArchSpec(("transformer_blocks",), ("attn", "attn2", "ff", "ff_context")),
    "FluxTransformer2DModel": ArchSpec(
        ("transformer_blocks", "single_transformer_blocks"), ("attn", "ff", "ff_context", "proj_mlp", "proj_out")
    ),
    "SanaTransformer2DModel": ArchSpec(("transformer_blocks",), ("attn1", "attn2", "ff")),
    # Nucleus-Image: single-stream blocks; `img_mlp` is the expert-choice MoE layer (dense in the first blocks).
    "NucleusMoEImageTransformer2DModel": ArchSpec(("transformer_blocks",), ("attn", "img_mlp")),
}


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
    return ArchitectureMap(model_class, block_names, spec.components, modules, block_modules, model)


def _component(block: torch.nn.Module, name: str) -> torch.nn.Module | None:
    module = getattr(block, name, None)
    return module if isinstance(module, torch.nn.Module) else None
