"""Loading a transformer changed by our module surgery (MoE, DAR, DTR, FeRA, LoRA) from its `save_pretrained` folder.

Each surgery records its settings in the transformer's config (`diffroute_moe`, `diffroute_dar`, `diffroute_dtr`,
`diffroute_fera`, `diffroute_lora`) and its parameters live in the transformer's state dict, so the base class's
`save_pretrained` saves it all. Loading builds the base class from its config, re-applies the surgeries, then reads
the safetensors weights strictly: diffusers' own `from_pretrained` would build the plain model and drop the extra
weights as unexpected keys, so such folders come through here (`load_pipeline` does it for pipeline folders and zoo
variants).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffroute.errors import InputError
from diffroute.utils.checked_load import check_against_weights, check_config_values
from diffroute.utils.quiet import cast_model


def _surgeries() -> dict:
    from diffroute.surgery.dar import apply_dar
    from diffroute.surgery.dtr import apply_dtr
    from diffroute.surgery.fera import apply_fera, apply_lora
    from diffroute.surgery.moe.upcycle import upcycle_moe

    # config key -> how to re-apply it from its recorded settings, in the order they are applied
    return {
        "diffroute_moe": upcycle_moe,
        "diffroute_dtr": apply_dtr,
        "diffroute_dar": apply_dar,
        "diffroute_lora": apply_lora,
        "diffroute_fera": apply_fera,
    }


def is_modified_folder(folder: str | Path) -> bool:
    """True for a transformer folder whose config records one of our surgeries."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        keys = json.loads(config.read_text())
    except ValueError:
        return False
    return any(k in keys for k in _surgeries())


def from_pretrained(folder: str | Path, dtype: torch.dtype | None = None):
    """The changed transformer saved in `folder` (by its `save_pretrained`), weights loaded strictly."""
    import diffusers

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"])
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise InputError(f"{folder} is not a transformer folder with a readable config.json: {e}") from e
    surgeries = {k: config.pop(k) for k in list(config) if k in _surgeries()}
    if not surgeries:
        raise InputError(f"{folder} records none of {', '.join(_surgeries())}: load it with diffusers directly.")
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) != 1:
        raise InputError(f"{folder} should hold one .safetensors weights file; found {len(weights)}")

    def build():
        model = cls.from_config(config)
        for key, apply in _surgeries().items():
            if key in surgeries:
                apply(model, **surgeries[key])
        return model

    # an untrusted folder: the config and the surgeries' settings are checked against the weights on the meta
    # device before anything is allocated
    check_config_values(config, str(folder))
    for key, settings in surgeries.items():
        if not isinstance(settings, dict):
            raise InputError(f"{folder}: config field {key!r} is not an object; the folder is corrupt.")
        check_config_values(settings, f"{folder} ({key})")
    check_against_weights(build, weights[0], str(folder))
    model = build()
    state = load_file(weights[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{weights[0]} does not match the changed {cls.__name__}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    return cast_model(model.eval(), dtype or stored)
