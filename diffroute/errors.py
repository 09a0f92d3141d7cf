"""Error types for bad input: raised before any work, with a message that says what is wrong and how to fix it."""


class InputError(ValueError):
    """A user's argument or input file is unusable (unknown name, malformed file, out-of-range value)."""


class PlanError(InputError):
    """A plan spec (name, schedule file, policy) cannot be resolved."""


class NonFiniteImagesError(RuntimeError):
    """Generated images hold NaN or infinite values: never saved, scored or reported as if they were images."""
