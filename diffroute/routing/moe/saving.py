"""Loading an upcycled transformer: its folder is the base class's `save_pretrained` output whose config carries
`diffroute_moe` (the upcycle settings), so the loader rebuilds the swap before reading the safetensors weights.

diffusers' `from_pretrained` of the base class would build dense FFNs and drop the MoE weights as unexpected keys,
so a folder with `diffroute_moe` must come through here (`load_pipeline` does it for pipeline folders and zoo
variants).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffroute.errors import InputError

from .upcycle import upcycle_moe

CONFIG_KEY = "diffroute_moe"


def is_moe_folder(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and CONFIG_KEY in json.loads(config.read_text())


def from_pretrained(folder: str | Path, dtype: torch.dtype | None = None):
    """The upcycled transformer saved in `folder` (by its `save_pretrained`), weights loaded strictly."""
    import diffusers

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        settings = config.pop(CONFIG_KEY)
        cls = getattr(diffusers, config["_class_name"])
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise InputError(f"{folder} is not an upcycled transformer folder (config.json with {CONFIG_KEY}): {e}") from e
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) != 1:
        raise InputError(f"{folder} should hold one .safetensors weights file; found {len(weights)}")
    model = cls.from_config(config)
    upcycle_moe(model, **settings)
    state = load_file(weights[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{weights[0]} does not match the upcycled {cls.__name__}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    model = model.eval()
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    return model.to(dtype or stored)
