"""Named models and how to load them: `load_pipeline("emoji")`, or a local folder / hub id of a pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffroute.zoo.emoji as emoji
from diffroute.errors import InputError


@dataclass
class ModelEntry:
    """A named pipeline: how to build it, the call arguments it needs, and what it is."""

    build: Callable[[], object]
    call_defaults: dict = field(default_factory=dict)
    description: str = ""
    random_weights: bool = False
    example_prompts: list[str] | Callable[[], list[str]] = field(default_factory=list)
    # Domain CLIP score: (uint8 [N, 3, H, W] images, captions) -> per-image scores; None if the model has none.
    clip_scorer: Callable | None = None
    base: str | None = None  # a variant: the zoo model whose data, prompts and metrics it shares

    def family(self, name: str) -> str:
        """The zoo model whose data set this one draws (itself, or the base of a variant)."""
        return self.base or name

    def prompts(self) -> list[str]:
        return self.example_prompts() if callable(self.example_prompts) else list(self.example_prompts)


def _tiny_pixart_demo():
    from diffroute.zoo.tiny import tiny_pixart_demo

    return tiny_pixart_demo()


DEFAULT_MODEL = "emoji"
MODELS: dict[str, ModelEntry] = {
    "emoji": ModelEntry(
        emoji.load_emoji_pipeline,
        dict(emoji.CALL_DEFAULTS),
        "PixArt-α architecture trained by diffroute on 32x32 emoji, MiniLM text encoder",
        example_prompts=lambda: emoji.heldout_captions(8, spread=True),
        clip_scorer=lambda images, captions: _emoji_clip_scores(images, captions),
    ),
    "tiny-pixart": ModelEntry(
        _tiny_pixart_demo,
        dict(height=32, width=32, clean_caption=False, use_resolution_binning=False, max_sequence_length=16),
        "PixArt-α architecture, 6 blocks of width 192, RANDOM weights (shows speed, not quality)",
        random_weights=True,
        example_prompts=["a red apple", "grinning face", "flag: japan", "a smiling cat"],
    ),
}


def load_transformer(folder: Path, dtype=None):
    """A transformer saved with `save_pretrained`: an upcycled MoE (rebuilt by its loader) or a plain diffusers one."""
    import json

    import diffusers

    from diffroute.surgery.loader import from_pretrained, is_modified_folder

    if is_modified_folder(folder):
        return from_pretrained(folder, dtype=dtype)
    try:
        cls = getattr(diffusers, json.loads((Path(folder) / "config.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{folder} is not a diffusers transformer folder: {e}") from e
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(folder, **kwargs).eval()


def _variant(base: str, folder: Path):
    """Build the zoo pipeline `base` with the transformer saved in `folder/transformer`."""

    def build():
        import torch

        pipe = MODELS[base].build()
        pipe.register_modules(transformer=load_transformer(folder / "transformer", dtype=torch.float32))
        return pipe

    return build


def _register_variants() -> None:
    """Zoo variants shipped beside the base models: `weights/NAME/variant.json` names the base (e.g. emoji-moe)."""
    import json

    from diffroute.zoo.emoji import WEIGHTS

    for spec in sorted(WEIGHTS.glob("*/variant.json")):
        try:
            base = json.loads(spec.read_text())["base"]
            entry = MODELS[base]
        except (OSError, ValueError, KeyError, TypeError) as e:  # one broken file must not break every command
            import warnings

            warnings.warn(
                f"zoo variant {spec.parent.name!r} skipped: {spec} is not valid ({e!r}); reinstall it.", stacklevel=2
            )
            continue
        MODELS[spec.parent.name] = ModelEntry(
            _variant(base, spec.parent),
            dict(entry.call_defaults),
            f"{base} with a fine-tuned transformer ({spec.parent.name})",
            example_prompts=entry.example_prompts,
            clip_scorer=entry.clip_scorer,
            base=base,
        )


def _emoji_clip_scores(images, captions):
    from diffroute.metrics.clipscore import emoji_clip_scores

    return emoji_clip_scores(images, captions)


_register_variants()


def model_family(name: str) -> str | None:
    """`emoji` for emoji and its variants (emoji-moe, emoji-elastic); None for folders and hub ids."""
    entry = MODELS.get(name)
    if entry:
        return entry.family(name)
    spec = Path(name) / "variant.json"  # a fine-tuned pipeline folder names its base
    if spec.is_file():
        import json

        try:
            return json.loads(spec.read_text()).get("base")
        except ValueError as e:
            raise ValueError(f"{spec} is not valid JSON ({e}); fix or delete it.") from e
    return None


def model_domain(name: str) -> str:
    """The image domain a model folder was trained for (`variant.json`'s `domain`; emoji otherwise)."""
    import json

    spec = Path(name) / "variant.json"
    return json.loads(spec.read_text()).get("domain", "emoji") if spec.is_file() else "emoji"


def register_model(name: str, entry: ModelEntry) -> None:
    MODELS[name] = entry


def call_defaults(name_or_pipe) -> dict:
    """Call arguments a named model (or a loaded pipeline) needs, e.g. tiny sizes; {} for anything else."""
    if not isinstance(name_or_pipe, str):
        return dict(getattr(name_or_pipe, "call_defaults", {}) or {})
    entry = MODELS.get(name_or_pipe)
    return dict(entry.call_defaults) if entry else {}


def load_pipeline(name: str = DEFAULT_MODEL, device=None, dtype=None):
    """A routed pipeline for a zoo name, a local pipeline folder or a hub id (the latter needs the hub), on `device`
    and in `dtype` (None: as the model loads; a folder or hub id is loaded in `dtype` directly, never via float32)."""
    from diffroute.pipelines import to_routed

    if name in MODELS:
        pipe = MODELS[name].build()
        pipe.call_defaults = {**pipe.call_defaults, **MODELS[name].call_defaults}
    else:
        from diffusers import DiffusionPipeline

        if not Path(name).exists() and "/" not in name:
            raise ValueError(
                f"Unknown model {name!r}: not a zoo name ({', '.join(MODELS)}), not a local folder, not a hub id."
            )
        from diffroute.pipelines.routed import read_call_defaults
        from diffroute.utils.quiet import loading_bars_off

        kwargs = {"dtype": dtype} if dtype is not None else {}
        from diffroute.experts.ensemble import is_ensemble_folder, load_ensemble
        from diffroute.surgery.loader import from_pretrained, is_modified_folder

        if Path(name).is_dir() and is_modified_folder(Path(name) / "transformer"):  # diffusers would drop the experts
            kwargs["transformer"] = from_pretrained(Path(name) / "transformer", dtype=dtype)
        elif Path(name).is_dir() and is_ensemble_folder(Path(name) / "transformer"):  # checked before it allocates
            kwargs["transformer"] = load_ensemble(Path(name) / "transformer", dtype=dtype)
        try:
            with loading_bars_off():
                pipe = to_routed(DiffusionPipeline.from_pretrained(name, use_safetensors=True, **kwargs))
        except (OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError) as e:
            # missing components, pickle-only weights (never loaded), corrupt files, mismatched shapes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"{name!r} cannot be loaded as a diffusers pipeline ({type(e).__name__}: {first[:300]}). It needs "
                "model_index.json and each component's config and .safetensors weights (pickled .bin weights are "
                "never loaded)."
            ) from e
        if Path(name).is_dir():
            pipe.call_defaults = read_call_defaults(name)
        dtype = None  # loaded in it
    pipe._diffroute_model_name = name
    if dtype is not None:
        from diffroute.utils.quiet import cast_pipeline

        cast_pipeline(pipe, dtype)
    if device is not None:
        pipe.to(device)
    return pipe
