"""Loading saved modules from folders that may be crafted: the config is checked against the weights file on the
meta device, where building allocates nothing, before the module is built for real.

diffusers' own loaders build parameters on the meta device, but buffers and anything a constructor computes are
still allocated, and a config field is trusted until the weights fail to fit: a router config asking for 100,000
blocks allocated gigabytes before its shape check. Here every parameter and buffer a config asks for is counted on
the meta device and compared with the tensors the safetensors header declares (read without the tensor data).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import torch

from diffroute.errors import InputError

MAX_CONFIG_INT = 1 << 24  # no sane size, count or step number in a config is larger
SLACK_BYTES = 64 << 20  # buffers a module builds beside its saved weights (tables, masks)


def header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read); InputError when corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of corrupt header
        raise InputError(f"{weights} is not a readable safetensors file ({e}); save or download it again.") from e


def check_config_values(config: dict, what: str) -> None:
    """Refuse config numbers no real model has (so huge that merely building the module would hang or overflow)."""
    for key, value in config.items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if v != v or abs(v) > MAX_CONFIG_INT:
                raise InputError(
                    f"{what}: config field {key!r} = {v!r} is out of any sane range; the folder is corrupt."
                )


def check_against_weights(build: Callable[[], torch.nn.Module], weights: Path, what: str) -> None:
    """Build the module with `build()` on the meta device and refuse (InputError) when its state dict differs from
    the weights file's tensors in names or shapes, or when it would allocate far more than the file holds."""
    shapes = header_shapes(weights)
    try:
        with torch.device("meta"):
            model = build()
    except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, AttributeError) as e:
        raise InputError(f"{what}: its config does not build a module ({e}); the folder is corrupt.") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} (config: {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        raise InputError(
            f"{what}: its config does not match its weights {weights.name} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shapes {wrong[:3]}); the folder is corrupt or was edited."
        )
    asked = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if asked > 2 * os.path.getsize(weights) + SLACK_BYTES:
        raise InputError(f"{what}: its config asks for {asked / 2**20:.0f} MiB, far more than its weights hold.")


def require_finite(tensors: dict, what: str) -> None:
    """InputError when any floating tensor holds NaN or inf: a diverged training is never saved or shipped."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(
            f"{what}: the weights hold NaN or infinite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''});"
            " the training diverged and nothing was written. Lower the learning rate, or check the loss weights."
        )
