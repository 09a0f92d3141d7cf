"""Bounds on user-given numbers, in a module without heavy imports so the CLI can check them at parse time."""

import math

MAX_STEPS = 1000  # no diffusers scheduler here trains on more timesteps
MAX_BLOCKS = 1000
MAX_SEED = 2**63 - 1 - 10**7  # torch seeds are signed 64-bit; sample i uses seed + i (room for 10 million samples)


def is_guidance(value) -> bool:
    """A classifier-free guidance scale the CLI and the app accept: a finite number >= 0 (0 and 1 switch guidance
    off in diffusers pipelines)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
