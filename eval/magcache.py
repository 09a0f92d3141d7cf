"""MagCache as a peer: diffusers' `apply_mag_cache` with per-step magnitude ratios calibrated on the model itself.

MagCache's ratios are checkpoint- and scheduler-dependent (the published ones are for FLUX/Wan), so they are measured
on our model with diffusers' own calibration mode (`MagCacheConfig(calibrate=True)`: no skipping, the mean per-token
ratio ||r_t|| / ||r_{t-1}|| of the blocks' residual) and saved beside the model as `magcache.json`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
from pathlib import Path

CALIBRATION_FILE = "magcache.json"
FORMAT = "diffroute.magcache/v1"
_RESULT = "MagCache Calibration Results:"


class _Capture(logging.Handler):
    """diffusers' calibration mode reports the ratios only in a log record (and on stdout) at the end of the call,
    then resets them; this handler keeps that record."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.ratios: list[float] | None = None

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(_RESULT):
            self.ratios = [float(r) for r in ast.literal_eval(msg[len(_RESULT) :].strip())]


def calibrate(pipe, num_steps: int, run) -> list[float]:
    """Mag ratios of `pipe.transformer` over one full-compute call `run()` of `num_steps` steps."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    capture, level, propagate = _Capture(), logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the record is ours to read, not diffusers' console handler's to print
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its copy of the result on stdout (ours is JSON with --json)
            run()
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
        logger.propagate = propagate
        remove(pipe.transformer)
    if capture.ratios is None or len(capture.ratios) != num_steps:
        raise RuntimeError(
            f"diffusers' MagCache calibration reported {capture.ratios!r}, not {num_steps} ratios "
            "(its log format may have changed in this diffusers version)."
        )
    return capture.ratios


def remove(transformer) -> None:
    """Take MagCache's hooks off every block (calibration and inference hooks alike)."""
    for m in transformer.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            for name in [n for n in registry.hooks if n.startswith("mag_cache")]:
                registry.remove_hook(name, recurse=False)


def find_calibration(transformer) -> Path | None:
    """`magcache.json` in the pipeline folder the transformer was loaded from, if any."""
    origin = getattr(getattr(transformer, "config", None), "_name_or_path", None)
    if origin and Path(origin).is_dir():
        path = Path(origin).parent / CALIBRATION_FILE
        return path if path.is_file() else None
    return None


def save_ratios(path: Path, model_class: str, ratios: list[float], extra: dict) -> None:
    from diffroute.utils.io import atomic_write_json

    atomic_write_json(path, {"format": FORMAT, "model_class": model_class, "mag_ratios": ratios, **extra})


def load_ratios(transformer) -> list[float]:
    """The model's calibrated ratios, or an error that says how to make them."""
    from diffroute.errors import InputError
    from diffroute.utils.io import read_json

    path = find_calibration(transformer)
    if path is None:
        raise InputError(
            "MagCache needs mag ratios calibrated on this model: run `diffroute calibrate --method magcache --model "
            "FOLDER` (it writes magcache.json beside the model)."
        )
    d = read_json(path, "MagCache calibration", max_bytes=2**20)
    if not isinstance(d, dict) or d.get("model_class") != type(transformer).__name__:
        raise InputError(f"MagCache calibration {str(path)!r} is not a calibration for {type(transformer).__name__}.")
    ratios = d.get("mag_ratios")
    if (
        not isinstance(ratios, list)
        or not 1 <= len(ratios) <= 1000
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ratios)
    ):
        raise InputError(f"MagCache calibration {str(path)!r}: 'mag_ratios' must be 1 to 1000 finite numbers.")
    return [float(r) for r in ratios]
