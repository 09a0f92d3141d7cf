"""Bounds on user-given numbers, in a module without heavy imports so the CLI can check them at parse time."""

MAX_STEPS = 1000  # no diffusers scheduler here trains on more timesteps
MAX_BLOCKS = 1000
MAX_SEED = 2**63 - 1 - 10**7  # torch seeds are signed 64-bit; sample i uses seed + i (room for 10 million samples)
